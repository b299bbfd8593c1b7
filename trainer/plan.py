"""`trainer run --dry-run`: everything a run checks, and what it would do, without writing anything.

    from trainer.plan import make_plan, render_plan; print(render_plan(make_plan(load_config("c.yaml"))))

The plan checks the config, the model name and pretrained weights, the bank (first: a bad bank fails in
seconds, before a long scan), the discovery report of method ravl, and every dataset, then gives the
schedule (micro-batch, steps per epoch, total steps, epochs) and per set its name, role, layout, image
and class counts, groups and a few (path, class) pairs.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from trainer.config import TrainConfig
from trainer.data.sets import describe
from trainer.data.stream import ShardSet, peek_samples
from trainer.errors import ConfigError, DataError
from trainer.inputs import default_run_name, load_inputs


def check_model(cfg: TrainConfig) -> dict[str, Any]:
    """The architecture exists in open_clip (or its config JSON does) and the pretrained tag or file too."""
    import open_clip  # heavy (torch): only the commands that need it import it

    from trainer.model import WEIGHT_SUFFIXES, resolve_model_name

    name = resolve_model_name(cfg.model)
    pre = cfg.pretrained
    kind = "random init"
    if pre is not None:
        if Path(pre).suffix in WEIGHT_SUFFIXES or Path(pre).exists():
            if not Path(pre).is_file():
                raise ConfigError(f"pretrained: no such weights file {pre}")
            kind = "weights file"
        else:
            tags = open_clip.list_pretrained_tags_by_model(name)
            if pre not in tags:
                raise ConfigError(
                    f"pretrained: {pre!r} is not an open_clip tag of {name} (known: {', '.join(tags) or 'none'})"
                )
            kind = "open_clip tag (downloaded once)"
    return {"model": name, "pretrained": pre, "pretrained_kind": kind}


def schedule(cfg: TrainConfig, n_train: int) -> dict[str, Any]:
    """Micro-batch, steps per epoch, total steps and epochs for a training set of `n_train` samples."""
    micro = cfg.batch_size // cfg.grad_accum
    spe = n_train // micro // cfg.grad_accum
    if spe == 0:
        raise DataError(
            f"{cfg.data.train.path}: {n_train} samples, fewer than one step of {cfg.batch_size}"  # type: ignore[union-attr]
        )
    total = cfg.total_steps or cfg.epochs * spe
    return {
        "train_samples": n_train,
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "micro_batch": micro,
        "steps_per_epoch": spe,
        "total_steps": total,
        "epochs": math.ceil(total / spe),
        "max_steps": cfg.max_steps,
    }


def make_plan(cfg: TrainConfig) -> dict[str, Any]:
    """Check everything a run would check and describe the run; writes nothing."""
    t0 = time.perf_counter()
    model = check_model(cfg)
    if cfg.method == "ravl" and cfg.discovered and not Path(cfg.discovered).is_file():
        raise ConfigError(f"discovered: no such report {cfg.discovered}")
    inputs = load_inputs(cfg)
    sets = []
    for role, s in [("train", inputs.train), ("val", inputs.val)] + [("eval", e) for e in inputs.evals]:
        if s is not None:
            d = {"role": role, **describe(s)}
            if isinstance(s, ShardSet):
                d.update(shards=len(s.shards), samples=peek_samples(s))
            sets.append(d)
    bank = inputs.bank_info
    return {
        "run_dir": str(Path(cfg.runs_dir) / (cfg.name or default_run_name(cfg))),
        "method": cfg.method,
        **model,
        "bank": None
        if bank is None
        else {k: bank[k] for k in ("path", "version", "concepts")}
        | {"descriptors": len(bank["descriptors"])},
        "schedule": schedule(cfg, len(inputs.train)) if inputs.train is not None else None,
        "sets": sets,
        "log_with": cfg.log_with,
        "check_seconds": round(time.perf_counter() - t0, 2),
    }


def render_plan(plan: dict[str, Any]) -> str:
    """The plan as plain text, one fact a line."""
    lines = [
        f"run dir   {plan['run_dir']} (not created: dry run)",
        f"method    {plan['method']}",
        f"model     {plan['model']}, pretrained {plan['pretrained']} ({plan['pretrained_kind']})",
    ]
    if plan["bank"] is not None:
        b = plan["bank"]
        lines.append(
            f"bank      {b['path']} v{b['version']}: {b['descriptors']} approved descriptors of {', '.join(b['concepts'])}"
        )
    s = plan["schedule"]
    if s is not None:
        lines.append(
            f"schedule  {s['train_samples']} samples, batch {s['batch_size']} = {s['grad_accum']} x "
            f"{s['micro_batch']}: {s['steps_per_epoch']} steps/epoch, {s['total_steps']} steps, "
            f"{s['epochs']} epochs" + (f" (stops at step {s['max_steps']})" if s["max_steps"] else "")
        )
    for d in plan["sets"]:
        groups = f", {len(d['groups'])} groups ({', '.join(d['groups'][:6])}), {d['group_keys']} group keys"
        scored = f", scored on {d['scored_on']} training classes" if d["scored_on"] else ""
        lines.append(
            f"{d['role']:<9} {d['name']}: layout {d['layout']}, {d['images']} images, {d['classes']} classes"
            + (groups if d["groups"] else "")
            + scored
        )
        for path, label in d["samples"]:
            lines.append(f"            {path} -> {label}")
    lines.append(f"checked in {plan['check_seconds']} s; nothing written")
    return "\n".join(lines)
