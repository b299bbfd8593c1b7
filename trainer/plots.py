"""PNG plots of a run: loss curves, accuracy per evaluation, per-group accuracy bars.

from trainer.plots import plot_run; plot_run("runs/v2-starft-...")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write loss.png, accuracy.png and groups.png (what the metrics allow); returns the paths."""
    import matplotlib  # here, not at the top: the backend must be chosen before pyplot is imported

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = _rows(run_dir)
    written: list[Path] = []

    steps = [r for r in rows if r.get("kind") == "step"]
    if steps:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in ("loss", "contrastive_loss", "reg_loss"):
            ax.plot([r["step"] for r in steps], [r[key] for r in steps], label=key)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        ax.set_title(run_dir.name, fontsize=8)
        fig.tight_layout()
        fig.savefig(run_dir / "loss.png", dpi=100)
        plt.close(fig)
        written.append(run_dir / "loss.png")

    evals = [r for r in rows if r.get("kind") in ("epoch", "eval")]
    if evals:
        fig, ax = plt.subplots(figsize=(6, 4))
        keys = sorted({k for r in evals for k in r if k.endswith(("/top1", "/worst_group"))})
        for key in keys:
            pts = [(r["step"], r[key]) for r in evals if key in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
        ax.set_xlabel("step")
        ax.set_ylabel("accuracy (%)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(run_dir / "accuracy.png", dpi=100)
        plt.close(fig)
        written.append(run_dir / "accuracy.png")

    final_path = run_dir / "metrics.json"
    final = json.loads(final_path.read_text()).get("final", {}) if final_path.exists() else {}
    grouped = {name: m["per_group"] for name, m in final.items() if m.get("per_group")}
    if grouped:
        fig, axes = plt.subplots(len(grouped), 1, figsize=(7, 2.5 * len(grouped)), squeeze=False)
        for ax, (name, groups) in zip(axes[:, 0], grouped.items()):
            ax.bar(range(len(groups)), list(groups.values()))
            ax.set_xticks(range(len(groups)), list(groups.keys()), rotation=60, ha="right", fontsize=6)
            ax.set_ylim(0, 100)
            ax.set_title(f"{name}: per-group accuracy (%)", fontsize=8)
        fig.tight_layout()
        fig.savefig(run_dir / "groups.png", dpi=100)
        plt.close(fig)
        written.append(run_dir / "groups.png")
    return written
