"""Text padding trimming (issue 20): the text tower on the batch's longest caption gives open_clip's
`encode_text` features and gradients, and the full path runs wherever trimming would not be exact.

.venv/bin/pytest tests/trainer/test_trim.py -q
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import TINY_CLIP
from trainer.model import (
    TEXT_MULTIPLE,
    FineTuner,
    build_clip,
    encode_text,
    text_length,
    text_lengths,
    trims_text,
)

# ViT-B-32's text tower (12 layers, width 512, 77 tokens) under a small image tower: the shape that matters
# here, at random init and in a second.
B32_TEXT = {
    "embed_dim": 512,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12},
}
CAPTIONS = [
    "a photo of a dog.",
    "a photo of a tench in the water.",
    "a bad photo of a cat on grass at dusk.",
    "x",
]


def _model(tmp_path, cfg: dict, name: str):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    torch.manual_seed(0)
    clip, _, tokenizer = build_clip(str(path), None)
    return clip.train(), tokenizer


def _features_and_grads(clip, tokens, trim: bool):
    clip.zero_grad(set_to_none=True)
    feats = encode_text(clip, tokens, normalize=True, trim=trim)
    weights = torch.randn(feats.shape, generator=torch.Generator().manual_seed(5))
    (feats * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in clip.named_parameters() if p.grad is not None}
    return feats.detach(), grads


@pytest.mark.parametrize("cfg", [TINY_CLIP, B32_TEXT], ids=["tiny", "vit-b-32-text"])
def test_trimmed_text_features_and_gradients_equal_open_clips_encode_text(tmp_path, cfg):
    clip, tokenizer = _model(tmp_path, cfg, "m")
    tokens = tokenizer(CAPTIONS)
    assert trims_text(clip) and text_length(clip, tokens) < tokens.shape[1]  # something is cut
    clip.zero_grad(set_to_none=True)
    ref = clip.encode_text(tokens, normalize=True)  # open_clip's own path, the full context
    weights = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5))
    (ref * weights).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in clip.named_parameters() if p.grad is not None}
    feats, grads = _features_and_grads(clip, tokens, trim=True)
    assert (feats - ref.detach()).abs().max() < 1e-5
    assert grads.keys() == ref_grads.keys() and "positional_embedding" in grads
    for name, g in ref_grads.items():  # within 1e-5 of the gradient's own scale (float32 sums differ)
        assert (grads[name] - g).abs().max() <= 1e-5 * g.abs().max().clamp_min(1), name


def test_the_cut_covers_the_furthest_end_of_text_token_rounded_up_to_a_multiple(tmp_path):
    clip, tokenizer = _model(tmp_path, TINY_CLIP, "tiny")
    tokens = tokenizer(CAPTIONS)
    eot = tokens.argmax(dim=-1)
    up = [min(-(-(int(e) + 1) // TEXT_MULTIPLE) * TEXT_MULTIPLE, tokens.shape[1]) for e in eot]
    assert text_lengths(clip, tokens).tolist() == up and text_length(clip, tokens) == max(up)
    assert text_length(clip, tokens[3:]) < text_length(clip, tokens)  # "x": a short caption, a short cut
    long = tokenizer(["word " * 40])  # past the context: the whole context
    assert text_length(clip, long) == long.shape[1] == 32


def test_towers_where_trimming_is_not_exact_run_the_full_context(tmp_path):
    for change in ({"no_causal_mask": True}, {"pool_type": "last"}):
        cfg = json.loads(json.dumps(TINY_CLIP))
        cfg["text_cfg"].update(change)
        clip, tokenizer = _model(tmp_path, cfg, "other")
        tokens = tokenizer(CAPTIONS)
        assert not trims_text(clip), change
        # bit for bit open_clip's path (a cut context would change these towers' features)
        assert torch.equal(encode_text(clip, tokens, trim=True), clip.encode_text(tokens)), change


def test_the_finetuner_trims_unless_told_not_to(tmp_path, monkeypatch):
    clip, tokenizer = _model(tmp_path, TINY_CLIP, "tiny")
    tokens = tokenizer(CAPTIONS)
    seen: list[int] = []
    real = clip.transformer.forward

    def spy(x, attn_mask=None):
        seen.append(x.shape[1])
        return real(x, attn_mask=attn_mask)

    monkeypatch.setattr(clip.transformer, "forward", spy)
    image = torch.randn(4, 3, 32, 32)
    a = FineTuner(clip)(image, tokens)["text"]
    b = FineTuner(clip, trim_text=False)(image, tokens)["text"]
    assert seen == [text_length(clip, tokens), tokens.shape[1]]
    assert (a - b).abs().max() < 1e-5
