"""The synthetic world: handwritten-digit glyphs on procedural scene backgrounds, and its dataset splits.

    from bench.world import WorldConfig, write_split; write_split(WorldConfig(), "a_train", ".cache/bench")

Objects are scikit-learn's bundled 8x8 handwritten digits (many writers), upscaled, thresholded and jittered
in scale, aspect, rotation, stroke width and position. Task A and task B are disjoint digit sets. Each
task-A class has "typical" backgrounds in fine-tuning data (probability `bias_p`); each task-B class has one
in pretraining (`pretrain_bias_b`), as birds and water go together in natural images. Styles: "normal"
(filled glyph) and "sketch" (glyph outline on a faded grey background, like pencil on paper).

Split names (see `SPLITS`): pretrain, a_train, and for each of a, a_sketch, a_unseen, b_groups, b_plain,
b_sketch a `_val` and a `_test` version drawn with their own seeds (tune on val only).
A written split is a folder with `data.csv`, `classnames.txt` (label i is line i) and `images/*.png`.
data.csv columns: path,label,group,style,typical[,caption]: `group` is the background word, `typical` is 1
when it is one of the class's typical backgrounds. Labels index the split's own class list.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sklearn.datasets import load_digits

from bench.backgrounds import RENDERERS, render_background
from bench.vocab import NUMBER_WORDS, SCENES, make_caption

WORLD_VERSION = 3  # bump when rendering or sampling changes, so caches are not reused

SEEN_BACKGROUNDS = (
    "grass",
    "snow",
    "beach",
    "water",
    "desert",
    "forest",
    "city",
    "mountains",
    "sky",
    "field",
    "road",
    "brick",
    "wood",
    "kitchen",
    "rocks",
    "ice",
    "night",
)
OOD_BACKGROUNDS = ("lava", "flowers")


class WorldConfig(BaseModel):
    """Every knob of the synthetic world. Frozen; its hash names the cache folders."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = 0
    image_size: int = Field(
        32, description="pixels per side (the ModifiedResNet image tower needs a multiple of 32)"
    )
    class_names: tuple[str, ...] = Field(tuple(NUMBER_WORDS), description="name of digit i; classnames.txt")
    task_a: tuple[int, ...] = (0, 1, 2, 3, 4)  # digits fine-tuned on
    task_b: tuple[int, ...] = (5, 6, 7, 8, 9)  # digits only seen in pretraining; group shift + transfer
    backgrounds: tuple[str, ...] = SEEN_BACKGROUNDS  # may appear in fine-tuning data
    ood_backgrounds: tuple[str, ...] = OOD_BACKGROUNDS  # never in fine-tuning data (task-A unseen split)
    ood_in_pretraining: bool = True  # the zero-shot model has seen them, as CLIP has seen most scenes
    typical_a: dict[int, tuple[str, ...]] = Field(
        default_factory=lambda: {0: ("grass",), 1: ("snow",), 2: ("beach",), 3: ("water",), 4: ("city",)},
        description="task-A class -> its typical backgrounds in fine-tuning and ID data",
    )
    typical_b: dict[int, tuple[str, ...]] = Field(
        default_factory=lambda: {5: ("snow",), 6: ("beach",), 7: ("water",), 8: ("city",), 9: ("grass",)},
        description="task-B class -> its typical backgrounds in pretraining",
    )
    group_backgrounds: tuple[str, ...] = Field(
        ("grass", "snow", "beach", "water", "city"), description="backgrounds of the task-B group-shift set"
    )
    bias_p: float = Field(
        0.95, ge=0, le=1, description="P(typical background) in task-A fine-tune and ID data"
    )
    pretrain_bias_b: float = Field(
        0.4, ge=0, le=1, description="P(typical background) of task B in pretraining"
    )
    pretrain_bias_a: float | None = Field(None, description="same for task A in pretraining; None = uniform")
    a_name_prob: float = Field(
        0.03, ge=0, le=1, description="share of task-A pretraining captions naming the class"
    )
    b_name_prob: float = Field(
        0.9, ge=0, le=1, description="share of task-B pretraining captions naming the class"
    )
    mention_probs: tuple[float, float, float] = (
        0.5,
        0.35,
        0.15,
    )  # caption mentions (object+scene, object, scene)
    pretrain_sketch_frac: float = 0.2  # share of sketch-style pretraining images
    pretrain_empty_frac: float = 0.05  # share of pretraining images without a glyph (scene-only captions)
    sketch_fade: float = Field(
        0.6, ge=0, le=1, description="sketch background: grey scene faded towards white"
    )
    glyph_scale: tuple[float, float] = (0.6, 0.9)  # glyph height as a fraction of the image side
    max_rotation: float = 15.0  # degrees
    eval_glyph_frac: float = 0.3  # share of each digit's handwritten samples reserved for val/test splits
    n_pretrain: int = 24000
    n_a_train: int = 5000
    n_eval: int = 1000  # per val/test split, except b_groups
    group_size: int = 200  # images per (class, background) group of b_groups

    @model_validator(mode="after")
    def _check(self) -> WorldConfig:
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        if len(self.class_names) != 10:
            raise ValueError("class_names needs one name per digit 0-9")
        if not self.task_a or not self.task_b or set(self.task_a) & set(self.task_b):
            raise ValueError(f"task_a {self.task_a} and task_b {self.task_b} must be non-empty and disjoint")
        if not set(self.task_a) | set(self.task_b) <= set(range(10)):
            raise ValueError("task classes are digits 0-9")
        for bg in (*self.backgrounds, *self.ood_backgrounds, *self.group_backgrounds):
            if bg not in RENDERERS:
                raise ValueError(f"unknown background {bg!r}; known: {', '.join(RENDERERS)}")
        if set(self.backgrounds) & set(self.ood_backgrounds):
            raise ValueError("ood_backgrounds must not be among backgrounds")
        if set(self.typical_a) != set(self.task_a) or set(self.typical_b) != set(self.task_b):
            raise ValueError("typical_a / typical_b need one entry per task-A / task-B class")
        for bgs in (*self.typical_a.values(), *self.typical_b.values()):
            if not bgs or not set(bgs) <= set(self.backgrounds):
                raise ValueError(f"typical backgrounds {bgs} must be non-empty and among backgrounds")
        return self

    def hash(self) -> str:
        """Short stable hash of the config and the world version."""
        blob = json.dumps({"v": WORLD_VERSION, **self.model_dump(mode="json")}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def pretrain_backgrounds(self) -> tuple[str, ...]:
        return self.backgrounds + (self.ood_backgrounds if self.ood_in_pretraining else ())


Style = Literal["normal", "sketch"]


@dataclass(frozen=True)
class SplitSpec:
    """How one split is sampled."""

    task: Literal["a", "b", "all"]
    backgrounds: Literal["biased_a", "seen", "ood", "groups", "pretrain"]
    style: Literal["normal", "sketch", "mixed"]
    size: Literal["pretrain", "a_train", "eval", "groups"]
    glyphs: Literal["train", "eval"]


_EVAL_SPECS = {
    "a": SplitSpec("a", "biased_a", "normal", "eval", "eval"),
    "a_sketch": SplitSpec("a", "biased_a", "sketch", "eval", "eval"),
    "a_unseen": SplitSpec("a", "ood", "normal", "eval", "eval"),
    "b_groups": SplitSpec("b", "groups", "normal", "groups", "eval"),
    "b_plain": SplitSpec("b", "seen", "normal", "eval", "eval"),
    "b_sketch": SplitSpec("b", "seen", "sketch", "eval", "eval"),
}
SPLITS: dict[str, SplitSpec] = {
    "pretrain": SplitSpec("all", "pretrain", "mixed", "pretrain", "train"),
    "a_train": SplitSpec("a", "biased_a", "normal", "a_train", "train"),
    **{f"{k}_{v}": spec for k, spec in _EVAL_SPECS.items() for v in ("val", "test")},
}


@dataclass
class SplitData:
    """A rendered split held in memory. `labels` index `classes`; `digits` is -1 for scene-only images."""

    name: str
    images: np.ndarray  # (N, H, W, 3) uint8
    digits: np.ndarray  # (N,) int
    labels: np.ndarray  # (N,) int, index into classes (-1 for scene-only images)
    backgrounds: list[str]
    styles: list[str]
    named: np.ndarray  # (N,) bool: pretraining captions of this image name its class
    classes: tuple[int, ...]  # digits of this split's label space
    class_names: tuple[str, ...]
    captions: list[str] | None = None  # pretraining split only: one sampled caption per image


# --- glyphs ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(int)


@lru_cache(maxsize=8)
def _glyph_pools(seed: int, eval_frac: float) -> dict[str, dict[int, np.ndarray]]:
    """Disjoint handwritten samples per digit for training-side and evaluation-side splits."""
    _, target = _digits()
    rng = np.random.default_rng([seed, 7919])
    pools: dict[str, dict[int, np.ndarray]] = {"train": {}, "eval": {}}
    for d in range(10):
        idx = rng.permutation(np.flatnonzero(target == d))
        k = max(1, round(len(idx) * eval_frac))
        pools["eval"][d], pools["train"][d] = idx[:k], idx[k:]
    return pools


def _glyph_mask(cfg: WorldConfig, glyph: int, rng: np.random.Generator) -> np.ndarray:
    """A boolean glyph mask, at most image_size per side, with scale/aspect/rotation/stroke jitter."""
    s = cfg.image_size
    h = max(6, round(s * rng.uniform(*cfg.glyph_scale)))
    w = max(5, round(h * rng.uniform(0.7, 1.0)))
    im = Image.fromarray((_digits()[0][glyph] * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    im = im.rotate(rng.uniform(-cfg.max_rotation, cfg.max_rotation), resample=Image.BILINEAR, expand=True)
    mask = np.asarray(im, dtype=np.float32) / 255 > rng.uniform(0.3, 0.55)
    return mask[:s, :s]


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of the mask with a 4-neighbour outside it."""
    p = np.pad(mask, 1)
    inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~inner


def render_image(cfg: WorldConfig, glyph: int | None, background: str, style: str, seed: int) -> np.ndarray:
    """One (H, W, 3) uint8 image: background `background`, digit sample `glyph` (None: scene only)."""
    rng = np.random.default_rng(seed)
    s = cfg.image_size
    img = render_background(background, rng, s)
    if style == "sketch":
        grey = img @ np.array([0.299, 0.587, 0.114])
        img = np.repeat((cfg.sketch_fade + (1 - cfg.sketch_fade) * grey)[..., None], 3, axis=2)
    if glyph is not None:
        mask = _glyph_mask(cfg, glyph, rng)
        mh, mw = mask.shape
        y0, x0 = int(rng.integers(0, s - mh + 1)), int(rng.integers(0, s - mw + 1))
        full = np.zeros((s, s), dtype=bool)
        full[y0 : y0 + mh, x0 : x0 + mw] = mask
        if style == "sketch":
            full = _outline(full)
            ink = np.full(3, rng.uniform(0.05, 0.3))
        else:
            lum = float((img[full] @ np.array([0.299, 0.587, 0.114])).mean()) if full.any() else 0.5
            ink = rng.uniform(0.0, 0.15, 3) if lum > 0.45 else rng.uniform(0.85, 1.0, 3)
        img[full] = ink
    img = img + rng.normal(0, 0.015, img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


# --- sampling -------------------------------------------------------------------------------------------


def split_seed(cfg: WorldConfig, name: str) -> int:
    """The split's own seed: the world seed and a stable hash of the split name."""
    return int(np.random.default_rng([cfg.seed, zlib.crc32(name.encode())]).integers(2**62))


def _balanced(rng: np.random.Generator, values: tuple | list, n: int) -> np.ndarray:
    """n draws from values with counts as equal as possible, in random order."""
    reps = np.resize(np.arange(len(values)), n)
    return np.asarray(values)[rng.permutation(reps)]


def _pick_background(
    rng: np.random.Generator, typical: tuple[str, ...], pool: tuple[str, ...], p: float
) -> str:
    if rng.random() < p:
        return str(rng.choice(typical))
    others = [b for b in pool if b not in typical]
    return str(rng.choice(others))


def _split_size(cfg: WorldConfig, spec: SplitSpec) -> int:
    return {"pretrain": cfg.n_pretrain, "a_train": cfg.n_a_train, "eval": cfg.n_eval}.get(spec.size, 0)


def sample_split(cfg: WorldConfig, name: str) -> list[dict]:
    """The per-image records of a split (no pixels): digit, glyph, background, style, named, seed."""
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; known: {', '.join(SPLITS)}")
    spec = SPLITS[name]
    rng = np.random.default_rng(split_seed(cfg, name))
    pools = _glyph_pools(cfg.seed, cfg.eval_glyph_frac)[spec.glyphs]
    classes = {"a": cfg.task_a, "b": cfg.task_b, "all": tuple(range(10))}[spec.task]

    if spec.backgrounds == "groups":
        pairs = [(d, g) for d in classes for g in cfg.group_backgrounds for _ in range(cfg.group_size)]
        order = rng.permutation(len(pairs))
        plan = [(pairs[i][0], pairs[i][1]) for i in order]
    else:
        n = _split_size(cfg, spec)
        digits = _balanced(rng, classes, n)
        plan = []
        for d in digits:
            d = int(d)
            if spec.backgrounds == "biased_a":
                bg = _pick_background(rng, cfg.typical_a[d], cfg.backgrounds, cfg.bias_p)
            elif spec.backgrounds == "seen":
                bg = str(rng.choice(cfg.backgrounds))
            elif spec.backgrounds == "ood":
                bg = str(rng.choice(cfg.ood_backgrounds))
            else:  # pretrain
                pool = cfg.pretrain_backgrounds
                if d in cfg.typical_b:
                    bg = _pick_background(rng, cfg.typical_b[d], pool, cfg.pretrain_bias_b)
                elif cfg.pretrain_bias_a is not None:
                    bg = _pick_background(rng, cfg.typical_a[d], pool, cfg.pretrain_bias_a)
                else:
                    bg = str(rng.choice(pool))
            plan.append((d, bg))

    records = []
    for d, bg in plan:
        empty = spec.backgrounds == "pretrain" and rng.random() < cfg.pretrain_empty_frac
        if spec.style == "mixed":
            style = "sketch" if rng.random() < cfg.pretrain_sketch_frac else "normal"
        else:
            style = spec.style
        name_prob = cfg.b_name_prob if d in cfg.task_b else cfg.a_name_prob
        records.append(
            {
                "digit": -1 if empty else d,
                "glyph": None if empty else int(rng.choice(pools[d])),
                "background": bg,
                "style": style,
                "named": bool(rng.random() < name_prob),
                "seed": int(rng.integers(2**62)),
            }
        )
    return records


def build_split(cfg: WorldConfig, name: str) -> SplitData:
    """Render a split in memory (deterministic per world seed and split name)."""
    records = sample_split(cfg, name)
    spec = SPLITS[name]
    classes = {"a": cfg.task_a, "b": cfg.task_b, "all": tuple(range(10))}[spec.task]
    images = np.stack(
        [render_image(cfg, r["glyph"], r["background"], r["style"], r["seed"]) for r in records]
    )
    digits = np.array([r["digit"] for r in records], dtype=int)
    index = {d: i for i, d in enumerate(classes)}
    captions = None
    if name == "pretrain":
        rng = np.random.default_rng([split_seed(cfg, name), 1])
        captions = [pretrain_caption(cfg, rng, r) for r in records]
    return SplitData(
        name=name,
        images=images,
        digits=digits,
        labels=np.array([index.get(int(d), -1) for d in digits], dtype=int),
        backgrounds=[r["background"] for r in records],
        styles=[r["style"] for r in records],
        named=np.array([r["named"] for r in records], dtype=bool),
        classes=tuple(classes),
        class_names=tuple(cfg.class_names[d] for d in classes),
        captions=captions,
    )


def pretrain_caption(
    cfg: WorldConfig, rng: np.random.Generator, record: dict, content: dict | None = None
) -> str:
    """Sample a caption for a pretraining image record (called anew each epoch by the pretrainer).

    `content`, if given, is filled with what the caption states (see `vocab.make_caption`).
    """
    d = record["digit"]
    return make_caption(
        rng,
        digit=None if d < 0 else d,
        name=None if d < 0 else cfg.class_names[d],
        named=record["named"],
        background=record["background"],
        style=record["style"],
        mention_probs=cfg.mention_probs,
        content=content,
    )


def typical_for(cfg: WorldConfig, digit: int) -> tuple[str, ...]:
    """The typical backgrounds of a class (fine-tuning for task A, pretraining for task B)."""
    return cfg.typical_a.get(digit) or cfg.typical_b.get(digit) or ()


# --- writing --------------------------------------------------------------------------------------------


def split_dir(cfg: WorldConfig, name: str, root: str | Path = ".cache/bench") -> Path:
    """Where `write_split` puts a split: <root>/world-<hash>/<name>."""
    return Path(root) / f"world-{cfg.hash()}" / name


def write_split(cfg: WorldConfig, name: str, root: str | Path = ".cache/bench", force: bool = False) -> Path:
    """Write a split as PNGs + data.csv + classnames.txt, or reuse a complete earlier write.

    Returns the split folder. The folder is complete once `info.json` exists (written last).
    """
    out = split_dir(cfg, name, root)
    if (out / "info.json").exists() and not force:
        return out
    if out.exists():  # incomplete (only complete folders are renamed into place) or forced
        shutil.rmtree(out, ignore_errors=True)
    # One temp folder per process: two benches (e.g. one per pretraining seed) may write the same split.
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "images").mkdir(parents=True)
    data = build_split(cfg, name)
    with open(tmp / "data.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "group", "style", "typical"] + (["caption"] if data.captions else []))
        for i in range(len(data.labels)):
            rel = f"images/{i:06d}.png"
            Image.fromarray(data.images[i]).save(tmp / rel)
            typical = int(data.backgrounds[i] in typical_for(cfg, int(data.digits[i])))
            row = [rel, int(data.labels[i]), data.backgrounds[i], data.styles[i], typical]
            w.writerow(row + ([data.captions[i]] if data.captions else []))
    (tmp / "classnames.txt").write_text("".join(f"{n}\n" for n in data.class_names))
    counts: dict[str, int] = {}
    for lab, bg in zip(data.labels, data.backgrounds):
        key = f"{lab}/{bg}"
        counts[key] = counts.get(key, 0) + 1
    info = {
        "split": name,
        "n": len(data.labels),
        "world_hash": cfg.hash(),
        "world": cfg.model_dump(mode="json"),
        "classes": list(data.classes),
        "groups": counts,
    }
    (tmp / "info.json").write_text(json.dumps(info, indent=1))
    try:
        tmp.rename(out)
    except OSError:  # another process put the same split (same seed, same bytes) in place first
        if not (out / "info.json").exists():
            raise
        shutil.rmtree(tmp)
    return out


def write_splits(
    cfg: WorldConfig, names: list[str] | None = None, root: str | Path = ".cache/bench"
) -> dict[str, Path]:
    """Write several splits (default: all but pretrain); returns name -> folder."""
    names = names or [n for n in SPLITS if n != "pretrain"]
    return {n: write_split(cfg, n, root) for n in names}


def contact_sheet(cfg: WorldConfig, path: str | Path, per_row: int = 8) -> Path:
    """A PNG grid of every background in both styles, for eyeballing the world."""
    bgs = (*cfg.backgrounds, *cfg.ood_backgrounds)
    s = cfg.image_size
    sheet = np.full(((s + 2) * len(bgs), (s + 2) * per_row, 3), 255, np.uint8)
    pool = _glyph_pools(cfg.seed, cfg.eval_glyph_frac)["train"]
    for i, bg in enumerate(bgs):
        for j in range(per_row):
            style = "sketch" if j >= per_row - 2 else "normal"
            g = int(pool[j % 10][0])
            sheet[i * (s + 2) : i * (s + 2) + s, j * (s + 2) : j * (s + 2) + s] = render_image(
                cfg, g, bg, style, seed=1000 * i + j
            )
    Image.fromarray(sheet).resize((sheet.shape[1] * 3, sheet.shape[0] * 3), Image.NEAREST).save(path)
    return Path(path)


__all__ = [
    "SCENES",
    "SPLITS",
    "SplitData",
    "WorldConfig",
    "build_split",
    "contact_sheet",
    "pretrain_caption",
    "render_image",
    "sample_split",
    "split_dir",
    "typical_for",
    "write_split",
    "write_splits",
]
