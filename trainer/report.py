"""`trainer report RUN [RUN ...]`: finished runs as one table in the paper's form, markdown and PNG.

    from trainer.report import collect, render_markdown; print(render_markdown(collect(["runs/a", "runs/b"])))

Columns: ID (the run's `data.val` set), each OOD set (the other sets without groups), their average, and for
each set with groups its worst-group and average-group accuracy (the mean over groups), as the StarFT
paper's tables 2 and 3 report them; then calibration, as CaRot reports it: the ID set's expected calibration
error (`ece`, %, lower is better) and the mean ECE over the OOD sets the OOD average is over. A run's
numbers are those of its checkpoint chosen on ID validation (metrics.json's `best`, what the paper reports)
where it has one, else its final model's (`--checkpoint` picks one). A set a run lacks, or a number it did
not record (runs from before ECE have none), shows as "–".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from trainer.errors import TrainerError


class ReportError(TrainerError):
    """A run directory cannot be reported (no metrics, unreadable files)."""


@dataclass
class RunResult:
    """One run's numbers: top-1 per set, worst/average group for grouped sets, ECE per set where recorded."""

    label: str
    method: str
    id_set: str | None
    top1: dict[str, float] = field(default_factory=dict)
    groups: dict[str, tuple[float, float]] = field(default_factory=dict)  # set -> (worst, mean over groups)
    ece: dict[str, float] = field(default_factory=dict)  # set -> ECE (%); absent in runs from before ECE


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file (is {path.parent} a finished run?)") from None
    except (OSError, ValueError) as e:
        raise ReportError(f"{path}: unreadable ({e.__class__.__name__})") from None


def _id_set(run_dir: Path) -> str | None:
    """The name of the run's ID validation set, from its config.yaml."""
    path = run_dir / "config.yaml"
    try:
        cfg = YAML(typ="safe", pure=True).load(path.read_text()) or {}
    except (OSError, YAMLError):
        return None
    val = (cfg.get("data") or {}).get("val")
    if not val:
        return None
    if val.get("name"):
        return val["name"]
    p = Path(val["path"])
    return p.stem if p.suffix.lower() == ".csv" else p.name


def load_run(run_dir: str | Path, checkpoint: str = "auto") -> RunResult:
    """A run's results from metrics.json: `best` (the ID-selected checkpoint's), `final`, or `auto` (best
    where the run has it, else final)."""
    run_dir = Path(run_dir)
    metrics = _read_json(run_dir / "metrics.json")
    if checkpoint == "auto":
        checkpoint = "best" if (metrics.get("best") or {}).get("results") else "final"
    if checkpoint == "best":
        results = (metrics.get("best") or {}).get("results")
        if not results:
            raise ReportError(f"{run_dir}/metrics.json: no results of an ID-selected checkpoint")
    else:
        results = metrics.get("final")
        if not isinstance(results, dict):
            raise ReportError(f"{run_dir}/metrics.json: no final results")
    out = RunResult(run_dir.name, str(metrics.get("method", "?")), _id_set(run_dir))
    for name, m in results.items():
        if not isinstance(m, dict) or "top1" not in m:
            continue
        out.top1[name] = float(m["top1"])
        if "worst_group" in m:
            out.groups[name] = (float(m["worst_group"]), float(m["group_mean"]))
        if isinstance(m.get("ece"), (int, float)):
            out.ece[name] = float(m["ece"])
    return out


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    ood_sets: list[str]


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def _mean_of(values: dict[str, float], sets: list[str]) -> float | None:
    """The mean of `values` over `sets`; None unless every one of them is there."""
    vals = [values[s] for s in sets if s in values]
    return sum(vals) / len(vals) if vals and len(vals) == len(sets) else None


def make_table(runs: list[RunResult], ood: list[str] | None = None) -> Table:
    """The paper-form table over `runs`; `ood`: the sets the OOD average is over (default: every one)."""
    id_sets = {r.id_set for r in runs if r.id_set}
    grouped = sorted({s for r in runs for s in r.groups})
    others = [s for r in runs for s in r.top1 if s not in id_sets and s not in grouped]
    ood_sets = list(dict.fromkeys(others))  # first-seen order: the config's order
    if ood is not None:
        unknown = [s for s in ood if s not in ood_sets]
        if unknown:
            raise ReportError(f"--ood: no such OOD set {unknown[0]!r} (have {', '.join(ood_sets) or 'none'})")
    avg_over = ood if ood is not None else ood_sets
    header = ["run", "method", "ID"] + ood_sets + (["OOD avg"] if ood_sets else [])
    for g in grouped:
        header += [f"{g} WG", f"{g} avg group"]
    header += ["ID ECE"] + (["OOD avg ECE"] if ood_sets else [])
    rows = []
    for r in runs:
        row = [r.label, r.method, _fmt(r.top1.get(r.id_set)) if r.id_set else "–"]
        row += [_fmt(r.top1.get(s)) for s in ood_sets]
        if ood_sets:
            row.append(_fmt(_mean_of(r.top1, avg_over)))
        for g in grouped:
            wg, mean = r.groups.get(g, (None, None))
            row += [_fmt(wg), _fmt(mean)]
        row.append(_fmt(r.ece.get(r.id_set)) if r.id_set else "–")
        if ood_sets:
            row.append(_fmt(_mean_of(r.ece, avg_over)))
        rows.append(row)
    return Table(header, rows, list(avg_over))


def collect(run_dirs: list[str | Path], checkpoint: str = "auto", ood: list[str] | None = None) -> Table:
    return make_table([load_run(d, checkpoint) for d in run_dirs], ood)


def render_markdown(table: Table) -> str:
    lines = [
        "| " + " | ".join(table.header) + " |",
        "|" + "|".join("---" if i < 2 else "---:" for i in range(len(table.header))) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table.rows]
    ece = "ECE: expected calibration error (%, 10 bins; lower is better)"
    lines.append("")
    if table.ood_sets:
        lines.append(
            f"Top-1 (%). OOD avg over {', '.join(table.ood_sets)}; WG: worst group; avg group: mean over groups;"
            f" {ece}, of the ID set and averaged over the same OOD sets."
        )
    else:
        lines.append(f"Top-1 (%). {ece}.")
    return "\n".join(lines) + "\n"


def render_png(table: Table, path: str | Path) -> Path:
    """The table as a PNG image."""
    import matplotlib  # here, not at the top: the backend must be chosen before pyplot is imported

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    width = max(6.0, 1.25 * len(table.header))
    fig, ax = plt.subplots(figsize=(width, 0.45 * (len(table.rows) + 2)))
    ax.axis("off")
    t = ax.table(cellText=table.rows, colLabels=table.header, loc="center", cellLoc="center")
    t.auto_set_font_size(False)
    t.set_fontsize(8)
    t.auto_set_column_width(list(range(len(table.header))))
    for (row, _), cell in t.get_celld().items():
        if row == 0:
            cell.set_text_props(weight="bold")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return path
