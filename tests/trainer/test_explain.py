"""`trainer explain`: Grad-CAM grids of the zero-shot model and runs (ViT and ModifiedResNet towers).

.venv/bin/pytest -q tests/trainer/test_explain.py
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from ruamel.yaml import YAML
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tests.conftest import CLASSES_A, TINY_CLIP, make_bank, tiny_config_for
from trainer.cli import app

pytest.importorskip("pytorch_grad_cam")

from trainer.explain import explain, grid_pixels, load_samples, parse_classes, token_grid

runner = CliRunner()

TINY_RESNET = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8},
    "text_cfg": TINY_CLIP["text_cfg"],
}


def _write_yaml(path: Path, data: dict) -> None:
    with path.open("w") as f:
        YAML(typ="safe", pure=True).dump(data, f)


def _perturbed_run(src: Path, dst: Path, seed: int, **config) -> Path:
    """A run dir like `src` whose weights are `src`'s plus noise (and config keys changed)."""
    (dst / "checkpoints").mkdir(parents=True)
    cfg = YAML(typ="safe", pure=True).load((src / "config.yaml").read_text())
    _write_yaml(dst / "config.yaml", {**cfg, **config, "name": dst.name})
    g = torch.Generator().manual_seed(seed)
    sd = load_file(str(src / "checkpoints" / "last.safetensors"))
    noisy = {
        k: v + 0.05 * v.abs().mean() * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
        for k, v in sd.items()
    }
    save_file(noisy, str(dst / "checkpoints" / "last.safetensors"))
    return dst


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_clip, image_data) -> dict[str, Path]:
    """flyp: a real 2-step run on the tiny ViT; flyp2: its weights with noise; ft: with a trained head
    that always says class 2; resnet: a ModifiedResNet tower; empty: a run dir without checkpoints."""
    from trainer.config import build_config
    from trainer.train import train

    root = tmp_path_factory.mktemp("explain")
    base = tiny_config_for(root, tiny_clip, image_data, make_bank(root / "banks"))
    flyp = train(build_config(dict(base, method="flyp", epochs=1, name="flyp"), max_steps=2))
    out = {"flyp": flyp, "flyp2": _perturbed_run(flyp, root / "runs" / "flyp2", seed=1)}
    ft = _perturbed_run(flyp, root / "runs" / "ft-head", seed=2, method="ft")
    w = torch.zeros(len(CLASSES_A), TINY_CLIP["embed_dim"])
    save_file(
        {"weight": w, "bias": torch.tensor([0.0, 0.0, 9.0, 0.0])},
        str(ft / "checkpoints/last.head.safetensors"),
    )
    out["ft"] = ft

    from accelerate.utils import set_seed

    from trainer.model import build_clip

    rn_json = root / "tiny-rn.json"
    rn_json.write_text(json.dumps(TINY_RESNET))
    rn = root / "runs" / "rn"
    (rn / "checkpoints").mkdir(parents=True)
    _write_yaml(rn / "config.yaml", dict(base, method="flyp", model=str(rn_json), name="rn"))
    set_seed(0)
    clip, _, _ = build_clip(str(rn_json), None)
    save_file(
        {k: v.detach().contiguous() for k, v in clip.state_dict().items()},
        str(rn / "checkpoints/last.safetensors"),
    )
    out["resnet"] = _perturbed_run(rn, root / "runs" / "rn-noisy", seed=3)

    empty = root / "runs" / "zeroshot-empty"
    (empty / "checkpoints").mkdir(parents=True)
    shutil.copy(flyp / "config.yaml", empty / "config.yaml")
    out["empty"] = empty
    return out


