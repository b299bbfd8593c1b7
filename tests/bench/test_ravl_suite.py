"""The RaVL controlled-evaluation suite at a tiny size (pretraining, flyp, discovery, ravl, upsampled).

.venv/bin/pytest -q tests/bench/test_ravl_suite.py
"""

from __future__ import annotations

import json

from bench.ravl_suite import (
    QuadPretrainConfig,
    RavlSuiteConfig,
    run_ravl_suite,
    shortcut_sides,
    summarize,
)


def test_tiny_suite_runs_and_writes_results(tmp_path):
    cfg = RavlSuiteConfig(
        split="val",
        classes=(3,),
        seeds=(0,),
        n_train=40,
        n_discover=30,
        n_test=30,
        steps=2,
        batch_size=8,
        warmup_steps=1,
        pretrain=QuadPretrainConfig(n_images=64, steps=3, batch_size=16, warmup_steps=1),
        out_dir=str(tmp_path / "out"),
        cache_dir=str(tmp_path / "cache"),
        threads=1,
        progress=False,
    )
    res = run_ravl_suite(cfg)
    out = tmp_path / "out" / "val"
    assert json.loads((out / "results.json").read_text())["summary"] == res["summary"]
    assert (out / "results.png").stat().st_size > 0
    (row,) = res["settings"]
    assert row["seed"] == 1000 and row["class"] == "three"  # val seeds are disjoint from test seeds
    assert 0.0 <= row["p_at_10"] <= 1.0
    for m in ("flyp", "upsampled"):
        assert set(row["methods"][m]) >= {
            "image_acc",
            "image_wg",
            "region_acc",
            "region_wg",
            "region_wg_crop",
            "class_without",
            "others_with",
        }
        v = row["methods"][m]  # both sides are groups, so neither is below the worst group
        assert v["image_wg"] <= min(v["class_without"], v["others_with"])
    if row["n_features"]:
        assert row["methods"]["ravl"]["image_wg"] <= row["methods"]["ravl"]["image_acc"]
    from rich.console import Console

    from bench.ravl_suite import print_results

    console = Console(record=True, width=80)  # the printed tables read in an 80-column terminal
    print_results(res, console)
    text = console.export_text()
    assert "…" not in text and max(map(len, text.splitlines())) <= 80 and "upsampled, all" in text
    # cached: a second call reuses the pretraining, data and runs
    runs = out / "runs"
    before = sorted(p.name for p in runs.iterdir())
    again = run_ravl_suite(cfg)
    assert again["settings"][0]["methods"] == row["methods"]
    assert sorted(p.name for p in runs.iterdir()) == before
    # other settings are new runs, never a silent reuse of the old ones; flyp (unchanged) is reused
    run_ravl_suite(cfg.model_copy(update={"ravl_lam": 0.3, "lr": 1e-3}))
    after = sorted(p.name for p in runs.iterdir())
    assert set(before) < set(after) and len(after) == 2 * len(before)
    run_ravl_suite(cfg.model_copy(update={"ravl_lam": 0.3}))
    only_lam = sorted(p.name for p in runs.iterdir())
    new = set(only_lam) - set(after)
    assert all("-ravl-" in n for n in new) and len(new) == (1 if row["n_features"] else 0)


def test_summary_mean_std_over_learned_settings():
    def row(p, gap, wg):
        m = {"image_acc": 90.0, "image_wg": wg, "region_acc": 80.0, "region_wg": 70.0}
        m.update(region_acc_crop=50.0, region_wg_crop=40.0)
        return {"p_at_10": p, "gap_others": gap, "learned": gap >= 5, "methods": {"flyp": m}}

    s = summarize([row(1.0, 10, 60.0), row(0.8, 8, 70.0), row(0.0, 0, 99.0)], ["flyp"])
    assert s["learned"] == 2 and s["p_at_10_learned"] == {"mean": 0.9, "std": 0.141, "n": 2}
    assert s["mitigation_learned"]["flyp"]["image_wg"]["mean"] == 65.0
    assert s["mitigation_all"]["flyp"]["image_wg"]["n"] == 3


def test_shortcut_sides_from_groups():
    g = {"three/no_rect": 70.0, "three/rect": 99.0, "nine/rect": 60.0, "nine/no_rect": 95.0, "two/rect": 80.0}
    assert shortcut_sides(g, "three") == {"class_without": 70.0, "others_with": 60.0}
    g["nine/rect"] = 100.0  # the spurious class's own rect group never counts as an "other" side
    assert shortcut_sides(g, "three")["others_with"] == 80.0


