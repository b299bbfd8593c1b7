"""RaVL's mitigation as a trainer method: `trainer run --method ravl --discovered REPORT.json`.

    trainer discover runs/flyp-run --data eval.csv --grid 2x2 --mode roi  # -> runs/flyp-run/discover/report.json
    trainer run --config c.yaml --method ravl --discovered runs/flyp-run/discover/report.json

Mitigation (RaVL sec. 4.1, appendix C/D.2): before training every grid region of every fine-tuning image
is embedded and assigned to a cluster by the report's k-medoids (with the model the report was made
with, recorded in `report.model.json` beside it); regions of the top-ranked feature form R_i^s. Class
labels ŷ_i are the dataset labels. The text tower and the logit scale are frozen, the image tower is
trained; class prompts are embedded once (frozen text tower, the training set's templates). Per step
    L = λ·L_CL + (1 − λ)·Σ_i (L_R^i + L_A^i)   (`trainer.ravl.loss.ravl_loss`, paper: λ 0.8, τ 0.07, sum)
with region embeddings computed in the model's forward (through the DDP wrapper, so their gradients are
synced) and all-gathered with gradient, so the loss is that of the global batch.

One region embedding f: labelling R^s and the loss both call `grid_region_embeddings` with the same
`region_mode` (RoIAlign by default, as the paper; crop as an option), and the report must have been made
in that mode too (its medoids live in that embedding space).

The paper's comparison rows use the same discovered groups (class × has a region in the top feature):
`loss: erm` is VL-ERM, L = λ·L_CL + (1 − λ)·L_ERM with L_ERM the cross-entropy of the zero-shot logits
(frozen class prompts, the model's logit scale); `loss: gdro` is VL-GDRO, the same with online group DRO
(Sagawa et al. 2020: group weights q ← q·exp(η·L_g), renormalised, L = Σ_g q_g L_g) over those groups.
Their weighted sampler is the caller's (bench/ravl_suite.py trains them on a set upsampled to equal
groups). `VL_ERM` and `VL_GDRO` are the same rows as named methods.

Options (`method_options`, validated by `RavlOptions`): lam 0.8, tau 0.07, region_mode roi|crop, top 1,
reduction sum|mean, loss region|erm|gdro, gdro_eta 0.01, assign_model / assign_weights (the model that
labels the training regions; default: the report's). Only grid reports can label a training set.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trainer.config import describe_error
from trainer.errors import ConfigError
from trainer.evaluate import zero_shot_head
from trainer.methods import ForwardExtra, MethodSpec, StepContext
from trainer.model import build_clip
from trainer.ravl.discover import Report, load_report, report_model_path, spurious_mask
from trainer.ravl.loss import ravl_loss
from trainer.ravl.regions import Mode, grid_boxes, region_embeddings


class RavlOptions(BaseModel):
    """`method_options` of method ravl."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lam: float = Field(0.8, ge=0, le=1, description="weight of L_CL; (1 − lam) weighs L_R + L_A")
    tau: float = Field(0.07, gt=0, description="temperature of the region-aware loss")
    region_mode: Literal["crop", "roi"] = Field(
        "roi",
        description="the one region embedding, for labelling R^s and for the loss: roi (RoIAlign on the"
        " tower's feature map, the paper's) or crop; the report must use the same mode",
    )
    top: int = Field(1, ge=1, description="discovered features whose regions are spurious (paper: 1)")
    reduction: Literal["mean", "sum"] = Field(
        "sum", description="over images: sum is the paper's Σ_i; mean = sum / n (λ relation: loss.py)"
    )
    loss: Literal["region", "erm", "gdro"] = Field(
        "region", description="region: RaVL's L_R + L_A; erm / gdro: the paper's VL-ERM / VL-GDRO rows"
    )
    gdro_eta: float = Field(0.01, gt=0, description="VL-GDRO's step size of the group weights")
    assign_model: str | None = Field(None, description="model config of the report's model; default: run's")
    assign_weights: str | None = Field(None, description="weights of the report's model; default: sidecar")


def ravl_options(cfg) -> RavlOptions:
    try:
        return RavlOptions.model_validate(cfg.method_options)
    except ValidationError as e:
        raise ConfigError(f"method_options: {describe_error(e)}") from None


