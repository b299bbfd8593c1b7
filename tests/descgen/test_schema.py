"""The bank schema: templates, forms, injection, validation, content hash.  Run: pytest tests/descgen/test_schema.py"""

import pytest
from pydantic import ValidationError

from descgen.schema import Bank, Concept, Descriptor, inject, make_template
from tests.descgen.fixtures import make_doc


@pytest.mark.parametrize(
    "text, form, template, caption",
    [
        ("in the Mountains", "suffix", "{caption} in the mountains", "a photo of a dog in the mountains."),
        ("blurred", "prefix", "blurred {caption}", "blurred a photo of a dog."),
    ],
)
def test_template_and_apply(text, form, template, caption):
    assert make_template(text, form) == template
    d = Descriptor(id="x.y", template=template, form=form)
    assert d.apply("a photo of a dog.") == caption == inject("a photo of a dog.", template)
    assert d.text == text.lower()


@pytest.mark.parametrize(
    "template, form, message",
    [
        ("in the snow", "suffix", "exactly one"),
        ("{caption} in {caption}", "suffix", "exactly one"),
        ("in the snow {caption}", "suffix", "must start with"),
        ("{caption} blurred", "prefix", "must end with"),
        ("{caption}", "suffix", "must start with"),
        ("{caption} " + "very " * 9 + "far", "suffix", "too long"),
    ],
)
def test_bad_templates(template, form, message):
    with pytest.raises(ValidationError, match=message):
        Descriptor(id="x.y", template=template, form=form)


def test_unknown_key_and_bad_status_rejected():
    with pytest.raises(ValidationError, match="Extra inputs"):
        Descriptor(id="x.y", template="{caption} in the snow", form="suffix", colour="red")
    with pytest.raises(ValidationError):
        Descriptor(id="x.y", template="{caption} in the snow", form="suffix", status="maybe")


def test_duplicate_templates_in_a_concept():
    d = {"template": "{caption} in the snow", "form": "suffix"}
    with pytest.raises(ValidationError, match="share the template"):
        Concept(
            name="weather",
            form="suffix",
            sources=["llm"],
            descriptors=[Descriptor(id="w.a", **d), Descriptor(id="w.b", **d)],
        )


def test_approved_skips_rejected_concepts_and_hash_tracks_content():
    doc = make_doc({"background": ["in the city", "on the grass"], "resolution": ["grainy"]})
    doc.set_status("background.in-the-city", "approved")
    doc.set_status("resolution.grainy", "approved")
    doc.set_status("resolution", "rejected")
    bank = doc.bank
    assert [d.id for d in bank.approved()] == ["background.in-the-city"]
    assert [d.id for d in bank.approved(["background"])] == ["background.in-the-city"]
    h = bank.compute_hash()
    doc.set_status("background.on-the-grass", "approved")
    assert doc.bank.compute_hash() != h


def test_bank_rejects_unknown_generation():
    data = make_doc({"background": ["in the city"]}).bank.model_dump(mode="json")
    data["concepts"][0]["descriptors"][0]["provenance"] = "g99"
    with pytest.raises(ValidationError, match="unknown generation"):
        Bank.model_validate(data)
