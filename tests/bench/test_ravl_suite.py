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
