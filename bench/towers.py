"""Which tower forgot? Evaluate fine-tuned runs with one tower put back to the zero-shot model's.

    python -m bench.towers runs/bench-store/p0/flyp-s10-*/ runs/bench-store/p0/starft-s10-*/

For each run, four models are evaluated on the run's own eval sets (the bench's ID, A-shift and task-B
sets): zero-shot, fine-tuned, and the two hybrids — the fine-tuned image tower with the zero-shot text
tower, and the zero-shot image tower with the fine-tuned text tower; and the fine-tuned model with the
zero-shot model's batch-norm running statistics (ModifiedResNet image towers have BN). A column that the
first hybrid keeps and the second loses was forgotten by the text tower, and the reverse.

Where does the regulariser hold? `kl_drift` measures, per eval set, the mean KL(zero-shot || fine-tuned)
that L_Star penalises, over every caption "a photo of a {class} {descriptor}" of the set's classes and the
bank's approved descriptors (own-class captions masked, the teacher's logit scale): on task A's images it
is what the regulariser was trained on; on task B's it is what it should carry over to. Also the KL of the
zero-shot classification head (class prompts). Diagnostics, not methods.
"""

# ruff: noqa: B008  -- typer.Option defaults

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import typer
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file

from bench.suite import COLUMNS as BENCH_COLUMNS
from bench.suite import find_reviewed_bank
from descgen.bank import load_bank
from descgen.errors import DescgenError
from trainer.config import load_config
from trainer.data import fill_template, head_templates, load_image_set
from trainer.errors import TrainerError, fail
from trainer.evaluate import evaluate_sets, make_eval_sets, zero_shot_head
from trainer.model import build_clip

LABELS = {
    "ID": "id",
    "A sketch": "a_sketch",
    "B worst": "b_worst",
    "B avg": "b_avg",
    "B plain": "b_plain",
    "B sketch": "b_sketch",
}
COLUMNS = {label: BENCH_COLUMNS[key] for label, key in LABELS.items()}  # label -> (eval set, metric)


