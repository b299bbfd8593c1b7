"""`trainer run --dry-run`: the shipped recipes validate against fake trees in their published layouts.

.venv/bin/pytest tests/trainer/test_plan.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.trainer.test_layouts import (
    PACS_CLASSES,
    make_objectnet_tree,
    make_pacs_tree,
    make_v2_tree,
    make_waterbirds_tree,
    make_wnid_tree,
)
from trainer.cli import app
from trainer.data.layouts import imagenet_subset, imagenet_wnids

runner = CliRunner()
CONFIGS = Path(__file__).parents[2] / "configs"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """Every tree the recipes name, under data/ of one folder (the recipes' paths are relative)."""
    root = tmp_path_factory.mktemp("recipes")
    d, wn = root / "data", imagenet_wnids()
    make_wnid_tree(d / "imagenet" / "train", wn)
    make_wnid_tree(d / "imagenet" / "val", wn)
    make_wnid_tree(d / "imagenet-sketch" / "sketch", wn, ext=".jpg")
    make_v2_tree(d / "imagenetv2-matched-frequency-format-val")
    make_wnid_tree(d / "imagenet-r", imagenet_subset("r"), ext=".jpg")
    make_wnid_tree(d / "imagenet-a", imagenet_subset("a"), ext=".jpg")
    make_objectnet_tree(d / "objectnet-1.0")
    make_waterbirds_tree(d / "waterbird_complete95_forest2water2")
    make_pacs_tree(d / "PACS")
    for split, n in (("train", 300), ("test", 2)):
        for c in ("accordion", "airplanes", "yin_yang"):
            for i in range(n):
                p = d / "caltech101" / split / c / f"image_{i:04d}.jpg"
                p.parent.mkdir(parents=True, exist_ok=True)
                p.touch()
    ckpt = root / "runs" / "imagenet-vitb16-starft" / "checkpoints" / "last.safetensors"
    ckpt.parent.mkdir(parents=True)
    ckpt.touch()
    return root


def dry_run(recipe: str, bank: Path, *extra: str) -> dict:
    r = runner.invoke(
        app, ["run", "-c", str(CONFIGS / recipe), "--bank", str(bank), "--dry-run", "--json", *extra]
    )
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def _sets(plan: dict) -> dict[str, tuple]:
    return {d["name"]: (d["role"], d["layout"], d["classes"], d["group_keys"]) for d in plan["sets"]}


def test_paper_imagenet_recipe(data_root, tiny_bank, monkeypatch):
    monkeypatch.chdir(data_root)
    for method in ("starft", "flyp", "ft", "kl"):
        plan = dry_run("imagenet-vitb16-starft.yaml", tiny_bank, "--method", method)
        assert plan["model"] == "ViT-B-16" and plan["method"] == method
        assert _sets(plan) == {
            "train": ("train", "imagenet", 1000, 0),
            "imagenet": ("val", "imagenet", 1000, 0),
            "imagenet-sketch": ("eval", "imagenet-sketch", 1000, 0),
            "imagenet-v2": ("eval", "imagenet-v2", 1000, 0),
            "imagenet-r": ("eval", "imagenet-r", 200, 0),
            "imagenet-a": ("eval", "imagenet-a", 200, 0),
            "objectnet": ("eval", "objectnet", 113, 0),
            "waterbirds": ("eval", "waterbirds", 2, 4),
            "pacs": ("eval", "pacs", 7, 4),
        }
        s = plan["schedule"]
        assert (s["batch_size"], s["steps_per_epoch"], s["total_steps"], s["epochs"]) == (512, 1, 10, 10)
    assert (plan["bank"]["descriptors"], plan["bank"]["concepts"]) == (3, ["background"])


@pytest.mark.parametrize("method", ["lipsum", "carot", "carft", "lpft"])
def test_baseline_recipes_validate_with_their_options(data_root, tiny_bank, monkeypatch, method):
    monkeypatch.chdir(data_root)
    plan = dry_run(f"imagenet-vitb16-{method}.yaml", tiny_bank)
    assert plan["method"] == method and plan["model"] == "ViT-B-16"
    assert _sets(plan)["train"] == ("train", "imagenet", 1000, 0)
    r = runner.invoke(app, ["run", "-c", str(CONFIGS / f"imagenet-vitb16-{method}.yaml"), "--dry-run",
                            "--set", "method_options.no_such_option=1"])  # fmt: skip
    assert r.exit_code != 0 and "no_such_option" in r.output and "Traceback" not in r.output


def test_group_shift_and_transfer_recipes(data_root, tiny_bank, monkeypatch):
    monkeypatch.chdir(data_root)
    plan = dry_run("groupshift-zeroshot-vitb16.yaml", tiny_bank)
    assert (
        plan["method"] == "zeroshot"
        and plan["pretrained_kind"] == "weights file"
        and plan["schedule"] is None
    )
    assert _sets(plan) == {
        "waterbirds": ("eval", "waterbirds", 2, 4),
        "pacs": ("eval", "pacs", len(PACS_CLASSES), 4),
    }
    plan = dry_run("transfer-vitb16-starft.yaml", tiny_bank)
    assert _sets(plan) == {
        "train": ("train", "imagefolder", 3, 0),
        "caltech101": ("val", "imagefolder", 3, 0),
    }
    assert plan["schedule"]["steps_per_epoch"] == 900 // 256
    assert [label for _, label in plan["sets"][0]["samples"]][-1] == "yin yang"


def test_dry_run_writes_nothing_and_fails_in_one_line(data_root, tiny_bank, monkeypatch):
    monkeypatch.chdir(data_root)
    before = sorted(str(p) for p in data_root.rglob("*"))
    dry_run("imagenet-vitb16-starft.yaml", tiny_bank)
    assert sorted(str(p) for p in data_root.rglob("*")) == before
    r = runner.invoke(
        app,
        ["run", "-c", str(CONFIGS / "imagenet-vitb16-starft.yaml"), "--bank", str(tiny_bank), "--dry-run",
         "--set", "data.eval[0]=x", "--set", "data.train.path=data/imagenet-r"],
    )  # fmt: skip
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output
    r = runner.invoke(
        app,
        ["run", "-c", str(CONFIGS / "imagenet-vitb16-starft.yaml"), "--bank", str(tiny_bank), "--dry-run",
         "--set", "data.train.path=data/imagenet-r"],
    )  # fmt: skip
    assert r.exit_code == 1 and "200 imagenet class folders" not in r.stderr
    assert "is not a imagenet class folder" in r.stderr or "class folders missing" in r.stderr
    r = runner.invoke(app, ["run", "-c", str(CONFIGS / "imagenet-vitb16-starft.yaml"), "--json"])
    assert r.exit_code == 2 and "needs --dry-run" in r.output
