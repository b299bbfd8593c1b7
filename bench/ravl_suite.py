"""RaVL's controlled evaluation on quadrant digits: discovery precision@10 and mitigation, offline.

    from bench.ravl_suite import RavlSuiteConfig, run_ravl_suite; results = run_ravl_suite(RavlSuiteConfig())

1. Pretrain (or load from cache) a small open_clip CLIP from scratch on unbiased quadrant images
   (trainer.ravl_data) with captions "a photo of a {digit}." (", and a red rectangle" on half the images
   that have one), so the rectangle has its own place in the embedding space.
2. Per setting (spurious class × strength × seed): write a biased fine-tuning set, fine-tune with `flyp`
   (trainer.train), discover on an unbiased set of held-out digits (2×2 grid, trainer.discover), score
   precision@10 of the top feature, and measure whether the model learned the correlation (accuracy gap of
   the other classes' images with vs without the rectangle).
3. Mitigation on the same settings: `ravl` (with the report) vs `flyp` vs flyp on a set upsampled so that
   every group inferred from discovery (class × image has a region in the top feature) has equal size,
   and optionally VL-ERM / VL-GDRO (λ·L_CL + (1 − λ)·CE or group DRO on zero-shot logits, same set).
   Image worst-group / overall accuracy over class × rectangle, and region worst-group (zero-shot
   classification of the digit quadrant, same groups), on an unbiased test set.

`split="val"` uses its own seeds and evaluation images (for tuning); `split="test"` is what is reported.
Writes `results.json`, `results.png` and the runs under `out_dir`.

One region embedding (`region_mode`, RoI by default) serves discovery, the labelling of R^s on the
fine-tuning set and ravl's loss. The `paper` setting (bench/configs/ravl-paper.yaml, notebook
docs/ravl-paper-setting.md) is RaVL's regime: λ 0.8, τ 0.07, lr 5e-5, batch 128, the region loss summed
over the batch, text tower locked, early stopping on an ID validation split (`val_images`, `epochs`), the
paper's "learned" criterion (ε1, ε2 > 10 for every seed), the VL-ERM / VL-GDRO rows, and P@10 of both
FasterPAM and RaVL's own alternating k-medoids (`clusterings`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Literal

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from rich import box
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file

from bench.ravl_data import (
    CLASSNAMES,
    quadrant_boxes,
    quadrant_samples,
    rectangle_regions,
    write_quadrant_split,
)
from bench.report import diff_lines, json_t, paired_t
from trainer.config import build_config, load_config
from trainer.evaluate import zero_shot_head
from trainer.losses import soft_clip_loss
from trainer.model import build_clip
from trainer.ravl.discover import load_report, precision_at_k, report_model_path
from trainer.ravl.method import label_spurious_regions
from trainer.ravl.regions import region_embeddings
from trainer.ravl.report import discover_run
from trainer.schedules import cosine_lr
from trainer.train import train

SUITE_VERSION = 1
MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's default normalisation (its preprocess uses it)
STD = (0.26862954, 0.26130258, 0.27577711)
CAPTION = "a photo of a {c}."
METRICS = (
    "image_acc",
    "image_wg",
    "class_without",  # the spurious class's images without the rectangle (the shortcut's missed side)
    "others_with",  # worst other class with the rectangle (the side it calls the spurious class)
    "region_acc",
    "region_wg",
    "region_acc_crop",
    "region_wg_crop",
)
RECT_SUFFIX = " and a red rectangle"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class QuadPretrainConfig(_Frozen):
    """The zero-shot model: a tiny open_clip CLIP trained from scratch on unbiased quadrant images."""

    n_images: int = 6000
    steps: int = 400
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 40
    logit_scale: float = 50.0  # fixed during pretraining
    rect_caption_prob: float = 0.5  # rectangle images whose caption mentions it
    embed_dim: int = 64
    vision: Literal["resnet", "vit"] = Field(
        "resnet", description="image tower: ModifiedResNet (RegionCLIP-style RoI) or a ViT"
    )
    vision_width: int = 8  # ModifiedResNet stem width; the ViT's token width is 8x this
    vit_layers: int = 4
    vit_patch_size: int = 8  # 32 px images: a 4x4 token grid, 2x2 tokens a quadrant
    vit_pool: Literal["tok", "avg"] = Field(
        "avg",
        description="ViT image embedding: the class token, or the mean of the patch tokens (then the"
        " whole-image embedding is the mean of the RoI region embeddings of its cells)",
    )
    text_width: int = 64
    text_layers: int = 2
    context_length: int = 16
    seed: int = 0

    def hash(self) -> str:
        fields = self.model_dump(mode="json")
        if self.vision == "resnet":  # ResNet models keep the names they had before the ViT option
            for k in ("vision", "vit_layers", "vit_patch_size", "vit_pool"):
                fields.pop(k)
        blob = json.dumps({"v": SUITE_VERSION, **fields}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def model_config(cfg: QuadPretrainConfig) -> dict[str, Any]:
    """open_clip model config: a ModifiedResNet or ViT image tower at 32 px, small text transformer."""
    if cfg.vision == "resnet":
        vision = {"layers": [1, 1, 1, 1], "width": cfg.vision_width, "head_width": 32, "patch_size": None}
    else:
        vision = {
            "layers": cfg.vit_layers,
            "width": 8 * cfg.vision_width,
            "head_width": 16,
            "patch_size": cfg.vit_patch_size,
            "pool_type": cfg.vit_pool,
        }
    return {
        "embed_dim": cfg.embed_dim,
        "init_logit_scale": math.log(cfg.logit_scale),
        "vision_cfg": {"image_size": 32, **vision},
        "text_cfg": {
            "context_length": cfg.context_length,
            "vocab_size": 49408,
            "width": cfg.text_width,
            "heads": 4,
            "layers": cfg.text_layers,
        },
    }


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float normalised like open_clip's preprocess."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def pretrain_quadrants(
    cfg: QuadPretrainConfig, root: str | Path = ".cache/bench", progress: bool = True
) -> Path:
    """Pretrain (or reuse) the zero-shot model; returns its folder (model.json, model.safetensors, meta.json)."""

    out = Path(root) / f"ravl-zeroshot-{cfg.hash()}"
    if (out / "meta.json").exists():
        return out
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    model = open_clip.CLIP(**model_config(cfg))
    model.logit_scale.requires_grad_(False)
    tokenizer = open_clip.SimpleTokenizer(context_length=cfg.context_length)
    samples = quadrant_samples(cfg.n_images, seed=cfg.seed + 10_000, pool="train")
    images = to_tensor(np.stack([s.image for s in samples]))
    rng = np.random.default_rng(cfg.seed)
    captions = []
    for s in samples:
        c = CAPTION.replace("{c}", CLASSNAMES[s.label])
        if s.rect and rng.random() < cfg.rect_caption_prob:
            c = c[:-1] + RECT_SUFFIX + "."
        captions.append(c)
    tokens = tokenizer(captions)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    other = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}],
        lr=cfg.lr,
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    loss_m = None
    for step in range(cfg.steps):
        lr = cosine_lr(step, cfg.lr, cfg.warmup_steps, cfg.steps)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(len(samples), (cfg.batch_size,), generator=gen)
        tok = tokens[idx]
        same = (tok[:, None, :] == tok[None, :, :]).all(-1)  # identical captions are positives
        img = F.normalize(model.encode_image(images[idx]), dim=-1)
        txt = F.normalize(model.encode_text(tok), dim=-1)
        loss = soft_clip_loss(img, txt, model.logit_scale.exp(), same)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_m = loss.item() if loss_m is None else 0.95 * loss_m + 0.05 * loss.item()
        if progress and (step + 1) % 50 == 0:
            print(
                f"pretrain step {step + 1}/{cfg.steps} loss {loss_m:.3f} {time.time() - t0:.0f}s",
                file=sys.stderr,
            )
    model.eval()
    acc = zero_shot_accuracy(model, tokenizer, seed=cfg.seed + 20_000)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "model.json").write_text(json.dumps(model_config(cfg), indent=1))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    meta = {
        "config": cfg.model_dump(mode="json"),
        "zero_shot": acc,
        "final_loss": loss_m,
        "seconds": round(time.time() - t0, 1),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    tmp.rename(out)
    return out


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, n: int = 1000, seed: int = 0) -> dict[str, float]:
    """Zero-shot accuracy (%) on unbiased held-out quadrant images, with and without the rectangle."""
    samples = quadrant_samples(n, seed=seed, pool="eval")
    x = to_tensor(np.stack([s.image for s in samples]))
    text = F.normalize(model.encode_text(tokenizer([CAPTION.replace("{c}", c) for c in CLASSNAMES])), dim=-1)
    pred = (F.normalize(model.encode_image(x), dim=-1) @ text.T).argmax(1).numpy()
    y = np.array([s.label for s in samples])
    rect = np.array([s.rect for s in samples])
    ok = pred == y
    return {
        "acc": round(100 * float(ok.mean()), 2),
        "acc_rect": round(100 * float(ok[rect].mean()), 2),
        "acc_no_rect": round(100 * float(ok[~rect].mean()), 2),
    }


# --- the suite --------------------------------------------------------------------------------------


class RavlSuiteConfig(_Frozen):
    """Settings of the controlled evaluation. `split` picks disjoint seeds (val: tuning, test: report)."""

    split: Literal["val", "test"] = "test"
    classes: tuple[int, ...] = Field((3, 8), description="spurious classes (the rectangle co-occurs with)")
    strengths: tuple[float, ...] = Field(
        (0.95,),
        description="s: rectangle in (1+s)/2 of the class, (1-s)/2 of others (0.9 was too weak for the model"
        " to learn the shortcut on the other classes' side: 1 of 6 test settings)",
    )
    seeds: tuple[int, ...] = Field(
        (0, 1, 2, 3, 4, 5),
        description="fine-tuning seeds per class (about half the settings learn the shortcut at s=0.95;"
        " six per class leave >= 5 learned settings for precision@10)",
    )
    methods: tuple[Literal["flyp", "ravl", "upsampled", "ravl_crop", "vl_erm", "vl_gdro"], ...] = Field(
        ("flyp", "ravl", "upsampled"),
        description="ravl uses `region_mode`; ravl_crop is ravl with crops; vl_erm / vl_gdro are the paper's"
        " VL-ERM / VL-GDRO rows (λ ravl_lam, on the upsampled set, i.e. a sampler weighted to equal groups)",
    )
    n_train: int = 2000
    n_discover: int = 600  # unbiased, held-out digits: discovery set
    n_test: int = 4000  # unbiased, held-out digits: mitigation metrics (200 a group)
    steps: int = 150
    epochs: int | None = Field(None, description="train this many epochs instead of `steps` (paper setting)")
    val_images: int = Field(
        0,
        description="> 0: early stopping on an ID validation split of this size (drawn like the training"
        " set, own seed), evaluated every epoch; the best checkpoint by val top-1 is audited and scored",
    )
    batch_size: int = 64
    lr: float = 5e-4
    warmup_steps: int = 10
    ravl_lam: float = (
        0.5  # tuned on split=val at s=0.95 (0.5 vs the paper's 0.8); the trainer default stays 0.8
    )
    ravl_tau: float = 0.07
    ravl_reduction: Literal["mean", "sum"] = Field(
        "mean",
        description="over the batch: sum is the paper's (and the trainer's default); ravl_lam 0.5 was"
        " tuned with the mean",
    )
    region_mode: Literal["crop", "roi"] = Field(
        "roi", description="the one region embedding of discovery, of labelling R^s and of ravl's loss"
    )
    clusterings: tuple[Literal["fasterpam", "alternate"], ...] = Field(
        ("fasterpam",),
        description="discovery's k-medoids; the first one's report is mitigated, P@10 is recorded for each"
        " (p_at_10, p_at_10_<name>); alternate is RaVL's (alternating from k-medoids++, seed 0)",
    )
    lock_text: bool = Field(
        False,
        description="flyp and upsampled train the image tower only, as ravl does (RaVL's paper fine-tunes"
        " every model with the text encoder frozen)",
    )
    gap_threshold: float = Field(
        5.0, description="points: other classes' accuracy without − with the rectangle"
    )
    learned: Literal["gap", "paper"] = Field(
        "gap",
        description="which settings count as learned: gap (gap_others ≥ gap_threshold) or paper (ε1 and ε2,"
        " gap_class and gap_others, both above 10 for every seed of the class × strength); both are recorded",
    )
    pretrain: QuadPretrainConfig = Field(default_factory=QuadPretrainConfig)
    out_dir: str = "runs/bench-ravl"
    cache_dir: str = ".cache/bench"
    threads: int = 2
    progress: bool = True

    def seed_base(self) -> int:
        return 0 if self.split == "test" else 1000


def _log(cfg: RavlSuiteConfig, msg: str) -> None:
    if cfg.progress:
        print(msg, file=sys.stderr, flush=True)


def _run(
    cfg: RavlSuiteConfig,
    name: str,
    method: str,
    train_csv: Path,
    test_csv: Path,
    zs: Path,
    seed: int,
    val_csv: Path | None = None,
    **extra,
):
    """One trainer run; returns its directory `<name>-<hash of its settings>` (reused when its metrics exist,
    so changing lr, steps, λ, ... makes a new run instead of silently reusing an old one). With `val_csv`
    the run evaluates only that ID split, every epoch, and keeps its best checkpoint (early stopping)."""

    runs = Path(cfg.out_dir) / cfg.split / "runs"
    classes = str(train_csv.parent / "classes.txt")
    data = {
        "method": method,
        "model": str(zs / "model.json"),
        "pretrained": str(zs / "model.safetensors"),
        "data": {
            "train": {"path": str(train_csv), "classes": classes},
            "eval": [{"path": str(test_csv), "classes": classes, "name": "test"}],
        },
        "caption": CAPTION,
        # region masks are labelled on the deterministic preprocess: train on it (no random crops)
        "train_transform": "eval",
        "templates": [CAPTION],
        "batch_size": cfg.batch_size,
        "total_steps": cfg.steps,
        "lr": cfg.lr,
        "warmup_steps": cfg.warmup_steps,
        "weight_decay": 0.1,
        "eval_every": 10_000,  # evaluate at the end only
        "eval_batch_size": 500,
        "log_every": 25,
        "seed": seed,
        "threads": cfg.threads,
        "progress": False,
        **extra,
    }
    if cfg.epochs is not None:  # only when set, so the runs of the step-count settings keep their hashes
        data.pop("total_steps")
        data["epochs"] = cfg.epochs
    if val_csv is not None:
        data["data"] = {
            "train": data["data"]["train"],
            "val": {"path": str(val_csv), "classes": classes, "name": "val"},
        }
        data["eval_every"] = 1
    settings = {k: v for k, v in data.items() if k not in ("threads", "progress")}
    name = f"{name}-{hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]}"
    if (runs / name / "metrics.json").is_file():
        return runs / name
    if (runs / name).exists():  # an interrupted run: start it again
        shutil.rmtree(runs / name)
    data.update(name=name, runs_dir=str(runs))
    t0 = time.time()
    out = train(build_config(data))
    _log(cfg, f"  {name}: {time.time() - t0:.0f}s")
    return out


def _upsampled_csv(train_csv: Path, groups: list[tuple[int, bool]], out: Path) -> Path:
    """Rows repeated so every inferred group (class, has the feature) has about the largest group's size."""

    with train_csv.open(newline="") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames, list(reader)
    by: dict[tuple[int, bool], list[dict]] = {}
    for row, g in zip(rows, groups):
        by.setdefault(g, []).append(row)
    target = max(len(v) for v in by.values())
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, header)  # type: ignore[arg-type]
        w.writeheader()
        for g in sorted(by):
            members = by[g]
            for i in range(target):
                w.writerow(members[i % len(members)])
    return out


