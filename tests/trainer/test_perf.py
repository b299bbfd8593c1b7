"""`trainer perf` (issue 20): the side-by-side report of flyp and starft step time and peak memory.

.venv/bin/pytest tests/trainer/test_perf.py -q
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from trainer.cli import app
from trainer.config import build_config
from trainer.perf import ROWS, PeakMemory, synthetic_batches


def test_perf_reports_every_row_and_the_ratios_the_issue_names(tmp_path, tiny_clip):
    out = tmp_path / "perf.json"
    args = ["perf", "--model", str(tiny_clip), "--batch", "4", "--steps", "2", "--threads", "1"]
    res = CliRunner().invoke(app, [*args, "--workers", "0", "--loader-images", "8", "--json", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert list(report["rows"]) == list(ROWS)
    for row in report["rows"].values():
        assert row["min_s"] <= row["s_per_step"] <= row["max_s"] and row["peak_mb"] >= row["held_mb"] > 0
    assert {"starft/flyp", "starft_aug/flyp", "flyp/flyp_openclip"} <= set(report["ratios"])
    rows = report["rows"]
    # the cached starft row holds no teacher image tower; the reference holds both towers
    assert rows["starft"]["held_mb"] < rows["starft_ref"]["held_mb"]
    assert rows["flyp"]["held_mb"] == rows["flyp_openclip"]["held_mb"]
    assert report["text_tokens"]["trimmed"] < report["text_tokens"]["context"] == 32
    assert report["loader"]["images"] == 8 and report["loader"]["ratio"] > 0
    assert "flyp trimmed is" in res.output and "starft_aug" in res.output


def test_a_bad_device_is_a_one_line_error(tiny_clip):
    res = CliRunner().invoke(app, ["perf", "--model", str(tiny_clip), "--device", "tpu"])
    assert res.exit_code != 0 and "Traceback" not in res.output


def test_synthetic_batches_give_each_sample_its_own_fixed_image_and_a_longer_spurious_caption(tiny_clip):
    from trainer.model import build_clip, text_length

    clip, _, tokenizer = build_clip(str(tiny_clip), None)
    a, b = synthetic_batches(tokenizer, 4, 2, 32), synthetic_batches(tokenizer, 4, 2, 32)
    assert torch.equal(a[1]["image"], b[1]["image"]) and a[1]["index"].tolist() == [4, 5, 6, 7]
    assert bool((a[0]["spurious"].argmax(-1) > a[0]["caption"].argmax(-1)).all())  # end-of-text later
    assert text_length(clip, a[0]["spurious"]) < a[0]["spurious"].shape[1]  # and still a cut


def test_peak_memory_sees_a_block_that_allocates_and_frees():
    peak = PeakMemory(torch.device("cpu"))
    sizes = []
    for mb in (64, 256):
        with peak.measure():
            x = torch.ones(mb * 2**20 // 4)  # float32
            del x
        sizes.append(peak.peak / 2**20)
    peak.done()
    assert sizes[0] == pytest.approx(64, abs=16) and sizes[1] == pytest.approx(256, abs=32)


def test_loader_options_name_worker_options_only_with_workers():
    base = {"data": {"train": {"path": "x.csv"}}, "method": "flyp"}
    assert build_config(base).loader_options(cuda=False) == {"num_workers": 0, "pin_memory": False}
    assert build_config(base).loader_options(cuda=True)["pin_memory"] is True
    opts = build_config(base, ["num_workers=3", "prefetch_factor=4", "pin_memory=false"]).loader_options(True)
    assert opts == {"num_workers": 3, "pin_memory": False, "persistent_workers": True, "prefetch_factor": 4}
    cfg = build_config(base, ["num_workers=2", "compile=true", "grad_checkpointing=true"])
    assert cfg.hash() == build_config(base).hash()  # runtime knobs: not part of a run's identity


def test_compile_and_gradient_checkpointing_keys_reach_the_student(tiny_config, monkeypatch):
    import trainer.train as train_mod

    compiled: list[str] = []
    monkeypatch.setattr(
        torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self).__name__)
    )
    built = []
    real = train_mod.FineTuner

    def spy(clip, head=None):
        built.append(real(clip, head))
        return built[-1]

    monkeypatch.setattr(train_mod, "FineTuner", spy)
    cfg = ["method=flyp", "total_steps=1", "name=knobs", "compile=true", "grad_checkpointing=true"]
    train_mod.train(build_config(tiny_config, cfg))
    assert compiled == ["VisionTransformer", "Transformer"]
    clip = built[0].clip
    assert clip.transformer.grad_checkpointing and clip.visual.transformer.grad_checkpointing
