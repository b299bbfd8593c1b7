"""The QC against the hand-labelled set tests/descgen/data/qc_labels.yaml: precision >= 0.95 at recall >= 0.8,
every rule doing more good than harm, and the run-level same-noun cap.  Run: pytest tests/descgen/test_qc_labels.py"""

from __future__ import annotations

from collections import Counter

import pytest

from descgen import qc
from descgen.qc import Collector
from descgen.qc_eval import concept_rules, judge_labelled, load_labels, main, phrase_and_form, scores


@pytest.fixture(scope="module")
def labels():
    return load_labels()


def test_labelled_set_is_big_enough_and_has_reasons(labels):
    per = Counter(it.concept for it in labels)
    assert len(labels) >= 300 and len([c for c, n in per.items() if n >= 20]) >= 4
    assert all(it.reason for it in labels)
    assert 0.2 < sum(not it.plausible for it in labels) / len(labels) < 0.5  # both kinds well represented
    assert len({(it.concept, it.phrase.lower()) for it in labels}) == len(labels)  # no phrase twice


def test_precision_and_recall_thresholds(labels):
    s = scores(judge_labelled(labels))
    assert s["recall"] >= 0.8
    assert s["precision"] >= 0.95


def test_every_rule_removes_more_bad_than_good(labels):
    rules = scores(judge_labelled(labels))["rules"]
    for rule, v in rules.items():
        if rule not in qc.DIVERSITY_RULES:
            assert v["precision"] >= 0.7, (rule, v)
    # one texture per descriptor: of what the rule refuses, every phrase is a pair of texture words
    pairs = [it for it, r in judge_labelled(labels) if r == qc.TWO_ADJECTIVES]
    assert pairs and all(it.concept == "texture" and len(it.phrase.split()) == 2 for it in pairs)


def test_issue_21_misses(labels):
    """The reviewer's examples: proper-noun places, invisible phrases, coined words are refused; real
    adjectives and the published templates' forms are kept."""
    got = {(it.concept, it.phrase): r for it, r in judge_labelled(labels)}
    assert got[("background", "in the city of Zanzibar")] == qc.PROPER_NOUN
    assert got[("background", "in the countryside of Alaska")] == qc.PROPER_NOUN
    assert got[("background", "in the heat")] == qc.NOT_VISIBLE
    assert got[("background", "in a sunny day")] is not None
    assert got[("background", "from the subject's perspective")] is not None
    assert got[("texture", "smoothy")] == qc.COINED
    for ok in [("texture", w) for w in ("worn", "brittle", "moist", "unkempt")] + [
        ("background", "{} surrounded by birds"),
        ("background", "{} during sunset"),
        ("texture", "{} with a rough texture"),
        ("resolution", "cropped"),
        ("resolution", "rotated"),
        ("resolution", "monochrome"),
        ("resolution", "a blurry photo of {}"),
    ]:
        assert got[ok] is None, ok


def test_phrase_and_form():
    assert phrase_and_form("{} with a rough texture", "prefix") == ("with a rough texture", "suffix")
    assert phrase_and_form("low resolution of {}", "prefix") == ("low resolution of", "prefix")
    assert phrase_and_form("crinkled", "prefix") == ("crinkled", "prefix")


def test_same_noun_cap_in_a_run():
    c = Collector(concept_rules("background"))
    c.add_reply("- in the city\n- in a busy city\n- in an old town\n- in a small village\n- in the snow")
    accepted = [x.text for x in c.accepted()]
    assert accepted == ["in the city", "in a busy city", "in the snow"]
    assert {x.text: x.reason for x in c.rejected()} == {
        "in an old town": qc.SAME_NOUN,
        "in a small village": qc.SAME_NOUN,
    }


def test_report_command(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "precision" in out and "proper noun" in out


def test_bad_label_line(tmp_path, capsys):
    (tmp_path / "l.yaml").write_text(
        "background:\n  - 'in the snow | + | scene'\n  - 'in the rain | maybe'\n"
    )
    assert main([str(tmp_path / "l.yaml")]) == 1
    assert "l.yaml:3:" in capsys.readouterr().err
