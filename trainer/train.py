"""The accelerate training loop: `train(cfg) -> run dir`, for every method.

    from trainer.config import load_config; from trainer.train import train; run = train(load_config("c.yaml"))

build (inputs checked -> Accelerator -> seed -> model, teacher, data, optimizer -> prepare) -> fit (optional
load_state + skip_first_batches -> accumulate / backward / non-finite check / step -> evaluate -> save_state)
-> finish (metrics.json, plots). What a step computes is trainer.step; what a method is, trainer.methods;
how a save survives a kill, trainer.checkpoints.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader

from trainer.checkpoints import (
    HEAD0,
    check_finite,
    clear_run_dir,
    find_state,
    load_method_state,
    open_run_dir,
    save_head,
    save_state,
    save_weights,
)
from trainer.config import TrainConfig
from trainer.data import Collate, EpochSampler, ImageDataset, TemplateCaptions, load_templates
from trainer.data.stream import ShardSet, StreamLoader, stream_loader
from trainer.errors import ConfigError, DataError, NonFiniteError, RunDirError, WriteError
from trainer.evaluate import EvalSet, evaluate_sets, make_eval_sets
from trainer.heads import initial_head
from trainer.inputs import Inputs, load_inputs
from trainer.model import FineTuner, build_clip, clamp_logit_scale, make_teacher, train_transform
from trainer.plots import plot_run
from trainer.runlog import (
    MetricsLog,
    Progress,
    describe_os_error,
    flat_metrics,
    summary_line,
    versions,
    write_json,
    write_text_atomic,
)
from trainer.schedules import lam_at, lr_at
from trainer.step import TeacherFeatures, backward_step
from trainer.tracking import StepTimer, TrackedLog, start_tracking


def new_accelerator(**kwargs: Any) -> Accelerator:
    """An Accelerator from a clean accelerate state.

    train() may run several times in one process (benchmarks, tests) with different precision or
    accumulation; accelerate keeps those in process-wide singletons, so each run starts from a clean one.
    The distributed PartialState (the process group) is kept.
    """
    AcceleratorState._reset_state()
    GradientState._reset_state()
    return Accelerator(**kwargs)


def resolve_mixed_precision(setting: str) -> str:
    """auto -> bf16 on a CUDA GPU that supports it, else no."""
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def set_threads(cfg: TrainConfig) -> None:
    torch.set_num_threads(cfg.threads or min(4, os.cpu_count() or 1))


# --- build ------------------------------------------------------------------------------------


@dataclass
class Run:
    """Everything `fit` needs, built and prepared."""

    cfg: TrainConfig
    inputs: Inputs
    run_dir: Path
    accelerator: Accelerator
    model: Any  # the prepared FineTuner (DDP-wrapped on several processes)
    tokenizer: Any
    eval_sets: list[EvalSet]
    state: dict[str, Any]  # what the method's setup returned
    teacher_scale: float
    kl_scale: float
    teacher: TeacherFeatures | None = None
    optimizer: Any = None
    loader: Any = None
    sampler: EpochSampler | None = None
    dataset: ImageDataset | None = None
    steps_per_epoch: int = 0
    total: int = 0
    epochs: int = 0

    @property
    def unwrapped(self) -> FineTuner:
        return self.accelerator.unwrap_model(self.model)

    def evaluate(self) -> dict[str, dict[str, Any]]:
        m, train = self.unwrapped, self.inputs.train
        classes = train.classes if train else None
        return evaluate_sets(m.clip, self.tokenizer, self.eval_sets, self.accelerator, m.head, classes)


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    try:
        return new_accelerator(
            mixed_precision=resolve_mixed_precision(cfg.mixed_precision),
            # No gradient_accumulation_steps: trainer.step.backward_step accumulates exactly, itself.
            # The loader yields the global micro-batch and each process takes its slice: the global batch,
            # and so the result, does not depend on the number of processes.
            dataloader_config=DataLoaderConfiguration(split_batches=True),
            step_scheduler_with_optimizer=False,
        )
    except ValueError as e:
        raise ConfigError(f"mixed_precision {cfg.mixed_precision}: {str(e).splitlines()[0]}") from None


def check_batch_sizes(cfg: TrainConfig, inputs: Inputs, world: int) -> int:
    """The micro-batch (global, per accumulation step); raises on sizes the processes cannot split."""
    micro = cfg.batch_size // cfg.grad_accum
    if micro % world:
        raise ConfigError(f"batch_size/grad_accum = {micro} is not divisible by {world} processes")
    if cfg.eval_batch_size % world:
        raise ConfigError(f"eval_batch_size {cfg.eval_batch_size} is not divisible by {world} processes")
    if inputs.train is not None and len(inputs.train) < micro:
        raise DataError(
            f"{cfg.data.train.path}: {len(inputs.train)} samples, fewer than one batch of {micro}"
        )
    return micro


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """open_clip's rule: no weight decay on gains, biases, norms and the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        flat = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if flat else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build(cfg: TrainConfig, inputs: Inputs, run_dir: Path) -> Run:
    """Accelerator, seeded model (+ frozen teacher, + ft head), evaluation sets and, to train, the data,
    the optimizer and the schedule's lengths; everything prepared by accelerate."""
    accelerator = make_accelerator(cfg)
    micro = check_batch_sizes(cfg, inputs, accelerator.num_processes)
    method = inputs.method

    set_seed(cfg.seed)  # the same seed before build_clip as `trainer wise` uses, so random inits agree
    clip, preprocess, tokenizer = build_clip(cfg.model, cfg.pretrained)
    # on the run's device before any method's setup: LP-FT's probe features and RaVL's region labels run
    # the model over the training set on batches that accelerate has already put on that device
    clip.to(accelerator.device)
    teacher_model = (method.make_teacher or make_teacher)(clip) if method.needs_teacher else None
    # before training, with the initial model (RaVL labels the regions of every training image here; LP-FT
    # trains its probe)
    state = {}
    if method.setup:
        state = method.setup(cfg, inputs.train, clip, preprocess, tokenizer, accelerator=accelerator,
                             run_dir=run_dir)  # fmt: skip
    if teacher_model is not None:
        state["teacher"] = teacher_model  # the frozen (or averaged: CaRot) model a method's terms may use
    teacher_scale = float(clip.logit_scale.exp().item())

    # ft, lipsum, carft, lpft: a classification head (trainer.heads) on the image tower
    head = initial_head(method, clip, tokenizer, inputs.train, state) if method.head else None
    freeze_text = method.freeze_text or cfg.freeze_text
    if head is not None or freeze_text:
        for name, p in clip.named_parameters():  # the image tower (and the head) only
            if not name.startswith("visual."):
                p.requires_grad_(False)
    if cfg.freeze_logit_scale or head is not None or freeze_text:
        clip.logit_scale.requires_grad_(False)
    model = FineTuner(clip, head)
    if cfg.grad_checkpointing:  # open_clip's: recompute each block's activations in the backward
        clip.set_grad_checkpointing(True)
    if cfg.compile:  # in place (nn.Module.compile): the module and its state dict keep their names
        clip.visual.compile()
        clip.transformer.compile()
    eval_sets = make_eval_sets(
        inputs.eval_sets, preprocess, cfg.eval_batch_size, accelerator, cfg.num_workers
    )
    run = Run(
        cfg, inputs, run_dir, accelerator, model, tokenizer, eval_sets, state,
        teacher_scale=teacher_scale, kl_scale=cfg.kl_scale or teacher_scale,
    )  # fmt: skip
    if method.objective == "none":
        run.model = accelerator.prepare(model)
        return run

    augment = cfg.train_transform == "train"
    caption = (
        TemplateCaptions(load_templates(cfg.caption_templates), cfg.seed)
        if cfg.caption_templates
        else cfg.caption
    )
    dataset = ImageDataset(
        inputs.train,
        train_transform(clip) if augment else preprocess,
        caption,
        inputs.spurious,
        extras=state.get("sample_extras"),
        augment_seed=cfg.seed if augment else None,
        source=cfg.data.train.path if inputs.train.layout == "csv" else None,  # read errors name its line
        on_bad_image=cfg.on_bad_image,
    )
    sampler = EpochSampler(len(dataset), cfg.seed)
    loader = DataLoader(
        dataset,
        batch_size=micro,
        sampler=sampler,
        drop_last=True,
        collate_fn=Collate(tokenizer),
        **cfg.loader_options(accelerator.device.type == "cuda"),
    )
    steps_per_epoch = len(dataset) // micro // cfg.grad_accum
    if steps_per_epoch == 0:
        raise DataError(
            f"{cfg.data.train.path}: {len(dataset)} samples, fewer than one step of {cfg.batch_size}"
        )
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    run.model, run.optimizer, run.loader = accelerator.prepare(model, optimizer, loader)
    if isinstance(inputs.train, ShardSet):  # streamed: each process reads its own shards (not prepared)
        run.loader = stream_loader(
            inputs.train, train_transform(clip) if augment else preprocess, caption, inputs.spurious,
            Collate(tokenizer), accelerator, micro, cfg.seed, cfg.num_workers, cfg.seed if augment else None,
        )  # fmt: skip
        steps_per_epoch = len(run.loader) // cfg.grad_accum
    if teacher_model is not None:  # frozen (or averaged by the method): no DDP, no optimizer
        # exact caches: each spurious caption's features once a run; each image's when it never changes;
        # none for a teacher that changes (CaRot)
        cache = cfg.teacher_cache and not method.teacher_changes
        table = len(dataset) if cache and not augment else None
        run.teacher = TeacherFeatures(
            teacher_model.to(accelerator.device), table, cache_text=cache, text_key=method.teacher_text
        )
    run.sampler, run.dataset, run.steps_per_epoch = sampler, dataset, steps_per_epoch
    run.total = cfg.total_steps or cfg.epochs * steps_per_epoch
    run.epochs = math.ceil(run.total / steps_per_epoch)
    return run


