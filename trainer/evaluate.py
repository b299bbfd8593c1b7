"""Zero-shot evaluation: heads from the current text encoder, top-1 overall and per group, and calibration.

    from trainer.evaluate import evaluate_sets; metrics = evaluate_sets(clip, tokenizer, sets, accelerator)

For a set with groups: per-group accuracy, the worst group, the mean of the worst 3, and the mean over
groups. Group keys are 'class/group' (Waterbirds-style) or the raw group column (`group_by: group`).
A set whose classes map onto the training classes (`ImageSet.class_map`: ImageNet-R/-A's 200 of 1000,
ObjectNet's 113) is scored by projecting the training-class logits onto its classes (the max over the
training classes each of its classes maps to), for a trained head and for the zero-shot text head alike.

Every set also gets `ece`: the expected calibration error (%, 10 equal-width bins, L1;
`expected_calibration_error`), and `confidence` (the mean of the same confidences, %; against top1 it
says whether the model is over- or underconfident), of the softmax of the logits its prediction is the
argmax of. Those logits are, for the zero-shot text head, the model's logit scale times the cosine
similarities (CLIP's logits); for a trained linear head (method ft), the head's logits (its weights carry
the scale). For a set scored by projection (`class_map`), the softmax is over the projected logits, i.e. over the set's own classes:
the confidence is that of the prediction among the classes the set can be right about, from the same
distribution the prediction is the argmax of (as CaRot, which projects before the softmax); not the
training-class softmax summed or maxed over each class's members. The prediction itself is the argmax
of the unscaled logits as before, so top-1 is unchanged; the scale only enters the confidences.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from open_clip import build_zero_shot_classifier
from torch import nn
from torch.utils.data import DataLoader

from trainer.data import Collate, ImageDataset, ImageSet, head_templates
from trainer.model import TrimmedText

Classifier = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def zero_shot_head(
    clip: nn.Module, tokenizer: Callable, classes: list[str], templates: list[Callable], accelerator=None
) -> torch.Tensor:
    """(C, D) normalised class embeddings: template-averaged text features of each class name (the text
    tower on each batch's longest prompt where exact, in the accelerator's autocast when given)."""
    device = next(clip.parameters()).device
    was_training = clip.training
    clip.eval()
    with accelerator.autocast() if accelerator is not None else torch.autocast("cpu", enabled=False):
        weights = build_zero_shot_classifier(
            TrimmedText(clip),
            tokenizer,
            classes,
            templates,
            num_classes_per_batch=max(1, 1024 // len(templates)),
            device=device,
        )  # (D, C)
    clip.train(was_training)
    return weights.T.float().contiguous()


def expected_calibration_error(
    probs_or_confidences: torch.Tensor, correct: torch.Tensor, bins: int = 10
) -> float:
    """Expected calibration error (L1, equal-width bins), as a fraction in [0, 1] (0.0 for no samples).

    Args:
        probs_or_confidences: (N,) each prediction's confidence (the probability given to the predicted
            class), or (N, C) class probabilities, whose row maximum is taken as the confidence.
        correct: (N,) bool or 0/1: whether each prediction is right.
        bins: the number of equal-width confidence bins over [0, 1].

    Returns:
        sum over bins b of |acc(b) - conf(b)| * n(b) / N, where acc(b) and conf(b) are the mean
        correctness and mean confidence of the n(b) samples in bin b (empty bins add nothing).

    Bin b (0-based) holds the confidences in (b/bins, (b+1)/bins]: right-inclusive, as Guo et al.'s
    reference (gpleiss/temperature_scaling: `conf > lo and conf <= hi`) and the loop binning of older
    torchmetrics; so a confidence of 1.0 is in the last bin. The first bin is closed, [0, 1/bins], so that
    every sample counts (Guo et al.'s drops an exact 0, which a softmax maximum never is). torchmetrics 1.x
    (`bucketize(..., right=True) - 1`, which CaRot's evaluation calls per batch) is left-inclusive instead,
    [lo, hi), with 1.0 in a bin of its own; the conventions differ only for confidences exactly on a
    boundary. Confidences are compared in float64 with the exact edges b/bins (a float32 0.3 is just
    above 0.3, so in (0.3, 0.4]). NaN confidences give NaN; confidences outside [0, 1] are an error.
    """
    conf = probs_or_confidences.detach()
    if conf.ndim == 2:
        conf = conf.amax(dim=1)
    conf = conf.to("cpu", torch.float64)
    ok = correct.detach().to("cpu", torch.float64)
    if conf.ndim != 1 or ok.shape != conf.shape:
        raise ValueError(
            f"expected (N,) or (N, C) confidences and (N,) correct, got {tuple(probs_or_confidences.shape)}"
            f" and {tuple(correct.shape)}"
        )
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    if bool(((conf < 0) | (conf > 1)).any()):
        raise ValueError("confidences must lie in [0, 1]")
    n = len(conf)
    if n == 0:
        return 0.0
    edges = torch.arange(1, bins, dtype=torch.float64) / bins  # the inner edges b/bins
    idx = torch.bucketize(conf, edges, right=False)  # edges[i-1] < conf <= edges[i]: (lo, hi]
    conf_sum = torch.bincount(idx, weights=conf, minlength=bins)
    acc_sum = torch.bincount(idx, weights=ok, minlength=bins)
    # n(b)/N * |acc_sum/n(b) - conf_sum/n(b)| = |acc_sum - conf_sum| / N; 0 for an empty bin
    return float((acc_sum - conf_sum).abs().sum() / n)


def accuracy_metrics(
    preds: torch.Tensor,
    labels: torch.Tensor,
    group_keys: list[str | None],
    confidences: torch.Tensor | None = None,
) -> dict[str, Any]:
    """top1 (in %), n, with `confidences` ((N,) the probability of each prediction) ece (in %, 10 bins) and
    confidence (the mean confidence, %: above top1 is overconfident, below is underconfident, which ECE
    alone does not say), and for grouped sets per_group, worst_group, worst3_mean, group_mean."""
    correct = (preds == labels).float()
    out: dict[str, Any] = {"top1": 100.0 * correct.mean().item() if len(correct) else 0.0, "n": len(correct)}
    if confidences is not None:
        out["ece"] = 100.0 * expected_calibration_error(confidences, correct)
        out["confidence"] = 100.0 * confidences.double().mean().item() if len(correct) else 0.0
    if any(k is not None for k in group_keys):
        accs: dict[str, float] = {}
        for key in sorted({k for k in group_keys if k is not None}):
            idx = torch.tensor([i for i, k in enumerate(group_keys) if k == key])
            accs[key] = 100.0 * correct[idx].mean().item()
        vals = sorted(accs.values())
        out.update(
            per_group=accs,
            worst_group=vals[0],
            worst3_mean=sum(vals[:3]) / len(vals[:3]),
            group_mean=sum(vals) / len(vals),
        )
    return out


def project_logits(logits: torch.Tensor, class_map: list[list[int]]) -> torch.Tensor:
    """(N, B) logits over the training classes -> (N, C): per class, the max over the classes it maps to."""
    width = max(len(m) for m in class_map)
    index = torch.tensor([m + [m[0]] * (width - len(m)) for m in class_map], device=logits.device)  # (C, K)
    return logits[:, index].amax(dim=-1)


def projected(classifier: Classifier, class_map: list[list[int]]) -> Classifier:
    """A classifier over the training classes, projected onto a set's classes."""
    return lambda f: project_logits(classifier(f), class_map)


class CropBorder:
    """Crop `pixels` off every side of a PIL image, then apply `transform` (picklable for workers)."""

    def __init__(self, pixels: int, transform: Callable):
        self.pixels, self.transform = pixels, transform

    def __call__(self, image):
        w, h = image.size
        p = self.pixels
        return self.transform(image.crop((p, p, w - p, h - p)) if w > 2 * p and h > 2 * p else image)


@dataclass
class EvalSet:
    """A set ready to evaluate: its data, its (prepared) loader, and optionally a trained head for it."""

    image_set: ImageSet
    loader: Any


def make_eval_sets(
    sets: list[ImageSet], preprocess: Callable, batch_size: int, accelerator, num_workers: int = 0
):
    out = []
    for s in sets:
        transform = CropBorder(s.crop_border, preprocess) if s.crop_border else preprocess
        loader = DataLoader(
            ImageDataset(s, transform),
            batch_size=batch_size,
            shuffle=False,
            collate_fn=Collate(),
            num_workers=num_workers,
        )
        out.append(EvalSet(s, accelerator.prepare(loader) if accelerator is not None else loader))
    return out


def cached_head(
    clip: nn.Module,
    tokenizer: Callable,
    classes: list[str],
    templates: list[Callable],
    accelerator=None,
    heads: dict[Any, torch.Tensor] | None = None,
) -> torch.Tensor:
    """`zero_shot_head`, built once per class set and template set in `heads` (one evaluation's: sets that
    share their prompts, as ImageNet, -Sketch and -V2 do, share one head)."""
    if heads is None:
        return zero_shot_head(clip, tokenizer, classes, templates, accelerator)
    key = (len(classes), tuple(t(c) for c in classes for t in templates))
    if key not in heads:
        heads[key] = zero_shot_head(clip, tokenizer, classes, templates, accelerator)
    return heads[key]


@torch.no_grad()
def evaluate_set(
    clip: nn.Module,
    tokenizer: Callable,
    es: EvalSet,
    accelerator,
    classifier: Callable[[torch.Tensor], torch.Tensor] | None = None,
    heads: dict[Any, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Top-1 and ECE of `clip` on one set; `classifier` maps normalised image features to logits (default:
    zero-shot, from `heads` when the same prompts were already embedded). The prediction is the argmax of
    the classifier's output; the confidences are the softmax of the logits: a given classifier's output as
    it is, the zero-shot head's cosines times the model's logit scale."""
    s = es.image_set
    scale = 1.0  # what multiplies the classifier's output before the softmax (confidences only)
    if classifier is None and s.class_map is not None and s.base_classes is not None:
        # the zero-shot head over the training classes this set maps to, projected onto its classes
        used = sorted({i for m in s.class_map for i in m})
        pos = {i: k for k, i in enumerate(used)}
        head = cached_head(
            clip, tokenizer, [s.base_classes[i] for i in used], head_templates(s), accelerator, heads
        )
        classifier = projected(lambda f: f.float() @ head.T, [[pos[i] for i in m] for m in s.class_map])
        scale = float(clip.logit_scale.detach().exp())
    elif classifier is None:
        head = cached_head(clip, tokenizer, s.classes, head_templates(s), accelerator, heads)
        classifier = lambda f: f.float() @ head.T
        scale = float(clip.logit_scale.detach().exp())
    was_training = clip.training
    clip.eval()
    preds, confs, labels, index = [], [], [], []
    for batch in es.loader:
        with accelerator.autocast() if accelerator is not None else torch.autocast("cpu", enabled=False):
            feats = clip.encode_image(batch["image"], normalize=True)
        logits = classifier(feats.float()).float()
        p = logits.argmax(dim=1)  # as before the confidences: top-1 is unchanged
        c = (scale * logits).softmax(dim=1).gather(1, p[:, None]).squeeze(1)  # (B,) probability of p
        if accelerator is not None:  # the whole set once: the last batch's padding dropped
            p, c, y, i = accelerator.gather_for_metrics((p, c, batch["label"], batch["index"]))
        else:
            y, i = batch["label"], batch["index"]
        preds.append(p.cpu())
        confs.append(c.cpu())
        labels.append(y.cpu())
        index.append(i.cpu())
    clip.train(was_training)
    idx = torch.cat(index)
    keys = s.group_keys()
    return accuracy_metrics(
        torch.cat(preds), torch.cat(labels), [keys[i] for i in idx.tolist()], torch.cat(confs)
    )


def evaluate_sets(
    clip: nn.Module,
    tokenizer: Callable,
    sets: list[EvalSet],
    accelerator=None,
    head: nn.Module | None = None,
    head_classes: list[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Metrics per set name (`accuracy_metrics`: top1, n, ece, groups). A trained `head` (method ft) serves
    sets whose classes are `head_classes`, and, projected, sets whose classes map onto them (`class_map`);
    its logits are also what the confidences are the softmax of."""
    out: dict[str, dict[str, Any]] = {}
    heads: dict[Any, torch.Tensor] = {}  # this evaluation's zero-shot heads, by prompts
    for es in sets:
        s, classifier = es.image_set, None
        if head is not None and s.class_map is not None and s.base_classes == head_classes:
            classifier = projected(head, s.class_map)
        elif head is not None and s.classes == head_classes:
            classifier = head  # its logits: the argmax predicts, their softmax gives the confidences
        out[es.image_set.name] = evaluate_set(clip, tokenizer, es, accelerator, classifier, heads)
    return out
