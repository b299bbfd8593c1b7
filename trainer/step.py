"""One training step's loss terms: features of the global batch, the method's objective and extra term.

    from trainer.step import compute_losses; terms = compute_losses(model, batch, spec, cfg, acc, teacher, s, lam)

`compute_losses` runs the student's one forward, gathers features across processes with gradient (as
open_clip's ClipLoss does), takes the frozen teacher's features, and calls the pure loss functions of
trainer.losses. It returns the named terms (contrastive_loss, reg_loss, loss, and a method's extras).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed.nn
import torch.nn.functional as F

from trainer.config import TrainConfig
from trainer.losses import clip_loss
from trainer.methods import MethodSpec, StepContext


class TeacherFeatures:
    """Frozen zero-shot features of a micro-batch. One seam, so a cache keyed by `index` can replace it."""

    def __init__(self, teacher: torch.nn.Module):
        self.teacher = teacher

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.teacher.encode_image(batch["image"], normalize=True)
        text = self.teacher.encode_text(batch["spurious"], normalize=True)
        return image, text


def gather_with_grad(accelerator, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """All-gather keeping the autograd graph (torch.distributed.nn), as open_clip's ClipLoss does."""
    if accelerator is None or accelerator.num_processes == 1:
        return list(tensors)
    return [torch.cat(torch.distributed.nn.all_gather(t.contiguous()), dim=0) for t in tensors]


def compute_losses(
    model,
    batch: dict[str, torch.Tensor],
    method: MethodSpec,
    cfg: TrainConfig,
    accelerator,
    teacher: TeacherFeatures | None,
    kl_scale: float,
    lam: float,
    step: int = 0,
    epoch: int = 0,
    state: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """One micro-batch's loss terms over the global batch: contrastive_loss, reg_loss, loss (+ the
    method's extra logged terms)."""
    state = state or {}
    if method.objective == "ce":
        out = model(batch["image"])
        ce = F.cross_entropy(out["logits"].float(), batch["label"])
        return {"contrastive_loss": ce, "reg_loss": ce.detach() * 0, "loss": ce}
    n = batch["caption"].shape[0]
    text = torch.cat([batch["caption"], batch["spurious"]]) if method.needs_spurious else batch["caption"]
    extra = method.forward_extra(batch, state) if method.forward_extra else None
    out = model(batch["image"], text, extra=extra)
    image, caption = out["image"], out["text"][:n]
    g_image, g_caption = gather_with_grad(accelerator, image, caption)
    labels = accelerator.gather(batch["label"]) if accelerator.num_processes > 1 else batch["label"]
    lc = clip_loss(g_image, g_caption, out["logit_scale"], labels if cfg.positives == "label" else None)
    if method.reg_term is None:
        return {"contrastive_loss": lc, "reg_loss": lc.detach() * 0, "loss": lc}
    ctx = StepContext(
        cfg,
        batch,
        out,
        g_image,
        labels,
        kl_scale=kl_scale,
        step=step,
        epoch=epoch,
        accelerator=accelerator,
        state=state,
    )
    if method.needs_spurious:
        (ctx.spurious,) = gather_with_grad(accelerator, out["text"][n:])
    if method.needs_teacher and teacher is not None:
        with accelerator.autocast():
            t_image, t_spurious = teacher(batch)
        if accelerator.num_processes > 1:
            t_image, t_spurious = accelerator.gather(t_image), accelerator.gather(t_spurious)
        ctx.teacher_image, ctx.teacher_spurious = t_image, t_spurious
    reg = method.reg_term(ctx)
    loss = method.combine(ctx, lc, reg, lam) if method.combine else lc + lam * reg
    return {"contrastive_loss": lc, "reg_loss": reg, "loss": loss, **ctx.extras.get("log", {})}
