"""Sets whose classes are a subset of the training classes: scored by projecting the training-class logits.

.venv/bin/pytest tests/trainer/test_layouts_subsets.py -q
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.conftest import CLASSES_A
from trainer.config import DataSpec
from trainer.data.sets import load_image_set, resolve_class_map
from trainer.errors import DataError
from trainer.evaluate import evaluate_sets, make_eval_sets, project_logits
from trainer.model import build_clip


def test_project_logits_takes_the_max_over_each_classes_members():
    logits = torch.tensor([[0.0, 5.0, 1.0, 9.0], [3.0, 0.0, 2.0, 1.0]])
    out = project_logits(logits, [[3], [1, 2], [0, 2]])
    assert out.tolist() == [[9.0, 5.0, 1.0], [1.0, 2.0, 3.0]]


def _subset_csv(tmp_path: Path, image_data, keep: dict[int, int], per_class: dict[int, int]) -> Path:
    """A CSV over the training images of classes `keep` (train label -> subset label), `per_class` each."""
    rows, counts = [], dict.fromkeys(keep, 0)
    for row in csv.DictReader(image_data["train"].open()):
        y = int(row["label"])
        if y in keep and counts[y] < per_class[y]:
            counts[y] += 1
            rows.append({"path": str(image_data["root"] / row["path"]), "label": keep[y]})
    out = tmp_path / "subset.csv"
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, ["path", "label"])
        w.writeheader()
        w.writerows(rows)
    return out


@pytest.fixture(scope="module")
def clip(tiny_clip):
    torch.manual_seed(0)
    return build_clip(str(tiny_clip), None)


def test_class_subset_by_name_index_and_file(tmp_path, image_data):
    base = load_image_set(DataSpec(path=str(image_data["train"]), classes=CLASSES_A), "simple")
    path = _subset_csv(tmp_path, image_data, {3: 0, 1: 1}, {3: 1, 1: 4})
    for subset in (["star", "square"], [3, 1], "file"):
        if subset == "file":
            (tmp_path / "sub.txt").write_text("# star, square\nstar\n1\n")
            subset = str(tmp_path / "sub.txt")
        s = load_image_set(DataSpec(path=str(path), classes=["s0", "s1"]), "simple")
        resolve_class_map(s, base, subset)
        assert s.class_map == [[3], [1]] and s.base_classes == CLASSES_A
    s = load_image_set(DataSpec(path=str(path), classes=["s0", "s1"]), "simple")
    for bad, message in [
        (["star"], "1 entries for 2 classes"),
        (["star", "cow"], "'cow' is not a training class"),
        ([3, 4], r"index 4 out of range \(0..3\)"),
    ]:
        with pytest.raises(DataError, match=message):
            resolve_class_map(s, base, bad)
    with pytest.raises(DataError, match="needs training"):
        resolve_class_map(s, None, ["star", "square"])


@pytest.mark.parametrize("favoured, expected", [(1, 80.0), (3, 20.0)])
def test_a_trained_head_scores_a_subset_by_projection(tmp_path, image_data, clip, favoured, expected):
    """The ft head is kept for a 2-of-4 subset (it used to be dropped for the zero-shot head)."""
    model, preprocess, tokenizer = clip
    base = load_image_set(DataSpec(path=str(image_data["train"]), classes=CLASSES_A), "simple")
    path = _subset_csv(tmp_path, image_data, {3: 0, 1: 1}, {3: 1, 1: 4})  # 1 star (0), 4 squares (1)
    s = load_image_set(DataSpec(path=str(path), classes=["star", "square"], name="sub"), "simple")
    resolve_class_map(s, base, ["star", "square"])
    head = nn.Linear(32, 4)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([50.0, 0.0, 0.0, 0.0]))
        head.bias[favoured] = 10.0  # class 0 (circle) wins over all 4; of the subset, `favoured` wins
    es = make_eval_sets([s], preprocess, 8, None)
    m = evaluate_sets(model, tokenizer, es, None, head, CLASSES_A)
    assert m["sub"]["top1"] == pytest.approx(expected) and m["sub"]["n"] == 5


def test_zero_shot_head_of_a_subset_uses_the_training_classes(tmp_path, image_data, clip):
    """Projection of the training classes' zero-shot head = a head over the mapped training class names."""
    model, preprocess, tokenizer = clip
    base = load_image_set(DataSpec(path=str(image_data["train"]), classes=CLASSES_A), "simple")
    path = _subset_csv(tmp_path, image_data, {0: 0, 2: 1}, {0: 8, 2: 8})
    mapped = load_image_set(DataSpec(path=str(path), classes=["x", "y"], name="mapped"), "simple")
    resolve_class_map(mapped, base, [0, 2])
    plain = load_image_set(DataSpec(path=str(path), classes=["circle", "triangle"], name="plain"), "simple")
    m = evaluate_sets(model, tokenizer, make_eval_sets([mapped, plain], preprocess, 8, None))
    assert m["mapped"] == m["plain"]


def test_objectnet_border_is_cropped_before_the_preprocess(tmp_path):
    from PIL import Image

    from tests.trainer.test_layouts import make_objectnet_tree
    from trainer.evaluate import CropBorder

    im = Image.new("RGB", (12, 10), (255, 0, 0))
    im.paste((0, 0, 255), (1, 1, 11, 9))  # a 1-pixel red border around blue
    cropped = CropBorder(1, lambda x: x)(im)
    assert cropped.size == (10, 8) and cropped.getcolors() == [(80, (0, 0, 255))]
    s = load_image_set(DataSpec(path=str(make_objectnet_tree(tmp_path / "on")), layout="objectnet"), "simple")
    es = make_eval_sets([s], lambda x: x, 8, None)[0]
    assert isinstance(es.loader.dataset.transform, CropBorder) and es.loader.dataset.transform.pixels == 1