def grid_region_embeddings(
    clip: torch.nn.Module, images: torch.Tensor, grid: tuple[int, int], mode: Mode
) -> tuple[torch.Tensor, torch.Tensor]:
    """RaVL's region embedding f: the `grid` cells of preprocessed images, embedded with `mode`.

    The one function behind both uses of f: labelling the training set's spurious regions before
    training (`label_embeddings`) and the region-aware loss in the model's forward (`region_outputs`).
    Returns (B·rows·cols, D) normalised embeddings, image-major and row-major, and their image index.
    """
    H, W = images.shape[-2:]
    return region_embeddings(clip, images, boxes=grid_boxes(H, W, *grid), mode=mode)


@torch.no_grad()
def label_embeddings(
    clip: torch.nn.Module,
    preprocess,
    paths: Sequence[str],
    grid: tuple[int, int],
    mode: Mode,
    batch_size: int = 256,
) -> torch.Tensor:
    """(N, rows·cols, D) region embeddings of the images at `paths`, made as the loss makes them (eval mode)."""
    device = next(clip.parameters()).device
    was_training = clip.training
    clip.eval()
    out = []
    try:
        for s in range(0, len(paths), batch_size):
            images = []
            for p in paths[s : s + batch_size]:
                with Image.open(p) as im:
                    images.append(preprocess(im.convert("RGB")))
            x = torch.stack(images).to(device)
            emb, _ = grid_region_embeddings(clip, x, grid, mode)
            out.append(emb.float().cpu().reshape(len(x), grid[0] * grid[1], -1))
    finally:
        clip.train(was_training)
    return torch.cat(out)


def label_spurious_regions(
    report: Report, clip, preprocess, paths: Sequence[str], mode: Mode, top: int = 1
) -> torch.Tensor:
    """(N, rows·cols) bool: which grid regions of each image fall in the report's top `top` features."""
    emb = label_embeddings(clip, preprocess, paths, tuple(report.config.grid), mode)
    N, R, D = emb.shape
    return spurious_mask(report, emb.reshape(N * R, D), top=top).reshape(N, R)


def _setup(cfg, train_set, clip, preprocess, tokenizer, loss: str | None = None, **_: Any) -> dict[str, Any]:
    opts = ravl_options(cfg)
    if loss is not None:  # the named rows (vl_erm, vl_gdro) fix their loss
        opts = opts.model_copy(update={"loss": loss})
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
    if report.config.mode != opts.region_mode:
        raise ConfigError(
            f"discovered: {path} embedded regions with mode {report.config.mode}, the run's region_mode is "
            f"{opts.region_mode}; one embedding labels and trains (discover with --mode {opts.region_mode})"
        )
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
    if opts.region_mode == "roi":  # fail before labelling on a tower RoI pooling does not support
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
    assigner, assign_pre, _ = build_clip(model_cfg or cfg.model, weights)
    paths = [str(p) for p in train_set.paths]
    mask = label_spurious_regions(report, assigner, assign_pre, paths, opts.region_mode, top=opts.top)
    with torch.no_grad():  # the text tower is frozen, so the class prompts are fixed
        class_emb = zero_shot_head(clip, tokenizer, train_set.classes, train_set.templates)
    has = mask.any(1)
    labels = torch.as_tensor(list(train_set.labels))
    groups = {  # the discovered groups (class, has the feature): VL-ERM / VL-GDRO and the upsampling
        f"{y}/{int(h)}": int(((labels == y) & (has == h)).sum())
        for y in labels.unique().tolist()
        for h in (0, 1)
    }
    summary = {
        "report": str(path),
        "assign_weights": str(weights),
        "features_used": [f.cluster for f in report.features[: opts.top]],
        "spurious_regions": round(float(mask.float().mean()), 4),
        "images_with_spurious": round(float(has.float().mean()), 4),
        "images_all_spurious": int(mask.all(1).sum()),
        "groups": {k: v for k, v in groups.items() if v},
        **opts.model_dump(exclude={"assign_model", "assign_weights"}),
    }
    state: dict[str, Any] = {
        "opts": opts,
        "grid": tuple(report.config.grid),
        "class_emb": class_emb,
        "logit_scale": float(clip.logit_scale.detach().exp()),  # frozen with the text tower (freeze_text)
        "sample_extras": {"region_mask": mask},
        "summary": summary,
    }
    if opts.loss == "gdro":
        state["gdro_q"] = torch.full((2 * len(train_set.classes),), 1.0 / (2 * len(train_set.classes)))
    return state


