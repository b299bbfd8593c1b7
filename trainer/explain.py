"""`trainer explain RUN [RUN ...]`: Grad-CAM maps of the zero-shot model and of each run on the same images.

    from trainer.explain import explain; res = explain(["runs/flyp-…", "runs/starft-…"], "val.csv", "classes.txt")

The StarFT paper's Figure 3 question: does a fine-tuned model look at the object or at the background?
One PNG grid: a row per image; columns: the image (as the model sees it: resized, centre-cropped), the
zero-shot model's map, then one map per run, each titled with the predicted class and its probability.

- What is explained: the logit of the target class. A contrastive run (and the zero-shot model) scores an
  image by the cosine similarity of its embedding with the text embedding of each class (a zero-shot head
  from that model's own text tower and the run's `templates`), times its logit scale; a run with a trained
  head (ft, lipsum, carft, lpft: `<checkpoint>.head.safetensors`) by that head's logit. The target class is
  the image's label where the images give one (`target="true"`), else, or with `target="pred"`, the
  model's predicted class.
- Where: Grad-CAM (the maintained `grad-cam` package, `pytorch_grad_cam`) at one layer of the image tower.
  open_clip ViT: the last block's `ln_1` (the tokens the last attention reads), its token sequence
  reshaped to the patch grid with the class token dropped, (N, L, D) or (L, N, D) as the open_clip version
  runs it. ModifiedResNet: the deepest stage whose output is at least `MIN_GRID` cells a side (`layer4` at
  224 px; `layer2` for a 32 px model, whose `layer4` is 1×1). `layer=` picks any module of the tower.
- The zero-shot model is the runs' config `model` + `pretrained` (the runs must share it; a random-init
  model is rebuilt from the run's seed as `trainer wise` does). Maps are min-max scaled to [0, 1] per
  image, at the model's input resolution; a map Grad-CAM's ReLU leaves all zero (no positive evidence at
  that layer) is all zero, and its panel says "empty map". Everything runs in eval mode with frozen weights (gradients reach
  the activations only), so results are deterministic on CPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from trainer.config import TrainConfig, load_config
from trainer.data.sets import class_names, list_images, load_templates, scan_csv
from trainer.errors import ConfigError, DataError, RunDirError, TrainerError, WriteError

INSTALL_HINT = "pip install 'starft-toolkit[explain]'"
MIN_GRID = 4  # a ResNet tower's CAM layer: the deepest stage with at least this many cells a side
RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")
PANEL_INCHES, TITLE_INCHES, DPI = 2.0, 0.55, 100  # one panel of the grid, the titles above it, PNG dpi
HEADER_INCHES = 0.5  # the figure's title


class ExplainError(TrainerError):
    """`trainer explain` cannot run (grad-cam missing, an unsupported tower, a CAM that fails)."""


@dataclass
class Sample:
    path: Path
    label: int | None  # index into the classes; None: unlabelled (the target is the prediction)
    group: str | None = None


@dataclass
class Column:
    """One model's panels: its CAM per image and its prediction."""

    title: str
    maps: np.ndarray  # (N, H, W) float32 in [0, 1]
    preds: list[int]
    probs: list[float]  # the predicted class's probability
    targets: list[int]  # the class each map explains


@dataclass
class Explained:
    samples: list[Sample]
    classes: list[str]
    images: np.ndarray  # (N, H, W, 3) float32 in [0, 1]: the model's input, un-normalised
    layer: str
    target: str
    columns: list[Column] = field(default_factory=list)
    out: Path | None = None


# --- inputs ------------------------------------------------------------------------------------------


def require_gradcam() -> None:
    try:
        import pytorch_grad_cam  # noqa: F401
    except ImportError:
        raise ExplainError(f"grad-cam is not installed; run: {INSTALL_HINT}") from None


def parse_classes(spec: str | Path | Sequence[str] | None, runs_cfg: TrainConfig | None = None) -> list[str]:
    """Class names from a file, a comma-separated list or a list; None: the run's training classes."""
    if spec is None:
        train = runs_cfg.data.train if runs_cfg is not None else None
        names = class_names(train.classes, train.path) if train is not None else None
        if not names:
            raise DataError("the run has no training class names; pass --classes (a file or a comma list)")
        return names
    if not isinstance(spec, str | Path):
        names = [str(c).strip() for c in spec]
    elif Path(spec).is_file():
        return class_names(str(spec), str(spec)) or []
    elif isinstance(spec, Path) or ("," not in spec and (Path(spec).suffix or os.sep in spec)):
        raise DataError(f"{spec}: no such class-names file (or give a comma-separated list)")
    else:
        names = [c.strip() for c in spec.split(",")]
    names = [c for c in names if c]
    if not names:
        raise DataError("--classes: no class names")
    if len(set(names)) != len(names):
        raise DataError("--classes: duplicate class names")
    return names


