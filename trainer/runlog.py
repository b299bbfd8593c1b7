"""What a run writes as it goes: metrics.jsonl, JSON files written atomically, versions, a progress bar.

    from trainer.runlog import MetricsLog; log = MetricsLog(run_dir / "metrics.jsonl", enabled=True)

Only the main process writes; every helper here is silent on the others.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import accelerate
import open_clip
import torch
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

from trainer import __version__


def write_json(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


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
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows logged after the saved state (they will be logged again)."""
        if not self.enabled or not self.path.exists():
            return
        rows = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
        keep = [ln for ln in rows if json.loads(ln).get("step", 0) <= step]
        self.path.write_text("".join(ln + "\n" for ln in keep))


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
