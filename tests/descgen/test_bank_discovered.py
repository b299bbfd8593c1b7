"""descgen.edits.add_discovered: discovered features become proposed descriptors, no duplicates.

pytest tests/descgen/test_bank_discovered.py
"""

import pytest

from descgen.bank import BankDoc, load_bank
from descgen.edits import add_discovered
from descgen.errors import DescgenError
from tests.descgen.fixtures import write_bank


def _ev(rank, regions=(1, 2, 3)):
    return {
        "report": "r.json",
        "feature_rank": rank,
        "influence": 0.5,
        "region_ids": list(regions),
        "gaps": {"dog": 0.25},
        "empty": [],
        "none": None,
    }


def test_add_discovered_names_features_and_attaches_evidence(tmp_path):
    v1 = write_bank(tmp_path, {"background": ["on grass"], "resolution": ["blurry"]})
    before = v1.read_text()
    doc = BankDoc.load(v1).derive()
    gid = doc.start_generation("discover --to-bank (r.json)")
    features = [
        ([("With a  Red rectangle", 0.41), ("on grass", 0.2)], _ev(1)),
        ([("with a red rectangle", 0.4), ("on grass", 0.3)], _ev(2)),  # first phrase used: takes the next
        ([("blurry", 0.3)], _ev(3)),  # in the bank in prefix form: evidence attached, no duplicate
        ([("with a red rectangle", 0.2)], _ev(4)),  # nothing left: skipped
    ]
    added, matched = add_discovered(
        doc, "Background", "suffix", features, gid, hint="ignored: concept exists"
    )
    assert added == ["background.with-a-red-rectangle"]
    assert matched == {1: "background.on-grass", 2: "resolution.blurry"}
    doc.finish_generation(gid)
    out = doc.save(tmp_path)
    assert v1.read_text() == before
    bank = load_bank(out)
    bg = bank.concept("background")
    assert bg.sources == ["catalog", "discovered"] and bg.hint is None
    d = bg.descriptors[-1]
    assert (d.id, d.template, d.status, d.source, d.provenance) == (
        "background.with-a-red-rectangle",
        "{caption} with a red rectangle",
        "proposed",
        "discovered",
        gid,
    )
    assert d.evidence == {
        "report": "r.json",
        "feature_rank": 1,
        "influence": 0.5,
        "region_ids": [1, 2, 3],
        "gaps": {"dog": 0.25},
        "similarity": 0.41,
        "alternatives": ["on grass (0.200)"],
    }
    grass = bg.descriptors[0]
    assert grass.source == "llm" and grass.evidence["similarity"] == 0.3
    assert grass.evidence["alternatives"] == ["with a red rectangle (0.400)"]
    assert bank.concept("resolution").descriptors[0].evidence["feature_rank"] == 3
    text = out.read_text()  # short lists on one line, for reviewers
    assert "region_ids: [1, 2, 3]" in text and "alternatives: [on grass (0.200)]" in text


def test_add_discovered_creates_its_concept(tmp_path):
    doc = BankDoc.load(write_bank(tmp_path)).derive()
    gid = doc.start_generation("discover")
    added, matched = add_discovered(
        doc, "discovered", "prefix", [([("striped", 0.5)], {})], gid, hint="found by discovery"
    )
    assert added == ["discovered.striped"] and matched == {}
    doc.finish_generation(gid)
    c = load_bank(doc.save(tmp_path)).concept("discovered")
    assert (c.sources, c.form, c.hint, c.provenance) == (["discovered"], "prefix", "found by discovery", gid)
    assert c.descriptors[0].template == "striped {caption}"
    assert c.descriptors[0].evidence == {"similarity": 0.5}


def test_add_discovered_rejects_an_unusable_phrase_cleanly(tmp_path):
    doc = BankDoc.load(write_bank(tmp_path)).derive()
    gid = doc.start_generation("discover")
    with pytest.raises(DescgenError, match="feature 1: phrase .* cannot be a descriptor"):
        add_discovered(doc, "background", "suffix", [([("word " * 12, 0.5)], {})], gid)
