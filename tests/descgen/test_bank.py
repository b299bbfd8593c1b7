"""Versioned bank files: round trip with comments, exclusive versions, racing writers, validation.

pytest tests/descgen/test_bank.py
"""

import multiprocessing as mp
from pathlib import Path

import pytest

from descgen.bank import BankDoc, diff_banks, file_sha256, latest_bank, list_versions, load_bank
from descgen.errors import BankError
from descgen.schema import Descriptor
from tests.descgen.fixtures import make_doc, write_bank

DATA = Path(__file__).parent / "data"


def test_golden_bank_loads():
    bank = load_bank(DATA / "golden.yaml")
    assert [c.name for c in bank.concepts] == ["background", "resolution"]
    assert [d.apply("a photo of a cat.") for d in bank.approved()] == [
        "a photo of a cat on the grass.",
        "blurry a photo of a cat.",
    ]
    assert bank.hash_is_current


def test_versions_are_numbered_and_never_overwritten(tmp_path):
    p1 = write_bank(tmp_path)
    doc = BankDoc.load(p1)
    p2 = doc.derive().save(tmp_path)
    assert [v for v, _ in list_versions(tmp_path)] == [1, 2]
    assert latest_bank(tmp_path) == p2 and load_bank(p2).meta.parent == 1
    with pytest.raises(BankError, match="never overwritten"):
        doc.derive().save(tmp_path, out=p2)
    assert load_bank(p2).meta.version == 2


def test_reviewer_comments_survive_a_rewrite(tmp_path):
    p1 = write_bank(tmp_path, {"background": ["in the city", "on the grass"]})
    text = p1.read_text().replace(
        "      - id: background.in-the-city",
        "      # reviewer: keep, very common\n      - id: background.in-the-city",
    )
    text = text.replace("template: '{caption} on the grass'", "template: '{caption} on the grass'  # short")
    p1.write_text(text)
    doc = BankDoc.load(p1).derive()
    doc.set_status("background.on-the-grass", "approved", "plain scene")
    doc.add_descriptors(
        "background",
        [Descriptor(id="background.in-the-snow", template="{caption} in the snow", form="suffix")],
    )
    out = doc.save(tmp_path).read_text()
    assert "# reviewer: keep, very common" in out and "# short" in out
    assert load_bank(tmp_path / "v2.yaml").concept("background").descriptors[1].note == "plain scene"


def _race(args):
    banks_dir, base, i = args
    doc = BankDoc.load(base).derive()
    doc.set_status("background.in-the-city", "approved", f"writer {i}")
    return str(doc.save(banks_dir))


@pytest.mark.slow
def test_two_writers_racing_get_distinct_versions(tmp_path):
    base = write_bank(tmp_path, {"background": ["in the city"]})
    with mp.get_context("spawn").Pool(2) as pool:
        paths = pool.map(_race, [(tmp_path, base, i) for i in range(2)] * 3)
    assert len(set(paths)) == 6
    assert [v for v, _ in list_versions(tmp_path)] == list(range(1, 8))
    notes = sorted(load_bank(p).concept("background").descriptors[0].note for p in paths)
    assert notes == ["writer 0"] * 3 + ["writer 1"] * 3


def test_racing_for_one_explicit_out_fails_instead_of_clobbering(tmp_path):
    base = write_bank(tmp_path)
    dest = tmp_path / "v9.yaml"
    BankDoc.load(base).derive().save(tmp_path, out=dest)
    before = file_sha256(dest)
    with pytest.raises(BankError, match="exists"):
        BankDoc.load(base).derive().save(tmp_path, out=dest)
    assert file_sha256(dest) == before


@pytest.mark.parametrize(
    "edit, message",
    [
        (("form: suffix", "form: sideways"), r"v1.yaml:\d+: concepts.0.form"),
        (
            ("template: '{caption} in the city'", "template: 'in the city'"),
            r"v1.yaml:\d+: concepts.0.descriptors.0",
        ),
        (("- name: resolution", "- name: resolution\n    colour: red"), r"v1.yaml:\d+: concepts.1.colour"),
        (("meta:", "meta: [oops"), r"v1.yaml:\d+: YAML syntax error"),
    ],
)
def test_problems_name_file_and_line(tmp_path, edit, message):
    p = write_bank(tmp_path, {"background": ["in the city"]})
    p.write_text(p.read_text().replace(*edit, 1))
    with pytest.raises(BankError, match=message):
        load_bank(p)


def test_diff(tmp_path):
    a = make_doc({"background": ["in the city", "on the grass"]})
    b = a.derive()
    b.set_status("background.in-the-city", "approved")
    b.add_descriptors(
        "background",
        [Descriptor(id="background.in-the-snow", template="{caption} in the snow", form="suffix")],
    )
    changes = diff_banks(a.bank, b.bank)
    assert ("~", "background.in-the-city: status proposed -> approved") in changes
    assert ("+", "background.in-the-snow: '{caption} in the snow' [proposed]") in changes
