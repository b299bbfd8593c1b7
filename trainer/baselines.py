"""The robust fine-tuning baselines of the StarFT paper's comparison, on the trainer's one engine.

    trainer run -c configs/imagenet-vitb16-lipsum.yaml      # or --method lipsum | carot | carft | lpft

- lipsum (Lipsum-FT, Nam et al. 2024): cross-entropy on the zero-shot head (logits s·fᵀW, s fixed) plus
  the energy gap to the frozen model along M random texts (`trainer.losses.lipsum_loss`).
- carot (CaRot, Oh et al. 2024): FLYP's contrastive loss + orthogonality of the visual projection +
  self-distillation from a teacher averaged from the student every `teacher_every` steps; captions drawn
  from all templates (`caption_templates: openai` in its recipe).
- carft (CAR-FT, Mao et al. 2022): cross-entropy + the KL between the frozen and the fine-tuned model's
  distributions over prompt contexts. No official code: the choices (β, temperature, KL direction) are
  options with the defaults stated at `CarftOptions`.
- lpft (LP-FT, Kumar et al. 2022): a linear probe on frozen features first, then full fine-tuning with
  cross-entropy from that head.
Their options are `method_options` (validated before anything is written); their weights default to the
authors' ImageNet ViT-B/16 settings (configs/imagenet-vitb16-<method>.yaml holds the rest of each
recipe). What each author's code does, and where this follows or departs from it: docs/baselines.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from trainer.checkpoints import HEAD0
from trainer.data import load_templates
from trainer.errors import ConfigError
from trainer.evaluate import make_eval_sets, zero_shot_head
from trainer.losses import context_kl_loss, lipsum_loss, orthogonality_loss, self_distillation_loss
from trainer.methods import MethodSpec, StepContext, method_options
from trainer.model import encode_text
from trainer.schedules import cosine_lr


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _autocast(ctx: StepContext):
    return ctx.accelerator.autocast() if ctx.accelerator is not None else contextlib.nullcontext()


def _weighted(ctx: StepContext, loss: torch.Tensor, reg: torch.Tensor, lam: float) -> torch.Tensor:
    """L = loss + w·reg, w the method's own weight (its options' `lam`); StarFT's decayed λ is not used."""
    return loss + ctx.state["options"].lam * reg


# --- Lipsum-FT -----------------------------------------------------------------------------------------


class LipsumOptions(_Options):
    """`method_options` of lipsum (defaults: the authors' ImageNet ViT-B/16 run)."""

    lam: float = Field(1.0, ge=0, description="weight of the energy-gap regulariser")
    num_texts: int = Field(80, gt=0, description="random texts per step (M)")
    text_length: int = Field(8, gt=0, description="random tokens per text, between start and end tokens")