def hybrid_state(
    image_from: dict[str, torch.Tensor], text_from: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """open_clip CLIP state dict: `visual.*` from one model, everything else (text tower, scale) from the other."""
    return {k: (image_from[k] if k.startswith("visual.") else v) for k, v in text_from.items()}


def with_bn_stats(
    stats_from: dict[str, torch.Tensor], rest: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """`rest` with batch-norm running statistics taken from `stats_from` (learned weights untouched)."""
    keys = ("running_mean", "running_var", "num_batches_tracked")
    return {k: (stats_from[k] if k.rsplit(".", 1)[-1] in keys else v) for k, v in rest.items()}


def _load_run(run_dir: str | Path, threads: int, sets: tuple[str, ...] | None = None):
    """(config, CLIP in eval mode with zero-shot weights, tokenizer, zero-shot state, fine-tuned state, eval
    loaders) of a finished run; `sets` keeps only the eval sets of those names."""

    torch.set_num_threads(threads)
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    clip, preprocess, tokenizer = build_clip(cfg.model, cfg.pretrained)
    clip.eval()
    zs = {k: v.clone() for k, v in clip.state_dict().items()}
    ft = load_file(str(run_dir / "checkpoints" / "last.safetensors"))
    base = load_image_set(cfg.data.val, cfg.templates)
    every = [base] + [load_image_set(s, cfg.templates, base.classes) for s in cfg.data.eval]
    chosen = every if sets is None else [s for s in every if s.name in sets]
    return cfg, clip, tokenizer, zs, ft, make_eval_sets(chosen, preprocess, cfg.eval_batch_size, None)


@torch.no_grad()
def tower_swap(run_dir: str | Path, threads: int = 1) -> dict[str, dict[str, float]]:
    """{model: {column: value}} for zero-shot, fine-tuned, both hybrids, and fine-tuned with zero-shot BN stats."""

    _, clip, tokenizer, zs, ft, loaders = _load_run(run_dir, threads)
    models = {
        "zero-shot": zs,
        "fine-tuned": ft,
        "ft image + zs text": hybrid_state(ft, zs),
        "zs image + ft text": hybrid_state(zs, ft),
        "fine-tuned, zs BN stats": with_bn_stats(zs, ft),
    }
    out: dict[str, dict[str, float]] = {}
    for name, state in models.items():
        clip.load_state_dict(state)
        metrics = evaluate_sets(clip, tokenizer, loaders)
        out[name] = {col: round(metrics[s][k], 1) for col, (s, k) in COLUMNS.items() if s in metrics}
    return out


def mean_kl(logits_p: torch.Tensor, logits_q: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean over rows of KL(softmax p || softmax q), masked entries left out of both distributions."""
    if mask is not None:
        logits_p = logits_p.masked_fill(mask, float("-inf"))
        logits_q = logits_q.masked_fill(mask, float("-inf"))
    log_p, log_q = logits_p.log_softmax(1), logits_q.log_softmax(1)
    terms = log_p.exp() * (log_p - log_q)
    if mask is not None:
        terms = terms.masked_fill(mask, 0.0)
    return float(terms.sum(1).mean())


def descriptor_part(
    logits_p: torch.Tensor, logits_q: torch.Tensor, class_mask: torch.Tensor, n_desc: int
) -> tuple[float, float]:
    """Chain rule on (class, descriptor) captions: KL = KL over classes + E_p(class)[KL over descriptors | class].

    Returns the descriptor term (mean over rows) and the teacher's descriptor entropy given the class, as a
    share of log(n_desc): 1 means the teacher cannot tell the descriptors apart on these images.
    """
    n = logits_p.shape[0]
    lp, lq = logits_p.view(n, -1, n_desc), logits_q.view(n, -1, n_desc)
    p_class = lp.logsumexp(2).masked_fill(class_mask, float("-inf")).softmax(1)  # (N, C), own class 0
    cp, cq = lp.log_softmax(2), lq.log_softmax(2)
    kl_given_class = (cp.exp() * (cp - cq)).sum(2)
    entropy = -(cp.exp() * cp).sum(2) / math.log(n_desc) if n_desc > 1 else torch.zeros_like(kl_given_class)
    return (
        float((p_class * kl_given_class).sum(1).mean()),
        float((p_class * entropy).sum(1).mean()),
    )


@torch.no_grad()
def kl_drift(
    run_dir: str | Path,
    bank: str | Path | None = None,
    sets: tuple[str, ...] = ("a", "b_groups"),
    threads: int = 1,
) -> dict[str, dict[str, float]]:
    """KL(zero-shot || fine-tuned) of a finished run on each of `sets` (eval set names).

    Per set: "star" over the captions (class x approved descriptor, own class masked, the teacher's scale or
    the run's kl_scale), "star_descriptor" its part between descriptors of one class (chain rule),
    "teacher_descriptor_entropy" (1 = the zero-shot model scores a class's descriptors alike), and "head"
    over the class prompts. The bank is the run's own, else `bank`, else the newest reviewed one (so flyp
    runs can be measured too).
    """

    cfg, clip, tokenizer, zs, ft, loaders = _load_run(run_dir, threads, sets)
    bank_path = cfg.bank or bank or find_reviewed_bank("banks", tuple(cfg.concepts))
    descriptors = load_bank(bank_path).approved_styled(list(cfg.concepts))
    scale = float(cfg.kl_scale or clip.logit_scale.exp())
    feats: dict[str, dict[str, tuple[torch.Tensor, ...]]] = {}
    for name, state in (("zs", zs), ("ft", ft)):
        clip.load_state_dict(state)
        for es in loaders:
            s = es.image_set
            caps = [
                d.caption(fill_template(cfg.caption, c), c, st) for c in s.classes for d, st in descriptors
            ]
            star = clip.encode_text(tokenizer(caps), normalize=True).float()
            head = zero_shot_head(clip, tokenizer, s.classes, head_templates(s))
            img = torch.cat([clip.encode_image(b["image"], normalize=True).float() for b in es.loader])
            feats.setdefault(s.name, {})[name] = (img, star, head)
    out = {}
    for es in loaders:
        s = es.image_set
        (iz, sz, hz), (if_, sf, hf) = feats[s.name]["zs"], feats[s.name]["ft"]
        labels = torch.as_tensor(s.labels)
        cap_class = torch.arange(len(s.classes)).repeat_interleave(len(descriptors))
        mask = labels[:, None] == cap_class[None, :]
        lp, lq = scale * iz @ sz.T, scale * if_ @ sf.T
        desc_kl, desc_entropy = descriptor_part(lp, lq, mask[:, :: len(descriptors)], len(descriptors))
        out[s.name] = {
            "star": round(mean_kl(lp, lq, mask), 3),
            "star_descriptor": round(desc_kl, 3),
            "teacher_descriptor_entropy": round(desc_entropy, 3),
            "head": round(mean_kl(scale * iz @ hz.T, scale * if_ @ hf.T), 3),
        }
    return out


def main(
    runs: list[Path],
    towers: bool = typer.Option(True, help="the tower-swap table of each run"),
    kl: bool = typer.Option(True, help="one table of KL drift (task A vs task B) over all runs"),
    bank: Path | None = typer.Option(None, help="bank for runs without one (default: newest reviewed)"),
) -> None:
    """Tower-swap tables and KL drift for finished trainer runs (config.yaml, checkpoints/last.safetensors)."""

    console = Console()
    for run in runs:
        if not (Path(run) / "checkpoints" / "last.safetensors").is_file():
            fail(f"{run}: not a finished run (no checkpoints/last.safetensors)")
    for run in runs if towers else []:
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
    if not kl:
        return
    table = Table(
        title="KL(zero-shot || fine-tuned) on task A and B images: over L_Star's captions (star), its part"
        " between descriptors of a class (desc), over the class head (head); H = teacher's descriptor"
        " entropy / max"
    )
    for c in ("run", "star A", "star B", "desc A", "desc B", "head A", "head B", "H B"):
        if c == "run":
            table.add_column(c, overflow="fold")  # long run paths fold; the numbers never wrap
        else:
            table.add_column(c, justify="right", no_wrap=True)
    for run in runs:
        try:
            d = kl_drift(run, bank)
        except (TrainerError, DescgenError, FileNotFoundError) as e:
            fail(str(e))
        keys = ("star", "star_descriptor", "head")
        cells = [d.get(s, {}).get(k) for k in keys for s in ("a", "b_groups")]
        cells.append(d.get("b_groups", {}).get("teacher_descriptor_entropy"))
        table.add_row("/".join(Path(run).parts[-2:]), *("–" if v is None else f"{v:.3f}" for v in cells))
    console.print(table)


if __name__ == "__main__":
    typer.run(main)  # typer turns `fail`'s Exit into exit code 1 without a traceback
