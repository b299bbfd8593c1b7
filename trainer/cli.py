"""The `trainer` command line: thin typer commands over trainer.train, trainer.wise and trainer.ravl.

trainer run --config configs/example-csv.yaml --bank banks/v47.yaml --method starft --set lr=1e-4
accelerate launch --num_processes 8 -m trainer.cli run --config configs/imagenet-vitb16-starft.yaml
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from trainer.config import load_config
from trainer.errors import USER_ERRORS, fail

# Commands import torch-heavy modules (train, wise, ravl) when they run, so `trainer --help` is instant.

app = typer.Typer(
    help="Robust fine-tuning of open_clip models: StarFT and its baselines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
err = Console(stderr=True, soft_wrap=True)  # one line, however long
out = Console(soft_wrap=True)


@app.command()
def run(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML config (defaults otherwise)")
    ] = None,
    bank: Annotated[str | None, typer.Option(help="descgen bank file (overrides `bank`)")] = None,
    method: Annotated[str | None, typer.Option(help="zeroshot | ft | flyp | starft | kl | ravl")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="override key=value (dotted keys, YAML values); repeatable"),
    ] = None,
    discovered: Annotated[
        str | None, typer.Option(help="ravl: discovery report JSON (from `trainer discover`)")
    ] = None,
    name: Annotated[str | None, typer.Option(help="run directory name under runs_dir")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue the run in its existing directory")
    ] = False,
    max_steps: Annotated[
        int | None, typer.Option("--max-steps", help="stop after N steps (resumable)")
    ] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="torch threads per process")] = None,
) -> None:
    """Fine-tune and evaluate; prints the run directory."""
    try:
        from trainer.train import train

        cfg = load_config(
            config,
            set_,
            bank=bank,
            method=method,
            discovered=discovered,
            name=name,
            max_steps=max_steps,
            threads=threads,
        )
        run_dir = train(cfg, resume=resume)
    except USER_ERRORS as e:
        fail(str(e))
    from accelerate import PartialState

    if PartialState().is_main_process:
        out.print(str(run_dir), markup=False, highlight=False)


@app.command()
def wise(
    run_dir: Annotated[Path, typer.Argument(help="a finished run directory")],
    alpha: Annotated[
        float, typer.Option(help="weight of the fine-tuned model (0 = zero-shot, 1 = fine-tuned)")
    ] = 0.5,
    checkpoint: Annotated[str, typer.Option(help="last | best")] = "last",
) -> None:
    """WiSE-FT: interpolate a run with its zero-shot model, evaluate, print the output directory."""
    if checkpoint not in ("last", "best"):
        raise typer.BadParameter("must be last or best", param_hint="--checkpoint")
    try:
        from trainer.wise import wise as wise_fn

        path = wise_fn(run_dir, alpha, checkpoint)  # type: ignore[arg-type]
    except USER_ERRORS as e:
        fail(str(e))
    out.print(str(path), markup=False, highlight=False)


@app.command()
def discover(
    run_dir: Annotated[Path, typer.Argument(help="a finished run directory")],
    data: Annotated[Path, typer.Option(help="labelled evaluation CSV (path,label[,...])")],
    classes: Annotated[
        Path | None, typer.Option(help="class-names file; default: the run's training classes")
    ] = None,
    grid: Annotated[str, typer.Option(help="equal grid of regions, ROWSxCOLS")] = "2x2",
    boxes: Annotated[
        Path | None, typer.Option(help="regions from a CSV path,x0,y0,x1,y1 (instead of --grid)")
    ] = None,
    mode: Annotated[str, typer.Option(help="crop | roi")] = "crop",
    out_dir: Annotated[Path | None, typer.Option("--out", help="output folder; default RUN/discover")] = None,
    checkpoint: Annotated[str, typer.Option(help="auto (best, else last) | best | last")] = "auto",
    to_bank: Annotated[
        Path | None,
        typer.Option("--to-bank", help="bank to derive a new version from (proposed descriptors)"),
    ] = None,
    candidates: Annotated[
        Path | None, typer.Option(help="naming candidates, one phrase a line (with --to-bank)")
    ] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="torch threads")] = None,
) -> None:
    """RaVL discovery with a run's checkpoint: tables, report.json and features.png; prints the report path."""
    if mode not in ("crop", "roi"):
        raise typer.BadParameter("must be crop or roi", param_hint="--mode")
    if checkpoint not in ("auto", "best", "last"):
        raise typer.BadParameter("must be auto, best or last", param_hint="--checkpoint")
    if candidates is not None and to_bank is None:
        raise typer.BadParameter("needs --to-bank", param_hint="--candidates")
    try:
        import torch

        from trainer.ravl.report import discover_run

        if threads:
            torch.set_num_threads(threads)
        res = discover_run(
            run_dir,
            data,
            classes,
            grid,
            boxes,
            mode,
            out_dir,
            checkpoint,
            to_bank,
            candidates,
            console=err,  # type: ignore[arg-type]
        )
    except USER_ERRORS as e:
        fail(str(e))
    err.print(f"contact sheet: {res['sheet']}", highlight=False)
    if res["bank"] is not None:
        err.print(f"bank: {res['bank']}", highlight=False)
    out.print(str(res["report_path"]), markup=False, highlight=False)


if __name__ == "__main__":
    app()
