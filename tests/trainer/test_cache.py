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
            ref_image, ref_text = plain(batch).values()
            image, text = cached(batch).values()
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


def test_sets_that_share_their_prompts_share_one_zero_shot_head(tiny_clip, image_data, monkeypatch):
    import trainer.evaluate as ev
    from trainer.config import DataSpec
    from trainer.data import load_image_set

    def spec(name: str, path: str, classes: str) -> DataSpec:
        return DataSpec(path=str(image_data[path]), classes=str(image_data[classes]), name=name)

    sets = [
        load_image_set(spec("val", "val", "classes_a"), "simple"),
        load_image_set(spec("val_again", "val", "classes_a"), "simple"),  # ImageNet-V2's case: same prompts
        load_image_set(spec("groups_b", "groups_b", "classes_b"), "simple"),
    ]
    clip, preprocess, tokenizer = build_clip(str(tiny_clip), None)
    built: list[list[str]] = []
    real = ev.zero_shot_head

    def spy(clip, tokenizer, classes, templates, accelerator=None):
        built.append(list(classes))
        return real(clip, tokenizer, classes, templates, accelerator)

    monkeypatch.setattr(ev, "zero_shot_head", spy)
    eval_sets = ev.make_eval_sets(sets, preprocess, 16, None)
    cached = ev.evaluate_sets(clip, tokenizer, eval_sets)
    assert built == [sets[0].classes, sets[2].classes]  # one head per prompt set, each evaluation
    ev.evaluate_sets(clip, tokenizer, eval_sets)
    assert len(built) == 4  # a new evaluation embeds again: the text tower may have changed since
    alone = {es.image_set.name: ev.evaluate_set(clip, tokenizer, es, None) for es in eval_sets}
    assert cached == alone


def test_the_zero_shot_head_on_trimmed_prompts_equals_open_clips(tiny_clip):
    from open_clip import build_zero_shot_classifier

    from trainer.data import load_templates
    from trainer.evaluate import zero_shot_head

    clip, _, tokenizer = build_clip(str(tiny_clip), None)
    classes, templates = ["tench", "great white shark", "cat"], load_templates("openai")[:5]
    ref = build_zero_shot_classifier(clip.eval(), tokenizer, classes, templates).T
    assert (zero_shot_head(clip, tokenizer, classes, templates) - ref).abs().max() < 1e-5


def test_a_run_with_the_teacher_caches_ends_where_the_run_without_them_ends(tiny_config, monkeypatch):
    from safetensors.torch import load_file

    import trainer.train as train_mod

    made: list[TeacherFeatures] = []
    real = train_mod.TeacherFeatures

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(train_mod, "TeacherFeatures", spy)
    base = ["method=starft", "train_transform=eval", "epochs=2", "eval_every=2"]
    cached = train_mod.train(build_config(tiny_config, [*base, "name=cached"]))
    plain = train_mod.train(build_config(tiny_config, [*base, "name=plain", "teacher_cache=false"]))
    assert made[0].counts["image_computed"] == 32 and made[0].counts["image_cached"] == 32  # 2 epochs of 32
    assert made[1].counts["image_computed"] == 64 and made[1].text_cache is None
    a = load_file(str(cached / "checkpoints" / "last.safetensors"))
    b = load_file(str(plain / "checkpoints" / "last.safetensors"))
    for name in a:
        assert (a[name] - b[name]).abs().max() < 1e-5, name


def test_a_cached_caption_has_the_same_bits_whatever_batch_it_first_came_in(tiny_clip):
    _, teacher, tokenizer = _setup(tiny_clip)
    batches = _batches(tokenizer, seed=0)
    one, two = TeacherFeatures(teacher), TeacherFeatures(teacher)
    one(batches[0])
    two(batches[1])  # another batch first: another company for the captions the two share
    one(batches[1])
    two(batches[0])
    assert one.text_cache.keys() == two.text_cache.keys()
    assert all(torch.equal(one.text_cache[k], two.text_cache[k]) for k in one.text_cache)
