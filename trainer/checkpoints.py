"""Run directories, resumable state and weights: what a run keeps on disk to be resumed or used.

    from trainer.checkpoints import open_run_dir; run_dir, resume_meta = open_run_dir(cfg, resume=False)

`state/` is accelerate's full training state plus meta.json (step, best, config hash); it is written into
`state.tmp/` and swapped in, so a crash never leaves half a state. `checkpoints/{best,last}.safetensors`
are the open_clip state dicts (usable as `pretrained:`), an ft head beside them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from trainer.config import TrainConfig, load_config
from trainer.errors import RunDirError
from trainer.inputs import default_run_name
from trainer.runlog import write_json


def open_run_dir(cfg: TrainConfig, resume: bool) -> tuple[Path, dict[str, Any] | None]:
    """The run's directory and, with `resume`, the saved state's meta (checked against the config)."""
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


def save_weights(model, path: Path) -> None:
    """The open_clip state dict as safetensors (usable as `pretrained:`); an ft head goes beside it."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.clip.state_dict().items()}
    save_file(state, str(path))
    if model.head is not None:
        head = {k: v.detach().contiguous().cpu() for k, v in model.head.state_dict().items()}
        save_file(head, str(path.with_suffix(".head.safetensors")))


def save_state(accelerator, run_dir: Path, meta: dict[str, Any]) -> None:
    """accelerate save_state into state.tmp, then swap it in, so a crash never leaves a half state."""
    tmp, final, old = run_dir / "state.tmp", run_dir / "state", run_dir / "state.old"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / "meta.json", meta)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        if old.exists():
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
