"""Words of the synthetic world: class names, scene phrases, caption grammar and vocabulary coverage.

    from bench.vocab import make_caption, caption_vocabulary, vocab_coverage

The toy text encoder knows only the words of its pretraining captions, so the grammar here is wide on
purpose: every background has several scene words and prepositions ("on the beach", "by the sea", "on the
sand"), so that descriptors an LLM writes for the concept "background" land on words the model saw.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@dataclass(frozen=True)
class Scene:
    """How captions talk about one background type."""

    nouns: tuple[str, ...]  # bare mentions: "grass", "a photo of the grass"
    phrases: tuple[str, ...]  # locative phrases that follow an object: "on the grass"
    adjectives: tuple[str, ...] = field(default=())  # "a grassy background"


# One entry per background renderer in world.py. The first noun is the canonical word (group name).
SCENES: dict[str, Scene] = {
    "grass": Scene(
        ("grass", "lawn", "green grass", "park"),
        ("on the grass", "in the grass", "on grass", "on a lawn", "on the lawn", "in a park", "in the park"),
        ("grassy", "green"),
    ),
    "snow": Scene(
        ("snow", "snowy ground", "winter snow", "snowfield"),
        ("in the snow", "on the snow", "on snow", "in snow", "in the winter snow", "on a snowy day"),
        ("snowy", "white", "wintry"),
    ),
    "beach": Scene(
        ("beach", "sand", "shore", "seaside", "coast"),
        (
            "on the beach",
            "at the beach",
            "on the sand",
            "on a sandy beach",
            "by the sea",
            "on the shore",
            "at the seaside",
            "on the coast",
            "at the beachside",
        ),
        ("sandy", "beach"),
    ),
    "water": Scene(
        ("water", "ocean", "sea", "lake", "river", "waves"),
        (
            "on the water",
            "in the water",
            "in the ocean",
            "on the ocean",
            "in the sea",
            "on a lake",
            "in a lake",
            "in the river",
            "on the waves",
            "underwater",
            "on the riverbank",
            "by the river",
        ),
        ("watery", "blue", "ocean"),
    ),
    "desert": Scene(
        ("desert", "dunes", "sand dunes", "dry sand"),
        ("in the desert", "on the dunes", "in a desert", "on the sand dunes", "in the dry desert"),
        ("desert", "dry", "hot"),
    ),
    "forest": Scene(
        ("forest", "woods", "trees", "jungle"),
        (
            "in the forest",
            "in the woods",
            "among the trees",
            "in a forest",
            "in the jungle",
            "under the trees",
        ),
        ("wooded", "leafy", "dark green"),
    ),
    "city": Scene(
        (
            "city",
            "street",
            "town",
            "buildings",
            "downtown",
            "village",
            "streets",
            "cityscape",
            "market",
            "marketplace",
            "city square",
        ),
        (
            "in a village",
            "on the streets",
            "in the city square",
            "in a crowded marketplace",
            "in a bustling city",
            "at a street corner",
            "in the city",
            "on the street",
            "in a city",
            "in town",
            "in front of buildings",
            "downtown",
            "on a city street",
            "in an urban street",
        ),
        ("urban", "city", "crowded", "bustling", "busy", "small town"),
    ),
    "mountains": Scene(
        ("mountains", "mountain", "hills", "peaks", "hill", "cliffs", "mountain range"),
        (
            "in the mountains",
            "on a mountain",
            "in the hills",
            "on the mountains",
            "near the peaks",
            "on the hill",
            "on a cliff",
            "in a mountain range",
            "on the horizon",
        ),
        ("mountain", "rocky", "alpine", "remote"),
    ),
    "sky": Scene(
        ("sky", "clouds", "blue sky", "air"),
        (
            "in the sky",
            "in the clouds",
            "against the sky",
            "in the air",
            "in the blue sky",
            "under the clouds",
        ),
        ("cloudy", "sky blue"),
    ),
    "field": Scene(
        ("field", "farm", "wheat", "crops", "countryside"),
        ("in a field", "in the field", "on a farm", "in the wheat", "in the countryside", "in a wheat field"),
        ("golden", "rural"),
    ),
    "road": Scene(
        ("road", "highway", "asphalt", "pavement"),
        ("on the road", "on a road", "on the highway", "on the asphalt", "on the pavement", "by the road"),
        ("asphalt", "gray"),
    ),
    "brick": Scene(
        ("brick wall", "bricks", "wall", "brick"),
        (
            "against a brick wall",
            "on a brick wall",
            "in front of a wall",
            "against the wall",
            "on the bricks",
        ),
        ("brick", "red"),
    ),
    "wood": Scene(
        ("wood", "wooden table", "table", "wooden floor", "floor"),
        ("on a wooden table", "on the table", "on wood", "on the wooden floor", "on the floor", "on a table"),
        ("wooden", "brown"),
    ),
    "kitchen": Scene(
        ("kitchen", "tiles", "tiled floor", "room", "indoors"),
        (
            "in the kitchen",
            "in a kitchen",
            "on the tiles",
            "indoors",
            "in a room",
            "inside",
            "on a tiled floor",
            "at home",
            "in a house",
        ),
        ("tiled", "indoor", "checkered"),
    ),
    "rocks": Scene(
        ("rocks", "stones", "rock", "cave", "gravel"),
        ("on the rocks", "on a rock", "among the stones", "in a cave", "on the stones", "on gravel"),
        ("stony", "rocky"),
    ),
    "ice": Scene(
        ("ice", "frozen lake", "glacier", "frost"),
        ("on the ice", "on ice", "on a frozen lake", "on a glacier", "in the ice", "on the frozen ice"),
        ("icy", "frozen", "cold"),
    ),
    "night": Scene(
        ("night", "night sky", "stars", "darkness", "dark"),
        ("at night", "in the dark", "under the stars", "in the night", "at nighttime", "in the darkness"),
        ("dark", "starry", "night"),
    ),
    "lava": Scene(
        ("lava", "volcano", "magma", "fire"),
        ("on the lava", "near a volcano", "in the lava", "on a volcano", "in the fire"),
        ("fiery", "volcanic", "burning"),
    ),
    "flowers": Scene(
        ("flowers", "garden", "flower bed", "blossoms"),
        ("among the flowers", "in a garden", "in the flowers", "in the garden", "on a flower bed"),
        ("flowery", "colorful", "floral"),
    ),
}

# Style words. The fine-tuning caption and the default zero-shot prompt are "a photo of a {class}.".
PHOTO_WORDS = ("photo", "picture", "image", "snapshot", "close-up photo", "photograph")
SKETCH_WORDS = (
    "sketch",
    "drawing",
    "pencil sketch",
    "line drawing",
    "outline drawing",
    "doodle",
    "black and white sketch",
)
LOOSE_OBJECTS = (
    "a digit",
    "a number",
    "a handwritten digit",
    "a symbol",
    "something",
    "an object",
    "a character",
    "a handwritten number",
    "a shape",
    "a figure",
)


def named_objects(digit: int, name: str) -> tuple[str, ...]:
    """Ways a caption names a class: "a five", "the digit five", "a 5", ..."""
    return (
        f"a {name}",
        f"the digit {name}",
        f"the number {name}",
        f"a {digit}",
        f"the digit {digit}",
        f"number {name}",
        f"a handwritten {name}",
        f"the {name}",
        f"a {digit}",
        f"digit {digit}",
    )


# Caption templates. {obj} object phrase, {loc} locative phrase, {noun} scene noun, {adj} scene adjective,
# {kind} photo/sketch word. Grouped by what they mention, so the sampler controls the mix.
TEMPLATES_OBJ_BG = (
    "a {kind} of {obj} {loc}.",
    "{obj} {loc}.",
    "a {kind} of {obj} {loc}",
    "{obj} with {noun} in the background.",
    "a {kind} of {obj} against a {adj} background.",
    "there is {obj} {loc}.",
    "{obj} seen {loc}.",
    "a {kind} showing {obj} {loc}.",
    "{obj} {loc}, a {kind} with {noun} in the background.",
)
TEMPLATES_OBJ = (
    "a {kind} of {obj}.",
    "{obj}.",
    "a {kind} of {obj}",
    "this is {obj}.",
    "a {kind} showing {obj}.",
)
TEMPLATES_BG = (
    "{noun}.",
    "a {kind} of the {noun}.",
    "a {kind} of something {loc}.",
    "a {kind} taken {loc}.",
    "a {adj} scene.",
    "{noun}",
    "a {kind} of a {adj} place.",
    "a {kind} of a {adj} location.",
)


def scene_for(background: str) -> Scene:
    """The caption words of one background type."""
    return SCENES[background]


def make_caption(
    rng: np.random.Generator,
    *,
    digit: int | None,
    name: str | None,
    named: bool,
    background: str,
    style: str,
    mention_probs: tuple[float, float, float] = (0.55, 0.3, 0.15),
    content: dict | None = None,
) -> str:
    """Sample one pretraining caption for an image.

    Args:
        digit: the glyph's digit, or None for an image without object.
        name: the class name to use when `named`.
        named: name the class ("a five") or describe it loosely ("a digit").
        background: background type (a key of SCENES).
        style: "normal" or "sketch".
        mention_probs: probabilities of mentioning (object + background, object only, background only).
        content: if given, filled with what the caption states: "object" (True when it mentions one),
            "digit" (the named digit, or None when loose or absent), "scene" (background or None).
    """
    scene = SCENES[background]
    kinds = SKETCH_WORDS if style == "sketch" and rng.random() < 0.85 else PHOTO_WORDS
    kind = str(rng.choice(kinds))
    if digit is None:
        what = 2
    else:
        what = int(rng.choice(3, p=np.asarray(mention_probs) / sum(mention_probs)))
    if digit is not None and named:
        obj = str(rng.choice(named_objects(digit, name or NUMBER_WORDS[digit])))
    else:
        obj = str(rng.choice(LOOSE_OBJECTS))
    template = str(rng.choice((TEMPLATES_OBJ_BG, TEMPLATES_OBJ, TEMPLATES_BG)[what]))
    if content is not None:
        # "a {kind} of something {loc}." names no object: it is a scene-only caption like the others of its group
        content.update(
            object=what < 2,
            digit=digit if what < 2 and digit is not None and named else None,
            scene=background if what != 1 else None,
        )
    return template.format(
        obj=obj,
        kind=kind,
        loc=str(rng.choice(scene.phrases)),
        noun=str(rng.choice(scene.nouns)),
        adj=str(rng.choice(scene.adjectives or scene.nouns)),
    )


_WORD_RE = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """Lowercase word tokens of a phrase; a descriptor's {caption} placeholder is dropped."""
    return _WORD_RE.findall(text.replace("{caption}", " ").lower())


