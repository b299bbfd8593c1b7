"""Calibration: expected calibration error (10 equal-width bins, L1) in every evaluated set's metrics.

.venv/bin/pytest tests/trainer/test_calibration.py -q   # with the slow test: it launches 2 processes
.venv/bin/pytest tests/trainer/test_calibration.py -q -m "not slow"
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.conftest import CLASSES_A
from trainer.config import DataSpec
from trainer.data.sets import head_templates, load_image_set, resolve_class_map
from trainer.evaluate import (
    accuracy_metrics,
    evaluate_sets,
    expected_calibration_error,
    make_eval_sets,
    project_logits,
    zero_shot_head,
)
from trainer.model import build_clip


def reference_ece(conf: list[float], correct: list[bool], bins: int = 10) -> float:
    """Per sample and per bin, in plain Python: bin k holds lo < c <= hi (the first bin also c == 0)."""
    n, total = len(conf), 0.0
    for k in range(bins):
        lo, hi = k / bins, (k + 1) / bins
        members = [i for i in range(n) if lo < conf[i] <= hi or (k == 0 and conf[i] == 0.0)]
        if members:
            acc = sum(1.0 for i in members if correct[i]) / len(members)
            mean_conf = sum(conf[i] for i in members) / len(members)
            total += abs(acc - mean_conf) * len(members) / n
    return total


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("bins", [10, 15])
def test_matches_the_per_sample_reference_on_random_data(seed, bins):
    g = torch.Generator().manual_seed(seed)
    n, c = 500 + 37 * seed, 3 + seed
    logits = torch.randn(n, c, generator=g) * (0.5 + 2.0 * seed)  # flat to sharp softmaxes
    labels = torch.randint(0, c, (n,), generator=g)
    probs = logits.softmax(dim=1)
    conf, pred = probs.max(dim=1)
    correct = pred == labels
    want = reference_ece([float(x) for x in conf.double()], correct.tolist(), bins)
    assert expected_calibration_error(conf, correct, bins) == pytest.approx(want, abs=1e-6)
    assert expected_calibration_error(probs, correct, bins) == pytest.approx(want, abs=1e-6)  # (N, C) form
    assert expected_calibration_error(conf.double(), correct.float(), bins) == pytest.approx(want, abs=1e-6)
    m = accuracy_metrics(pred, labels, [None] * n, conf)
    assert m["ece"] == pytest.approx(100.0 * want, abs=1e-4)


def test_bins_are_right_inclusive():
    """(lo, hi]: 0.3 shares (0.2, 0.3] with 0.25 (left-inclusive bins would split them); 1.0 is in the
    last bin with 0.95; 0 is in the first."""
    one_bin = abs(0.5 - 0.275)  # both in (0.2, 0.3]: accuracy 1/2, mean confidence 0.275
    split = 0.5 * abs(1 - 0.25) + 0.5 * abs(0 - 0.3)
    got = expected_calibration_error(torch.tensor([0.25, 0.3], dtype=torch.float64), torch.tensor([1, 0]))
    assert got == pytest.approx(one_bin) and got != pytest.approx(split)
    got = expected_calibration_error(torch.tensor([0.95, 1.0], dtype=torch.float64), torch.tensor([1, 0]))
    assert got == pytest.approx(abs(0.5 - 0.975))  # one bin, not 0.5 * 0.05 + 0.5 * 1.0
    got = expected_calibration_error(torch.tensor([0.0, 0.1], dtype=torch.float64), torch.tensor([0, 0]))
    assert got == pytest.approx(0.05)  # [0, 0.1] together: |0 - 0.05|
    for conf in ([0.25, 0.3], [0.95, 1.0], [0.0, 0.1], [0.1, 0.2, 0.7, 0.9, 1.0]):
        ok = [i % 2 == 0 for i in range(len(conf))]
        got = expected_calibration_error(torch.tensor(conf, dtype=torch.float64), torch.tensor(ok))
        assert got == pytest.approx(reference_ece(conf, ok), abs=1e-12)


def test_known_cases():
    # perfectly calibrated: in each bin, the share right equals the confidence
    conf, ok = [], []
    for k in range(10):
        c = (k + 0.5) / 10
        conf += [c] * 20
        ok += [i < round(c * 20) for i in range(20)]
    assert expected_calibration_error(torch.tensor(conf), torch.tensor(ok)) == pytest.approx(0.0, abs=1e-6)
    # calibrated in expectation: right with probability = confidence
    g = torch.Generator().manual_seed(0)
    c = torch.rand(200_000, generator=g, dtype=torch.float64)
    right = torch.rand(200_000, generator=g, dtype=torch.float64) < c
    assert expected_calibration_error(c, right) < 0.005
    # always confident and wrong: 100 %
    preds, labels = torch.zeros(50, dtype=torch.long), torch.ones(50, dtype=torch.long)
    m = accuracy_metrics(preds, labels, [None] * 50, torch.ones(50))
    assert m["top1"] == 0.0 and m["ece"] == pytest.approx(100.0)
    m = accuracy_metrics(preds, labels, [None] * 50, torch.full((50,), 0.999))
    assert m["ece"] == pytest.approx(99.9) and m["confidence"] == pytest.approx(99.9)
    # underconfident and right: confidence below top-1 (ECE alone has no sign)
    m = accuracy_metrics(labels, labels, [None] * 50, torch.full((50,), 0.3))
    assert m["top1"] == 100.0 and m["confidence"] == pytest.approx(30.0) and m["ece"] == pytest.approx(70.0)
    # always right at confidence 1: 0; no samples: 0, as top-1
    assert expected_calibration_error(torch.ones(7), torch.ones(7, dtype=torch.bool)) == 0.0
    assert expected_calibration_error(torch.ones(0), torch.ones(0, dtype=torch.bool)) == 0.0
    assert "ece" not in accuracy_metrics(preds, labels, [None] * 50)  # no confidences, no ece


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error(torch.tensor([0.5, 1.5]), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="expected"):
        expected_calibration_error(torch.tensor([0.5, 0.6]), torch.tensor([1, 0, 1]))
    with pytest.raises(ValueError, match="bins"):
        expected_calibration_error(torch.tensor([0.5]), torch.tensor([1]), bins=0)


# --- evaluate_sets on a tiny model ---------------------------------------------------------------


@pytest.fixture(scope="module")
def clip(tiny_clip):
    torch.manual_seed(0)
    return build_clip(str(tiny_clip), None)


def _features(model, es) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) normalised image features and (N,) labels of a set, in loader order."""
    feats, labels = [], []
    with torch.no_grad():
        for batch in es.loader:
            feats.append(model.encode_image(batch["image"], normalize=True).float())
            labels.append(batch["label"])
    return torch.cat(feats), torch.cat(labels)


