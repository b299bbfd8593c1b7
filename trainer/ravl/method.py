"""RaVL's mitigation as a trainer method: `trainer run --method ravl --discovered REPORT.json`.

    trainer discover runs/flyp-run --data eval.csv --grid 2x2      # -> runs/flyp-run/discover/report.json
    trainer run --config c.yaml --method ravl --discovered runs/flyp-run/discover/report.json

Mitigation (RaVL sec. 4.1, appendix C/D.2): before training every region of every fine-tuning image is
assigned to a cluster by the report's k-medoids (with the model the report was made with, recorded in
`report.model.json` beside it); regions of the top-ranked feature form R_i^s. Class labels ŷ_i are the
dataset labels. The text tower and the logit scale are frozen, the image tower is trained; class prompts
are embedded once (frozen text tower, the training set's templates). Per step
    L = λ·L_CL + (1 − λ)·(L_R + L_A)        (`trainer.ravl.loss.ravl_loss`, paper: λ = 0.8, τ = 0.07)
with region embeddings computed in the model's forward (through the DDP wrapper, so their gradients are
synced) and all-gathered with gradient, so the loss is that of the global batch.

Options (`method_options`, validated by `RavlOptions`): lam 0.8, tau 0.07, region_mode roi|crop,
top 1, reduction mean|sum, assign_weights (weights that embed the training regions; default: the
report's model). Only grid reports can label a training set (boxes CSVs would need per-image boxes).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trainer.config import describe_error
from trainer.errors import ConfigError
from trainer.evaluate import zero_shot_head
from trainer.methods import ForwardExtra, MethodSpec, StepContext
from trainer.model import build_clip
from trainer.ravl.discover import assign_dataset, load_report, report_model_path
from trainer.ravl.loss import ravl_loss
from trainer.ravl.regions import grid_boxes, region_embeddings
from trainer.step import gather_with_grad


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
        raise ConfigError(f"method_options: {describe_error(e)}") from None


def _setup(cfg, train_set, clip, preprocess, tokenizer) -> dict[str, Any]:
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
    side = report_model_path(path)
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


def region_outputs(
    clip: torch.nn.Module, image: torch.Tensor, boxes: torch.Tensor, mode: str
) -> dict[str, torch.Tensor]:
    """The model forward's extra outputs: embeddings of every grid region of every image (RaVL)."""
    regions, region_image = region_embeddings(clip, image, boxes=boxes, mode=mode)  # type: ignore[arg-type]
    return {"regions": regions, "region_image": region_image}


def _forward_extra(batch: dict[str, torch.Tensor], state: dict[str, Any]) -> ForwardExtra:
    H, W = batch["image"].shape[-2:]
    boxes = grid_boxes(H, W, *state["grid"])
    return functools.partial(region_outputs, boxes=boxes, mode=state["opts"].region_mode)


def _reg_term(ctx: StepContext) -> torch.Tensor:
    st, acc = ctx.state, ctx.accelerator
    mask = ctx.batch["region_mask"]  # (b, R) local
    (regions,) = gather_with_grad(acc, ctx.out["regions"])  # (B·R, D), image-major like the mask
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


RAVL = MethodSpec(
    "ravl",
    "contrastive",
    reg_term=_reg_term,
    freeze_text=True,
    setup=_setup,
    forward_extra=_forward_extra,
    combine=_combine,
)
