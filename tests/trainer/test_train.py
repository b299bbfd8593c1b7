"""End-to-end training on a tiny open_clip model: every method, resume equivalence, WiSE-FT, schedules.

.venv/bin/pytest tests/trainer/test_train.py -q
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.config import build_config, load_config
from trainer.errors import ConfigError, RunDirError
from trainer.methods import MethodSpec, get_method
from trainer.schedules import lam_at, lr_at
from trainer.step import compute_losses
from trainer.train import train


def _approx_tree(tree):
    """Nested metrics with every float wrapped in pytest.approx (tight: 1e-6 relative)."""
    if isinstance(tree, dict):
        return {k: _approx_tree(v) for k, v in tree.items()}
    if isinstance(tree, float):
        return pytest.approx(tree, rel=1e-6, abs=1e-9)
    return tree


def _rows(run: Path, kind: str) -> list[dict]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def snapshot(d: Path) -> dict[str, str]:
    """sha256 of every file under a directory, by relative path."""
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("method", ["zeroshot", "ft", "flyp", "starft", "kl"])
def test_every_method_runs_and_reports(tiny_config, method):
    cfg = build_config(tiny_config, [f"method={method}", f"name=m-{method}"])
    run = train(cfg)
    m = json.loads((run / "metrics.json").read_text())
    assert m["method"] == method and m["complete"] is True
    val, grp = m["final"]["val"], m["final"]["groups_b"]
    assert val["n"] == 16 and 0 <= val["top1"] <= 100
    assert set(grp["per_group"]) == {"cat/land", "cat/water", "dog/land", "dog/water"}
    assert grp["worst_group"] <= grp["worst3_mean"] <= 100 and grp["worst_group"] <= grp["group_mean"]
    assert load_config(run / "config.yaml") == cfg
    info = json.loads((run / "run.json").read_text())
    assert set(info["versions"]) >= {"python", "torch", "open_clip", "trainer"}
    assert (run / "accuracy.png").stat().st_size > 0 and (run / "groups.png").stat().st_size > 0
    if method == "zeroshot":
        return
    steps = _rows(run, "step")
    assert [r["step"] for r in steps] == list(range(1, 9))  # 32 images / batch 8 x 2 epochs
    assert all(math.isfinite(r["loss"]) for r in steps)
    assert all(r["logit_scale"] <= 100.0 + 1e-4 for r in steps)
    assert [r["epoch"] for r in _rows(run, "epoch")] == [1, 2]
    assert (run / "checkpoints" / "last.safetensors").is_file() and (
        run / "checkpoints" / "best.safetensors"
    ).is_file()
    assert m["best"]["step"] in (4, 8)
    assert (run / "loss.png").stat().st_size > 0
    if method in ("starft", "kl"):
        assert info["bank"]["content_hash"].startswith("sha256:") and info["bank"]["file_sha256"].startswith(
            "sha256:"
        )
        assert len(info["bank"]["descriptors"]) == 3
        assert steps[0]["reg_loss"] == pytest.approx(0.0, abs=1e-6)  # student == teacher at the first step
        assert max(r["reg_loss"] for r in steps) > 0
        assert steps[0]["lam"] == pytest.approx(0.25) and steps[-1]["lam"] == pytest.approx(
            0.0
        )  # epoch decay, E=2
    else:
        assert all(r["reg_loss"] == 0 for r in steps)
    if method == "ft":
        assert (run / "checkpoints" / "last.head.safetensors").is_file()


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_resume_ends_where_the_uninterrupted_run_ends(tiny_config, grad_accum):
    base = [f"grad_accum={grad_accum}", "checkpoint_every=2"]
    full = train(build_config(tiny_config, base + ["name=full"]))
    part = train(build_config(tiny_config, base + ["name=part", "max_steps=3"]))  # stops mid-epoch 1
    mp = json.loads((part / "metrics.json").read_text())
    assert mp["step"] == 3 and mp["complete"] is False
    resumed = train(build_config(tiny_config, base + ["name=part"]), resume=True)
    a, b = (
        load_file(str(full / "checkpoints" / "last.safetensors")),
        load_file(str(resumed / "checkpoints" / "last.safetensors")),
    )
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    ma, mb = (
        json.loads((full / "metrics.json").read_text()),
        json.loads((resumed / "metrics.json").read_text()),
    )
    assert mb["complete"] and mb["step"] == ma["step"]
    assert mb["best"] == ma["best"]
    assert mb["final"] == ma["final"]
    la, lb = _rows(full, "step"), _rows(resumed, "step")
    assert [r["step"] for r in lb] == [r["step"] for r in la]
    for ra, rb in zip(la, lb):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-6)


def test_existing_run_dir_is_refused_and_left_unchanged(tiny_config):
    cfg = build_config(tiny_config, ["method=flyp", "total_steps=1"])
    run = train(cfg)
    before = snapshot(run)
    with pytest.raises(RunDirError, match="exists"):
        train(cfg)
    with pytest.raises(RunDirError, match="different config"):
        train(build_config(tiny_config, ["method=flyp", "total_steps=1", "seed=1"]), resume=True)
    assert snapshot(run) == before


def test_resume_without_state_is_an_error(tiny_config):
    with pytest.raises(RunDirError, match="nothing to resume"):
        train(build_config(tiny_config, ["name=never-ran"]), resume=True)


@pytest.mark.parametrize("method", ["flyp", "ft"])
def test_wise_endpoints(tiny_config, method):
    """alpha=0 reproduces the zero-shot model's metrics, alpha=1 the fine-tuned run's."""
    from trainer.wise import wise

    zs = train(build_config(tiny_config, ["method=zeroshot", f"name=zs-{method}"]))
    run = train(build_config(tiny_config, [f"method={method}", f"name=ft-{method}"]))
    zero = json.loads((wise(run, 0.0) / "metrics.json").read_text())["final"]
    one = json.loads((wise(run, 1.0) / "metrics.json").read_text())["final"]
    # Accuracies match exactly; ECE is a float of the logits, which for ft come from the folded head
    # (head0) rather than the text tower, so it may differ in the last bits.
    assert zero == _approx_tree(json.loads((zs / "metrics.json").read_text())["final"])
    assert one == _approx_tree(json.loads((run / "metrics.json").read_text())["final"])
    half = wise(run, 0.5)
    assert (half / "model.safetensors").is_file() and half.name == "alpha-0.5"


@pytest.mark.parametrize(
    "overrides",
    [
        ["spurious=none", "bank=null"],  # the paper's clean-caption ablation
        ["spurious=random"],
        ["positives=label", "method=flyp"],
        ["freeze_logit_scale=true", "kl_scale=50", "lam_decay=step"],
        ["mixed_precision=bf16", "total_steps=3"],
    ],
)
def test_options_run(tiny_config, overrides):
    run = train(build_config(tiny_config, overrides + ["name=opt"]))
    steps = _rows(run, "step")
    assert all(math.isfinite(r["loss"]) for r in steps)
    info = json.loads((run / "run.json").read_text())
    if "freeze_logit_scale=true" in overrides:
        assert len({r["logit_scale"] for r in steps}) == 1
        assert info["kl_scale"] == 50
        assert steps[0]["lam"] == pytest.approx(0.5 * (1 - 1 / 8))
    if "total_steps=3" in overrides:
        assert len(steps) == 3 and info["mixed_precision"] == "bf16"


def test_schedules():
    cfg = build_config(
        {"method": "flyp", "data": {"train": {"path": "x.csv"}}},
        ["lr=1.0", "warmup_steps=2", "lam=0.5", "epochs=4"],
    )
    assert [lr_at(s, cfg, 10) for s in (0, 1)] == [0.5, 1.0]
    assert lr_at(2, cfg, 10) == pytest.approx(1.0) and lr_at(10, cfg, 10) == pytest.approx(0.0)
    assert [lam_at(0, e, cfg, 40, 4) for e in range(4)] == pytest.approx([0.375, 0.25, 0.125, 0.0])
    step_cfg = build_config({"method": "flyp", "data": {"train": {"path": "x.csv"}}}, ["lam_decay=step"])
    assert lam_at(9, 0, step_cfg, 10, 1) == pytest.approx(0.0)
    none_cfg = build_config({"method": "flyp", "data": {"train": {"path": "x.csv"}}}, ["lam_decay=none"])
    assert lam_at(9, 3, none_cfg, 10, 4) == 0.5


def test_unknown_plugin_method_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown method"):
        get_method("nosuchmethod")


def test_registered_extra_term_enters_the_loss(tiny_clip):
    """A method's extra term is added with weight lambda (how StarFT's and RaVL's terms enter)."""
    from accelerate import Accelerator

    from trainer.model import FineTuner, build_clip

    plus_one = MethodSpec("plus_one", "contrastive", reg_term=lambda ctx: ctx.image.sum() * 0 + 1.0)
    clip, _, tok = build_clip(str(tiny_clip), None)
    batch = {
        "image": torch.randn(4, 3, 32, 32),
        "label": torch.tensor([0, 1, 2, 3]),
        "caption": tok(["a photo of a cat."] * 4),
    }
    cfg = build_config({"method": "flyp", "data": {"train": {"path": "x.csv"}}}, ["method=flyp"])
    terms = compute_losses(FineTuner(clip), batch, plus_one, cfg, Accelerator(cpu=True), None, 1.0, 0.25)
    assert terms["reg_loss"].item() == 1.0
    assert terms["loss"].item() == pytest.approx(terms["contrastive_loss"].item() + 0.25)


