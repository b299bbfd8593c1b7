"""Experiment tracking (`log_with:`): a run's step rows and evaluations also go to accelerate's trackers.

    from trainer.tracking import start_tracking, TrackedLog, StepTimer
    tracking = start_tracking(acc, cfg, run_dir); log = TrackedLog(run_dir / "metrics.jsonl", True, tracking)

metrics.jsonl stays the source of truth; a tracker (tensorboard, wandb, mlflow, ... any accelerate
supports; none by default) gets the same rows: each step row's losses, λ, learning rate and logit scale
under `train/`, with `samples_per_s` and `data_wait` (the share of the step time spent waiting for the
next batch) from a `StepTimer`, and each evaluation's metrics under `eval/`. Local trackers write under
`<run dir>/tracking/`. Only the main process talks to trackers.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from trainer.config import TrainConfig
from trainer.errors import ConfigError
from trainer.runlog import MetricsLog

EVAL_KINDS = ("epoch", "eval")


def tracker_names(cfg: TrainConfig) -> list[str]:
    """The configured trackers, checked: known to accelerate and installed (ConfigError otherwise)."""
    if not cfg.log_with:
        return []
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers  # heavy: only when tracking

    names = [cfg.log_with] if isinstance(cfg.log_with, str) else list(cfg.log_with)
    available = {str(t) for t in get_available_trackers()}
    for n in names:
        if n not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(
                f"log_with: unknown tracker {n!r} (accelerate has {', '.join(LOGGER_TYPE_TO_CLASS)})"
            )
        if n not in available:
            raise ConfigError(f"log_with: tracker {n!r} is not installed (pip install {n})")
    return names


def _scalar_config(cfg: TrainConfig) -> dict[str, Any]:
    """The hyperparameters, flattened to scalars (what every tracker's config accepts)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(value, (int, float, str, bool)):
            out[prefix] = value
        elif value is not None:
            out[prefix] = str(value)

    walk("", cfg.hparams())
    return out


class Tracking:
    """The accelerator's trackers for one run (does nothing when `log_with` is empty)."""

    def __init__(self, accelerator: Any, names: list[str]):
        self.accelerator, self.names = accelerator, names

    @property
    def enabled(self) -> bool:
        return bool(self.names)

    def log(self, row: dict[str, Any]) -> None:
        """A metrics.jsonl row: step rows under train/, evaluations under eval/ (numbers only)."""
        if not self.enabled:
            return
        prefix = "eval/" if row.get("kind") in EVAL_KINDS else "train/"
        values = {
            prefix + k: float(v)
            for k, v in row.items()
            if k not in ("kind", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        self.accelerator.log(values, step=int(row.get("step", 0)))


def start_tracking(accelerator: Any, cfg: TrainConfig, run_dir: Path) -> Tracking:
    """Start the configured trackers on the run (project name: the run dir's name; config: hparams)."""
    names = tracker_names(cfg)
    if not names:
        return Tracking(accelerator, [])
    from accelerate.tracking import filter_trackers

    logging_dir = Path(run_dir) / "tracking"
    accelerator.project_configuration.logging_dir = str(logging_dir)
    # The Accelerator was built before the run dir was known; give it the trackers now (its init_trackers
    # reads `log_with` and `logging_dir` only when called).
    accelerator.log_with = filter_trackers(names, str(logging_dir))
    accelerator.init_trackers(Path(run_dir).name, config=_scalar_config(cfg))
    return Tracking(accelerator, names)


class TrackedLog(MetricsLog):
    """metrics.jsonl (the source of truth) plus the same rows to the trackers."""

    def __init__(self, path: Path, enabled: bool, tracking: Tracking):
        super().__init__(path, enabled)
        self.tracking = tracking

    def write(self, row: dict[str, Any]) -> None:
        super().write(row)
        self.tracking.log(row)


class StepTimer:
    """Throughput and data wait: wrap each epoch's batch iterator; `read(step)` when logging a step row.

    `samples_per_s`: global samples (`batch_size` a step) per second since the last read; `data_wait`: the
    share of that wall time spent inside the iterator's `next()`, waiting for a batch.
    """

    def __init__(self, batch_size: int, step: int = 0) -> None:
        self.batch_size, self.last_step = batch_size, step
        self.reset()

    def reset(self) -> None:
        self.t0, self.wait = time.perf_counter(), 0.0

    def wrap(self, batches: Iterable[Any]) -> Iterator[Any]:
        it = iter(batches)
        while True:
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.wait += time.perf_counter() - t
            yield batch

    def read(self, step: int) -> dict[str, float]:
        """samples_per_s and data_wait since the last read (then starts afresh)."""
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        samples = (step - self.last_step) * self.batch_size
        out = {"samples_per_s": samples / elapsed, "data_wait": min(1.0, self.wait / elapsed)}
        self.last_step = step
        self.reset()
        return out
