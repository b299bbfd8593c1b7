"""RaVL in the trainer: `trainer run --method ravl --discovered REPORT.json` and `trainer discover RUN`.

    trainer discover runs/flyp-run --data eval.csv --grid 2x2      # -> runs/flyp-run/discover/report.json
    trainer run --config c.yaml --method ravl --discovered runs/flyp-run/discover/report.json

Mitigation (RaVL sec. 4.1, appendix C/D.2): before training every region of every fine-tuning image is
assigned to a cluster by the report's k-medoids (with the model the report was made with, recorded in
`report.model.json` beside it); regions of the top-ranked feature form R_i^s. Class labels ŷ_i are the
dataset labels. The text tower and the logit scale are frozen, the image tower is trained; class prompts
are embedded once (frozen text tower, the training set's templates). Per step
    L = λ·L_CL + (1 − λ)·(L_R + L_A)        (`trainer.ravl.ravl_loss`, paper: λ = 0.8, τ = 0.07)
with region embeddings computed in the model's forward (through the DDP wrapper, so their gradients are
synced) and all-gathered with gradient, so the loss is that of the global batch.

Options (`method_options`, validated by `RavlOptions`): lam 0.8, tau 0.07, region_mode roi|crop,
top 1, reduction mean|sum, assign_weights (weights that embed the training regions; default: the
report's model). Only grid reports can label a training set (boxes CSVs would need per-image boxes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trainer.errors import ConfigError, DataError, RunDirError
from trainer.ravl import grid_boxes, ravl_loss
from trainer.train import MethodSpec, StepContext, _gather_with_grad, register_method


class RavlOptions(BaseModel):
    """`method_options` of method ravl."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lam: float = Field(0.8, ge=0, le=1, description="weight of L_CL; (1 − lam) weighs L_R + L_A")
    tau: float = Field(0.07, gt=0, description="temperature of the region-aware loss")
    region_mode: Literal["crop", "roi"] = Field(
        "roi", description="roi: RoIAlign on the tower's feature map (measured better and faster); crop"
    )
    top: int = Field(1, ge=1, description="discovered features whose regions are spurious (paper: 1)")
    reduction: Literal["mean", "sum"] = Field("mean", description="over images; sum is the paper's Σ_i")
    assign_model: str | None = Field(None, description="model config of the report's model; default: run's")
    assign_weights: str | None = Field(None, description="weights of the report's model; default: sidecar")


def ravl_options(cfg) -> RavlOptions:
    try:
        return RavlOptions.model_validate(cfg.method_options)
    except ValidationError as e:
        from trainer.config import describe_error

        raise ConfigError(f"method_options: {describe_error(e)}") from None


def sidecar_path(report_path: str | Path) -> Path:
    """`report.json` -> `report.model.json`: which model made the report (needed to assign regions)."""
    p = Path(report_path)
    return p.with_name(p.stem + ".model.json")


