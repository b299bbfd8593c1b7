"""Faults lose nothing (issue 19, trainer): non-finite losses, leftovers of an interrupted save, stuck run
dirs, unreadable images, failed writes. Kills themselves: tests/trainer/test_kill.py.

.venv/bin/pytest tests/trainer/test_faults.py -q
"""

from __future__ import annotations

import csv
import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import trainer.train as train_mod
from trainer import checkpoints
from trainer.checkpoints import find_state, settle
from trainer.cli import app
from trainer.config import build_config
from trainer.errors import NonFiniteError, RunDirError, WriteError
from trainer.train import train


def _rows(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def _all_finite(run: Path) -> list[str]:
    """Every safetensors file under a run dir, each checked to hold finite tensors only."""
    files = sorted(run.rglob("*.safetensors"))
    for f in files:
        for name, t in load_file(str(f)).items():
            assert not t.is_floating_point() or bool(torch.isfinite(t).all()), (f, name)
    return [str(f.relative_to(run)) for f in files]


def _cli(tmp_path: Path, cfg: dict, *args: str):
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(cfg))  # JSON is YAML
    return CliRunner().invoke(app, ["run", "--config", str(config), *args])


# --- leftovers of a save ------------------------------------------------------------------------


def _state(folder: Path, step: int | None, files: int = 2) -> None:
    """A fake state folder: some files and, when `step` is given, its completeness mark."""
    folder.mkdir()
    for i in range(files):
        (folder / f"part{i}.bin").write_bytes(b"x" * 10)
    if step is not None:
        (folder / "meta.json").write_text(json.dumps({"step": step, "best": {}}))


@pytest.mark.parametrize(
    "leftover, expected",
    [
        ({"state": 4}, 4),
        ({"state": 4, "state.tmp": None}, 4),  # killed while writing the new state
        ({"state": 4, "state.tmp": 6}, 6),  # killed after marking the new one complete
        ({"state.tmp": 6}, 6),  # killed after discarding the old one
        ({"state": None, "state.tmp": 6}, 6),  # killed while discarding the old one (mark gone first)
        ({"state.old": 4, "state.tmp": 6}, 6),  # an older trainer's swap, killed between its renames
        ({"state": 6, "state.old": None}, 6),  # an older trainer's swap, killed while deleting state.old
        ({"state.tmp": None}, None),  # killed inside the first save: nothing to resume
    ],
)
def test_every_leftover_of_a_save_resolves_to_its_newest_complete_state(tmp_path, leftover, expected):
    for name, step in leftover.items():
        _state(tmp_path / name, step)
    found = find_state(tmp_path)
    assert (found[1]["step"] if found else None) == expected
    settle(tmp_path)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ([] if expected is None else ["state"])
    if expected is not None:
        assert find_state(tmp_path)[1]["step"] == expected


