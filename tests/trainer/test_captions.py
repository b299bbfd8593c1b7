"""The trainer's spurious captions come from descgen's own injection, in each concept's caption style.

.venv/bin/pytest tests/trainer/test_captions.py -q
"""

from __future__ import annotations

from descgen.schema import Descriptor, make_template
from trainer.data import SpuriousCaptions


def _descriptor(text: str, form: str) -> Descriptor:
    return Descriptor(
        id=f"texture.{text.replace(' ', '-')}",
        template=make_template(text, form),
        form=form,
        status="approved",
        source="llm",
    )


def test_reference_style_is_the_papers_and_descgens():
    d = _descriptor("crinkled", "prefix")
    draw = SpuriousCaptions("bank", 0, [d])
    assert (
        draw("a photo of a dog.", 0, 0, "dog") == "crinkled a photo of a dog." == d.apply("a photo of a dog.")
    )


def test_adjective_style_puts_the_descriptor_before_the_class_name():
    d = _descriptor("old", "prefix")
    draw = SpuriousCaptions("bank", 0, [(d, "adjective")])
    assert draw("a photo of a dog.", 3, 7, "dog") == "a photo of an old dog."
    assert draw("a photo of a dog.", 3, 7, "dog") == d.caption("a photo of a dog.", "dog", "adjective")


def test_draws_depend_on_seed_epoch_and_index_only():
    ds = [_descriptor(w, "suffix") for w in ("in the snow", "on the beach", "in a forest", "at night")]
    a, b = SpuriousCaptions("bank", 1, ds), SpuriousCaptions("bank", 1, ds)
    caps = [a("a photo of a cat.", e, i, "cat") for e in range(3) for i in range(20)]
    assert caps == [b("a photo of a cat.", e, i, "cat") for e in range(3) for i in range(20)]
    assert len(set(caps[:20])) > 1 and caps[:20] != caps[20:40]
