"""Training is exact at paper scale (issue 17): epoch order and draws, the train transform, exact gradient
accumulation, the FT head's parameterisation, what metrics.json reports.

.venv/bin/pytest tests/trainer/test_exact.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from torchvision import transforms

import trainer.train as train_mod
from trainer.config import build_config
from trainer.data import Collate, EpochSampler, ImageDataset
from trainer.inputs import load_inputs
from trainer.methods import get_method
from trainer.model import FineTuner, build_clip, make_teacher, train_transform
from trainer.step import TeacherFeatures, backward_step, compute_losses
from trainer.train import train


def _record_steps(monkeypatch) -> list[list[dict[str, torch.Tensor]]]:
    """Every optimizer step's micro-batches, as train() hands them to backward_step."""
    seen: list[list[dict[str, torch.Tensor]]] = []
    real = train_mod.backward_step

    def spy(model, micro, *args, **kwargs):
        seen.append([{k: v.clone() for k, v in b.items()} for b in micro])
        return real(model, micro, *args, **kwargs)

    monkeypatch.setattr(train_mod, "backward_step", spy)
    return seen


# --- 1. epoch order and descriptor draws ------------------------------------------------------


def test_each_epoch_has_its_own_order_and_descriptor_draws(tiny_config, monkeypatch):
    seen = _record_steps(monkeypatch)
    train(build_config(tiny_config, ["epochs=3", "name=epochs"]))
    per_epoch = 32 // 8
    assert len(seen) == 3 * per_epoch
    orders = [torch.cat([s[0]["index"] for s in seen[e * per_epoch : (e + 1) * per_epoch]]) for e in range(3)]
    for order in orders:
        assert sorted(order.tolist()) == list(range(32))  # every sample once an epoch
    assert not torch.equal(orders[0], orders[1]) and not torch.equal(orders[1], orders[2])
    # the spurious caption of each sample, per epoch: redrawn every epoch (3 descriptors, 32 samples)
    drawn = []
    for e in range(3):
        by_index = {}
        for s in seen[e * per_epoch : (e + 1) * per_epoch]:
            for i, tokens in zip(s[0]["index"].tolist(), s[0]["spurious"]):
                by_index[i] = tokens
        drawn.append(torch.stack([by_index[i] for i in range(32)]))
    assert not torch.equal(drawn[0], drawn[1]) and not torch.equal(drawn[1], drawn[2])


@pytest.mark.slow
def test_workers_and_persistent_workers_draw_what_no_workers_draw(tiny_config, tiny_clip):
    cfg = build_config(tiny_config)
    inputs = load_inputs(cfg)
    clip, _, tokenizer = build_clip(str(tiny_clip), None)
    ds = ImageDataset(inputs.train, train_transform(clip), cfg.caption, inputs.spurious, augment_seed=0)

    def epochs(**loader_kwargs) -> list[dict[str, torch.Tensor]]:
        sampler = EpochSampler(len(ds), seed=0)
        loader = DataLoader(ds, batch_size=8, sampler=sampler, collate_fn=Collate(tokenizer), **loader_kwargs)
        out = []
        for epoch in range(2):
            sampler.set_epoch(epoch)
            out.extend(loader)
        return out

    ref = epochs(num_workers=0)
    for kwargs in ({"num_workers": 2}, {"num_workers": 2, "persistent_workers": True}):
        got = epochs(**kwargs)
        assert len(got) == len(ref)
        for a, b in zip(ref, got):
            for key in ("image", "index", "spurious", "caption"):
                assert torch.equal(a[key], b[key]), (kwargs, key)


