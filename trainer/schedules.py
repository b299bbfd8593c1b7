"""Schedules: the learning rate (linear warmup, cosine to 0) and StarFT's λ decay, as pure functions.

from trainer.schedules import cosine_lr; lr = cosine_lr(step, base=1e-5, warmup=500, total=10_000)
"""

from __future__ import annotations

import math

from trainer.config import TrainConfig


def cosine_lr(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warmup over `warmup` steps, then cosine from `base` to 0 at `total`; `step` counts from 0."""
    if step < warmup:
        return base * (step + 1) / warmup
    span = max(1, total - warmup)
    return 0.5 * base * (1 + math.cos(math.pi * (step - warmup) / span))


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """The run's learning rate at optimizer step `step` of `total`."""
    return cosine_lr(step, cfg.lr, cfg.warmup_steps, total)


def lam_at(step: int, epoch: int, cfg: TrainConfig, total: int, epochs: int) -> float:
    """lambda_e = lam (1 - (e+1)/E) per epoch (the reference code), or per step, or constant."""
    if cfg.lam_decay == "epoch":
        return cfg.lam * (1 - (epoch + 1) / epochs)
    if cfg.lam_decay == "step":
        return cfg.lam * (1 - (step + 1) / total)
    return cfg.lam
