"""HF backend options testable on a CPU: --dtype, greedy --temperature 0, provenance over every weight file,
the GGUF cache dtype, and clear errors for GPU-only options.  Run: pytest tests/descgen/test_llm_options.py"""

from __future__ import annotations

import pytest
import torch

from descgen.errors import GenerationError
from descgen.llm import (
    SMALL_GGUF_BYTES,
    ModelSource,
    gguf_cache_dtype,
    load_generator,
    weights_digest,
)
from tests.descgen.fixtures import build_tiny_llama

MSGS = [{"role": "user", "content": "List short phrases."}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DESCGEN_CACHE", str(tmp_path / "cache"))


def test_dtype_option(tiny):
    gen = load_generator(str(tiny), threads=1, device="cpu", dtype="bfloat16")
    assert next(gen.model.parameters()).dtype == torch.bfloat16
    assert load_generator(str(tiny), threads=1, device="cpu").model.dtype == torch.float32  # auto on CPU


def test_temperature_zero_is_greedy(tiny):
    gen = load_generator(str(tiny), threads=1, device="cpu")
    a = gen.generate(MSGS, ["- in"] * 2, max_new_tokens=8, temperature=0.0, seed=1)
    b = gen.generate(MSGS, ["- in"] * 2, max_new_tokens=8, temperature=0.0, seed=2)
    assert a == b and a[0] == a[1]
    sampled = {
        tuple(gen.generate(MSGS, ["- in"] * 4, max_new_tokens=8, temperature=5.0, seed=s)) for s in (1, 2)
    }
    assert len(sampled) == 2  # sampling does depend on the seed: the greedy check above can fail


def test_provenance_covers_every_shard(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    for i, blob in enumerate((b"first shard", b"second shard"), 1):
        (d / f"model-0000{i}-of-00002.safetensors").write_bytes(blob)
    (d / "pytorch_model.bin").write_bytes(b"a .bin copy that is not loaded")
    src = ModelSource("m", d)
    assert [p.name for p in src.weight_files] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    digest, label = weights_digest(src.weight_files)
    assert "(2 files)" in label
    (d / "model-00002-of-00002.safetensors").write_bytes(b"second shard, changed")
    assert weights_digest(src.weight_files)[0] != digest  # the last shard counts too
    one = weights_digest(src.weight_files[:1])[0]
    import hashlib

    assert one == hashlib.sha256(b"first shard").hexdigest()  # one file: its own sha256, as before


def test_tiny_model_provenance_names_its_file(tiny):
    gen = load_generator(str(tiny), threads=1, device="cpu")
    assert gen.info.weights_file == "model.safetensors" and gen.info.weights_sha256.startswith("sha256:")


def test_gguf_cache_dtype():
    assert gguf_cache_dtype(100 << 20, "bfloat16") == "float32"  # the embedded model keeps its exact outputs
    assert gguf_cache_dtype(SMALL_GGUF_BYTES * 5, "bfloat16") == "bfloat16"
    assert gguf_cache_dtype(SMALL_GGUF_BYTES * 5, "float16") == "float16"
    assert gguf_cache_dtype(SMALL_GGUF_BYTES * 5, "float32") == "bfloat16"  # never 32 bits for a big model
    assert gguf_cache_dtype(SMALL_GGUF_BYTES * 5, None) == "bfloat16"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dtype": "float8"}, "--dtype 'float8'"),
        ({"device_map": "balanced"}, "only 'auto'"),
        pytest.param(
            {"device": "cuda"},
            "no CUDA GPU",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has GPU"),
        ),
        pytest.param(
            {"device_map": "auto"},
            "need a CUDA GPU",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="GPU"),
        ),
    ],
)
def test_bad_device_options(tiny, kwargs, message):
    with pytest.raises(GenerationError, match=message):
        load_generator(str(tiny), threads=1, **kwargs)


def test_four_bit_needs_bitsandbytes(tiny, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a)
    )
    with pytest.raises(GenerationError, match="bitsandbytes"):
        load_generator(str(tiny), threads=1, load_in_4bit=True)
