"""Concurrent bank writers: a command's change is re-applied on a version written meanwhile, never lost.

pytest tests/descgen/test_concurrency.py
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from descgen.bank import BankDoc, file_sha256, latest_bank, list_versions, load_bank, save_change
from descgen.errors import DescgenError
from tests.descgen.fixtures import write_bank

TEXTS = [f"in place {w}" for w in "abcdefghijklmnop"]


def _approve(iid):
    def change(d):
        gid = d.start_generation("approve")
        d.set_status(iid, "approved")
        d.finish_generation(gid)

    return change


def test_a_change_is_reapplied_on_a_version_written_meanwhile(tmp_path):
    v1 = write_bank(tmp_path, {"background": TEXTS[:2]})
    a, b = BankDoc.load(v1), BankDoc.load(v1)  # two commands read the same base
    told = []
    pa = save_change(a, _approve("background.in-place-a"), tmp_path)
    pb = save_change(b, _approve("background.in-place-b"), tmp_path, on_rebase=told.append)
    assert (pa.name, pb.name, told) == ("v2.yaml", "v3.yaml", [pa])
    newest = load_bank(latest_bank(tmp_path))
    assert newest.meta.parent == 2
    assert [d.status for d in newest.concept("background").descriptors] == ["approved", "approved"]


def test_with_an_explicit_base_a_branch_is_written(tmp_path):
    v1 = write_bank(tmp_path, {"background": TEXTS[:2]})
    save_change(BankDoc.load(v1), _approve("background.in-place-a"), tmp_path)
    p = save_change(BankDoc.load(v1), _approve("background.in-place-b"), tmp_path, follow=False)
    assert p.name == "v3.yaml" and load_bank(p).meta.parent == 1  # --bank v1: the user chose the base


def test_a_change_that_no_longer_applies_fails_with_one_line_and_writes_nothing(tmp_path):
    v1 = write_bank(tmp_path, {"background": TEXTS[:2]})
    base = BankDoc.load(v1)
    other = BankDoc.load(v1).derive()  # meanwhile a hand edit drops the descriptor
    del other.data["concepts"][0]["descriptors"][1]
    other.save(tmp_path)
    before = {p.name: file_sha256(p) for p in tmp_path.iterdir()}
    with pytest.raises(DescgenError) as e:
        save_change(base, _approve("background.in-place-b"), tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "v2.yaml was written meanwhile" in msg and "rerun the command" in msg
    assert {p.name: file_sha256(p) for p in tmp_path.iterdir()} == before


# A real `descgen approve` whose read-to-write window is widened, so two of them always overlap.
SLOW_APPROVE = textwrap.dedent(
    """
    import sys, time
    import descgen.bank as bank
    derive = bank.BankDoc.derive
    def slow(self):
        time.sleep(float(sys.argv[1]))
        return derive(self)
    bank.BankDoc.derive = slow
    from descgen.cli import app
    app(sys.argv[2:], prog_name="descgen")
    """
)


@pytest.mark.slow
def test_eight_rounds_of_two_concurrent_approves(tmp_path):
    banks = tmp_path / "banks"
    write_bank(banks, {"background": TEXTS})
    rebased = 0
    for r in range(8):
        before = {p.name: file_sha256(p) for p in banks.iterdir()}
        ids = [f"background.in-place-{TEXTS[2 * r + k][-1]}" for k in (0, 1)]
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", SLOW_APPROVE, str(0.3 + 0.1 * (r % 3) * k), "approve", iid],
                cwd=tmp_path,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for k, iid in enumerate(ids)
        ]
        results = [(p.wait(60), *p.communicate()) for p in procs]
        ok = [iid for iid, (rc, _, _) in zip(ids, results) if rc == 0]
        failed = [e for rc, _, e in results if rc != 0]
        rebased += sum("written meanwhile by another command" in e for _, _, e in results)
        for e in failed:  # a failure: one line, and it changed nothing
            assert len(e.strip().splitlines()) == 1 and "rerun" in e, e
        assert len(failed) <= 1, results
        if failed:
            assert {p.name: file_sha256(p) for p in banks.iterdir() if p.name in before} == before
        newest = load_bank(latest_bank(banks)).concept("background")
        status = {d.id: d.status for d in newest.descriptors}
        assert all(status[i] == "approved" for i in ok), (r, results)
        assert len(list_versions(banks)) == len(before) + len(ok)
    newest = load_bank(latest_bank(banks))
    assert sum(d.status == "approved" for d in newest.concept("background").descriptors) == 16
    print(f"{rebased} of 8 rounds re-applied a change on a version written meanwhile")
    assert rebased >= 1  # the race did happen and was resolved
    assert [v for v, _ in list_versions(banks)] == list(range(1, 18))
    assert Path(latest_bank(banks)).name == "v17.yaml"
