"""`trainer report`: runs as one table in the paper's form (ID, OOD sets, OOD avg, worst / average group, ECE).

.venv/bin/pytest tests/trainer/test_report.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image
from typer.testing import CliRunner

from trainer.cli import app

runner = CliRunner()


def fake_run(
    root: Path,
    name: str,
    method: str,
    top1: dict[str, float],
    groups: dict[str, list[float]],
    ece: dict[str, float] | None = None,
) -> Path:
    """A run dir as `trainer run` leaves it: config.yaml (data.val named 'imagenet') and metrics.json;
    without `ece`, as runs from before ECE left it (no `ece` in any set's metrics)."""
    d = root / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(
        f"method: {method}\ndata:\n  val: {{path: data/imagenet/val, name: imagenet}}\n"
    )
    final = {s: {"top1": v, "n": 10} for s, v in top1.items()}
    for s, accs in groups.items():
        final[s] = {
            "top1": sum(accs) / len(accs),
            "n": 10,
            "per_group": {f"g{i}": a for i, a in enumerate(accs)},
            "worst_group": min(accs),
            "worst3_mean": 0.0,
            "group_mean": sum(accs) / len(accs),
        }
    for s, v in (ece or {}).items():
        final[s]["ece"] = v
    best = {"step": 3, "val_top1": 1.0, "results": {"imagenet": {"top1": 1.0, "n": 10}}}
    if ece:
        best["results"]["imagenet"]["ece"] = 2.0
    (d / "metrics.json").write_text(json.dumps({"method": method, "final": final, "best": best}))
    return d


def test_report_table_markdown_and_png(tmp_path):
    a = fake_run(
        tmp_path,
        "flyp",
        "flyp",
        {"imagenet": 80.0, "imagenet-r": 70.0, "imagenet-a": 50.0},
        {"waterbirds": [30, 90]},
    )
    b = fake_run(
        tmp_path,
        "starft",
        "starft",
        {"imagenet": 81.0, "imagenet-r": 72.5, "imagenet-a": 52.5},
        {"waterbirds": [45, 95]},
    )
    png = tmp_path / "out" / "table.png"
    args = [
        "report",
        str(a),
        str(b),
        "--checkpoint",
        "final",
        "--png",
        str(png),
        "--md",
        str(tmp_path / "t.md"),
    ]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert (
        lines[0]
        == "| run | method | ID | imagenet-r | imagenet-a | OOD avg | waterbirds WG | waterbirds avg group"
        " | ID ECE | OOD avg ECE |"
    )
    # runs from before ECE: its columns are there, as "–"
    assert lines[2] == "| flyp | flyp | 80.00 | 70.00 | 50.00 | 60.00 | 30.00 | 60.00 | – | – |"
    assert lines[3] == "| starft | starft | 81.00 | 72.50 | 52.50 | 62.50 | 45.00 | 70.00 | – | – |"
    assert (tmp_path / "t.md").read_text() == r.stdout
    with Image.open(png) as im:
        assert im.size[0] > 300 and im.size[1] > 50
    r = runner.invoke(app, ["report", str(a), "--ood", "imagenet-r", "--checkpoint", "final"])
    assert (
        r.exit_code == 0
        and "| flyp | flyp | 80.00 | 70.00 | 50.00 | 70.00 | 30.00 | 60.00 | – | – |" in r.stdout
    )
    for how in ("best", "auto"):  # auto: the ID-selected checkpoint where the run has one
        r = runner.invoke(app, ["report", str(a), "--checkpoint", how])
        assert r.exit_code == 0 and "| flyp | flyp | 1.00 |" in r.stdout
    del_best = json.loads((a / "metrics.json").read_text())
    del del_best["best"]
    (a / "metrics.json").write_text(json.dumps(del_best))
    r = runner.invoke(app, ["report", str(a)])
    assert r.exit_code == 0 and "| flyp | flyp | 80.00 |" in r.stdout
    assert runner.invoke(app, ["report", str(a), "--checkpoint", "best"]).exit_code == 1


def test_report_errors_are_one_line(tmp_path):
    a = fake_run(tmp_path, "x", "flyp", {"imagenet": 80.0}, {})
    for args, message in [
        ([str(tmp_path / "nope")], "no such file"),
        ([str(a), "--ood", "imagenet-z"], "no such OOD set 'imagenet-z'"),
    ]:
        r = runner.invoke(app, ["report", *args])
        assert r.exit_code == 1 and r.stderr.startswith("Error: ") and message in r.stderr, r.output
        assert len(r.stderr.strip().splitlines()) == 1


def test_report_ece_columns(tmp_path):
    """ID ECE and the mean ECE over the OOD-average sets, in the markdown and the PNG; '–' where missing."""
    ece = {"imagenet": 3.25, "imagenet-r": 8.0, "imagenet-a": 12.5, "waterbirds": 20.0}
    a = fake_run(tmp_path, "carot", "flyp", {"imagenet": 80.0, "imagenet-r": 70.0, "imagenet-a": 50.0},
                 {"waterbirds": [30, 90]}, ece)  # fmt: skip
    partial = {"imagenet": 4.0, "imagenet-r": 6.0}  # imagenet-a without ece: no OOD average of it
    b = fake_run(
        tmp_path, "half", "flyp", {"imagenet": 81.0, "imagenet-r": 71.0, "imagenet-a": 51.0}, {}, partial
    )
    old = fake_run(tmp_path, "old", "flyp", {"imagenet": 79.0, "imagenet-r": 69.0, "imagenet-a": 49.0}, {})
    png = tmp_path / "table.png"
    r = runner.invoke(app, ["report", str(a), str(b), str(old), "--checkpoint", "final", "--png", str(png)])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].endswith("| waterbirds WG | waterbirds avg group | ID ECE | OOD avg ECE |")
    assert lines[2] == "| carot | flyp | 80.00 | 70.00 | 50.00 | 60.00 | 30.00 | 60.00 | 3.25 | 10.25 |"
    assert lines[3] == "| half | flyp | 81.00 | 71.00 | 51.00 | 61.00 | – | – | 4.00 | – |"
    assert lines[4] == "| old | flyp | 79.00 | 69.00 | 49.00 | 59.00 | – | – | – | – |"
    assert "ECE: expected calibration error" in r.stdout
    with Image.open(png) as im:
        assert im.size[0] > 300 and im.size[1] > 50
    r = runner.invoke(app, ["report", str(a), "--ood", "imagenet-a", "--checkpoint", "final"])
    assert r.exit_code == 0 and r.stdout.splitlines()[2].endswith("| 3.25 | 12.50 |")
    for how, line in [("best", "| carot | flyp | 1.00 | 2.00 |"), ("auto", "| old | flyp | 1.00 | – |")]:
        r = runner.invoke(app, ["report", str(a if how == "best" else old), "--checkpoint", how])
        assert r.exit_code == 0 and r.stdout.splitlines()[2] == line, r.output


def test_report_table_object_without_ood_sets(tmp_path):
    from trainer.report import collect, render_markdown

    a = fake_run(tmp_path, "only-id", "zeroshot", {"imagenet": 60.0}, {}, {"imagenet": 5.5})
    table = collect([a], "final")
    assert table.header == ["run", "method", "ID", "ID ECE"]
    assert table.rows == [["only-id", "zeroshot", "60.00", "5.50"]]
    assert "ECE: expected calibration error" in render_markdown(table)
