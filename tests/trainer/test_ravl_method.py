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


def _report(quad, mode: str):
    """The flyp run's report in one region mode, with its first region's cluster made the top feature if
    none was found (a tiny random model rarely learns anything); its sidecar names the flyp checkpoint."""
    out = quad["dir"] / f"disc-{mode}"
    if (out / "report.json").is_file():
        return out / "report.json"
    res = runner.invoke(
        app,
        ["discover", str(quad["flyp"]), "--data", str(quad["eval"]), "--out", str(out), "--threads", "1"]
        + ["--mode", mode],
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


@pytest.fixture(scope="module")
def report(quad):
    """A RoI report: the region embedding the method uses by default."""
    return _report(quad, "roi")


@pytest.mark.parametrize("mode", ["roi", "crop"])
def test_ravl_run_end_to_end_text_tower_frozen(quad, tmp_path, mode):
    res = runner.invoke(
        app,
        [
            "run",
            "-c",
            str(quad["config"]),
            "--method",
            "ravl",
            "--discovered",
            str(_report(quad, mode)),
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
    assert state["reduction"] == "sum" and state["loss"] == "region"  # the paper's, by default
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
        (["--discovered", "{report}", "--set", "method_options={loss: dro}"], "method_options: loss"),
        (["--discovered", "{report}", "--set", "method_options={region_mode: crop}"], "one embedding"),
    ],
)
def test_ravl_run_one_line_errors(quad, report, tmp_path, extra, message):
    extra = [a.replace("{report}", str(report)) for a in extra]
    res = runner.invoke(
        app, ["run", "-c", str(quad["config"]), "--method", "ravl", "--set", f"runs_dir={tmp_path}/r", *extra]
    )
    assert res.exit_code == 1
    assert message in res.output and "Traceback" not in res.output


# --- one region embedding for labelling and loss ---------------------------------------------


@pytest.mark.parametrize("mode", ["roi", "crop"])
def test_labelling_and_loss_use_the_same_region_embedding(quad, mode):
    """The regions R^s are labelled with exactly the embedding the loss computes in the forward: same
    function, same mode, same numbers for the same weights and images (crop and RoI differ, so a labelling
    path that embedded regions another way would fail here)."""
    from trainer.model import build_clip
    from trainer.ravl.discover import read_rows
    from trainer.ravl.method import label_embeddings, region_outputs

    clip, pre, _ = build_clip(str(quad["dir"] / "tiny-clip.json"), str(quad["init"]))
    clip.eval()
    rows = read_rows(quad["eval"], _classes(quad))[:6]
    paths = [p for p, _ in rows]
    labelled = label_embeddings(clip, pre, paths, (2, 2), mode)  # (6, 4, D)
    from PIL import Image

    x = torch.stack([pre(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        forward = region_outputs(clip, x, (2, 2), mode)["regions"]  # what the loss sees
    torch.testing.assert_close(labelled.reshape(-1, labelled.shape[-1]), forward, atol=1e-5, rtol=1e-5)
    other = label_embeddings(clip, pre, paths, (2, 2), "crop" if mode == "roi" else "roi")
    assert not torch.allclose(other, labelled, atol=1e-3)


def _classes(quad):
    return (quad["dir"] / "classes.txt").read_text().split()


def test_run_labels_and_trains_through_one_embedding_function(quad, report, tmp_path, monkeypatch):
    """A ravl run calls `grid_region_embeddings` both to label the training set (no gradient) and in the
    loss (with gradient), with the same mode each time."""
    from trainer.ravl import method

    calls = []
    real = method.grid_region_embeddings

    def spy(clip, images, grid, mode):
        calls.append((torch.is_grad_enabled(), mode, tuple(grid)))
        return real(clip, images, grid, mode)

    monkeypatch.setattr(method, "grid_region_embeddings", spy)
    res = runner.invoke(
        app,
        ["run", "-c", str(quad["config"]), "--method", "ravl", "--discovered", str(report), "--name", "r"]
        + ["--set", f"runs_dir={tmp_path}/runs"],
    )
    assert res.exit_code == 0, res.output
    assert {grad for grad, _, _ in calls} == {False, True}  # labelling and loss
    assert {(mode, grid) for _, mode, grid in calls} == {("roi", (2, 2))}


# --- VL-ERM and VL-GDRO ------------------------------------------------------------------------


def test_group_dro_step_moves_weight_to_the_worst_group():
    from trainer.ravl.method import group_dro_step

    losses = torch.tensor([1.0, 1.0, 3.0, 0.5], requires_grad=True)
    groups = torch.tensor([0, 0, 1, 2])
    q0 = torch.full((4,), 0.25)
    loss, q = group_dro_step(losses, groups, q0, eta=0.5)
    g = torch.tensor([1.0, 3.0, 0.5, 0.0])  # per-group means; group 3 absent
    expected_q = q0 * torch.exp(0.5 * g)
    expected_q = expected_q / expected_q.sum()
    torch.testing.assert_close(q, expected_q)
    torch.testing.assert_close(loss, (expected_q * g).sum())
    assert q.argmax().item() == 1 and q.sum().item() == pytest.approx(1.0)
    loss.backward()  # gradient reaches each sample through its group's mean, weighted by q
    torch.testing.assert_close(losses.grad, torch.stack([q[0] / 2, q[0] / 2, q[1], q[2]]).detach())


@pytest.mark.parametrize("loss", ["erm", "gdro"])
def test_vl_erm_and_vl_gdro_rows(quad, report, tmp_path, loss):
    res = runner.invoke(
        app,
        ["run", "-c", str(quad["config"]), "--method", "ravl", "--discovered", str(report), "--name", "v"]
        + ["--set", f"runs_dir={tmp_path}/runs", "--set", f"method_options={{loss: {loss}}}"],
    )
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "v"
    steps = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["kind"] == "step"]
    for r in steps:  # L = 0.8 L_CL + 0.2 L_ERM (or L_GDRO), no region terms
        assert r["loss"] == pytest.approx(0.8 * r["contrastive_loss"] + 0.2 * r["reg_loss"], rel=1e-5)
        assert "region_loss" not in r and r["erm_loss"] > 0
        key = "gdro_loss" if loss == "gdro" else "erm_loss"
        assert r["reg_loss"] == pytest.approx(r[key], rel=1e-5)
    state = json.loads((run / "run.json").read_text())["method_state"]
    assert state["loss"] == loss and sum(state["groups"].values()) == 40
    init, last = load_file(str(quad["init"])), load_file(str(run / "checkpoints" / "last.safetensors"))
    changed = {k for k in init if not torch.equal(init[k], last[k])}
    assert changed and all(k.startswith("visual.") for k in changed)


def test_named_rows_fix_their_loss():
    from trainer.ravl.method import RAVL, VL_ERM, VL_GDRO

    assert (RAVL.name, VL_ERM.name, VL_GDRO.name) == ("ravl", "vl_erm", "vl_gdro")
    assert VL_ERM.setup.keywords == {"loss": "erm"} and VL_GDRO.setup.keywords == {"loss": "gdro"}
    assert all(spec.freeze_text for spec in (RAVL, VL_ERM, VL_GDRO))