def test_cli_writes_a_grid_with_a_panel_per_image_and_model(runs, image_data, tmp_path):
    png = tmp_path / "grid.png"
    args = ["explain", str(runs["flyp"]), str(runs["flyp2"]), "--images", str(image_data["val"])]
    args += ["--classes", ",".join(CLASSES_A), "--limit", "3", "--out", str(png), "--device", "cpu"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert Path(r.stdout.strip()) == png
    with Image.open(png) as im:
        assert im.size == grid_pixels(rows=3, cols=4)  # image + zero-shot + two runs


def test_maps_have_the_image_size_values_in_0_1_and_differ_between_runs(runs, image_data):
    res = explain([runs["flyp"], runs["flyp2"]], image_data["val"], image_data["classes_a"], limit=4,
                  device="cpu", render=False)  # fmt: skip
    assert [c.title for c in res.columns] == ["zero-shot", "flyp", "flyp2"]
    assert res.layer == "transformer.resblocks.0.ln_1" and res.images.shape == (4, 32, 32, 3)
    assert [s.label for s in res.samples] == [0, 1, 2, 3]  # evenly spaced through the 4 x 4 set
    for col in res.columns:
        assert col.maps.shape == (4, 32, 32) and col.maps.dtype == np.float32
        assert col.maps.min() >= 0.0 and col.maps.max() <= 1.0 and col.maps.max() > 0.5
        assert col.targets == [0, 1, 2, 3]  # --target true: the labels
        assert all(0.0 < p <= 1.0 for p in col.probs)
    zs, a, b = (c.maps for c in res.columns)
    assert np.abs(a - b).max() > 0.05 and np.abs(zs - a).max() > 0.05
    again = explain([runs["flyp2"]], image_data["val"], image_data["classes_a"], limit=4, device="cpu",
                    render=False)  # fmt: skip
    assert np.array_equal(again.columns[1].maps, b)  # deterministic


def test_resnet_tower(runs, image_data, tmp_path):
    png = tmp_path / "rn.png"
    res = explain([runs["resnet"]], image_data["groups_b"], "cat,dog", out=png, limit=2, device="cpu")
    assert res.layer == "layer3"  # 64 px: layer3 is 4x4, layer4 2x2
    assert res.columns[1].maps.shape == (2, 64, 64)
    assert all(0.0 <= c.maps.min() and c.maps.max() <= 1.0 for c in res.columns)
    with Image.open(png) as im:
        assert im.size == grid_pixels(rows=2, cols=3)
    res = explain([runs["resnet"]], image_data["groups_b"], "cat,dog", limit=1, layer="layer1", render=False)
    assert res.layer == "layer1" and res.columns[0].maps.shape == (1, 64, 64)


def test_trained_head_is_what_a_head_run_explains(runs, image_data):
    res = explain([runs["ft"]], image_data["val"], image_data["classes_a"], limit=2, target="pred",
                  render=False)  # fmt: skip
    ft = res.columns[1]
    assert ft.preds == [2, 2] and ft.targets == [2, 2] and min(ft.probs) > 0.99


def test_folder_images_labels_and_targets(runs, image_data, tmp_path):
    src = sorted((image_data["root"] / "val").glob("*.png"))
    for i, name in enumerate(["circle", "square", None]):
        d = tmp_path / "imgs" / name if name else tmp_path / "imgs"
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(src[i * 4], d / f"im{i}.png")
    samples = load_samples(tmp_path / "imgs", CLASSES_A)
    assert [(s.path.name, s.label) for s in samples] == [("im2.png", None), ("im0.png", 0), ("im1.png", 1)]
    res = explain([runs["flyp"]], tmp_path / "imgs", ",".join(CLASSES_A), render=False)
    for col in res.columns:
        assert col.targets[1:] == [0, 1] and col.targets[0] == col.preds[0]  # unlabelled: the prediction
    res = explain([runs["flyp"]], tmp_path / "imgs", ",".join(CLASSES_A), target="pred", render=False)
    assert all(c.targets == c.preds for c in res.columns)


def test_token_grid_drops_the_class_token_in_either_layout():
    n, gh, gw, d = 2, 2, 3, 4
    x = torch.randn(n, 1 + gh * gw, d)
    want = x[:, 1:].reshape(n, gh, gw, d).permute(0, 3, 1, 2)
    for batch_first, tokens in ((True, x), (False, x.transpose(0, 1))):
        visual = SimpleNamespace(grid_size=(gh, gw), transformer=SimpleNamespace(batch_first=batch_first))
        assert torch.equal(token_grid(visual)(tokens), want)
    legacy = SimpleNamespace(grid_size=(gh, gw), transformer=SimpleNamespace())  # no attribute: L, N, D
    assert torch.equal(token_grid(legacy)(x.transpose(0, 1)), want)
    conv = torch.randn(n, d, gh, gw)
    assert token_grid(legacy)(conv) is conv


def test_vit_maps_are_the_same_whether_blocks_run_batch_first_or_not(image_data):
    import open_clip
    from open_clip.transformer import Transformer

    from trainer.explain import Scorer, TextHead, cam_layer, cam_maps

    torch.manual_seed(0)
    clip = open_clip.CLIP(**TINY_CLIP).eval()
    preprocess = open_clip.image_transform(32, is_train=False)
    paths = sorted((image_data["root"] / "val").glob("*.png"))[:3]
    batch = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths])
    head = TextHead(torch.nn.functional.normalize(torch.randn(4, 32), dim=-1), 10.0)
    maps = []
    for batch_first in (True, False):  # (N, L, D) blocks, then (L, N, D) blocks as older open_clip ran
        if not batch_first:
            old = clip.visual.transformer
            lnd = Transformer(old.width, old.layers, 2, batch_first=False)
            lnd.load_state_dict(old.state_dict())
            clip.visual.transformer = lnd.eval()
        _, module, reshape = cam_layer(clip.visual)
        maps.append(cam_maps(Scorer(clip, head).eval(), batch, [0, 1, 2], module, reshape))
    assert maps[0].shape == (3, 32, 32) and maps[0].max() > 0
    np.testing.assert_allclose(maps[0], maps[1], atol=1e-4)