def spread(n: int, limit: int | None) -> list[int]:
    """`limit` indices evenly spaced over range(n) (all when limit is None or >= n): deterministic, and a
    sorted set still shows each of its parts."""
    if limit is None or limit >= n:
        return list(range(n))
    return [i * n // limit for i in range(limit)]


def load_samples(images: str | Path, classes: list[str], limit: int | None = None) -> list[Sample]:
    """The images of a folder (class subfolders give labels, files at the top have none) or of a CSV
    path,label[,group] (the trainer's csv layout); `limit` of them, evenly spaced."""
    images = Path(images)
    if images.is_dir():
        files = list_images(images)
        if not files:
            raise DataError(f"{images}: no image files in this folder")
        index = {c: i for i, c in enumerate(classes)}
        samples = []
        for rel in files:
            parts = Path(rel).parts
            label = None
            if len(parts) > 1:
                folder = parts[0]
                label = index.get(folder, index.get(folder.replace("_", " ")))
                if label is None:
                    raise DataError(
                        f"{images / folder}: folder {folder!r} is not a class name "
                        f"(classes: {', '.join(classes[:8])}{', …' if len(classes) > 8 else ''})"
                    )
            samples.append(Sample(images / rel, label))
    elif images.is_file():
        listing = scan_csv(images, classes)
        samples = [
            Sample(Path(listing.paths[i]), int(listing.labels[i]), listing.groups[i])
            for i in range(len(listing))
        ]
    else:
        raise DataError(f"{images}: no such images folder or CSV file")
    return [samples[i] for i in spread(len(samples), limit)]


def find_checkpoint(run_dir: Path, checkpoint: Literal["auto", "best", "last"] = "auto") -> Path:
    """The run's weights: best (chosen on ID validation) where it has them, else last; or the one asked."""
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: no such run directory")
    if not (run_dir / "config.yaml").is_file():
        raise RunDirError(f"{run_dir}: not a run directory (no config.yaml)")
    names = ("best", "last") if checkpoint == "auto" else (checkpoint,)
    for n in names:
        path = run_dir / "checkpoints" / f"{n}.safetensors"
        if path.is_file():
            return path
    raise RunDirError(
        f"{run_dir}: no {' or '.join(names)} checkpoint (is the run finished? zeroshot runs have none)"
    )


# --- models ------------------------------------------------------------------------------------------


class TextHead(nn.Module):
    """Logits of normalised image features against fixed (C, D) unit class embeddings, times `scale`."""

    def __init__(self, class_embeddings: torch.Tensor, scale: float):
        super().__init__()
        self.register_buffer("weight", class_embeddings.detach().clone())
        self.scale = float(scale)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.scale * f @ self.weight.T


class Scorer(nn.Module):
    """image -> class logits: the image tower (normalised features), then a head."""

    def __init__(self, clip: nn.Module, head: nn.Module):
        super().__init__()
        self.clip, self.head = clip, head

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.clip.encode_image(image, normalize=True))


def text_head(clip: nn.Module, tokenizer: Callable, classes: list[str], templates) -> TextHead:
    from trainer.evaluate import zero_shot_head

    emb = zero_shot_head(clip, tokenizer, classes, load_templates(templates))  # (C, D), unit rows
    return TextHead(emb, clip.logit_scale.exp().item())


def trained_head(
    cfg: TrainConfig, ckpt: Path, classes: list[str], zero_shot_scale: float
) -> nn.Module | None:
    """A run's trained classification head (saved beside its checkpoint), or None."""
    path = ckpt.with_suffix(".head.safetensors")
    if not path.is_file():
        return None
    from trainer.heads import head_from_file, head_scale
    from trainer.methods import get_method

    head = head_from_file(path, scale=head_scale(get_method(cfg.method), zero_shot_scale))
    train = class_names(cfg.data.train.classes, cfg.data.train.path) if cfg.data.train else None
    if head.out_features != len(classes) or (train is not None and train != classes):
        raise DataError(
            f"{ckpt.parent.parent}: its trained head scores its {head.out_features} training classes"
            + (f" ({', '.join(train[:8])})" if train else "")
            + "; pass those as --classes"
        )
    return head


