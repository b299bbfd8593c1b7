"""One optimizer step's loss terms and gradients: the global batch's features, the method's objective and
extra term, and exact gradient accumulation.

    from trainer.step import compute_losses; terms = compute_losses(model, batch, spec, cfg, acc, teacher, s, lam)

`compute_losses` runs the student's one forward on a micro-batch, gathers features across processes with
gradient (as open_clip's ClipLoss does), takes the frozen teacher's features, and calls the pure loss
functions of trainer.losses. `backward_step` does that for the K micro-batches of one optimizer step so
that the gradient is the full batch's (open_clip's `accum_freq`): every micro-batch is embedded once
without gradient, then each is embedded again with gradient and the loss is taken against the whole
accumulated batch. The global batch is ordered micro-batch-major, then process-major.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed.nn
import torch.nn.functional as F

from trainer.config import TrainConfig
from trainer.losses import clip_loss
from trainer.methods import MethodSpec, StepContext
from trainer.model import encode_text, text_lengths, trims_text

Tensors = dict[str, torch.Tensor]
_TOKENS = ("image", "caption", "spurious")  # batch inputs that are not per-sample data a loss reads
CHUNK = 16  # rows a missing spurious caption is encoded with (a fixed shape: the same bits in any batch)


class TeacherFeatures:
    """Frozen zero-shot features of a micro-batch (image, spurious caption), l2-normalised.

    The seam every teacher feature goes through, with two caches (both exact):
    - text: the teacher's spurious-caption features depend only on the caption, so each distinct token row
      is encoded once per run (`cache_text`), cut after its end-of-text token (`trim`, trainer.model).
    - image: with a deterministic train transform (`train_transform: eval`) a sample's image is the same
      every epoch, so `num_samples` turns on a per-sample table keyed by `batch["index"]` (kept on the CPU,
      (num_samples, D)); once every sample is in it the teacher's image tower is released. Without it
      (augmentation), the image forward runs under inference mode in the training precision.
    All flags off is the reference's teacher: the full forward of both towers at every step.
    `text_key`: the batch's captions it embeds (spurious: StarFT's S_j; caption: CaRot's; None: images only).
    A teacher that changes during training (CaRot's average) is run with both caches off.
    """

    def __init__(
        self,
        teacher: torch.nn.Module,
        num_samples: int | None = None,
        cache_text: bool = True,
        trim: bool = True,
        inference: bool = True,
        text_key: str | None = "spurious",
    ):
        self.teacher, self.text_key = teacher, text_key
        self.num_samples, self.trim, self.inference = num_samples, trim, inference
        self.text_cache: dict[bytes, torch.Tensor] | None = {} if cache_text else None
        self.images: torch.Tensor | None = None  # (num_samples, D) on the CPU, filled as samples come
        self.have: torch.Tensor | None = None  # (num_samples,) bool
        self.block = 0  # images a missing sample is encoded with: the first micro-batch's size
        self.counts = {"image_computed": 0, "image_cached": 0, "text_computed": 0, "text_cached": 0}

    def __call__(self, batch: Tensors) -> Tensors:
        """{"image": (b, D)} and, with a `text_key`, {text_key: (b, D)}: normalised teacher features."""
        mode = torch.inference_mode() if self.inference else torch.no_grad()
        with mode:
            out = {"image": self.image_features(batch["image"], batch.get("index"))}
            if self.text_key is not None:
                out[self.text_key] = self.text_features(batch[self.text_key])
        if self.inference:  # inference tensors may not enter autograd's bookkeeping later: plain copies
            out = {k: v.clone() for k, v in out.items()}
        return out

    def _encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return encode_text(self.teacher, tokens, normalize=True, trim=self.trim)

    def text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """(b, D) teacher features of the token rows; each distinct row encoded once per run when cached.

        A missing row is encoded with rows of its own length in a block of a fixed size (`CHUNK`), so its
        features depend on the caption alone, not on the batch it first came in (a resumed run gets the
        same bits)."""
        if self.text_cache is None:
            return self._encode_text(tokens)
        keys = [row.tobytes() for row in tokens.cpu().numpy()]
        missing = list(dict.fromkeys(k for k in keys if k not in self.text_cache))
        if missing:
            first = {k: i for i, k in reversed(list(enumerate(keys)))}
            rows = tokens[[first[k] for k in missing]]
            lengths = (
                text_lengths(self.teacher, rows).tolist() if trims_text(self.teacher) else [0] * len(rows)
            )
            for length in sorted(set(lengths)):
                group = [i for i, n in enumerate(lengths) if n == length]
                for j in range(0, len(group), CHUNK):
                    part = group[j : j + CHUNK]
                    for i, feat in zip(part, self._encode_text(_fixed_block(rows[part], CHUNK))):
                        self.text_cache[missing[i]] = feat
        self.counts["text_computed"] += len(missing)
        self.counts["text_cached"] += len(keys) - len(missing)
        return torch.stack([self.text_cache[k] for k in keys])

    def image_features(self, images: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        """(b, D) teacher image features; from the per-sample table where the sample is in it. Missing
        samples are encoded in blocks of the first micro-batch's size, so their features do not depend on
        which samples came with them."""
        if self.num_samples is None or index is None:
            self.counts["image_computed"] += images.shape[0]
            return self.teacher.encode_image(images, normalize=True)
        idx = index.cpu()
        if self.have is None:
            self.have = torch.zeros(self.num_samples, dtype=torch.bool)
            self.block = images.shape[0]
        new = ~self.have[idx]
        if bool(new.any()):
            todo, parts = images[new.to(images.device)], []
            for j in range(0, len(todo), self.block):
                part = todo[j : j + self.block]
                encoded = self.teacher.encode_image(_fixed_block(part, self.block), normalize=True)
                parts.append(encoded[: len(part)])
            feats = torch.cat(parts)
            if self.images is None:
                self.images = torch.zeros(self.num_samples, feats.shape[1], dtype=feats.dtype)
            self.images[idx[new]] = feats.to("cpu", self.images.dtype)
            self.have[idx[new]] = True
            if bool(self.have.all()):  # every sample cached: the image tower never runs again
                self.teacher.visual = None
        self.counts["image_computed"] += int(new.sum())
        self.counts["image_cached"] += int((~new).sum())
        return self.images[idx].to(images.device, non_blocking=True)

    def cache_bytes(self) -> int:
        """Memory the caches hold."""
        text = sum(t.numel() * t.element_size() for t in (self.text_cache or {}).values())
        table = 0 if self.images is None else self.images.numel() * self.images.element_size()
        return text + table + (0 if self.have is None else self.have.numel())


def _fixed_block(rows: torch.Tensor, size: int) -> torch.Tensor:
    """`rows` padded to `size` rows with copies of its first: a fixed shape, whatever the rows."""
    if len(rows) >= size:
        return rows
    return torch.cat([rows, rows[:1].expand(size - len(rows), *rows.shape[1:])])


def gather_with_grad(accelerator, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """All-gather keeping the autograd graph (torch.distributed.nn), as open_clip's ClipLoss does."""
    if accelerator is None or accelerator.num_processes == 1:
        return list(tensors)
    return [torch.cat(torch.distributed.nn.all_gather(t.contiguous()), dim=0) for t in tensors]


def _gather(accelerator, tensors: Tensors, with_grad: bool) -> Tensors:
    if accelerator is None or accelerator.num_processes == 1:
        return tensors
    if with_grad:
        return dict(zip(tensors, gather_with_grad(accelerator, *tensors.values())))
    return {k: accelerator.gather(v.contiguous()) for k, v in tensors.items()}


def student_features(model, batch: Tensors, method: MethodSpec, state: dict[str, Any]) -> tuple[Tensors, Any]:
    """The student's one forward on a micro-batch: per-sample features (local) and the logit scale.

    Features: image, caption, spurious (methods that need it) and a method's extra floating-point outputs
    (e.g. RaVL's region embeddings, sample-major), each (b·k, D) for this process's b samples."""
    n = batch["caption"].shape[0]
    text = torch.cat([batch["caption"], batch["spurious"]]) if method.needs_spurious else batch["caption"]
    extra = method.forward_extra(batch, state) if method.forward_extra else None
    out = model(batch["image"], text, extra=extra)
    feats = {"image": out["image"], "caption": out["text"][:n]}
    if method.needs_spurious:
        feats["spurious"] = out["text"][n:]
    for key, value in out.items():
        if key not in ("image", "text", "logit_scale", "logits") and torch.is_floating_point(value):
            feats[key] = value
    return feats, out["logit_scale"]


def _batch_data(batch: Tensors) -> Tensors:
    """The per-sample data a loss may read (labels, indices, a method's extras), without the inputs."""
    return {k: v for k, v in batch.items() if k not in _TOKENS and torch.is_tensor(v)}


def _teacher(
    teacher: TeacherFeatures | None, batch: Tensors, method: MethodSpec, accelerator, gather: bool = True
) -> Tensors:
    if not (method.needs_teacher and teacher is not None):
        return {}
    with accelerator.autocast():
        feats = teacher(batch)
    return _gather(accelerator, feats, with_grad=False) if gather else feats


def _context(
    *,
    cfg: TrainConfig,
    feats: Tensors,
    logit_scale,
    data: Tensors,
    teacher_feats: Tensors,
    kl_scale: float,
    step: int,
    epoch: int,
    state: dict[str, Any] | None,
    accelerator,
    teacher: TeacherFeatures | None,
    model,
    param_pass: bool,
) -> StepContext:
    """What a method's `reg_term` reads: the student's features `feats` (with gradient), the teacher's
    `teacher_feats` (without), the batch's `data`, the step, and the models (`teacher`, the unwrapped CLIP)."""
    return StepContext(
        cfg,
        data,
        feats,
        feats["image"],
        data["label"],
        spurious=feats.get("spurious"),
        teacher_image=teacher_feats.get("image"),
        teacher_spurious=teacher_feats.get("spurious"),
        kl_scale=kl_scale,
        step=step,
        epoch=epoch,
        accelerator=accelerator,
        state=state if state is not None else {},
        teacher_caption=teacher_feats.get("caption"),
        logit_scale=logit_scale,
        teacher=teacher,
        clip=None if model is None else _unwrap(model, accelerator).clip,
        param_pass=param_pass,
    )


def _with_reg_term(method: MethodSpec, ctx: StepContext, base: torch.Tensor, lam: float) -> Tensors:
    """The method's regulariser on top of the base loss (contrastive or CE), combined its way (default
    base + lam·reg), with the terms it logs."""
    reg = method.reg_term(ctx)
    loss = method.combine(ctx, base, reg, lam) if method.combine else base + lam * reg
    return {"contrastive_loss": base, "reg_loss": reg, "loss": loss, **ctx.extras.get("log", {})}


def _unwrap(model, accelerator):
    return accelerator.unwrap_model(model) if accelerator is not None else model


def loss_terms(
    method: MethodSpec,
    cfg: TrainConfig,
    feats: Tensors,
    logit_scale,
    data: Tensors,
    teacher: Tensors,
    kl_scale: float,
    lam: float,
    step: int = 0,
    epoch: int = 0,
    state: dict[str, Any] | None = None,
    accelerator=None,
    teacher_features: TeacherFeatures | None = None,
    model=None,
    param_pass: bool = True,
) -> Tensors:
    """The named loss terms of the global batch, from its features (student's with gradient)."""
    labels = data["label"]
    lc = clip_loss(
        feats["image"], feats["caption"], logit_scale, labels if cfg.positives == "label" else None
    )
    if method.reg_term is None:
        return {"contrastive_loss": lc, "reg_loss": lc.detach() * 0, "loss": lc}
    ctx = _context(
        cfg=cfg, feats=feats, logit_scale=logit_scale, data=data, teacher_feats=teacher, kl_scale=kl_scale,
        step=step, epoch=epoch, state=state, accelerator=accelerator, teacher=teacher_features, model=model,
        param_pass=param_pass,
    )  # fmt: skip
    return _with_reg_term(method, ctx, lc, lam)


def _ce_terms(
    model,
    batch: Tensors,
    method: MethodSpec,
    cfg: TrainConfig,
    accelerator,
    teacher: TeacherFeatures | None,
    lam: float,
    step: int,
    epoch: int,
    state: dict[str, Any] | None,
    param_pass: bool = True,
) -> Tensors:
    """Cross-entropy on the head's logits (+ the method's term on this micro-batch's own features): means
    over the micro-batch's samples, so a step's K micro-batches are weighted 1/K each, and processes
    average their gradients (DDP)."""
    out = model(batch["image"])
    ce = F.cross_entropy(out["logits"].float(), batch["label"])
    if method.reg_term is None:
        return {"contrastive_loss": ce, "reg_loss": ce.detach() * 0, "loss": ce}
    feats = {"image": out["image"]}
    t = _teacher(teacher, batch, method, accelerator, gather=False)
    ctx = _context(
        cfg=cfg, feats=feats, logit_scale=out["logit_scale"], data=_batch_data(batch), teacher_feats=t,
        kl_scale=1.0, step=step, epoch=epoch, state=state, accelerator=accelerator, teacher=teacher,
        model=model, param_pass=param_pass,
    )  # fmt: skip
    return _with_reg_term(method, ctx, ce, lam)


def compute_losses(
    model,
    batch: Tensors,
    method: MethodSpec,
    cfg: TrainConfig,
    accelerator,
    teacher: TeacherFeatures | None,
    kl_scale: float,
    lam: float,
    step: int = 0,
    epoch: int = 0,
    state: dict[str, Any] | None = None,
) -> Tensors:
    """One micro-batch's loss terms over the global batch: contrastive_loss, reg_loss, loss (+ the
    method's extra logged terms)."""
    state = state if state is not None else {}
    if method.objective == "ce":
        return _ce_terms(model, batch, method, cfg, accelerator, teacher, lam, step, epoch, state)
    feats, scale = student_features(model, batch, method, state)
    feats = _gather(accelerator, feats, with_grad=True)
    data = _gather(accelerator, _batch_data(batch), with_grad=False)
    t = _teacher(teacher, batch, method, accelerator)
    return loss_terms(method, cfg, feats, scale, data, t, kl_scale, lam, step, epoch, state, accelerator,
                      teacher, model)  # fmt: skip


def backward_step(
    model,
    micro_batches: list[Tensors],
    method: MethodSpec,
    cfg: TrainConfig,
    accelerator,
    teacher: TeacherFeatures | None,
    kl_scale: float,
    lam: float,
    step: int = 0,
    epoch: int = 0,
    state: dict[str, Any] | None = None,
) -> Tensors:
    """Backward of one optimizer step over its micro-batches: the gradient is the full batch's.

    Cross-entropy is a mean over samples, so each micro-batch's loss is weighted 1/K. The contrastive
    and StarFT losses couple the samples of a batch: each micro-batch is embedded without gradient first,
    then once more with gradient, and the loss of the whole step's batch is backpropagated through that
    micro-batch's features only (the logit scale's own gradient is taken once, in the last,
    synchronised pass, where DDP expects a gradient for every parameter). Returns the terms (the
    full batch's values, detached)."""
    state = state if state is not None else {}
    k = len(micro_batches)
    if k == 1:
        terms = compute_losses(model, micro_batches[0], method, cfg, accelerator, teacher, kl_scale, lam,
                               step, epoch, state)  # fmt: skip
        accelerator.backward(terms["loss"])
        return {name: v.detach() for name, v in terms.items()}
    if method.objective == "ce":
        sums: Tensors = {}
        for j, batch in enumerate(micro_batches):
            with accelerator.no_sync(model) if j < k - 1 else contextlib.nullcontext():
                terms = _ce_terms(model, batch, method, cfg, accelerator, teacher, lam, step, epoch, state,
                                  param_pass=j == k - 1)  # fmt: skip
                accelerator.backward(terms["loss"] / k)
            for name, v in terms.items():
                sums[name] = sums.get(name, 0) + v.detach() / k
        return sums
    with torch.no_grad():
        cached = [
            _gather(accelerator, student_features(model, b, method, state)[0], False) for b in micro_batches
        ]
        data = _cat([_gather(accelerator, _batch_data(b), False) for b in micro_batches])
        t = _cat([_teacher(teacher, b, method, accelerator) for b in micro_batches])
    for j, batch in enumerate(micro_batches):
        with accelerator.no_sync(model) if j < k - 1 else contextlib.nullcontext():
            feats, scale = student_features(model, batch, method, state)
            feats = _gather(accelerator, feats, with_grad=True)
            merged = _cat([feats if i == j else cached[i] for i in range(k)])
            last = j == k - 1
            terms = loss_terms(method, cfg, merged, scale if last else scale.detach(), data, t, kl_scale,
                               lam, step, epoch, state, accelerator, teacher, model, param_pass=last)  # fmt: skip
            accelerator.backward(terms["loss"])
    return {name: v.detach() for name, v in terms.items()}


def _cat(parts: list[Tensors]) -> Tensors:
    """Concatenate dicts of per-sample tensors along the sample dimension, key by key."""
    if not parts or not parts[0]:
        return {}
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
