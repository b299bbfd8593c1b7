"""WiSE-FT: interpolate a fine-tuned run with its zero-shot model and evaluate the result.

    from trainer.wise import wise; out = wise("runs/v2-starft-...", alpha=0.5)

theta = (1 - alpha) * theta_zeroshot + alpha * theta_finetuned, every floating-point tensor (the logit
scale and, for a method with a classification head, the head, from the head the run started from:
checkpoints/head0.safetensors, the zero-shot text classifier or LP-FT's probe).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Literal

import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file

from trainer.checkpoints import HEAD0, check_finite
from trainer.config import load_config
from trainer.errors import RunDirError, TrainerError
from trainer.evaluate import evaluate_sets, make_eval_sets, zero_shot_head
from trainer.heads import head_scale
from trainer.inputs import load_inputs
from trainer.model import FineTuner, build_clip, linear_head
from trainer.runlog import write_json
from trainer.train import new_accelerator


def interpolate(
    zero: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """(1 - alpha) * zero + alpha * tuned for float tensors; others (integer buffers) from `tuned`."""
    if zero.keys() != tuned.keys():
        raise TrainerError(f"checkpoint keys differ from the zero-shot model's ({len(zero)} vs {len(tuned)})")
    return {
        k: torch.lerp(zero[k].float(), tuned[k].float(), alpha).to(tuned[k].dtype)
        if tuned[k].is_floating_point()
        else tuned[k]
        for k in tuned
    }


def wise(run_dir: str | Path, alpha: float = 0.5, checkpoint: Literal["last", "best"] = "last") -> Path:
    """Write <run>/wise/alpha-<a>/{model.safetensors, metrics.json}; returns that directory."""
    t0, c0 = time.time(), time.process_time()
    if not 0.0 <= alpha <= 1.0:
        raise TrainerError(f"alpha must be in [0, 1], got {alpha}")
    run_dir = Path(run_dir)
    ckpt = run_dir / "checkpoints" / f"{checkpoint}.safetensors"
    if not (run_dir / "config.yaml").is_file():
        raise RunDirError(f"{run_dir}: not a run directory (no config.yaml)")
    if not ckpt.is_file():
        raise RunDirError(f"{run_dir}: no {checkpoint} checkpoint ({ckpt.name})")
    cfg = load_config(run_dir / "config.yaml")
    torch.set_num_threads(cfg.threads or min(4, os.cpu_count() or 1))
    inputs = load_inputs(cfg)
    accelerator = new_accelerator()
    set_seed(cfg.seed)  # as in train(): a random-init zero-shot model is rebuilt identically
    clip, preprocess, tokenizer = build_clip(cfg.model, cfg.pretrained)
    head = None
    head_path = ckpt.with_suffix(".head.safetensors")
    if head_path.is_file() and inputs.train is not None:
        s0 = clip.logit_scale.exp().item()
        start = run_dir / "checkpoints" / HEAD0
        if start.is_file():  # the head train() started from (zero-shot, or LP-FT's probe)
            zero_head = load_file(str(start))
        else:  # a run written before head0 existed (method ft): zero-shot embeddings times s0, zero bias
            w0 = s0 * zero_shot_head(clip, tokenizer, inputs.train.classes, inputs.train.templates)
            zero_head = {"weight": w0, "bias": torch.zeros(w0.shape[0])}
        tuned_head = load_file(str(head_path))
        check_finite(tuned_head, f"{head_path}: refused")
        merged_head = interpolate(zero_head, tuned_head, alpha)
        head = linear_head(
            merged_head["weight"], merged_head.get("bias"), scale=head_scale(inputs.method, s0)
        )
    tuned = load_file(str(ckpt))
    check_finite(tuned, f"{ckpt}: refused")  # a NaN run (an older trainer saved them) interpolates to NaN
    merged = interpolate({k: v.detach() for k, v in clip.state_dict().items()}, tuned, alpha)
    clip.load_state_dict(merged)
    model = FineTuner(clip, head)
    model = accelerator.prepare(model)
    sets = make_eval_sets(
        ([inputs.val] if inputs.val else []) + inputs.evals, preprocess, cfg.eval_batch_size, accelerator
    )
    unwrapped = accelerator.unwrap_model(model)
    results = evaluate_sets(
        unwrapped.clip,
        tokenizer,
        sets,
        accelerator,
        unwrapped.head,
        inputs.train.classes if inputs.train else None,
    )
    out = run_dir / "wise" / f"alpha-{alpha:g}"
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous().cpu() for k, v in merged.items()}, str(out / "model.safetensors"))
        write_json(
            out / "metrics.json",
            {
                "alpha": alpha,
                "checkpoint": checkpoint,
                "final": results,
                "seconds": round(time.time() - t0, 2),
                "cpu_seconds": round(time.process_time() - c0, 2),
            },
        )
    return out


def load_metrics(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())
