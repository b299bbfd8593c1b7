"""open_clip models: build from a name or config JSON, load weights, wrap for training, frozen teacher.

    from trainer.model import build_clip; clip, preprocess, tokenizer = build_clip("tiny.json", None)

`pretrained` is an open_clip tag (downloads; users with a network), a local .safetensors file, or a
.pt/.bin checkpoint read with torch.load(weights_only=True). Nothing runs remote code.

`encode_text` runs a CLIP text tower on the batch's longest caption instead of the whole context where
that is exact (see `trims_text`); every text forward of training (student and teacher) goes through it.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.factory import load_checkpoint
from open_clip.transform import PreprocessCfg, image_transform_v2
from open_clip.transformer import text_global_pool
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


def trims_text(clip: nn.Module) -> bool:
    """Whether `clip`'s text tower gives the same features on captions cut after their end-of-text token.

    True for open_clip's CLIP text tower with a causal mask and end-of-text pooling (argmax or eos): the
    pooled position sees only the tokens before it, so the padding after the batch's longest caption never
    reaches a feature (nor a gradient). Any other tower (no causal mask, first/last/mean pooling, a custom
    text model) runs on the full context."""
    return (
        isinstance(clip, open_clip.CLIP)
        and getattr(clip, "attn_mask", None) is not None
        and getattr(clip, "text_pool_type", None) in ("argmax", "eos")
    )


TEXT_MULTIPLE = 8  # trimmed lengths are rounded up to this: few distinct shapes, and batch splits agree


def text_lengths(clip: nn.Module, text: torch.Tensor) -> torch.Tensor:
    """(b,) tokens each row needs: one past its pooled (end-of-text) position, rounded up to
    `TEXT_MULTIPLE` and at most the context."""
    if clip.text_pool_type == "argmax":
        pooled = text.argmax(dim=-1)
    else:
        pooled = (text == clip.text_eos_id).int().argmax(dim=-1)
    rounded = (pooled + TEXT_MULTIPLE) // TEXT_MULTIPLE * TEXT_MULTIPLE
    return rounded.clamp(max=text.shape[1])


def text_length(clip: nn.Module, text: torch.Tensor) -> int:
    """Tokens the batch needs: its longest row's `text_lengths`.

    Rounded up so that a batch and its micro-batches (gradient accumulation) mostly run at one length and
    compute the same floating-point sums, and a compiled tower sees few shapes."""
    return int(text_lengths(clip, text).max()) if text.shape[0] else text.shape[1]


def encode_text(
    clip: nn.Module, text: torch.Tensor, normalize: bool = False, trim: bool = True
) -> torch.Tensor:
    """open_clip's `clip.encode_text(text)`, on the batch's longest caption where that is exact.

    With `trim` and a tower `trims_text` accepts, the tokens, positional embedding and causal mask are cut
    to `text_length` positions (captions are ~10-20 tokens of a 77-token context); otherwise, or when
    nothing would be cut, open_clip's own path runs."""
    if not (trim and trims_text(clip)):
        return clip.encode_text(text, normalize=normalize)
    n = text_length(clip, text)
    if n >= text.shape[1]:
        return clip.encode_text(text, normalize=normalize)
    text = text[:, :n]
    dtype = clip.transformer.get_cast_dtype()
    h = clip.token_embedding(text).to(dtype) + clip.positional_embedding[:n].to(dtype)
    h = clip.ln_final(clip.transformer(h, attn_mask=clip.attn_mask[:n, :n]))
    h = text_global_pool(h, text, clip.text_pool_type, eos_token_id=clip.text_eos_id)
    proj = clip.text_projection
    if proj is not None:
        h = proj(h) if isinstance(proj, nn.Linear) else h @ proj
    return F.normalize(h, dim=-1) if normalize else h


class TrimmedText:
    """`clip` seen through its text tower only, with `encode_text` trimmed where exact: what open_clip's
    `build_zero_shot_classifier` calls, so zero-shot heads skip the padding too."""

    def __init__(self, clip: nn.Module):
        self.clip = clip

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return encode_text(self.clip, text, normalize=normalize)


class ScaledLinear(nn.Linear):
    """A linear classification head whose logits are `scale` × (W f + b); the scale is fixed (not a
    parameter, not in the state dict: the method says it), so the state dict is nn.Linear's."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, scale: float = 1.0):
        super().__init__(in_features, out_features, bias=bias)
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out if self.scale == 1.0 else self.scale * out


def linear_head(
    weight: torch.Tensor, bias: torch.Tensor | bool | None = True, scale: float = 1.0
) -> ScaledLinear:
    """A `ScaledLinear` head with these (C, D) weights; `bias`: a (C,) tensor, True (zeros) or False/None."""
    head = ScaledLinear(weight.shape[1], weight.shape[0], bias=bias is not None and bias is not False,
                        scale=scale)  # fmt: skip
    with torch.no_grad():
        head.weight.copy_(weight)
        if head.bias is not None:
            head.bias.copy_(bias if torch.is_tensor(bias) else torch.zeros(weight.shape[0]))
    return head


class FineTuner(nn.Module):
    """What the optimizer trains. One forward does everything a step needs, so DDP sees every use.

    Contrastive methods: forward(image, text) -> image and text features (text may stack captions and
    spurious captions). Methods with a classification head (ft, lipsum, carft, lpft; `trainer.heads`): a
    linear head on the normalised image features, `head(f)` its logits; the text tower is not trained.
    ft's head is the reference's (WiSE-FT's ClassificationHead): zero-shot class embeddings times the
    logit scale, so the scale is part of the weights AdamW moves; lipsum's and carft's keep the scale
    fixed outside the weights (`ScaledLinear.scale`).
    `trim_text`: run the text tower on the batch's longest caption where exact (`encode_text`).
    """

    def __init__(self, clip: nn.Module, head: torch.Tensor | nn.Linear | None = None, trim_text: bool = True):
        super().__init__()
        self.clip = clip
        self.trim_text = trim_text
        self.head: nn.Linear | None = None
        if isinstance(head, nn.Linear):
            self.head = head
        elif head is not None:  # (C, D) zero-shot class embeddings times the logit scale (ft)
            self.head = linear_head(head, bias=True)

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
            out["logits"] = self.head(out["image"])
        if text is not None:
            out["text"] = encode_text(self.clip, text, normalize=True, trim=self.trim_text)
        out["logit_scale"] = self.clip.logit_scale.exp()
        return out


def train_transform(clip: nn.Module) -> Callable:
    """open_clip's training transform for this model (RandomResizedCrop, scale (0.9, 1.0)), as FLYP and the
    StarFT reference train with; `build_clip` returns the evaluation transform."""
    return image_transform_v2(PreprocessCfg(**clip.visual.preprocess_cfg), is_train=True)


def make_teacher(clip: nn.Module) -> nn.Module:
    """A frozen copy: eval mode, no gradients, never given to the optimizer."""
    teacher = copy.deepcopy(clip).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def clamp_logit_scale(clip: nn.Module, max_scale: float = 100.0) -> None:
    with torch.no_grad():
        clip.logit_scale.clamp_(0, torch.log(torch.tensor(max_scale)).item())
