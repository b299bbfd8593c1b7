"""Run directories, resumable state and weights: what a run keeps on disk to be resumed or used.

    from trainer.checkpoints import open_run_dir; run_dir, resume_meta = open_run_dir(cfg, resume=False)

`state/` is accelerate's full training state plus meta.json (step, best, config hash). meta.json is written
last and removed first: a state folder is complete exactly when it has one. A save writes `state.tmp/`,
marks it complete, discards the older `state/` and renames the new one into place, so at every moment of a
save (and of a kill inside it) at least one complete state is on disk; a resume takes the newest complete
one of `state`, `state.tmp` and `state.old` (an older version's leftover). `checkpoints/{best,last}
.safetensors` are the open_clip state dicts (usable as `pretrained:`), an ft head beside them, each written
to a temporary file and renamed, and never written with a non-finite tensor.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from trainer.config import TrainConfig, load_config
from trainer.errors import NonFiniteError, RunDirError, WriteError
from trainer.inputs import default_run_name
from trainer.runlog import describe_os_error, fault_point, write_json, writing

STATE_DIRS = ("state", "state.tmp", "state.old")  # where a save leaves a state; the first is the settled one
MARKER = "meta.json"  # written last, removed first: the mark of a complete state
HEAD0 = "head0.safetensors"  # in checkpoints/: the classification head a run started from


def state_meta(folder: Path) -> dict[str, Any] | None:
    """The meta of a complete state folder, or None (absent, incomplete or unreadable)."""
    try:
        meta = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and isinstance(meta.get("step"), int) else None


def find_state(run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest complete state a run dir holds (settled, swapped-in or left over), with its meta."""
    found = None
    for name in STATE_DIRS:
        meta = state_meta(run_dir / name)
        if meta is not None and (found is None or meta["step"] > found[1]["step"]):
            found = (run_dir / name, meta)
    return found


def discard(folder: Path) -> None:
    """Delete a state folder, its completeness mark first: a kill mid-delete leaves an incomplete one."""
    if folder.exists():
        (folder / MARKER).unlink(missing_ok=True)
        fault_point("unmarked")
        shutil.rmtree(folder)


def settle(run_dir: Path) -> None:
    """Keep the newest complete state as `state/` and delete every other state folder (main process).

    Each move keeps the chosen state complete and leaves the others older or incomplete, so a kill at
    any point of it leaves a run dir from which the same state is chosen again."""
    found = find_state(run_dir)
    keep = found[0] if found else None
    for name in STATE_DIRS:
        if run_dir / name != keep:
            discard(run_dir / name)
    if keep is not None and keep.name != STATE_DIRS[0]:
        keep.rename(run_dir / STATE_DIRS[0])


def _complete_result(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "metrics.json").read_text()).get("complete") is True
    except (OSError, ValueError, AttributeError):
        return False


def open_run_dir(cfg: TrainConfig, resume: bool) -> tuple[Path, dict[str, Any] | None]:
    """The run's directory and, with `resume`, the newest saved state's meta (checked against the config),
    its folder under the key `state_dir`. None with `resume`: there is no state to resume, the run starts
    from scratch in its directory (see `clear_run_dir`)."""
    run_dir = Path(cfg.runs_dir) / (cfg.name or default_run_name(cfg))
    if not resume:
        if run_dir.exists():
            raise RunDirError(
                f"{run_dir}: run directory exists; pass --resume to continue it or choose another name"
            )
        return run_dir, None
    found = find_state(run_dir)
    if found is None:
        if not run_dir.is_dir():
            raise RunDirError(f"{run_dir}: nothing to resume (no such run directory)")
        if _complete_result(run_dir):
            raise RunDirError(f"{run_dir}: nothing to resume (the run is complete; no saved state)")
        return run_dir, None
    saved = load_config(run_dir / "config.yaml")
    mine, theirs = cfg.hparams(), saved.hparams()
    diff = [k for k in mine if mine[k] != theirs.get(k)]
    if diff:
        raise RunDirError(
            f"{run_dir}: --resume with a different config ({', '.join(diff)}); runtime keys only may change"
        )
    folder, meta = found
    return run_dir, {**meta, "state_dir": str(folder)}


