"""The accelerate training loop: `train(cfg) -> run dir`, for every method.

    from trainer.config import load_config; from trainer.train import train; run = train(load_config("c.yaml"))

Order (accelerate's complete example): check inputs -> Accelerator -> seed -> model, teacher, data ->
prepare -> optional load_state + skip_first_batches -> accumulate / backward / step -> evaluate ->
save_state. A method is a `MethodSpec`: its objective (contrastive or cross-entropy) plus an optional
extra loss term, a small function of a `StepContext`, so other modules can register theirs.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from trainer import __version__
from trainer.config import TrainConfig, load_config
from trainer.data import (
    Collate,
    EpochSampler,
    ImageDataset,
    ImageSet,
    SpuriousCaptions,
    load_image_set,
    read_lines,
)
from trainer.errors import ConfigError, DataError, RunDirError
from trainer.losses import clip_loss, star_loss

# --- methods ---------------------------------------------------------------------------------


@dataclass
class StepContext:
    """What an extra loss term sees: features of the global batch (gathered across processes)."""

    cfg: TrainConfig
    batch: dict[str, torch.Tensor]  # this process's micro-batch
    out: dict[str, Any]  # the student's forward outputs (local)
    image: torch.Tensor  # (N, D) student image features, global batch, with gradient
    labels: torch.Tensor  # (N,)
    spurious: torch.Tensor | None = None  # (N, D) student spurious-caption features
    teacher_image: torch.Tensor | None = None
    teacher_spurious: torch.Tensor | None = None
    kl_scale: float = 1.0
    step: int = 0
    epoch: int = 0
    model: Any = None  # the prepared (DDP-wrapped) model: call it, not its parts, for DDP-correct grads
    accelerator: Any = None
    state: dict[str, Any] = field(default_factory=dict)  # what the method's `setup` returned
    extras: dict[str, Any] = field(default_factory=dict)  # extras["log"]: more named terms to log


@dataclass(frozen=True)
class MethodSpec:
    """A method: its objective plus optional hooks (all default to plain L = L_C + λ·reg).

    setup(cfg, train_set, clip, preprocess, tokenizer) -> state: runs once before training (e.g. labels
    regions of the training set); state["sample_extras"] maps a batch key to a (N, ...) tensor indexed by
    sample. forward_kwargs(batch, state) -> extra arguments of the model's forward (one forward per step,
    so DDP sees every use). combine(ctx, L_C, reg, λ) -> loss.
    """

    name: str
    objective: Literal["contrastive", "ce", "none"]
    needs_spurious: bool = False
    needs_teacher: bool = False
    reg_term: Callable[[StepContext], torch.Tensor] | None = None
    freeze_text: bool = False  # train the image tower only (and keep the logit scale)
    setup: Callable[..., dict[str, Any]] | None = None
    forward_kwargs: Callable[[dict[str, torch.Tensor], dict[str, Any]], dict[str, Any]] | None = None
    combine: Callable[[StepContext, torch.Tensor, torch.Tensor, float], torch.Tensor] | None = None


def _star_term(ctx: StepContext) -> torch.Tensor:
    return star_loss(
        ctx.image, ctx.spurious, ctx.teacher_image, ctx.teacher_spurious, ctx.labels, ctx.kl_scale
    )


def _kl_term(ctx: StepContext) -> torch.Tensor:
    return star_loss(
        ctx.image,
        ctx.spurious,
        ctx.teacher_image,
        ctx.teacher_spurious,
        ctx.labels,
        ctx.kl_scale,
        mask_same_label=False,
    )


METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> None:
    METHODS[spec.name] = spec


for _spec in (
    MethodSpec("zeroshot", "none"),
    MethodSpec("ft", "ce"),
    MethodSpec("flyp", "contrastive"),
    MethodSpec("starft", "contrastive", needs_spurious=True, needs_teacher=True, reg_term=_star_term),
    MethodSpec("kl", "contrastive", needs_spurious=True, needs_teacher=True, reg_term=_kl_term),
):
    register_method(_spec)


PLUGIN_MODULES = {"ravl": "ravl_method"}  # method name -> trainer module that registers it


def get_method(name: str) -> MethodSpec:
    """The registered method; plug-ins (trainer/ravl_method.py) register themselves on import."""
    if name not in METHODS:
        module = PLUGIN_MODULES.get(name, name)
        try:
            importlib.import_module(f"trainer.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"trainer.{module}":
                raise
            raise ConfigError(
                f"method {name!r} is not available yet (trainer/{module}.py is missing)"
            ) from None
        if name not in METHODS:
            raise ConfigError(
                f"method {name!r} is not available yet (trainer/{module}.py does not call trainer.train.register_method)"
            )
    return METHODS[name]


# --- schedules -------------------------------------------------------------------------------


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Linear warmup then cosine to 0; `step` counts optimizer steps from 0."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total - cfg.warmup_steps)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * (step - cfg.warmup_steps) / span))


def lam_at(step: int, epoch: int, cfg: TrainConfig, total: int, epochs: int) -> float:
    """lambda_e = lam (1 - (e+1)/E) per epoch (the reference code), or per step, or constant."""
    if cfg.lam_decay == "epoch":
        return cfg.lam * (1 - (epoch + 1) / epochs)
    if cfg.lam_decay == "step":
        return cfg.lam * (1 - (step + 1) / total)
    return cfg.lam


# --- inputs, checked before anything is written ---------------------------------------------


@dataclass
class Inputs:
    method: MethodSpec
    train: ImageSet | None
    val: ImageSet | None
    evals: list[ImageSet]
    spurious: SpuriousCaptions | None
    bank_info: dict[str, Any] | None


def default_run_name(cfg: TrainConfig) -> str:
    bank = Path(cfg.bank).stem if cfg.bank and cfg.method in ("starft", "kl") else "nobank"
    model = Path(cfg.model).stem if cfg.model.endswith(".json") else cfg.model
    return f"{bank}-{cfg.method}-{model}-lr{cfg.lr:g}-b{cfg.batch_size}-s{cfg.seed}"


def load_inputs(cfg: TrainConfig) -> Inputs:
    """Method, datasets and bank, all validated (raises TrainerError with a one-line message)."""
    method = get_method(cfg.method)
    train = load_image_set(cfg.data.train, cfg.templates) if cfg.data.train else None
    base_classes = train.classes if train else None
    val = load_image_set(cfg.data.val, cfg.templates, base_classes) if cfg.data.val else None
    evals = [load_image_set(spec, cfg.templates, base_classes) for spec in cfg.data.eval]
    names = [s.name for s in ([val] if val else []) + evals]
    if len(set(names)) != len(names):
        raise ConfigError(f"evaluation sets need distinct names (have {names}); set `name:` on each")
    if method.objective == "none" and not names:
        raise ConfigError("method zeroshot needs data.val or data.eval")
    spurious, bank_info = None, None
    if method.needs_spurious:
        descriptors: list[Any] = []
        if cfg.spurious == "bank":
            from descgen.bank import file_sha256, load_bank
            from descgen.errors import DescgenError

            try:
                bank = load_bank(cfg.bank)  # type: ignore[arg-type]
            except DescgenError as e:
                raise ConfigError(f"bank: {e}") from None
            try:
                descriptors = bank.approved(cfg.concepts)
            except KeyError as e:
                raise ConfigError(f"bank {cfg.bank}: no concept {e.args[0]!r}") from None
            if not descriptors:
                raise ConfigError(
                    f"bank {cfg.bank}: no approved descriptor for concept(s) {', '.join(cfg.concepts)}"
                )
            bank_info = {
                "path": str(cfg.bank),
                "version": bank.meta.version,
                "file_sha256": file_sha256(cfg.bank),  # type: ignore[arg-type]
                "content_hash": bank.compute_hash(),
                "concepts": list(cfg.concepts),
                "descriptors": [d.id for d in descriptors],
            }
        words = read_lines(cfg.random_words, "word-list") if cfg.random_words else ()
        spurious = SpuriousCaptions(cfg.spurious, cfg.seed, descriptors, words)
    return Inputs(method, train, val, evals, spurious, bank_info)


def _versions() -> dict[str, str]:
    import accelerate
    import open_clip

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "accelerate": accelerate.__version__,
        "trainer": __version__,
    }


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def new_accelerator(**kwargs: Any):
    """An Accelerator from a clean accelerate state.

    train() may run several times in one process (benchmarks, tests) with different precision or
    accumulation; accelerate keeps those in process-wide singletons, so each run starts from a clean one.
    The distributed PartialState (the process group) is kept.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    return Accelerator(**kwargs)


