"""`trainer` CLI: a smoke run with --max-steps and --resume, and one-line errors for bad input.

.venv/bin/pytest tests/trainer/test_cli.py -q
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest
from ruamel.yaml import YAML
from typer.testing import CliRunner

from tests.conftest import make_bank
from trainer.cli import app

runner = CliRunner()


def write_config(path: Path, data: dict) -> Path:
    with path.open("w") as f:
        YAML(typ="safe", pure=True).dump(data, f)
    return path


def snapshot(d: Path) -> dict[str, str]:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


def test_run_max_steps_then_resume(tmp_path, tiny_config):
    cfg = write_config(tmp_path / "c.yaml", tiny_config)
    r = runner.invoke(app, ["run", "--config", str(cfg), "--max-steps", "2", "--method", "flyp"])
    assert r.exit_code == 0, r.output
    run = Path(r.stdout.strip().splitlines()[-1])
    assert json.loads((run / "metrics.json").read_text())["step"] == 2
    r = runner.invoke(app, ["run", "--config", str(cfg), "--method", "flyp", "--resume", "--threads", "1"])
    assert r.exit_code == 0, r.output
    m = json.loads((run / "metrics.json").read_text())
    assert m["complete"] and m["step"] == 8


def test_wise_command(tmp_path, tiny_config):
    cfg = write_config(tmp_path / "c.yaml", dict(tiny_config, method="flyp", epochs=1))
    r = runner.invoke(app, ["run", "-c", str(cfg)])
    assert r.exit_code == 0, r.output
    run = r.stdout.strip().splitlines()[-1]
    r = runner.invoke(app, ["wise", run, "--alpha", "0.5"])
    assert r.exit_code == 0, r.output
    assert (Path(r.stdout.strip()) / "metrics.json").is_file()


def _csv_with(tmp_path: Path, image_data: dict, edit: str) -> str:
    """A copy of the training CSV (absolute paths) with one bad row."""
    rows = list(csv.DictReader(image_data["train"].open()))
    for row in rows:
        row["path"] = str(image_data["root"] / row["path"])
    if edit == "missing":
        rows[3]["path"] = str(tmp_path / "nope.png")
    elif edit == "label":
        rows[5]["label"] = "7"
    out = tmp_path / f"bad-{edit}.csv"
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, ["path", "label", "group"])
        w.writeheader()
        w.writerows(rows)
    return str(out)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("no_approved", "no approved descriptor for concept(s) background"),
        ("missing_image", "missing image"),
        ("label_out_of_range", "label 7 out of range"),
        ("unknown_key", "unknown config key 'learning_rate'"),
        ("batch_zero", "batch_size: Input should be greater than 0"),
        ("batch_negative", "batch_size: Input should be greater than 0"),
        ("missing_config", "no such config file"),
        ("unknown_concept", "no concept 'texture'"),
        ("ravl_or_plugin_missing", None),
    ],
)
def test_bad_input_is_one_line_and_leaves_the_run_dir_alone(
    tmp_path, tiny_config, image_data, case, expected
):
    # An existing run directory of the same name, made by a finished (evaluation-only, fast) run.
    cfg_path = write_config(tmp_path / "c.yaml", dict(tiny_config, method="zeroshot"))
    r = runner.invoke(app, ["run", "-c", str(cfg_path)])
    assert r.exit_code == 0, r.output
    run = Path(r.stdout.strip().splitlines()[-1])
    before = snapshot(run)

    args = ["run", "-c", str(cfg_path)]
    if case == "no_approved":
        args += ["--method", "starft", "--bank", str(make_bank(tmp_path / "b2", approved=False))]
    elif case == "unknown_concept":
        args += ["--method", "starft", "--set", "concepts=[texture]"]
    elif case == "missing_image":
        args += ["--set", f"data.train.path={_csv_with(tmp_path, image_data, 'missing')}"]
    elif case == "label_out_of_range":
        args += ["--set", f"data.train.path={_csv_with(tmp_path, image_data, 'label')}"]
    elif case == "unknown_key":
        args += ["--set", "learning_rate=0.1"]
    elif case == "batch_zero":
        args += ["--set", "batch_size=0"]
    elif case == "batch_negative":
        args += ["--set", "batch_size=-8"]
    elif case == "missing_config":
        args = ["run", "-c", str(tmp_path / "nope.yaml")]
    elif case == "ravl_or_plugin_missing":
        args += ["--method", "nosuch"]
    for extra in ([], ["--resume"]):
        r = runner.invoke(app, args + extra)
        assert r.exit_code != 0
        assert "Traceback" not in r.output
        if case == "ravl_or_plugin_missing":  # typer rejects nothing here: config validation does
            assert "method" in r.stderr
            continue
        assert r.exit_code == 1
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
        assert expected in lines[0]
    assert snapshot(run) == before


def test_existing_run_dir_without_resume(tmp_path, tiny_config):
    cfg = write_config(tmp_path / "c.yaml", dict(tiny_config, method="zeroshot"))
    assert runner.invoke(app, ["run", "-c", str(cfg)]).exit_code == 0
    r = runner.invoke(app, ["run", "-c", str(cfg)])
    assert r.exit_code == 1 and "run directory exists" in r.stderr and "--resume" in r.stderr