def test_parse_classes(image_data, tmp_path):
    assert parse_classes("a, b,c") == ["a", "b", "c"]
    assert parse_classes(str(image_data["classes_a"])) == CLASSES_A
    assert parse_classes(["x", "y"]) == ["x", "y"]


def _bad_csv(tmp_path: Path, image_data: dict) -> Path:
    img = next((image_data["root"] / "val").glob("*.png"))
    p = tmp_path / "bad.csv"
    p.write_text(f"path,label\n{img},hexagon\n")
    return p


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_run", "no such run directory"),
        ("no_checkpoint", "no best or last checkpoint"),
        ("bad_images", "no such images folder or CSV file"),
        ("empty_images", "no image files"),
        ("unknown_class_csv", "'hexagon' is not a class name"),
        ("unknown_class_folder", "'hexagon' is not a class name"),
        ("missing_classes_file", "no such class-names file"),
        ("head_classes", "pass those as --classes"),
        ("bad_layer", "--layer 'nope'"),
        ("no_gradcam", "pip install 'starft-toolkit[explain]'"),
    ],
)
def test_errors_are_one_line(runs, image_data, tmp_path, monkeypatch, case, expected):
    run, images, classes = runs["flyp"], image_data["val"], str(image_data["classes_a"])
    extra: list[str] = []
    if case == "missing_run":
        run = tmp_path / "nope"
    elif case == "no_checkpoint":
        run = runs["empty"]
    elif case == "bad_images":
        images = tmp_path / "nope"
    elif case == "empty_images":
        images = tmp_path
    elif case == "unknown_class_csv":
        images = _bad_csv(tmp_path, image_data)
    elif case == "unknown_class_folder":
        (tmp_path / "imgs" / "hexagon").mkdir(parents=True)
        shutil.copy(next((image_data["root"] / "val").glob("*.png")), tmp_path / "imgs" / "hexagon" / "a.png")
        images = tmp_path / "imgs"
    elif case == "missing_classes_file":
        classes = str(tmp_path / "classes.txt")
    elif case == "head_classes":
        run, images, classes = runs["ft"], image_data["groups_b"], "cat,dog"
    elif case == "bad_layer":
        extra = ["--layer", "nope"]
    elif case == "no_gradcam":
        monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)  # import fails as if not installed
    args = ["explain", str(run), "--images", str(images), "--classes", classes, "--limit", "2", *extra]
    r = runner.invoke(app, args + ["--out", str(tmp_path / "g.png")])
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    assert expected in lines[0]
    assert not (tmp_path / "g.png").exists()