def _mixed_precision(setting: str) -> str:
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


# --- the step --------------------------------------------------------------------------------


class TeacherFeatures:
    """Frozen zero-shot features of a micro-batch. One seam, so a cache keyed by `index` can replace it."""

    def __init__(self, teacher: torch.nn.Module):
        self.teacher = teacher

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.teacher.encode_image(batch["image"], normalize=True)
        text = self.teacher.encode_text(batch["spurious"], normalize=True)
        return image, text


def _gather_with_grad(accelerator, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """All-gather keeping the autograd graph (torch.distributed.nn), as open_clip's ClipLoss does."""
    if accelerator.num_processes == 1:
        return list(tensors)
    import torch.distributed.nn

    return [torch.cat(torch.distributed.nn.all_gather(t.contiguous()), dim=0) for t in tensors]


def compute_losses(
    model,
    batch: dict[str, torch.Tensor],
    method: MethodSpec,
    cfg: TrainConfig,
    accelerator,
    teacher: TeacherFeatures | None,
    kl_scale: float,
    lam: float,
    step: int = 0,
    epoch: int = 0,
    state: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """One micro-batch's loss terms over the global batch: contrastive_loss, reg_loss, loss (+ the
    method's extra logged terms)."""
    if method.objective == "ce":
        out = model(batch["image"])
        ce = F.cross_entropy(out["logits"].float(), batch["label"])
        zero = ce.detach() * 0
        return {"contrastive_loss": ce, "reg_loss": zero, "loss": ce}
    n = batch["caption"].shape[0]
    text = torch.cat([batch["caption"], batch["spurious"]]) if method.needs_spurious else batch["caption"]
    kwargs = method.forward_kwargs(batch, state or {}) if method.forward_kwargs else {}
    out = model(batch["image"], text, **kwargs)
    image, caption = out["image"], out["text"][:n]
    g_image, g_caption = _gather_with_grad(accelerator, image, caption)
    labels = accelerator.gather(batch["label"]) if accelerator.num_processes > 1 else batch["label"]
    lc = clip_loss(g_image, g_caption, out["logit_scale"], labels if cfg.positives == "label" else None)
    terms = {"contrastive_loss": lc}
    if method.reg_term is not None:
        ctx = StepContext(
            cfg,
            batch,
            out,
            g_image,
            labels,
            kl_scale=kl_scale,
            step=step,
            epoch=epoch,
            model=model,
            accelerator=accelerator,
            state=state or {},
        )
        if method.needs_spurious:
            (ctx.spurious,) = _gather_with_grad(accelerator, out["text"][n:])
        if method.needs_teacher and teacher is not None:
            with accelerator.autocast():
                t_image, t_spurious = teacher(batch)
            if accelerator.num_processes > 1:
                t_image, t_spurious = accelerator.gather(t_image), accelerator.gather(t_spurious)
            ctx.teacher_image, ctx.teacher_spurious = t_image, t_spurious
        reg = method.reg_term(ctx)
        terms["reg_loss"] = reg
        terms["loss"] = method.combine(ctx, lc, reg, lam) if method.combine else lc + lam * reg
        terms.update(ctx.extras.get("log", {}))
    else:
        terms["reg_loss"] = lc.detach() * 0
        terms["loss"] = lc
    return terms


# --- checkpoints ------------------------------------------------------------------------------


def save_weights(model, path: Path) -> None:
    """The open_clip state dict as safetensors (usable as `pretrained:`); an ft head goes beside it."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.clip.state_dict().items()}
    save_file(state, str(path))
    if model.head is not None:
        head = {k: v.detach().contiguous().cpu() for k, v in model.head.state_dict().items()}
        save_file(head, str(path.with_suffix(".head.safetensors")))


def _save_state(accelerator, run_dir: Path, meta: dict[str, Any]) -> None:
    """accelerate save_state into state.tmp, then swap it in, so a crash never leaves a half state."""
    tmp, final, old = run_dir / "state.tmp", run_dir / "state", run_dir / "state.old"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json(tmp / "meta.json", meta)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        if old.exists():
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


# --- the run ---------------------------------------------------------------------------------


def _prepare_run_dir(cfg: TrainConfig, resume: bool) -> tuple[Path, dict[str, Any] | None]:
    run_dir = Path(cfg.runs_dir) / (cfg.name or default_run_name(cfg))
    if not resume:
        if run_dir.exists():
            raise RunDirError(
                f"{run_dir}: run directory exists; pass --resume to continue it or choose another name"
            )
        return run_dir, None
    meta_path = run_dir / "state" / "meta.json"
    if not meta_path.is_file():
        raise RunDirError(f"{run_dir}: nothing to resume (no saved state)")
    saved = load_config(run_dir / "config.yaml")
    mine, theirs = cfg.hparams(), saved.hparams()
    diff = [k for k in mine if mine[k] != theirs.get(k)]
    if diff:
        raise RunDirError(
            f"{run_dir}: --resume with a different config ({', '.join(diff)}); runtime keys only may change"
        )
    return run_dir, json.loads(meta_path.read_text())


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Fine-tune (or only evaluate, method zeroshot) as `cfg` says; returns the run directory."""
    from accelerate.utils import DataLoaderConfiguration, set_seed

    from trainer.evaluate import evaluate_sets, make_eval_sets, zero_shot_head
    from trainer.model import FineTuner, build_clip, clamp_logit_scale, make_teacher

    torch.set_num_threads(cfg.threads or min(4, os.cpu_count() or 1))
    inputs = load_inputs(cfg)
    run_dir, resume_meta = _prepare_run_dir(cfg, resume)
    method = inputs.method

    try:
        accelerator = new_accelerator(
            mixed_precision=_mixed_precision(cfg.mixed_precision),
            gradient_accumulation_steps=cfg.grad_accum,
            # The loader yields the global micro-batch and each process takes its slice: the global batch,
            # and so the result, does not depend on the number of processes.
            dataloader_config=DataLoaderConfiguration(split_batches=True),
            step_scheduler_with_optimizer=False,
        )
    except ValueError as e:
        raise ConfigError(f"mixed_precision {cfg.mixed_precision}: {str(e).splitlines()[0]}") from None
    world = accelerator.num_processes
    micro = cfg.batch_size // cfg.grad_accum
    if micro % world:
        raise ConfigError(f"batch_size/grad_accum = {micro} is not divisible by {world} processes")
    if cfg.eval_batch_size % world:
        raise ConfigError(f"eval_batch_size {cfg.eval_batch_size} is not divisible by {world} processes")
    if inputs.train is not None and len(inputs.train) < micro:
        raise DataError(
            f"{cfg.data.train.path}: {len(inputs.train)} samples, fewer than one batch of {micro}"
        )

    set_seed(cfg.seed)  # the same seed before build_clip as `trainer wise` uses, so random inits agree
    clip, preprocess, tokenizer = build_clip(cfg.model, cfg.pretrained)
    teacher_model = make_teacher(clip) if method.needs_teacher else None
    # before training, with the initial model (RaVL labels the regions of every training image here)
    state = method.setup(cfg, inputs.train, clip, preprocess, tokenizer) if method.setup else {}
    teacher_scale = float(clip.logit_scale.exp().item())
    kl_scale = cfg.kl_scale or teacher_scale

    head = None
    if method.objective == "ce":
        head = zero_shot_head(clip, tokenizer, inputs.train.classes, inputs.train.templates)
    freeze_text = method.freeze_text or cfg.freeze_text
    if method.objective == "ce" or freeze_text:
        for name, p in clip.named_parameters():  # the image tower (and an ft head) only
            if not name.startswith("visual."):
                p.requires_grad_(False)
    if cfg.freeze_logit_scale or method.objective == "ce" or freeze_text:
        clip.logit_scale.requires_grad_(False)
    model = FineTuner(clip, head)

    eval_images = ([inputs.val] if inputs.val else []) + inputs.evals
    eval_sets = make_eval_sets(eval_images, preprocess, cfg.eval_batch_size, accelerator, cfg.num_workers)
    head_classes = inputs.train.classes if inputs.train else None

    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=resume)
        (run_dir / "checkpoints").mkdir(exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        _write_json(
            run_dir / "run.json",
            {
                "name": run_dir.name,
                "method": cfg.method,
                "config_hash": cfg.hash(),
                "bank": inputs.bank_info,
                "teacher_logit_scale": teacher_scale,
                "kl_scale": kl_scale,
                "num_processes": world,
                "mixed_precision": accelerator.mixed_precision,
                "versions": _versions(),
                **({"method_state": state["summary"]} if "summary" in state else {}),
            },
        )
    accelerator.wait_for_everyone()
    log = MetricsLog(run_dir / "metrics.jsonl", accelerator.is_main_process)

    if method.objective == "none":
        model = accelerator.prepare(model)
        results = evaluate_sets(accelerator.unwrap_model(model).clip, tokenizer, eval_sets, accelerator)
        final = {"method": cfg.method, "step": 0, "epoch": 0, "complete": True, "final": results}
        log.write({"kind": "eval", "step": 0, "epoch": 0, **_flat(results)})
        _finish(accelerator, run_dir, final, log)
        return run_dir

    # --- training setup ---
    dataset = ImageDataset(
        inputs.train, preprocess, cfg.caption, inputs.spurious, extras=state.get("sample_extras")
    )
    sampler = EpochSampler(len(dataset), cfg.seed)
    loader = DataLoader(
        dataset,
        batch_size=micro,
        sampler=sampler,
        drop_last=True,
        collate_fn=Collate(tokenizer),
        num_workers=cfg.num_workers,
    )
    steps_per_epoch = len(dataset) // micro // cfg.grad_accum
    if steps_per_epoch == 0:
        raise DataError(
            f"{cfg.data.train.path}: {len(dataset)} samples, fewer than one step of {cfg.batch_size}"
        )
    total = cfg.total_steps or cfg.epochs * steps_per_epoch
    epochs = math.ceil(total / steps_per_epoch)

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # open_clip's rule: no weight decay on gains, biases, embeddings' scalars and the logit scale
        (
            no_decay
            if p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
            else decay
        ).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    teacher = None
    if teacher_model is not None:
        teacher = TeacherFeatures(teacher_model.to(accelerator.device))  # frozen: no DDP, no optimizer
    unwrapped = accelerator.unwrap_model(model)

    step, best = 0, {"step": None, "val_top1": None}
    if resume_meta is not None:
        accelerator.load_state(str(run_dir / "state"))
        step, best = resume_meta["step"], resume_meta["best"]
        log.truncate_after(step)

    def evaluate() -> dict[str, dict[str, Any]]:
        return evaluate_sets(unwrapped.clip, tokenizer, eval_sets, accelerator, unwrapped.head, head_classes)

    stop_at = min(total, cfg.max_steps) if cfg.max_steps else total
    results: dict[str, Any] = {}
    progress = Progress(accelerator.is_main_process and cfg.progress)
    task = progress.add(f"{cfg.method} {run_dir.name}", total, step)
    model.train()
    t0, c0 = time.time(), time.process_time()
    while step < stop_at:
        epoch = step // steps_per_epoch
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        done_in_epoch = step - epoch * steps_per_epoch
        batches = (
            accelerator.skip_first_batches(loader, done_in_epoch * cfg.grad_accum)
            if done_in_epoch
            else loader
        )
        micro_i = 0
        for batch in batches:
            lam = lam_at(step, epoch, cfg, total, epochs)
            with accelerator.accumulate(model):
                terms = compute_losses(
                    model, batch, method, cfg, accelerator, teacher, kl_scale, lam, step, epoch, state
                )
                accelerator.backward(terms["loss"])
                if accelerator.sync_gradients and cfg.grad_clip:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                lr = lr_at(step, cfg, total)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            micro_i += 1
            if not accelerator.sync_gradients:
                continue
            clamp_logit_scale(unwrapped.clip)
            step += 1
            reduced = {k: accelerator.reduce(v.detach().float(), "mean").item() for k, v in terms.items()}
            row = {
                "kind": "step",
                "step": step,
                "epoch": epoch,
                "lr": lr,
                "lam": lam,
                **reduced,
                "logit_scale": float(unwrapped.clip.logit_scale.exp().item()),
            }
            if step % cfg.log_every == 0 or step == stop_at:
                log.write(row)
            progress.update(task, step, f"loss {reduced['loss']:.4f}")
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < stop_at:
                _save_state(accelerator, run_dir, {"step": step, "best": best, "config_hash": cfg.hash()})
            if step % steps_per_epoch == 0 or step >= stop_at:
                break
        epoch_done = step % steps_per_epoch == 0 or step == total
        if epoch_done and (((epoch + 1) % cfg.eval_every == 0) or step == total):
            results = evaluate()
            log.write({"kind": "epoch", "step": step, "epoch": epoch + 1, **_flat(results)})
            progress.note(f"epoch {epoch + 1} step {step}: {_summary(results)}")
            val_name = inputs.val.name if inputs.val else None
            if val_name is not None and (
                best["val_top1"] is None or results[val_name]["top1"] > best["val_top1"]
            ):
                best = {"step": step, "val_top1": results[val_name]["top1"]}
                if accelerator.is_main_process:
                    save_weights(unwrapped, run_dir / "checkpoints" / "best.safetensors")
        elif step >= stop_at:
            results = evaluate()  # an interrupted run still reports where it stands; `best` is untouched
    progress.close()
    if not results:  # resumed at its stop step: report the state it ends in
        results = evaluate()

    if accelerator.is_main_process:
        save_weights(unwrapped, run_dir / "checkpoints" / "last.safetensors")
    _save_state(accelerator, run_dir, {"step": step, "best": best, "config_hash": cfg.hash()})
    final = {
        "method": cfg.method,
        "step": step,
        "total_steps": total,
        "epoch": step / steps_per_epoch,
        "complete": step >= total,
        "best": best,
        "final": results,
        "seconds": round(time.time() - t0, 2),
        "cpu_seconds": round(time.process_time() - c0, 2),  # this process, all its threads
    }
    _finish(accelerator, run_dir, final, log)
    return run_dir


def _finish(accelerator, run_dir: Path, final: dict[str, Any], log: MetricsLog) -> None:
    if accelerator.is_main_process:
        _write_json(run_dir / "metrics.json", final)
        try:
            from trainer.plots import plot_run

            plot_run(run_dir)
        except (
            OSError,
            ValueError,
            RuntimeError,
            KeyError,
        ) as e:  # plots are a convenience: never fail a finished run over them
            print(f"warning: plots not written ({e.__class__.__name__}: {e})")
    accelerator.wait_for_everyone()
    accelerator.end_training()


def _flat(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for name, m in results.items():
        for k, v in m.items():
            if k != "per_group":
                out[f"{name}/{k}"] = v
    return out


def _summary(results: dict[str, dict[str, Any]]) -> str:
    parts = []
    for name, m in results.items():
        s = f"{name} {m['top1']:.1f}"
        if "worst_group" in m:
            s += f" (wg {m['worst_group']:.1f})"
        parts.append(s)
    return "  ".join(parts)


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step and per evaluation (main process only)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, row: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows logged after the saved state (they will be logged again)."""
        if not self.enabled or not self.path.exists():
            return
        rows = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
        keep = [ln for ln in rows if json.loads(ln).get("step", 0) <= step]
        self.path.write_text("".join(ln + "\n" for ln in keep))


class Progress:
    """A rich progress bar on the main process; silent elsewhere."""

    def __init__(self, enabled: bool):
        self.bar = None
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                transient=False,
            )
            self.bar.start()

    def add(self, description: str, total: int, completed: int) -> Any:
        return self.bar.add_task(description, total=total, completed=completed, info="") if self.bar else None

    def update(self, task: Any, completed: int, info: str) -> None:
        if self.bar:
            self.bar.update(task, completed=completed, info=info)

    def note(self, text: str) -> None:
        if self.bar:
            self.bar.console.print(text)

    def close(self) -> None:
        if self.bar:
            self.bar.stop()