def caption_vocabulary(
    backgrounds: Iterable[str],
    named: Iterable[tuple[int, str]],
) -> set[str]:
    """Every word the caption grammar can produce for these backgrounds and named classes.

    Args:
        backgrounds: background types that appear in pretraining.
        named: (digit, name) pairs whose names appear in pretraining captions with non-zero probability.
    """
    parts: list[str] = [
        *PHOTO_WORDS,
        *SKETCH_WORDS,
        *LOOSE_OBJECTS,
        *TEMPLATES_OBJ_BG,
        *TEMPLATES_OBJ,
        *TEMPLATES_BG,
    ]
    for bg in backgrounds:
        s = SCENES[bg]
        parts += [*s.nouns, *s.phrases, *s.adjectives]
    for digit, name in named:
        parts += named_objects(digit, name)
    vocab: set[str] = set()
    for p in parts:
        vocab.update(words(re.sub(r"\{[a-z]+\}", " ", p)))
    return vocab


@dataclass(frozen=True)
class Coverage:
    """Share of phrases whose words all appear in a vocabulary, with the words that were missing."""

    share: float
    covered: int
    total: int
    missing: dict[str, list[str]]  # phrase -> its unknown words


def vocab_coverage(phrases: Iterable[str], vocab: set[str]) -> Coverage:
    """Share of `phrases` whose every word is in `vocab` (descriptor templates may keep `{caption}`)."""
    phrases = list(phrases)
    missing: dict[str, list[str]] = {}
    for p in phrases:
        unknown = [w for w in words(p) if w not in vocab]
        if unknown:
            missing[p] = unknown
    covered = len(phrases) - len(missing)
    return Coverage(
        share=covered / len(phrases) if phrases else 0.0, covered=covered, total=len(phrases), missing=missing
    )
