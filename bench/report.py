"""Benchmark report: mean ± std per row and column, Welch t-tests, a markdown + JSON table and a PNG plot.

    from bench.report import write_report; paths = write_report(results, "runs/bench")

`results` is what `bench.suite.run_bench` returns (or its results.json). Statistics pool every
(pretraining seed, fine-tuning seed) run of a row; std is the sample std (ddof 1), 0 for a single run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
from rich import box
from rich.table import Table

from bench.suite import ALL_ROWS, COLUMNS

# Column headers of the table.
HEADERS = {
    "id": "ID (A)",
    "a_sketch": "A sketch",
    "a_unseen": "A unseen bg",
    "b_worst": "B worst group",
    "b_worst3": "B worst-3",
    "b_avg": "B group avg",
    "b_plain": "B plain",
    "b_sketch": "B sketch",
    "b_bias": "B bias (typical − other bg)",
    "id_ece": "ID ECE (lower is better)",
}
# Console tables (80 columns): short headers, explained in the caption.
SHORT = {
    "id": "ID",
    "a_sketch": "A sk",
    "a_unseen": "A ubg",
    "b_worst": "B wg",
    "b_worst3": "B wg3",
    "b_avg": "B avg",
    "b_plain": "B pl",
    "b_sketch": "B sk",
    "b_bias": "B bias",
    "id_ece": "ECE",
}
LEGEND = (
    "ID = task A in distribution; A sk / ubg = A sketch / unseen backgrounds; B wg / wg3 / avg = task-B "
    "worst group / mean of worst 3 / group average; B pl / sk = task B plain / sketch; B bias = task B on "
    "each class's typical background minus on the others; ECE = expected calibration error on ID (%)"
)
# Welch comparisons: starft against these rows.
COMPARE = ("flyp", "flyp_lowlr", "clean", "random", "oracle", "wise_flyp")


# Spreads below this are float rounding (e.g. 90.2 - 90.3 vs 90.1 - 90.2), not variation between runs.
_TINY = 1e-9


def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def welch_t(a: list[float], b: list[float]) -> float | None:
    """Welch's t of mean(a) - mean(b); None with fewer than 2 runs on a side, inf when both spreads are 0."""
    if len(a) < 2 or len(b) < 2:
        return None
    ma, sa = _mean_std(a)
    mb, sb = _mean_std(b)
    se = math.sqrt(sa**2 / len(a) + sb**2 / len(b))
    if se < _TINY:
        return 0.0 if abs(ma - mb) < _TINY else math.copysign(math.inf, ma - mb)
    return (ma - mb) / se


def paired_t(a: list[float], b: list[float]) -> float | None:
    """Paired t of mean(a - b) over matched runs; None with fewer than 2 pairs, inf when every difference is equal."""
    if len(a) != len(b) or len(a) < 2:
        return None
    d = [x - y for x, y in zip(a, b)]
    m, s = _mean_std(d)
    if s < _TINY:
        return 0.0 if abs(m) < _TINY else math.copysign(math.inf, m)
    return m / (s / math.sqrt(len(d)))


def pairs(records: list[dict], row: str, other: str, col: str) -> tuple[list[float], list[float]]:
    """Values of `row` and `other` on runs that share (pretraining seed, fine-tuning seed), in matched order."""

    def of(name: str) -> dict[tuple, float]:
        return {
            (r.get("pretrain_seed"), r.get("seed")): r["metrics"][col]
            for r in records
            if r["row"] == name and col in r["metrics"]
        }

    mine, theirs = of(row), of(other)
    common = sorted(set(mine) & set(theirs), key=str)
    return [mine[k] for k in common], [theirs[k] for k in common]


def json_t(t: float | None) -> float | str | None:
    """A t value for JSON: rounded, or "inf" / "-inf" as a string (JSON has no infinity)."""
    return None if t is None else (round(t, 2) if math.isfinite(t) else str(t))


