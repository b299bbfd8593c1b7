"""Regions, region embeddings and RaVL's region-aware loss.

.venv/bin/pytest -q tests/trainer/test_ravl.py
"""

from __future__ import annotations

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from trainer.ravl.loss import ravl_batch_loss, ravl_loss
from trainer.ravl.regions import class_embeddings, grid_boxes, read_boxes_csv, region_embeddings

TEXT_CFG = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}


@pytest.fixture(scope="module")
def tiny_vit():
    torch.manual_seed(0)
    vision = {
        "image_size": 32,
        "layers": 1,
        "width": 32,
        "patch_size": 8,
        "head_width": 16,
        "pool_type": "avg",
    }
    return open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=TEXT_CFG).eval()


@pytest.fixture(scope="module")
def tiny_resnet():
    torch.manual_seed(0)
    vision = {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8}
    return open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=TEXT_CFG).eval()


# --- regions --------------------------------------------------------------------------------


def test_grid_boxes_are_the_quadrants():
    b = grid_boxes(56, 56, 2, 2)
    assert b.tolist() == [[0, 0, 28, 28], [28, 0, 56, 28], [0, 28, 28, 56], [28, 28, 56, 56]]
    b = grid_boxes(10, 9, 2, 3)  # rows over height, cols over width, row-major
    assert b.shape == (6, 4) and b[0].tolist() == [0, 0, 3, 5] and b[-1].tolist() == [6, 5, 9, 10]
    with pytest.raises(ValueError):
        grid_boxes(8, 8, 0, 2)


def test_read_boxes_csv_resolves_paths(tmp_path):
    (tmp_path / "b.csv").write_text("path,x0,y0,x1,y1,content\nimg/a.png,0,0,4,4,x\nimg/a.png,4,0,8,4,y\n")
    boxes = read_boxes_csv(tmp_path / "b.csv")
    assert boxes == {str((tmp_path / "img/a.png").resolve()): [(0, 0, 4, 4), (4, 0, 8, 4)]}
    (tmp_path / "bad.csv").write_text("path,x0,y0\na.png,0,0\n")
    with pytest.raises(ValueError, match="x1"):
        read_boxes_csv(tmp_path / "bad.csv")


# --- region embeddings ----------------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["tiny_vit", "tiny_resnet"])
@pytest.mark.parametrize("mode", ["crop", "roi"])
def test_full_image_box_equals_encode_image(model_name, mode, request):
    """A box covering the whole input is the image itself, in both modes and both tower types."""
    model = request.getfixturevalue(model_name)
    S = model.visual.image_size if isinstance(model.visual.image_size, int) else model.visual.image_size[0]
    x = torch.randn(2, 3, S, S, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        emb, idx = region_embeddings(model, x, grid=(1, 1), mode=mode, normalize=False)
        ref = model.encode_image(x)
    assert idx.tolist() == [0, 1]
    torch.testing.assert_close(emb, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["crop", "roi"])
def test_region_embeddings_shapes_boxes_and_grad(tiny_vit, mode):
    x = torch.randn(3, 3, 32, 32, requires_grad=True)
    emb, idx = region_embeddings(tiny_vit, x, grid=(2, 2), mode=mode)
    assert emb.shape == (12, 32) and idx.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(12))
    emb.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # per-image boxes of different counts, and (K, 5) rows, give the same regions
    per_image = [torch.tensor([[0.0, 0, 16, 16]]), torch.tensor([[16.0, 0, 32, 16], [0, 16, 16, 32]])]
    e1, i1 = region_embeddings(tiny_vit, x[:2].detach(), boxes=per_image, mode=mode)
    rows = torch.tensor([[0.0, 0, 0, 16, 16], [1, 16, 0, 32, 16], [1, 0, 16, 16, 32]])
    e2, i2 = region_embeddings(tiny_vit, x[:2].detach(), boxes=rows, mode=mode)
    assert i1.tolist() == i2.tolist() == [0, 1, 1]
    torch.testing.assert_close(e1, e2)
    g, _ = region_embeddings(tiny_vit, x[:2].detach(), grid=(2, 2), mode=mode)
    torch.testing.assert_close(e1, g[[0, 5, 6]], atol=1e-5, rtol=1e-4)


def test_roi_mode_rejects_unknown_tower():
    class Tower(torch.nn.Module):
        pass

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = Tower()

    with pytest.raises(NotImplementedError, match="crop"):
        region_embeddings(Model(), torch.zeros(1, 3, 8, 8), mode="roi")
    with pytest.raises(ValueError, match="mode"):
        region_embeddings(Model(), torch.zeros(1, 3, 8, 8), mode="pool")  # type: ignore[arg-type]


def test_class_embeddings_average_templates(tiny_vit):
    tok = open_clip.SimpleTokenizer(context_length=16)
    with torch.no_grad():
        e = class_embeddings(tiny_vit, tok, ["cat", "dog"], ["a photo of a {}.", "{}"])
        a = F.normalize(tiny_vit.encode_text(tok(["a photo of a cat.", "cat"])), dim=-1).mean(0)
    assert e.shape == (2, 32)
    torch.testing.assert_close(e[0], F.normalize(a, dim=0), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError):
        class_embeddings(tiny_vit, tok, ["cat"], ["a photo"])


# --- the loss: a literal per-sample reference -----------------------------------------------


def reference_loss(region_emb, region_image, spurious, labels, class_emb, tau, reduction="sum"):
    """The paper's formulas written out one image at a time, in float64."""
    f = F.normalize(region_emb.double(), dim=-1)
    g = F.normalize(class_emb.double(), dim=-1)
    B = len(labels)
    classes = sorted(set(labels.tolist()))  # distinct labels of the batch
    regions = [[r for r in range(len(f)) if region_image[r] == i and not spurious[r]] for i in range(B)]
    spur = [r for r in range(len(f)) if spurious[r]]

    def sigma(r, c):
        return torch.exp(f[r] @ g[c] / tau)

    def sigma_m(rs, c):  # exp(max ...) ; an empty set gives 0
        return torch.exp(max(f[r] @ g[c] for r in rs) / tau) if rs else torch.zeros((), dtype=torch.float64)

    penalty = sum((max(sigma(r, c) for c in classes) for r in spur), torch.zeros((), dtype=torch.float64))
    lr, la = [], []
    for i in range(B):
        if not regions[i]:
            continue
        y = int(labels[i])
        num = sigma_m(regions[i], y)
        den_r = sum(sigma_m(regions[i], c) for c in classes) + penalty
        den_a = num + sum(sigma_m(regions[j], y) for j in range(B) if int(labels[j]) != y)
        den_a = den_a + sum((sigma(r, y) for r in spur), torch.zeros((), dtype=torch.float64))
        lr.append(-torch.log(num / den_r))
        la.append(-torch.log(num / den_a))
    red = (lambda v: torch.stack(v).mean()) if reduction == "mean" else (lambda v: torch.stack(v).sum())
    return red(lr), red(la)


def random_batch(seed, B=6, C=4, D=8, max_regions=4):
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, max_regions + 1, (B,), generator=gen)
    region_image = torch.repeat_interleave(torch.arange(B), counts)
    R = len(region_image)
    spurious = torch.rand(R, generator=gen) < 0.3
    spurious[region_image == 0] = True  # image 0 has no non-spurious region
    labels = torch.randint(0, C - 1, (B,), generator=gen)  # class C-1 never present; labels repeat
    emb = torch.randn(R, D, generator=gen, dtype=torch.float64) * 3
    cls = torch.randn(C, D, generator=gen, dtype=torch.float64)
    return emb, region_image, spurious, labels, cls


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_matches_per_sample_reference(seed, reduction):
    emb, img, sp, y, cls = random_batch(seed)
    out = ravl_loss(emb, img, sp, y, cls, tau=0.07, reduction=reduction)
    ref_r, ref_a = reference_loss(emb, img, sp, y, cls, 0.07, reduction)
    torch.testing.assert_close(out["region_loss"], ref_r, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(out["align_loss"], ref_a, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(out["reg_loss"], ref_r + ref_a, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("seed", range(4))
def test_sum_and_mean_reductions_relate_exactly_by_the_batch_size(seed):
    """The paper's Σ_i (the default) is n times the mean over the n contributing images; with every image
    contributing n is the batch size B, so (1 − λ) weighs B times more against the (mean) CLIP loss."""
    emb, img, sp, y, cls = random_batch(seed)
    first = torch.ones_like(sp)
    first[1:] = img[1:] != img[:-1]
    sp = sp & ~first  # every image keeps its first region non-spurious: n = B
    B = len(y)
    total = ravl_loss(emb, img, sp, y, cls)  # default: sum
    mean = ravl_loss(emb, img, sp, y, cls, reduction="mean")
    assert total["n_images"].item() == mean["n_images"].item() == B
    for k in ("region_loss", "align_loss", "reg_loss"):
        torch.testing.assert_close(total[k], B * mean[k], atol=1e-10, rtol=1e-12)
    # the gradients relate by the same factor, so sum at λ equals mean at λ' = λ / (λ + B (1 − λ)) up to scale
    a, b = emb.clone().requires_grad_(True), emb.clone().requires_grad_(True)
    ravl_loss(a, img, sp, y, cls)["reg_loss"].backward()
    ravl_loss(b, img, sp, y, cls, reduction="mean")["reg_loss"].backward()
    torch.testing.assert_close(a.grad, B * b.grad, atol=1e-10, rtol=1e-10)
    lam, lc = 0.8, torch.tensor(2.5, dtype=torch.float64)
    lam_mean = lam / (lam + B * (1 - lam))
    paper = lam * lc + (1 - lam) * total["reg_loss"]
    scaled = (lam + B * (1 - lam)) * (lam_mean * lc + (1 - lam_mean) * mean["reg_loss"])
    torch.testing.assert_close(paper, scaled, atol=1e-10, rtol=1e-12)


def test_sum_is_n_times_mean_when_an_image_is_skipped():
    emb, img, sp, y, cls = random_batch(5)  # image 0 has only spurious regions: n = B − 1
    total, mean = ravl_loss(emb, img, sp, y, cls), ravl_loss(emb, img, sp, y, cls, reduction="mean")
    n = total["n_images"].item()
    assert n == len(y) - 1
    torch.testing.assert_close(total["reg_loss"], n * mean["reg_loss"], atol=1e-10, rtol=1e-12)
    with pytest.raises(ValueError, match="reduction"):
        ravl_loss(emb, img, sp, y, cls, reduction="max")


def test_loss_gradient_matches_reference():
    emb, img, sp, y, cls = random_batch(3)
    a = emb.clone().requires_grad_(True)
    b = emb.clone().requires_grad_(True)
    ravl_loss(a, img, sp, y, cls)["reg_loss"].backward()
    sum(reference_loss(b, img, sp, y, cls, 0.07)).backward()
    assert torch.isfinite(a.grad).all()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-8, rtol=1e-6)


def test_loss_hand_computed_two_images():
    """Two images, one region each, no spurious region, orthonormal embeddings; τ = 1."""
    e = torch.eye(2)
    cls = torch.eye(2)  # region i matches class i exactly: cosine 1 with its class, 0 with the other
    out = ravl_loss(e, torch.tensor([0, 1]), torch.tensor([False, False]), torch.tensor([0, 1]), cls, tau=1.0)
    expected = -math.log(math.e / (math.e + 1))  # both L_R and L_A reduce to a 2-way softmax here
    assert out["region_loss"].item() == pytest.approx(2 * expected)  # summed over the two images
    assert out["align_loss"].item() == pytest.approx(2 * expected)
    # a spurious region matching class 0 enters P (for both images) and L_A of image 0 only
    e3 = torch.cat([e, torch.tensor([[1.0, 0.0]])])
    out = ravl_loss(
        e3, torch.tensor([0, 1, 1]), torch.tensor([False, False, True]), torch.tensor([0, 1]), cls, 1.0
    )
    lr0 = -math.log(math.e / (math.e + 1 + math.e))
    lr1 = -math.log(math.e / (1 + math.e + math.e))
    la0 = -math.log(math.e / (math.e + 1 + math.e))
    la1 = -math.log(math.e / (math.e + 1 + 1))
    assert out["region_loss"].item() == pytest.approx(lr0 + lr1)  # the paper's Σ_i
    assert out["align_loss"].item() == pytest.approx(la0 + la1)


# --- the choices where the paper is silent --------------------------------------------------


def test_choice_embeddings_are_normalised():
    emb, img, sp, y, cls = random_batch(1)
    a = ravl_loss(emb, img, sp, y, cls)["reg_loss"]
    b = ravl_loss(emb * torch.rand(len(emb), 1, dtype=emb.dtype) * 5, img, sp, y, 7 * cls)["reg_loss"]
    torch.testing.assert_close(a, b)


def test_choice_repeated_labels_count_once_in_L_R():
    """Adding an image of an already present class (no spurious region) leaves the others' L_R alone."""
    emb, img, sp, y, cls = random_batch(2)
    sp[:] = False
    base = ravl_loss(emb, img, sp, y, cls, reduction="sum")
    new = torch.randn(2, emb.shape[1], dtype=emb.dtype)
    emb2 = torch.cat([emb, new])
    img2 = torch.cat([img, torch.tensor([len(y), len(y)])])
    y2 = torch.cat([y, y[:1]])
    more = ravl_loss(emb2, img2, torch.cat([sp, torch.tensor([False, False])]), y2, cls, reduction="sum")
    own = reference_loss(emb2, img2, torch.cat([sp, torch.tensor([False, False])]), y2, cls, 0.07, "sum")
    torch.testing.assert_close(more["region_loss"], own[0])
    # L_R of the original images is unchanged: the sum grows exactly by the new image's own term
    f = F.normalize(new, dim=-1) @ F.normalize(cls, dim=-1).T / 0.07
    m = f.amax(0)
    present = sorted(set(y.tolist()))
    own_new = -(m[y[0]] - torch.logsumexp(m[present], 0))
    torch.testing.assert_close(more["region_loss"] - base["region_loss"], own_new)


def test_choice_image_without_non_spurious_region_is_skipped():
    emb, img, sp, y, cls = random_batch(4)
    assert sp[img == 0].all()
    out = ravl_loss(emb, img, sp, y, cls)
    assert out["n_images"].item() == len(y) - 1
    # its spurious regions still count: dropping them from the batch changes the others' losses
    keep = img != 0
    out2 = ravl_loss(emb[keep], img[keep] - 1, sp[keep], y[1:], cls)
    assert not torch.allclose(out["reg_loss"], out2["reg_loss"])


def test_choice_all_spurious_batch_gives_attached_zero():
    emb = torch.randn(4, 8, requires_grad=True)
    out = ravl_loss(
        emb,
        torch.tensor([0, 0, 1, 1]),
        torch.ones(4, dtype=torch.bool),
        torch.tensor([0, 1]),
        torch.randn(2, 8),
    )
    assert out["reg_loss"].item() == 0.0 and out["n_images"].item() == 0
    out["reg_loss"].backward()
    assert emb.grad is not None and torch.all(emb.grad == 0)


def test_loss_pushes_spurious_regions_away_from_classes():
    """One gradient step on the spurious region lowers its similarity to the classes (the penalty's aim)."""
    gen = torch.Generator().manual_seed(0)
    cls = F.normalize(torch.randn(3, 16, generator=gen), dim=-1)
    emb = torch.randn(5, 16, generator=gen)
    emb[4] = cls[1] + 0.1 * emb[4]  # a spurious region close to class 1
    emb.requires_grad_(True)
    img, sp, y = (
        torch.tensor([0, 0, 1, 2, 2]),
        torch.tensor([False, False, False, False, True]),
        torch.tensor([0, 1, 2]),
    )
    ravl_loss(emb, img, sp, y, cls)["reg_loss"].backward()
    before = F.normalize(emb[4], dim=-1) @ cls[1]
    after = F.normalize(emb[4] - 0.5 * emb.grad[4], dim=-1) @ cls[1]
    assert after < before


def test_batch_loss_composes_regions_and_loss(tiny_vit):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 32, 32, generator=gen)
    spurious = torch.tensor([[0, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    labels, cls = torch.tensor([0, 1, 1]), torch.randn(2, 32, generator=gen)
    out = ravl_batch_loss(tiny_vit, x, spurious, labels, cls, grid=(2, 2), mode="roi")
    emb, img = region_embeddings(tiny_vit, x, grid=(2, 2), mode="roi")
    ref = ravl_loss(emb, img, spurious.flatten(), labels, cls)
    torch.testing.assert_close(out["reg_loss"], ref["reg_loss"])
    assert out["n_images"].item() == 2
    with pytest.raises(ValueError, match="grid"):
        ravl_batch_loss(tiny_vit, x, spurious[:, :2], labels, cls)
