"""The `trainer` command line: thin typer commands over trainer.train, trainer.wise and trainer.ravl.

trainer run --config configs/example-csv.yaml --bank banks/v49.yaml --method starft --set lr=1e-4
accelerate launch --num_processes 8 -m trainer.cli run --config configs/imagenet-vitb16-starft.yaml
"""

from __future__ import annotations

import json
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
    method: Annotated[
        str | None,
        typer.Option(
            help="zeroshot | ft | flyp | starft | kl | ravl | vl_erm | vl_gdro | lipsum | carot | carft | lpft "
            "(the baselines' own options: method_options, docs/baselines.md)"
        ),
    ] = None,
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
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="check everything, print the plan, write nothing")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="with --dry-run: the plan as JSON")] = False,
) -> None:
    """Fine-tune and evaluate; prints the run directory (with --dry-run: the plan)."""
    if as_json and not dry_run:
        raise typer.BadParameter("needs --dry-run", param_hint="--json")
    try:
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
        if dry_run:
            from trainer.plan import make_plan, render_plan

            plan = make_plan(cfg)
            typer.echo(json.dumps(plan, indent=2) if as_json else render_plan(plan))
            return
        from trainer.train import train

        run_dir = train(cfg, resume=resume)
    except USER_ERRORS as e:
        fail(str(e))
    _print_and_end(run_dir)


def _print_and_end(path: Path) -> None:
    """Print the output directory once, and end a launched command's process group (train() and wise()
    leave it for callers that go on): a gloo or NCCL group left to the interpreter's exit can abort it."""
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process:
        out.print(str(path), markup=False, highlight=False)
    state.destroy_process_group()


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
    _print_and_end(path)


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


@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(help="finished run directories")],
    checkpoint: Annotated[
        str, typer.Option(help="auto (best where a run has it) | best (chosen on ID validation) | final")
    ] = "auto",
    ood: Annotated[
        str | None, typer.Option(help="comma-separated OOD sets to average (default: every OOD set)")
    ] = None,
    png: Annotated[Path | None, typer.Option(help="also write the table as a PNG image")] = None,
    md: Annotated[Path | None, typer.Option(help="also write the markdown to a file")] = None,
) -> None:
    """Runs as one table in the paper's form (ID, OOD sets, OOD avg, worst and average group, ID and OOD ECE)."""
    if checkpoint not in ("auto", "final", "best"):
        raise typer.BadParameter("must be auto, final or best", param_hint="--checkpoint")
    try:
        from trainer.report import collect, render_markdown, render_png

        table = collect(runs, checkpoint, [s.strip() for s in ood.split(",")] if ood else None)
    except USER_ERRORS as e:
        fail(str(e))
    text = render_markdown(table)
    if md is not None:
        md.write_text(text)
    if png is not None:
        err.print(f"table: {render_png(table, png)}", highlight=False)
    typer.echo(text, nl=False)


@app.command()
def perf(
    model: Annotated[str, typer.Option(help="open_clip architecture or model-config JSON")] = "ViT-B-16",
    batch: Annotated[int, typer.Option(help="batch per step", min=2)] = 16,
    steps: Annotated[int, typer.Option(help="measured rounds (one step of every row each)", min=1)] = 3,
    warmup: Annotated[int, typer.Option(help="warm-up rounds", min=0)] = 1,
    threads: Annotated[int, typer.Option("--threads", help="torch threads", min=1)] = 2,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    workers: Annotated[int, typer.Option(help="DataLoader workers for the loader measurement", min=0)] = 2,
    loader_images: Annotated[int, typer.Option(help="synthetic JPEGs the loader is timed on", min=2)] = 64,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the report as JSON")] = None,
    compile_: Annotated[bool, typer.Option("--compile", help="torch.compile the student's towers")] = False,
    grad_checkpointing: Annotated[
        bool, typer.Option("--grad-checkpointing", help="open_clip's gradient checkpointing")
    ] = False,
) -> None:
    """Step time and peak memory of flyp and starft (reference and optimised), side by side; random init."""
    if device not in ("auto", "cpu", "cuda"):
        raise typer.BadParameter("must be auto, cpu or cuda", param_hint="--device")
    try:
        from trainer.perf import measure, render, write_report

        report = measure(
            model, batch, steps, warmup, threads, device, loader_workers=workers, loader_images=loader_images,
            log=lambda line: err.print(line, markup=False, highlight=False), compile=compile_,
            grad_checkpointing=grad_checkpointing,
        )  # fmt: skip
    except USER_ERRORS as e:
        fail(str(e))
    if json_out is not None:
        write_report(report, json_out)
    typer.echo(render(report))


@app.command()
def explain(
    runs: Annotated[list[Path], typer.Argument(help="finished run directories (one zero-shot model)")],
    images: Annotated[
        Path, typer.Option(help="image folder (class subfolders give labels) or CSV path,label[,group]")
    ],
    classes: Annotated[
        str | None,
        typer.Option(help="class-names file or comma list; default: the first run's training classes"),
    ] = None,
    out_png: Annotated[
        Path | None, typer.Option("--out", help="PNG path; default RUN/explain/<images>.png")
    ] = None,
    limit: Annotated[int, typer.Option(help="images, evenly spaced through the set", min=1)] = 8,
    target: Annotated[
        str, typer.Option(help="true (the label where known, else the prediction) | pred")
    ] = "true",
    checkpoint: Annotated[str, typer.Option(help="auto (best, else last) | best | last")] = "auto",
    layer: Annotated[
        str, typer.Option(help="image-tower module to take the CAM at (auto: last ViT block; ResNet stage)")
    ] = "auto",
    device: Annotated[str, typer.Option(help="auto (cuda if available) | cpu | cuda[:N]")] = "auto",
    threads: Annotated[int | None, typer.Option("--threads", help="torch threads")] = None,
) -> None:
    """Grad-CAM maps of the zero-shot model and each run side by side on the same images; prints the PNG."""
    if target not in ("true", "pred"):
        raise typer.BadParameter("must be true or pred", param_hint="--target")
    if checkpoint not in ("auto", "best", "last"):
        raise typer.BadParameter("must be auto, best or last", param_hint="--checkpoint")
    try:
        import torch

        from trainer.explain import explain as explain_fn

        if threads:
            torch.set_num_threads(threads)
        res = explain_fn(runs, images, classes, out_png, limit, target, checkpoint, layer, device)  # type: ignore[arg-type]
    except USER_ERRORS as e:
        fail(str(e))
    out.print(str(res.out), markup=False, highlight=False)


if __name__ == "__main__":
    app()
