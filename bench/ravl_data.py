"""RaVL's controlled setting with real handwritten digits (scikit-learn's bundled 8×8 digits), offline.

    from bench.ravl_data import write_quadrant_split
    write_quadrant_split("data/ravl", "train", 2000, spurious_class=3, strength=0.9, seed=0, pool="train")

Each image is 2×2 quadrants: a digit in one quadrant and, with probability 0.5, a red rectangle in
another, the rest black (RaVL's MNIST construction, build_eval/create_base_mnist.py, with its rectangle
filling the quadrant). A fine-tuning set correlates the rectangle with one class: with strength s the
rectangle appears in a fraction (1 + s)/2 of that class's images and (1 − s)/2 of the others' (s = 0:
independent, the evaluation setting; s = 1: rectangle ⇔ class). Counts are exact per class, not sampled.

Files written for a split NAME in OUT:
- NAME.csv          path,label,group,digit_quadrant,rect_quadrant (trainer's path,label[,group] format;
                    label = class name, group = "rect" | "no_rect", so trainer's group key is class/group)
- NAME_regions.csv  path,region,x0,y0,x1,y1,content: the four quadrants (content = class name,
                    "rectangle" or "empty"): boxes for discovery, ground truth for precision@k and for
                    region worst-group accuracy
- NAME_meta.json    parameters, per-group counts and the Cramér's V of class × rectangle
- classes.txt       the ten class names, one a line
- images/NAME_000000.png ...
The 1797 source digits are split once (seeded by `split_seed`) into disjoint "train" and "eval" pools,
so fine-tuning and evaluation sets never share a handwritten digit.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

CLASSNAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
RED = (255, 0, 0)

Pool = Literal["train", "eval", "all"]


@dataclass(frozen=True)
class QuadrantSample:
    image: np.ndarray  # (2q, 2q, 3) uint8
    label: int
    rect: bool
    digit_quadrant: int  # 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right
    rect_quadrant: int | None


def quadrant_boxes(quadrant_px: int) -> list[tuple[int, int, int, int]]:
    """Boxes x0, y0, x1, y1 of the four quadrants, row-major (same order as `ravl.grid_boxes` 2×2)."""
    q = quadrant_px
    return [(0, 0, q, q), (q, 0, 2 * q, q), (0, q, q, 2 * q), (q, q, 2 * q, 2 * q)]


def digit_pool(pool: Pool = "train", split_seed: int = 0, eval_fraction: float = 0.3):
    """(images (n, 8, 8) in 0..16, targets (n,)) of one disjoint pool of scikit-learn's digits."""

    d = load_digits()
    order = np.random.default_rng(split_seed).permutation(len(d.target))
    n_eval = round(eval_fraction * len(order))
    idx = {"eval": order[:n_eval], "train": order[n_eval:], "all": order}[pool]
    idx = np.sort(idx)
    return d.images[idx], d.target[idx]


def _digit_tile(img8: np.ndarray, q: int) -> np.ndarray:

    g = Image.fromarray((img8 * (255 / 16)).clip(0, 255).astype(np.uint8)).resize((q, q), Image.BILINEAR)
    return np.repeat(np.asarray(g)[:, :, None], 3, axis=2)


def rect_probability(label: int, spurious_class: int | None, strength: float) -> float:
    """P(rectangle | class): (1 + s)/2 for the spurious class, (1 − s)/2 for the others, 0.5 if none."""
    if spurious_class is None:
        return 0.5
    return (1 + strength) / 2 if label == spurious_class else (1 - strength) / 2


def quadrant_samples(
    n: int,
    *,
    spurious_class: int | None = None,
    strength: float = 0.0,
    seed: int = 0,
    pool: Pool = "train",
    quadrant_px: int = 16,
    rect_margin: int = 0,
    split_seed: int = 0,
) -> list[QuadrantSample]:
    """`n` quadrant images, classes balanced (n // 10 each, the remainder to the first classes).

    Args:
        spurious_class: class the rectangle co-occurs with (None: rectangle independent of class).
        strength: s in [0, 1], see `rect_probability`.
        rect_margin: pixels left black around the rectangle inside its quadrant (0 fills it, as RaVL).
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    if spurious_class is not None and not 0 <= spurious_class < 10:
        raise ValueError(f"spurious_class must be a digit 0-9, got {spurious_class}")
    images, targets = digit_pool(pool, split_seed)
    rng = np.random.default_rng(seed)
    q = quadrant_px
    boxes = quadrant_boxes(q)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    rect = np.zeros(n, dtype=bool)
    for y in range(10):  # exact counts per class: round(n_y · p)
        idx = np.flatnonzero(labels == y)
        k = round(len(idx) * rect_probability(y, spurious_class, strength))
        rect[rng.permutation(idx)[:k]] = True
    by_class = [np.flatnonzero(targets == y) for y in range(10)]
    out = []
    for i in range(n):
        y = int(labels[i])
        img = np.zeros((2 * q, 2 * q, 3), dtype=np.uint8)
        dq = int(rng.integers(4))
        x0, y0, x1, y1 = boxes[dq]
        img[y0:y1, x0:x1] = _digit_tile(images[rng.choice(by_class[y])], q)
        rq = None
        if rect[i]:
            rq = int(rng.choice([j for j in range(4) if j != dq]))
            x0, y0, x1, y1 = boxes[rq]
            m = rect_margin
            img[y0 + m : y1 - m, x0 + m : x1 - m] = RED
        out.append(QuadrantSample(img, y, bool(rect[i]), dq, rq))
    return out


def cramers_v(table: np.ndarray) -> float:
    """Cramér's V of a contingency table (rows: classes, columns: rectangle absent/present)."""
    table = np.asarray(table, dtype=float)
    table = table[table.sum(1) > 0][:, table.sum(0) > 0]
    n = table.sum()
    if min(table.shape) < 2 or n == 0:
        return 0.0
    expected = table.sum(1, keepdims=True) @ table.sum(0, keepdims=True) / n
    chi2 = ((table - expected) ** 2 / expected).sum()
    return float(np.sqrt(chi2 / (n * (min(table.shape) - 1))))


