"""A tiny end-to-end benchmark run: tiny world and model, a few steps, one seed, a few rows; report files.

.venv/bin/pytest -q tests/bench/test_suite.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.report import summarize, welch_t, write_report
from bench.suite import (
    BenchConfig,
    bank_coverage,
    find_reviewed_bank,
    row_config,
    run_bench,
    write_oracle_bank,
)
from bench.world import WorldConfig
from tests.bench.test_pretrain import tiny_pretrain_config


def tiny_bench(tmp_path, **fields) -> BenchConfig:
    world = WorldConfig(n_pretrain=96, n_a_train=64, n_eval=20, group_size=2)
    pretrain = tiny_pretrain_config(world)
    return BenchConfig(
        pretrain=pretrain,
        pretrain_seeds=[0],
        seeds=[0],
        steps=3,
        batch_size=32,
        warmup_steps=1,
        out=str(tmp_path / "bench"),
        cache_dir=str(tmp_path / "cache"),
        threads=1,
        progress=False,
        **fields,
    )


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("suite")
    cfg = tiny_bench(tmp, rows=["zeroshot", "flyp", "starft", "wise_starft"])
    return cfg, run_bench(cfg)


def test_tiny_bench_runs_every_row_and_writes_results(tiny_results):
    cfg, results = tiny_results
    rows = sorted(r["row"] for r in results["records"])
    assert rows == ["flyp", "starft", "wise_starft", "zeroshot"]
    for rec in results["records"]:
        m = rec["metrics"]
        assert set(m) == {
            "id", "a_sketch", "a_unseen", "b_worst", "b_worst3", "b_avg", "b_plain", "b_sketch", "b_bias",
            "id_ece",
        }  # fmt: skip
        assert -100.0 <= m["b_bias"] <= 100.0
        assert all(0.0 <= v <= 100.0 for k, v in m.items() if k != "b_bias")  # b_bias is a difference
        assert m["id_ece"] > 0.0  # a few steps on a tiny model are never perfectly calibrated
        assert m["b_worst"] <= m["b_worst3"] <= m["b_avg"]
    saved = json.loads((Path(cfg.out) / "results.json").read_text())
    assert saved["records"] == results["records"]
    cov = results["coverage"]["reviewed"]
    assert cov["total"] > 0 and 0.0 <= cov["share"] <= 100.0


def test_tiny_bench_report_files(tiny_results, tmp_path):
    _, results = tiny_results
    paths = write_report(results, tmp_path)
    md = paths["markdown"].read_text()
    for row in ("zeroshot", "flyp", "starft", "wise_starft"):
        assert f"| {row} |" in md
    assert "B worst group" in md and "coverage" in md
    summary = json.loads(paths["json"].read_text())
    assert summary["rows"]["flyp"]["cells"]["id"]["n"] == 1
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the console table reads in an 80-column terminal: every row name and number whole
    from rich.console import Console

    console = Console(record=True, width=80)
    write_report(results, tmp_path / "again", console=console)
    text = console.export_text()
    assert "…" not in text and max(map(len, text.splitlines())) <= 80
    assert "wise_starft" in text


def test_finished_runs_are_reused(tiny_results, capsys):
    cfg, results = tiny_results
    again = run_bench(cfg.model_copy(update={"rows": ["flyp"]}))
    first = next(r for r in results["records"] if r["row"] == "flyp")
    assert again["records"][0]["metrics"] == first["metrics"]
    assert again["records"][0]["run_dir"] == first["run_dir"]
    # reused, and reported with the times the run recorded when it ran (not the ~0 s of the reuse)
    assert again["records"][0]["reused"] and not first["reused"]
    recorded = json.loads((Path(first["run_dir"]) / "metrics.json").read_text())
    assert again["records"][0]["seconds"] == round(recorded["seconds"], 1) > 0
    assert again["records"][0]["cpu_seconds"] == round(recorded["cpu_seconds"], 1) > 0
    capsys.readouterr()
    other = run_bench(cfg.model_copy(update={"rows": ["flyp"], "lr": 1e-4, "progress": True}))  # a new run
    assert other["records"][0]["run_dir"] != first["run_dir"]
    # its progress line names the row and its figures as a reused one does, with the time it took
    m = other["records"][0]["metrics"]
    assert f"[1/1] p0 flyp s0: ID {m['id']:.1f}  B worst {m['b_worst']:.1f}" in capsys.readouterr().err


def test_welch_t_and_summary():
    assert welch_t([1.0], [2.0]) is None
    assert welch_t([1.0, 3.0], [1.0, 3.0]) == 0.0
    t = welch_t([10.0, 12.0, 11.0], [1.0, 2.0, 3.0])
    assert t == pytest.approx(9.0 / (2 / 3) ** 0.5, rel=1e-6)
    recs = [
        {"row": r, "seconds": 1.0, "metrics": {"id": x, "b_worst": x}}
        for r, x in [("flyp", 1.0), ("flyp", 3.0), ("starft", 5.0), ("starft", 7.0)]
    ]
    s = summarize({"split": "val", "records": recs})
    assert s["rows"]["starft"]["cells"]["id"] == {"mean": 6.0, "std": pytest.approx(1.41), "n": 2}
    assert s["welch_starft_vs"]["flyp"]["id"]["diff"] == 4.0


def test_paired_comparison_matches_runs_by_seeds():
    from rich.console import Console

    from bench.report import markdown, paired_t, rich_paired

    assert paired_t([1.0], [0.0]) is None
    assert paired_t([2.0, 3.0], [1.0, 2.0]) == float("inf")  # every pair +1
    # Equal differences up to float rounding are equal, not a t of -1e13.
    assert paired_t([90.2, 90.1], [90.3, 90.2]) == float("-inf")
    assert welch_t([90.2, 90.2], [90.3, 90.3]) == float("-inf")
    assert paired_t([0.1 + 0.2, 0.3], [0.3, 0.1 + 0.2]) == 0.0
    assert paired_t([3.0, 2.0, 7.0], [1.0, 1.0, 1.0]) == pytest.approx(3.0 / (2.6458 / 3**0.5), rel=1e-4)
    # Large between-seed spread, constant +1 within each seed: Welch sees nothing, the paired test sees it.
    recs = [
        {
            "row": r,
            "pretrain_seed": p,
            "seed": sd,
            "metrics": {"b_worst": base + (1.0 if r == "starft" else 0.0)},
        }
        for r in ("starft", "flyp")
        for (p, sd), base in {(0, 0): 10.0, (0, 1): 50.0, (1, 0): 90.0}.items()
    ]
    recs.append({"row": "flyp", "pretrain_seed": 1, "seed": 1, "metrics": {"b_worst": 0.0}})  # no partner
    s = summarize({"split": "test", "records": list(reversed(recs))})
    assert abs(s["welch_starft_vs"]["flyp"]["b_worst"]["t"]) < 0.5
    assert s["paired_starft_vs"]["flyp"]["b_worst"] == {"diff": 1.0, "t": "inf", "n": 3, "wins": 3}
    assert "paired on (pretraining seed, fine-tuning seed)" in markdown(s) and "3/3" in markdown(s)
    console = Console(record=True, width=80)
    console.print(rich_paired(s))
    text = console.export_text()
    assert "t inf" in text and "3/3" in text and "+1.0" in text
    single = summarize(
        {"split": "test", "records": [r for r in recs if r["seed"] == 0 and r["pretrain_seed"] == 0]}
    )
    assert rich_paired(single) is None  # one pair: no paired table in the console


def test_oracle_bank_and_reviewed_bank(tmp_path):
    from descgen.bank import load_bank

    world = WorldConfig()
    path = write_oracle_bank(world, tmp_path)
    bank = load_bank(path)
    texts = [d.text for d in bank.approved(["background"])]
    assert bank_coverage(path, ["background"], world)["share"] == 100.0  # the world's own phrases
    assert "on the grass" in texts and all(d.source == "manual" for d in bank.approved(["background"]))
    assert write_oracle_bank(world, tmp_path) == path  # reused, never rewritten
    reviewed = find_reviewed_bank("banks")
    assert load_bank(reviewed).approved(["background"])


def test_oracle_bank_written_by_a_concurrent_process_is_reused(tmp_path, monkeypatch):
    """Two bench processes (one per pretraining seed) share a world and so an oracle bank: the one that
    finds the file missing but loses the race to write it reuses the other's file, it does not fail."""
    import copy

    from descgen.bank import BankDoc, load_bank

    save = BankDoc.save

    def lose_the_race(self, *args, **kwargs):
        save(copy.deepcopy(self), *args, **kwargs)  # the other process writes first
        return save(self, *args, **kwargs)

    monkeypatch.setattr(BankDoc, "save", lose_the_race)
    path = write_oracle_bank(WorldConfig(), tmp_path)
    assert load_bank(path).approved(["background"])