def region_outputs(
    clip: torch.nn.Module, image: torch.Tensor, grid: tuple[int, int], mode: Mode
) -> dict[str, torch.Tensor]:
    """The model forward's extra outputs: embeddings of every grid region of every image (RaVL)."""
    regions, region_image = grid_region_embeddings(clip, image, grid, mode)
    return {"regions": regions, "region_image": region_image}


def _forward_extra(batch: dict[str, torch.Tensor], state: dict[str, Any]) -> ForwardExtra | None:
    if state["opts"].loss != "region":  # VL-ERM / VL-GDRO score whole images only
        return None
    return functools.partial(region_outputs, grid=state["grid"], mode=state["opts"].region_mode)


def _region_term(ctx: StepContext) -> torch.Tensor:
    st = ctx.state
    regions = ctx.out["regions"]  # (B·R, D) of the global batch (trainer.step gathers), image-major
    mask = ctx.batch["region_mask"]  # (B, R), the same samples in the same order
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


def zero_shot_ce(image: torch.Tensor, class_emb: torch.Tensor, scale: float, labels: torch.Tensor):
    """Per-image cross-entropy of the zero-shot logits scale·<image, class> (normalised features)."""
    logits = scale * F.normalize(image, dim=-1) @ F.normalize(class_emb, dim=-1).T
    return F.cross_entropy(logits.float(), labels, reduction="none")


def group_dro_step(
    losses: torch.Tensor, groups: torch.Tensor, q: torch.Tensor, eta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Online group DRO (Sagawa et al. 2020): per-group mean losses, then q ← q·exp(η·L_g) renormalised;
    returns (Σ_g q_g L_g, the new q). Groups absent from the batch have L_g = 0 (their q only shrinks by
    the renormalisation)."""
    G = len(q)
    sums = torch.zeros(G, device=losses.device, dtype=losses.dtype).index_add(0, groups, losses)
    counts = torch.bincount(groups, minlength=G).to(losses.dtype)
    group_loss = sums / counts.clamp(min=1)
    with torch.no_grad():
        q = q.to(losses.device) * torch.exp(eta * group_loss.detach())
        q = q / q.sum()
    return (q * group_loss).sum(), q


def _erm_term(ctx: StepContext, robust: bool) -> torch.Tensor:
    st = ctx.state
    labels = ctx.labels.to(ctx.image.device)
    ce = zero_shot_ce(ctx.image, st["class_emb"].to(ctx.image.device), st["logit_scale"], labels)
    if not robust:
        ctx.extras["log"] = {"erm_loss": ce.mean()}
        return ce.mean()
    has = ctx.batch["region_mask"].any(1).to(labels.device)
    loss, st["gdro_q"] = group_dro_step(ce, 2 * labels + has.long(), st["gdro_q"], st["opts"].gdro_eta)
    ctx.extras["log"] = {"erm_loss": ce.mean(), "gdro_loss": loss}
    return loss


def _reg_term(ctx: StepContext) -> torch.Tensor:
    loss = ctx.state["opts"].loss
    return _region_term(ctx) if loss == "region" else _erm_term(ctx, robust=loss == "gdro")


def _combine(ctx: StepContext, lc: torch.Tensor, reg: torch.Tensor, lam: float) -> torch.Tensor:
    w = ctx.state["opts"].lam  # RaVL's λ weighs L_CL (not the decayed `lam` of StarFT)
    return w * lc + (1 - w) * reg


def _spec(name: str, loss: str | None) -> MethodSpec:
    return MethodSpec(
        name,
        "contrastive",
        reg_term=_reg_term,
        freeze_text=True,
        setup=_setup if loss is None else functools.partial(_setup, loss=loss),
        forward_extra=_forward_extra,
        combine=_combine,
    )


RAVL = _spec("ravl", None)  # method_options.loss picks region (default), erm or gdro
VL_ERM = _spec("vl_erm", "erm")  # the paper's VL-ERM row
VL_GDRO = _spec("vl_gdro", "gdro")  # the paper's VL-GDRO row
METHODS = (RAVL, VL_ERM, VL_GDRO)  # registered by trainer.methods.get_method