def clear_run_dir(run_dir: Path) -> None:
    """Before a restart from scratch: drop what an attempt without a saved state left (main process)."""
    for name in ("metrics.jsonl", "metrics.json"):
        (run_dir / name).unlink(missing_ok=True)
    for path in sorted((run_dir / "checkpoints").glob("*.safetensors*")):  # with a torn .tmp
        path.unlink()
    for name in STATE_DIRS:
        discard(run_dir / name)


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Raise NonFiniteError naming the first tensor with a NaN or an infinity."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"{what}: tensor {name} is not finite")


def write_failure(folder: Path, e: Exception | None = None) -> str:
    """Why a write failed, in a few words: the OSError's, the I/O error safetensors names, or the free
    space left (torch.save reports a failed write as text only)."""
    if isinstance(e, OSError):
        return describe_os_error(e)
    if e is not None and "I/O error: " in str(
        e
    ):  # safetensors: '... I/O error: No space left ... (os error 28)'
        return str(e).split("I/O error: ")[-1].split(" (os error")[0].strip()
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "write failed"
    return f"write failed, {free / 2**20:.1f} MiB free on its disk"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    check_finite(tensors, f"{path}: not written")
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates its files 0600; like any other file here
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:  # a failed write: the old file stays
        tmp.unlink(missing_ok=True)
        why = write_failure(path.parent, e)
        raise WriteError(f"{path}: cannot write ({why}); the previous file is kept") from None


def save_head(head, path: Path) -> None:
    """A classification head's weights (weight, bias if any) as safetensors; non-finite ones refused."""
    _save_tensors({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}, path)


def save_weights(model, path: Path) -> None:
    """The open_clip state dict as safetensors (usable as `pretrained:`); a head goes beside it
    (<name>.head.safetensors). Refuses non-finite weights (NonFiniteError, before anything is written);
    each file is replaced whole or not at all."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.clip.state_dict().items()}
    if model.head is not None:
        check_finite(dict(model.head.state_dict()), f"{path.with_suffix('.head.safetensors')}: not written")
    _save_tensors(state, path)
    if model.head is not None:
        save_head(model.head, path.with_suffix(".head.safetensors"))


METHOD_STATE = "method.safetensors"  # a method's own tensors in a state folder (CaRot's averaged teacher)


def load_method_state(state_dir: str | Path) -> dict[str, torch.Tensor] | None:
    """The method's own tensors saved with a state (None when it saved none)."""
    path = Path(state_dir) / METHOD_STATE
    return load_file(str(path)) if path.is_file() else None


def save_state(
    accelerator, run_dir: Path, meta: dict[str, Any], method_tensors: dict[str, torch.Tensor] | None = None
) -> None:
    """accelerate save_state into state.tmp (+ the method's own tensors, as safetensors), marked complete,
    then swapped in for the older state."""
    tmp, final = run_dir / "state.tmp", run_dir / "state"
    if accelerator.is_main_process:
        with writing(run_dir):
            settle(run_dir)  # a leftover of an interrupted save: the newest complete state becomes `state`
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
    except (OSError, RuntimeError, SafetensorError) as e:  # how torch.save, safetensors report a failed write
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # incomplete (no meta.json): the saved state is kept
        why = write_failure(run_dir, e)
        raise WriteError(
            f"{tmp}: cannot save the training state ({why}); the previous state is kept"
        ) from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if method_tensors:
            _save_tensors(method_tensors, tmp / METHOD_STATE)
        fault_point("written")
        with writing(tmp):
            write_json(tmp / MARKER, meta)
            fault_point("marked")
            discard(final)
            fault_point("discarded")
            tmp.rename(final)
        fault_point("renamed")
    accelerator.wait_for_everyone()
