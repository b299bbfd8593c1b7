"""Loss functions of the trainer: pure tensor functions, no torch.distributed inside.

    from trainer.losses import star_loss; reg = star_loss(x, s, x0, s0, labels, teacher_scale)

The training step gathers features across processes (with gradient) and calls these on the global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

_CLIP_LOSS = ClipLoss()  # single-process open_clip loss: callers pass already-gathered features


def clip_loss(
    image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """Symmetric CLIP contrastive loss (FLYP's L_C) over normalised (N, D) features.

    Args:
        image, text: (N, D) l2-normalised image and caption embeddings; row i of each is a pair.
        logit_scale: scalar, the exp'd temperature (s = 1/tau).
        labels: None for open_clip's arange targets (only the diagonal is positive). With (N,) labels,
            every pair of the same label (same caption) is a positive: soft targets spread uniformly over
            them, so identical captions of one class are not pushed apart as negatives.
    """
    if labels is None:
        return _CLIP_LOSS(image, text, logit_scale)
    return soft_clip_loss(image, text, logit_scale, labels[:, None] == labels[None, :])


def soft_clip_loss(
    image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor | float, positives: torch.Tensor
) -> torch.Tensor:
    """Symmetric CLIP loss with several positives per row: soft targets spread uniformly over them.

    Args:
        image, text: (N, D) l2-normalised embeddings.
        logit_scale: scalar s (exp'd temperature).
        positives: (N, N) bool, true diagonal; positives[i, j]: caption j describes image i (need not be
            symmetric: the text-to-image direction uses its transpose).
    """
    logits = logit_scale * image.float() @ text.float().T
    same = positives.float()
    target_i = same / same.sum(1, keepdim=True)
    target_t = same.T / same.T.sum(1, keepdim=True)
    loss_i = -(target_i * F.log_softmax(logits, dim=1)).sum(1).mean()
    loss_t = -(target_t * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    return (loss_i + loss_t) / 2


def _masked_log_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # Masked entries become -inf in float32; a fully masked row is zeroed first so it is not NaN (its
    # values are unused). Every later use replaces masked entries, so no inf/NaN reaches a gradient.
    logits = logits.float().masked_fill(mask, float("-inf"))
    full = mask.all(dim=1, keepdim=True)
    logits = torch.where(full, torch.zeros_like(logits), logits)
    return torch.log_softmax(logits, dim=1)


def star_loss(
    student_image: torch.Tensor,
    student_spurious_text: torch.Tensor,
    teacher_image: torch.Tensor,
    teacher_spurious_text: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: torch.Tensor | float,
    mask_same_label: bool = True,
) -> torch.Tensor:
    """StarFT's spurious textual alignment regulariser L_Star (eq. 1-2 of the paper).

    z_ij = s * x_i . s_j for the student (x, s) and the teacher (x~, s~). Pairs with c(j) = c(i), the
    diagonal included, are removed before a row-wise softmax; L = (1/N) sum_i KL(q~_i || q_i). A row
    whose every column shares its label contributes 0. Computed in float32 (fp16/bf16-safe).

    Args:
        student_image: (N, D) normalised image embeddings of the model being trained.
        student_spurious_text: (N, D) normalised embeddings of the spurious captions S_j, same model.
        teacher_image: (N, D) the frozen zero-shot model's image embeddings (no gradient needed).
        teacher_spurious_text: (N, D) the frozen model's embeddings of the same S_j.
        labels: (N,) integer class labels c(i).
        logit_scale: scalar s used for both matrices; StarFT uses the teacher's.
        mask_same_label: False gives the unmasked KL (the paper's ablation, method `kl`).
    Returns:
        A scalar tensor.
    """
    n = student_image.shape[0]
    if mask_same_label:
        mask = labels[:, None] == labels[None, :]
    else:
        mask = torch.zeros(n, n, dtype=torch.bool, device=labels.device)
    scale = torch.as_tensor(logit_scale, dtype=torch.float32, device=student_image.device)
    log_q = _masked_log_softmax(scale * student_image.float() @ student_spurious_text.float().T, mask)
    with torch.no_grad():
        log_p = _masked_log_softmax(scale * teacher_image.float() @ teacher_spurious_text.float().T, mask)
        p = torch.where(mask, torch.zeros_like(log_p), log_p.exp())
        log_p = torch.where(mask, torch.zeros_like(log_p), log_p)
    log_q = torch.where(mask, torch.zeros_like(log_q), log_q)
    kl = (p * (log_p - log_q)).sum(dim=1)  # rows with every entry masked sum to exactly 0
    return kl.sum() / n


# --- the robust fine-tuning baselines (trainer.baselines) ---------------------------------------------


def lipsum_loss(
    student_image: torch.Tensor,
    teacher_image: torch.Tensor,
    random_text: torch.Tensor,
    logit_scale: torch.Tensor | float,
) -> torch.Tensor:
    """Lipsum-FT's energy-gap regulariser: how far the fine-tuned image features move in the directions of
    random texts, measured in scaled logits.

    R = (1/N) Σ_i (1/(2M)) Σ_m (s⟨f_i, t_m⟩ − s⟨f0_i, t_m⟩)², in float32.

    Args:
        student_image: (N, D) normalised image features of the model being trained.
        teacher_image: (N, D) the frozen pretrained model's features of the same (augmented) images.
        random_text: (M, D) normalised features of M random token sequences (frozen text tower).
        logit_scale: scalar s (the pretrained model's exp'd scale, 100 for OpenAI CLIP), fixed.
    """
    s = torch.as_tensor(logit_scale, dtype=torch.float32, device=student_image.device)
    t = random_text.float()
    gap = s * student_image.float() @ t.T - s * teacher_image.float().detach() @ t.T  # (N, M)
    return gap.pow(2).mean(dim=1).div(2).mean()


def orthogonality_loss(projection: torch.Tensor) -> torch.Tensor:
    """CaRot's orthogonality constraint on the visual projection: ‖WᵀW − I‖_F (Frobenius norm, not squared).

    Args:
        projection: (D_in, D) the image tower's output projection W (open_clip's `visual.proj`); WᵀW is
            (D, D), compared with the (D, D) identity.
    """
    w = projection.float()
    gram = w.T @ w
    return torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], device=w.device), ord="fro")


def self_distillation_loss(
    student_image: torch.Tensor,
    student_text: torch.Tensor,
    student_scale: torch.Tensor | float,
    teacher_image: torch.Tensor,
    teacher_text: torch.Tensor,
    teacher_scale: torch.Tensor | float,
) -> torch.Tensor:
    """CaRot's self-distillation: the student's image-text logits matched to an averaged teacher's.

    T = s_ψ u_ψ v_ψᵀ (no gradient), S = s_θ u_θ v_θᵀ over the batch's N image-caption pairs;
    L = mean_i −Σ_j softmax(T)_ij log softmax(S)_ij  +  the same over columns (text → image); the two
    directions are added, not averaged. Float32.

    Args:
        student_image, student_text: (N, D) normalised features of the model being trained.
        student_scale: its exp'd logit scale (with gradient when it trains).
        teacher_image, teacher_text: (N, D) the teacher's normalised features of the same batch.
        teacher_scale: the teacher's own exp'd logit scale.
    """
    s = torch.as_tensor(student_scale, device=student_image.device).float()
    logits = s * student_image.float() @ student_text.float().T
    with torch.no_grad():
        t = torch.as_tensor(teacher_scale, device=teacher_image.device).float()
        target = t * teacher_image.float() @ teacher_text.float().T
        p_rows, p_cols = target.softmax(dim=1), target.T.softmax(dim=1)
    image_to_text = -(p_rows * logits.log_softmax(dim=1)).sum(1).mean()
    text_to_image = -(p_cols * logits.T.log_softmax(dim=1)).sum(1).mean()
    return image_to_text + text_to_image


def context_kl_loss(
    student_image: torch.Tensor,
    teacher_image: torch.Tensor,
    contexts: torch.Tensor,
    logit_scale: torch.Tensor | float,
    direction: str = "forward",
) -> torch.Tensor:
    """CAR-FT's context regulariser: the KL between the frozen and the fine-tuned model's distributions over
    prompt contexts, p(x) = softmax(s f(x)ᵀ W_ctx).

    direction "forward": (1/N) Σ_i KL(p0_i ‖ pθ_i) (the zero-shot distribution is the target);
    "reverse": KL(pθ_i ‖ p0_i). Float32.

    Args:
        student_image: (N, D) normalised image features of the model being trained.
        teacher_image: (N, D) the frozen model's features of the same images.
        contexts: (K, D) one normalised embedding per prompt context (template), from the frozen text tower.
        logit_scale: scalar s (temperature 1/s).
        direction: forward | reverse.
    """
    s = torch.as_tensor(logit_scale, dtype=torch.float32, device=student_image.device)
    w = contexts.float()
    log_q = (s * student_image.float() @ w.T).log_softmax(dim=1)
    with torch.no_grad():
        log_p = (s * teacher_image.float() @ w.T).log_softmax(dim=1)
    if direction == "forward":
        kl = (log_p.exp() * (log_p - log_q)).sum(dim=1)
    else:
        kl = (log_q.exp() * (log_q - log_p)).sum(dim=1)
    return kl.mean()
