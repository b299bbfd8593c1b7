"""What a run writes as it goes: metrics.jsonl, JSON files written atomically, versions, a progress bar.

    from trainer.runlog import MetricsLog; log = MetricsLog(run_dir / "metrics.jsonl", enabled=True)

Only the main process writes; every helper here is silent on the others.
"""

from __future__ import annotations

import json
import os
import platform
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import accelerate
import open_clip
import torch
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

from trainer import __version__
from trainer.errors import WriteError

FAULT_ENV = "TRAINER_FAULT_KILL"  # tests only: "phase:n" kills the process the n-th time `phase` is reached
_reached: dict[str, int] = {}


def fault_point(phase: str) -> None:
    """Tests only: SIGKILL this process when $TRAINER_FAULT_KILL is `phase:n` and this is its n-th time."""
    spec = os.environ.get(FAULT_ENV)
    if not spec or spec.partition(":")[0] != phase:
        return
    _reached[phase] = _reached.get(phase, 0) + 1
    if _reached[phase] == int(spec.partition(":")[2] or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def describe_os_error(e: OSError) -> str:
    """'No space left on device' (its errno's words), or the error's text."""
    return e.strerror or str(e) or e.__class__.__name__


@contextmanager
def writing(path: Path, what: str = "cannot write") -> Iterator[None]:
    """An OSError inside becomes a one-line WriteError naming `path` (or the file the error names)."""
    try:
        yield
    except OSError as e:
        raise WriteError(f"{e.filename or path}: {what} ({describe_os_error(e)})") from None


def write_text_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and a rename: a reader (or a kill) never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with writing(path):
        try:
            tmp.write_text(text)
            tmp.replace(path)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise


def write_json(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half a file."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def versions() -> dict[str, str]:
    """The versions a run directory records."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "accelerate": accelerate.__version__,
        "trainer": __version__,
    }


def flat_metrics(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """{set: {metric: v}} -> {"set/metric": v}, without the per-group tables."""
    return {f"{name}/{k}": v for name, m in results.items() for k, v in m.items() if k != "per_group"}


def summary_line(results: dict[str, dict[str, Any]]) -> str:
    """'val 91.2  groups 80.1 (wg 55.0)': one evaluation on one line."""
    parts = []
    for name, m in results.items():
        s = f"{name} {m['top1']:.1f}"
        if "worst_group" in m:
            s += f" (wg {m['worst_group']:.1f})"
        parts.append(s)
    return "  ".join(parts)


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step and per evaluation (main process only)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, row: dict[str, Any]) -> None:
        if self.enabled:
            line = json.dumps(row) + "\n"
            with writing(self.path), self.path.open("a") as f:
                if os.environ.get(FAULT_ENV, "").startswith("torn:"):  # tests: a kill mid-line
                    f.write(line[: len(line) // 2])
                    f.flush()
                    fault_point("torn")
                    line = line[len(line) // 2 :]
                f.write(line)

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows logged after the saved state (they will be logged again) and a torn last
        line (a kill while it was written); the file is replaced whole."""
        if not self.enabled or not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a torn line: its row is logged again
            if isinstance(row, dict) and row.get("step", 0) <= step:
                keep.append(line)
        write_text_atomic(self.path, "".join(ln + "\n" for ln in keep))


class Progress:
    """A rich progress bar on the main process; silent elsewhere."""

    def __init__(self, enabled: bool):
        self.bar = None
        if enabled:
            self.bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                transient=False,
            )
            self.bar.start()

    def add(self, description: str, total: int, completed: int) -> Any:
        return self.bar.add_task(description, total=total, completed=completed, info="") if self.bar else None

    def update(self, task: Any, completed: int, info: str) -> None:
        if self.bar:
            self.bar.update(task, completed=completed, info=info)

    def note(self, text: str) -> None:
        if self.bar:
            self.bar.console.print(text)

    def close(self) -> None:
        if self.bar:
            self.bar.stop()