def test_a_resumed_starft_run_ends_bit_for_bit_where_the_uninterrupted_run_ends(tiny_config):
    base = ["method=starft", "checkpoint_every=2", "epochs=3"]
    full = train(build_config(tiny_config, base + ["name=full"]))
    train(build_config(tiny_config, base + ["name=part", "max_steps=5"]))  # stops inside epoch 1
    resumed = train(build_config(tiny_config, base + ["name=part"]), resume=True)
    a = load_file(str(full / "checkpoints" / "last.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (full, resumed))
    assert mb["final"] == ma["final"] and mb["best"] == ma["best"]


# --- 2. the training transform ------------------------------------------------------------------


def test_training_uses_open_clips_train_transform_by_default(tiny_config, monkeypatch):
    built: list[ImageDataset] = []
    real = train_mod.ImageDataset

    def spy(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(train_mod, "ImageDataset", spy)
    train(build_config(tiny_config, ["total_steps=1", "name=aug"]))
    steps = [t for t in built[0].transform.transforms if isinstance(t, transforms.RandomResizedCrop)]
    assert len(steps) == 1 and steps[0].scale == (0.9, 1.0)
    a, b, c = built[0][(3, 0)]["image"], built[0][(3, 0)]["image"], built[0][(3, 1)]["image"]
    assert torch.equal(a, b) and not torch.equal(a, c)  # seeded by (seed, epoch, index)

    built.clear()
    train(build_config(tiny_config, ["total_steps=1", "name=noaug", "train_transform=eval"]))
    assert not any(isinstance(t, transforms.RandomResizedCrop) for t in built[0].transform.transforms)
    assert torch.equal(built[0][(3, 0)]["image"], built[0][(3, 1)]["image"])


# --- 3. exact gradient accumulation ---------------------------------------------------------------


def _batch(tokenizer, n: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([0, 0, 1, 1, 2, 0, 3, 1])[:n]
    words = ["water", "snow", "grass", "city", "sand", "forest", "night", "fog"]
    return {
        "image": torch.randn(n, 3, 32, 32, generator=g),
        "label": labels,
        "index": torch.arange(n),
        "caption": tokenizer([f"a photo of a c{int(y)}." for y in labels]),
        "spurious": tokenizer([f"a photo of a c{int(y)} in the {w}." for y, w in zip(labels, words)]),
    }


def _grads(tiny_clip, method: str, k: int, overrides=()) -> tuple[dict, dict]:
    set_seed(0)
    clip, _, tokenizer = build_clip(str(tiny_clip), None)
    teacher = TeacherFeatures(make_teacher(clip))
    with torch.no_grad():  # move the student away from the teacher so the KL has a gradient
        g = torch.Generator().manual_seed(3)
        for p in clip.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    head = None
    if method == "ft":
        head = torch.nn.functional.normalize(torch.randn(4, 32, generator=g), dim=-1) * 50
    model = FineTuner(clip, head)
    cfg = build_config(
        {"data": {"train": {"path": "x.csv"}}}, [f"method={method}", "spurious=none", *overrides]
    )
    batch = _batch(tokenizer)
    micro = [{key: v[j::k] for key, v in batch.items()} for j in range(k)]  # any split of the batch
    scale = float(clip.logit_scale.exp().detach())
    terms = backward_step(model, micro, get_method(method), cfg, Accelerator(cpu=True), teacher, scale, 0.5)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, terms


@pytest.mark.parametrize("method", ["flyp", "starft", "kl", "ft"])
@pytest.mark.parametrize("k", [2, 4])
def test_accumulated_gradient_equals_the_full_batch_gradient(tiny_clip, method, k):
    full, full_terms = _grads(tiny_clip, method, 1)
    acc, acc_terms = _grads(tiny_clip, method, k)
    assert full.keys() == acc.keys() and "clip.logit_scale" in full or method == "ft"
    for name, g in full.items():
        rel = (acc[name] - g).norm() / g.norm().clamp_min(1e-12)
        assert rel < 1e-5, (name, float(rel))
    for term in ("loss", "contrastive_loss", "reg_loss"):
        assert float(acc_terms[term]) == pytest.approx(float(full_terms[term]), rel=1e-5, abs=1e-7)


def test_per_micro_batch_losses_are_not_the_full_batch_objective(tiny_clip):
    """Why accumulation needs the two passes: summing per-micro-batch contrastive losses changes it."""
    set_seed(0)
    clip, _, tokenizer = build_clip(str(tiny_clip), None)
    model = FineTuner(clip)
    cfg = build_config({"data": {"train": {"path": "x.csv"}}}, ["method=flyp"])
    batch = _batch(tokenizer)
    spec, acc = get_method("flyp"), Accelerator(cpu=True)
    whole = compute_losses(model, batch, spec, cfg, acc, None, 1.0, 0.0)["loss"]
    halves = [compute_losses(model, {k: v[j::2] for k, v in batch.items()}, spec, cfg, acc, None, 1.0, 0.0)
              for j in range(2)]  # fmt: skip
    assert abs(float(whole.detach()) - float(sum(h["loss"].detach() for h in halves) / 2)) > 1e-3


def test_a_run_with_grad_accum_ends_where_the_run_without_it_ends(tiny_config):
    base = ["method=starft", "train_transform=eval", "total_steps=20", "epochs=5", "lr=1e-4"]
    one = train(build_config(tiny_config, base + ["name=accum1"]))
    two = train(build_config(tiny_config, base + ["name=accum2", "grad_accum=2"]))
    a = load_file(str(one / "checkpoints" / "last.safetensors"))
    b = load_file(str(two / "checkpoints" / "last.safetensors"))
    for name in a:
        diff = (a[name] - b[name]).abs()
        if name.endswith("attn.in_proj_bias"):
            # Its key third has an exactly zero gradient (softmax ignores a shift of every key score), so
            # its float noise (~1e-10) differs between the two runs and AdamW turns that into ±lr steps.
            # The query and value thirds carry the signal.
            d = diff.shape[0] // 3
            diff = torch.cat([diff[:d], diff[2 * d :]])
        assert float(diff.max()) < 1e-5, (name, float(diff.max()))


# --- 4. the FT head --------------------------------------------------------------------------------


def test_ft_head_folds_the_zero_shot_scale_into_its_weights(tiny_config):
    run = train(build_config(tiny_config, ["method=ft", "total_steps=1", "name=ft"]))
    scale = json.loads((run / "run.json").read_text())["teacher_logit_scale"]
    start = load_file(str(run / "checkpoints" / "head0.safetensors"))  # the head the run started from
    assert torch.allclose(start["weight"].norm(dim=1), torch.full((4,), scale), rtol=1e-5)  # s0 x unit rows
    assert torch.equal(start["bias"], torch.zeros(4))
    assert FineTuner(torch.nn.Module(), None).head is None
    saved = load_file(str(run / "checkpoints" / "last.head.safetensors"))["weight"]
    assert saved.norm(dim=1).mean() > 0.5 * scale  # what is trained is the scaled head


def test_ft_logits_are_the_head_of_normalised_features(tiny_clip):
    clip, _, _ = build_clip(str(tiny_clip), None)
    w = torch.nn.functional.normalize(torch.randn(4, 32), dim=-1) * 30
    model = FineTuner(clip, w)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert torch.allclose(out["logits"], out["image"] @ w.T, atol=1e-5)


# --- 5. what a run reports ---------------------------------------------------------------------------


def test_metrics_hold_the_final_and_the_validation_selected_results(tiny_config):
    run = train(build_config(tiny_config, ["method=flyp", "epochs=2", "name=report"]))
    m = json.loads((run / "metrics.json").read_text())
    assert set(m["final"]) == {"val", "groups_b"}
    assert m["best"]["step"] in (4, 8) and set(m["best"]["results"]) == {"val", "groups_b"}
    assert m["best"]["results"]["val"]["top1"] == m["best"]["val_top1"]


def test_paper_recipe_names_a_bank_with_background_descriptors_and_laion400m():
    from trainer.config import load_config

    root = Path(__file__).parents[2]
    cfg = load_config(root / "configs" / "imagenet-vitb16-starft.yaml")
    assert cfg.pretrained == "laion400m_e31" and cfg.name is None and cfg.train_transform == "train"
    from descgen.bank import load_bank

    assert load_bank(root / cfg.bank).approved(["background"])
