"""Datasets, templates, spurious captions and the config loader.

.venv/bin/pytest tests/trainer/test_data.py -q
"""

from __future__ import annotations

import pytest
from PIL import Image
from pydantic import ValidationError

from descgen.bank import load_bank
from trainer.config import DataSpec, build_config, load_config
from trainer.data import (
    RANDOM_WORDS,
    Collate,
    EpochSampler,
    ImageDataset,
    SpuriousCaptions,
    head_templates,
    load_image_set,
    load_templates,
)
from trainer.errors import ConfigError, DataError


def _csv(path, rows, header="path,label,group"):
    path.write_text(header + "\n" + "".join(",".join(r) + "\n" for r in rows))
    return path


class TestCsvSets:
    def test_labels_by_index_and_by_name(self, tmp_path):
        Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
        p = _csv(tmp_path / "s.csv", [("a.png", "1", "water"), ("a.png", "cat", "land"), ("a.png", "0", "")])
        s = load_image_set(DataSpec(path=str(p), classes=["cat", "dog"]), "simple")
        assert s.labels == [1, 0, 0] and s.groups == ["water", "land", None]
        assert s.group_names == ["land", "water"]
        assert s.group_keys() == ["dog/water", "cat/land", None]
        assert (
            load_image_set(
                DataSpec(path=str(p), classes=["cat", "dog"], group_by="group"), "simple"
            ).group_keys()[0]
            == "water"
        )

    @pytest.mark.parametrize(
        "row, message",
        [
            (("missing.png", "0", ""), r"s.csv:3: missing image"),
            (("a.png", "2", ""), r"s.csv:3: label 2 out of range \(0..1, 2 classes\)"),
            (("a.png", "-1", ""), "out of range"),
            (("a.png", "cow", ""), "label 'cow' is not a class name"),
        ],
    )
    def test_bad_rows_name_their_line(self, tmp_path, row, message):
        Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
        p = _csv(tmp_path / "s.csv", [("a.png", "0", ""), row])
        with pytest.raises(DataError, match=message):
            load_image_set(DataSpec(path=str(p), classes=["cat", "dog"]), "simple")

    def test_bad_header_and_missing_files(self, tmp_path):
        p = _csv(tmp_path / "s.csv", [("a.png", "0")], header="file,y")
        with pytest.raises(DataError, match="header must have columns path,label"):
            load_image_set(DataSpec(path=str(p), classes=["a"]), "simple")
        with pytest.raises(DataError, match="no such dataset"):
            load_image_set(DataSpec(path=str(tmp_path / "none.csv"), classes=["a"]), "simple")
        with pytest.raises(DataError, match="no such class-names file"):
            load_image_set(DataSpec(path=str(p), classes=str(tmp_path / "none.txt")), "simple")
        with pytest.raises(DataError, match="needs `classes`"):
            load_image_set(DataSpec(path=str(p)), "simple")


