"""Published dataset layouts on tiny fake trees: class counts, groups, the labels of named files, the traps.

.venv/bin/pytest tests/trainer/test_layouts.py -q

Every tree is generated here in its published layout (a handful of files per class; empty files where only
the listing is checked, real tiny PNGs where images are read).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image
from ruamel.yaml import YAML
from typer.testing import CliRunner

from trainer.cli import app
from trainer.config import DataSpec, build_config
from trainer.data.layouts import imagenet_classes, imagenet_subset, imagenet_wnids, objectnet_classes
from trainer.data.sets import load_image_set, resolve_class_map
from trainer.errors import DataError
from trainer.inputs import load_inputs

runner = CliRunner()


def _touch(path: Path, image: Path | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if image is None:
        path.touch()
    else:
        os.link(image, path)


@pytest.fixture(scope="module")
def png(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("img") / "x.png"
    Image.new("RGB", (12, 12), (200, 30, 30)).save(p)
    return p


def make_wnid_tree(root: Path, wnids: list[str], per_class: int = 1, image: Path | None = None, ext=".JPEG"):
    for w in wnids:
        for i in range(per_class):
            _touch(root / w / f"{w}_{i}{ext}", image)
    return root


def make_v2_tree(root: Path, per_class: int = 1) -> Path:
    for y in range(1000):
        for i in range(per_class):
            _touch(root / str(y) / f"{i:04x}.jpeg")
    return root


def make_objectnet_tree(root: Path, image: Path | None = None) -> Path:
    shared = objectnet_classes()
    for name in shared:
        for f in shared[name]["folders"]:
            for i in range(2):
                _touch(root / "images" / f / f"{i}.png", image)
    for f in ("air_freshener", "dish_soap"):  # not shared with ImageNet: dropped
        _touch(root / "images" / f / "0.png", image)
    (root / "mappings").mkdir()
    return root


def make_waterbirds_tree(root: Path, image: Path | None = None) -> Path:
    rows = ["img_id,img_filename,y,split,place,place_filename"]
    k = 0
    for split in (0, 1, 2):
        for y in (0, 1):
            for place in (0, 1):
                for i in range(2):
                    k += 1
                    name = f"{(y * 100 + 1):03d}.Bird_{y}/Bird_{split}_{place}_{i}.jpg"
                    _touch(root / name, image)
                    rows.append(f"{k},{name},{y},{split},{place},/x/{place}.jpg")
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root


PACS_DOMAINS = ["art_painting", "cartoon", "photo", "sketch"]
PACS_CLASSES = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]


def make_pacs_tree(root: Path, image: Path | None = None) -> Path:
    for d in PACS_DOMAINS:
        for c in PACS_CLASSES:
            for i in range(2):
                _touch(root / "kfold" / d / c / f"pic_{i:03d}.jpg", image)
    return root


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, Path]:
    """Empty-file trees of every listed layout (module-scoped: tests must not modify them)."""
    root = tmp_path_factory.mktemp("layouts")
    wn = imagenet_wnids()
    return {
        "imagenet": make_wnid_tree(root / "imagenet" / "train", wn),
        "imagenet-sketch": make_wnid_tree(root / "sketch", wn, ext=".jpg"),
        "imagenet-v2": make_v2_tree(root / "imagenetv2-matched-frequency-format-val"),
        "imagenet-r": make_wnid_tree(root / "imagenet-r", imagenet_subset("r"), 2, ext=".jpg"),
        "imagenet-a": make_wnid_tree(root / "imagenet-a", imagenet_subset("a"), 2, ext=".jpg"),
        "objectnet": make_objectnet_tree(root / "objectnet-1.0"),
        "waterbirds": make_waterbirds_tree(root / "waterbird_complete95_forest2water2"),
        "pacs": make_pacs_tree(root / "PACS"),
    }


def load(path: Path, layout: str, **kw):
    return load_image_set(DataSpec(path=str(path), layout=layout, **kw), "simple")


def test_shipped_metadata():
    wn = imagenet_wnids()
    assert len(wn) == 1000 == len(set(wn)) and wn == sorted(wn)
    assert len(imagenet_classes()) == 1000 and imagenet_classes()[:2] == ["tench", "goldfish"]
    for which in ("r", "a"):
        sub = imagenet_subset(which)
        assert len(sub) == 200 and set(sub) < set(wn)
    shared = objectnet_classes()
    assert len(shared) == 113 and all(set(v["imagenet_wnids"]) <= set(wn) for v in shared.values())


def test_imagenet_wnid_folders(trees):
    s = load(trees["imagenet"], "imagenet")
    assert len(s.classes) == 1000 and len(s) == 1000 and s.class_ids == imagenet_wnids()
    i = [str(p) for p in s.paths].index(str(trees["imagenet"] / "n01443537" / "n01443537_0.JPEG"))
    assert s.labels[i] == 1 and s.classes[s.labels[i]] == "goldfish"


def _flat_val(tmp_path: Path) -> tuple[Path, list[str], list[str]]:
    val = tmp_path / "val"
    files = [f"ILSVRC2012_val_{i:08d}.JPEG" for i in (1, 2, 3)]
    for f in files:
        _touch(val / f)
    return val, files, ["n01751748", "n09193705", "n01440764"]  # classes 65, 970, 0


def test_imagenet_flat_val_with_each_label_file_form(tmp_path):
    val, files, wnids = _flat_val(tmp_path)
    idx = [imagenet_wnids().index(w) for w in wnids]
    assert idx == [65, 970, 0]
    # Kaggle's LOC_val_solution.csv beside the folder: found without `labels:`
    (tmp_path / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n"
        + "".join(
            f"{Path(f).stem},{w} 1 2 3 4 {w} 5 6 7 8\n" for f, w in zip(reversed(files), reversed(wnids))
        )
    )
    assert list(load(val, "imagenet").labels) == idx
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("".join(f"{f} {w}\n" for f, w in zip(files, wnids)))
    assert list(load(val, "imagenet", labels=str(pairs)).labels) == idx
    per_line = tmp_path / "synsets.txt"  # one wnid per line, in the files' sorted order
    per_line.write_text("\n".join(wnids) + "\n")
    assert list(load(val, "imagenet", labels=str(per_line)).labels) == idx
    devkit = tmp_path / "devkit" / "ILSVRC2012_validation_ground_truth.txt"
    devkit.parent.mkdir()
    devkit.write_text("3\n1\n2\n")
    with pytest.raises(DataError, match="map_clsloc.txt"):
        load(val, "imagenet", labels=str(devkit))
    (devkit.parent / "map_clsloc.txt").write_text(f"{wnids[1]} 1 x\n{wnids[2]} 2 y\n{wnids[0]} 3 z\n")
    assert list(load(val, "imagenet", labels=str(devkit)).labels) == idx
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{files[0]} n99999999\n")
    with pytest.raises(DataError, match="not an ImageNet wnid"):
        load(val, "imagenet", labels=str(bad))


def test_imagenet_v2_numeric_folders_are_read_by_number(trees, tmp_path):
    s = load(trees["imagenet-v2"], "imagenet-v2")
    assert len(s.classes) == 1000 and len(s) == 1000
    by_path = {str(p): y for p, y in zip(s.paths, s.labels)}
    root = trees["imagenet-v2"]
    # The trap: sorted as strings, folder "10" is the third folder and "100" the fourth.
    assert by_path[str(root / "10" / "0000.jpeg")] == 10
    assert by_path[str(root / "100" / "0000.jpeg")] == 100
    assert by_path[str(root / "999" / "0000.jpeg")] == 999
    assert s.class_ids[10] == imagenet_wnids()[10]
    # read as a plain ImageFolder, the labels would silently be wrong: that is what the layout prevents
    plain = load_image_set(DataSpec(path=str(root)), "simple")
    assert {str(p): y for p, y in zip(plain.paths, plain.labels)}[str(root / "10" / "0000.jpeg")] == 2


def test_imagenet_sketch(trees):
    s = load(trees["imagenet-sketch"], "imagenet-sketch")
    assert len(s.classes) == 1000 and s.classes[s.labels[0]] == "tench"


@pytest.mark.parametrize("which", ["r", "a"])
def test_imagenet_r_and_a_are_200_class_subsets(trees, which):
    s = load(trees[f"imagenet-{which}"], f"imagenet-{which}")
    sub = imagenet_subset(which)
    assert len(s.classes) == 200 and len(s) == 400
    name_of = dict(zip(imagenet_wnids(), imagenet_classes()))
    path = trees[f"imagenet-{which}"] / sub[5] / f"{sub[5]}_1.jpg"
    i = [str(p) for p in s.paths].index(str(path))
    assert s.labels[i] == 5 and s.classes[5] == name_of[sub[5]]
    base = load(trees["imagenet"], "imagenet")
    resolve_class_map(s, base, None)
    assert s.class_map == [[imagenet_wnids().index(w)] for w in sub]
    assert s.base_classes == imagenet_classes()


def test_wrong_trees_name_the_problem(trees, tmp_path):
    with pytest.raises(DataError, match=r"1 of 200 imagenet-r class folders missing"):
        sub = imagenet_subset("r")
        load(make_wnid_tree(tmp_path / "r", sub[1:]), "imagenet-r")
    (tmp_path / "r2").mkdir()
    (tmp_path / "r2" / "imagenet-r").mkdir()
    with pytest.raises(DataError, match="is not a imagenet-r class folder"):
        load(tmp_path / "r2", "imagenet-r")
    with pytest.raises(DataError, match="no such dataset"):
        load(tmp_path / "none", "imagenet-a")
    with pytest.raises(DataError, match="`split` is not used by layout imagenet-r"):
        load(trees["imagenet-r"], "imagenet-r", split="test")


def test_objectnet_keeps_the_113_shared_classes(trees):
    s = load(trees["objectnet"], "objectnet")
    shared = objectnet_classes()
    assert len(s.classes) == 113 and len(s) == 2 * sum(len(v["folders"]) for v in shared.values())
    assert not any("air_freshener" in str(p) for p in s.paths)
    k = s.classes.index("Alarm clock")
    folder = shared["Alarm clock"]["folders"][0]
    i = [str(p) for p in s.paths].index(str(trees["objectnet"] / "images" / folder / "1.png"))
    assert s.labels[i] == k and s.crop_border == 1
    base = load(trees["imagenet"], "imagenet")
    resolve_class_map(s, base, None)
    wn = imagenet_wnids()
    assert [imagenet_classes()[j] for j in s.class_map[k]] == ["analog clock", "digital clock"]
    assert (
        all(len(m) >= 1 for m in s.class_map)
        and [wn[j] for j in s.class_map[k]] == shared["Alarm clock"]["imagenet_wnids"]
    )


def test_waterbirds_split_classes_and_groups(trees):
    s = load(trees["waterbirds"], "waterbirds", split="test")
    assert s.classes == ["landbird", "waterbird"] and len(s) == 8
    assert s.group_names == ["land", "water"]
    assert sorted(set(s.group_keys())) == [
        "landbird/land",
        "landbird/water",
        "waterbird/land",
        "waterbird/water",
    ]
    i = [p.name for p in s.paths].index("Bird_2_1_0.jpg")  # y=0 (landbird) in place 1 (water)
    j = [p.name for p in s.paths if "101.Bird_1" in str(p)].index("Bird_2_0_1.jpg")
    assert s.labels[i] == 0 and s.groups[i] == "water"
    assert [g for p, g in zip(s.paths, s.groups) if "101.Bird_1" in str(p)][j] == "land"
    assert (
        len(load(trees["waterbirds"], "waterbirds")) == 24
        and len(load(trees["waterbirds"], "waterbirds", split="0")) == 8
    )
    with pytest.raises(DataError, match="split 'dev' is not train, val or test"):
        load(trees["waterbirds"], "waterbirds", split="dev")


def test_pacs_domains_are_the_groups(trees):
    s = load(trees["pacs"], "pacs")
    assert s.classes == PACS_CLASSES and s.group_names == PACS_DOMAINS and s.group_by == "group"
    assert len(s) == 4 * 7 * 2 and sorted(set(s.group_keys())) == PACS_DOMAINS
    i = [str(p) for p in s.paths].index(str(trees["pacs"] / "kfold" / "cartoon" / "horse" / "pic_001.jpg"))
    assert s.classes[s.labels[i]] == "horse" and s.groups[i] == "cartoon"


def _write(path: Path, data: dict) -> Path:
    with path.open("w") as f:
        YAML(typ="safe", pure=True).dump(data, f)
    return path


def test_dry_run_reports_each_layout(tmp_path, trees, tiny_clip):
    """`trainer run --dry-run --json`: 1000, 200, 113 classes; Waterbirds 2 classes x 4 groups; writes nothing."""
    cfg = {
        "method": "ft",
        "model": str(tiny_clip),
        "runs_dir": str(tmp_path / "runs"),
        "templates": "simple",
        "batch_size": 100,
        "epochs": 2,
        "data": {
            "train": {"path": str(trees["imagenet"]), "layout": "imagenet"},
            "val": {"path": str(trees["imagenet-v2"]), "layout": "imagenet-v2", "name": "imagenet-v2"},
            "eval": [
                {"path": str(trees["imagenet-sketch"]), "layout": "imagenet-sketch", "name": "sketch"},
                {"path": str(trees["imagenet-r"]), "layout": "imagenet-r"},
                {"path": str(trees["imagenet-a"]), "layout": "imagenet-a"},
                {"path": str(trees["objectnet"]), "layout": "objectnet", "name": "objectnet"},
                {
                    "path": str(trees["waterbirds"]),
                    "layout": "waterbirds",
                    "split": "test",
                    "name": "waterbirds",
                },
                {"path": str(trees["pacs"]), "layout": "pacs", "name": "pacs"},
            ],
        },
    }
    r = runner.invoke(app, ["run", "-c", str(_write(tmp_path / "c.yaml", cfg)), "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    sets = {d["name"]: d for d in plan["sets"]}
    counts = {n: (d["layout"], d["classes"], d["group_keys"]) for n, d in sets.items()}
    assert counts == {
        "train": ("imagenet", 1000, 0),
        "imagenet-v2": ("imagenet-v2", 1000, 0),
        "sketch": ("imagenet-sketch", 1000, 0),
        "imagenet-r": ("imagenet-r", 200, 0),
        "imagenet-a": ("imagenet-a", 200, 0),
        "objectnet": ("objectnet", 113, 0),
        "waterbirds": ("waterbirds", 2, 4),
        "pacs": ("pacs", 7, 4),
    }
    assert (
        sets["imagenet-r"]["scored_on"] == "200 of 1000" and sets["objectnet"]["scored_on"] == "113 of 1000"
    )
    assert sets["waterbirds"]["scored_on"] is None  # its own classes: zero-shot group shift
    assert plan["schedule"]["steps_per_epoch"] == 10 and plan["schedule"]["total_steps"] == 20
    assert all(len(d["samples"]) == 3 for d in plan["sets"])
    v2 = [label for path, label in sets["imagenet-v2"]["samples"] if path.endswith("/999/0000.jpeg")]
    assert v2 == [imagenet_classes()[999]]
    assert not (tmp_path / "runs").exists()
    text = runner.invoke(app, ["run", "-c", str(tmp_path / "c.yaml"), "--dry-run"])
    assert text.exit_code == 0 and "objectnet: layout objectnet, 226 images, 113 classes" in text.stdout


def test_dry_run_checks_the_bank_before_the_data(tmp_path, trees, tiny_clip):
    cfg = {
        "method": "starft",
        "model": str(tiny_clip),
        "bank": str(tmp_path / "nope.yaml"),
        "data": {"train": {"path": str(tmp_path / "missing"), "layout": "imagenet"}},
    }
    r = runner.invoke(app, ["run", "-c", str(_write(tmp_path / "c.yaml", cfg)), "--dry-run"])
    assert r.exit_code == 1 and "bank" in r.stderr and "Traceback" not in r.output
    r = runner.invoke(
        app, ["run", "-c", str(tmp_path / "c.yaml"), "--dry-run", "--set", "pretrained=nosuchtag"]
    )
    assert r.exit_code == 1 and "not an open_clip tag" in r.stderr


def test_zero_shot_evaluation_end_to_end(tmp_path, tiny_clip, png):
    """A zero-shot run over ImageNet-R in its layout, and ObjectNet scored on ImageNet's classes."""
    r_root = make_wnid_tree(tmp_path / "imagenet-r", imagenet_subset("r"), 1, png, ext=".jpg")
    val = make_wnid_tree(tmp_path / "val", imagenet_wnids(), 1, png)
    cfg = {
        "name": "zs",
        "method": "zeroshot",
        "model": str(tiny_clip),
        "runs_dir": str(tmp_path / "runs"),
        "templates": "simple",
        "eval_batch_size": 250,
        "threads": 1,
        "progress": False,
        "data": {
            "val": {"path": str(val), "layout": "imagenet", "name": "imagenet"},
            "eval": [{"path": str(r_root), "layout": "imagenet-r"}],
        },
    }
    r = runner.invoke(app, ["run", "-c", str(_write(tmp_path / "c.yaml", cfg))])
    assert r.exit_code == 0, r.output
    metrics = json.loads((tmp_path / "runs" / "zs" / "metrics.json").read_text())["final"]
    assert metrics["imagenet"]["n"] == 1000 and metrics["imagenet-r"]["n"] == 200
    # every image is the same red square: the model predicts one class for all; on the 200-class subset
    # it must be one of the subset's classes, so exactly one of the 200 images is right
    assert metrics["imagenet-r"]["top1"] == pytest.approx(100 / 200)
    inputs = load_inputs(build_config(cfg))
    assert inputs.evals[0].class_map is not None and len(inputs.evals[0].class_map) == 200