def test_an_epoch_end_saves_after_its_evaluation_and_a_torn_metrics_line_is_dropped(tiny_config):
    base = ["method=flyp", "epochs=2", "train_transform=eval"]
    part = train(build_config(tiny_config, base + ["name=part", "max_steps=4"]))
    meta = json.loads((part / "state" / "meta.json").read_text())
    # the state of the epoch's end holds its evaluation: best chosen there, its metrics row kept
    assert meta["step"] == 4 and meta["best"]["step"] == 4 and "results" in meta["best"]
    assert [r["step"] for r in _rows(part) if r["kind"] == "epoch"] == [4]
    with (part / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "step", "step": 5, "lo')  # a kill while a row was written
    resumed = train(build_config(tiny_config, base + ["name=part"]), resume=True)
    rows = _rows(resumed)
    assert [r["step"] for r in rows if r["kind"] == "step"] == list(range(1, 9))
    assert [r["step"] for r in rows if r["kind"] == "epoch"] == [4, 8]
    assert json.loads((resumed / "metrics.json").read_text())["complete"] is True
    assert sorted(p.name for p in resumed.iterdir() if p.name.startswith("state")) == ["state"]


# --- non-finite ---------------------------------------------------------------------------------


def test_a_nonfinite_loss_stops_with_one_line_and_nothing_nonfinite_is_saved(tmp_path, tiny_config):
    cfg = {**tiny_config, "checkpoint_every": 1, "method": "flyp", "name": "nan"}
    res = _cli(tmp_path, cfg, "--set", "lr=1e6")
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    assert "is not finite" in lines[0] and "step " in lines[0] and "loss" in lines[0]
    run = Path(cfg["runs_dir"]) / "nan"
    m = json.loads((run / "metrics.json").read_text())
    assert m["complete"] is False and "final" not in m and "is not finite" in m["stopped"]
    assert "state/model.safetensors" in _all_finite(run)  # the last good state is kept
    assert json.loads((run / "state" / "meta.json").read_text())["step"] == m["step"]


def _nan_at(monkeypatch, bad_steps: set[int] | None) -> None:
    """backward_step reports a NaN contrastive loss at the given steps (all when None)."""
    real = train_mod.backward_step

    def fake(model, micro, method, cfg, acc, teacher, kl_scale, lam, step, *rest):
        terms = real(model, micro, method, cfg, acc, teacher, kl_scale, lam, step, *rest)
        if bad_steps is None or step in bad_steps:
            terms = {**terms, "contrastive_loss": torch.tensor(float("nan"))}
        return terms

    monkeypatch.setattr(train_mod, "backward_step", fake)


def test_nonfinite_skip_skips_and_counts_the_step(tiny_config, monkeypatch):
    _nan_at(monkeypatch, {2})
    run = train(build_config(tiny_config, ["method=flyp", "nonfinite=skip", "name=skip"]))
    m = json.loads((run / "metrics.json").read_text())
    assert m["complete"] is True and m["skipped_steps"] == 1
    rows = _rows(run)
    assert [r["step"] for r in rows if r["kind"] == "skip"] == [3]
    assert [r["step"] for r in rows if r["kind"] == "step"] == [1, 2, 4, 5, 6, 7, 8]
    _all_finite(run)


def test_nonfinite_skip_stops_after_the_limit_in_a_row(tiny_config, monkeypatch):
    _nan_at(monkeypatch, None)
    cfg = build_config(tiny_config, ["method=flyp", "nonfinite=skip", "nonfinite_limit=3", "name=limit"])
    with pytest.raises(
        NonFiniteError, match=r"step 3: the contrastive loss is not finite \(3 steps in a row"
    ):
        train(cfg)
    run = Path(cfg.runs_dir) / "limit"
    assert json.loads((run / "metrics.json").read_text())["complete"] is False
    assert not (run / "checkpoints" / "last.safetensors").exists()


def test_wise_refuses_nonfinite_weights(tiny_config):
    from trainer.wise import wise

    run = train(build_config(tiny_config, ["method=flyp", "total_steps=1", "name=w"]))
    path = run / "checkpoints" / "last.safetensors"
    tensors = load_file(str(path))
    tensors["logit_scale"] = torch.full_like(tensors["logit_scale"], float("nan"))
    save_file(tensors, str(path))
    with pytest.raises(NonFiniteError, match="last.safetensors: refused: tensor logit_scale is not finite"):
        wise(run, 0.5)
    assert not (run / "wise").exists()


# --- stuck run dirs -------------------------------------------------------------------------------


def test_a_run_dir_without_saved_state_restarts_from_scratch_on_resume(tiny_config, capsys):
    cfg = build_config(tiny_config, ["method=flyp", "total_steps=2", "name=stuck"])
    run = Path(cfg.runs_dir) / "stuck"
    (run / "checkpoints").mkdir(parents=True)  # what a kill before the first save leaves
    (run / "metrics.jsonl").write_text('{"kind": "step", "step": 1, "loss": 9.0}\n{"kind": "st')
    (run / "checkpoints" / "best.safetensors").write_bytes(b"half a file")
    (run / "state.tmp").mkdir()
    train(cfg, resume=True)
    assert "starting the run from scratch" in capsys.readouterr().err
    assert [r["step"] for r in _rows(run) if r["kind"] == "step"] == [1, 2]
    assert all(r.get("loss") != 9.0 for r in _rows(run))
    assert json.loads((run / "metrics.json").read_text())["complete"] is True
    _all_finite(run)
    shutil.rmtree(run / "state")  # a complete result without a state: nothing to resume, said so
    with pytest.raises(RunDirError, match="nothing to resume .the run is complete"):
        train(cfg, resume=True)


# --- unreadable images ----------------------------------------------------------------------------


@pytest.fixture
def broken_set(tmp_path, image_data) -> tuple[Path, int, str]:
    """A copy of the training set with one image replaced by garbage: (csv, its CSV line, its path)."""
    root = tmp_path / "broken"
    shutil.copytree(image_data["root"] / "train", root / "train")
    shutil.copy(image_data["train"], root / "train.csv")
    with (root / "train.csv").open() as f:
        rows = list(csv.DictReader(f))
    i = 5
    (root / rows[i]["path"]).write_bytes(b"not an image at all")
    return root / "train.csv", i + 2, rows[i]["path"]


@pytest.mark.parametrize("workers", [0, 2])
def test_an_unreadable_image_is_one_line_naming_its_csv_line(tmp_path, tiny_config, broken_set, workers):
    path, line, name = broken_set
    cfg = {**tiny_config, "method": "flyp", "num_workers": workers}
    cfg["data"] = {**cfg["data"], "train": {**cfg["data"]["train"], "path": str(path)}}
    res = _cli(tmp_path, cfg)
    assert res.exit_code == 1
    out = res.output.strip()
    assert len(out.splitlines()) == 1 and "Traceback" not in out and "worker" not in out, out
    assert f"{path}:{line}:" in " ".join(out.split()) and name in out and "cannot read image" in out


def test_on_bad_image_skip_counts_and_logs_them(tiny_config, broken_set, capsys):
    path, line, _ = broken_set
    cfg = {**tiny_config, "method": "flyp", "on_bad_image": "skip", "name": "skipimg"}
    cfg["data"] = {**cfg["data"], "train": {**cfg["data"]["train"], "path": str(path)}}
    run = train(build_config(cfg))
    m = json.loads((run / "metrics.json").read_text())
    assert m["complete"] is True and m["bad_images"] == 2  # once an epoch
    assert capsys.readouterr().err.count(f"{path}:{line}:") == 2


# --- failed writes --------------------------------------------------------------------------------


def test_an_unwritable_runs_dir_is_one_line_naming_it(tmp_path, tiny_config, monkeypatch):
    runs = Path(tiny_config["runs_dir"])
    real = Path.mkdir

    def refuse(self, *args, **kwargs):
        if str(self).startswith(str(runs)):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    res = _cli(tmp_path, {**tiny_config, "method": "flyp", "total_steps": 1})
    assert res.exit_code == 1
    out = " ".join(res.output.split())
    assert len(res.output.strip().splitlines()) == 1 and str(runs) in out and "Permission denied" in out, out
    assert not runs.exists()


def test_a_full_disk_is_one_line_and_earlier_saves_stay_intact(tmp_path, tiny_config, monkeypatch):
    real = checkpoints.save_file

    def full(tensors, path):
        if Path(path).name.startswith("last."):
            Path(path).write_bytes(b"partial")  # what a full disk leaves of the temporary file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path)

    monkeypatch.setattr(checkpoints, "save_file", full)
    cfg = {**tiny_config, "method": "flyp", "epochs": 2, "name": "full"}
    res = _cli(tmp_path, cfg)
    assert res.exit_code == 1
    out = " ".join(res.output.split())
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output, res.output
    assert "last.safetensors: cannot write (No space left on device)" in out
    run = Path(cfg["runs_dir"]) / "full"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.safetensors"]
    assert json.loads((run / "state" / "meta.json").read_text())["step"] == 4  # the epoch-end save
    _all_finite(run)
    monkeypatch.setattr(checkpoints, "save_file", real)  # space freed: the run resumes and finishes
    assert train(build_config(cfg), resume=True) == run
    assert json.loads((run / "metrics.json").read_text())["complete"] is True


def test_a_failed_state_save_keeps_the_previous_state(tiny_config, monkeypatch):
    from accelerate import Accelerator

    real, calls = Accelerator.save_state, []

    def failing(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:
            (Path(output_dir)).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "model.safetensors").write_bytes(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 128 vs 64")
        return real(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", failing)
    cfg = build_config(tiny_config, ["method=flyp", "checkpoint_every=1", "name=statefail"])
    with pytest.raises(
        WriteError, match=r"state.tmp: cannot save the training state .*previous state is kept"
    ):
        train(cfg)
    run = Path(cfg.runs_dir) / "statefail"
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("state")) == ["state"]
    assert json.loads((run / "state" / "meta.json").read_text())["step"] == 1