def test_image_folder(tmp_path):
    for cls in ("golden_retriever", "tabby"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.new("RGB", (8, 8)).save(tmp_path / cls / f"{i}.png")
    s = load_image_set(DataSpec(path=str(tmp_path)), "simple")
    assert s.classes == ["golden retriever", "tabby"] and s.labels == [0, 0, 1, 1]
    with pytest.raises(DataError, match="2 class folders but 3 class names"):
        load_image_set(DataSpec(path=str(tmp_path), classes=["a", "b", "c"]), "simple")


def test_templates(tmp_path):
    assert len(load_templates("openai")) == 80
    assert [t("dog") for t in load_templates("simple")] == ["a photo of a dog."]
    f = tmp_path / "t.txt"
    f.write_text("# comment\nart of a {c}.\na {} photo.\n")
    assert [t("cat") for t in load_templates(str(f))] == ["art of a cat.", "a cat photo."]
    with pytest.raises(DataError, match="no \\{c\\} placeholder"):
        load_templates(["a photo."])


def test_group_prompts_average_over_every_group(image_data):
    spec = DataSpec(
        path=str(image_data["groups_b"]),
        classes=str(image_data["classes_b"]),
        group_prompts="a {c} in the {g}.",
    )
    s = load_image_set(spec, "simple")
    assert sorted(t("cat") for t in head_templates(s)) == ["a cat in the land.", "a cat in the water."]


class TestSpuriousCaptions:
    def test_bank_draw_is_uniform_deterministic_and_applies_the_descriptor(self, tiny_bank):
        ds = load_bank(tiny_bank).approved(["background"])
        sp = SpuriousCaptions("bank", seed=0, descriptors=ds)
        out = [sp("a photo of a dog.", epoch=0, index=i) for i in range(300)]
        assert out == [sp("a photo of a dog.", epoch=0, index=i) for i in range(300)]  # same on every process
        assert set(out) == {
            "a photo of a dog in the water.",
            "a photo of a dog on the land.",
            "a photo of a dog in the snow.",
        }
        assert min(out.count(x) for x in set(out)) > 70
        assert out != [sp("a photo of a dog.", epoch=1, index=i) for i in range(300)]

    def test_none_and_random(self):
        assert SpuriousCaptions("none", 0)("a photo of a dog.", 0, 0) == "a photo of a dog."
        r = SpuriousCaptions("random", 0)
        for i in range(50):
            text = r("a photo of a dog.", 0, i)
            extra = text.removeprefix("a photo of a dog ").removesuffix(".").split()
            assert 1 <= len(extra) <= 3 and all(w in RANDOM_WORDS for w in extra)

    def test_bank_mode_needs_descriptors(self):
        with pytest.raises(DataError, match="no approved descriptors"):
            SpuriousCaptions("bank", 0, [])


def test_dataset_and_collate(image_data, tiny_bank):
    import open_clip
    from torchvision import transforms

    s = load_image_set(
        DataSpec(path=str(image_data["train"]), classes=str(image_data["classes_a"])), "simple"
    )
    ds = ImageDataset(s, transforms.ToTensor(), "a photo of a {c}.", SpuriousCaptions("none", 0))
    item = ds[9]
    assert (
        item["caption"] == "a photo of a square."
        and item["label"] == 1
        and item["image"].shape == (3, 32, 32)
    )
    batch = Collate(open_clip.get_tokenizer("ViT-B-32"))([ds[i] for i in range(4)])
    assert (
        batch["image"].shape == (4, 3, 32, 32)
        and batch["caption"].shape == (4, 77)
        and batch["spurious"].shape == (4, 77)
    )


def test_epoch_sampler_replays_an_epoch():
    s = EpochSampler(20, seed=3)
    s.set_epoch(1)
    a = list(s)
    s.set_epoch(2)
    b = list(s)
    assert b != a and sorted(i for i, _ in b) == list(range(20)) and {e for _, e in b} == {2}
    s.set_epoch(1)
    assert list(s) == a
    assert list(EpochSampler(3, 0, shuffle=False)) == [(0, 0), (1, 0), (2, 0)]


class TestConfig:
    def test_overrides_use_dotted_keys_and_yaml_values(self, tmp_path):
        p = tmp_path / "c.yaml"
        p.write_text("method: flyp\ndata:\n  train: {path: a.csv}\n")
        cfg = load_config(
            p, ["lr=3e-4", "data.val.path=v.csv", "concepts=[background, texture]", "kl_scale=null"]
        )
        assert cfg.lr == 3e-4 and cfg.data.val.path == "v.csv" and cfg.concepts == ["background", "texture"]
        assert cfg.kl_scale is None and cfg.method == "flyp"
        with pytest.raises(ValidationError):  # frozen
            cfg.lr = 1.0  # type: ignore[misc]

    @pytest.mark.parametrize(
        "overrides, message",
        [
            (["learning_rate=1"], "unknown config key 'learning_rate'"),
            (["data.train.colour=1"], "unknown config key 'data.train.colour'"),
            (["batch_size=0"], "batch_size: Input should be greater than 0"),
            (["batch_size=10", "grad_accum=4"], "not divisible by grad_accum"),
            (["method=starft"], "needs a bank"),
            (["method=magic"], "method: Input should be"),
            (["lr"], "expected key=value"),
        ],
    )
    def test_errors_are_one_line(self, overrides, message):
        with pytest.raises(ConfigError, match=message) as e:
            build_config({"method": "flyp", "data": {"train": {"path": "a.csv"}}}, overrides)
        assert "\n" not in str(e.value)

    def test_missing_file_and_bad_yaml(self, tmp_path):
        with pytest.raises(ConfigError, match="no such config file"):
            load_config(tmp_path / "none.yaml")
        (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
        with pytest.raises(ConfigError, match="YAML error"):
            load_config(tmp_path / "bad.yaml")
        (tmp_path / "bad2.yaml").write_text("lr: 1e-5\nname: [x\nseed: 0\n")
        with pytest.raises(ConfigError, match=r"bad2\.yaml:\d+: YAML error"):  # file:line
            load_config(tmp_path / "bad2.yaml")

    def test_example_configs_validate(self):
        from pathlib import Path

        configs = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))
        assert configs
        for c in configs:
            cfg = load_config(c)
            assert cfg.hparams()["method"] == cfg.method

    def test_paper_recipe(self):
        from pathlib import Path

        cfg = load_config(Path(__file__).parents[2] / "configs" / "imagenet-vitb16-starft.yaml")
        assert (cfg.model, cfg.pretrained, cfg.batch_size, cfg.epochs) == (
            "ViT-B-16",
            "laion400m_e31",
            512,
            10,
        )
        assert (cfg.lr, cfg.weight_decay, cfg.lam, cfg.lam_decay, cfg.method) == (
            1e-5,
            0.1,
            0.5,
            "epoch",
            "starft",
        )
