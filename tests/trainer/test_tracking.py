"""Tracking (`log_with:`): the run's rows reach accelerate's trackers; tested with tensorboard's event files.

.venv/bin/pytest tests/trainer/test_tracking.py -q
"""

from __future__ import annotations

import json
import time

import pytest

from trainer.config import build_config
from trainer.errors import ConfigError
from trainer.tracking import StepTimer, TrackedLog, start_tracking, tracker_names


def _scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list(logdir.rglob("events.out.tfevents.*"))
    assert files, f"no event file under {logdir}"
    out: dict[str, list[tuple[int, float]]] = {}
    for f in files:
        acc = EventAccumulator(str(f))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def test_tracker_names_are_checked():
    base = {"method": "flyp", "data": {"train": {"path": "a.csv"}}}
    assert tracker_names(build_config(base)) == []
    assert tracker_names(build_config(base, ["log_with=tensorboard"])) == ["tensorboard"]
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbored'"):
        tracker_names(build_config(base, ["log_with=[tensorbored]"]))


def test_rows_go_to_jsonl_and_tensorboard(tmp_path):
    from accelerate import Accelerator

    cfg = build_config({"method": "flyp", "data": {"train": {"path": "a.csv"}}}, ["log_with=tensorboard"])
    acc = Accelerator(cpu=True)
    run = tmp_path / "run"
    run.mkdir()
    tracking = start_tracking(acc, cfg, run)
    log = TrackedLog(run / "metrics.jsonl", True, tracking)
    log.write(
        {"kind": "step", "step": 1, "epoch": 0, "lr": 1e-5, "lam": 0.5, "loss": 2.5, "samples_per_s": 40.0}
    )
    log.write({"kind": "step", "step": 2, "epoch": 0, "lr": 2e-5, "lam": 0.5, "loss": 2.0, "data_wait": 0.25})
    log.write({"kind": "epoch", "step": 2, "epoch": 1, "val/top1": 55.0, "val/n": 8})
    acc.end_training()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 2]  # the JSONL is written as before
    s = _scalars(run / "tracking")
    assert s["train/loss"] == [(1, 2.5), (2, 2.0)]
    assert s["train/lr"][1] == (2, pytest.approx(2e-5))
    assert s["train/lam"] == [(1, 0.5), (2, 0.5)] and s["train/data_wait"] == [(2, 0.25)]
    assert s["eval/val/top1"] == [(2, 55.0)] and "train/epoch" in s


def test_no_trackers_by_default(tmp_path):
    from accelerate import Accelerator

    cfg = build_config({"method": "flyp", "data": {"train": {"path": "a.csv"}}})
    tracking = start_tracking(Accelerator(cpu=True), cfg, tmp_path)
    assert not tracking.enabled
    tracking.log({"kind": "step", "step": 1, "loss": 1.0})
    assert not (tmp_path / "tracking").exists()


def test_step_timer_measures_throughput_and_data_wait():
    def slow_batches():
        for _ in range(3):
            time.sleep(0.05)  # the loader makes the step wait
            yield 4

    timer = StepTimer(batch_size=4, step=10)
    step = 10
    for _ in timer.wrap(slow_batches()):
        time.sleep(0.05)  # the step's own work
        step += 1
    r = timer.read(step)
    assert 0.3 < r["data_wait"] < 0.7
    assert 25 < r["samples_per_s"] < 45  # 12 samples in ~0.3 s
    assert timer.read(step)["samples_per_s"] == 0  # read() starts afresh


def test_a_run_logs_to_tensorboard(tmp_path, tiny_config):
    """`trainer run` with log_with: tensorboard: losses, λ, lr, throughput, data wait and evaluations."""
    from trainer.train import train

    cfg = build_config(dict(tiny_config, method="starft", epochs=1), ["log_with=tensorboard"])
    run = train(cfg)
    s = _scalars(run / "tracking")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "step"]
    assert [v for _, v in s["train/loss"]] == pytest.approx([r["loss"] for r in steps])  # the JSONL's rows
    for key in ("train/lam", "train/lr", "train/reg_loss", "train/samples_per_s", "train/data_wait"):
        assert len(s[key]) == len(steps), key
    assert all(0 <= v <= 1 for _, v in s["train/data_wait"]) and all(
        v > 0 for _, v in s["train/samples_per_s"]
    )
    assert s["eval/val/top1"][-1][1] == pytest.approx(rows[-1]["val/top1"])
