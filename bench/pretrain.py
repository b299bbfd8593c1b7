"""Pretrain the benchmark's zero-shot model: a small open_clip CLIP trained from scratch on the synthetic world.

    from bench.pretrain import PretrainConfig, get_pretrained; run_dir = get_pretrained(PretrainConfig())

The result is cached in `<root>/zeroshot-<hash>/` (hash of the config, its world and the seed):
`model.json` (open_clip model config), `model.safetensors`, `meta.json` (configs, pretraining metrics,
zero-shot figures), and `open_clip_config.json` so `create_model_and_transforms("local-dir:<run_dir>")`
works as well. Load it with `load_pretrained(run_dir)`.

The logit scale is not learned: a learned scale drifts low on this world's near-duplicate captions
(prototypes ended at ~13), which makes a distillation teacher flat. The loss uses a scale ramped from 10 to
100 over the first half of training, then CLIP's 100; the saved model's `logit_scale` is 100.
Positives: every caption in the batch that truly describes an image (names its digit or a loose object,
its scene, or both) counts as a positive of it, not only its own caption. Batches: most draw their images
from one background type, so captions in a batch differ by their object and the image tower must learn
glyphs (with all scenes mixed, or 2-3 per batch, it learns scenes alone: the batch-norm image tower reads
the background first); every `mixed_every`-th batch mixes all backgrounds, so scene words and the task-B
class-background bias are learned too. Batch-norm statistics are recomputed on mixed batches before the
model is evaluated and saved (running statistics of one-background batches do not fit mixed data).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from safetensors.torch import load_file, save_file

from bench.vocab import NUMBER_WORDS, caption_vocabulary
from bench.world import SplitData, WorldConfig, build_split, pretrain_caption, typical_for
from trainer.losses import soft_clip_loss
from trainer.schedules import cosine_lr

PRETRAIN_VERSION = 5  # bump when the recipe changes, so caches are not reused
MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's default (OpenAI) normalisation
STD = (0.26862954, 0.26130258, 0.27577711)
TEMPLATES = ("a photo of a {}.",)  # the fine-tuning caption form; zero-shot head prompts


class PretrainConfig(BaseModel):
    """Zero-shot model architecture and pretraining recipe. Frozen; hashed with its world and seed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    world: WorldConfig = Field(default_factory=WorldConfig)
    seed: int = 0  # pretraining seed (init, batch order, caption sampling); the world has its own
    embed_dim: int = 128
    vision_width: int = 16  # ModifiedResNet stem width; feature dim = 32 x width
    vision_layers: tuple[int, int, int, int] | int = (1, 1, 1, 1)  # an int with vision_patch_size: ViT depth
    vision_patch_size: int | None = Field(
        None,
        description="None: ModifiedResNet image tower; an int: ViT with this patch size (LayerNorm, no BN)",
    )
    vision_head_width: int = 64
    vision_mlp_ratio: float = 4.0
    text_width: int = 64
    text_heads: int = 4
    text_layers: int = 2
    context_length: int = 24  # captions are <= 22 tokens; longer ones are cut
    steps: int = 900
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    logit_scale: float = 100.0  # the final scale, CLIP's; not learned
    logit_scale_start: float = 10.0  # ramped geometrically to logit_scale over the first logit_ramp of steps
    logit_ramp: float = 0.5  # fraction of steps; 0 = logit_scale from the start
    batch_backgrounds: int = Field(
        1, description="each batch draws its images from this many background types (0 = from all)"
    )
    mixed_every: int = Field(
        4, description="every n-th batch draws from all backgrounds instead (scene contrast; 0 = never)"
    )
    positives: Literal["describes", "identical"] = Field(
        "describes",
        description="positives of an image: every caption in the batch that truly describes it (its named "
        "digit or a loose object, its scene), or only identical captions",
    )
    bn_recalibrate: int = Field(
        16,
        description="batches of mixed backgrounds whose batch-norm statistics replace the running ones before "
        "evaluation and saving (training batches from few backgrounds skew them); 0 = keep",
    )
    eval_every: int = 0  # steps between validation zero-shot checks; 0 = only at the end

    def hash(self) -> str:
        blob = json.dumps(
            {
                "v": PRETRAIN_VERSION,
                "world_hash": self.world.hash(),
                # eval_every only adds log lines; it does not change the weights
                **self.model_dump(mode="json", exclude={"eval_every"}),
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def model_config(cfg: PretrainConfig) -> dict[str, Any]:
    """The open_clip model config (the content of model.json)."""
    if cfg.vision_patch_size:
        if cfg.world.image_size % cfg.vision_patch_size:
            raise ValueError(f"image_size {cfg.world.image_size} is not a multiple of the patch size")
        layers = cfg.vision_layers if isinstance(cfg.vision_layers, int) else sum(cfg.vision_layers)
        vision_cfg = {
            "image_size": cfg.world.image_size,
            "layers": layers,
            "width": cfg.vision_width,
            "head_width": cfg.vision_head_width,
            "mlp_ratio": cfg.vision_mlp_ratio,
            "patch_size": cfg.vision_patch_size,
        }
    elif cfg.world.image_size % 32:
        raise ValueError(
            f"the ModifiedResNet image tower needs image_size % 32 == 0, got {cfg.world.image_size}"
        )
    else:
        vision_cfg = {
            "image_size": cfg.world.image_size,
            "layers": list(cfg.vision_layers),
            "width": cfg.vision_width,
            "head_width": cfg.vision_head_width,
            "patch_size": None,
        }
    return {
        "embed_dim": cfg.embed_dim,
        "init_logit_scale": math.log(cfg.logit_scale),
        "vision_cfg": vision_cfg,
        "text_cfg": {
            "context_length": cfg.context_length,
            "vocab_size": 49408,  # open_clip's SimpleTokenizer (as "ViT-B-32")
            "width": cfg.text_width,
            "heads": cfg.text_heads,
            "layers": cfg.text_layers,
        },
    }


def run_dir_for(cfg: PretrainConfig, root: str | Path = ".cache/bench") -> Path:
    return Path(root) / f"zeroshot-{cfg.hash()}"


# --- tensors and losses ---------------------------------------------------------------------------------


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float, normalised like open_clip's preprocess."""
    if not images.flags.writeable:
        images = images.copy()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


def describes(contents: list[dict], records: list[dict]) -> torch.Tensor:
    """(B, B) bool: caption j (stated `contents[j]`) is a true description of image i (`records[i]`)."""
    digit = torch.tensor([r["digit"] for r in records])
    bg_ix = {b: k for k, b in enumerate(sorted({r["background"] for r in records}))}
    bg = torch.tensor([bg_ix[r["background"]] for r in records])
    c_obj = torch.tensor([c["object"] for c in contents])
    c_digit = torch.tensor([-2 if c["digit"] is None else c["digit"] for c in contents])
    c_bg = torch.tensor([-1 if c["scene"] is None else bg_ix.get(c["scene"], -3) for c in contents])
    obj_ok = ~c_obj[None, :] | (
        (digit[:, None] >= 0) & ((c_digit[None, :] == -2) | (c_digit[None, :] == digit[:, None]))
    )
    bg_ok = (c_bg[None, :] == -1) | (c_bg[None, :] == bg[:, None])
    return obj_ok & bg_ok


# --- zero-shot evaluation -------------------------------------------------------------------------------


@torch.no_grad()
def encode_images(model: torch.nn.Module, images: np.ndarray, batch_size: int = 500) -> torch.Tensor:
    out = [
        F.normalize(model.encode_image(to_tensor(images[i : i + batch_size])), dim=-1)
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out)


@torch.no_grad()
def class_head(
    model: torch.nn.Module, tokenizer: Any, class_names: tuple[str, ...], templates=TEMPLATES
) -> torch.Tensor:
    """(C, D) zero-shot head: the normalised mean of each class's normalised prompt embeddings."""
    rows = []
    for name in class_names:
        t = F.normalize(model.encode_text(tokenizer([tp.format(name) for tp in templates])), dim=-1).mean(0)
        rows.append(F.normalize(t, dim=-1))
    return torch.stack(rows)


@torch.no_grad()
def zero_shot_report(
    model: torch.nn.Module, tokenizer: Any, data: SplitData, world: WorldConfig
) -> dict[str, Any]:
    """Accuracy of a split; per (class, background) group accuracies, worst group and bias gap when grouped."""
    was_training = model.training
    model.eval()
    pred = (
        (encode_images(model, data.images) @ class_head(model, tokenizer, data.class_names).T)
        .argmax(1)
        .numpy()
    )
    model.train(was_training)
    correct = pred == data.labels
    rep: dict[str, Any] = {"n": len(correct), "acc": 100 * float(correct.mean())}
    groups: dict[str, list[bool]] = {}
    typical, other = [], []
    for ok, lab, bg in zip(correct, data.labels, data.backgrounds):
        groups.setdefault(f"{data.class_names[lab]}/{bg}", []).append(bool(ok))
        (typical if bg in typical_for(world, data.classes[lab]) else other).append(bool(ok))
    accs = {k: 100 * float(np.mean(v)) for k, v in sorted(groups.items())}
    worst = sorted(accs.values())
    rep.update(
        groups=accs,
        worst_group=worst[0],
        worst3_mean=float(np.mean(worst[:3])),
        group_mean=float(np.mean(worst)),
        typical_acc=100 * float(np.mean(typical)) if typical else None,
        other_acc=100 * float(np.mean(other)) if other else None,
    )
    if typical and other:
        rep["bias_gap"] = rep["typical_acc"] - rep["other_acc"]
    return rep


EVAL_SPLITS = ("a", "a_sketch", "a_unseen", "b_groups", "b_plain", "b_sketch")


_EVAL_CACHE: dict[tuple[str, str], SplitData] = {}


def _eval_split(world: WorldConfig, name: str) -> SplitData:
    # Rendering b_groups takes seconds; keep the last few eval splits for repeated checks in one process.
    key = (world.hash(), name)
    if key not in _EVAL_CACHE:
        if len(_EVAL_CACHE) >= 12:
            _EVAL_CACHE.pop(next(iter(_EVAL_CACHE)))
        _EVAL_CACHE[key] = build_split(world, name)
    return _EVAL_CACHE[key]


def evaluate_zero_shot(
    model, tokenizer, world: WorldConfig, variant: str = "test", splits=EVAL_SPLITS
) -> dict:
    """Zero-shot reports on the world's `<split>_<variant>` splits."""
    return {
        s: zero_shot_report(model, tokenizer, _eval_split(world, f"{s}_{variant}"), world) for s in splits
    }


def summary(reports: dict) -> dict[str, float]:
    """The headline figures of `evaluate_zero_shot` output."""
    out = {}
    for k, r in reports.items():
        out[f"{k}_acc"] = round(r["acc"], 2)
    if "b_groups" in reports:
        g = reports["b_groups"]
        out.update(
            b_worst_group=round(g["worst_group"], 2),
            b_worst3=round(g["worst3_mean"], 2),
            b_group_avg=round(g["group_mean"], 2),
            b_bias_gap=round(g.get("bias_gap", float("nan")), 2),
        )
    return out


# --- pretraining ----------------------------------------------------------------------------------------


@torch.no_grad()
def recalibrate_bn(
    model: torch.nn.Module, images: torch.Tensor, batches: int, batch_size: int, seed: int
) -> None:
    """Recompute batch-norm running statistics on `batches` random batches of uint8 `images` (N, 3, H, W)."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns or batches <= 0:
        return
    was_training = model.training
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the recalibration batches
    model.train()
    gen = torch.Generator().manual_seed(seed)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    for _ in range(batches):
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        model.encode_image((images[idx].float().div_(255) - mean) / std)
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.train(was_training)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "bn" in n or "ln" in n or "embedding" in n else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _scale_at(step: int, cfg: PretrainConfig) -> float:
    # A sharp scale on random features puts all gradient on a few hard negatives; start soft, end at CLIP's.
    ramp = cfg.logit_ramp * cfg.steps
    if step >= ramp:
        return cfg.logit_scale
    t = step / ramp
    return cfg.logit_scale_start ** (1 - t) * cfg.logit_scale**t


def build_model(cfg: PretrainConfig):
    """A freshly initialised open_clip CLIP for `cfg`, and its tokenizer."""

    torch.manual_seed(cfg.seed)
    model = open_clip.model.CLIP(**model_config(cfg))
    return model, open_clip.tokenizer.SimpleTokenizer(context_length=cfg.context_length)


def pretrain(
    cfg: PretrainConfig,
    root: str | Path = ".cache/bench",
    *,
    threads: int | None = 2,
    progress: bool = True,
    force: bool = False,
) -> Path:
    """Pretrain the zero-shot model and write it to its cache folder (reused unless `force`). Returns the folder."""

    out = run_dir_for(cfg, root)
    if (out / "meta.json").exists() and not force:
        return out
    if threads:
        torch.set_num_threads(threads)
    t0, cpu0 = time.time(), time.process_time()
    world = cfg.world
    model, tokenizer = build_model(cfg)
    model.logit_scale.requires_grad_(False)
    model.logit_scale.fill_(math.log(cfg.logit_scale))

    cols = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    )
    # No stdout/stderr redirection: when output is not a terminal, the log lines below appear as they happen.
    with Progress(*cols, disable=not progress, redirect_stdout=False, redirect_stderr=False) as bar:
        plain = progress and not bar.console.is_terminal
        task = bar.add_task("render pretraining set", total=1, info="")
        data = build_split(world, "pretrain")
        bar.update(task, advance=1)
        t_data = time.time() - t0
        images = torch.from_numpy(data.images).permute(0, 3, 1, 2).contiguous()  # uint8, normalised per batch
        mean = torch.tensor(MEAN).view(1, 3, 1, 1)
        std = torch.tensor(STD).view(1, 3, 1, 1)
        records = [
            {"digit": int(d), "background": b, "style": s, "named": bool(nm)}
            for d, b, s, nm in zip(data.digits, data.backgrounds, data.styles, data.named)
        ]

        opt = torch.optim.AdamW(
            _param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6
        )
        gen = torch.Generator().manual_seed(cfg.seed)
        cap_rng = np.random.default_rng([cfg.seed, 17])
        n = len(records)
        order, pos = torch.randperm(n, generator=gen), 0
        # Batches from a few backgrounds: captions of one batch then differ mostly in their object, so the
        # image tower must learn glyphs, not only scenes (with all scenes mixed it learns scenes alone).
        bg_names = sorted(set(data.backgrounds))
        by_bg = [torch.tensor([i for i, b in enumerate(data.backgrounds) if b == name]) for name in bg_names]
        bg_weight = torch.tensor([len(ix) for ix in by_bg], dtype=torch.float)
        history: list[dict[str, float]] = []
        model.train()
        task = bar.add_task("pretrain zero-shot model", total=cfg.steps, info="")
        loss_m = None
        for step in range(cfg.steps):
            mixed = cfg.mixed_every and step % cfg.mixed_every == cfg.mixed_every - 1
            if cfg.batch_backgrounds and not mixed:
                k = min(cfg.batch_backgrounds, len(by_bg))
                pool = torch.cat([by_bg[j] for j in torch.multinomial(bg_weight, k, generator=gen).tolist()])
                idx = pool[torch.randperm(len(pool), generator=gen)[: cfg.batch_size]]
            else:
                if pos + cfg.batch_size > n:
                    order, pos = torch.randperm(n, generator=gen), 0
                idx = order[pos : pos + cfg.batch_size]
                pos += cfg.batch_size
            x = (images[idx].float().div_(255) - mean) / std
            contents = [{} for _ in range(len(idx))]
            captions = [
                pretrain_caption(world, cap_rng, records[i], c) for i, c in zip(idx.tolist(), contents)
            ]
            tokens = tokenizer(captions)
            same = (tokens[:, None, :] == tokens[None, :, :]).all(-1)
            if cfg.positives == "describes":
                same = same | describes(contents, [records[i] for i in idx.tolist()])
            for g in opt.param_groups:
                g["lr"] = cosine_lr(step, cfg.lr, cfg.warmup_steps, cfg.steps)
            img_f = F.normalize(model.encode_image(x), dim=-1)
            txt_f = F.normalize(model.encode_text(tokens), dim=-1)
            loss = soft_clip_loss(img_f, txt_f, _scale_at(step, cfg), same)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            loss_m = loss.item() if loss_m is None else 0.98 * loss_m + 0.02 * loss.item()
            if step % 50 == 0 or step == cfg.steps - 1:
                history.append(
                    {
                        "step": step,
                        "loss": round(loss_m, 4),
                        "lr": cosine_lr(step, cfg.lr, cfg.warmup_steps, cfg.steps),
                        "scale": _scale_at(step, cfg),
                    }
                )
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                recalibrate_bn(model, images, cfg.bn_recalibrate, cfg.batch_size, cfg.seed + step)
                s = summary(evaluate_zero_shot(model, tokenizer, world, "val", ("a", "b_groups")))
                history[-1]["val"] = s
                print(f"step {step + 1}: {s}", file=sys.stderr, flush=True)
            if plain and (step + 1) % 100 == 0:
                print(
                    f"step {step + 1}/{cfg.steps} loss {loss_m:.3f} {time.time() - t0:.0f}s",
                    file=sys.stderr,
                    flush=True,
                )
            bar.update(task, advance=1, info=f"loss {loss_m:.3f}")
        t_train = time.time() - t0 - t_data

        task = bar.add_task("zero-shot evaluation", total=2, info="")
        recalibrate_bn(model, images, cfg.bn_recalibrate, cfg.batch_size, cfg.seed + cfg.steps)
        model.eval()
        reports = {}
        for variant in ("val", "test"):
            reports[variant] = evaluate_zero_shot(model, tokenizer, world, variant)
            bar.update(task, advance=1)

    named = [
        (d, world.class_names[d])
        for d in range(10)
        if (world.b_name_prob if d in world.task_b else world.a_name_prob) > 0
    ]
    vocab = sorted(caption_vocabulary(world.pretrain_backgrounds, named))
    mcfg = model_config(cfg)
    # One temp folder per process: two benches may pretrain the same seed at once.
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "model.json").write_text(json.dumps(mcfg, indent=2))
    (tmp / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": mcfg, "preprocess_cfg": {"mean": list(MEAN), "std": list(STD)}}, indent=2)
    )
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    meta = {
        "hash": cfg.hash(),
        "world_hash": world.hash(),
        "seed": cfg.seed,
        "pretrain_config": cfg.model_dump(mode="json"),
        "logit_scale": float(model.logit_scale.exp()),
        "params": sum(p.numel() for p in model.parameters()),
        "wall_seconds": {
            "data": round(t_data, 1),
            "train": round(t_train, 1),
            "total": round(time.time() - t0, 1),
            # CPU seconds of this process: on idle cores, wall time ~ cpu / threads
            "cpu": round(time.process_time() - cpu0, 1),
        },
        "threads": torch.get_num_threads(),
        "final_loss": history[-1]["loss"],
        "history": history,
        "zero_shot": {v: summary(r) for v, r in reports.items()},
        "zero_shot_reports": reports,
        "templates": list(TEMPLATES),
        "vocabulary": vocab,
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    if out.exists() and (force or not (out / "meta.json").exists()):  # forced, or incomplete
        shutil.rmtree(out)
    try:
        tmp.rename(out)
    except OSError:  # another process finished the same model first (same seed): keep its copy
        if not (out / "meta.json").exists():
            raise
        shutil.rmtree(tmp)
    return out


def get_pretrained(cfg: PretrainConfig, root: str | Path = ".cache/bench", **kwargs) -> Path:
    """The cached zero-shot model folder for `cfg`, pretraining it first if needed."""
    return pretrain(cfg, root, **kwargs)


def load_pretrained(run_dir: str | Path):
    """Load a pretrained folder through open_clip: (model, preprocess_train, preprocess_val, tokenizer).

    Registers `model.json` under the name "model" (open_clip names a config file by its stem); the last
    registered folder wins that name, so load one folder at a time or use `local-dir:` instead.
    """

    run_dir = Path(run_dir)
    open_clip.add_model_config(run_dir / "model.json")
    model, pre_train, pre_val = open_clip.create_model_and_transforms("model", pretrained=None)
    model.load_state_dict(load_file(str(run_dir / "model.safetensors")))
    model.eval()
    return model, pre_train, pre_val, open_clip.get_tokenizer("model")


def read_meta(run_dir: str | Path) -> dict:
    return json.loads((Path(run_dir) / "meta.json").read_text())


def pretrain_vocabulary(world: WorldConfig) -> set[str]:
    """Every word the pretraining captions of `world` can contain."""
    named = [
        (d, world.class_names[d])
        for d in range(10)
        if (world.b_name_prob if d in world.task_b else world.a_name_prob) > 0
    ]
    return caption_vocabulary(world.pretrain_backgrounds, named)


__all__ = [
    "NUMBER_WORDS",
    "PretrainConfig",
    "build_model",
    "evaluate_zero_shot",
    "get_pretrained",
    "load_pretrained",
    "model_config",
    "pretrain",
    "pretrain_vocabulary",
    "read_meta",
    "run_dir_for",
    "summary",
    "zero_shot_report",
]
