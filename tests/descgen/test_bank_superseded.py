"""banks/superseded/: older versions out of the way, still resolved by old path and counted in numbering.

pytest tests/descgen/test_bank_superseded.py
"""

import re
from pathlib import Path

import pytest

from descgen.bank import (
    BankDoc,
    file_sha256,
    latest_bank,
    list_versions,
    load_bank,
    resolve_bank_path,
    save_change,
    supersede,
)
from descgen.errors import BankError
from tests.descgen.fixtures import write_bank

REPO_BANKS = Path(__file__).resolve().parents[2] / "banks"


def _three(tmp_path):
    v1 = write_bank(tmp_path, {"background": ["in the city"]})
    v2 = BankDoc.load(v1).derive().save(tmp_path, log=[{"kind": "reply", "reply": "x"}])
    v3 = BankDoc.load(v2).derive().save(tmp_path)
    return v1, v2, v3


def test_supersede_moves_old_versions_with_their_logs_unchanged(tmp_path):
    _three(tmp_path)
    sums = {p.name: file_sha256(p) for p in tmp_path.glob("v*")}
    moved = supersede(tmp_path, keep=[1])
    assert sorted(p.name for p in moved) == ["v2.log.jsonl", "v2.yaml"]
    assert sorted(p.name for p in tmp_path.glob("v*")) == ["v1.yaml", "v3.yaml"]
    assert {p.name: file_sha256(p) for p in [*tmp_path.glob("v*"), *tmp_path.glob("superseded/v*")]} == sums
    assert supersede(tmp_path, keep=[]) == [tmp_path / "superseded" / "v1.yaml"]  # the newest always stays


def test_superseded_versions_resolve_and_count_in_numbering(tmp_path):
    v1, v2, v3 = _three(tmp_path)
    supersede(tmp_path, keep=[])
    assert [v for v, _ in list_versions(tmp_path)] == [1, 2, 3] and latest_bank(tmp_path) == v3
    assert resolve_bank_path(v2) == tmp_path / "superseded" / "v2.yaml"
    assert resolve_bank_path(tmp_path / "v9.yaml") == tmp_path / "v9.yaml"  # missing: unchanged
    assert load_bank(v2).meta.version == 2 and file_sha256(v2).startswith("sha256:")  # old path works
    doc = BankDoc.load(v1)
    assert doc.path == tmp_path / "superseded" / "v1.yaml"
    v4 = doc.derive().save(tmp_path)  # a branch from a superseded base: the next number, never a reuse
    assert v4.name == "v4.yaml" and load_bank(v4).meta.parent == 1
    with pytest.raises(BankError, match="never overwritten"):
        doc.derive().save(tmp_path, version=2)
    # a command without --bank builds on the newest (top level), also when the base is superseded
    p = save_change(BankDoc.load(latest_bank(tmp_path)), lambda d: None, tmp_path)
    assert p.name == "v5.yaml"


def test_repo_banks_show_the_newest_on_top_and_keep_the_lineage():
    versions = list_versions(REPO_BANKS)
    assert versions, "banks/ has no versions"
    top = sorted(REPO_BANKS.glob("v*.yaml"), key=lambda p: int(p.stem[1:]))
    assert top and top[-1] == versions[-1][1]  # `ls banks/v*.yaml | sort -V | tail -n 1` is the newest
    assert (REPO_BANKS / "README.md").is_file()
    numbers = {v for v, _ in versions}
    for _, p in versions:  # every parent still resolves (meta's header line: loading all 47 is slow)
        head = p.read_text(encoding="utf-8")[:1000]
        m = re.search(r"^  parent: (\d+)$", head, re.MULTILINE)
        assert m is None or int(m.group(1)) in numbers, p
    assert load_bank(versions[-1][1]).meta.version == versions[-1][0]
