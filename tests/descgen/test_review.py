"""Interactive review: edits checked when typed (schema, collision, QC with override), undo, Ctrl-C/EOF.

pytest tests/descgen/test_review.py
"""

import os
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from descgen import cli
from descgen.bank import BankDoc, file_sha256, list_versions, load_bank
from descgen.review import ReviewInterrupted, apply_decisions, qc_rules_for, review_items
from tests.descgen.fixtures import write_bank

runner = CliRunner()


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def run(*args, input=None):
    return runner.invoke(cli.app, [str(a) for a in args], input=input)


def scripted(answers):
    """An `ask` that plays `answers` in order; an exception instance is raised instead of answered."""
    it = iter(answers)

    def ask(question, choices, default):
        a = next(it)
        if isinstance(a, BaseException):
            raise a
        assert not choices or a in choices, (question, choices, a)
        return a

    return ask


def _bank(tmp_path):
    return write_bank(tmp_path / "banks", {"background": ["in the city", "on the grass", "at home"]})


def test_an_edit_is_checked_when_typed(tmp_path):
    doc = BankDoc.load(_bank(tmp_path))
    shown = []
    # the concept itself first (skip), then in the city (skip), then on the grass (edit)
    ask = scripted(["s", "s", "e", "In the City", "{caption} x", "a b c d e f g h i", "in the snow", "s"])
    decisions = review_items(doc, "background", "proposed", ask, shown.append)
    text = "\n".join(shown)
    # the collision names the edit and the descriptor it collides with, not a line of the base file
    assert "edit 'In the City': same template as background.in-the-city" in text
    assert "edit '{caption} x': type the phrase only" in text
    assert "edit 'a b c d e f g h i':" in text and "too long" in text
    assert "v1.yaml" not in text
    assert [(x.item, x.status, x.template) for x in decisions] == [
        ("background.on-the-grass", "approved", "{caption} in the snow")
    ]


def test_qc_runs_on_an_edit_and_can_be_overridden(tmp_path):
    doc = BankDoc.load(_bank(tmp_path))
    rules = qc_rules_for(doc)
    shown = []
    # QC of generated phrases: "in the dog" names a class of the default catalog
    ask = scripted(["s", "e", "in the dog", "n", "in the snow", "e", "in the dog", "y", "s"])
    decisions = review_items(doc, "background", "proposed", ask, shown.append, rules)
    qc_lines = [s for s in shown if "QC says" in s]
    assert len(qc_lines) == 2, shown
    assert [x.template for x in decisions] == ["{caption} in the snow", "{caption} in the dog"]
    assert "names a class" in qc_lines[0]
    assert "QC overridden" in decisions[1].note and "QC" not in decisions[0].note


def test_undo_goes_back_to_the_last_decision(tmp_path):
    doc = BankDoc.load(_bank(tmp_path))
    shown = []
    # concept, city, grass, home: s a r | undo r (back to grass) | a | undo, undo (back to city), undo
    ask = scripted(["s", "a", "r", "u", "a", "u", "u", "u", "r", "s", "s"])
    decisions = review_items(doc, "background", "proposed", ask, shown.append)
    assert "nothing to undo" in shown and "undone: background.on-the-grass rejected" in shown
    assert [(x.item, x.status) for x in decisions] == [("background.in-the-city", "rejected")]


@pytest.mark.parametrize("exc", [EOFError(), KeyboardInterrupt()])
def test_an_interrupt_carries_the_decisions_so_far(tmp_path, exc):
    doc = BankDoc.load(_bank(tmp_path))
    with pytest.raises(ReviewInterrupted) as e:
        review_items(doc, "background", "proposed", scripted(["s", "a", "r", exc]), lambda s: None)
    assert [x.status for x in e.value.decisions] == ["approved", "rejected"]
    assert e.value.eof == isinstance(exc, EOFError)
    new = doc.derive()
    apply_decisions(new, e.value.decisions)
    assert [d.status for d in new.bank.concept("background").descriptors] == [
        "approved",
        "rejected",
        "proposed",
    ]


def test_cli_end_of_input_keeps_the_decisions(tmp_path):
    _bank(tmp_path)
    r = run("review", "--concept", "background", input="s\na\nr\n")  # then end of input
    assert r.exit_code == 0, r.output
    assert "keeping the 2 decisions" in r.output
    bg = load_bank("banks/v2.yaml").concept("background")
    assert [d.status for d in bg.descriptors] == ["approved", "rejected", "proposed"]