def test_summary_pairs_methods_with_flyp_on_the_setting():
    def m(wg):
        return {"image_acc": 90.0, "image_wg": wg}

    settings = [
        {
            "class": c,
            "p_at_10": 1.0,
            "gap_others": 9,
            "learned": True,
            "methods": {"flyp": m(b), "ravl": m(b + d)},
        }
        for c, b, d in (("three", 50.0, 2.0), ("three", 80.0, 4.0), ("eight", 65.0, 3.0))  # steady gain
    ]
    summary = summarize(settings, ["flyp", "ravl"])
    by_class = summary["paired_vs_flyp_by_class"]
    assert by_class["three"]["ravl"]["image_wg"] == {"diff": 3.0, "t": 3.0, "wins": 2, "n": 2}
    assert (
        by_class["eight"]["ravl"]["image_wg"]["n"] == 1 and by_class["eight"]["ravl"]["image_wg"]["t"] is None
    )
    p = summary["paired_vs_flyp"]["ravl"]
    assert p["image_wg"]["diff"] == 3.0 and p["image_wg"]["wins"] == 3 and p["image_wg"]["n"] == 3
    assert p["image_wg"]["t"] == round(3.0 / (1.0 / 3**0.5), 2)
    assert p["image_acc"] == {"diff": 0.0, "t": 0.0, "wins": 0, "n": 3}
    assert "region_wg" not in p  # not measured: no entry rather than a made-up one
    equal = [dict(r, methods={"flyp": m(50.0), "ravl": m(53.0)}) for r in settings]  # no spread at all
    t = summarize(equal, ["flyp", "ravl"])["paired_vs_flyp"]["ravl"]["image_wg"]["t"]
    assert t == "inf" and json.loads(json.dumps(summary, allow_nan=False))  # strict JSON either way


def test_vit_tower_avg_pool_is_the_mean_of_its_cells():
    """With the ViT option and mean pooling, the whole-image embedding is the mean of the RoI embeddings
    of its 2x2 grid cells (what ties RaVL's region losses to image-level zero-shot classification)."""
    import open_clip
    import torch

    from bench.ravl_suite import model_config
    from trainer.ravl.regions import region_embeddings

    torch.manual_seed(0)
    x = torch.randn(3, 3, 32, 32)
    for pool, tied in (("avg", True), ("tok", False)):
        cfg = model_config(QuadPretrainConfig(vision="vit", vit_pool=pool, vit_layers=1))
        assert cfg["vision_cfg"]["patch_size"] == 8 and cfg["vision_cfg"]["pool_type"] == pool
        model = open_clip.CLIP(**cfg).eval()
        with torch.no_grad():
            cells, idx = region_embeddings(model, x, grid=(2, 2), mode="roi", normalize=False)
            image = model.encode_image(x)
        mean = torch.stack([cells[idx == i].mean(0) for i in range(len(x))])
        assert torch.allclose(mean, image, atol=1e-5) is tied
    resnet = QuadPretrainConfig()
    assert resnet.hash() != QuadPretrainConfig(vision="vit").hash()
    assert resnet.hash() == QuadPretrainConfig(vit_layers=7).hash()  # ViT fields do not rename ResNet models


def test_cli_ravl_suite_takes_set_seeds_and_steps_and_refuses_the_rest(tmp_path):
    from ruamel.yaml import YAML
    from typer.testing import CliRunner

    from bench.cli import app

    tiny = {
        "classes": [3],
        "n_train": 40,
        "n_discover": 30,
        "n_test": 30,
        "batch_size": 8,
        "warmup_steps": 1,
        "pretrain": {"n_images": 64, "steps": 3, "batch_size": 16, "warmup_steps": 1},
        "out_dir": str(tmp_path / "out"),
        "cache_dir": str(tmp_path / "cache"),
        "progress": False,
    }
    config = tmp_path / "ravl.yaml"
    YAML(typ="safe", pure=True).dump(tiny, config.open("w"))
    args = ["run", "--suite", "ravl", "-c", str(config), "--threads", "1", "--seeds", "0", "--steps", "2"]
    res = CliRunner().invoke(app, [*args, "--set", "methods=[flyp]", "--set", "pretrain.vit_layers=1"])
    assert res.exit_code == 0, res.output
    got = json.loads((tmp_path / "out" / "val" / "results.json").read_text())["config"]
    assert got["seeds"] == [0] and got["steps"] == 2 and got["methods"] == ["flyp"]
    assert got["pretrain"]["vit_layers"] == 1 and got["pretrain"]["steps"] == 3  # --set merges into -c
    for extra, word in (
        (["--lam", "0.3"], "ravl_lam"),
        (["--rows", "flyp"], "--rows"),
        (["--set", "nope=1"], "nope"),
    ):
        res = CliRunner().invoke(app, [*args, *extra])
        assert res.exit_code == 1 and word in res.output and "Traceback" not in res.output, res.output


def test_paper_setting_config_loads_with_the_papers_regime():
    """bench/configs/ravl-paper.yaml: λ 0.8, τ 0.07, lr 5e-5, batch 128, summed region loss, RoI, locked text,
    early stopping on a val split, the paper's learned criterion, both clusterings."""
    from pathlib import Path

    import yaml

    path = Path(__file__).parents[2] / "bench" / "configs" / "ravl-paper.yaml"
    cfg = RavlSuiteConfig.model_validate(yaml.safe_load(path.read_text()))
    assert (cfg.ravl_lam, cfg.ravl_tau, cfg.lr, cfg.batch_size) == (0.8, 0.07, 5e-5, 128)
    assert cfg.ravl_reduction == "sum" and cfg.region_mode == "roi" and cfg.lock_text
    assert cfg.val_images > 0 and cfg.epochs and cfg.learned == "paper"
    assert cfg.clusterings == ("fasterpam", "alternate")
    assert {"flyp", "ravl", "upsampled"} <= set(cfg.methods)


