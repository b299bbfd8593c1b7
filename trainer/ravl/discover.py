"""RaVL discovery: which image regions a fine-tuned VLM has learned to correlate spuriously with a class.

    from trainer.ravl.discover import DiscoverConfig, discover, read_rows, save_report
    report = discover(model, preprocess, tokenizer, read_rows("eval.csv", classes), classes, DiscoverConfig())

Steps (issue 6; RaVL, NeurIPS 2024, sec. 3.1 and appendix D.1):
1. regions: an equal grid of each image, or boxes from a CSV (path,x0,y0,x1,y1);
2. embed each region with the image encoder (crop and resize through the model's transform, or RoI
   pooling), L2-normalise;
3. k-medoids on cosine distance (FasterPAM, or RaVL's own choice: alternating k-medoids from a seeded
   k-medoids++ start), k in [2C, 5C) chosen by silhouette;
4. zero-shot classify images and regions: template-averaged class prompts, softmax at temperature 0.07;
5. per cluster and class, the performance gap w·(acc with a region in the cluster − acc without),
   w = 2·min(n_in, n_out)/(n_in + n_out), and the influence score (errors whose region scoring highest
   for the predicted class lies in the cluster);
6. keep clusters with a positive and a negative gap and influence ≥ 0.25, rank by Σ|gap|; within a
   cluster rank regions by similarity to the medoid.

The math of steps 3-6 is `discover_from_arrays`, which takes embeddings and zero-shot probabilities
directly. trainer/ravl/report.py renders a report and hands its features to descgen as a new bank version.

Choices the paper leaves open (facts about RaVL's code from Stanford-AIMI/RaVL, ravl/discover*.py):
- Distance is 1 − cosine, kept in [0, 2] (RaVL's code clips it at 1); FasterPAM with a seeded random
  init by default. `clustering: alternate` is RaVL's algorithm (sklearn_extra's KMedoids defaults:
  alternating "k-means-style" k-medoids, k-medoids++ init, random_state 0, at most 300 iterations), with
  our own k-medoids++ seeding, so the medoids need not equal sklearn_extra's draw for draw. The first k
  with the best silhouette wins, as in RaVL.
- Above `max_cluster_regions` regions a seeded sample is clustered and every region goes to its nearest
  medoid, which is also how `assign_regions` places new regions, so a report is self-contained.
- A cluster with no misclassified image to judge has influence None (RaVL: −inf) and is dropped.
- Crop mode crops the original image and runs the crop through the model's own transform; RoI mode maps
  boxes through open_clip's eval geometry (shortest side resized, centre crop), exact for square images.
- Features are named by the candidate phrases nearest to the cluster's medoid embedding.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import kmedoids
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from trainer.ravl.regions import class_embeddings, grid_boxes, read_boxes_csv, region_embeddings

REPORT_VERSION = 1
DEFAULT_TEMPLATES = ("a photo of a {c}.", "a photo of the {c}.", "an image of a {c}.")

Box = tuple[float, float, float, float]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DiscoverConfig(_Frozen):
    """Settings of one discovery run; stored in the report."""

    grid: tuple[int, int] = Field((2, 2), description="rows, cols of the equal grid (when no boxes CSV)")
    boxes_csv: str | None = Field(None, description="CSV path,x0,y0,x1,y1 of candidate regions")
    mode: Literal["crop", "roi"] = "crop"
    clustering: Literal["fasterpam", "alternate"] = Field(
        "fasterpam", description="k-medoids algorithm: FasterPAM, or alternating from k-medoids++ (RaVL's)"
    )
    templates: tuple[str, ...] = DEFAULT_TEMPLATES  # each holds {c} (or {}) for the class name
    temperature: float = 0.07
    k_min: int | None = Field(None, description="smallest k tried; default 2C")
    k_max: int | None = Field(None, description="k tried up to k_max - 1; default 5C")
    min_influence: float = 0.25
    max_cluster_regions: int = Field(
        6000,
        description="cluster a seeded sample of at most this many regions (distance matrix is n²); "
        "every region is then assigned to its nearest medoid",
    )
    seed: int = 0
    batch_size: int = 64  # images per forward pass
    n_cpu: int = -1  # threads for kmedoids (-1: all)


class RegionRecord(_Frozen):
    id: int
    image: int  # index into Report.images
    box: Box  # pixels of the original image
    cluster: int


class ImageRecord(_Frozen):
    path: str
    label: int
    pred: int


class ClassGap(_Frozen):
    """One row of a cluster's gap table."""

    label: int
    n_in: int  # images of this class with a region in the cluster
    acc_in: float
    n_out: int
    acc_out: float
    weight: float  # 2·min(n_in, n_out)/(n_in + n_out)
    gap: float  # weight · (acc_in − acc_out)


