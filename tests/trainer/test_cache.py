"""Teacher feature caches (issue 20): the optimised StarFT step (trimmed text, cached teacher text and
image features) gives the plain step's losses and gradients.

.venv/bin/pytest tests/trainer/test_cache.py -q
"""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from trainer.config import build_config
from trainer.methods import get_method
from trainer.model import FineTuner, build_clip, make_teacher
from trainer.step import TeacherFeatures, backward_step

WORDS = ["in the water", "on the grass", "in the snow"]


def _batches(tokenizer, n: int = 16, per: int = 8, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Two micro-batches covering samples 0..n-1; sample i's image is fixed (a deterministic transform)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    order = torch.randperm(n, generator=g)
    out = []
    for j in range(0, n, per):
        idx = order[j : j + per]
        labels = idx % 4
        draws = torch.randint(len(WORDS), (per,), generator=g)
        out.append(
            {
                "image": images[idx],
                "label": labels,
                "index": idx,
                "caption": tokenizer([f"a photo of a c{int(y)}." for y in labels]),
                "spurious": tokenizer([f"a photo of a c{int(y)} {WORDS[w]}." for y, w in zip(labels, draws)]),
            }
        )
    return out


def _setup(tiny_clip):
    set_seed(0)
    clip, _, tokenizer = build_clip(str(tiny_clip), None)
    teacher = make_teacher(clip)
    with torch.no_grad():  # the student away from the teacher, so the KL has a gradient
        g = torch.Generator().manual_seed(3)
        for p in clip.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return clip, teacher, tokenizer


def test_cached_teacher_features_equal_the_teachers_forward(tiny_clip):
    _, teacher, tokenizer = _setup(tiny_clip)
    plain = TeacherFeatures(teacher, cache_text=False, trim=False, inference=False)
    cached = TeacherFeatures(make_teacher(teacher), num_samples=16)
    for epoch in range(2):
        for batch in _batches(tokenizer, seed=epoch):
            ref_image, ref_text = plain(batch)
            image, text = cached(batch)
            assert (image - ref_image).abs().max() < 1e-5 and (text - ref_text).abs().max() < 1e-5
            assert not image.is_inference() and not text.is_inference()
    # every image computed once (epoch 0), then read; each distinct caption (4 classes x 3 words at most)
    # encoded once
    assert cached.counts["image_computed"] == 16 and cached.counts["image_cached"] == 16
    distinct = {
        tuple(r.tolist()) for e in range(2) for b in _batches(tokenizer, seed=e) for r in b["spurious"]
    }
    assert cached.counts["text_computed"] == len(distinct) < 32
    assert cached.teacher.visual is None  # every sample cached: the image tower was released
    assert plain.counts["image_computed"] == 32 and plain.teacher.visual is not None


def _step(tiny_clip, batches, optimised: bool):
    clip, teacher, _ = _setup(tiny_clip)
    model = FineTuner(clip, trim_text=optimised)
    if optimised:
        feats = TeacherFeatures(teacher, num_samples=16)
    else:
        feats = TeacherFeatures(teacher, cache_text=False, trim=False, inference=False)
    cfg = build_config({"data": {"train": {"path": "x.csv"}}}, ["method=starft", "spurious=none"])
    scale = float(clip.logit_scale.exp().detach())
    acc, spec = Accelerator(cpu=True), get_method("starft")
    steps = []
    for micro in batches:
        model.zero_grad(set_to_none=True)
        terms = backward_step(model, micro, spec, cfg, acc, feats, scale, 0.5)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        steps.append((terms, grads))
    return steps


@pytest.mark.parametrize("k", [1, 2])
def test_the_optimised_step_gives_the_plain_steps_losses_and_gradients(tiny_clip, k):
    _, _, tokenizer = _setup(tiny_clip)
    # epoch 0 fills the caches, epoch 1 reads them; k micro-batches per step (exact accumulation)
    epochs = [_batches(tokenizer, seed=e) for e in range(2)]
    batches = [[torch_cat(b)] if k == 1 else b for b in epochs]
    plain = _step(tiny_clip, batches, optimised=False)
    fast = _step(tiny_clip, batches, optimised=True)
    for (pt, pg), (ft, fg) in zip(plain, fast):
        for term in ("loss", "contrastive_loss", "reg_loss"):
            assert abs(float(ft[term]) - float(pt[term])) <= 1e-5 * max(1.0, abs(float(pt[term]))), term
        assert float(pt["reg_loss"]) > 0 and pg.keys() == fg.keys()
        for name, g in pg.items():
            assert (fg[name] - g).abs().max() <= 1e-5 * g.abs().max().clamp_min(1), name


def torch_cat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