def test_paper_learned_criterion_needs_both_gaps_above_10_for_every_seed():
    from bench.ravl_suite import mark_paper_learned

    def row(c, e1, e2):
        return {"class": c, "strength": 0.95, "gap_class": e1, "gap_others": e2}

    rows = [row("three", 12, 11), row("three", 30, 10.5), row("eight", 12, 11), row("eight", 40, 10.0)]
    mark_paper_learned(rows)
    assert [r["learned_paper"] for r in rows] == [True, True, False, False]  # 10.0 is not above 10


def test_rule_counts_a_setting_without_ravl_as_no_difference():
    from bench.ravl_suite import rule_difference

    def m(wg):
        return {"image_wg": wg}

    base = {"p_at_10": 0.0, "gap_others": 0.0, "learned": False}
    settings = [
        {**base, "methods": {"flyp": m(50.0), "ravl": m(60.0)}},
        {**base, "methods": {"flyp": m(40.0), "ravl": m(42.0)}},
        {**base, "methods": {"flyp": m(70.0), "ravl": None}},  # no feature found: RaVL = plain fine-tuning
    ]
    assert rule_difference(settings) == 4.0
    assert summarize(settings, ["flyp", "ravl"])["rule_ravl_minus_flyp_image_wg"] == 4.0


def test_tiny_paper_setting_early_stops_and_runs_every_row(tmp_path, monkeypatch):
    """The paper setting's machinery at a tiny size: ID val split, best checkpoint, both clusterings'
    P@10, and the ravl, VL-ERM and VL-GDRO rows (the latter two on the upsampled set). A tiny model rarely
    learns anything, so each report's first cluster is made its top feature."""
    import yaml

    from bench import ravl_suite
    from trainer.ravl.discover import Feature, load_report, save_report

    real = ravl_suite._report

    def with_feature(*args):
        path = real(*args)
        report = load_report(path)
        if not report.features:
            c = report.regions[0].cluster
            ids = [r.id for r in report.regions if r.cluster == c]
            feature = Feature(rank=0, cluster=c, gap_score=0.1, influence=0.5, region_ids=ids)
            save_report(report.model_copy(update={"features": [feature]}), path)
        return path

    monkeypatch.setattr(ravl_suite, "_report", with_feature)
    cfg = RavlSuiteConfig(
        split="val",
        classes=(3,),
        seeds=(0,),
        n_train=48,
        n_discover=30,
        n_test=30,
        epochs=2,
        val_images=24,
        batch_size=16,
        warmup_steps=1,
        lr=5e-5,
        ravl_lam=0.8,
        ravl_reduction="sum",
        lock_text=True,
        learned="paper",
        methods=("flyp", "ravl", "upsampled", "vl_erm", "vl_gdro"),
        clusterings=("fasterpam", "alternate"),
        pretrain=QuadPretrainConfig(n_images=64, steps=3, batch_size=16, warmup_steps=1),
        out_dir=str(tmp_path / "out"),
        cache_dir=str(tmp_path / "cache"),
        threads=1,
        progress=False,
    )
    res = run_ravl_suite(cfg)
    (row,) = res["settings"]
    assert 0.0 <= row["p_at_10_alternate"] <= 1.0 and row["n_features_alternate"] == 1
    assert "p_at_10_alternate_all" in res["summary"] and row["learned"] == row["learned_paper"]
    runs = tmp_path / "out" / "val" / "runs"
    flyp = next(runs.glob("*-flyp-*"))
    assert (flyp / "checkpoints" / "best.safetensors").is_file()  # early stopping on the val split
    metrics = json.loads((flyp / "metrics.json").read_text())
    assert set(metrics["final"]) == {"val"} and row["methods"]["flyp"]["best_step"] == metrics["best"]["step"]
    reports = sorted(p.name for p in (tmp_path / "out" / "val" / "reports").iterdir())
    assert [n.split("-flyp-")[1][9:] for n in reports] == ["roi", "roi-alternate"]
    for m in ("ravl", "upsampled", "vl_erm", "vl_gdro"):
        v = row["methods"][m]
        assert v["image_wg"] <= min(v["class_without"], v["others_with"], v["image_acc"])
    ravl = yaml.safe_load((next(runs.glob("*-ravl-*")) / "config.yaml").read_text())
    assert ravl["method_options"]["reduction"] == "sum" and ravl["method_options"]["lam"] == 0.8
    for m, loss in (("vl_erm", "erm"), ("vl_gdro", "gdro")):
        run = yaml.safe_load((next(runs.glob(f"*-{m}-*")) / "config.yaml").read_text())
        assert run["method"] == "ravl" and run["method_options"]["loss"] == loss
        assert run["data"]["train"]["path"].endswith("-upsampled.csv")  # the weighted (upsampled) sampler
