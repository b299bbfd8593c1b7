"""Prompt files render with their documented variables; the catalog is valid.  Run: pytest tests/descgen/test_prompts.py"""

import pytest

from descgen.errors import DescgenError
from descgen.generate import descriptor_vars
from descgen.prompts import PROMPTS_DIR, load_catalog, load_prompt

DOCUMENTED = {
    "concepts": {},
    "descriptors": descriptor_vars("background", "the place", ["in the mountains", "on the beach"], 5),
}


def test_every_prompt_file_is_documented():
    assert {p.stem for p in PROMPTS_DIR.glob("*.txt")} == set(DOCUMENTED)


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_prompt_renders(name):
    messages, prefill = load_prompt(name).render(**DOCUMENTED[name])
    assert messages[0]["role"] == "user" and "$" not in messages[0]["content"]
    assert prefill.endswith("-") and "$" not in prefill


def test_descriptor_prefill_is_a_started_list():
    _, prefill = load_prompt("descriptors").render(**DOCUMENTED["descriptors"])
    assert prefill == "- in the mountains\n- on the beach\n-"


def test_missing_variable_fails_loudly(tmp_path):
    p = tmp_path / "mine.txt"
    p.write_text("List $concept for $nothing.\n")
    with pytest.raises(DescgenError, match=r"needs variable \$nothing"):
        load_prompt(p).render(concept="x")


def test_catalog_has_the_required_concepts():
    cat = load_catalog()
    names = {e.name for e in cat.concepts}
    assert {"background", "texture", "resolution", "lighting", "weather", "viewpoint"} <= names
    assert cat.match("Scenery").name == "background"
    assert cat.match("textures").name == "texture"
    assert cat.match("banana") is None
    for e in cat.concepts:
        assert e.form in ("prefix", "suffix") and e.hint and len(e.examples) == 3
