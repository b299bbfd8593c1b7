"""Spurious captions S_i: a bank descriptor injected into the caption, the clean caption, or random words.

from trainer.data.captions import SpuriousCaptions; s = SpuriousCaptions("bank", 0, descriptors)(c, 0, 7)
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from trainer.data.sets import fill_template
from trainer.errors import DataError

# Neutral everyday words for the `spurious: random` ablation (1-3 of them as a caption suffix).
_WORDS = """
table window paper river music number garden morning letter orange pencil yellow circle bottle sudden
quiet gentle simple happy little heavy bright narrow square ticket answer silver button mirror basket
candle doctor engine finger island jacket kitchen ladder market needle pocket rabbit saddle tunnel
velvet wagon anchor blanket cotton dinner feather hammer iron jelly kettle lemon marble noodle ocean
pepper rocket shadow thunder violin walnut zipper copper desk flame
"""
RANDOM_WORDS = tuple(_WORDS.split())


class TemplateCaptions:
    """A sample's training caption drawn uniformly from templates (CaRot trains on all 80 OpenAI templates),
    by (seed, epoch, sample index): the same with any number of processes and after a resume."""

    def __init__(self, templates: Sequence[Any], seed: int):
        self.templates, self.seed = list(templates), seed  # callables: classname -> caption

    def __call__(self, classname: str, epoch: int, index: int) -> str:
        rng = random.Random(f"caption-{self.seed}-{epoch}-{index}")
        return self.templates[rng.randrange(len(self.templates))](classname)


def training_caption(caption: str | TemplateCaptions, classname: str, epoch: int, index: int) -> str:
    """Sample `index`'s training caption at `epoch`: the one template filled, or a drawn one."""
    if isinstance(caption, TemplateCaptions):
        return caption(classname, epoch, index)
    return fill_template(caption, classname)


class SpuriousCaptions:
    """Draws S_i for a caption: a bank descriptor (uniform), the clean caption, or random words.

    `descriptors` are (Descriptor, caption style) pairs, as `Bank.approved_styled` gives them, or bare
    Descriptors (reference style). A descriptor goes into the caption through descgen's own injection
    (`Descriptor.caption`), so `descgen preview` shows exactly what the trainer trains on. The draw depends
    only on (seed, epoch, sample index), so it is the same with any number of processes and after a resume.
    """

    def __init__(self, mode: str, seed: int, descriptors: Sequence[Any] = (), words: Sequence[str] = ()):
        if mode == "bank" and not descriptors:
            raise DataError("no approved descriptors to draw spurious captions from")
        self.mode, self.seed = mode, seed
        self.descriptors = [d if isinstance(d, tuple) else (d, "reference") for d in descriptors]
        self.words = list(words) or list(RANDOM_WORDS)

    def __call__(self, caption: str, epoch: int, index: int, classname: str | None = None) -> str:
        if self.mode == "none":
            return caption
        rng = random.Random(f"{self.seed}-{epoch}-{index}")
        if self.mode == "bank":
            descriptor, style = self.descriptors[rng.randrange(len(self.descriptors))]
            return descriptor.caption(caption, classname, style)
        k = rng.randint(1, 3)
        return (
            caption.strip().rstrip(".").rstrip()
            + " "
            + " ".join(rng.choice(self.words) for _ in range(k))
            + "."
        )
