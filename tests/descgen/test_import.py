"""descgen import (lists saved like the StarFT reference's keywords/*.pt, .txt, .yaml), preview and the
shared caption injection in both styles.  Run: pytest tests/descgen/test_import.py"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from descgen import cli
from descgen.bank import list_versions, load_bank
from descgen.importer import file_digest, read_templates, to_template
from descgen.schema import Descriptor, inject

runner = CliRunner()
BG = ["{} in snowy landscapes.", "{} surrounded by birds.", "{} during sunset.", "{} on a rocky beach."]
TEXTURE = ["crinkled {}.", "{} with a rough texture.", "fluffy {}.", "old {}."]
RESOLUTION = ["low resolution of {}.", "cropped {}.", "monochrome {}.", "blurry photo of {}."]


def run(*args):
    return runner.invoke(cli.app, [str(a) for a in args])


def reference_caption(template: str, caption: str) -> str:
    """How the reference code fills a template: the caption minus its final period."""
    return template.format(caption[:-1])


@pytest.fixture
def lists(tmp_path):
    torch.save(BG, tmp_path / "spurious_bg.pt")
    torch.save(TEXTURE, tmp_path / "spurious_texture.pt")
    torch.save(RESOLUTION, tmp_path / "spurious_resolution.pt")
    return tmp_path


@pytest.mark.parametrize("template", BG + TEXTURE + RESOLUTION)
def test_imported_template_gives_the_reference_caption(template):
    t, form = to_template(template)
    d = Descriptor(id="x.y", template=t, form=form)
    for caption in ("a photo of a dog.", "a sketch of a red car."):
        assert d.apply(caption) == reference_caption(template, caption)


def test_adjective_style_and_reference_default():
    t = "crinkled {caption}"
    assert inject("a photo of a dog.", t) == "crinkled a photo of a dog."
    assert inject("a photo of a dog.", t, "dog", "reference") == "crinkled a photo of a dog."
    assert inject("a photo of a dog.", t, "dog", "adjective") == "a photo of a crinkled dog."
    assert inject("a photo of a dog.", "old {caption}", "dog", "adjective") == "a photo of an old dog."
    assert inject("A photo of an apple.", t, "apple", "adjective") == "A photo of a crinkled apple."
    assert (
        inject("a photo of a hotdog.", t, "dog", "adjective") == "crinkled a photo of a hotdog."
    )  # no class word
    assert inject("a dog.", "{caption} in the snow", "dog", "adjective") == "a dog in the snow."
    d = Descriptor(id="x.y", template=t, form="prefix")
    assert d.caption("a photo of a cat.", "cat", "adjective") == "a photo of a crinkled cat."


def test_import_pt_writes_a_version_with_provenance(lists, tmp_path):
    banks = tmp_path / "banks"
    r = run("import", lists / "spurious_bg.pt", "--concept", "background", "--banks-dir", banks, "--approve")
    assert r.exit_code == 0, r.output
    r = run("import", lists / "spurious_texture.pt", "--concept", "texture", "--banks-dir", banks)
    assert r.exit_code == 0, r.output
    _, (_, v2) = list_versions(banks)
    b = load_bank(v2)
    bg, tex = b.concept("background"), b.concept("texture")
    assert [d.apply("a photo of a dog.") for d in bg.approved()] == [
        reference_caption(t, "a photo of a dog.") for t in BG
    ]
    assert {d.source for d in bg.descriptors} == {"imported"} and "imported" in bg.sources
    assert all(d.status == "proposed" for d in tex.descriptors) and len(tex.descriptors) == len(TEXTURE)
    gen = {g.id: g for g in b.meta.generations}[tex.descriptors[0].provenance]
    assert gen.stats["sha256"] == file_digest(lists / "spurious_texture.pt") and gen.command.startswith(
        "import"
    )
    # importing the same list again adds nothing and writes nothing
    r = run("import", lists / "spurious_bg.pt", "--concept", "background", "--banks-dir", banks)
    assert r.exit_code == 1 and "already in the bank" in r.stderr
    assert len(list_versions(banks)) == 2


def test_import_txt_and_yaml(tmp_path):
    (tmp_path / "l.txt").write_text("# my list\n{} in the rain.\n\nat night\n")
    with pytest.raises(Exception, match=r"l.txt: line 4: .*no '\{\}' placeholder"):
        read_templates(tmp_path / "l.txt")
    items = read_templates(tmp_path / "l.txt", form="suffix")
    assert [i.template for i in items] == ["{caption} in the rain", "{caption} at night"]
    (tmp_path / "l.yaml").write_text("templates:\n  - 'shiny {}.'\n  - 'a {} in snow.'\n")
    with pytest.raises(Exception, match=r"l.yaml: line 3: .*start or end"):
        read_templates(tmp_path / "l.yaml")


def test_preview_shows_both_styles(lists, tmp_path):
    banks = tmp_path / "banks"
    run(
        "import",
        lists / "spurious_texture.pt",
        "--concept",
        "texture",
        "--banks-dir",
        banks,
        "--approve",
        "--caption-style",
        "adjective",
    )
    r = run("preview", "--banks-dir", banks, "--caption", "a photo of a {c}.", "--class", "dog", "--json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["captions"]
    crinkled = next(x for x in rows if x["id"] == "texture.crinkled")
    assert crinkled["style"] == "adjective" and crinkled["caption"] == "a photo of a crinkled dog."
    assert crinkled["other_caption"] == "crinkled a photo of a dog."
    rough = next(x for x in rows if x["id"] == "texture.with-a-rough-texture")
    assert rough["caption"] == rough["other_caption"] == "a photo of a dog with a rough texture."
    r = run("preview", "--banks-dir", banks, "--class", "cat")
    assert r.exit_code == 0 and "crinkled cat" in r.stdout


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_bytes(b"not a pickle"), "weights_only load failed"),
        (lambda p: p.write_bytes(b"junk\n"), "weights_only load failed"),  # reaches the legacy loader
        (lambda p: torch.save({"a": torch.zeros(2)}, p), "expected a list of template strings"),
        (lambda p: torch.save(["{} and {}."], p), "item 1: .*exactly one"),
        (lambda p: torch.save(["{} " + "very " * 12 + "far."], p), "item 1: .*too long"),
    ],
)
def test_bad_lists_are_one_line_and_write_nothing(tmp_path, make, message):
    f = tmp_path / "bad.pt"
    make(f)
    banks = tmp_path / "banks"
    r = run("import", f, "--concept", "background", "--banks-dir", banks)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert len(r.stderr.strip().splitlines()) == 1
    import re

    assert re.search(message, r.stderr), r.stderr
    assert list_versions(banks) == []


def test_pt_with_code_is_refused(tmp_path):
    """weights_only=True: a pickle that would construct an arbitrary object is not loaded."""

    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    torch.save([Evil()], tmp_path / "evil.pt")
    r = run("import", tmp_path / "evil.pt", "--concept", "background", "--banks-dir", tmp_path / "banks")
    assert r.exit_code == 1 and "weights_only load failed" in r.stderr and "ran" not in r.stdout


def test_show_diff_validate_json(lists, tmp_path):
    banks = tmp_path / "banks"
    run("import", lists / "spurious_bg.pt", "--concept", "background", "--banks-dir", banks)
    r = run("approve", "background.during-sunset", "--note", "a visible sky", "--banks-dir", banks)
    assert r.exit_code == 0, r.output
    (_, v1), (_, v2) = list_versions(banks)
    d = json.loads(run("diff", v1, v2, "--json").stdout)["changes"]
    assert {"kind": "~", "change": "background.during-sunset: note None -> 'a visible sky'"} in d
    assert any(c["change"].endswith("status proposed -> approved") for c in d)
    assert "note None -> 'a visible sky'" in run("diff", v1, v2).stdout
    s = json.loads(run("show", v2, "--json", "--concept", "background", "--status", "approved").stdout)
    (c,) = s["concepts"]
    assert [x["id"] for x in c["descriptors"]] == ["background.during-sunset"]
    assert c["descriptors"][0]["example"] == "a photo of a dog during sunset."
    bad = tmp_path / "bad.yaml"
    bad.write_text("meta: {version: 1}\nconcepts: []\n")
    r = run("validate", v2, bad, "--json")
    assert r.exit_code == 1
    files = json.loads(r.stdout)["files"]
    assert files[0]["ok"] and not files[1]["ok"] and files[1]["problems"][0].startswith(str(bad))