def write_quadrant_split(
    out_dir: str | Path,
    name: str,
    n: int,
    *,
    spurious_class: int | None = None,
    strength: float = 0.0,
    seed: int = 0,
    pool: Pool = "train",
    quadrant_px: int = 16,
    rect_margin: int = 0,
    split_seed: int = 0,
) -> Path:
    """Write a split (PNGs, NAME.csv, NAME_regions.csv, NAME_meta.json, classes.txt); returns NAME.csv.

    Deterministic: the same arguments write byte-identical files.
    """

    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    samples = quadrant_samples(
        n,
        spurious_class=spurious_class,
        strength=strength,
        seed=seed,
        pool=pool,
        quadrant_px=quadrant_px,
        rect_margin=rect_margin,
        split_seed=split_seed,
    )
    boxes = quadrant_boxes(quadrant_px)
    table = np.zeros((10, 2), dtype=int)
    csv_path = out_dir / f"{name}.csv"
    with csv_path.open("w", newline="") as f, (out_dir / f"{name}_regions.csv").open("w", newline="") as g:
        main, regions = csv.writer(f), csv.writer(g)
        main.writerow(["path", "label", "group", "digit_quadrant", "rect_quadrant"])
        regions.writerow(["path", "region", "x0", "y0", "x1", "y1", "content"])
        for i, s in enumerate(samples):
            rel = f"images/{name}_{i:06d}.png"
            Image.fromarray(s.image).save(out_dir / rel)
            table[s.label, int(s.rect)] += 1
            group = "rect" if s.rect else "no_rect"
            main.writerow(
                [
                    rel,
                    CLASSNAMES[s.label],
                    group,
                    s.digit_quadrant,
                    "" if s.rect_quadrant is None else s.rect_quadrant,
                ]
            )
            for j, b in enumerate(boxes):
                content = (
                    CLASSNAMES[s.label]
                    if j == s.digit_quadrant
                    else "rectangle"
                    if j == s.rect_quadrant
                    else "empty"
                )
                regions.writerow([rel, j, *b, content])
    (out_dir / "classes.txt").write_text("\n".join(CLASSNAMES) + "\n")
    meta = {
        "name": name,
        "n": n,
        "spurious_class": spurious_class,
        "spurious_classname": None if spurious_class is None else CLASSNAMES[spurious_class],
        "strength": strength,
        "cramers_v": round(cramers_v(table), 4),
        "seed": seed,
        "pool": pool,
        "split_seed": split_seed,
        "quadrant_px": quadrant_px,
        "image_px": 2 * quadrant_px,
        "rect_margin": rect_margin,
        "groups": {
            f"{CLASSNAMES[y]}/{g}": int(table[y, r])
            for y in range(10)
            for r, g in ((0, "no_rect"), (1, "rect"))
        },
    }
    (out_dir / f"{name}_meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return csv_path


def read_regions(regions_csv: str | Path) -> list[tuple[str, tuple[float, float, float, float], str]]:
    """(resolved image path, box, content) per row of a NAME_regions.csv."""
    regions_csv = Path(regions_csv)
    out = []
    with regions_csv.open(newline="") as f:
        for row in csv.DictReader(f):
            p = Path(row["path"])
            path = str(p if p.is_absolute() else (regions_csv.parent / p).resolve())
            box = tuple(float(row[k]) for k in ("x0", "y0", "x1", "y1"))
            out.append((path, box, row["content"]))  # type: ignore[arg-type]
    return out


def rectangle_regions(regions_csv: str | Path) -> set[tuple[str, tuple[float, float, float, float]]]:
    """Ground truth for `discover.precision_at_k`: the (path, box) of every rectangle quadrant."""
    return {(p, b) for p, b, c in read_regions(regions_csv) if c == "rectangle"}