def test_cli_ctrl_c_offers_to_keep_the_decisions(tmp_path, monkeypatch):
    _bank(tmp_path)
    answers = iter(["s", "a", KeyboardInterrupt()])

    def fake_ask(console):
        def ask(q, choices, default):
            a = next(answers)
            if isinstance(a, BaseException):
                raise a
            return a

        return ask

    monkeypatch.setattr("descgen.review.ask_in_terminal", fake_ask)
    before = {p.name: file_sha256(p) for p in Path("banks").iterdir()}
    r = run("review", "--concept", "background", input="n\n")  # no: discard
    assert r.exit_code == 1 and "1 decisions discarded, nothing written" in r.output
    assert {p.name: file_sha256(p) for p in Path("banks").iterdir()} == before
    answers = iter(["s", "a", KeyboardInterrupt()])
    r = run("review", "--concept", "background", input="\n")  # default: keep
    assert r.exit_code == 0, r.output
    assert load_bank("banks/v2.yaml").concept("background").descriptors[0].status == "approved"


def test_cli_collision_is_reported_at_the_edit_and_nothing_is_lost(tmp_path):
    _bank(tmp_path)
    r = run("review", "--concept", "background", input="s\na\ne\nin the city\nin the snow\nq\n")
    assert r.exit_code == 0, r.output
    assert "edit 'in the city': same template as background.in-the-city" in r.output
    bg = load_bank("banks/v2.yaml").concept("background")
    assert [(d.text, d.status) for d in bg.descriptors] == [
        ("in the city", "approved"),
        ("in the snow", "approved"),
        ("at home", "proposed"),
    ]


def test_bank_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        p = write_bank(tmp_path / "b")
    finally:
        os.umask(old)
    assert p.stat().st_mode & 0o777 == 0o640


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="needs a pty")
def test_single_keys_in_a_terminal(tmp_path):
    """A person at a terminal: keys act without Enter; Ctrl-D keeps the decisions made."""
    import pty
    import select
    import time

    _bank(tmp_path)
    exe = Path(sys.executable).parent / "descgen"
    pid, fd = pty.fork()
    if pid == 0:  # child: the real CLI on the pty
        os.execv(str(exe), [str(exe), "review", "--concept", "background"])
    seen = b""

    def read_until(marker, times=1, timeout=30.0):
        nonlocal seen
        end = time.monotonic() + timeout
        while seen.count(marker) < times and time.monotonic() < end:
            r, _, _ = select.select([fd], [], [], 0.2)
            if r:
                try:
                    seen += os.read(fd, 4096)
                except OSError:
                    break
        return seen.count(marker) >= times

    for k, key in enumerate([b"s", b"a", b"r"], 1):  # each key alone, no Enter
        assert read_until(b"decision [", k), seen
        time.sleep(0.2)  # a person's pace: the prompt is waiting for a key by now
        os.write(fd, key)
    assert read_until(b"(4/4)"), seen
    assert read_until(b"decision [", 4), seen
    time.sleep(0.2)
    os.write(fd, b"\x04")  # Ctrl-D
    assert read_until(b"wrote"), seen
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, seen
    assert len(list_versions("banks")) == 2
    bg = load_bank("banks/v2.yaml").concept("background")
    assert [d.status for d in bg.descriptors] == ["approved", "rejected", "proposed"]


def test_cli_review_decisions_are_reapplied_on_a_version_written_meanwhile(tmp_path, monkeypatch):
    from descgen.bank import save_change

    v1 = _bank(tmp_path)
    answers = iter(["s", "e", "in the snow", "r", "q"])

    def other_command():  # another `descgen approve` finishes while the reviewer is still typing
        def change(d):
            gid = d.start_generation("approve")
            d.set_status("background.at-home", "approved")
            d.finish_generation(gid)

        save_change(BankDoc.load(v1), change, "banks")

    def fake_ask(console):
        def ask(q, choices, default):
            a = next(answers)
            if a == "r":
                other_command()
            return a

        return ask

    monkeypatch.setattr("descgen.review.ask_in_terminal", fake_ask)
    r = run("review", "--concept", "background")
    assert r.exit_code == 0, r.output
    assert "banks/v2.yaml was written meanwhile by another command" in r.output
    bank = load_bank("banks/v3.yaml")
    assert bank.meta.parent == 2
    assert [(d.text, d.status) for d in bank.concept("background").descriptors] == [
        ("in the snow", "approved"),
        ("on the grass", "rejected"),
        ("at home", "approved"),
    ]
