"""Methods: what each `--method` optimises, as a small `MethodSpec`, and the registry that names them.

    from trainer.methods import get_method; spec = get_method("starft")

A method is its objective (contrastive: FLYP's CLIP loss; ce: cross-entropy on a zero-shot-initialised
head; none: evaluate only) plus an optional extra loss term, a function of a `StepContext` that sees the
global batch's features. `trainer.step.compute_losses` is the only caller of these hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from trainer.config import TrainConfig
from trainer.errors import ConfigError
from trainer.losses import star_loss

# A function the model's forward calls as extra(clip, image) -> named outputs (e.g. RaVL's regions), so
# that DDP sees every use of the parameters in one forward.
ForwardExtra = Callable[[torch.nn.Module, torch.Tensor], dict[str, torch.Tensor]]


@dataclass
class StepContext:
    """What an extra loss term sees: the global batch (every micro-batch of the step, every process).

    `batch` holds its per-sample data (label, index, a method's sample extras) and `out` the student's
    per-sample features (image, caption, spurious, a method's extra outputs), gathered by trainer.step.
    """

    cfg: TrainConfig
    batch: dict[str, torch.Tensor]  # (N, ...) per-sample data of the global batch
    out: dict[str, Any]  # (N·k, D) student features of the global batch, with gradient
    image: torch.Tensor  # (N, D) student image features, global batch, with gradient
    labels: torch.Tensor  # (N,)
    spurious: torch.Tensor | None = None  # (N, D) student spurious-caption features
    teacher_image: torch.Tensor | None = None
    teacher_spurious: torch.Tensor | None = None
    kl_scale: float = 1.0
    step: int = 0
    epoch: int = 0
    accelerator: Any = None
    state: dict[str, Any] = field(default_factory=dict)  # what the method's `setup` returned
    extras: dict[str, Any] = field(default_factory=dict)  # extras["log"]: more named terms to log


@dataclass(frozen=True)
class MethodSpec:
    """A method: its objective plus optional hooks (all default to plain L = L_C + λ·reg).

    setup(cfg, train_set, clip, preprocess, tokenizer) -> state: runs once before training (e.g. labels the
    regions of the training set); state["sample_extras"] maps a batch key to a (N, ...) tensor indexed by
    sample. forward_extra(batch, state) -> a `ForwardExtra` the model's forward calls.
    combine(ctx, L_C, reg, λ) -> loss.
    """

    name: str
    objective: Literal["contrastive", "ce", "none"]
    needs_spurious: bool = False
    needs_teacher: bool = False
    reg_term: Callable[[StepContext], torch.Tensor] | None = None
    freeze_text: bool = False  # train the image tower only (and keep the logit scale)
    setup: Callable[..., dict[str, Any]] | None = None
    forward_extra: Callable[[dict[str, torch.Tensor], dict[str, Any]], ForwardExtra] | None = None
    combine: Callable[[StepContext, torch.Tensor, torch.Tensor, float], torch.Tensor] | None = None


def star_term(ctx: StepContext) -> torch.Tensor:
    """StarFT's L_Star: KL to the frozen model over spurious captions, same-label pairs masked."""
    return star_loss(
        ctx.image, ctx.spurious, ctx.teacher_image, ctx.teacher_spurious, ctx.labels, ctx.kl_scale
    )


def kl_term(ctx: StepContext) -> torch.Tensor:
    """The paper's ablation: the same KL without the same-label mask."""
    return star_loss(
        ctx.image,
        ctx.spurious,
        ctx.teacher_image,
        ctx.teacher_spurious,
        ctx.labels,
        ctx.kl_scale,
        mask_same_label=False,
    )


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("zeroshot", "none"),
        MethodSpec("ft", "ce"),
        MethodSpec("flyp", "contrastive"),
        MethodSpec("starft", "contrastive", needs_spurious=True, needs_teacher=True, reg_term=star_term),
        MethodSpec("kl", "contrastive", needs_spurious=True, needs_teacher=True, reg_term=kl_term),
    )
}


# RaVL's mitigation and its paper's comparison rows (VL-ERM, VL-GDRO on the discovered groups)
RAVL_METHODS = ("ravl", "vl_erm", "vl_gdro")


def get_method(name: str) -> MethodSpec:
    """The method called `name` (a ConfigError names the known ones)."""
    if name in RAVL_METHODS and name not in METHODS:
        # Here, not at the top: trainer.ravl.method builds on this module (MethodSpec, StepContext).
        from trainer.ravl.method import RAVL, VL_ERM, VL_GDRO

        METHODS.update({spec.name: spec for spec in (RAVL, VL_ERM, VL_GDRO)})
    if name not in METHODS:
        known = sorted({*METHODS, *RAVL_METHODS})
        raise ConfigError(f"unknown method {name!r} (known: {', '.join(known)})")
    return METHODS[name]
