"""What RaVL discovery found, for people: tables, a contact sheet, named features proposed to a bank, and
`discover_run`, the `trainer discover RUN` command's library function.

    from trainer.ravl.report import discover_run; res = discover_run("runs/flyp-run", "eval.csv", grid="2x2")
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image, ImageDraw
from rich.console import Console
from rich.table import Table

from descgen.bank import BankDoc, load_bank
from descgen.edits import add_discovered
from descgen.errors import DescgenError
from trainer.config import load_config
from trainer.data import read_lines
from trainer.errors import ConfigError, DataError, RunDirError
from trainer.model import build_clip
from trainer.ravl.discover import (
    DiscoverConfig,
    Report,
    discover,
    read_rows,
    report_model_path,
    save_report,
)
from trainer.ravl.regions import class_embeddings


def feature_tables(report: Report, top: int | None = None) -> list:
    """A rich Table per discovered feature: per-class accuracy with and without it."""

    tables = []
    by_cluster = {s.cluster: s for s in report.clusters}
    for f in report.features[:top]:
        s = by_cluster[f.cluster]
        t = Table(
            title=f"Feature #{f.rank + 1}: cluster {f.cluster} ({s.size} regions in {s.n_images} images)",
            caption=f"gap score {f.gap_score:.3f} · influence {f.influence:.2f}",
        )
        for col in ("class", "acc with", "n", "acc without", "n", "w", "gap"):
            t.add_column(col, justify="left" if col == "class" else "right")
        for g in sorted(s.gaps, key=lambda g: g.gap):
            colour = "red" if g.gap < 0 else "green"
            t.add_row(
                report.classnames[g.label],
                f"{g.acc_in:.3f}",
                str(g.n_in),
                f"{g.acc_out:.3f}",
                str(g.n_out),
                f"{g.weight:.2f}",
                f"[{colour}]{g.gap:+.3f}[/{colour}]",
            )
        tables.append(t)
    return tables


def print_report(report: Report, console=None, top: int | None = 3) -> None:

    console = console or Console()
    console.print(
        f"{len(report.images)} images, {len(report.regions)} regions, k = {report.k}, "
        f"image accuracy {report.image_accuracy:.3f}, {len(report.features)} feature(s) discovered"
    )
    for t in feature_tables(report, top):
        console.print(t)


def contact_sheet(report: Report, out: str | Path, top: int = 10, features: int = 3, thumb: int = 64) -> Path:
    """PNG: one row per feature (up to `features`), its `top` regions nearest the medoid."""

    rows = report.features[:features]
    label_w, pad = 150, 4
    W = label_w + top * (thumb + pad) + pad
    H = max(1, len(rows)) * (thumb + pad) + pad
    sheet = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(sheet)
    if not rows:
        draw.text((pad, pad), "no feature discovered", fill="black")
    cache: dict[str, Image.Image] = {}
    for i, f in enumerate(rows):
        y = pad + i * (thumb + pad)
        draw.text((pad, y + 2), f"#{f.rank + 1} cluster {f.cluster}", fill="black")
        draw.text((pad, y + 16), f"gap {f.gap_score:.2f} infl {f.influence:.2f}", fill="black")
        for j, r in enumerate(f.region_ids[:top]):
            reg = report.regions[r]
            path = report.images[reg.image].path
            if path not in cache:
                with Image.open(path) as im:
                    cache[path] = im.convert("RGB")
            crop = cache[path].crop(tuple(round(v) for v in reg.box)).resize((thumb, thumb), Image.NEAREST)
            sheet.paste(crop, (label_w + pad + j * (thumb + pad), y))
    out = Path(out)
    sheet.save(out)
    return out


# --- bridge to banks ------------------------------------------------------------------------


@torch.no_grad()
def name_features(
    report: Report,
    model,
    tokenizer: Callable,
    phrases: Sequence[str],
    top: int = 3,
    templates: Sequence[str] = ("{c}", "a photo {c}."),
) -> list[list[tuple[str, float]]]:
    """Per feature, the `top` candidate phrases nearest its medoid in the joint space (phrase, cosine)."""
    phrases = list(dict.fromkeys(phrases))
    if not phrases:
        raise ValueError("no candidate phrases to name features with")
    text = class_embeddings(model, tokenizer, phrases, templates).float().cpu()
    med = torch.tensor(report.medoid_embeddings, dtype=torch.float32)
    out = []
    for f in report.features:
        sim = text @ med[f.cluster]
        order = torch.argsort(sim, descending=True)[:top]
        out.append([(phrases[i], round(float(sim[i]), 4)) for i in order])
    return out


def bank_phrases(bank_path: str | Path) -> list[str]:
    """Descriptor phrases of a bank (all statuses but rejected), as naming candidates."""

    bank = load_bank(bank_path)
    return [d.text for c in bank.concepts for d in c.descriptors if d.status != "rejected"]


def propose_to_bank(
    report: Report,
    bank_path: str | Path,
    names: Sequence[Sequence[tuple[str, float]]],
    concept: str = "discovered",
    form: Literal["prefix", "suffix"] = "suffix",
    banks_dir: str | Path | None = None,
    out: str | Path | None = None,
    report_path: str | Path | None = None,
    model_id: str | None = None,
) -> Path:
    """Hand each named feature to descgen as a proposed descriptor of a new bank version (source:
    discovered), with its evidence from the report. `names[i]` are feature i's candidate phrases, best
    first (from `name_features`). Returns the path of the new version."""
    doc = BankDoc.load(bank_path).derive()
    gid = doc.start_generation(
        f"discover --to-bank ({report_path or 'report'})", **({"model": {"id": model_id}} if model_id else {})
    )
    by_cluster = {s.cluster: s for s in report.clusters}
    features = []
    for f, cands in zip(report.features, names):
        s = by_cluster[f.cluster]
        evidence = {
            "report": str(report_path) if report_path else None,
            "feature_rank": f.rank + 1,
            "cluster": f.cluster,
            "gap_score": round(f.gap_score, 4),
            "influence": round(f.influence, 4),
            "gaps": {report.classnames[g.label]: round(g.gap, 4) for g in s.gaps},
            "region_ids": f.region_ids[:10],
        }
        features.append((cands, evidence))
    added, matched = add_discovered(
        doc, concept, form, features, gid, hint="image features found by RaVL region-level discovery"
    )
    doc.finish_generation(
        gid,
        stop_reason="done",
        stats={"features": len(report.features), "added": len(added), "matched_existing": len(matched)},
    )
    return doc.save(banks_dir if banks_dir is not None else Path(bank_path).parent, out=out)


def propose_features(
    report: Report,
    bank_path: str | Path,
    model,
    tokenizer: Callable,
    candidates: Sequence[str] = (),
    use_bank_phrases: bool = True,
    **kwargs: Any,
) -> Path:
    """`trainer discover ... --to-bank`: name the features among `candidates` (and the bank's own
    descriptor phrases) and write them into a new bank version; kwargs go to `propose_to_bank`."""
    phrases = list(candidates) + (bank_phrases(bank_path) if use_bank_phrases else [])
    return propose_to_bank(report, bank_path, name_features(report, model, tokenizer, phrases), **kwargs)


# --- trainer discover -----------------------------------------------------------------------


def _grid(text: str) -> tuple[int, int]:
    try:
        r, c = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--grid {text!r}: expected ROWSxCOLS, e.g. 2x2") from None
    if r < 1 or c < 1:
        raise ConfigError(f"--grid {text!r}: rows and cols must be >= 1")
    return r, c


def discover_run(
    run_dir: str | Path,
    data: str | Path,
    classes: str | Path | None = None,
    grid: str = "2x2",
    boxes: str | Path | None = None,
    mode: Literal["crop", "roi"] = "crop",
    out: str | Path | None = None,
    checkpoint: Literal["best", "last", "auto"] = "auto",
    to_bank: str | Path | None = None,
    candidates: str | Path | None = None,
    console=None,
    seed: int = 0,
    clustering: Literal["fasterpam", "alternate"] = "fasterpam",
) -> dict[str, Any]:
    """Discovery with a run's checkpoint on a labelled set; writes report.json, report.model.json and
    features.png into `out` (default RUN/discover) and, with `to_bank`, a new bank version.
    Returns {"report", "report_path", "sheet", "bank"}."""

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise RunDirError(f"{run_dir}: not a run directory (no config.yaml)")
    names = ("best", "last") if checkpoint == "auto" else (checkpoint,)
    ckpt = next(
        (
            run_dir / "checkpoints" / f"{n}.safetensors"
            for n in names
            if (run_dir / "checkpoints" / f"{n}.safetensors").is_file()
        ),
        None,
    )
    if ckpt is None:
        raise RunDirError(f"{run_dir}: no {' or '.join(names)} checkpoint (is the run finished?)")
    cfg = load_config(run_dir / "config.yaml")
    if classes is not None:
        classnames = read_lines(classes, "class-names")
    else:
        spec = cfg.data.train.classes if cfg.data.train else None
        if spec is None:
            raise ConfigError(f"{run_dir}: the run has no training class names; pass --classes")
        classnames = list(spec) if isinstance(spec, list) else read_lines(spec, "class-names")
    data = Path(data)
    if not data.is_file():
        raise DataError(f"{data}: no such CSV file")
    try:
        rows = read_rows(data, classnames)
    except (ValueError, KeyError, UnicodeDecodeError) as e:
        raise DataError(f"{data}: {str(e).splitlines()[0]}") from None
    if not rows:
        raise DataError(f"{data}: no rows")
    missing = next((p for p, _ in rows if not Path(p).is_file()), None)
    if missing:
        raise DataError(f"{data}: missing image {missing}")
    if boxes is not None and not Path(boxes).is_file():
        raise DataError(f"{boxes}: no such boxes CSV")
    dcfg = DiscoverConfig(
        grid=_grid(grid),
        boxes_csv=str(boxes) if boxes else None,
        mode=mode,
        clustering=clustering,
        seed=seed,
        n_cpu=torch.get_num_threads(),
    )
    clip, preprocess, tokenizer = build_clip(cfg.model, str(ckpt))
    clip.eval()
    try:
        report = discover(clip, preprocess, tokenizer, rows, classnames, dcfg)
    except ValueError as e:  # e.g. a boxes CSV without boxes for an image, too few regions for k
        raise DataError(f"discover: {str(e).splitlines()[0]}") from None
    out_dir = Path(out) if out is not None else run_dir / "discover"
    out_dir.mkdir(parents=True, exist_ok=True)
    report_path = save_report(report, out_dir / "report.json")
    report_model_path(report_path).write_text(
        json.dumps(
            {"run": str(run_dir), "model": cfg.model, "weights": str(ckpt.resolve()), "data": str(data)},
            indent=1,
        )
        + "\n"
    )
    sheet = contact_sheet(report, out_dir / "features.png")
    if console is not None:
        print_report(report, console)
    bank_path = None
    if to_bank is not None:
        phrases = read_lines(candidates, "candidates") if candidates else []
        try:
            bank_path = propose_features(
                report, to_bank, clip, tokenizer, phrases, report_path=report_path, model_id=str(ckpt)
            )
        except (DescgenError, ValueError) as e:
            raise ConfigError(f"--to-bank {to_bank}: {str(e).splitlines()[0]}") from None
    return {"report": report, "report_path": report_path, "sheet": sheet, "bank": bank_path}
