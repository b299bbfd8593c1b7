"""Classification heads of the methods that train one (ft, lipsum, carft, lpft): where each starts.

    from trainer.heads import initial_head; head = initial_head(spec, clip, tokenizer, train_set, state)

Every head reads the normalised image features and gives logits (a `ScaledLinear`):
- `folded` (ft, the WiSE-FT reference's ClassificationHead): zero-shot class embeddings times the zero-shot
  logit scale, zero bias; the scale is in the weights AdamW moves.
- `scaled` (lipsum, carft, as Lipsum-FT's code): the unit zero-shot class embeddings, no bias, logits times
  the zero-shot logit scale s0, fixed.
- `probe` (lpft): the linear probe the method's setup trained on frozen features.
`trainer.train` writes the head a run starts from to checkpoints/head0.safetensors; `trainer wise`
interpolates from it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from trainer.data import ImageSet
from trainer.evaluate import zero_shot_head
from trainer.methods import MethodSpec
from trainer.model import ScaledLinear, linear_head


def head_scale(spec: MethodSpec, zero_shot_scale: float) -> float:
    """The fixed factor on a head's logits: s0 for a `scaled` head, else 1."""
    return zero_shot_scale if spec.head == "scaled" else 1.0


def initial_head(
    spec: MethodSpec,
    clip: nn.Module,
    tokenizer: Callable,
    train_set: ImageSet,
    state: dict | None = None,
) -> ScaledLinear | None:
    """The head `spec` starts from (None for a method without one), built from the zero-shot `clip`."""
    if spec.head is None:
        return None
    if spec.head == "probe":
        probe = (state or {})["probe"]
        return linear_head(probe["weight"], probe["bias"])
    s0 = float(clip.logit_scale.exp().item())
    zs = zero_shot_head(clip, tokenizer, train_set.classes, train_set.templates)  # (C, D), unit rows
    if spec.head == "folded":
        return linear_head(s0 * zs, bias=True)
    return linear_head(zs, bias=False, scale=head_scale(spec, s0))


def head_from_file(path: str | Path, scale: float = 1.0) -> ScaledLinear:
    """A head saved by `trainer.checkpoints.save_weights` (weight, optional bias)."""
    tensors = load_file(str(path))
    return linear_head(tensors["weight"], tensors.get("bias", False), scale=scale)