def values(records: list[dict], row: str, col: str) -> list[float]:
    return [r["metrics"][col] for r in records if r["row"] == row and col in r["metrics"]]


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Per row and column: mean, std, n; Welch t of starft against the comparison rows; mean seconds."""
    records = results["records"]
    present = [r for r in ALL_ROWS if any(rec["row"] == r for rec in records)]
    table: dict[str, dict[str, Any]] = {}
    for row in present:
        cells = {}
        for col in COLUMNS:
            xs = values(records, row, col)
            if xs:
                m, s = _mean_std(xs)
                cells[col] = {"mean": round(m, 2), "std": round(s, 2), "n": len(xs)}
        secs = [r["seconds"] for r in records if r["row"] == row and r.get("seconds") is not None]
        cpu = [r["cpu_seconds"] for r in records if r["row"] == row and r.get("cpu_seconds") is not None]
        table[row] = {
            "cells": cells,
            "seconds": round(sum(secs) / len(secs), 1) if secs else None,
            "cpu_seconds": round(sum(cpu) / len(cpu), 1) if cpu else None,
        }
    tests: dict[str, dict[str, Any]] = {}
    paired: dict[str, dict[str, Any]] = {}
    if "starft" in table:
        for other in COMPARE:
            if other not in table:
                continue
            tests[other], paired[other] = {}, {}
            for col in COLUMNS:
                a, b = values(records, "starft", col), values(records, other, col)
                if a and b:
                    diff = sum(a) / len(a) - sum(b) / len(b)
                    tests[other][col] = {"diff": round(diff, 2), "t": json_t(welch_t(a, b))}
                pa, pb = pairs(records, "starft", other, col)
                if pa:
                    d = [x - y for x, y in zip(pa, pb)]
                    paired[other][col] = {
                        "diff": round(sum(d) / len(d), 2),
                        "t": json_t(paired_t(pa, pb)),
                        "n": len(d),
                        "wins": sum(x > 0 for x in d),
                    }
    return {
        "split": results.get("split"),
        "rows": table,
        "welch_starft_vs": tests,
        "paired_starft_vs": paired,
        "coverage": results.get("coverage", {}),
        "seconds": results.get("seconds", {}),
        "n_runs": len(records),
    }


def _cell(c: dict[str, Any] | None) -> str:
    if c is None:
        return "–"
    return f"{c['mean']:.1f} ± {c['std']:.1f}" if c["n"] > 1 else f"{c['mean']:.1f}"


def _comparison(tests: dict[str, dict[str, Any]], title: str) -> list[str]:
    """Markdown lines of one starft-against-other-rows table: difference (t; wins/pairs when paired)."""
    if not tests:
        return []
    cols = [c for c in COLUMNS if c != "id_ece"]  # differences read as "starft higher"; ECE is lower-better
    lines = [
        "",
        title,
        "",
        "| vs | " + " | ".join(HEADERS[c] for c in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for other, t in tests.items():
        lines.append(f"| {other} | " + " | ".join(_diff_cell(t.get(c)) for c in cols) + " |")
    return lines


def _diff_cell(x: dict[str, Any] | None) -> str:
    """'+1.2 (t 3.4)' or, paired, '+1.2 (t 3.4; 5/6)'; '–' when the column is missing."""
    if x is None:
        return "–"
    tt = "n/a" if x["t"] is None else (x["t"] if isinstance(x["t"], str) else f"{x['t']:.1f}")
    wins = f"; {x['wins']}/{x['n']}" if "wins" in x else ""
    return f"{x['diff']:+.1f} (t {tt}{wins})"


def markdown(summary: dict[str, Any]) -> str:
    """The table (mean ± std over runs), the Welch tests and the bank coverage as markdown."""
    cols = list(COLUMNS)
    lines = [
        f"Split: {summary['split']}; mean ± std over every run of a row (n = runs).",
        "",
        "| row | n | " + " | ".join(HEADERS[c] for c in cols) + " | wall s/run | CPU s/run |",
        "|---|---|" + "---|" * len(cols) + "---|---|",
    ]
    for row, r in summary["rows"].items():
        n = max((c["n"] for c in r["cells"].values()), default=0)
        secs = "" if r["seconds"] is None else f"{r['seconds']:.0f}"
        cpu = "" if r.get("cpu_seconds") is None else f"{r['cpu_seconds']:.0f}"
        lines.append(
            f"| {row} | {n} | " + " | ".join(_cell(r["cells"].get(c)) for c in cols) + f" | {secs} | {cpu} |"
        )
    lines += _comparison(summary["welch_starft_vs"], "starft minus other row (Welch t):")
    lines += _comparison(
        summary.get("paired_starft_vs", {}),
        "starft minus other row, paired on (pretraining seed, fine-tuning seed): mean difference"
        " (paired t; runs where starft is higher / pairs):",
    )
    for name, cov in summary.get("coverage", {}).items():
        lines += [
            "",
            f"Bank vocabulary coverage ({name}, {cov['bank']}): {cov['share']}% "
            f"({cov['covered']}/{cov['total']} approved descriptors use only pretraining-caption words)"
            + (f"; unknown words: {', '.join(cov['missing_words'][:20])}" if cov["missing_words"] else ""),
        ]
    return "\n".join(lines) + "\n"


def rich_table(summary: dict[str, Any]):
    """The summary table as a rich Table."""

    cols = list(COLUMNS)
    t = Table(
        title=f"StarFT bench ({summary['split']} split): mean, ± std below (n runs)",
        caption=LEGEND + "; under each row: runs, wall seconds a run",
        box=box.SIMPLE_HEAD,
        padding=(0, 0, 0, 1),  # with the column divider: 2 spaces between columns, 80 columns suffice
    )
    t.add_column("row", no_wrap=True, min_width=max(map(len, summary["rows"]), default=3))
    for c in cols:
        t.add_column(SHORT[c], justify="right", no_wrap=True)
    for row, r in summary["rows"].items():
        n = max((c["n"] for c in r["cells"].values()), default=0)
        secs = "" if r["seconds"] is None else f", {r['seconds']:.0f} s"
        t.add_row(
            f"{row}\n[dim]n {n}{secs}[/dim]", *(_cell(r["cells"].get(c)).replace(" ± ", "\n±") for c in cols)
        )
    return t


def rich_paired(summary: dict[str, Any]):
    """starft minus each row, paired on seeds, as a rich Table (difference, paired t, wins); None without pairs."""

    tests = {
        o: t for o, t in summary.get("paired_starft_vs", {}).items() if any(x["n"] > 1 for x in t.values())
    }
    if not tests:
        return None

    cols = [c for c in COLUMNS if c not in ("b_bias", "id_ece")]  # 80 columns; the markdown report has them
    t = Table(
        title="starft minus row, paired on (pretraining seed, seed): difference, paired t, starft higher/pairs",
        caption=LEGEND,
        box=box.SIMPLE_HEAD,
        padding=(0, 0, 0, 1),  # with the column divider: 2 spaces between columns, 80 columns suffice
    )
    t.add_column("vs", no_wrap=True, min_width=max(map(len, tests)))
    for c in cols:
        t.add_column(SHORT[c], justify="right", no_wrap=True, min_width=6)  # "t -4.7"
    for other, cells in tests.items():
        t.add_row(other, *(diff_lines(cells.get(c)) for c in cols))
    return t


def diff_lines(x: dict[str, Any] | None) -> str:
    """A paired cell on three short lines: difference, paired t, wins / pairs."""
    if x is None:
        return "–"
    t = x["t"]
    tt = "n/a" if t is None else (t if isinstance(t, str) else f"{t:.1f}" if abs(t) < 10 else f"{t:.0f}")
    return f"{x['diff']:+.1f}\nt {tt}\n{x['wins']}/{x['n']}"


# One fixed colour per row, the same in every plot: baselines blue, the KL ablations green / purple /
# orange, starft red (and its WiSE-FT a red square), zero-shot grey.
ROW_COLOURS = {
    "zeroshot": "tab:gray",
    "ft": "tab:brown",
    "flyp": "tab:blue",
    "flyp_lowlr": "tab:cyan",
    "kl": "tab:olive",
    "starft": "tab:red",
    "clean": "tab:green",
    "random": "tab:purple",
    "oracle": "tab:orange",
    "wise_flyp": "tab:blue",
    "wise_starft": "tab:red",
    "lipsum": "tab:pink",
    "carot": "darkgreen",
    "carft": "gold",
    "lpft": "black",
}


def plot(results: dict[str, Any], path: str | Path) -> Path:
    """PNG: task-B worst group against ID accuracy, one point per run, one colour per row."""

    matplotlib.use("Agg")

    records = results["records"]
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    for row in (r for r in ALL_ROWS if any(rec["row"] == r for rec in records)):
        pts = [(r["metrics"]["id"], r["metrics"]["b_worst"]) for r in records if r["row"] == row]
        pts = [p for p in pts if p[0] is not None and p[1] is not None]
        if pts:
            star = row == "starft"
            ax.scatter(
                [p[0] for p in pts],
                [p[1] for p in pts],
                label=row,
                color=ROW_COLOURS[row],
                marker="*" if star else ("s" if row.startswith("wise") else "o"),
                s=160 if star else 40,
                edgecolors="black" if star else "none",
                linewidths=0.6,
                alpha=1.0 if star else 0.8,
                zorder=3 if star else 2,  # the method on top of the ablations it sits among
            )
    ax.set_xlabel("ID accuracy, task A (%)")
    ax.set_ylabel("task-B worst group (%)")
    ax.set_title(f"StarFT bench ({results.get('split')} split): one point per run")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(results: dict[str, Any], out: str | Path, console=None) -> dict[str, Path]:
    """Write report.md, report.json and plot.png to `out`; print the table with rich. Returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(results)
    paths = {
        "markdown": out / "report.md",
        "json": out / "report.json",
        "plot": out / "plot.png",
    }
    paths["markdown"].write_text(markdown(summary))
    paths["json"].write_text(json.dumps(summary, indent=1))
    plot(results, paths["plot"])
    if console is not None:
        console.print(rich_table(summary))
        paired = rich_paired(summary)
        if paired is not None:
            console.print(paired)
        for name, cov in summary.get("coverage", {}).items():
            console.print(
                f"bank coverage ({name}, {cov['bank']}): {cov['share']}% of {cov['total']} descriptors"
            )
    return paths


__all__ = [
    "markdown",
    "paired_t",
    "plot",
    "rich_paired",
    "rich_table",
    "summarize",
    "welch_t",
    "write_report",
]