def _expected(logits: torch.Tensor, labels: torch.Tensor, scale: float) -> tuple[float, float]:
    """top1 from the argmax of `logits`, ECE (%) from the softmax of scale * logits: by hand."""
    pred = logits.argmax(dim=1)
    probs = (scale * logits).softmax(dim=1)
    conf = [float(probs[i, pred[i]]) for i in range(len(pred))]
    correct = (pred == labels).tolist()
    return 100.0 * sum(correct) / len(correct), 100.0 * reference_ece(conf, correct)


def test_zero_shot_sets_get_ece_from_the_scaled_cosines(image_data, clip):
    model, preprocess, tokenizer = clip
    val = load_image_set(
        DataSpec(path=str(image_data["val"]), classes=str(image_data["classes_a"]), name="val"), "simple"
    )
    groups = load_image_set(
        DataSpec(
            path=str(image_data["groups_b"]),
            classes=str(image_data["classes_b"]),
            name="groups_b",
            group_prompts="a photo of a {c} in the {g}.",
        ),
        "simple",
    )
    sets = make_eval_sets([val, groups], preprocess, 5, None)  # 16 and 8 images: a short last batch
    m = evaluate_sets(model, tokenizer, sets)
    scale = float(model.logit_scale.detach().exp())
    assert scale > 1.5  # the softmax of the cosines alone would be near uniform
    for es in sets:
        s = es.image_set
        head = zero_shot_head(model, tokenizer, s.classes, head_templates(s))
        feats, labels = _features(model, es)
        top1, ece = _expected(feats @ head.T, labels, scale)
        got = m[s.name]
        assert got["top1"] == pytest.approx(top1) and got["n"] == len(s)
        assert got["ece"] == pytest.approx(ece, abs=1e-4)
        assert abs(got["ece"] - _expected(feats @ head.T, labels, 1.0)[1]) > 1.0  # not the bare cosines
    assert "worst_group" in m["groups_b"] and "ece" in m["groups_b"]
    assert json.loads(json.dumps(m)) == m  # metrics.json-ready