def shortcut_sides(per_group: dict[str, float], spurious: str) -> dict[str, float]:
    """The two sides of the rectangle shortcut from image accuracy per `class/rect|no_rect` group: the
    spurious class without the rectangle, and the worst other class with it."""
    others = [v for k, v in per_group.items() if k.endswith("/rect") and not k.startswith(f"{spurious}/")]
    return {
        "class_without": round(per_group[f"{spurious}/no_rect"], 2),
        "others_with": round(min(others), 2),
    }


def run_weights(run_dir: Path) -> Path:
    """The checkpoint a run is judged by: the best on its validation split (early stopping) when it has
    one, else the last."""
    best = run_dir / "checkpoints" / "best.safetensors"
    return best if best.is_file() else run_dir / "checkpoints" / "last.safetensors"


@torch.no_grad()
def region_worst_group(run_dir: Path, test_csv: Path, with_image: bool = False) -> dict[str, Any]:
    """Zero-shot classification of each test image's digit quadrant, accuracy overall and worst group over
    class × rectangle present: with RoI pooling of the full image's feature map (the paper's RoIAlign;
    `region_*`) and with the quadrant cropped and resized through the transform (`region_*_crop`).
    The run's `run_weights`. `with_image` adds "image": whole-image top1, worst_group and per_group
    (`class/group`), as the trainer's evaluation reports them, for runs that did not evaluate the test set.
    """

    cfg = load_config(run_dir / "config.yaml")
    clip, preprocess, tokenizer = build_clip(cfg.model, str(run_weights(run_dir)))
    clip.eval()
    head = zero_shot_head(clip, tokenizer, list(CLASSNAMES), [lambda c: CAPTION.replace("{c}", c)])
    with test_csv.open(newline="") as f:
        rows = list(csv.DictReader(f))
    full, crops, boxes, labels, groups = [], [], [], [], []
    for row in rows:
        with Image.open(test_csv.parent / row["path"]) as im:
            im = im.convert("RGB")
            box = quadrant_boxes(im.width // 2)[int(row["digit_quadrant"])]
            x = preprocess(im)
            s = x.shape[-1] / im.width  # square images: the transform only rescales
            full.append(x)
            crops.append(preprocess(im.crop(box)))
            boxes.append(torch.tensor([[v * s for v in box]]))
        labels.append(CLASSNAMES.index(row["label"]))
        groups.append(f"{row['label']}/{row['group']}")
    y = torch.tensor(labels)
    out: dict[str, Any] = {}
    if with_image:
        x = torch.stack(full)
        emb = torch.cat(
            [F.normalize(clip.encode_image(x[i : i + 250]), dim=-1) for i in range(0, len(x), 250)]
        )
        ok = ((emb @ head.T).argmax(1) == y).numpy()
        per = {k: 100 * float(ok[[g == k for g in groups]].mean()) for k in sorted(set(groups))}
        out["image"] = {"top1": 100 * float(ok.mean()), "worst_group": min(per.values()), "per_group": per}
    for mode, x in (("", torch.stack(full)), ("_crop", torch.stack(crops))):
        embs = []
        for i in range(0, len(x), 250):
            if mode:
                embs.append(F.normalize(clip.encode_image(x[i : i + 250]), dim=-1))
            else:
                e, _ = region_embeddings(clip, x[i : i + 250], boxes=boxes[i : i + 250], mode="roi")
                embs.append(e)
        ok = ((torch.cat(embs) @ head.T).argmax(1) == y).numpy()
        accs = [100 * float(ok[[g == k for g in groups]].mean()) for k in sorted(set(groups))]
        out[f"region_acc{mode}"] = round(100 * float(ok.mean()), 2)
        out[f"region_wg{mode}"] = round(min(accs), 2)
    return out


def _learned_gap(report, disc_csv: Path, spurious_class: int) -> dict[str, float]:
    """On the discovery set, with the fine-tuned model's predictions: other classes' accuracy without vs
    with the rectangle, and the spurious class's with vs without (percent points)."""

    with disc_csv.open(newline="") as f:
        rect = [row["group"] == "rect" for row in csv.DictReader(f)]
    y = np.array([im.label for im in report.images])
    ok = np.array([im.pred == im.label for im in report.images])
    rect = np.array(rect)
    other = y != spurious_class
    mine = ~other

    def acc(m):
        return 100 * float(ok[m].mean()) if m.any() else float("nan")

    return {
        "gap_others": round(acc(other & ~rect) - acc(other & rect), 2),
        "gap_class": round(acc(mine & rect) - acc(mine & ~rect), 2),
    }


def _report(
    cfg: RavlSuiteConfig, flyp: Path, out: Path, disc_csv: Path, seed: int, mode: str, clustering: str
):
    """Discovery with the flyp run's (best) checkpoint: the report of one region mode and clustering
    (crop + FasterPAM keep the folder name they had before these options)."""
    suffix = ("" if mode == "crop" else f"-{mode}") + ("" if clustering == "fasterpam" else f"-{clustering}")
    rep_dir = out / "reports" / f"{flyp.name}{suffix}"
    if not (rep_dir / "report.json").is_file():
        classes = disc_csv.parent / "classes.txt"
        discover_run(flyp, disc_csv, classes, out=rep_dir, seed=seed, mode=mode, clustering=clustering)
    return rep_dir / "report.json"


def _feature_flags(report_path: Path, rows: list[tuple[str, int]]) -> list[bool]:
    """Per training image: has a region in the report's top feature, labelled with the report's model and
    its region embedding (`trainer.ravl.method.label_spurious_regions`, as the ravl run labels them)."""
    report = load_report(report_path)
    if not report.features:
        return [False] * len(rows)
    side = json.loads(report_model_path(report_path).read_text())
    clip, pre, _ = build_clip(side["model"], side["weights"])
    mask = label_spurious_regions(report, clip.eval(), pre, [p for p, _ in rows], report.config.mode)
    return mask.any(1).tolist()


def _setting(
    cfg: RavlSuiteConfig,
    zs: Path,
    data: Path,
    disc_csv: Path,
    test_csv: Path,
    gt,
    c: int,
    s: float,
    sd: int,
) -> dict[str, Any]:
    """One setting (spurious class × strength × seed): flyp, discovery, P@10, learned gaps, mitigation rows."""
    out = Path(cfg.out_dir) / cfg.split
    key = f"c{c}-s{s:g}-seed{sd}"
    _log(cfg, f"setting {key}")
    row: dict[str, Any] = {"key": key, "class": CLASSNAMES[c], "strength": s, "seed": sd}
    train_csv = data / f"train-{key}.csv"
    if not train_csv.is_file():
        write_quadrant_split(data, f"train-{key}", cfg.n_train, spurious_class=c, strength=s, seed=sd)
    val_csv = None
    if cfg.val_images:
        val_csv = data / f"val-{key}-n{cfg.val_images}.csv"
        if not val_csv.is_file():  # ID: drawn like the training set, from the same pool, its own seed
            write_quadrant_split(
                data, val_csv.stem, cfg.val_images, spurious_class=c, strength=s, seed=sd + 50_000
            )
    timing: dict[str, float] = {}
    t = time.time()
    locked = {"freeze_text": True} if cfg.lock_text else {}
    flyp = _run(cfg, f"{key}-flyp", "flyp", train_csv, test_csv, zs, sd, val_csv, **locked)
    timing["flyp_train"] = time.time() - t
    t = time.time()
    reports = {m: _report(cfg, flyp, out, disc_csv, sd, cfg.region_mode, m) for m in cfg.clusterings}
    rep_path = reports[cfg.clusterings[0]]
    report = load_report(rep_path)
    timing["discover"] = time.time() - t
    row["p_at_10"] = precision_at_k(report, gt, k=10) if report.features else 0.0
    for m, p in list(reports.items())[1:]:
        other = load_report(p)
        row[f"p_at_10_{m}"] = precision_at_k(other, gt, k=10) if other.features else 0.0
        row[f"n_features_{m}"] = len(other.features)
    row["n_features"] = len(report.features)
    row.update(_learned_gap(report, disc_csv, c))
    row["learned"] = row["gap_others"] >= cfg.gap_threshold
    row["eps_learned"] = row["gap_others"] > 10 and row["gap_class"] > 10  # this seed's half of the paper's
    up_csv = data / f"train-{flyp.name}{rep_path.parent.name[len(flyp.name) :]}-upsampled.csv"
    methods: dict[str, Any] = {}
    for m in cfg.methods:
        t = time.time()
        if m == "flyp":
            run = flyp
        elif m in ("ravl", "ravl_crop", "vl_erm", "vl_gdro"):
            if not report.features:
                methods[m] = None
                continue
            mode = "crop" if m == "ravl_crop" else cfg.region_mode
            rp = (
                rep_path
                if mode == cfg.region_mode
                else _report(cfg, flyp, out, disc_csv, sd, mode, cfg.clusterings[0])
            )
            if not load_report(rp).features:
                methods[m] = None
                continue
            options: dict[str, Any] = {"lam": cfg.ravl_lam, "tau": cfg.ravl_tau, "region_mode": mode}
            options["reduction"] = cfg.ravl_reduction  # always written: the trainer's default changed
            train_on = train_csv
            if m in ("vl_erm", "vl_gdro"):
                options = {"lam": cfg.ravl_lam, "region_mode": mode, "loss": m[3:]}
                train_on = _upsampled(up_csv, train_csv, rp, data)
            run = _run(
                cfg, f"{key}-{m}", "ravl", train_on, test_csv, zs, sd, val_csv,
                discovered=str(rp), method_options=options,
            )  # fmt: skip
        else:
            run = _run(cfg, f"{key}-upsampled", "flyp", _upsampled(up_csv, train_csv, rep_path, data),
                       test_csv, zs, sd, val_csv, **locked)  # fmt: skip
        region = region_worst_group(run, test_csv, with_image=val_csv is not None)
        metrics = (
            region.pop("image")
            if val_csv is not None
            else json.loads((run / "metrics.json").read_text())["final"]["test"]
        )
        methods[m] = {
            "image_acc": round(metrics["top1"], 2),
            "image_wg": round(metrics["worst_group"], 2),
            **shortcut_sides(metrics["per_group"], CLASSNAMES[c]),
            **region,
        }
        if val_csv is not None:
            methods[m]["best_step"] = json.loads((run / "metrics.json").read_text())["best"]["step"]
        timing[m] = time.time() - t  # run + region evaluation (flyp: evaluation only)
    row["methods"] = methods
    row["seconds"] = {k: round(v, 1) for k, v in timing.items()}
    _log(cfg, f"  {json.dumps({k: v for k, v in row.items() if k != 'seconds'})}")
    return row


def _upsampled(up_csv: Path, train_csv: Path, report_path: Path, data: Path) -> Path:
    """The training set upsampled to equal discovered groups (written once per flyp run and report)."""
    if not up_csv.is_file():
        with train_csv.open(newline="") as f:
            rows = [
                (str((data / r["path"]).resolve()), CLASSNAMES.index(r["label"])) for r in csv.DictReader(f)
            ]
        flags = _feature_flags(report_path, rows)
        _upsampled_csv(train_csv, [(y, f) for (_, y), f in zip(rows, flags)], up_csv)
    return up_csv


def mark_paper_learned(settings: list[dict]) -> None:
    """RaVL's criterion: a class × strength is learned when ε1 (gap_class) and ε2 (gap_others) both
    exceed 10 points for every one of its seeds; sets `learned_paper` on each setting."""
    by: dict[tuple, list[dict]] = {}
    for r in settings:
        by.setdefault((r["class"], r["strength"]), []).append(r)
    for rows in by.values():
        ok = all(r["gap_others"] > 10 and r["gap_class"] > 10 for r in rows)
        for r in rows:
            r["learned_paper"] = ok


def run_ravl_suite(cfg: RavlSuiteConfig | None = None) -> dict[str, Any]:
    """Run the suite; returns (and writes to OUT/SPLIT/results.json) settings, summary and wall times."""

    cfg = cfg or RavlSuiteConfig()
    torch.set_num_threads(cfg.threads)
    t_start = time.time()
    out = Path(cfg.out_dir) / cfg.split
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    zs = pretrain_quadrants(cfg.pretrain, cfg.cache_dir, progress=cfg.progress)
    zs_meta = json.loads((zs / "meta.json").read_text())
    t_pretrain = time.time() - t0
    _log(cfg, f"zero-shot model {zs} ({zs_meta['zero_shot']})")

    base = cfg.seed_base()
    data = out / "data"
    disc_csv = data / "discover.csv"
    test_csv = data / "test.csv"
    if not test_csv.is_file():
        write_quadrant_split(data, "discover", cfg.n_discover, seed=base + 501, pool="eval")
        write_quadrant_split(data, "test", cfg.n_test, seed=base + 502, pool="eval")
    gt = rectangle_regions(data / "discover_regions.csv")

    settings = []
    for c in cfg.classes:
        for s in cfg.strengths:
            for seed in cfg.seeds:
                settings.append(_setting(cfg, zs, data, disc_csv, test_csv, gt, c, s, base + seed))
    mark_paper_learned(settings)
    if cfg.learned == "paper":
        for r in settings:
            r["learned"] = r["learned_paper"]
    results = {
        "config": cfg.model_dump(mode="json"),
        "zero_shot": zs_meta["zero_shot"],
        "settings": settings,
        "summary": summarize(settings, cfg.methods),
        "seconds": {"pretrain": round(t_pretrain, 1), "total": round(time.time() - t_start, 1)},
    }
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    try:
        plot_results(results, out / "results.png")
    except (OSError, ValueError, RuntimeError) as e:
        _log(cfg, f"warning: plot not written ({e})")
    if cfg.progress:
        print_results(results)
    return results


def merge_results(paths: list[str | Path], out: str | Path | None = None) -> dict[str, Any]:
    """Results of several suite calls (e.g. one per spurious class, run in parallel) as one."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    methods = list(dict.fromkeys(m for p in parts for m in p["config"]["methods"]))
    settings = [r for p in parts for r in p["settings"]]
    if all("gap_class" in r for r in settings):  # the paper's criterion spans the seeds of every part
        mark_paper_learned(settings)
        if all(p["config"].get("learned") == "paper" for p in parts):
            for r in settings:
                r["learned"] = r["learned_paper"]
    merged = {
        "config": [p["config"] for p in parts],
        "zero_shot": parts[0]["zero_shot"],
        "settings": settings,
        "summary": summarize(settings, methods),
        "seconds": {"parts": [p["seconds"] for p in parts]},
    }
    merged["config_split"] = parts[0]["config"]["split"]
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(merged, indent=1) + "\n")
        plot_results(merged, out / "results.png")
    return merged


def _ms(values: list[float]) -> dict[str, float | int]:
    v = np.array([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if not len(v):
        return {"mean": None, "std": None, "n": 0}
    return {
        "mean": round(float(v.mean()), 3),
        "std": round(float(v.std(ddof=1)) if len(v) > 1 else 0.0, 3),
        "n": len(v),
    }


def summarize(settings: list[dict], methods) -> dict[str, Any]:
    """Mean ± std over the settings where the correlation was learned (and over all, for P@10)."""
    learned = [r for r in settings if r["learned"]]
    out: dict[str, Any] = {
        "settings": len(settings),
        "learned": len(learned),
        "p_at_10_learned": _ms([r["p_at_10"] for r in learned]),
        "p_at_10_all": _ms([r["p_at_10"] for r in settings]),
        "gap_others_all": _ms([r["gap_others"] for r in settings]),
    }
    paper = [r for r in settings if r.get("learned_paper")]
    out["learned_paper"] = len(paper)
    for name in sorted({k[len("p_at_10_") :] for r in settings for k in r if k.startswith("p_at_10_")}):
        out[f"p_at_10_{name}_learned"] = _ms([r[f"p_at_10_{name}"] for r in learned])
        out[f"p_at_10_{name}_all"] = _ms([r[f"p_at_10_{name}"] for r in settings])
    if "ravl" in methods and "flyp" in methods:
        out["rule_ravl_minus_flyp_image_wg"] = rule_difference(settings)
    for scope, rows in (("learned", learned), ("all", settings), ("learned_paper", paper)):
        out[f"mitigation_{scope}"] = {
            m: {k: _ms([r["methods"][m].get(k) for r in rows if r["methods"].get(m)]) for k in METRICS}
            for m in methods
        }
    others = [m for m in methods if m != "flyp" and "flyp" in methods]
    out["paired_vs_flyp"] = {m: _paired(settings, m) for m in others}
    classes = sorted({r["class"] for r in settings if "class" in r})
    if len(classes) > 1:  # the shortcut can go a different way per spurious class
        out["paired_vs_flyp_by_class"] = {
            c: {m: _paired([r for r in settings if r.get("class") == c], m) for m in others} for c in classes
        }
    return out


def rule_difference(settings: list[dict], method: str = "ravl", key: str = "image_wg") -> float | None:
    """The pre-registered rule's statistic: mean over the settings of `method` − flyp on `key`, a setting
    without a `method` row (no discovered feature: RaVL is then plain fine-tuning) counting as 0."""
    diffs = [
        (r["methods"][method][key] - r["methods"]["flyp"][key]) if r["methods"].get(method) else 0.0
        for r in settings
        if r["methods"].get("flyp")
    ]
    return round(float(np.mean(diffs)), 3) if diffs else None


def _paired(settings: list[dict], method: str) -> dict[str, dict[str, Any]]:
    """`method` − flyp on the same setting, per metric: mean difference, paired t, wins / pairs."""

    out = {}
    for k in METRICS:
        both = [
            (r["methods"][method][k], r["methods"]["flyp"][k])
            for r in settings
            if r["methods"].get(method)
            and r["methods"].get("flyp")
            and r["methods"][method].get(k) is not None
            and r["methods"]["flyp"].get(k) is not None
        ]
        if not both:
            continue
        a, b = [x for x, _ in both], [y for _, y in both]
        t = paired_t(a, b)
        out[k] = {
            "diff": round(float(np.mean(a) - np.mean(b)), 3),
            "t": json_t(t),  # "inf" when every difference is equal: results.json stays strict JSON
            "wins": sum(x > y for x, y in both),
            "n": len(both),
        }
    return out


def _pm(v: dict) -> str:
    return "–" if v["mean"] is None else f"{v['mean']:.1f} ± {v['std']:.1f}"


def print_results(results: dict[str, Any], console=None) -> None:

    console = console or Console(stderr=True)
    s = results["summary"]

    t = Table(
        title=f"RaVL discovery ({results.get('config_split') or results['config']['split']}): {s['learned']}/{s['settings']} settings learned the correlation",
        box=box.SIMPLE_HEAD,
    )
    for col in ("setting", "gap others", "gap class", "features", "P@10"):
        t.add_column(col, justify="right")
    for r in results["settings"]:
        t.add_row(
            r["key"],
            f"{r['gap_others']:.1f}",
            f"{r['gap_class']:.1f}",
            str(r["n_features"]),
            f"{r['p_at_10']:.2f}",
        )
    console.print(t)
    p = s["p_at_10_learned"]
    q = s["p_at_10_all"]
    console.print(
        f"P@10: {_pm(p)} over the {p['n']} settings that learned the correlation; {_pm(q)} over all {q['n']}"
    )
    others = [k for k in s if k.startswith("p_at_10_") and k.endswith("_all") and k != "p_at_10_all"]
    for name in sorted(k[len("p_at_10_") : -len("_all")] for k in others):
        a, b = s[f"p_at_10_{name}_learned"], s[f"p_at_10_{name}_all"]
        console.print(f"P@10 ({name}): {_pm(a)} over the {a['n']} learned; {_pm(b)} over all {b['n']}")
    if "learned_paper" in s:
        console.print(f"learned by the paper's criterion (ε1, ε2 > 10, every seed): {s['learned_paper']}")
    if s.get("rule_ravl_minus_flyp_image_wg") is not None:
        console.print(
            f"ravl − flyp image WG, mean over all settings: {s['rule_ravl_minus_flyp_image_wg']:+.2f}"
        )

    cols = {
        "image_acc": "img acc",
        "image_wg": "img WG",
        "class_without": "cls −rect",
        "others_with": "oth +rect",
        "region_acc": "reg acc",
        "region_wg": "reg WG",
    }
    legend = (
        "img = whole image, reg = digit quadrant (RoI); WG = worst group of class × rectangle; cls −rect = the "
        "spurious class without the rectangle; oth +rect = worst other class with it"
    )
    style = {"box": box.SIMPLE_HEAD, "padding": (0, 0, 0, 1), "caption": legend}  # fits 80 columns
    scopes = ["learned", "all"] + (["learned_paper"] if s.get("learned_paper") else [])
    for scope in scopes:
        label = "paper-learned" if scope == "learned_paper" else scope
        t = Table(title=f"Mitigation, mean and ± std over {label} settings (test set, %)", **style)
        t.add_column("method", no_wrap=True)
        for col in cols.values():
            t.add_column(col, justify="right", no_wrap=True)
        for m, v in s[f"mitigation_{scope}"].items():
            t.add_row(m, *(_pm(v.get(k, {"mean": None})).replace(" ± ", "\n±") for k in cols))
        console.print(t)
    scopes = {"all": s.get("paired_vs_flyp", {}), **s.get("paired_vs_flyp_by_class", {})}
    if any(scopes.values()):
        t = Table(title="Paired on the setting, method − flyp: difference, paired t, higher/pairs", **style)
        t.add_column("method, class", no_wrap=True)
        for col in cols.values():
            t.add_column(col, justify="right", no_wrap=True)
        for scope, paired in scopes.items():
            for m, v in paired.items():
                t.add_row(f"{m}, {scope}", *(diff_lines(v.get(k)) for k in cols))
        console.print(t)


def plot_results(results: dict[str, Any], path: Path) -> Path:

    matplotlib.use("Agg")

    s = results["summary"]["mitigation_all"]
    methods = list(s)
    keys = ("image_acc", "image_wg", "region_acc", "region_wg")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    w = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        ax1.bar(
            [j + i * w for j in range(len(keys))],
            [s[m][k]["mean"] or 0.0 for k in keys],
            w,
            yerr=[s[m][k]["std"] or 0.0 for k in keys],
            label=m,
            capsize=2,
        )
    ax1.set_xticks([j + w * (len(methods) - 1) / 2 for j in range(len(keys))], keys)
    ax1.set_ylabel("% (test)")
    ax1.legend()
    ax1.set_title("mitigation (all settings)")
    rows = results["settings"]
    ax2.scatter([r["gap_others"] for r in rows], [r["p_at_10"] for r in rows])
    ax2.set_xlabel("learned gap (points)")
    ax2.set_ylabel("discovery P@10")
    ax2.set_title("discovery")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