def test_every_row_has_its_own_plot_colour():
    from bench.report import ROW_COLOURS
    from bench.suite import ALL_ROWS

    assert set(ROW_COLOURS) == set(ALL_ROWS)
    # a row and its WiSE-FT share a colour (told apart by the marker); no two other rows do
    base = {c for r, c in ROW_COLOURS.items() if not r.startswith("wise_")}
    assert len(base) == len(ALL_ROWS) - 2


def test_kl_lr_sets_the_lr_of_the_kl_rows_only(tmp_path):
    cfg = tiny_bench(tmp_path, lr=3e-5, flyp_low_lr=2e-5, kl_lr=5e-5)
    banks = {"reviewed": "r.yaml", "oracle": "o.yaml"}

    def lr(row: str, c: BenchConfig = cfg) -> float:
        return row_config(c, row, 0, tmp_path, {"train": {}}, banks, tmp_path)["lr"]

    assert {r: lr(r) for r in ("ft", "flyp", "flyp_lowlr")} == {"ft": 3e-5, "flyp": 3e-5, "flyp_lowlr": 2e-5}
    assert {lr(r) for r in ("kl", "starft", "clean", "random", "oracle")} == {5e-5}
    assert lr("starft", cfg.model_copy(update={"kl_lr": None})) == 3e-5