def _subset_csv(tmp_path: Path, image_data, keep: dict[int, int]) -> Path:
    rows = []
    for row in csv.DictReader(image_data["train"].open()):
        y = int(row["label"])
        if y in keep:
            rows.append({"path": str(image_data["root"] / row["path"]), "label": keep[y]})
    out = tmp_path / "subset.csv"
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, ["path", "label"])
        w.writeheader()
        w.writerows(rows)
    return out


def test_a_trained_head_and_a_projected_set_use_their_logits(tmp_path, image_data, clip):
    """ft: the head's logits as they are (no extra scale); a class_map set: the softmax over the projected
    logits (the set's own classes)."""
    model, preprocess, tokenizer = clip
    base = load_image_set(DataSpec(path=str(image_data["train"]), classes=CLASSES_A, name="train"), "simple")
    path = _subset_csv(tmp_path, image_data, {3: 0, 1: 1, 2: 2})
    sub = load_image_set(DataSpec(path=str(path), classes=["star", "square", "tri"], name="sub"), "simple")
    resolve_class_map(sub, base, [3, 1, 2])
    torch.manual_seed(1)
    head = nn.Linear(32, 4)
    with torch.no_grad():
        head.weight.mul_(20.0)
    sets = make_eval_sets([base, sub], preprocess, 7, None)
    m = evaluate_sets(model, tokenizer, sets, None, head, CLASSES_A)
    with torch.no_grad():
        feats, labels = _features(model, sets[0])
        top1, ece = _expected(head(feats), labels, 1.0)
        assert m["train"]["top1"] == pytest.approx(top1) and m["train"]["ece"] == pytest.approx(ece, abs=1e-4)
        feats, labels = _features(model, sets[1])
        top1, ece = _expected(project_logits(head(feats), sub.class_map), labels, 1.0)
        assert m["sub"]["top1"] == pytest.approx(top1) and m["sub"]["ece"] == pytest.approx(ece, abs=1e-4)
    # zero-shot on the projected set: the logit scale times the projected cosines
    m = evaluate_sets(model, tokenizer, make_eval_sets([sub], preprocess, 7, None))
    zs = zero_shot_head(model, tokenizer, CLASSES_A[1:], head_templates(sub))  # classes 1..3, as used
    top1, ece = _expected(
        project_logits(feats @ zs.T, [[2], [0], [1]]), labels, float(model.logit_scale.detach().exp())
    )
    assert m["sub"]["top1"] == pytest.approx(top1) and m["sub"]["ece"] == pytest.approx(ece, abs=1e-4)


# --- two processes: ECE over the gathered set, padding dropped -------------------------------------

EVAL_SCRIPT = r"""
import json, sys
import torch
from accelerate import Accelerator
from trainer.config import DataSpec
from trainer.data.sets import load_image_set
from trainer.evaluate import evaluate_sets, make_eval_sets
from trainer.model import build_clip

torch.set_num_threads(1)
model_json, csv_path, classes, out = sys.argv[1:5]
acc = Accelerator(cpu=True)
torch.manual_seed(0)
clip, preprocess, tokenizer = build_clip(model_json, None)
s = load_image_set(DataSpec(path=csv_path, classes=classes, name="val"), "simple")
m = evaluate_sets(clip, tokenizer, make_eval_sets([s], preprocess, 3, acc), acc)
if acc.is_main_process:
    json.dump({"processes": acc.num_processes, "metrics": m}, open(out, "w"))
# As `trainer run` ends: a gloo group left to the interpreter's exit can abort the process ("terminate
# called without an active exception", seen once in CI).
acc.wait_for_everyone()
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_two_processes_give_the_one_process_ece(tmp_path, tiny_clip, image_data):
    """16 images, batches of 3 on 2 processes: the last round is padded; gather_for_metrics drops it."""
    from tests.trainer.test_distributed import _launch, _wait  # its launcher: torchrun, gloo on CPU

    script = tmp_path / "eval.py"
    script.write_text(EVAL_SCRIPT)
    args = [str(tiny_clip), str(image_data["val"]), str(image_data["classes_a"])]
    procs = [_launch([str(script), *args, str(tmp_path / f"{k}.json")], k) for k in (1, 2)]
    for p in procs:
        _wait(p)
    one, two = (json.loads((tmp_path / f"{k}.json").read_text()) for k in (1, 2))
    assert (one["processes"], two["processes"]) == (1, 2)
    a, b = one["metrics"]["val"], two["metrics"]["val"]
    assert a["n"] == b["n"] == 16
    assert b["top1"] == pytest.approx(a["top1"]) and b["ece"] == pytest.approx(a["ece"], abs=1e-4)