def _setup(cfg, train_set, clip, preprocess, tokenizer) -> dict[str, Any]:
    from trainer.discover import assign_dataset, load_report
    from trainer.evaluate import zero_shot_head
    from trainer.model import build_clip

    opts = ravl_options(cfg)
    path = Path(cfg.discovered)
    try:
        report = load_report(path)
    except FileNotFoundError:
        raise ConfigError(f"discovered: no such report {path}") from None
    except (ValueError, OSError) as e:
        raise ConfigError(
            f"discovered: {path} is not a discovery report ({str(e).splitlines()[0][:160]})"
        ) from None
    if not report.features:
        raise ConfigError(f"discovered: {path} has no discovered feature; nothing to mitigate")
    if report.config.boxes_csv:
        raise ConfigError(f"discovered: {path} used a boxes CSV; training needs a grid report (--grid)")
    if report.classnames != list(train_set.classes):
        raise ConfigError(
            f"discovered: {path} has classes {report.classnames[:3]}..., not the training set's"
        )
    model_cfg, weights = opts.assign_model, opts.assign_weights
    side = sidecar_path(path)
    if weights is None and side.is_file():
        meta = json.loads(side.read_text())
        model_cfg, weights = model_cfg or meta.get("model"), meta.get("weights")
    if weights is None:
        raise ConfigError(
            f"discovered: no model recorded for {path} ({side.name} missing); set method_options.assign_weights"
        )
    assigner, assign_pre, _ = build_clip(model_cfg or cfg.model, weights)
    rows = [(str(p), y) for p, y in zip(train_set.paths, train_set.labels)]
    _, spurious = assign_dataset(report, assigner.eval(), assign_pre, rows, top=opts.top)
    mask = torch.tensor(spurious, dtype=torch.bool)  # (N, rows*cols), grid order
    if opts.region_mode == "roi":  # fail before training on a tower RoI pooling does not support
        from trainer.ravl import region_embeddings

        size = clip.visual.image_size
        size = size if isinstance(size, int) else size[0]
        was_training = clip.training
        clip.eval()  # eval: no batch-norm statistics are touched by the probe
        try:
            with torch.no_grad():
                region_embeddings(clip, torch.zeros(1, 3, size, size), grid=(1, 1), mode="roi")
        except NotImplementedError as e:
            raise ConfigError(f"method_options.region_mode roi: {e}") from None
        finally:
            clip.train(was_training)
    with torch.no_grad():  # the text tower is frozen, so the class prompts are fixed
        class_emb = zero_shot_head(clip, tokenizer, train_set.classes, train_set.templates)
    summary = {
        "report": str(path),
        "assign_weights": str(weights),
        "features_used": [f.cluster for f in report.features[: opts.top]],
        "spurious_regions": round(float(mask.float().mean()), 4),
        "images_with_spurious": round(float(mask.any(1).float().mean()), 4),
        "images_all_spurious": int(mask.all(1).sum()),
        **opts.model_dump(exclude={"assign_model", "assign_weights"}),
    }
    return {
        "opts": opts,
        "grid": tuple(report.config.grid),
        "class_emb": class_emb,
        "sample_extras": {"region_mask": mask},
        "summary": summary,
    }


def _forward_kwargs(batch: dict[str, torch.Tensor], state: dict[str, Any]) -> dict[str, Any]:
    H, W = batch["image"].shape[-2:]
    return {"rois": grid_boxes(H, W, *state["grid"]), "region_mode": state["opts"].region_mode}


def _reg_term(ctx: StepContext) -> torch.Tensor:
    st, acc = ctx.state, ctx.accelerator
    mask = ctx.batch["region_mask"]  # (b, R) local
    (regions,) = _gather_with_grad(acc, ctx.out["regions"])  # (B·R, D), image-major like the mask
    if acc is not None and acc.num_processes > 1:
        mask = acc.gather(mask)
    B, R = mask.shape
    image_of = torch.arange(B, device=regions.device).repeat_interleave(R)
    opts = st["opts"]
    out = ravl_loss(
        regions,
        image_of,
        mask.reshape(-1).to(regions.device),
        ctx.labels.to(regions.device),
        st["class_emb"].to(regions.device),
        opts.tau,
        opts.reduction,
    )
    ctx.extras["log"] = {"region_loss": out["region_loss"], "align_loss": out["align_loss"]}
    return out["reg_loss"]


def _combine(ctx: StepContext, lc: torch.Tensor, reg: torch.Tensor, lam: float) -> torch.Tensor:
    w = ctx.state["opts"].lam  # RaVL's λ weighs L_CL (not the decayed `lam` of StarFT)
    return w * lc + (1 - w) * reg


register_method(
    MethodSpec(
        "ravl",
        "contrastive",
        reg_term=_reg_term,
        freeze_text=True,
        setup=_setup,
        forward_kwargs=_forward_kwargs,
        combine=_combine,
    )
)


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
) -> dict[str, Any]:
    """Discovery with a run's checkpoint on a labelled set; writes report.json, report.model.json and
    features.png into `out` (default RUN/discover) and, with `to_bank`, a new bank version.
    Returns {"report", "report_path", "sheet", "bank"}."""
    from trainer.config import load_config
    from trainer.data import read_lines
    from trainer.discover import DiscoverConfig, contact_sheet, discover, print_report, read_rows, save_report
    from trainer.discover import to_bank as to_bank_fn
    from trainer.model import build_clip

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
    sidecar_path(report_path).write_text(
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
        from descgen.errors import DescgenError

        phrases = read_lines(candidates, "candidates") if candidates else []
        try:
            bank_path = to_bank_fn(
                report, to_bank, clip, tokenizer, phrases, report_path=report_path, model_id=str(ckpt)
            )
        except (DescgenError, ValueError) as e:
            raise ConfigError(f"--to-bank {to_bank}: {str(e).splitlines()[0]}") from None
    return {"report": report, "report_path": report_path, "sheet": sheet, "bank": bank_path}