class ClusterStats(_Frozen):
    cluster: int
    medoid: int  # region id
    size: int  # regions
    n_images: int  # images with a region in the cluster
    gaps: list[ClassGap]
    gap_score: float  # Σ |gap|
    influence: float | None  # None: no misclassified image of a negative-gap class to judge
    influence_by_class: dict[int, float]
    kept: bool


class Feature(_Frozen):
    """A discovered spurious feature: a kept cluster, ranked."""

    rank: int  # 0 = top
    cluster: int
    gap_score: float
    influence: float
    region_ids: list[int]  # every region of the cluster, most similar to the medoid first


class Report(_Frozen):
    version: int = REPORT_VERSION
    classnames: list[str]
    config: DiscoverConfig
    image_accuracy: float
    k: int
    silhouette: dict[int, float]  # k -> mean silhouette
    medoid_embeddings: list[list[float]]  # (k, D), normalised; what `assign_regions` needs
    images: list[ImageRecord]
    regions: list[RegionRecord]
    clusters: list[ClusterStats]
    features: list[Feature]


# --- data -----------------------------------------------------------------------------------


def read_rows(csv_path: str | Path, classnames: Sequence[str]) -> list[tuple[str, int]]:
    """(resolved path, label index) per row of a path,label[,...] CSV; label is an index or a class name."""
    csv_path = Path(csv_path)
    out = []
    with csv_path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not {"path", "label"} <= set(reader.fieldnames or []):
            raise ValueError(f"{csv_path}:1: header must have columns path,label")
        for n, row in enumerate(reader, start=2):
            raw = row["label"].strip()
            y = (
                int(raw)
                if raw.lstrip("-").isdigit()
                else (classnames.index(raw) if raw in classnames else -1)
            )
            if not 0 <= y < len(classnames):
                raise ValueError(f"{csv_path}:{n}: label {raw!r} is not a class index or name")
            p = Path(row["path"])
            out.append((str(p if p.is_absolute() else (csv_path.parent / p).resolve()), y))
    return out


def _map_box(box: Box, size: tuple[int, int], side: int) -> Box:
    """A box of the original image in the coordinates of open_clip's eval transform (resize the shortest
    side to `side`, centre crop), clipped to the crop."""
    W, H = size
    s = side / min(W, H)
    ox, oy = (W * s - side) / 2, (H * s - side) / 2
    x0, y0, x1, y1 = (box[0] * s - ox, box[1] * s - oy, box[2] * s - ox, box[3] * s - oy)
    return (max(0.0, x0), max(0.0, y0), min(float(side), x1), min(float(side), y1))