@pytest.mark.parametrize("method, lr", [("ft", 3e-3), ("flyp", 3e-4), ("starft", 3e-4)])
def test_fine_tuning_learns_the_task(tiny_config, method, lr):
    """48 steps on the synthetic task lift ID accuracy well above chance (25 %) from a random init."""
    overrides = [
        f"method={method}",
        f"lr={lr}",
        "epochs=12",
        "weight_decay=0",
        "warmup_steps=4",
        "eval_every=12",
    ]
    run = train(build_config(tiny_config, overrides + ["log_every=12"]))
    m = json.loads((run / "metrics.json").read_text())
    assert m["final"]["val"]["top1"] >= 50, m["final"]["val"]


def test_pretrained_from_local_safetensors_and_pt(tiny_config, tmp_path):
    """A run's checkpoint (open_clip state dict) loads as `pretrained:`, as .safetensors and as a .pt file."""
    run = train(build_config(tiny_config, ["method=flyp", "name=src", "total_steps=2"]))
    ckpt = run / "checkpoints" / "last.safetensors"
    pt = tmp_path / "weights.pt"
    torch.save(load_file(str(ckpt)), pt)
    expected = json.loads((run / "metrics.json").read_text())["final"]
    for i, weights in enumerate((ckpt, pt)):
        zs = train(build_config(tiny_config, ["method=zeroshot", f"name=load{i}", f"pretrained={weights}"]))
        assert json.loads((zs / "metrics.json").read_text())["final"] == expected
    with pytest.raises(ConfigError, match="no such weights file"):
        train(
            build_config(
                tiny_config, ["method=zeroshot", "name=x", f"pretrained={tmp_path / 'none.safetensors'}"]
            )
        )


def test_freeze_text_trains_the_image_tower_only(tiny_config):
    """`freeze_text` (locked-text fine-tuning, any method): text tower and logit scale end as they began."""
    from accelerate.utils import set_seed

    from trainer.model import build_clip

    cfg = build_config(tiny_config, ["method=flyp", "name=locked", "freeze_text=true"])
    set_seed(cfg.seed)  # what train() does before building the model: the same random init
    init = {k: v.clone() for k, v in build_clip(cfg.model, cfg.pretrained)[0].state_dict().items()}
    after = load_file(str(train(cfg) / "checkpoints" / "last.safetensors"))
    changed = {k for k in init if not torch.equal(init[k], after[k])}
    assert changed and all(k.startswith("visual.") for k in changed)
    assert "logit_scale" not in changed and "text_projection" not in changed
