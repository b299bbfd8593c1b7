"""RaVL in the trainer: `trainer discover RUN` and `trainer run --method ravl` on a tiny model and a tiny
quadrant-digit set.

    .venv/bin/pytest -q tests/trainer/test_ravl_method.py
"""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from bench.ravl_data import write_quadrant_split
from tests.conftest import TINY_CLIP
from trainer.cli import app
from trainer.ravl.discover import Feature, load_report, save_report

runner = CliRunner()


@pytest.fixture(scope="module")
def quad(tmp_path_factory):
    """Tiny biased train set (rectangle with 'zero'), unbiased eval set, tiny model + init weights."""
    d = tmp_path_factory.mktemp("ravl")
    train = write_quadrant_split(d, "train", 40, spurious_class=0, strength=1.0, seed=0, pool="train")
    ev = write_quadrant_split(d, "eval", 30, seed=1, pool="eval")
    model = d / "tiny-clip.json"
    model.write_text(json.dumps(TINY_CLIP))
    torch.manual_seed(0)
    init = d / "init.safetensors"
    save_file({k: v.contiguous() for k, v in open_clip.CLIP(**TINY_CLIP).state_dict().items()}, str(init))
    cfg = {
        "model": str(model),
        "pretrained": str(init),
        "runs_dir": str(d / "runs"),
        "data": {
            "train": {"path": str(train), "classes": str(d / "classes.txt")},
            "eval": [{"path": str(ev), "classes": str(d / "classes.txt"), "name": "eval"}],
        },
        "templates": "simple",
        "batch_size": 8,
        "total_steps": 2,
        "lr": 1e-3,
        "warmup_steps": 1,
        "eval_batch_size": 16,
        "log_every": 1,
        "threads": 1,
        "progress": False,
    }
    path = d / "c.yaml"
    path.write_text(json.dumps(cfg))
    res = runner.invoke(app, ["run", "-c", str(path), "--method", "flyp", "--name", "flyp"])
    assert res.exit_code == 0, res.output
    return {"dir": d, "config": path, "eval": ev, "init": init, "flyp": d / "runs" / "flyp"}


def test_discover_cli_writes_report_sheet_and_bank(quad, tmp_path):
    from tests.conftest import make_bank

    bank = make_bank(tmp_path / "banks")
    cands = tmp_path / "cands.txt"
    cands.write_text("red rectangle\nblack background\n")
    res = runner.invoke(
        app,
        [
            "discover",
            str(quad["flyp"]),
            "--data",
            str(quad["eval"]),
            "--out",
            str(tmp_path / "d"),
            "--to-bank",
            str(bank),
            "--candidates",
            str(cands),
            "--threads",
            "1",
        ],
    )
    assert res.exit_code == 0, res.output
    report = load_report(tmp_path / "d" / "report.json")
    assert len(report.images) == 30 and len(report.regions) == 120
    assert (tmp_path / "d" / "features.png").stat().st_size > 0
    side = json.loads((tmp_path / "d" / "report.model.json").read_text())
    assert side["weights"].endswith("best.safetensors") or side["weights"].endswith("last.safetensors")
    assert (bank.parent / "v2.yaml").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["discover", "/no/such/run", "--data", "x.csv"], "not a run directory"),
        (["discover", "{flyp}", "--data", "/no/such.csv"], "no such CSV"),
        (["discover", "{flyp}", "--data", "{bad}"], "header must have columns"),
        (["discover", "{flyp}", "--data", "{eval}", "--grid", "2by2"], "expected ROWSxCOLS"),
    ],
)
def test_discover_cli_one_line_errors(quad, tmp_path, args, message):
    bad = tmp_path / "bad.csv"
    bad.write_text("file,y\na.png,0\n")
    args = [a.format(flyp=quad["flyp"], bad=bad, eval=quad["eval"]) for a in args]
    res = runner.invoke(app, args)
    assert res.exit_code == 1
    assert message in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def report(quad):
    """The flyp run's report, with its first region's cluster made the top feature if none was found
    (a tiny random model rarely learns anything); its sidecar names the flyp checkpoint."""
    out = quad["dir"] / "disc"
    res = runner.invoke(
        app, ["discover", str(quad["flyp"]), "--data", str(quad["eval"]), "--out", str(out), "--threads", "1"]
    )
    assert res.exit_code == 0, res.output
    report = load_report(out / "report.json")
    if not report.features:
        c = report.regions[0].cluster
        ids = [r.id for r in report.regions if r.cluster == c]
        report = report.model_copy(
            update={"features": [Feature(rank=0, cluster=c, gap_score=0.1, influence=0.5, region_ids=ids)]}
        )
        save_report(report, out / "report.json")
    return out / "report.json"


@pytest.mark.parametrize("mode", ["roi", "crop"])
def test_ravl_run_end_to_end_text_tower_frozen(quad, report, tmp_path, mode):
    res = runner.invoke(
        app,
        [
            "run",
            "-c",
            str(quad["config"]),
            "--method",
            "ravl",
            "--discovered",
            str(report),
            "--name",
            "ravl",
            "--set",
            f"runs_dir={tmp_path}/runs",
            "--set",
            f"method_options={{lam: 0.5, region_mode: {mode}}}",
        ],
    )
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "ravl"
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "step"]
    assert len(steps) == 2
    for r in steps:
        assert r["loss"] == pytest.approx(0.5 * r["contrastive_loss"] + 0.5 * r["reg_loss"], rel=1e-5)
        assert r["reg_loss"] == pytest.approx(r["region_loss"] + r["align_loss"], rel=1e-5)
    state = json.loads((run / "run.json").read_text())["method_state"]
    assert state["lam"] == 0.5 and state["tau"] == 0.07 and state["region_mode"] == mode
    assert 0 < state["spurious_regions"] < 1
    init, last = load_file(str(quad["init"])), load_file(str(run / "checkpoints" / "last.safetensors"))
    changed = {k for k in init if not torch.equal(init[k], last[k])}
    assert changed and all(k.startswith("visual.") for k in changed)  # text tower and logit scale unchanged
    assert any(k.startswith("visual.") for k in changed)


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "needs a discovery report"),
        (["--discovered", "/no/such.json"], "no such report"),
        (["--discovered", "{report}", "--set", "method_options={tau: 0}"], "method_options: tau"),
    ],
)
def test_ravl_run_one_line_errors(quad, report, tmp_path, extra, message):
    extra = [a.replace("{report}", str(report)) for a in extra]
    res = runner.invoke(
        app, ["run", "-c", str(quad["config"]), "--method", "ravl", "--set", f"runs_dir={tmp_path}/r", *extra]
    )
    assert res.exit_code == 1
    assert message in res.output and "Traceback" not in res.output