def build_model(cfg: TrainConfig, pretrained: str | None) -> tuple[nn.Module, Callable, Callable]:
    """open_clip model (eval, frozen), eval preprocess, tokenizer; a random init is the run's seed's."""
    from accelerate.utils import set_seed

    from trainer.model import build_clip

    set_seed(cfg.seed)  # as train() and `trainer wise`: a random-init zero-shot model is rebuilt identically
    clip, preprocess, tokenizer = build_clip(cfg.model, pretrained)
    clip.eval()
    for p in clip.parameters():
        p.requires_grad_(False)
    return clip, preprocess, tokenizer


# --- CAM ---------------------------------------------------------------------------------------------


def token_grid(visual: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """grad-cam's reshape_transform for an open_clip ViT: tokens -> (N, D, gh, gw), prefix (class) tokens
    dropped. The blocks see (N, L, D) when the tower's transformer is batch_first (open_clip >= 2.23's
    default) and (L, N, D) otherwise (older versions had no such attribute and ran L, N, D)."""
    gh, gw = visual.grid_size
    batch_first = bool(getattr(visual.transformer, "batch_first", False))

    def reshape(x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3:  # a convolutional layer's (N, C, H, W): as is
            return x
        if not batch_first:
            x = x.transpose(0, 1)
        n_tok = x.shape[1]
        if n_tok < gh * gw:
            raise ExplainError(f"the CAM layer gives {n_tok} tokens, fewer than the {gh}x{gw} patch grid")
        x = x[:, n_tok - gh * gw :, :]
        return x.reshape(x.shape[0], gh, gw, x.shape[2]).permute(0, 3, 1, 2)

    return reshape


def _stage_grids(visual: nn.Module, probe: torch.Tensor) -> dict[str, tuple[int, int]]:
    grids: dict[str, tuple[int, int]] = {}
    hooks = [
        getattr(visual, name).register_forward_hook(
            lambda _m, _i, out, name=name: grids.__setitem__(name, tuple(out.shape[-2:]))
        )
        for name in RESNET_STAGES
    ]
    try:
        with torch.no_grad():
            visual(probe)
    finally:
        for h in hooks:
            h.remove()
    return grids


def cam_layer(
    visual: nn.Module, layer: str = "auto", probe: torch.Tensor | None = None
) -> tuple[str, nn.Module, Callable | None]:
    """(name, module, reshape_transform) of the layer to take Grad-CAM at in the image tower `visual`."""
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer

    is_vit = isinstance(visual, VisionTransformer)
    if layer == "auto":
        if is_vit:
            layer = f"transformer.resblocks.{len(visual.transformer.resblocks) - 1}.ln_1"
        elif isinstance(visual, ModifiedResNet):
            if probe is None:
                layer = RESNET_STAGES[-1]
            else:
                grids = _stage_grids(visual, probe)
                layer = next(
                    (s for s in reversed(RESNET_STAGES) if min(grids[s]) >= MIN_GRID), RESNET_STAGES[0]
                )
        else:
            raise ExplainError(
                f"image tower {type(visual).__name__} is not supported (open_clip ViT or ModifiedResNet); "
                "pass --layer with a convolutional layer of it"
            )
    try:
        module = visual.get_submodule(layer)
    except AttributeError:
        raise ConfigError(
            f"--layer {layer!r}: no such module in the image tower ({type(visual).__name__})"
        ) from None
    return layer, module, token_grid(visual) if is_vit else None


def cam_maps(
    scorer: nn.Module,
    images: torch.Tensor,
    targets: list[int],
    layer: nn.Module,
    reshape: Callable | None,
    batch_size: int = 16,
) -> np.ndarray:
    """(N, H, W) Grad-CAM maps of `targets`' logits in [0, 1] at the images' resolution. The weights stay
    frozen: grad-cam differentiates with respect to the input, so gradients reach only the activations."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam = GradCAM(scorer, [layer], reshape_transform=reshape)
    cam.compute_input_gradient = True  # activations need a graph; the frozen parameters give none
    out = []
    try:
        with torch.enable_grad():
            for i in range(0, len(images), batch_size):
                chunk = images[i : i + batch_size]
                tg = [ClassifierOutputTarget(t) for t in targets[i : i + batch_size]]
                out.append(cam(input_tensor=chunk, targets=tg))
    except (RuntimeError, ValueError) as e:
        raise ExplainError(f"Grad-CAM failed at this layer: {str(e).splitlines()[0][:200]}") from None
    finally:
        cam.activations_and_grads.release()
    maps = np.concatenate(out).astype(np.float32)
    return np.nan_to_num(maps, nan=0.0).clip(0.0, 1.0)


def explain_column(
    title: str,
    scorer: nn.Module,
    images: torch.Tensor,
    labels: list[int | None],
    target: str,
    layer: nn.Module,
    reshape: Callable | None,
) -> Column:
    """One model's predictions (no gradients) and its maps of the target classes."""
    with torch.no_grad():
        probs = torch.cat([scorer(images[i : i + 64]).float().softmax(-1) for i in range(0, len(images), 64)])
    p, pred = probs.max(dim=-1)
    preds = [int(c) for c in pred]
    targets = [y if (target == "true" and y is not None) else c for y, c in zip(labels, preds)]
    maps = cam_maps(scorer, images, targets, layer, reshape)
    return Column(title, maps, preds, [float(x) for x in p], targets)


# --- the whole command -------------------------------------------------------------------------------


def _display(batch: torch.Tensor, visual: nn.Module) -> np.ndarray:
    """(N, 3, H, W) normalised model input -> (N, H, W, 3) RGB in [0, 1]."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    cfg = getattr(visual, "preprocess_cfg", None) or {}
    mean = cfg.get("mean") or getattr(visual, "image_mean", None) or OPENAI_DATASET_MEAN
    std = cfg.get("std") or getattr(visual, "image_std", None) or OPENAI_DATASET_STD
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (batch.cpu().float() * s + m).clamp(0, 1).permute(0, 2, 3, 1).numpy().astype(np.float32)


def _load_batch(samples: list[Sample], preprocess: Callable) -> torch.Tensor:
    from PIL import Image

    tensors = []
    for s in samples:
        try:
            with Image.open(s.path) as im:
                tensors.append(preprocess(im.convert("RGB")))
        except OSError as e:  # also PIL's UnidentifiedImageError
            raise DataError(f"{s.path}: cannot read the image ({e.__class__.__name__})") from None
    return torch.stack(tensors)


def _title(run_dir: Path, cfg: TrainConfig) -> str:
    name = run_dir.name
    return name if name.startswith(cfg.method) else f"{name}\n({cfg.method})"


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available here")
    return torch.device(device)


def explain(
    runs: Sequence[str | Path],
    images: str | Path,
    classes: str | Path | Sequence[str] | None = None,
    out: str | Path | None = None,
    limit: int | None = 8,
    target: Literal["true", "pred"] = "true",
    checkpoint: Literal["auto", "best", "last"] = "auto",
    layer: str = "auto",
    device: str | None = "auto",
    render: bool = True,
) -> Explained:
    """Grad-CAM of the zero-shot model and each run on `limit` images; writes the grid PNG to `out`
    (default RUN/explain/<images>.png for the first run) unless `render` is False."""
    require_gradcam()
    if not runs:
        raise ConfigError("explain: give at least one run directory")
    if target not in ("true", "pred"):
        raise ConfigError(f"--target {target!r}: must be true or pred")
    run_dirs = [Path(r) for r in runs]
    ckpts = [find_checkpoint(r, checkpoint) for r in run_dirs]
    cfgs = [load_config(r / "config.yaml") for r in run_dirs]
    base = cfgs[0]
    for r, c in zip(run_dirs[1:], cfgs[1:]):
        if (c.model, c.pretrained) != (base.model, base.pretrained):
            raise ConfigError(
                f"{r}: model {c.model} ({c.pretrained}) differs from {run_dirs[0]}'s {base.model} "
                f"({base.pretrained}); explain compares runs of one zero-shot model"
            )
    names = parse_classes(classes, base)
    samples = load_samples(images, names, limit)
    dev = resolve_device(device)

    clip, preprocess, tokenizer = build_model(base, base.pretrained)
    batch = _load_batch(samples, preprocess)
    layer_name, _, _ = cam_layer(clip.visual, layer, batch[:1])
    result = Explained(samples, names, _display(batch, clip.visual), layer_name, target)
    batch = batch.to(dev)
    labels = [s.label for s in samples]
    zero_scale = clip.logit_scale.exp().item()

    def column(title: str, clip: nn.Module, head: nn.Module) -> Column:
        clip.to(dev)
        scorer = Scorer(clip, head.to(dev)).eval()
        _, module, reshape = cam_layer(clip.visual, layer_name)
        return explain_column(title, scorer, batch, labels, target, module, reshape)

    result.columns.append(column("zero-shot", clip, text_head(clip, tokenizer, names, base.templates)))
    del clip
    for run_dir, cfg, ckpt in zip(run_dirs, cfgs, ckpts):
        clip, _, tokenizer = build_model(cfg, str(ckpt))
        head = trained_head(cfg, ckpt, names, zero_scale) or text_head(clip, tokenizer, names, cfg.templates)
        result.columns.append(column(_title(run_dir, cfg), clip, head))
        del clip
    if render:
        images = Path(images)
        path = Path(out) if out is not None else run_dirs[0] / "explain" / f"{images.stem}.png"
        result.out = render_grid(result, path, source=str(images))
    return result


# --- the figure --------------------------------------------------------------------------------------


def grid_pixels(rows: int, cols: int) -> tuple[int, int]:
    """(width, height) of the PNG `render_grid` writes for `rows` images and `cols` columns."""
    w = cols * PANEL_INCHES
    h = HEADER_INCHES + rows * (PANEL_INCHES + TITLE_INCHES)
    return round(w * DPI), round(h * DPI)


def _short(text: str, n: int = 28) -> str:
    return text if len(text) <= n else "…" + text[-(n - 1) :]


def render_grid(res: Explained, path: str | Path, source: str = "") -> Path:
    """The grid: a row per image; the image, then the zero-shot model's and each run's CAM overlay."""
    import matplotlib  # the backend before pyplot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rows, cols = len(res.samples), 1 + len(res.columns)
    w, h = grid_pixels(rows, cols)
    fig = plt.figure(figsize=(w / DPI, h / DPI), dpi=DPI)
    top = 1 - HEADER_INCHES * DPI / h
    cell_h = (PANEL_INCHES + TITLE_INCHES) * DPI / h
    pad = 0.06  # of a panel, each side
    target = "the true class (else the prediction)" if res.target == "true" else "the predicted class"
    fig.text(
        0.5,
        1 - 0.5 * HEADER_INCHES * DPI / h,
        f"Grad-CAM at {res.layer} of the class logit: {target}"
        + (f"\n{_short(source, 90)}" if source else ""),
        ha="center",
        va="center",
        fontsize=9,
    )
    for r, s in enumerate(res.samples):
        img = res.images[r]
        y0 = top - (r + 1) * cell_h
        for c in range(cols):
            ax = fig.add_axes(
                (
                    (c + pad) / cols,
                    y0 + pad * PANEL_INCHES * DPI / h,
                    (1 - 2 * pad) / cols,
                    (1 - 2 * pad) * PANEL_INCHES * DPI / h,
                )
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.imshow(img, interpolation="nearest")
                label = res.classes[s.label] if s.label is not None else "no label"
                head = "image\n" if r == 0 else ""
                ax.set_title(
                    f"{head}{_short(s.path.name, 18)}: {label}" + (f" · {s.group}" if s.group else ""),
                    fontsize=7,
                )
                continue
            col = res.columns[c - 1]
            overlay = show_cam_on_image(img, col.maps[r], use_rgb=True, image_weight=0.5)
            ax.imshow(overlay, interpolation="nearest")
            pred = col.preds[r]
            colour = "black" if s.label is None else ("darkgreen" if pred == s.label else "firebrick")
            note = f"{res.classes[pred]} {col.probs[r]:.0%}"
            if col.targets[r] != pred:
                note += f" (map: {res.classes[col.targets[r]]})"
            if not col.maps[r].any():  # Grad-CAM's ReLU left nothing: no positive evidence at this layer
                note += "\nempty map"
            ax.set_title((f"{col.title}\n" if r == 0 else "") + note, fontsize=7, color=colour)
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=DPI)
    except OSError as e:
        raise WriteError(f"{path}: cannot write ({e.strerror or e.__class__.__name__})") from None
    finally:
        plt.close(fig)
    return path
