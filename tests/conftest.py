"""Shared fixtures: a tiny open_clip config, a synthetic image dataset, a tiny bank, a tiny train config.

Nothing here downloads weights; every model is a random-init tiny open_clip config.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
CLASSES_A = ["circle", "square", "triangle", "star"]
CLASSES_B = ["cat", "dog"]
GROUPS = ["water", "land"]
_COLOURS = {"water": (40, 80, 200), "land": (150, 110, 50)}


REPO_BANKS = Path(__file__).resolve().parents[1] / "banks"


def _bank_files() -> list[tuple[str, int]]:
    return sorted(
        (p.relative_to(REPO_BANKS).as_posix(), p.stat().st_size) for p in REPO_BANKS.rglob("*") if p.is_file()
    )


@pytest.fixture(scope="session", autouse=True)
def repo_banks_untouched():
    """descgen writes to ./banks by default: a test that forgets --banks-dir would add a version to the
    repository's own banks/. The session then ends in an error naming the files."""
    before = _bank_files()
    yield
    after = _bank_files()
    assert after == before, f"tests changed the repository's banks/: {sorted(set(after) ^ set(before))}"


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    """Path of a tiny open_clip model-config JSON (ViT, 32 px, embed 32, 1 layer each)."""
    path = tmp_path_factory.mktemp("models") / "tiny-clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    return path


def _write_set(root: Path, name: str, classes: list[str], n_per: int, seed: int) -> Path:
    """A CSV set of 32x32 PNGs: a class-coloured square on a group-coloured background."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    img_dir = root / name
    img_dir.mkdir()
    rows = []
    for y, _ in enumerate(classes):
        for i in range(n_per):
            g = GROUPS[i % 2]
            a = np.zeros((32, 32, 3), np.uint8) + np.array(_COLOURS[g], np.uint8)
            a = np.clip(a + rng.integers(-20, 20, a.shape), 0, 255).astype(np.uint8)
            x0, y0 = rng.integers(2, 14, 2)
            a[y0 : y0 + 14, x0 : x0 + 14] = [(60 * y + 40) % 256, (90 * y + 200) % 256, (150 * y) % 256]
            fn = f"{name}/{y}_{i}.png"
            Image.fromarray(a).save(root / fn)
            rows.append({"path": fn, "label": y, "group": g})
    csv_path = root / f"{name}.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, ["path", "label", "group"])
        w.writeheader()
        w.writerows(rows)
    return csv_path


@pytest.fixture(scope="session")
def image_data(tmp_path_factory) -> dict[str, Path]:
    """train.csv (task A, 4 classes x 8), val.csv (4 x 4), groups_b.csv (task B, 2 classes x 2 groups),
    classes_a.txt, classes_b.txt. Session-scoped: tests must not modify it."""
    root = tmp_path_factory.mktemp("images")
    out = {
        "train": _write_set(root, "train", CLASSES_A, 8, 0),
        "val": _write_set(root, "val", CLASSES_A, 4, 1),
        "groups_b": _write_set(root, "groups_b", CLASSES_B, 4, 2),
        "classes_a": root / "classes_a.txt",
        "classes_b": root / "classes_b.txt",
        "root": root,
    }
    out["classes_a"].write_text("\n".join(CLASSES_A) + "\n")
    out["classes_b"].write_text("\n".join(CLASSES_B) + "\n")
    return out


def make_bank(path_dir: Path, approved: bool = True) -> Path:
    """A bank v1 with concept 'background' and three suffix descriptors (approved or only proposed)."""
    from descgen.bank import BankDoc
    from descgen.schema import Concept, Descriptor, make_template

    doc = BankDoc.new()
    doc.add_concept(Concept(name="background", form="suffix", sources=["catalog"], status="approved"))
    status = "approved" if approved else "proposed"
    doc.add_descriptors(
        "background",
        [
            Descriptor(
                id=f"background.{p.replace(' ', '-')}",
                template=make_template(p, "suffix"),
                form="suffix",
                status=status,
            )
            for p in ("in the water", "on the land", "in the snow")
        ],
    )
    path_dir.mkdir(parents=True, exist_ok=True)
    return doc.save(path_dir)


@pytest.fixture
def tiny_bank(tmp_path) -> Path:
    """Path of a bank with three approved 'background' descriptors."""
    return make_bank(tmp_path / "banks")


@pytest.fixture
def tiny_config(tmp_path, tiny_clip, image_data, tiny_bank) -> dict[str, Any]:
    """A config dict for a seconds-long run on CPU (write it with yaml or pass to build_config)."""
    return tiny_config_for(tmp_path, tiny_clip, image_data, tiny_bank)


def tiny_config_for(
    tmp_path: Path, tiny_clip: Path, image_data: dict[str, Path], tiny_bank: Path
) -> dict[str, Any]:
    """The `tiny_config` dict for any directory (usable from fixtures of a wider scope)."""
    return {
        "name": "test-run",
        "runs_dir": str(tmp_path / "runs"),
        "method": "starft",
        "model": str(tiny_clip),
        "pretrained": None,
        "bank": str(tiny_bank),
        "data": {
            "train": {"path": str(image_data["train"]), "classes": str(image_data["classes_a"])},
            "val": {"path": str(image_data["val"]), "classes": str(image_data["classes_a"]), "name": "val"},
            "eval": [
                {
                    "path": str(image_data["groups_b"]),
                    "classes": str(image_data["classes_b"]),
                    "name": "groups_b",
                    "group_prompts": "a photo of a {c} in the {g}.",
                }
            ],
        },
        "templates": "simple",
        "batch_size": 8,
        "epochs": 2,
        "lr": 1e-3,
        "warmup_steps": 1,
        "eval_batch_size": 16,
        "log_every": 1,
        "threads": 1,
        "progress": False,
    }
