"""Tests of the zero-shot model pretraining: a tiny run, caching, loading through open_clip, the loss.

.venv/bin/pytest -q tests/bench/test_pretrain.py
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from bench import pretrain as pretrain_mod
from bench.pretrain import (
    PretrainConfig,
    get_pretrained,
    load_pretrained,
    read_meta,
    to_tensor,
)
from bench.world import WorldConfig, write_split
from trainer.losses import soft_clip_loss


def tiny_pretrain_config(world: WorldConfig) -> PretrainConfig:
    """A pretraining config small enough for a test (a few steps of a tiny model)."""
    return PretrainConfig(
        world=world,
        embed_dim=32,
        vision_width=4,
        text_width=32,
        text_heads=2,
        text_layers=1,
        steps=3,
        batch_size=32,
        warmup_steps=1,
    )


@pytest.fixture(scope="module")
def tiny_cfg() -> PretrainConfig:
    return tiny_pretrain_config(WorldConfig(n_pretrain=96, n_a_train=40, n_eval=20, group_size=2))


@pytest.fixture(scope="module")
def tiny_run(tiny_cfg, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    return root, get_pretrained(tiny_cfg, root, threads=1, progress=False)


def test_tiny_pretraining_writes_a_complete_folder(tiny_cfg, tiny_run):
    _, run_dir = tiny_run
    assert {"model.json", "model.safetensors", "meta.json", "open_clip_config.json"} <= {
        p.name for p in run_dir.iterdir()
    }
    meta = read_meta(run_dir)
    assert meta["hash"] == tiny_cfg.hash() and meta["seed"] == 0
    assert meta["logit_scale"] == pytest.approx(100.0, rel=1e-4)
    for variant in ("val", "test"):
        z = meta["zero_shot"][variant]
        assert {"a_acc", "a_sketch_acc", "a_unseen_acc", "b_plain_acc", "b_worst_group", "b_bias_gap"} <= set(
            z
        )
    assert "snow" in meta["vocabulary"]
    assert (
        json.loads((run_dir / "model.json").read_text())["text_cfg"]["context_length"]
        == tiny_cfg.context_length
    )


def test_cached_model_is_reused(tiny_cfg, tiny_run, monkeypatch):
    root, run_dir = tiny_run

    def boom(*a, **k):
        raise AssertionError("cached model was retrained")

    monkeypatch.setattr(pretrain_mod, "build_model", boom)
    assert get_pretrained(tiny_cfg, root) == run_dir
    with pytest.raises(AssertionError, match="retrained"):
        get_pretrained(tiny_cfg.model_copy(update={"seed": 1}), root)


def test_loads_through_open_clip_and_matches_in_memory_preprocessing(tiny_cfg, tiny_run):
    import open_clip

    root, run_dir = tiny_run
    model, _, preprocess, tokenizer = load_pretrained(run_dir)
    split = write_split(tiny_cfg.world, "a_val", root)
    pil = Image.open(split / "images" / "000000.png").convert("RGB")
    with torch.no_grad():
        via_open_clip = model.encode_image(preprocess(pil)[None])
        via_arrays = model.encode_image(to_tensor(np.asarray(pil)[None]))
        text = model.encode_text(tokenizer(["a photo of a five."]))
    assert torch.allclose(via_open_clip, via_arrays, atol=1e-4)
    assert text.shape == (1, tiny_cfg.embed_dim)

    model2, _, _ = open_clip.create_model_and_transforms(f"local-dir:{run_dir}")
    model2.eval()
    with torch.no_grad():
        assert torch.allclose(model2.encode_image(preprocess(pil)[None]), via_open_clip, atol=1e-5)


def test_multi_positive_loss_reduces_to_clip_loss_without_duplicates():
    import open_clip

    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    ours = soft_clip_loss(img, txt, 100.0, torch.eye(6, dtype=torch.bool))
    ref = open_clip.ClipLoss()(img, txt, torch.tensor(100.0))
    assert torch.allclose(ours, ref, atol=1e-5)


def test_identical_captions_are_not_negatives():
    # Two images with the same caption: matching either caption to either image costs the same.
    img = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    txt = F.normalize(torch.tensor([[1.0, 1.0], [1.0, 1.0]]), dim=-1)
    same = torch.ones(2, 2, dtype=torch.bool)
    assert soft_clip_loss(img, txt, 100.0, same).item() == pytest.approx(np.log(2), abs=1e-5)


def test_image_size_must_suit_the_image_tower():
    with pytest.raises(ValueError, match="image_size"):
        pretrain_mod.model_config(PretrainConfig(world=WorldConfig(image_size=48)))


def test_describes_marks_true_descriptions_only():
    from bench.pretrain import describes

    records = [
        {"digit": 5, "background": "snow"},
        {"digit": 6, "background": "snow"},
        {"digit": -1, "background": "beach"},
    ]
    contents = [
        {"object": True, "digit": 5, "scene": "snow"},  # "a five in the snow"
        {"object": True, "digit": None, "scene": None},  # "a digit."
        {"object": False, "digit": None, "scene": "beach"},  # "the beach."
    ]
    d = describes(contents, records).tolist()
    assert d == [[True, True, False], [False, True, False], [False, False, True]]


def test_caption_content_matches_the_caption():
    from bench.vocab import make_caption

    rng = np.random.default_rng(0)
    for _ in range(200):
        c: dict = {}
        cap = make_caption(
            rng, digit=7, name="seven", named=True, background="snow", style="normal", content=c
        )
        assert (c["digit"] == 7) == ("seven" in cap or "7" in cap)
        if c["scene"] is None:
            assert not any(w in cap for w in ("snow", "winter", "wintry"))


def test_bn_recalibration_uses_mixed_batches():
    from bench.pretrain import recalibrate_bn

    bn = torch.nn.BatchNorm2d(3)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = bn

        def encode_image(self, x):
            return self.bn(x)

    images = torch.full((64, 3, 4, 4), 255, dtype=torch.uint8)
    recalibrate_bn(M(), images, batches=2, batch_size=8, seed=0)
    expect = (1.0 - torch.tensor(pretrain_mod.MEAN)) / torch.tensor(pretrain_mod.STD)
    assert torch.allclose(bn.running_mean, expect, atol=1e-5)
    assert bn.momentum == 0.1


def test_vit_image_tower_config_builds():
    cfg = PretrainConfig(
        world=WorldConfig(image_size=32),
        vision_patch_size=4,
        vision_layers=2,
        vision_width=32,
        vision_head_width=16,
        embed_dim=32,
        text_width=32,
        text_heads=2,
        text_layers=1,
    )
    model, _tok = pretrain_mod.build_model(cfg)
    assert pretrain_mod.model_config(cfg)["vision_cfg"]["patch_size"] == 4
    with torch.no_grad():
        assert model.encode_image(torch.zeros(2, 3, 32, 32)).shape == (2, 32)


def test_force_replaces_the_cached_model_and_leaves_no_temp_folder(tiny_cfg, tmp_path):
    first = get_pretrained(tiny_cfg, tmp_path, threads=1, progress=False)
    (first / "marker").write_text("old copy")
    again = get_pretrained(tiny_cfg, tmp_path, threads=1, progress=False, force=True)
    assert again == first and not (again / "marker").exists()
    assert read_meta(again)["hash"] == tiny_cfg.hash()
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []
