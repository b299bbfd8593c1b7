"""RaVL's regions: candidate boxes, region embeddings (crop or RoIAlign), class prompt embeddings.

    from trainer.ravl.regions import grid_boxes, region_embeddings
    emb, img = region_embeddings(model, images, grid=(2, 2), mode="crop")  # (R, D), (R,)

RaVL (Varma et al., NeurIPS 2024) decomposes every image into candidate regions, embeds each region
with the VLM's image encoder and, during fine-tuning, adds the region-aware loss L_R + L_A of its
section 4.1 / appendix C. The model interface is open_clip's: `encode_image`, `encode_text` and, for
RoI pooling, a `visual` tower that is a `VisionTransformer` or a `ModifiedResNet`.

Choices where the paper is silent (each one is tested in tests/trainer/test_ravl.py):
- Normalisation: region and class embeddings are L2-normalised, so <f(a), g(b)> is a cosine
  similarity (the issue's reading of the paper) and τ plays the role of CLIP's temperature.
- Batch reduction: the paper sums L_R^i + L_A^i over the batch, and so does the default
  (`reduction="sum"`); `reduction="mean"` averages over the images that contribute. trainer/ravl/loss.py's
  docstring says how λ relates between the two.
- Labels repeated in a batch: the "Σ over ŷ_j ∈ B" of L_R runs over the *distinct* classes present in
  the batch (a softmax over the batch's classes plus the penalty P), so a class that appears twice is
  not counted twice; the max in P also runs over the distinct classes. L_A's sum runs over the other
  *images* j whose label differs from ŷ_i, as the paper writes it (j = 1..|B|, ŷ_j ≠ ŷ_i).
- An image with no non-spurious region (R_i^r empty, e.g. every region assigned to the spurious
  cluster): σ_m over an empty set is 0, so such an image adds no L_R^i / L_A^i term (it would be
  −log 0) and adds nothing to other images' L_A sums; its spurious regions still enter R_B^s. When no
  image of the batch contributes, the loss is a zero that stays attached to the graph.
- RoI embedding: ModifiedResNet follows RegionCLIP (RoIAlign on the stride-16 map, then layer4 and
  the attention pool per region); ViT RoI-pools its patch tokens after `ln_post` and `proj`, i.e. dense
  features in the joint space. Crop mode crops and bilinearly resizes the (already normalised) input
  tensor to the model's input size, which equals normalising a resized crop.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer
from torch import Tensor
from torchvision.ops import roi_align

Mode = Literal["crop", "roi"]
Boxes = Tensor | Sequence[Tensor]


# --- regions --------------------------------------------------------------------------------


def grid_boxes(height: int, width: int, rows: int = 2, cols: int = 2) -> Tensor:
    """Equal-size grid cells of an image as (rows*cols, 4) float boxes x0, y0, x1, y1, row-major.

    Cell edges are rounded to whole pixels, so a 2×2 grid of a 56×56 image gives its quadrants exactly.
    """
    if rows < 1 or cols < 1:
        raise ValueError(f"grid must be at least 1x1, got {rows}x{cols}")
    ys = [round(i * height / rows) for i in range(rows + 1)]
    xs = [round(j * width / cols) for j in range(cols + 1)]
    cells = [(xs[j], ys[i], xs[j + 1], ys[i + 1]) for i in range(rows) for j in range(cols)]
    return torch.tensor(cells, dtype=torch.float32)


def read_boxes_csv(path: str | Path) -> dict[str, list[tuple[float, float, float, float]]]:
    """Boxes per image from a CSV with columns path,x0,y0,x1,y1 (others ignored).

    Relative image paths are resolved against the CSV's folder; the keys are resolved path strings.
    """
    path = Path(path)
    out: dict[str, list[tuple[float, float, float, float]]] = {}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = {"path", "x0", "y0", "x1", "y1"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: boxes CSV lacks column(s) {', '.join(sorted(missing))}")
        for row in reader:
            p = Path(row["path"])
            key = str(p if p.is_absolute() else (path.parent / p).resolve())
            box = tuple(float(row[k]) for k in ("x0", "y0", "x1", "y1"))
            if not (box[2] > box[0] and box[3] > box[1]):
                raise ValueError(f"{path}: empty box {box} for {row['path']}")
            out.setdefault(key, []).append(box)  # type: ignore[arg-type]
    return out


def _rois(boxes: Boxes, n_images: int, device: torch.device) -> Tensor:
    """Boxes in any accepted form -> (K, 5) rows of (image index, x0, y0, x1, y1)."""
    if isinstance(boxes, Tensor) and boxes.dim() == 2 and boxes.shape[1] == 5:
        return boxes.to(device=device, dtype=torch.float32)
    if isinstance(boxes, Tensor) and boxes.dim() == 2 and boxes.shape[1] == 4:
        boxes = [boxes] * n_images  # the same boxes (e.g. a grid) for every image
    if len(boxes) != n_images:
        raise ValueError(f"got boxes for {len(boxes)} images, but {n_images} images")
    rows = []
    for i, b in enumerate(boxes):
        b = torch.as_tensor(b, dtype=torch.float32, device=device).reshape(-1, 4)
        rows.append(torch.cat([torch.full((len(b), 1), float(i), device=device), b], dim=1))
    return torch.cat(rows) if rows else torch.zeros(0, 5, device=device)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)  # DDP / accelerate wrappers


def region_embeddings(
    model: torch.nn.Module,
    images: Tensor,
    boxes: Boxes | None = None,
    grid: tuple[int, int] = (2, 2),
    mode: Mode = "crop",
    normalize: bool = True,
    batch_size: int = 256,
) -> tuple[Tensor, Tensor]:
    """Embed regions of preprocessed images with the model's image encoder.

    Runs under the caller's grad mode, so it serves both discovery (wrap in `torch.no_grad()`) and the
    region-aware loss (gradients reach the image encoder).

    Args:
        model: open_clip-like model; `encode_image` for crop mode, `.visual` for RoI mode.
        images: (B, 3, H, W) tensors already through the model's transform.
        boxes: per image (R_i, 4) boxes x0, y0, x1, y1 in pixels of `images`; one (R, 4) tensor shared by
            all images; or (K, 5) rows (image index, x0, y0, x1, y1). None: the equal `grid` (rows, cols).
        mode: "crop" resizes each box to the input size and encodes it; "roi" pools the tower's
            feature map (RoIAlign), one forward pass per image.
        normalize: L2-normalise the embeddings.
        batch_size: crops encoded per forward pass (crop mode).

    Returns:
        (K, D) embeddings and (K,) long image index of each region, in box order.
    """
    B, _, H, W = images.shape
    if boxes is None:
        boxes = grid_boxes(H, W, *grid)
    rois = _rois(boxes, B, images.device)
    img_idx = rois[:, 0].long()
    if len(rois) == 0:
        raise ValueError("no regions to embed")
    if mode == "crop":
        # roi_align with one output cell per input pixel is a bilinear crop-and-resize; sampling_ratio=-1
        # averages several samples per cell when a box is larger than the input (anti-aliasing).
        chunks = []
        for s in range(0, len(rois), batch_size):
            crops = roi_align(images, rois[s : s + batch_size], (H, W), 1.0, -1, aligned=True)
            chunks.append(model.encode_image(crops))
        emb = torch.cat(chunks)
    elif mode == "roi":
        emb = _roi_embeddings(_unwrap(model).visual, images, rois)
    else:
        raise ValueError(f"mode must be 'crop' or 'roi', got {mode!r}")
    return (F.normalize(emb, dim=-1) if normalize else emb), img_idx


def _roi_embeddings(visual: torch.nn.Module, images: Tensor, rois: Tensor) -> Tensor:
    H = images.shape[-1]
    if isinstance(visual, ModifiedResNet):
        x = visual.stem(images)
        x = visual.layer3(visual.layer2(visual.layer1(x)))  # stride 16
        side = visual.attnpool.positional_embedding.shape[0] - 1
        side = round(side**0.5)
        # RegionCLIP: RoIAlign on the res4 map at twice the pool's side, then res5 and attention pool.
        pooled = roi_align(x, rois, (2 * side, 2 * side), x.shape[-1] / H, -1, aligned=True)
        return visual.attnpool(visual.layer4(pooled))
    if isinstance(visual, VisionTransformer):
        if visual.attn_pool is not None:
            raise NotImplementedError(
                "RoI pooling of attention-pooled ViTs is not supported; use mode='crop'"
            )
        if visual.training and not isinstance(visual.patch_dropout, torch.nn.Identity):
            raise NotImplementedError("patch dropout breaks the token grid; use mode='crop'")
        x = visual.transformer(visual._embeds(images))
        tokens = x[:, 1:]  # drop the class token; the tower's only prefix token
        tokens = visual.ln_post(tokens) @ visual.proj  # dense features in the joint space
        gh, gw = visual.grid_size
        fmap = tokens.transpose(1, 2).reshape(len(images), -1, gh, gw)
        return roi_align(fmap, rois, (1, 1), gw / H, -1, aligned=True).flatten(1)
    raise NotImplementedError(
        f"RoI pooling supports open_clip VisionTransformer and ModifiedResNet towers, not "
        f"{type(visual).__name__}; use mode='crop'"
    )


# --- text side ------------------------------------------------------------------------------


def class_embeddings(model, tokenizer, classnames: Sequence[str], templates: Sequence[str]) -> Tensor:
    """(C, D) template-averaged class text embeddings, L2-normalised (CLIP's zero-shot head).

    Each template holds `{c}` (trainer's templates) or `{}` for the class name; every prompt is normalised
    before averaging, then the mean again.
    """
    if not templates or any("{c}" not in t and "{}" not in t for t in templates):
        raise ValueError("templates must be non-empty and each must hold '{c}' (or '{}')")
    device = next(_unwrap(model).parameters()).device
    prompts = [t.replace("{c}", c).replace("{}", c) for c in classnames for t in templates]
    emb = F.normalize(model.encode_text(tokenizer(prompts).to(device)), dim=-1)
    emb = emb.reshape(len(classnames), len(templates), -1).mean(1)
    return F.normalize(emb, dim=-1)
