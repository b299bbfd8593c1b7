"""Collate: stack images, tokenize captions, stack per-sample extras (picklable for DataLoader workers).

from trainer.data.collate import Collate; loader = DataLoader(ds, batch_size=8, collate_fn=Collate(tok))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class Collate:
    """Stacks images and tokenizes caption strings (picklable for DataLoader workers)."""

    def __init__(self, tokenizer: Callable[[list[str]], torch.Tensor] | None = None):
        self.tokenizer = tokenizer

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        out = {
            "image": torch.stack([it["image"] for it in items]),
            "label": torch.tensor([it["label"] for it in items], dtype=torch.long),
            "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
        }
        for key in ("caption", "spurious"):
            if key in items[0] and self.tokenizer is not None:
                out[key] = self.tokenizer([it[key] for it in items])
        for key, value in items[0].items():  # per-sample extras (tensors) are stacked
            if key not in out and isinstance(value, torch.Tensor):
                out[key] = torch.stack([it[key] for it in items])
        return out
