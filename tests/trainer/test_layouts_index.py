"""A run's index: each set listed once (by the main process), memory-mapped by readers, reused on resume.

.venv/bin/pytest tests/trainer/test_layouts_index.py -q
"""

from __future__ import annotations

import numpy as np
import pytest

import trainer.inputs
from tests.trainer.test_layouts import make_wnid_tree
from trainer.config import build_config
from trainer.data.columns import GroupColumn, IntColumn, PathColumn
from trainer.data.index import load_listing, spec_key
from trainer.data.layouts import imagenet_subset
from trainer.errors import DataError
from trainer.inputs import load_sets


def test_columns_behave_as_sequences():
    p = PathColumn.from_strings("/data", ["a/x.jpg", "b/ÿ.png", "/abs/z.png"])
    assert [str(x) for x in p] == ["/data/a/x.jpg", "/data/b/ÿ.png", "/abs/z.png"] and str(
        p[-1]
    ) == "/abs/z.png"
    assert IntColumn([3, 1]) == [3, 1] and IntColumn([3, 1])[1] == 1 and isinstance(IntColumn([3])[0], int)
    g = GroupColumn.from_values(["water", None, "land"])
    assert list(g) == ["water", None, "land"] and g.names == ["land", "water"]


def test_sets_are_listed_once_and_reused(tmp_path, image_data, monkeypatch):
    r_root = make_wnid_tree(tmp_path / "imagenet-r", imagenet_subset("r"), 2, ext=".jpg")
    cfg = build_config(
        {
            "method": "flyp",
            "data": {
                "train": {"path": str(image_data["train"]), "classes": str(image_data["classes_a"])},
                "eval": [
                    {"path": str(r_root), "layout": "imagenet-r"},
                    {"path": str(image_data["val"]), "name": "val"},  # CSV: the training classes by default
                ],
            },
        }
    )
    index = tmp_path / "run" / "index"
    first = load_sets(cfg, index)
    assert sorted(p.name for p in index.iterdir()) == sorted(
        spec_key(s) for s in [cfg.data.train, *cfg.data.eval]
    )
    assert isinstance(first[1].paths.blob, np.memmap)  # readers map the index, they do not copy it

    def no_scan(*args, **kwargs):
        raise AssertionError("scanned again")

    monkeypatch.setattr(trainer.inputs, "scan_set", no_scan)
    again = load_sets(cfg, index)  # a resumed run: the index is read, nothing is scanned
    for a, b in zip(first, again):
        assert list(a.paths) == list(b.paths) and a.labels == b.labels and a.classes == b.classes
    assert again[2].classes == first[0].classes and len(again[1]) == 400
    listing = load_listing(index / spec_key(cfg.data.eval[0]))
    assert listing is not None and listing.map_ids is not None and len(listing.classes) == 200


def test_a_failed_listing_leaves_no_run_dir(tmp_path, image_data):
    cfg = build_config(
        {
            "method": "flyp",
            "data": {
                "train": {"path": str(image_data["train"]), "classes": str(image_data["classes_a"])},
                "eval": [{"path": str(tmp_path / "missing"), "layout": "imagenet-a"}],
            },
        }
    )
    with pytest.raises(DataError, match="no such dataset"):
        load_sets(cfg, tmp_path / "run" / "index")
    assert not (tmp_path / "run").exists()


def test_a_set_that_fails_its_checks_writes_no_index(tmp_path, image_data):
    """Every set is listed and checked before the first index entry is written."""
    cfg = build_config(
        {
            "method": "flyp",
            "data": {
                "train": {"path": str(image_data["train"]), "classes": str(image_data["classes_a"])},
                "eval": [{"path": str(image_data["val"]), "name": "val", "class_subset": ["circle"]}],
            },
        }
    )
    with pytest.raises(DataError, match="class_subset has 1 entries for 4 classes"):
        load_sets(cfg, tmp_path / "run" / "index")
    assert not (tmp_path / "run").exists()