def test_config_rejects_unknown_rows():
    with pytest.raises(ValueError, match="unknown rows"):
        BenchConfig(rows=["flyp", "magic"])


def test_cli_bench_and_pretrain_reuse_the_tiny_runs(tiny_results, tmp_path):
    from ruamel.yaml import YAML
    from typer.testing import CliRunner

    from bench.cli import app

    cfg, _ = tiny_results
    config = tmp_path / "bench.yaml"
    YAML(typ="safe", pure=True).dump(cfg.model_dump(mode="json"), config.open("w"))
    res = CliRunner().invoke(
        app,
        ["run", "-c", str(config), "--threads", "1", "--rows", "zeroshot,flyp", "--set", "wise_alpha=0.4"],
    )
    assert res.exit_code == 0, res.output
    assert "flyp" in res.stdout
    assert (Path(cfg.out) / "report.md").is_file() and (Path(cfg.out) / "plot.png").is_file()
    res = CliRunner().invoke(app, ["pretrain", "-c", str(config), "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert "zero-shot models" in res.stdout
    res = CliRunner().invoke(app, ["run", "--split", "train"])
    assert res.exit_code == 2
    res = CliRunner().invoke(app, ["run", "-c", str(config), "--set", "lam=-1"])
    assert res.exit_code == 1 and "lam" in res.output


def test_tower_swap_diagnostic(tiny_results):
    from bench.towers import hybrid_state, tower_swap, with_bn_stats

    _, results = tiny_results
    rec = {r["row"]: r for r in results["records"]}
    res = tower_swap(rec["flyp"]["run_dir"])
    assert list(res) == [
        "zero-shot",
        "fine-tuned",
        "ft image + zs text",
        "zs image + ft text",
        "fine-tuned, zs BN stats",
    ]
    for model, row in (("zero-shot", "zeroshot"), ("fine-tuned", "flyp")):  # the bench's own numbers
        assert res[model]["ID"] == pytest.approx(rec[row]["metrics"]["id"], abs=0.05)
        assert res[model]["B worst"] == pytest.approx(rec[row]["metrics"]["b_worst"], abs=0.05)
    zs = {"visual.w": 0, "visual.bn.running_mean": 0, "text.w": 0, "logit_scale": 0}
    ft = {k: 1 for k in zs}
    assert hybrid_state(ft, zs) == {"visual.w": 1, "visual.bn.running_mean": 1, "text.w": 0, "logit_scale": 0}
    assert with_bn_stats(zs, ft) == {
        "visual.w": 1,
        "visual.bn.running_mean": 0,
        "text.w": 1,
        "logit_scale": 1,
    }


def test_kl_drift_chain_rule_and_indistinct_descriptors():
    import torch

    from bench.towers import descriptor_part, mean_kl

    g = torch.Generator().manual_seed(0)
    n, c, d = 6, 4, 3
    lp, lq = torch.randn(n, c * d, generator=g) * 3, torch.randn(n, c * d, generator=g) * 3
    class_mask = torch.tensor([0, 1, 2, 3, 0, 1])[:, None] == torch.arange(c)[None, :]
    mask = class_mask.repeat_interleave(d, 1)  # captions class-major, as kl_drift builds them
    desc, entropy = descriptor_part(lp, lq, class_mask, d)
    marg_p, marg_q = lp.view(n, c, d).logsumexp(2), lq.view(n, c, d).logsumexp(2)
    assert mean_kl(lp, lq, mask) == pytest.approx(mean_kl(marg_p, marg_q, class_mask) + desc, rel=1e-5)
    assert desc > 0 and 0 < entropy < 1
    # Descriptors that move no logit: the whole KL is the class part, and the teacher cannot tell them apart.
    flat_p = torch.randn(n, c, generator=g).repeat_interleave(d, 1)
    flat_q = torch.randn(n, c, generator=g).repeat_interleave(d, 1)
    desc, entropy = descriptor_part(flat_p, flat_q, class_mask, d)
    assert desc == pytest.approx(0.0, abs=1e-6) and entropy == pytest.approx(1.0, abs=1e-6)


def test_kl_drift_of_a_run(tiny_results):
    import subprocess
    import sys

    from bench.towers import kl_drift

    _, results = tiny_results
    run = next(r for r in results["records"] if r["row"] == "starft")["run_dir"]
    res = kl_drift(run)
    assert set(res) == {"a", "b_groups"}
    for cells in res.values():
        assert cells["star"] >= 0 and cells["head"] >= 0
        assert 0 <= cells["star_descriptor"] <= cells["star"] + 1e-3
        assert 0 < cells["teacher_descriptor_entropy"] <= 1 + 1e-6
    proc = subprocess.run(
        [sys.executable, "-m", "bench.towers", "--no-towers", run],
        check=False,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "star A" in proc.stdout and "ft image + zs text" not in proc.stdout  # the KL table only


@pytest.mark.parametrize("bad", ["missing", "malformed"])
def test_tower_swap_cli_bad_run_is_one_line(tmp_path, bad):
    import subprocess
    import sys

    run = tmp_path / "run"
    if bad == "malformed":
        (run / "checkpoints").mkdir(parents=True)
        (run / "checkpoints" / "last.safetensors").write_bytes(b"")
        (run / "config.yaml").write_text("model: [\n")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    proc = subprocess.run(
        [sys.executable, "-m", "bench.towers", str(run)], check=False, capture_output=True, text=True
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("Error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr and str(run) in proc.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_bias_gap_is_typical_minus_other_background():
    from bench.suite import metrics_row, typical_backgrounds
    from bench.world import WorldConfig

    final = {"b_groups": {"worst_group": 10.0, "per_group": {"five/snow": 90.0, "five/beach": 70.0,
                                                             "six/beach": 80.0, "six/snow": 50.0}}}  # fmt: skip
    row = metrics_row(final, {"five": {"snow"}, "six": {"beach"}})
    assert row["b_bias"] == 85.0 - 60.0 and row["b_worst"] == 10.0
    assert "b_bias" not in metrics_row(final)  # no typical backgrounds given: no gap made up
    assert "b_bias" not in metrics_row(
        final, {"five": {"snow", "beach"}, "six": {"beach", "snow"}}
    )  # no "other"
    world = WorldConfig()
    assert typical_backgrounds(world) == {world.class_names[d]: set(b) for d, b in world.typical_b.items()}


def test_every_shipped_bench_config_loads():
    """bench/configs/*.yaml are the configs the docs' commands use: each must validate (ravl-*.yaml are
    RaVL-suite configs, the others BenchConfig files)."""
    from bench.ravl_suite import RavlSuiteConfig
    from bench.suite import config_data, load_bench_config

    paths = sorted((Path(__file__).parents[2] / "bench" / "configs").glob("*.yaml"))
    ravl = [p for p in paths if p.name.startswith("ravl")]
    assert len(paths) - len(ravl) >= 4 and ravl
    names = {p.stem: load_bench_config(p).pretrain.world.class_names for p in paths if p not in ravl}
    assert names["twin"][5] == "one twin" and names["full"][5] == "five"
    for p in ravl:
        RavlSuiteConfig.model_validate(config_data(p, None, {}))
