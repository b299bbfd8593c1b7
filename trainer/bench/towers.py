"""Which tower forgot? Evaluate fine-tuned runs with one tower put back to the zero-shot model's.

    python -m trainer.bench.towers runs/bench-store/p0/flyp-s10-*/ runs/bench-store/p0/starft-s10-*/

For each run, four models are evaluated on the run's own eval sets (the bench's ID, A-shift and task-B
sets): zero-shot, fine-tuned, and the two hybrids — the fine-tuned image tower with the zero-shot text
tower, and the zero-shot image tower with the fine-tuned text tower; and the fine-tuned model with the
zero-shot model's batch-norm running statistics (ModifiedResNet image towers have BN). A column that the
first hybrid keeps and the second loses was forgotten by the text tower, and the reverse. A diagnostic,
not a method.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from trainer.bench.suite import COLUMNS as BENCH_COLUMNS

LABELS = {
    "ID": "id",
    "A sketch": "a_sketch",
    "B worst": "b_worst",
    "B avg": "b_avg",
    "B plain": "b_plain",
    "B sketch": "b_sketch",
}
COLUMNS = {label: BENCH_COLUMNS[key] for label, key in LABELS.items()}  # label -> (eval set, metric)


def _hybrid(
    image_from: dict[str, torch.Tensor], text_from: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """open_clip CLIP state dict: `visual.*` from one model, everything else (text tower, scale) from the other."""
    return {k: (image_from[k] if k.startswith("visual.") else v) for k, v in text_from.items()}


def _bn_stats(stats_from: dict[str, torch.Tensor], rest: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`rest` with batch-norm running statistics taken from `stats_from` (learned weights untouched)."""
    keys = ("running_mean", "running_var", "num_batches_tracked")
    return {k: (stats_from[k] if k.rsplit(".", 1)[-1] in keys else v) for k, v in rest.items()}


@torch.no_grad()
def tower_swap(run_dir: str | Path, threads: int = 1) -> dict[str, dict[str, float]]:
    """{model: {column: value}} for zero-shot, fine-tuned, both hybrids, and fine-tuned with zero-shot BN stats."""
    from safetensors.torch import load_file

    from trainer.config import load_config
    from trainer.data import load_image_set
    from trainer.evaluate import evaluate_sets, make_eval_sets
    from trainer.model import build_clip

    torch.set_num_threads(threads)
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    clip, preprocess, tokenizer = build_clip(cfg.model, cfg.pretrained)
    zs = {k: v.clone() for k, v in clip.state_dict().items()}
    ft = load_file(str(run_dir / "checkpoints" / "last.safetensors"))
    base = load_image_set(cfg.data.val, cfg.templates)
    sets = [base] + [load_image_set(s, cfg.templates, base.classes) for s in cfg.data.eval]
    loaders = make_eval_sets(sets, preprocess, cfg.eval_batch_size, None)
    models = {
        "zero-shot": zs,
        "fine-tuned": ft,
        "ft image + zs text": _hybrid(ft, zs),
        "zs image + ft text": _hybrid(zs, ft),
        "fine-tuned, zs BN stats": _bn_stats(zs, ft),
    }
    out: dict[str, dict[str, float]] = {}
    for name, state in models.items():
        clip.load_state_dict(state)
        metrics = evaluate_sets(clip, tokenizer, loaders)
        out[name] = {col: round(metrics[s][k], 1) for col, (s, k) in COLUMNS.items() if s in metrics}
    return out


def main(runs: list[Path]) -> None:
    """Tower-swap tables for finished trainer runs (their config.yaml and checkpoints/last.safetensors)."""
    from rich.console import Console
    from rich.table import Table

    from trainer.errors import TrainerError, fail

    console = Console()
    for run in runs:
        if not (Path(run) / "checkpoints" / "last.safetensors").is_file():
            fail(f"{run}: not a finished run (no checkpoints/last.safetensors)")
        try:
            res: dict[str, Any] = tower_swap(run)
        except TrainerError as e:
            fail(str(e))  # trainer errors name their file
        table = Table(title=str(run))
        table.add_column("model")
        cols = list(next(iter(res.values())))
        for c in cols:
            table.add_column(c, justify="right")
        for name, row in res.items():
            table.add_row(name, *(f"{row[c]:.1f}" for c in cols))
        console.print(table)


if __name__ == "__main__":
    import typer

    typer.run(main)  # typer turns `fail`'s Exit into exit code 1 without a traceback
