"""The robust fine-tuning baselines (trainer.baselines): each loss against a per-sample reference written
plainly here, Lipsum's random texts, CaRot's teacher schedule, LP-FT's probe, and each method end to end
(with `trainer wise`, `--resume` and exact gradient accumulation). Two processes: test_distributed.py.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file

from trainer.baselines import (
    CarotOptions,
    LpftOptions,
    carot_momentum,
    context_embeddings,
    random_tokens,
    train_probe,
)
from trainer.config import build_config
from trainer.errors import ConfigError
from trainer.heads import initial_head
from trainer.losses import context_kl_loss, lipsum_loss, orthogonality_loss, self_distillation_loss
from trainer.methods import METHODS, get_method
from trainer.model import FineTuner, build_clip, make_teacher
from trainer.step import TeacherFeatures, backward_step
from trainer.train import train

BASELINES = ("lipsum", "carot", "carft", "lpft")


def _unit(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(
        torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1
    ).float()


# --- losses against per-sample references --------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lipsum_loss_matches_a_per_sample_reference(seed):
    n, m, d, s = 6, 5, 16, 100.0
    f, f0, t = _unit(n, d, seed=seed), _unit(n, d, seed=seed + 10), _unit(m, d, seed=seed + 20)
    total = 0.0
    for i in range(n):
        per = 0.0
        for j in range(m):
            a = s * sum(float(f[i, k]) * float(t[j, k]) for k in range(d))
            b = s * sum(float(f0[i, k]) * float(t[j, k]) for k in range(d))
            per += (a - b) ** 2
        total += per / (2 * m)
    assert float(lipsum_loss(f, f0, t, s)) == pytest.approx(total / n, rel=1e-5)
    assert float(lipsum_loss(f, f, t, s)) == 0.0  # no gap to itself


def test_orthogonality_loss_matches_a_per_entry_reference():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 5, generator=g) * 0.3
    total = 0.0
    for a in range(5):
        for b in range(5):
            gram = sum(float(w[k, a]) * float(w[k, b]) for k in range(12))
            total += (gram - (1.0 if a == b else 0.0)) ** 2
    assert float(orthogonality_loss(w)) == pytest.approx(math.sqrt(total), rel=1e-5)
    q, _ = torch.linalg.qr(torch.randn(12, 5, generator=g))  # orthonormal columns: WᵀW = I
    assert float(orthogonality_loss(q)) < 1e-5


def _softmax(xs):
    mx = max(xs)
    e = [math.exp(x - mx) for x in xs]
    return [v / sum(e) for v in e]


@pytest.mark.parametrize("seed", [0, 1])
def test_self_distillation_matches_a_per_sample_reference(seed):
    n, d, s, t_s = 5, 8, 30.0, 20.0
    u, v = _unit(n, d, seed=seed), _unit(n, d, seed=seed + 1)
    u0, v0 = _unit(n, d, seed=seed + 2), _unit(n, d, seed=seed + 3)

    def dot(a, b, i, j):
        return sum(float(a[i, k]) * float(b[j, k]) for k in range(d))

    rows = cols = 0.0
    for i in range(n):
        p = _softmax([t_s * dot(u0, v0, i, j) for j in range(n)])
        q = _softmax([s * dot(u, v, i, j) for j in range(n)])
        rows += -sum(p[j] * math.log(q[j]) for j in range(n))
        p = _softmax([t_s * dot(u0, v0, j, i) for j in range(n)])  # text i against every image
        q = _softmax([s * dot(u, v, j, i) for j in range(n)])
        cols += -sum(p[j] * math.log(q[j]) for j in range(n))
    expected = rows / n + cols / n  # the two directions added
    assert float(self_distillation_loss(u, v, s, u0, v0, t_s)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_context_kl_matches_a_per_sample_reference(direction):
    n, k, d, s = 4, 7, 8, 50.0
    f, f0, w = _unit(n, d, seed=3), _unit(n, d, seed=4), _unit(k, d, seed=5)
    total = 0.0
    for i in range(n):
        q = _softmax([s * sum(float(f[i, a]) * float(w[c, a]) for a in range(d)) for c in range(k)])
        p = _softmax([s * sum(float(f0[i, a]) * float(w[c, a]) for a in range(d)) for c in range(k)])
        if direction == "reverse":
            p, q = q, p
        total += sum(p[c] * math.log(p[c] / q[c]) for c in range(k))
    got = float(context_kl_loss(f, f0, w, s, direction))
    assert got == pytest.approx(total / n, rel=1e-5)


def test_the_teacher_side_of_each_loss_takes_no_gradient():
    f, f0, t = _unit(4, 8, seed=0).requires_grad_(), _unit(4, 8, seed=1).requires_grad_(), _unit(3, 8, seed=2)
    (lipsum_loss(f, f0, t, 10.0) + context_kl_loss(f, f0, t, 10.0)).backward()
    assert f.grad is not None and f0.grad is None
    u0, v0 = _unit(4, 8, seed=3).requires_grad_(), _unit(4, 8, seed=4).requires_grad_()
    self_distillation_loss(f, _unit(4, 8, seed=5), 10.0, u0, v0, 10.0).backward()
    assert u0.grad is None and v0.grad is None


# --- Lipsum's random texts ----------------------------------------------------------------------------


def test_random_texts_have_the_authors_shape_and_depend_on_seed_and_step_only():
    tokens = random_tokens(seed=0, step=5, num=80, length=8, vocab=49408, context=77)
    assert tokens.shape == (80, 77)
    assert (tokens[:, 0] == 49406).all() and (tokens[:, 9] == 49407).all()  # start, 8 tokens, end
    assert (tokens[:, 10:] == 0).all()  # padding
    body = tokens[:, 1:9]
    assert int(body.min()) >= 0 and int(body.max()) < 49406  # no start/end token inside
    assert len({tuple(r) for r in body.tolist()}) == 80  # 80 distinct texts
    assert torch.equal(tokens, random_tokens(0, 5, 80, 8, 49408, 77))  # any process, a resumed run
    assert not torch.equal(tokens, random_tokens(0, 6, 80, 8, 49408, 77))  # a new draw every step
    assert not torch.equal(tokens, random_tokens(1, 5, 80, 8, 49408, 77))
    with pytest.raises(ConfigError, match="text_length"):
        random_tokens(0, 0, 2, 76, 49408, 77)


def test_lipsum_embeds_its_texts_once_a_step_and_trains_only_the_image_tower_and_head(
    tiny_config, monkeypatch
):
    from trainer import baselines

    calls = []
    real = baselines.random_tokens
    monkeypatch.setattr(baselines, "random_tokens", lambda *a: calls.append(a) or real(*a))
    run = train(build_config(tiny_config, ["method=lipsum", "total_steps=3", "grad_accum=2", "name=lip"]))
    assert [c[1] for c in calls] == [0, 1, 2]  # one draw per optimizer step, not per micro-batch
    assert all(c[2:4] == (80, 8) for c in calls)  # M = 80 texts of 8 tokens
    start = load_file(str(run / "checkpoints" / "head0.safetensors"))
    last = load_file(str(run / "checkpoints" / "last.safetensors"))
    set_seed(0)  # the run's seed: the same random init
    first = build_clip(tiny_config["model"], None)[0].state_dict()
    moved = {k for k in last if not torch.equal(last[k], first[k])}
    assert moved and all(k.startswith("visual.") for k in moved)  # the text tower and the scale stay
    assert set(start) == {"weight"}  # no bias; the scale s0 is fixed outside the weights
    assert torch.allclose(start["weight"].norm(dim=1), torch.ones(4), atol=1e-5)


# --- CaRot's teacher -----------------------------------------------------------------------------------


def test_carot_momentum_ramps_linearly_over_the_first_fifth_then_holds():
    o = CarotOptions()
    assert carot_momentum(0, 1000, o) == pytest.approx(0.05)
    assert carot_momentum(100, 1000, o) == pytest.approx(0.05 + 0.85 * 0.5)
    assert carot_momentum(200, 1000, o) == pytest.approx(0.9)
    assert carot_momentum(999, 1000, o) == pytest.approx(0.9)


def test_carot_teacher_is_averaged_every_n_steps_with_the_scheduled_momentum(tiny_config, monkeypatch):
    from trainer import baselines

    seen = []
    real = baselines._carot_after_step

    def spy(state, clip, step, total):
        before = {k: v.clone() for k, v in state["teacher"].state_dict().items()}
        student = {k: v.detach().clone() for k, v in clip.state_dict().items()}
        real(state, clip, step, total)
        after = {k: v.clone() for k, v in state["teacher"].state_dict().items()}
        seen.append((step, total, before, student, after))

    monkeypatch.setitem(METHODS, "carot", dataclasses.replace(get_method("carot"), after_step=spy))
    opts = ["method=carot", "total_steps=5", "name=carot", "method_options.teacher_every=2"]
    train(build_config(tiny_config, opts))
    assert [s for s, *_ in seen] == [0, 1, 2, 3, 4]
    for step, total, before, student, after in seen:
        name = "visual.proj"
        if step % 2:
            assert torch.equal(after[name], before[name])  # not an averaging step
            continue
        m = carot_momentum(step, total, CarotOptions(teacher_every=2))
        assert torch.allclose(after[name], m * before[name] + (1 - m) * student[name], atol=1e-6)


def test_carot_needs_a_projection_matrix(tiny_config, tmp_path):
    cfg = build_config(tiny_config, ["method=carot", "name=c", "method_options.bogus=1"])
    with pytest.raises(ConfigError, match="method_options: unknown config key 'bogus'"):
        train(cfg)
    assert not (tmp_path / "runs" / "c").exists()  # checked before anything is written


# --- LP-FT's probe -------------------------------------------------------------------------------------


def test_probe_fits_separable_features_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    centres = _unit(3, 16, seed=9)
    labels = torch.arange(60) % 3
    feats = torch.nn.functional.normalize(centres[labels] + 0.1 * torch.randn(60, 16, generator=g), dim=-1)
    opts = LpftOptions(probe_epochs=50, probe_lr=1e-2, probe_batch_size=16)
    a, b = train_probe(feats, labels, 3, opts, seed=1), train_probe(feats, labels, 3, opts, seed=1)
    assert torch.equal(a["weight"], b["weight"]) and torch.equal(a["bias"], b["bias"])
    assert (feats @ a["weight"].T + a["bias"]).argmax(1).eq(labels).all()


def test_probe_features_reach_the_model_on_its_device(tiny_clip, image_data):
    """On a GPU the loader's batches are on cuda and the model may not be; image_features moves each batch
    to the model. Here the model sits on the meta device, which a CPU batch cannot enter unmoved."""
    from tests.conftest import CLASSES_A
    from trainer.baselines import image_features
    from trainer.config import DataSpec
    from trainer.data.sets import load_image_set

    class OnMeta(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1, device="meta"))
            self.seen: list[str] = []

        def encode_image(self, x, normalize=False):
            self.seen.append(x.device.type)
            return torch.ones(len(x), 4)

    _, preprocess, _ = build_clip(str(tiny_clip), None)
    image_set = load_image_set(DataSpec(path=str(image_data["train"]), classes=CLASSES_A), "simple")
    model = OnMeta()
    feats = image_features(model, image_set, preprocess, None, batch_size=8)
    assert feats.shape == (len(image_set), 4) and model.seen == ["meta"] * math.ceil(len(image_set) / 8)


def test_lpft_starts_stage_two_from_its_probe(tiny_config):
    opts = ["method=lpft", "total_steps=2", "name=lpft", "method_options.probe_epochs=3"]
    run = train(build_config(tiny_config, opts))
    start = load_file(str(run / "checkpoints" / "head0.safetensors"))
    assert set(start) == {"weight", "bias"} and start["bias"].abs().sum() > 0  # trained, not zero-shot
    summary = json.loads((run / "run.json").read_text())["method_state"]
    assert 0 <= summary["probe_train_top1"] <= 100


def test_carft_contexts_average_each_template_over_the_classes(tiny_clip):
    from trainer.data import load_templates

    set_seed(0)
    clip, _, tokenizer = build_clip(str(tiny_clip), None)
    templates = load_templates(["a photo of a {c}.", "a sketch of a {c}."])
    ctx = context_embeddings(clip, tokenizer, ["cat", "dog", "cow"], templates)
    assert ctx.shape == (2, 32)
    with torch.no_grad():
        for k, t in enumerate(["a photo of a {}.", "a sketch of a {}."]):
            e = clip.encode_text(tokenizer([t.format(c) for c in ("cat", "dog", "cow")]), normalize=True)
            ref = torch.nn.functional.normalize(e.mean(0), dim=-1)
            assert torch.allclose(ctx[k], ref, atol=1e-5)


# --- every method end to end: resume, wise, accumulation ---------------------------------------------


def _method_overrides(name: str) -> list[str]:
    extra = {
        "carot": ["method_options.teacher_every=2", "caption_templates=simple"],
        "lpft": ["method_options.probe_epochs=2"],
    }
    return [f"method={name}", *extra.get(name, [])]


@pytest.mark.parametrize("name", BASELINES)
def test_resume_ends_where_the_uninterrupted_run_ends(tiny_config, name):
    base = _method_overrides(name) + ["checkpoint_every=1"]
    full = train(build_config(tiny_config, base + [f"name={name}-full"]))
    part = train(build_config(tiny_config, base + [f"name={name}-part", "max_steps=3"]))
    assert json.loads((part / "metrics.json").read_text())["complete"] is False
    resumed = train(build_config(tiny_config, base + [f"name={name}-part"]), resume=True)
    for file in ("last.safetensors",) + (() if name == "carot" else ("last.head.safetensors",)):
        a, b = load_file(str(full / "checkpoints" / file)), load_file(str(resumed / "checkpoints" / file))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, file, k)
    ma = json.loads((full / "metrics.json").read_text())
    mb = json.loads((resumed / "metrics.json").read_text())
    assert mb["complete"] and mb["final"] == ma["final"]


@pytest.mark.parametrize("name", BASELINES)
def test_wise_interpolates_from_the_head_the_run_started_from(tiny_config, name):
    from trainer.wise import wise

    run = train(build_config(tiny_config, _method_overrides(name) + [f"name={name}-w"]))
    one = json.loads((wise(run, 1.0) / "metrics.json").read_text())["final"]
    assert one == json.loads((run / "metrics.json").read_text())["final"]
    zero = json.loads((wise(run, 0.0) / "metrics.json").read_text())["final"]
    if name in ("lipsum", "carft", "carot"):  # zero-shot encoder and zero-shot head: the zero-shot model
        zs = train(build_config(tiny_config, ["method=zeroshot", f"name=zs-{name}"]))
        expected = json.loads((zs / "metrics.json").read_text())["final"]
        for s in expected:
            assert zero[s]["top1"] == pytest.approx(expected[s]["top1"])
    else:  # lpft: the zero-shot encoder with the probe
        assert zero["val"]["n"] == one["val"]["n"]


def _grads(tiny_clip, name: str, k: int, image_data) -> tuple[dict, dict]:
    """One optimizer step's gradients of a method with its batch split into k micro-batches."""
    from trainer.data import load_image_set

    set_seed(0)
    clip, preprocess, tokenizer = build_clip(str(tiny_clip), None)
    cfg = build_config({"data": {"train": {"path": "x.csv"}}}, _method_overrides(name) + ["templates=simple"])
    spec = get_method(name)
    teacher_model = make_teacher(clip)
    train_set = load_image_set(cfg.data.train.model_copy(update={"path": str(image_data["train"]),
                               "classes": str(image_data["classes_a"])}), "simple")  # fmt: skip
    state = spec.setup(cfg, train_set, clip, preprocess, tokenizer, accelerator=None) if spec.setup else {}
    state["teacher"] = teacher_model
    head = initial_head(spec, clip, tokenizer, train_set, state)
    with torch.no_grad():  # move the student away from the teacher so the regulariser has a gradient
        g = torch.Generator().manual_seed(3)
        for p in clip.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model = FineTuner(clip, head)
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([0, 0, 1, 1, 2, 0, 3, 1])
    batch = {
        "image": torch.randn(8, 3, 32, 32, generator=g),
        "label": labels,
        "index": torch.arange(8),
        "caption": tokenizer([f"a photo of a c{int(y)}." for y in labels]),
    }
    micro = [{key: v[j::k] for key, v in batch.items()} for j in range(k)]
    teacher = TeacherFeatures(teacher_model, cache_text=False, text_key=spec.teacher_text)
    terms = backward_step(
        model, micro, spec, cfg, Accelerator(cpu=True), teacher, 1.0, 0.5, step=1, state=state
    )
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, terms


@pytest.mark.parametrize("name", BASELINES)
def test_accumulated_gradient_equals_the_full_batch_gradient(tiny_clip, image_data, name):
    full, full_terms = _grads(tiny_clip, name, 1, image_data)
    acc, acc_terms = _grads(tiny_clip, name, 4, image_data)
    assert full.keys() == acc.keys()
    if name != "carot":  # head methods: frozen text tower and logit scale receive no gradient
        assert full and all(k.startswith(("clip.visual.", "head.")) for k in full), sorted(full)
    else:  # every CLIP parameter trains, the projection's orthogonality included
        assert "clip.visual.proj" in full and "clip.text_projection" in full
    for key, g in full.items():
        rel = (acc[key] - g).norm() / g.norm().clamp_min(1e-12)
        assert rel < 1e-5, (name, key, float(rel))
    for term in ("loss", "contrastive_loss", "reg_loss"):
        assert float(acc_terms[term]) == pytest.approx(float(full_terms[term]), rel=1e-5, abs=1e-7)
