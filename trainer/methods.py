"""Methods: what each `--method` optimises, as a small `MethodSpec`, and the registry that names them.

    from trainer.methods import get_method; spec = get_method("starft")

A method is its objective (contrastive: FLYP's CLIP loss; ce: cross-entropy on a classification head,
`trainer.heads`; none: evaluate only) plus an optional extra loss term, a function of a `StepContext`: for
a contrastive method it sees the global batch's features, for a ce method the micro-batch's own (its terms
are means over samples). `trainer.step` calls the loss hooks, `trainer.train` the others. RaVL
(trainer.ravl.method) and the robust fine-tuning baselines (trainer.baselines: lipsum, carot, carft, lpft)
are registered from their own modules when first asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import import_module
from typing import Any, Literal

import torch
from pydantic import BaseModel, ValidationError

from trainer.config import TrainConfig, describe_error
from trainer.errors import ConfigError
from trainer.losses import star_loss

# A function the model's forward calls as extra(clip, image) -> named outputs (e.g. RaVL's regions), so
# that DDP sees every use of the parameters in one forward.
ForwardExtra = Callable[[torch.nn.Module, torch.Tensor], dict[str, torch.Tensor]]


@dataclass
class StepContext:
    """What an extra loss term sees: the global batch (every micro-batch of the step, every process).

    `batch` holds its per-sample data (label, index, a method's sample extras) and `out` the student's
    per-sample features (image, caption, spurious, a method's extra outputs), gathered by trainer.step.
    """

    cfg: TrainConfig
    batch: dict[str, torch.Tensor]  # (N, ...) per-sample data of the global batch
    out: dict[str, Any]  # (N·k, D) student features of the global batch, with gradient
    image: torch.Tensor  # (N, D) student image features, global batch, with gradient
    labels: torch.Tensor  # (N,)
    spurious: torch.Tensor | None = None  # (N, D) student spurious-caption features
    teacher_image: torch.Tensor | None = None
    teacher_spurious: torch.Tensor | None = None
    kl_scale: float = 1.0
    step: int = 0
    epoch: int = 0
    accelerator: Any = None
    state: dict[str, Any] = field(default_factory=dict)  # what the method's `setup` returned
    extras: dict[str, Any] = field(default_factory=dict)  # extras["log"]: more named terms to log
    teacher_caption: torch.Tensor | None = None  # (N, D) the teacher's caption features (teacher_text)
    logit_scale: Any = None  # the student's exp'd logit scale
    teacher: Any = None  # the step's trainer.step.TeacherFeatures (its frozen model: `.teacher`)
    clip: Any = None  # the student's open_clip model (unwrapped), for terms on its parameters
    # Terms on parameters alone (not on a sample's features) take their gradient in one pass of a step
    # only: with gradient accumulation the loss is backpropagated once per micro-batch.
    param_pass: bool = True


@dataclass(frozen=True)
class MethodSpec:
    """A method: its objective plus optional hooks (all default to plain L = L_C + λ·reg).

    setup(cfg, train_set, clip, preprocess, tokenizer, accelerator=, run_dir=) -> state: runs once before
    training with the initial model (e.g. labels the regions of the training set, trains a linear probe);
    state["sample_extras"] maps a batch key to a (N, ...) tensor indexed by sample.
    forward_extra(batch, state) -> a `ForwardExtra` the model's forward calls.
    combine(ctx, L_C, reg, λ) -> loss (L_C: the contrastive or the cross-entropy loss).
    teacher(clip) -> the frozen (or averaged) model the teacher features come from; default a frozen copy.
    after_step(state, clip, step, total): after each optimizer step (CaRot's teacher average).
    save_tensors(state) / load_tensors(state, tensors): the method's own tensors in a resumable state.
    options: the pydantic model `method_options` must fit (checked before anything is written).
    """

    name: str
    objective: Literal["contrastive", "ce", "none"]
    needs_spurious: bool = False
    needs_teacher: bool = False
    reg_term: Callable[[StepContext], torch.Tensor] | None = None
    freeze_text: bool = False  # train the image tower only (and keep the logit scale)
    setup: Callable[..., dict[str, Any]] | None = None
    forward_extra: Callable[[dict[str, torch.Tensor], dict[str, Any]], ForwardExtra] | None = None
    combine: Callable[[StepContext, torch.Tensor, torch.Tensor, float], torch.Tensor] | None = None
    head: Literal["folded", "scaled", "probe"] | None = None  # ce methods' head (trainer.heads)
    teacher_text: Literal["spurious", "caption"] | None = None  # the captions the teacher embeds
    teacher_changes: bool = False  # the teacher is updated during training: its features are not cached
    make_teacher: Callable[[torch.nn.Module], torch.nn.Module] | None = None
    after_step: Callable[[dict[str, Any], torch.nn.Module, int, int], None] | None = None
    save_tensors: Callable[[dict[str, Any]], dict[str, torch.Tensor]] | None = None
    load_tensors: Callable[[dict[str, Any], dict[str, torch.Tensor]], None] | None = None
    options: type[BaseModel] | None = None


def star_term(ctx: StepContext) -> torch.Tensor:
    """StarFT's L_Star: KL to the frozen model over spurious captions, same-label pairs masked."""
    return star_loss(
        ctx.image, ctx.spurious, ctx.teacher_image, ctx.teacher_spurious, ctx.labels, ctx.kl_scale
    )


def kl_term(ctx: StepContext) -> torch.Tensor:
    """The paper's ablation: the same KL without the same-label mask."""
    return star_loss(
        ctx.image,
        ctx.spurious,
        ctx.teacher_image,
        ctx.teacher_spurious,
        ctx.labels,
        ctx.kl_scale,
        mask_same_label=False,
    )


# fmt: off
METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("zeroshot", "none"),
        MethodSpec("ft", "ce", head="folded"),
        MethodSpec("flyp", "contrastive"),
        MethodSpec(
            "starft", "contrastive", needs_spurious=True, needs_teacher=True, reg_term=star_term,
            teacher_text="spurious",
        ),
        MethodSpec(
            "kl", "contrastive", needs_spurious=True, needs_teacher=True, reg_term=kl_term,
            teacher_text="spurious",
        ),
    )
}
# fmt: on

# Methods defined in their own modules (which build on this one: MethodSpec, StepContext), imported when
# first asked for. Each module's METHODS is a tuple of MethodSpecs.
PLUGINS = {
    "ravl": "trainer.ravl.method",  # RaVL's mitigation and its paper's rows (VL-ERM, VL-GDRO)
    "vl_erm": "trainer.ravl.method",
    "vl_gdro": "trainer.ravl.method",
    "lipsum": "trainer.baselines",  # the robust fine-tuning baselines of the StarFT paper
    "carot": "trainer.baselines",
    "carft": "trainer.baselines",
    "lpft": "trainer.baselines",
}


def get_method(name: str) -> MethodSpec:
    """The method called `name` (a ConfigError names the known ones)."""
    if name in PLUGINS and name not in METHODS:
        METHODS.update({spec.name: spec for spec in import_module(PLUGINS[name]).METHODS})
    if name not in METHODS:
        known = sorted({*METHODS, *PLUGINS})
        raise ConfigError(f"unknown method {name!r} (known: {', '.join(known)})")
    return METHODS[name]


def method_options(spec: MethodSpec, cfg: TrainConfig) -> BaseModel | None:
    """`cfg.method_options` validated by the method's options model (a ConfigError names the key)."""
    if spec.options is None:
        if cfg.method_options and spec.name not in PLUGINS:
            raise ConfigError(f"method_options: method {spec.name} takes none")
        return None
    try:
        return spec.options.model_validate(cfg.method_options)
    except ValidationError as e:
        raise ConfigError(f"method_options: {describe_error(e)}") from None
