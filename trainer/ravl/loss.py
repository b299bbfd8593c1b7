"""RaVL's region-aware loss L_R + L_A (sec. 4.1 / appendix C of the paper): a pure function of embeddings.

    from trainer.ravl.loss import ravl_loss; out = ravl_loss(regions, image_of, spurious, labels, class_emb)

The choices where the paper is silent (normalisation, repeated labels, images with no non-spurious region)
are listed in trainer/ravl/regions.py's docstring and tested in tests/trainer/test_ravl.py.

Batch reduction. The paper sums over the batch, L = λ·L_CL + (1 − λ)·Σ_i (L_R^i + L_A^i), and so does
`reduction="sum"` (the default). `reduction="mean"` averages over the n contributing images instead
(n = B when every image has a non-spurious region), so sum = n·mean exactly. The CLIP loss is itself a
batch mean, so with the sum the region terms weigh n times more: at the paper's λ 0.8 and batch 128 the
region term carries (1 − λ)·128/λ = 32× the weight of L_CL. A mean-reduced run with weight λ' has the same
balance (up to the overall scale of the loss, which AdamW all but ignores) as the summed run with
    λ' = λ / (λ + n·(1 − λ))        e.g. λ 0.8, n 128  ->  λ' = 0.8 / 26.4 ≈ 0.030,
and conversely a mean run at λ' equals a summed run at λ = n·λ' / (n·λ' + 1 − λ').
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.ravl.regions import Mode, region_embeddings


def ravl_loss(
    region_emb: Tensor,
    region_image: Tensor,
    spurious: Tensor,
    labels: Tensor,
    class_emb: Tensor,
    tau: float = 0.07,
    reduction: Literal["mean", "sum"] = "sum",
) -> dict[str, Tensor]:
    """RaVL's region-aware loss L_R + L_A (paper sec. 4.1, appendix C) for one batch.

    With z(a, c) = <f(a), g(c)> / τ (cosine similarity), m_i(c) = max over i's non-spurious regions
    of z(a, c), and S the spurious regions of the batch:
        L_R^i = −m_i(ŷ_i) + log( Σ_{c ∈ classes(B)} e^{m_i(c)} + Σ_{r ∈ S} max_{c ∈ classes(B)} e^{z(r, c)} )
        L_A^i = −m_i(ŷ_i) + log( e^{m_i(ŷ_i)} + Σ_{j: ŷ_j ≠ ŷ_i} e^{m_j(ŷ_i)} + Σ_{r ∈ S} e^{z(r, ŷ_i)} )
    computed with logsumexp. The trainer combines it as L = λ·L_CL + (1 − λ)·reg_loss (paper: λ = 0.8).
    See the module docstring for the choices where the paper is silent.

    Args:
        region_emb: (R, D) region embeddings f(a) of all regions of the batch (normalised here).
        region_image: (R,) long, index in [0, B) of the image each region belongs to.
        spurious: (R,) bool, True for regions in R^s (assigned to the discovered cluster).
        labels: (B,) long class index ŷ_i of each image.
        class_emb: (C, D) class prompt embeddings g(c) (normalised here); usually from a frozen text encoder.
        tau: temperature τ.
        reduction: "sum" over contributing images (the paper's Σ_i), or "mean" (sum / n, see the module
            docstring for how λ relates between the two).

    Returns:
        {"region_loss": L_R, "align_loss": L_A, "reg_loss": L_R + L_A, "n_images": contributing images}.
    """
    B, C = len(labels), len(class_emb)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if region_emb.shape[0] != region_image.shape[0] or region_emb.shape[0] != spurious.shape[0]:
        raise ValueError("region_emb, region_image and spurious must have the same length R")
    spurious = spurious.bool()
    z = F.normalize(region_emb, dim=-1) @ F.normalize(class_emb, dim=-1).T / tau  # (R, C)

    # m[i, c]: best non-spurious region of image i for class c; -inf when image i has none.
    keep = ~spurious
    m = z.new_full((B, C), float("-inf"))
    m = m.scatter_reduce(0, region_image[keep, None].expand(-1, C), z[keep], reduce="amax", include_self=True)

    present = torch.zeros(C, dtype=torch.bool, device=z.device)
    present[labels] = True
    zs = z[spurious]  # (S, C)
    pos = m[torch.arange(B, device=z.device), labels]  # (B,) log σ_m(R_i^r, ŷ_i)
    valid = torch.isfinite(pos)
    n = int(valid.sum())
    if n == 0:  # nothing to pull together; keep the graph so a backward pass still works
        zero = z.sum() * 0.0
        return {"region_loss": zero, "align_loss": zero, "reg_loss": zero, "n_images": torch.tensor(0)}

    vi = valid.nonzero().squeeze(1)
    # L_R: softmax over the distinct classes of the batch, plus the penalty P of the spurious regions.
    penalty = zs[:, present].amax(1) if len(zs) else z.new_zeros(0)  # (S,) log-terms of P
    terms_r = torch.cat([m[vi][:, present], penalty.expand(len(vi), -1)], dim=1)
    loss_r = torch.logsumexp(terms_r, dim=1) - pos[vi]

    # L_A: image i's positive against other-label images' best regions and all spurious regions, for ŷ_i.
    li = labels[vi]
    cross = m[:, li]  # (B, n): cross[j, k] = m_j(ŷ_{vi[k]})
    cross = cross.masked_fill(labels[:, None] == li[None, :], float("-inf"))  # same label (and j = i)
    terms_a = torch.cat([pos[vi][None, :], cross, zs[:, li]], dim=0)  # (1 + B + S, n)
    loss_a = torch.logsumexp(terms_a, dim=0) - pos[vi]

    reduce = torch.mean if reduction == "mean" else torch.sum
    lr, la = reduce(loss_r), reduce(loss_a)
    return {"region_loss": lr, "align_loss": la, "reg_loss": lr + la, "n_images": torch.tensor(n)}


def ravl_batch_loss(
    model: torch.nn.Module,
    images: Tensor,
    spurious: Tensor,
    labels: Tensor,
    class_emb: Tensor,
    grid: tuple[int, int] = (2, 2),
    mode: Mode = "roi",
    tau: float = 0.07,
    reduction: Literal["mean", "sum"] = "sum",
) -> dict[str, Tensor]:
    """`ravl_loss` for a training batch whose images share one region grid.

    Args:
        images: (B, 3, H, W) preprocessed batch; gradients reach the image encoder.
        spurious: (B, rows*cols) bool, per image and grid cell (row-major) whether it lies in the
            discovered cluster, e.g. from `discover.assign_dataset` before training.
        labels: (B,) class index per image; class_emb: (C, D) frozen class prompt embeddings.
    """
    n_cells = grid[0] * grid[1]
    if spurious.shape != (len(images), n_cells):
        raise ValueError(
            f"spurious must be (B, {n_cells}) for a {grid[0]}x{grid[1]} grid, got {tuple(spurious.shape)}"
        )
    emb, img = region_embeddings(model, images, grid=grid, mode=mode)
    return ravl_loss(emb, img, spurious.reshape(-1).to(emb.device), labels, class_emb, tau, reduction)
