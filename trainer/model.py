"""open_clip models: build from a name or config JSON, load weights, wrap for training, frozen teacher.

    from trainer.model import build_clip; clip, preprocess, tokenizer = build_clip("tiny.json", None)

`pretrained` is an open_clip tag (downloads; users with a network), a local .safetensors file, or a
.pt/.bin checkpoint read with torch.load(weights_only=True). Nothing runs remote code.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.factory import load_checkpoint
from torch import nn

from trainer.errors import ConfigError

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def resolve_model_name(model: str) -> str:
    """An architecture name, or register a model-config JSON and return its stem."""
    if model.endswith(".json") or Path(model).is_file():
        path = Path(model)
        if not path.is_file():
            raise ConfigError(f"model: no such model-config file {path}")
        open_clip.add_model_config(path)
        return path.stem
    if model not in open_clip.list_models():
        raise ConfigError(
            f"model: unknown open_clip architecture {model!r} (or give a model-config .json path)"
        )
    return model


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local open_clip state dict (.safetensors or weights-only torch file) into `model`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"pretrained: no such weights file {path}")
    try:
        load_checkpoint(model, str(path), strict=True, weights_only=True)
    except (RuntimeError, KeyError, ValueError, OSError) as e:
        raise ConfigError(
            f"pretrained: {path} does not fit the model ({str(e).splitlines()[0][:200]})"
        ) from None


def build_clip(model: str, pretrained: str | None) -> tuple[nn.Module, Callable, Callable]:
    """(open_clip model, eval preprocess, tokenizer). Random init when `pretrained` is None."""
    name = resolve_model_name(model)
    is_file = pretrained is not None and (
        Path(pretrained).suffix in WEIGHT_SUFFIXES or Path(pretrained).exists()
    )
    tag = None if (pretrained is None or is_file) else pretrained
    if is_file:  # open_clip would warn "initialized randomly": the weights are loaded just below
        logging.disable(logging.WARNING)
    try:
        clip, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=tag)
    except RuntimeError as e:
        raise ConfigError(f"model {name}: {str(e).splitlines()[0][:200]}") from None
    finally:
        logging.disable(logging.NOTSET)
    if is_file:
        load_weights(clip, pretrained)  # type: ignore[arg-type]
    return clip, preprocess, open_clip.get_tokenizer(name)


class FineTuner(nn.Module):
    """What the optimizer trains. One forward does everything a step needs, so DDP sees every use.

    Contrastive methods: forward(image, text) -> image and text features (text may stack captions and
    spurious captions). `ft`: a linear head on the image features; the text tower is not trained.
    """

    def __init__(self, clip: nn.Module, head: torch.Tensor | None = None):
        super().__init__()
        self.clip = clip
        self.head: nn.Linear | None = None
        if head is not None:  # (C, D) zero-shot class embeddings
            self.head = nn.Linear(head.shape[1], head.shape[0], bias=True)
            with torch.no_grad():
                self.head.weight.copy_(head)
                self.head.bias.zero_()

    def forward(
        self,
        image: torch.Tensor,
        text: torch.Tensor | None = None,
        extra: Callable[[nn.Module, torch.Tensor], dict[str, torch.Tensor]] | None = None,
    ) -> dict[str, Any]:
        """Features for one step. `extra(clip, image)` adds a method's own outputs (RaVL: region
        embeddings) inside this forward, so DDP syncs their gradients too."""
        out: dict[str, Any] = {"image": self.clip.encode_image(image, normalize=True)}
        if extra is not None:
            out.update(extra(self.clip, image))
        if self.head is not None:
            # The zero-shot head scores normalised features at the model's scale; keep that parameterisation.
            out["logits"] = self.clip.logit_scale.exp().detach() * self.head(out["image"])
        if text is not None:
            out["text"] = self.clip.encode_text(text, normalize=True)
        out["logit_scale"] = self.clip.logit_scale.exp()
        return out


def make_teacher(clip: nn.Module) -> nn.Module:
    """A frozen copy: eval mode, no gradients, never given to the optimizer."""
    teacher = copy.deepcopy(clip).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def clamp_logit_scale(clip: nn.Module, max_scale: float = 100.0) -> None:
    with torch.no_grad():
        clip.logit_scale.clamp_(0, torch.log(torch.tensor(max_scale)).item())
