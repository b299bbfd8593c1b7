"""The benchmark's command line: `python -m bench pretrain | run | demo`.

    python -m bench demo                      # the main job (`make demo`)
    python -m bench run -c bench/configs/full.yaml --split val

Each command builds a config, calls one library function, prints with rich: tables to stdout, progress
and notes to stderr. The benchmark imports trainer; trainer never imports the benchmark.
"""

# ruff: noqa: B008  -- typer.Option defaults are how these commands declare their options

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from bench import ravl_suite
from bench.pretrain import get_pretrained, read_meta
from bench.report import write_report
from bench.suite import config_data, find_reviewed_bank, load_bench_config, run_bench
from trainer.config import describe_error
from trainer.errors import USER_ERRORS, fail

app = typer.Typer(
    help="The synthetic benchmark: pretrain a small zero-shot model, fine-tune it with every method, report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


# trainer's and descgen's errors, plus a bench config's schema errors and missing files
BENCH_ERRORS = (*USER_ERRORS, ValidationError, FileNotFoundError)


def _fail_with(e: Exception) -> NoReturn:
    """One line for a user error; a schema error names its first offending key (trainer's describe_error)."""
    fail(describe_error(e) if isinstance(e, ValidationError) else str(e))


def _ints(text: str | None, option: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise typer.BadParameter(
            f"expected comma-separated integers, got {text!r}", param_hint=option
        ) from None


def _words(text: str | None) -> list[str] | None:
    return None if text is None else [x for x in text.replace(",", " ").split() if x]


def _zero_shot_table(rows: list[tuple[int, Path, dict[str, Any]]], split: str) -> Table:
    keys = [
        ("a_acc", "ID (A)"),
        ("a_sketch_acc", "A sketch"),
        ("a_unseen_acc", "A unseen bg"),
        ("b_worst_group", "B worst group"),
        ("b_worst3", "B worst-3"),
        ("b_group_avg", "B group avg"),
        ("b_bias_gap", "B bias gap"),
        ("b_plain_acc", "B plain"),
        ("b_sketch_acc", "B sketch"),
    ]
    t = Table(title=f"zero-shot models ({split} split)")
    t.add_column("seed", justify="right")
    for _, h in keys:
        t.add_column(h, justify="right")
    t.add_column("logit scale", justify="right")
    t.add_column("pretrain s", justify="right")
    for seed, _, meta in rows:
        z = meta.get("zero_shot", {}).get(split, {})
        cells = [f"{z[k]:.1f}" if isinstance(z.get(k), (int, float)) else "–" for k, _ in keys]
        wall = meta.get("wall_seconds", {}).get("total")
        t.add_row(str(seed), *cells, f"{meta.get('logit_scale', float('nan')):.1f}", f"{wall or 0:.0f}")
    return t


@app.command()
def pretrain(
    config: Path | None = typer.Option(None, "--config", "-c", help="bench YAML (its `pretrain:` section)"),
    seeds: str | None = typer.Option(None, help="pretraining seeds, e.g. 0,1 (default: the config's)"),
    split: str = typer.Option("val", help="zero-shot figures of the val or test splits"),
    cache_dir: str | None = typer.Option(None, "--cache-dir", help="default .cache/bench"),
    threads: int = typer.Option(2, help="torch threads"),
    force: bool = typer.Option(False, "--force", help="pretrain again even if cached"),
) -> None:
    """Make (or reuse) the benchmark's zero-shot model(s) and print their zero-shot figures."""
    if split not in ("val", "test"):
        raise typer.BadParameter("must be val or test", param_hint="--split")
    try:
        cfg = load_bench_config(config, pretrain_seeds=_ints(seeds, "--seeds"), cache_dir=cache_dir)
        rows = []
        for seed in cfg.pretrain_seeds:
            pcfg = cfg.pretrain.model_copy(update={"seed": seed})
            run_dir = get_pretrained(pcfg, cfg.cache_dir, threads=threads, progress=True, force=force)
            rows.append((seed, run_dir, read_meta(run_dir)))
    except BENCH_ERRORS as e:
        _fail_with(e)
    out.print(_zero_shot_table(rows, split))
    for seed, run_dir, _ in rows:
        out.print(f"seed {seed}: {run_dir}", markup=False, highlight=False)


def _report(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:

    paths = write_report(results, out_dir, console=out)
    for name, p in paths.items():
        err.print(f"{name}: {p}", highlight=False)
    return paths


def _run_ravl(
    config: Path | None, sets: list[str] | None, overrides: dict[str, Any], unused: dict[str, Any]
) -> None:
    """The RaVL suite: RavlSuiteConfig keys from -c, then --set, then the options it shares with the
    starft suite (`overrides`, None = not given); an option it does not use (`unused`) is refused."""
    given = [opt for opt, v in unused.items() if v is not None]
    if given:  # never ignore an option silently
        hint = "; RaVL's λ is --set ravl_lam=..." if "--lam" in given else ""
        fail(f"--suite ravl does not use {', '.join(given)}{hint} (its keys: bench/ravl_suite.py)")

    try:
        cfg = ravl_suite.RavlSuiteConfig.model_validate(config_data(config, sets, overrides))
        results = ravl_suite.run_ravl_suite(cfg)
    except BENCH_ERRORS as e:
        _fail_with(e)
    ravl_suite.print_results(results, out)


@app.command("run")
def bench(
    config: Path | None = typer.Option(
        None, "--config", "-c", help="bench YAML (BenchConfig keys; RavlSuiteConfig with --suite ravl)"
    ),
    split: str = typer.Option("val", help="val (tune here) | test (once per setting)"),
    suite: str = typer.Option("starft", help="starft | ravl"),
    out_dir: Path | None = typer.Option(None, "--out", help="output folder (default: the config's out)"),
    rows: str | None = typer.Option(None, help="comma-separated rows (default: all)"),
    seeds: str | None = typer.Option(None, help="fine-tuning seeds, e.g. 0,1,2"),
    pretrain_seeds: str | None = typer.Option(None, "--pretrain-seeds", help="e.g. 0,1"),
    lam: float | None = typer.Option(None, help="λ of the regulariser"),
    kl_scale: float | None = typer.Option(None, "--kl-scale", help="logit scale in the KL"),
    lr: float | None = typer.Option(None, help="fine-tuning lr (the KL rows' own: --set kl_lr=)"),
    steps: int | None = typer.Option(None, help="fine-tuning steps"),
    bank: str | None = typer.Option(None, help="reviewed bank (default: latest with approved backgrounds)"),
    set_: list[str] | None = typer.Option(
        None,
        "--set",
        help="any config key=value, dotted, YAML value: pretrain.world.bias_p=0.8 (ravl: lock_text=true)",
    ),
    threads: int = typer.Option(2, help="torch threads"),
) -> None:
    """Run the benchmark: every row x pretraining seed x fine-tuning seed; table, report.md/json, plot.png."""
    if split not in ("val", "test"):
        raise typer.BadParameter("must be val or test", param_hint="--split")
    if suite not in ("starft", "ravl"):
        raise typer.BadParameter("must be starft or ravl", param_hint="--suite")
    if suite == "ravl":
        _run_ravl(
            config,
            set_,
            {
                "split": split,
                "threads": threads,
                "out_dir": str(out_dir) if out_dir else None,
                "seeds": _ints(seeds, "--seeds"),
                "lr": lr,
                "steps": steps,
            },
            {
                "--rows": rows,
                "--pretrain-seeds": pretrain_seeds,
                "--lam": lam,
                "--kl-scale": kl_scale,
                "--bank": bank,
            },
        )
        return
    try:
        cfg = load_bench_config(
            config,
            set_,
            split=split,
            out=str(out_dir) if out_dir else None,
            rows=_words(rows),
            seeds=_ints(seeds, "--seeds"),
            pretrain_seeds=_ints(pretrain_seeds, "--pretrain-seeds"),
            lam=lam,
            kl_scale=kl_scale,
            lr=lr,
            steps=steps,
            bank=bank,
            threads=threads,
        )
        results = run_bench(cfg)
    except BENCH_ERRORS as e:
        _fail_with(e)
    _report(results, Path(cfg.out))


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("runs/demo"), "--out", help="output folder"),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="bench YAML (default settings otherwise)"
    ),
    seeds: str = typer.Option("0", help="fine-tuning seeds (1-2 fit in 15 minutes)"),
    split: str = typer.Option("val", help="val | test (settings are fixed; tune with `run --split val`)"),
    steps: int | None = typer.Option(None, help="fine-tuning steps (default: the config's, 300)"),
    threads: int = typer.Option(2, help="torch threads"),
) -> None:
    """The main job: reviewed bank, cached zero-shot model, flyp and starft fine-tuned; table and plot."""
    if split not in ("val", "test"):
        raise typer.BadParameter("must be val or test", param_hint="--split")
    t0 = time.time()
    try:
        base = load_bench_config(config)
        bank = base.bank or str(find_reviewed_bank(base.banks_dir, tuple(base.concepts)))
        err.print(f"reviewed bank: {bank}", highlight=False)
        cfg = load_bench_config(
            config,
            out=str(out_dir),
            rows=["zeroshot", "flyp", "starft", "wise_flyp"],
            pretrain_seeds=base.pretrain_seeds[:1],
            seeds=_ints(seeds, "--seeds"),
            split=split,
            bank=bank,
            steps=steps,
            threads=threads,
        )
        results = run_bench(cfg)
    except BENCH_ERRORS as e:
        _fail_with(e)
    _report(results, out_dir)
    err.print(f"demo finished in {time.time() - t0:.0f} s", highlight=False)


if __name__ == "__main__":
    app()