def write_run_files(run: Run, resume: bool) -> None:
    """config.yaml and run.json (bank provenance, scales, processes, precision, versions)."""
    cfg, acc, run_dir = run.cfg, run.accelerator, run.run_dir
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)  # open_run_dir refused an existing one; index/ made it
        (run_dir / "checkpoints").mkdir(exist_ok=True)
        if (
            run.unwrapped.head is not None
        ):  # the head the run starts from: `trainer wise` interpolates from it
            save_head(run.unwrapped.head, run_dir / "checkpoints" / HEAD0)
        write_text_atomic(run_dir / "config.yaml", cfg.to_yaml())
        summary = run.state.get("summary")
        write_json(
            run_dir / "run.json",
            {
                "name": run_dir.name,
                "method": cfg.method,
                "config_hash": cfg.hash(),
                "bank": run.inputs.bank_info,
                "teacher_logit_scale": run.teacher_scale,
                "kl_scale": run.kl_scale,
                "num_processes": acc.num_processes,
                "mixed_precision": acc.mixed_precision,
                "versions": versions(),
                **({"method_state": summary} if summary is not None else {}),
            },
        )
    acc.wait_for_everyone()


# --- fit --------------------------------------------------------------------------------------


def grad_norm(run: Run) -> torch.Tensor | None:
    """The total gradient norm, clipped to `grad_clip` when set (clip_grad_norm_ returns it at no cost).

    None under fp16 without clipping: its gradients are still scaled and the loss scaler itself skips
    the steps whose scaled gradients overflow."""
    cfg, acc, model = run.cfg, run.accelerator, run.model
    if cfg.grad_clip:
        return acc.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    if acc.scaler is not None:
        return None
    grads = [p.grad.detach() for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


def nonfinite_term(terms: dict[str, torch.Tensor], norm: torch.Tensor | None) -> str | None:
    """What is not finite in one step, as a user reads it: 'contrastive loss', 'reg loss', 'loss',
    'gradient norm' (the parts before the sum); None when everything is finite."""
    for name in [k for k in terms if k != "loss"] + ["loss"]:
        if name in terms and not bool(torch.isfinite(terms[name]).all()):
            return name.replace("_loss", " loss")
    if norm is not None and not bool(torch.isfinite(norm).all()):
        return "gradient norm"
    return None


def agree(acc: Accelerator, bad: str | None) -> str | None:
    """Every process takes the same decision on a step: non-finite anywhere is non-finite everywhere."""
    if acc.num_processes == 1:
        return bad
    flag = acc.reduce(torch.tensor([0.0 if bad is None else 1.0], device=acc.device), "sum")
    return bad or ("loss on another process" if float(flag.item()) > 0 else None)


def fit(run: Run, log: MetricsLog, resume_meta: dict[str, Any] | None) -> dict[str, Any]:
    """Train to the end of the schedule (or `max_steps`), evaluating each epoch; returns metrics.json.

    A non-finite loss or gradient norm stops the run (`nonfinite: stop`, the default) with what was last
    saved kept as it is; `nonfinite: skip` skips such steps (counted) and stops after `nonfinite_limit` in
    a row. A stopped run's metrics.json says `complete: false` and why (`stopped`), without `final`."""
    cfg, acc = run.cfg, run.accelerator
    step, best = 0, {"step": None, "val_top1": None}
    skips = {"skipped": 0, "in_a_row": 0, "bad_images": 0}  # counts a resume carries on
    if resume_meta is not None:
        acc.load_state(resume_meta["state_dir"])
        method = run.inputs.method
        tensors = load_method_state(resume_meta["state_dir"]) if method.load_tensors else None
        if tensors is not None:
            method.load_tensors(run.state, tensors)
        step, best = resume_meta["step"], resume_meta["best"]
        skips = {k: int(resume_meta.get(k, 0)) for k in skips}
        log.truncate_after(step)
    t0, c0 = time.time(), time.process_time()
    state = {"step": step, "best": best, "results": {}, **skips}
    progress = Progress(acc.is_main_process and cfg.progress)
    try:
        fit_loop(run, log, state, progress)
    except NonFiniteError as e:
        saved = find_state(run.run_dir)
        kept = f"the state saved at step {saved[1]['step']} is kept" if saved else "no state was saved yet"
        hint = "; nonfinite: skip would skip such steps" if cfg.nonfinite == "stop" else ""
        stopped = f"{run.run_dir}: {e}; stopped ({kept}, checkpoints unchanged{hint})"
        state.update(stopped=stopped, results=None)
    finally:
        progress.close()
    out = {
        "method": cfg.method,
        "step": state["step"],
        "total_steps": run.total,
        "epoch": state["step"] / run.steps_per_epoch,
        "complete": state["step"] >= run.total and "stopped" not in state,
        # `final`: the model at its last step; `best`: the checkpoint chosen on ID validation accuracy
        # (checkpoints/best.safetensors), with its results on every set: what the paper's tables report.
        "best": state["best"],
        **({"final": state["results"]} if "stopped" not in state else {"stopped": state["stopped"]}),
        **({"skipped_steps": state["skipped"]} if state["skipped"] else {}),
        **({"bad_images": state["bad_images"]} if state["bad_images"] else {}),  # on_bad_image: skip
        "seconds": round(time.time() - t0, 2),
        "cpu_seconds": round(time.process_time() - c0, 2),  # this process, all its threads
    }
    return out


def fit_loop(run: Run, log: MetricsLog, state: dict[str, Any], progress: Progress) -> None:
    """fit's steps, evaluations and saves; `state` (step, best, results, skip counts) is updated in place,
    so that a NonFiniteError leaves in it where the run stands."""
    cfg, acc, model, optimizer = run.cfg, run.accelerator, run.model, run.optimizer
    method, unwrapped, spe = run.inputs.method, run.unwrapped, run.steps_per_epoch
    step = state["step"]

    def checkpoint() -> None:
        check_finite(dict(unwrapped.named_parameters()), f"step {step}: the weights")
        meta = {"step": step, "best": state["best"], "config_hash": cfg.hash()}
        counts = {k: state[k] for k in ("skipped", "in_a_row", "bad_images")}
        extra = method.save_tensors(run.state) if method.save_tensors else None
        save_state(acc, run.run_dir, {**meta, **counts}, extra)

    stop_at = min(run.total, cfg.max_steps) if cfg.max_steps else run.total
    task = progress.add(f"{cfg.method} {run.run_dir.name}", run.total, step)
    model.train()
    timer = StepTimer(cfg.batch_size, step)
    while step < stop_at:
        epoch = step // spe
        done_in_epoch = step - epoch * spe
        run.loader.set_epoch(epoch)  # the sampler's epoch: accelerate's loader would otherwise reset it
        batches = run.loader
        if done_in_epoch and isinstance(run.loader, StreamLoader):  # resumes at a shard boundary
            batches = run.loader.resume(done_in_epoch * cfg.grad_accum)
        elif done_in_epoch:  # a resume inside an epoch: the same order, its first batches skipped
            batches = acc.skip_first_batches(run.loader, done_in_epoch * cfg.grad_accum)
            batches.set_epoch(epoch)
        micro: list[dict[str, torch.Tensor]] = []
        for batch in timer.wrap(batches):
            micro.append(batch)
            if len(micro) < cfg.grad_accum:
                continue
            lam = lam_at(step, epoch, cfg, run.total, run.epochs)
            terms = backward_step(
                model, micro, method, cfg, acc, run.teacher, run.kl_scale, lam, step, epoch, run.state
            )
            if "bad_image" in micro[0]:  # on_bad_image: skip; the dataset warned of each
                state["bad_images"] += int(acc.reduce(sum(b["bad_image"].sum() for b in micro), "sum"))
            micro = []
            bad = agree(acc, nonfinite_term(terms, grad_norm(run)))
            lr = lr_at(step, cfg, run.total)
            if bad is None:
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.step()
                if method.after_step:  # e.g. CaRot's teacher average, after the student's update
                    method.after_step(run.state, unwrapped.clip, step, run.total)
            optimizer.zero_grad(set_to_none=True)
            if bad is not None:
                what = f"step {step + 1}: the {bad} is not finite"
                if cfg.nonfinite == "stop":
                    raise NonFiniteError(what)
                state["skipped"] += 1
                state["in_a_row"] += 1
                if state["in_a_row"] >= cfg.nonfinite_limit:
                    raise NonFiniteError(f"{what} ({state['in_a_row']} steps in a row skipped)")
                step = state["step"] = step + 1
                log.write({"kind": "skip", "step": step, "epoch": epoch, "term": bad})
                progress.note(f"{what}: step skipped ({state['skipped']} so far)")
            else:
                state["in_a_row"] = 0
                clamp_logit_scale(unwrapped.clip)
                step = state["step"] = step + 1
                reduced = {k: acc.reduce(v.float(), "mean").item() for k, v in terms.items()}
                if step % cfg.log_every == 0 or step == stop_at:
                    scale = float(unwrapped.clip.logit_scale.exp().item())
                    row = {"kind": "step", "step": step, "epoch": epoch, "lr": lr, "lam": lam, **reduced}
                    row.update(timer.read(step))  # samples_per_s, data_wait (share of time waiting for data)
                    log.write({**row, "logit_scale": scale})
                progress.update(task, step, f"loss {reduced['loss']:.4f}")
            # inside an epoch; an epoch's end saves after its evaluation, below
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step % spe and step < stop_at:
                checkpoint()
            if step % spe == 0 or step >= stop_at:
                break
        epoch_done = step % spe == 0 or step == run.total
        if epoch_done and (((epoch + 1) % cfg.eval_every == 0) or step == run.total):
            results = state["results"] = run.evaluate()
            log.write({"kind": "epoch", "step": step, "epoch": epoch + 1, **flat_metrics(results)})
            progress.note(f"epoch {epoch + 1} step {step}: {summary_line(results)}")
            val = run.inputs.val.name if run.inputs.val else None
            best = state["best"]
            if val is not None and (best["val_top1"] is None or results[val]["top1"] > best["val_top1"]):
                if acc.is_main_process:  # written first: a non-finite model is refused, `best` untouched
                    save_weights(unwrapped, run.run_dir / "checkpoints" / "best.safetensors")
                state["best"] = {"step": step, "val_top1": results[val]["top1"], "results": results}
        elif step >= stop_at:
            # an interrupted run still reports where it stands; `best` is untouched
            state["results"] = run.evaluate()
        if epoch_done and step < stop_at:
            checkpoint()  # after the evaluation: a resume from here neither repeats nor loses it
    if not state["results"]:  # resumed at its stop step: report the state it ends in
        state["results"] = run.evaluate()
    if acc.is_main_process:
        save_weights(unwrapped, run.run_dir / "checkpoints" / "last.safetensors")
    checkpoint()


# --- finish -----------------------------------------------------------------------------------


def finish(run: Run, final: dict[str, Any]) -> None:
    """metrics.json and the plots (main process), then the trackers' end. The process group stays (a
    process may run train() again, as the benchmark and the tests do); `trainer run` ends it."""
    acc = run.accelerator
    if acc.is_main_process:
        write_json(run.run_dir / "metrics.json", final)
        try:
            plot_run(run.run_dir)
        except (OSError, ValueError, RuntimeError, KeyError) as e:  # a convenience: never fail a finished run
            print(f"warning: plots not written ({e.__class__.__name__}: {e})")
    acc.wait_for_everyone()
    for tracker in acc.trackers:
        tracker.finish()


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Fine-tune (or only evaluate, method zeroshot) as `cfg` says; returns the run directory."""
    set_threads(cfg)
    try:
        run_dir, resume_meta = open_run_dir(cfg, resume)
    except RunDirError:
        load_inputs(cfg)  # a bad input is reported before the run dir's state (and nothing is written)
        raise
    try:
        inputs = load_inputs(cfg, index_dir=run_dir / "index")  # each set listed once a run, reused on resume
        run = build(cfg, inputs, run_dir)
        if resume and resume_meta is None and run.accelerator.is_main_process:
            print(
                f"note: {run_dir}: no saved state to resume; starting the run from scratch", file=sys.stderr
            )
            clear_run_dir(run_dir)
        write_run_files(run, resume)
        tracking = start_tracking(run.accelerator, cfg, run_dir)  # log_with: none by default
        log = TrackedLog(run_dir / "metrics.jsonl", run.accelerator.is_main_process, tracking)
        if inputs.method.objective == "none":
            results = run.evaluate()
            log.write({"kind": "eval", "step": 0, "epoch": 0, **flat_metrics(results)})
            final = {"method": cfg.method, "step": 0, "epoch": 0, "complete": True, "final": results}
        else:
            final = fit(run, log, resume_meta)
        finish(run, final)
    except OSError as e:  # e.g. the runs dir unwritable; the helpers name the files they write themselves
        raise WriteError(f"{e.filename or run_dir}: {describe_os_error(e)}") from None
    if "stopped" in final:
        raise NonFiniteError(final["stopped"])
    return run_dir