@torch.no_grad()
def embed_dataset(
    model, preprocess: Callable, rows: Sequence[tuple[str, int]], cfg: DiscoverConfig
) -> tuple[torch.Tensor, torch.Tensor, list[Box], torch.Tensor]:
    """Region embeddings (R, D), their image index (R,), their boxes, and image embeddings (N, D)."""
    boxes_by_path = read_boxes_csv(cfg.boxes_csv) if cfg.boxes_csv else None
    device = next(getattr(model, "module", model).parameters()).device
    was_training = model.training
    model.eval()
    reg, reg_img, reg_boxes, img_emb = [], [], [], []
    try:
        for start in range(0, len(rows), cfg.batch_size):
            batch = rows[start : start + cfg.batch_size]
            full, crops, rois = [], [], []
            for i, (path, _) in enumerate(batch, start=start):
                with Image.open(path) as im:
                    im = im.convert("RGB")
                    if boxes_by_path is not None:
                        if path not in boxes_by_path:
                            raise ValueError(f"{cfg.boxes_csv}: no boxes for {path}")
                        boxes = boxes_by_path[path]
                    else:
                        boxes = [tuple(b) for b in grid_boxes(im.height, im.width, *cfg.grid).tolist()]
                    x = preprocess(im)
                    full.append(x)
                    for b in boxes:
                        reg_img.append(i)
                        reg_boxes.append(tuple(float(v) for v in b))
                        if cfg.mode == "crop":
                            crops.append(preprocess(im.crop(tuple(round(v) for v in b))))
                        else:
                            rois.append((i - start, *_map_box(b, im.size, x.shape[-1])))
            images = torch.stack(full).to(device)
            img_emb.append(F.normalize(model.encode_image(images), dim=-1).float().cpu())
            if cfg.mode == "crop":
                for s in range(0, len(crops), 4 * cfg.batch_size):
                    part = torch.stack(crops[s : s + 4 * cfg.batch_size]).to(device)
                    reg.append(F.normalize(model.encode_image(part), dim=-1).float().cpu())
            else:
                e, _ = region_embeddings(model, images, boxes=torch.tensor(rois), mode="roi")
                reg.append(e.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(reg), torch.tensor(reg_img), reg_boxes, torch.cat(img_emb)


# --- steps 3-6 ------------------------------------------------------------------------------


def kmedoids_pp_init(diss: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """k-medoids++ seeding (the k-means++ rule on a dissimilarity matrix): the first medoid uniformly at
    random, each next one drawn with probability proportional to its squared distance to the nearest
    medoid chosen so far, keeping the best of 2 + ⌊ln k⌋ draws (the one lowering the total cost most).
    Returns k distinct indices."""
    n = len(diss)
    rng = np.random.default_rng(seed)
    trials = 2 + int(np.log(k))
    medoids = [int(rng.integers(n))]
    nearest = diss[medoids[0]].astype(np.float64) ** 2
    for _ in range(1, k):
        total = nearest.sum()
        if total <= 0:  # every point sits on a medoid: take unused points in order
            rest = np.setdiff1d(np.arange(n), medoids)
            medoids.append(int(rest[0]))
            continue
        cand = rng.choice(n, size=trials, p=nearest / total)
        costs = [np.minimum(nearest, diss[c].astype(np.float64) ** 2).sum() for c in cand]
        best = int(cand[int(np.argmin(costs))])
        if best in medoids:  # a zero-distance draw cannot happen, but keep the medoids distinct
            best = int(np.setdiff1d(np.arange(n), medoids)[0])
        medoids.append(best)
        nearest = np.minimum(nearest, diss[best].astype(np.float64) ** 2)
    return np.asarray(medoids, dtype=np.int64)


def kmedoids_fit(diss: np.ndarray, k: int, method: str = "fasterpam", seed: int = 0, n_cpu: int = -1):
    """One k-medoids fit on a dissimilarity matrix: `kmedoids.fasterpam` (seeded random init) or
    `kmedoids.alternating` from `kmedoids_pp_init` (RaVL's choice); returns the kmedoids result."""
    if method == "fasterpam":
        return kmedoids.fasterpam(diss, k, random_state=seed, n_cpu=n_cpu)
    if method == "alternate":
        return kmedoids.alternating(diss, kmedoids_pp_init(diss, k, seed), max_iter=300)
    raise ValueError(f"clustering must be 'fasterpam' or 'alternate', got {method!r}")


def cluster_regions(
    emb: np.ndarray,
    k_values: Iterable[int],
    seed: int = 0,
    max_regions: int = 6000,
    n_cpu: int = -1,
    method: str = "fasterpam",
) -> tuple[np.ndarray, np.ndarray, int, dict[int, float]]:
    """k-medoids (`method`: fasterpam or alternate, see `kmedoids_fit`) on cosine distance, k chosen by
    silhouette.

    Returns (cluster of every region, medoid region indices, chosen k, silhouette per k). With more
    than `max_regions` regions a seeded sample is clustered; all regions then go to the nearest medoid.
    The first k with the highest silhouette wins, as in RaVL's code.
    """
    emb = np.asarray(emb, dtype=np.float32)
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-12)
    R = len(emb)
    rng = np.random.default_rng(seed)
    fit = np.arange(R) if R <= max_regions else np.sort(rng.choice(R, max_regions, replace=False))
    x = emb[fit]
    diss = np.clip(1.0 - x @ x.T, 0.0, None)  # cosine distance in [0, 2]
    np.fill_diagonal(diss, 0.0)
    ks = [k for k in k_values if 2 <= k < len(fit)]
    if not ks:
        raise ValueError(f"no usable k among {list(k_values)} for {len(fit)} regions")
    best: tuple[float, int, Any] | None = None
    scores: dict[int, float] = {}
    for k in ks:
        res = kmedoids_fit(diss, k, method, seed, n_cpu)
        s = float(kmedoids.silhouette(diss, np.asarray(res.labels, dtype=np.int64), n_cpu=n_cpu)[0])
        scores[k] = s
        if best is None or s > best[0]:
            best = (s, k, res)
    assert best is not None
    medoids = fit[np.asarray(best[2].medoids, dtype=np.int64)]
    labels = np.argmax(emb @ emb[medoids].T, axis=1)
    return labels, medoids, best[1], scores


def performance_gaps(
    in_cluster: np.ndarray, labels: np.ndarray, preds: np.ndarray, n_classes: int
) -> list[ClassGap]:
    """Gap table of one cluster; `in_cluster[i]` says image i has a region in it. Classes with images
    only on one side are left out."""
    rows = []
    for y in range(n_classes):
        of_y = labels == y
        a, b = of_y & in_cluster, of_y & ~in_cluster
        n_in, n_out = int(a.sum()), int(b.sum())
        if n_in == 0 or n_out == 0:
            continue
        acc_in, acc_out = float((preds[a] == y).mean()), float((preds[b] == y).mean())
        w = 2 * min(n_in, n_out) / (n_in + n_out)
        rows.append(
            ClassGap(
                label=y,
                n_in=n_in,
                acc_in=acc_in,
                n_out=n_out,
                acc_out=acc_out,
                weight=w,
                gap=w * (acc_in - acc_out),
            )
        )
    return rows


def influence_score(
    region_in_cluster: np.ndarray,
    region_image: np.ndarray,
    labels: np.ndarray,
    preds: np.ndarray,
    region_probs: np.ndarray,
    gaps: Sequence[ClassGap],
) -> tuple[float | None, dict[int, float]]:
    """Cluster influence: for each class with a negative gap, the fraction of its misclassified images
    with a region in the cluster (single-region images skipped) whose region scoring highest for the
    predicted class is in the cluster; the score is the maximum over classes (None if none qualifies)."""
    negative = {g.label for g in gaps if g.gap < 0}
    hits: dict[int, list[bool]] = {}
    for i in np.unique(region_image[region_in_cluster]):
        y, p = int(labels[i]), int(preds[i])
        if y == p or y not in negative:
            continue
        regs = np.flatnonzero(region_image == i)
        if len(regs) < 2:
            continue
        best = regs[np.argmax(region_probs[regs, p])]
        hits.setdefault(y, []).append(bool(region_in_cluster[best]))
    by_class = {y: float(np.mean(h)) for y, h in sorted(hits.items())}
    return (max(by_class.values()) if by_class else None), by_class


def discover_from_arrays(
    region_emb: np.ndarray | torch.Tensor,
    region_image: np.ndarray | torch.Tensor,
    labels: np.ndarray | Sequence[int],
    image_probs: np.ndarray | torch.Tensor,
    region_probs: np.ndarray | torch.Tensor,
    classnames: Sequence[str],
    cfg: DiscoverConfig | None = None,
    paths: Sequence[str] | None = None,
    boxes: Sequence[Box] | None = None,
) -> Report:
    """Steps 3-6 on given embeddings and zero-shot probabilities.

    Args:
        region_emb: (R, D) region embeddings.
        region_image: (R,) image index of each region, in [0, N).
        labels: (N,) true class of each image.
        image_probs: (N, C) zero-shot class probabilities of each image (prediction = argmax).
        region_probs: (R, C) zero-shot class probabilities of each region.
        classnames: the C class names.
        paths, boxes: image paths (N) and region boxes (R), carried into the report.
    """
    cfg = cfg or DiscoverConfig()
    emb = _np(region_emb).astype(np.float32)
    region_image = _np(region_image).astype(np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    image_probs, region_probs = _np(image_probs), _np(region_probs)
    C, N = len(classnames), len(labels)
    preds = image_probs.argmax(1)
    k_values = range(cfg.k_min or 2 * C, cfg.k_max or 5 * C)
    clusters, medoids, k, sil = cluster_regions(
        emb, k_values, cfg.seed, cfg.max_cluster_regions, cfg.n_cpu, cfg.clustering
    )
    emb_n = emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-12)

    stats, features = [], []
    for c in range(k):
        members = clusters == c
        in_image = np.zeros(N, dtype=bool)
        in_image[region_image[members]] = True
        gaps = performance_gaps(in_image, labels, preds, C)
        infl, by_class = influence_score(members, region_image, labels, preds, region_probs, gaps)
        kept = (
            any(g.gap > 0 for g in gaps)
            and any(g.gap < 0 for g in gaps)
            and infl is not None
            and infl >= cfg.min_influence
        )
        stats.append(
            ClusterStats(
                cluster=c,
                medoid=int(medoids[c]),
                size=int(members.sum()),
                n_images=int(in_image.sum()),
                gaps=gaps,
                gap_score=float(sum(abs(g.gap) for g in gaps)),
                influence=infl,
                influence_by_class=by_class,
                kept=kept,
            )
        )
    kept = sorted((s for s in stats if s.kept), key=lambda s: (-s.gap_score, s.cluster))
    for rank, s in enumerate(kept):
        ids = np.flatnonzero(clusters == s.cluster)
        sim = emb_n[ids] @ emb_n[s.medoid]
        order = ids[np.argsort(-sim, kind="stable")]
        features.append(
            Feature(
                rank=rank,
                cluster=s.cluster,
                gap_score=s.gap_score,
                influence=float(s.influence),
                region_ids=[int(r) for r in order],
            )
        )

    paths = list(paths) if paths is not None else [f"image-{i}" for i in range(N)]
    boxes = list(boxes) if boxes is not None else [(0.0, 0.0, 0.0, 0.0)] * len(emb)
    return Report(
        classnames=list(classnames),
        config=cfg,
        image_accuracy=float((preds == labels).mean()) if N else 0.0,
        k=k,
        silhouette=sil,
        medoid_embeddings=emb_n[medoids].tolist(),
        images=[ImageRecord(path=p, label=int(y), pred=int(q)) for p, y, q in zip(paths, labels, preds)],
        regions=[
            RegionRecord(id=r, image=int(region_image[r]), box=tuple(boxes[r]), cluster=int(clusters[r]))
            for r in range(len(emb))
        ],
        clusters=stats,
        features=features,
    )


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


# --- the whole pipeline ---------------------------------------------------------------------


def zero_shot_probs(emb: torch.Tensor, text: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Softmax over classes of cosine similarity / temperature; (n, D) x (C, D) -> (n, C)."""
    return (F.normalize(emb.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T / temperature).softmax(-1)


def discover(
    model,
    preprocess: Callable,
    tokenizer: Callable,
    dataset_rows: Sequence[tuple[str, int]],
    classnames: Sequence[str],
    cfg: DiscoverConfig | None = None,
) -> Report:
    """RaVL discovery on a labelled evaluation set (rows of (image path, class index), see `read_rows`)."""
    cfg = cfg or DiscoverConfig()
    if not dataset_rows:
        raise ValueError("no images to discover on")
    reg_emb, reg_img, boxes, img_emb = embed_dataset(model, preprocess, dataset_rows, cfg)
    with torch.no_grad():
        text = class_embeddings(model, tokenizer, classnames, cfg.templates).float().cpu()
    return discover_from_arrays(
        reg_emb,
        reg_img,
        [y for _, y in dataset_rows],
        zero_shot_probs(img_emb, text, cfg.temperature),
        zero_shot_probs(reg_emb, text, cfg.temperature),
        classnames,
        cfg,
        paths=[p for p, _ in dataset_rows],
        boxes=boxes,
    )


# --- using a report -------------------------------------------------------------------------


def save_report(report: Report, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(report.model_dump_json(indent=1) + "\n", encoding="utf-8")
    return path


def report_model_path(report_path: str | Path) -> Path:
    """`report.json` -> `report.model.json`: which model made the report (needed to assign regions)."""
    p = Path(report_path)
    return p.with_name(p.stem + ".model.json")


def load_report(path: str | Path) -> Report:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if data.get("version") != REPORT_VERSION:
        raise ValueError(f"{path}: report version {data.get('version')!r}, expected {REPORT_VERSION}")
    return Report.model_validate(data)


def assign_regions(report: Report, region_emb: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(R,) cluster id of each region embedding: its nearest medoid by cosine similarity."""
    e = F.normalize(torch.as_tensor(_np(region_emb), dtype=torch.float32), dim=-1)
    medoids = torch.tensor(report.medoid_embeddings, dtype=torch.float32)
    return (e @ medoids.T).argmax(1)


def spurious_mask(report: Report, region_emb: torch.Tensor | np.ndarray, top: int = 1) -> torch.Tensor:
    """(R,) bool: regions assigned to one of the `top` ranked features' clusters (the paper uses top 1)."""
    chosen = torch.tensor([f.cluster for f in report.features[:top]], dtype=torch.long)
    return torch.isin(assign_regions(report, region_emb), chosen)


def assign_dataset(
    report: Report, model, preprocess: Callable, rows: Sequence[tuple[str, int]], top: int = 1
) -> tuple[list[list[int]], list[list[bool]]]:
    """Per image of `rows`: the cluster of each region and whether it is spurious (in a `top` feature).

    Regions are made and embedded exactly as in the report's run (its grid or boxes CSV, crop or RoI),
    which is how RaVL labels a fine-tuning set before training with the region-aware loss. Region order
    per image is the grid's row-major order (or the boxes CSV's order).
    """
    emb, img, _, _ = embed_dataset(model, preprocess, rows, report.config)
    ids = assign_regions(report, emb).tolist()
    chosen = {f.cluster for f in report.features[:top]}
    clusters: list[list[int]] = [[] for _ in rows]
    for r, i in enumerate(img.tolist()):
        clusters[i].append(ids[r])
    return clusters, [[c in chosen for c in cs] for cs in clusters]


def feature_images(report: Report, feature: int = 0) -> list[bool]:
    """Per image: has a region in the feature's cluster (groups for upsampled fine-tuning baselines)."""
    out = [False] * len(report.images)
    if feature < len(report.features):
        c = report.features[feature].cluster
        for r in report.regions:
            if r.cluster == c:
                out[r.image] = True
    return out


def _key(path: str, box: Sequence[float]) -> tuple[str, tuple[float, ...]]:
    return str(path), tuple(round(float(v), 1) for v in box)


def precision_at_k(
    report: Report,
    gt: Callable[[str, Box], bool] | Iterable[tuple[str, Sequence[float]]],
    k: int = 10,
    feature: int = 0,
) -> float:
    """Fraction of the top-k regions of a feature that are ground-truth spurious regions.

    `gt` is a set of (image path, box) pairs or a predicate on them. No feature counts as 0; a cluster
    with fewer than k regions is scored on all of them.
    """
    if feature >= len(report.features):
        return 0.0
    if callable(gt):
        is_gt = gt
    else:
        keys = {_key(p, b) for p, b in gt}
        is_gt = lambda p, b: _key(p, b) in keys
    top = report.features[feature].region_ids[:k]
    if not top:
        return 0.0
    hits = [is_gt(report.images[report.regions[r].image].path, report.regions[r].box) for r in top]
    return sum(hits) / len(hits)
