"""Tests of the synthetic world: determinism, group balance, bias as asked, split writing and caching.

.venv/bin/pytest -q tests/bench/test_world.py
"""

from __future__ import annotations

import csv
from collections import Counter

import numpy as np
import pytest

from bench import world as world_mod
from bench.backgrounds import RENDERERS, render_background
from bench.pretrain import pretrain_vocabulary
from bench.vocab import SCENES, vocab_coverage
from bench.world import SPLITS, WorldConfig, build_split, sample_split, write_split


def _rows(split_dir) -> list[dict]:
    with open(split_dir / "data.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def tiny_world() -> WorldConfig:
    return WorldConfig(n_pretrain=200, n_a_train=200, n_eval=60, group_size=4)


def test_every_background_has_scene_words():
    assert set(RENDERERS) == set(SCENES)
    assert len(WorldConfig().backgrounds) >= 12 and len(WorldConfig().ood_backgrounds) >= 2


def test_backgrounds_are_distinct_on_average():
    # Mean colours of two background types must differ, or a conv net could not tell them apart.
    means = {}
    for name in RENDERERS:
        rng = np.random.default_rng(0)
        means[name] = np.mean([render_background(name, rng, 32).mean((0, 1)) for _ in range(8)], axis=0)
    names = list(means)
    dists = [np.abs(means[a] - means[b]).sum() for i, a in enumerate(names) for b in names[i + 1 :]]
    assert min(dists) > 0.03


@pytest.mark.parametrize("name", ["pretrain", "a_train", "a_test", "b_groups_val", "a_sketch_test"])
def test_split_is_deterministic_per_seed(tiny_world, name):
    a, b = build_split(tiny_world, name), build_split(tiny_world, name)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert a.backgrounds == b.backgrounds and a.captions == b.captions
    c = build_split(tiny_world.model_copy(update={"seed": 1}), name)
    assert not np.array_equal(a.images, c.images)


def test_val_and_test_use_their_own_seeds(tiny_world):
    val, test = build_split(tiny_world, "a_val"), build_split(tiny_world, "a_test")
    assert val.images.shape == test.images.shape
    assert not np.array_equal(val.images, test.images)


def test_train_and_eval_glyphs_are_disjoint(tiny_world):
    train = {r["glyph"] for r in sample_split(tiny_world, "a_train")}
    test = {r["glyph"] for r in sample_split(tiny_world, "a_test")}
    assert train and test and not train & test


def test_group_set_is_balanced(tiny_world):
    data = build_split(tiny_world, "b_groups_test")
    counts = Counter(zip(data.labels.tolist(), data.backgrounds))
    assert len(counts) == len(tiny_world.task_b) * len(tiny_world.group_backgrounds)
    assert set(counts.values()) == {tiny_world.group_size}
    assert data.class_names == ("five", "six", "seven", "eight", "nine")


@pytest.mark.parametrize("p", [0.8, 0.95])
def test_fine_tune_bias_is_as_asked(p):
    cfg = WorldConfig(bias_p=p, n_a_train=3000)
    recs = sample_split(cfg, "a_train")
    typical = np.mean([r["background"] in cfg.typical_a[r["digit"]] for r in recs])
    assert abs(typical - p) < 0.025
    assert not {r["background"] for r in recs} & set(cfg.ood_backgrounds)
    assert Counter(r["digit"] for r in recs) == Counter({d: 600 for d in cfg.task_a})


def test_pretraining_bias_and_naming():
    cfg = WorldConfig(n_pretrain=4000, pretrain_empty_frac=0.0)
    recs = sample_split(cfg, "pretrain")
    b = [r for r in recs if r["digit"] in cfg.task_b]
    a = [r for r in recs if r["digit"] in cfg.task_a]
    assert (
        abs(np.mean([r["background"] in cfg.typical_b[r["digit"]] for r in b]) - cfg.pretrain_bias_b) < 0.03
    )
    assert abs(np.mean([r["named"] for r in a]) - cfg.a_name_prob) < 0.02
    assert abs(np.mean([r["named"] for r in b]) - cfg.b_name_prob) < 0.03


def test_ood_split_only_uses_unseen_backgrounds(tiny_world):
    data = build_split(tiny_world, "a_unseen_test")
    assert set(data.backgrounds) <= set(tiny_world.ood_backgrounds)
    assert set(build_split(tiny_world, "a_sketch_val").styles) == {"sketch"}


def test_write_split_and_cache(tiny_world, tmp_path, monkeypatch):
    out = write_split(tiny_world, "b_groups_val", tmp_path)
    rows = _rows(out)
    assert len(rows) == 5 * 5 * 4
    assert {"path", "label", "group", "typical"} <= set(rows[0])
    assert sum(int(r["typical"]) for r in rows) == 5 * 4  # one typical background per task-B class
    assert (out / rows[0]["path"]).is_file()
    assert (out / "classnames.txt").read_text().split("\n")[:2] == ["five", "six"]
    assert {r["group"] for r in rows} == set(tiny_world.group_backgrounds)

    def boom(*a, **k):
        raise AssertionError("cached split was rebuilt")

    monkeypatch.setattr(world_mod, "build_split", boom)
    assert write_split(tiny_world, "b_groups_val", tmp_path) == out
    other = tiny_world.model_copy(update={"seed": 3})
    with pytest.raises(AssertionError, match="rebuilt"):
        write_split(other, "b_groups_val", tmp_path)


def test_pretrain_split_has_captions(tiny_world, tmp_path):
    out = write_split(tiny_world, "pretrain", tmp_path)
    rows = _rows(out)
    assert len(rows) == tiny_world.n_pretrain and all(r["caption"] for r in rows)
    assert len({r["caption"] for r in rows}) > tiny_world.n_pretrain // 2


@pytest.mark.parametrize(
    "bad",
    [
        {"task_a": (0, 1), "task_b": (1, 2)},
        {"backgrounds": ("grass", "moon")},
        {"ood_backgrounds": ("grass",)},
        {"bias_p": 1.5},
        {"unknown_knob": 1},
    ],
)
def test_bad_world_configs_fail(bad):
    with pytest.raises(ValueError):
        WorldConfig(**bad)


def test_vocabulary_coverage_of_scene_phrases():
    vocab = pretrain_vocabulary(WorldConfig())
    common = [
        "in the snow",
        "on the beach",
        "in the city",
        "in the forest",
        "on the water",
        "in the desert",
        "on the grass",
        "in the mountains",
        "{caption} at night",
    ]
    assert vocab_coverage(common, vocab).share == 1.0
    cov = vocab_coverage(["in the snow", "aboard a spaceship"], vocab)
    assert cov.share == 0.5 and cov.missing == {"aboard a spaceship": ["aboard", "spaceship"]}
    assert "five" in vocab and "zero" in vocab  # task A is named rarely, not never
    assert "zero" not in pretrain_vocabulary(WorldConfig(a_name_prob=0.0))


def test_all_splits_are_known():
    assert {"pretrain", "a_train", "a_val", "a_test", "b_groups_test", "b_plain_val", "a_unseen_test"} <= set(
        SPLITS
    )


def _write_in_child(args) -> str:
    cfg, root = args
    return str(write_split(WorldConfig.model_validate(cfg), "a_test", root))


def test_two_processes_can_write_the_same_split(tiny_world, tmp_path):
    import multiprocessing as mp

    args = (tiny_world.model_dump(mode="json"), str(tmp_path))
    with mp.get_context("spawn").Pool(2) as pool:
        outs = pool.map(_write_in_child, [args, args])
    assert outs[0] == outs[1]
    out = write_split(tiny_world, "a_test", tmp_path)  # complete: reused, not rewritten
    rows = _rows(out)
    assert len(rows) == len(build_split(tiny_world, "a_test").labels)
    assert all((out / r["path"]).is_file() for r in rows)
    assert sorted(p.name for p in out.parent.iterdir()) == ["a_test"]  # no temp folder left behind