def random_tokens(seed: int, step: int, num: int, length: int, vocab: int, context: int) -> torch.Tensor:
    """(num, context) token rows [start, r_1 … r_length, end, 0 …], r uniform over the ordinary tokens.

    The start and end tokens are the vocabulary's last two ids (open_clip's CLIP tokenizer: 49406, 49407),
    so r ~ U{0 … vocab − 3}. The draw depends on (seed, step) only: every process and micro-batch of a step,
    and a resumed run, get the same texts."""
    if length + 2 > context:
        raise ConfigError(f"method_options.text_length {length}: longer than the context ({context} - 2)")
    key = hashlib.sha256(f"lipsum-{seed}-{step}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)
    tokens = torch.zeros(num, context, dtype=torch.long)
    tokens[:, 0] = vocab - 2
    tokens[:, 1 : length + 1] = torch.randint(0, vocab - 2, (num, length), generator=g)
    tokens[:, length + 1] = vocab - 1
    return tokens


def _lipsum_setup(cfg, train_set, clip, preprocess, tokenizer, **_: Any) -> dict[str, Any]:
    opts = method_options(LIPSUM, cfg)
    s0 = float(clip.logit_scale.exp().item())
    # s: the zero-shot logit scale, fixed (100 for OpenAI CLIP), in the head and in the regulariser
    return {"options": opts, "scale": s0, "random_texts": (None, None)}


def lipsum_texts(ctx: StepContext) -> torch.Tensor:
    """(M, D) the step's random texts through the frozen text tower, normalised (once per step)."""
    step, feats = ctx.state["random_texts"]
    if step == ctx.step and feats is not None:
        return feats
    opts, teacher = ctx.state["options"], ctx.state["teacher"]
    vocab, context = teacher.token_embedding.num_embeddings, teacher.positional_embedding.shape[0]
    tokens = random_tokens(ctx.cfg.seed, ctx.step, opts.num_texts, opts.text_length, vocab, context)
    with torch.no_grad(), _autocast(ctx):
        feats = encode_text(teacher, tokens.to(ctx.image.device), normalize=True).float()
    ctx.state["random_texts"] = (ctx.step, feats)
    return feats


def _lipsum_term(ctx: StepContext) -> torch.Tensor:
    return lipsum_loss(ctx.image, ctx.teacher_image, lipsum_texts(ctx), ctx.state["scale"])


# --- CAR-FT --------------------------------------------------------------------------------------------


class CarftOptions(_Options):
    """`method_options` of carft. No official code exists; these defaults are ours:
    lam (β) 1: the regulariser weighs as much as the cross-entropy, the paper's form L = CE + β·KL at β = 1;
    scale null (the zero-shot logit scale, 100 for OpenAI CLIP): the temperature the contexts were
    learned at; direction forward, KL(p0 ‖ pθ): the zero-shot distribution is the target, as in
    distillation and in StarFT's own KL."""

    lam: float = Field(1.0, ge=0, description="β, weight of the context KL")
    scale: float | None = Field(None, gt=0, description="logit scale of the context distributions; null = s0")
    direction: Literal["forward", "reverse"] = Field(
        "forward", description="forward: KL(p0 ‖ pθ); reverse: KL(pθ ‖ p0)"
    )
    contexts: str | list[str] = Field("openai", description="templates whose contexts are compared")


def context_embeddings(clip: nn.Module, tokenizer, classes: list[str], templates: list) -> torch.Tensor:
    """(K, D): per template, the mean over classes of its normalised prompt embeddings, renormalised."""
    # zero_shot_head averages over its `templates` per `classes` entry: give it the templates as entries
    # and one filler per class name.
    per_class = [lambda k, c=c: templates[int(k)](c) for c in classes]
    return zero_shot_head(clip, tokenizer, [str(k) for k in range(len(templates))], per_class)


def _carft_setup(cfg, train_set, clip, preprocess, tokenizer, **_: Any) -> dict[str, Any]:
    opts = method_options(CARFT, cfg)
    s0 = float(clip.logit_scale.exp().item())
    templates = load_templates(opts.contexts)
    contexts = context_embeddings(clip, tokenizer, list(train_set.classes), templates)
    return {"options": opts, "scale": opts.scale or s0, "contexts": contexts}


def _carft_term(ctx: StepContext) -> torch.Tensor:
    st = ctx.state
    contexts = st["contexts"].to(ctx.image.device)
    return context_kl_loss(ctx.image, ctx.teacher_image, contexts, st["scale"], st["options"].direction)


# --- CaRot ---------------------------------------------------------------------------------------------


class CarotOptions(_Options):
    """`method_options` of carot (defaults: the authors' ImageNet ViT-B/16 command)."""

    orthogonality: float = Field(
        0.2, ge=0, description="λ_OC, weight of ‖WᵀW − I‖_F on the visual projection"
    )
    distillation: float = Field(1.5, ge=0, description="λ_SD, weight of the self-distillation loss")
    cross: float = Field(0.0, ge=0, description="weight of ‖W_v W_tᵀ‖_F (the authors' command: 0.05)")
    teacher_every: int = Field(500, gt=0, description="steps between teacher averages (step 0 included)")
    momentum_start: float = Field(0.05, ge=0, le=1, description="teacher momentum m at step 0")
    momentum_end: float = Field(0.9, ge=0, le=1, description="m after the ramp")
    ramp: float = Field(0.2, ge=0, le=1, description="share of the steps over which m rises linearly")


def carot_momentum(step: int, total: int, opts: CarotOptions) -> float:
    """m at optimizer step `step` of `total`: linear from momentum_start to momentum_end over the first
    `ramp` share of the steps, then momentum_end."""
    span = opts.ramp * total
    if span <= 0 or step >= span:
        return opts.momentum_end
    return opts.momentum_start + (opts.momentum_end - opts.momentum_start) * step / span


def visual_projection(clip: nn.Module) -> torch.Tensor | None:
    """(D_in, D) the image tower's output projection W (features = pooled · W): a ViT's `visual.proj`; for
    open_clip's ModifiedResNet, its attention pool's output layer (`attnpool.c_proj.weight`ᵀ). None for
    other towers."""
    proj = getattr(clip.visual, "proj", None)
    if isinstance(proj, torch.Tensor):
        return proj
    c_proj = getattr(getattr(clip.visual, "attnpool", None), "c_proj", None)
    return c_proj.weight.T if isinstance(c_proj, nn.Linear) else None


def _carot_setup(cfg, train_set, clip, preprocess, tokenizer, **_: Any) -> dict[str, Any]:
    opts = method_options(CAROT, cfg)
    if visual_projection(clip) is None:
        raise ConfigError(
            f"method carot: model {cfg.model} has no visual projection matrix to keep orthogonal"
        )
    if opts.cross and not isinstance(getattr(clip, "text_projection", None), torch.Tensor):
        raise ConfigError(f"method_options.cross: model {cfg.model} has no text projection matrix")
    return {"options": opts, "teacher_updates": 0}


def _carot_term(ctx: StepContext) -> torch.Tensor:
    opts, clip = ctx.state["options"], ctx.clip
    proj = visual_projection(clip)
    proj = proj if ctx.param_pass else proj.detach()
    oc = orthogonality_loss(proj)
    terms = {"orthogonality": oc}
    reg = opts.orthogonality * oc
    if opts.cross:
        text_proj = clip.text_projection if ctx.param_pass else clip.text_projection.detach()
        cross = torch.linalg.matrix_norm(proj.float().T @ text_proj.float(), ord="fro")
        terms["cross"] = cross
        reg = reg + opts.cross * cross
    if ctx.step > 0:  # the authors skip it at step 0, where the teacher is the student
        teacher_scale = ctx.state["teacher"].logit_scale.exp().detach()
        sd = self_distillation_loss(
            ctx.image,
            ctx.out["caption"],
            ctx.logit_scale,
            ctx.teacher_image,
            ctx.teacher_caption,
            teacher_scale,
        )
        terms["distillation"] = sd
        reg = reg + opts.distillation * sd
    ctx.extras["log"] = {k: v.detach() for k, v in terms.items()}
    return reg


@torch.no_grad()
def _carot_after_step(state: dict[str, Any], clip: nn.Module, step: int, total: int) -> None:
    """ψ ← mψ + (1 − m)θ over the parameters, every `teacher_every` optimizer steps, step 0 included."""
    opts = state["options"]
    if step % opts.teacher_every:
        return
    m = carot_momentum(step, total, opts)
    for psi, theta in zip(state["teacher"].parameters(), clip.parameters(), strict=True):
        psi.mul_(m).add_(theta.detach().to(psi.dtype), alpha=1 - m)
    state["teacher_updates"] += 1


def _carot_save(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {f"teacher.{k}": v.detach().contiguous().cpu() for k, v in state["teacher"].state_dict().items()}


def _carot_load(state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    teacher = state["teacher"]
    own = {k.removeprefix("teacher."): v for k, v in tensors.items() if k.startswith("teacher.")}
    device = next(teacher.parameters()).device
    teacher.load_state_dict({k: v.to(device) for k, v in own.items()})


# --- LP-FT ---------------------------------------------------------------------------------------------


class LpftOptions(_Options):
    """`method_options` of lpft: the linear probe of stage 1 (stage 2 is the run's own settings). The
    authors' fork trains it with its fine-tuning loop (AdamW, cosine, clipping 1.0; ImageNet: 5 epochs) but
    published no probe lr: ours is set for heads on normalised features."""

    probe_epochs: int = Field(5, gt=0, description="epochs of the probe on the cached features")
    probe_lr: float = Field(1e-3, gt=0, description="AdamW peak learning rate of the probe (cosine to 0)")
    probe_weight_decay: float = Field(0.0, ge=0)
    probe_batch_size: int = Field(256, gt=0)


@torch.no_grad()
def image_features(clip: nn.Module, image_set, preprocess, accelerator, batch_size: int) -> torch.Tensor:
    """(N, D) normalised image features of every sample of `image_set` (evaluation transform), in sample
    order; the processes share the work (accelerate's loader) and each gets the whole table."""
    (es,) = make_eval_sets([image_set], preprocess, batch_size, accelerator)
    was_training = clip.training
    clip.eval()
    device = next(clip.parameters()).device
    feats, index = [], []
    for batch in es.loader:
        with accelerator.autocast() if accelerator is not None else contextlib.nullcontext():
            f = clip.encode_image(batch["image"].to(device), normalize=True).float()
        i = batch["index"]
        if accelerator is not None:
            f, i = accelerator.gather_for_metrics((f, i))
        feats.append(f.cpu())
        index.append(i.cpu())
    clip.train(was_training)
    out = torch.empty(len(image_set), feats[0].shape[1])
    out[torch.cat(index)] = torch.cat(feats)
    return out


def train_probe(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, opts: LpftOptions, seed: int
) -> dict[str, torch.Tensor]:
    """A linear head (weight (C, D), bias (C,)) trained with cross-entropy on fixed features: random
    weights (nn.Linear's init from `seed`), zero bias, AdamW with a cosine schedule and gradient clipping
    at 1.0 over seeded shuffles. Deterministic."""
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(features.shape[1], num_classes)
    with torch.no_grad():
        bound = 1 / features.shape[1] ** 0.5
        head.weight.copy_(torch.rand(head.weight.shape, generator=g) * 2 * bound - bound)
        head.bias.zero_()
    opt = torch.optim.AdamW(head.parameters(), lr=opts.probe_lr, weight_decay=opts.probe_weight_decay)
    n = len(features)
    per_epoch = math.ceil(n / opts.probe_batch_size)
    total, step = opts.probe_epochs * per_epoch, 0
    for _ in range(opts.probe_epochs):
        order = torch.randperm(n, generator=g)
        for j in range(0, n, opts.probe_batch_size):
            idx = order[j : j + opts.probe_batch_size]
            loss = F.cross_entropy(head(features[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, opts.probe_lr, 0, total)
            opt.step()
            step += 1
    return {"weight": head.weight.detach().clone(), "bias": head.bias.detach().clone()}


def _lpft_setup(cfg, train_set, clip, preprocess, tokenizer, accelerator=None, run_dir=None, **_: Any):
    opts = method_options(LPFT, cfg)
    saved = Path(run_dir) / "checkpoints" / HEAD0 if run_dir is not None else None
    if saved is not None and saved.is_file():  # a resumed run: its probe, trained once
        from safetensors.torch import load_file

        return {"options": opts, "probe": load_file(str(saved))}
    feats = image_features(clip, train_set, preprocess, accelerator, cfg.eval_batch_size)
    labels = torch.as_tensor(train_set.labels, dtype=torch.long)
    probe = train_probe(feats, labels, len(train_set.classes), opts, cfg.seed)
    with torch.no_grad():
        acc = (feats @ probe["weight"].T + probe["bias"]).argmax(1).eq(labels).float().mean().item()
    return {"options": opts, "probe": probe, "summary": {"probe_train_top1": round(100 * acc, 2)}}


# --- the specs -----------------------------------------------------------------------------------------

LIPSUM = MethodSpec(
    "lipsum", "ce", needs_teacher=True, reg_term=_lipsum_term, setup=_lipsum_setup, combine=_weighted,
    head="scaled", options=LipsumOptions,
)  # fmt: skip
CARFT = MethodSpec(
    "carft", "ce", needs_teacher=True, reg_term=_carft_term, setup=_carft_setup, combine=_weighted,
    head="scaled", options=CarftOptions,
)  # fmt: skip
CAROT = MethodSpec(
    "carot", "contrastive", needs_teacher=True, reg_term=_carot_term, setup=_carot_setup,
    combine=lambda ctx, lc, reg, lam: lc + reg, teacher_text="caption", teacher_changes=True,
    after_step=_carot_after_step, save_tensors=_carot_save,
    load_tensors=_carot_load, options=CarotOptions,
)  # fmt: skip
LPFT = MethodSpec("lpft", "ce", setup=_lpft_setup, head="probe", options=LpftOptions)
METHODS = (LIPSUM, CAROT, CARFT, LPFT)  # registered by trainer.methods.get_method
