"""TrainConfig: every setting of a `trainer run`, validated once and frozen.

    from trainer.config import load_config; cfg = load_config("configs/tiny.yaml", ["lr=1e-4", "method=flyp"])

A config is YAML; `--set key=value` overrides use dotted keys (`data.train.path=...`) and YAML values.
Hyperparameters (tracked, part of the run's identity) are kept apart from runtime knobs (`RUNTIME_KEYS`:
may change on `--resume`). Relative paths are resolved against the current directory.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from trainer.errors import ConfigError

Method = Literal[
    "zeroshot", "ft", "flyp", "starft", "kl", "ravl", "vl_erm", "vl_gdro", "lipsum", "carot", "carft", "lpft",
]  # fmt: skip
Layout = Literal[
    "csv", "imagefolder", "imagenet", "imagenet-v2", "imagenet-sketch", "imagenet-r", "imagenet-a",
    "objectnet", "waterbirds", "pacs", "webdataset",
]  # fmt: skip
# Keys that may differ between an interrupted run and its --resume (they do not change the result).
RUNTIME_KEYS = (
    "max_steps", "threads", "num_workers", "progress", "runs_dir", "log_with",
    "pin_memory", "persistent_workers", "prefetch_factor", "teacher_cache", "compile", "grad_checkpointing",
)  # fmt: skip
# What to do on a fault: runtime keys too (a run stopped by one may be resumed with another choice).
FAULT_KEYS = ("nonfinite", "nonfinite_limit", "on_bad_image")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSpec(_Strict):
    """One image set: a CSV (path,label[,group]) or an ImageFolder tree, and its class names."""

    path: str = Field(description="CSV file (paths relative to its folder) or ImageFolder root")
    classes: str | list[str] | None = Field(
        None, description="class-names file (one per line) or list; ImageFolder default: folder names"
    )
    name: str | None = Field(None, description="name used in metrics; default: file or folder stem")
    templates: str | list[str] | None = Field(
        None, description="zero-shot templates: openai | simple | file | list; default: the run's `templates`"
    )
    group_prompts: str | list[str] | None = Field(
        None, description="e.g. 'a photo of a {c} in the {g}.': class head averaged over every group name"
    )
    group_by: Literal["class_group", "group"] | None = Field(
        None,
        description="accuracy groups: (class, group) pairs, Waterbirds-style, or the group column; "
        "default: group for pacs, else class_group",
    )
    layout: Layout | None = Field(
        None, description="how the set is laid out on disk (as published); default: csv or imagefolder"
    )
    split: str | None = Field(None, description="waterbirds: train | val | test (its metadata's split)")
    labels: str | None = Field(
        None, description="imagenet val as flat files: the label file (LOC_val_solution.csv or 'file wnid')"
    )
    class_subset: str | list[str | int] | None = Field(
        None,
        description="this set's classes as training classes (names, folder ids or indices; or a file): "
        "scored by projecting the training-class logits onto them",
    )
    num_samples: int | None = Field(
        None, gt=0, description="webdataset: samples in the shards; default: sizes.json, else counted"
    )


class DataConfig(_Strict):
    train: DataSpec | None = None
    val: DataSpec | None = Field(None, description="ID validation set; the best checkpoint is chosen on it")
    eval: list[DataSpec] = Field(default_factory=list, description="OOD / group-shift sets, own classes each")


class TrainConfig(_Strict):
    """The resolved configuration of one run."""

    name: str | None = Field(None, description="run dir name under runs_dir; default derived from hparams")
    method: Method = "starft"
    # --- model ---
    model: str = Field("ViT-B-16", description="open_clip architecture name or model-config JSON path")
    pretrained: str | None = Field(
        None, description="open_clip tag, .safetensors, .pt/.bin; null = random init"
    )
    # --- data and captions ---
    data: DataConfig = Field(default_factory=DataConfig)
    caption: str = Field("a photo of a {c}.", description="training caption template")
    caption_templates: str | list[str] | None = Field(
        None,
        description="draw each sample's training caption from these templates instead (openai | simple | "
        "file | list), per (seed, epoch, sample): CaRot's captions; null = `caption` always",
    )
    train_transform: Literal["train", "eval"] = Field(
        "train",
        description="train: open_clip's training augmentation (RandomResizedCrop 0.9-1.0, the paper's); "
        "eval: the deterministic evaluation preprocess",
    )
    templates: str | list[str] = Field(
        "openai", description="zero-shot eval templates: openai | simple | file"
    )
    # --- spurious captions (starft, kl) ---
    bank: str | None = Field(None, description="descgen bank file (spurious: bank)")
    concepts: list[str] = Field(default_factory=lambda: ["background"], description="bank concepts to use")
    spurious: Literal["bank", "none", "random"] = Field(
        "bank", description="bank descriptors | clean caption (ablation) | 1-3 random words (ablation)"
    )
    random_words: str | None = Field(
        None, description="word-list file for spurious: random; default built in"
    )
    lam: float = Field(0.5, ge=0, description="weight of the regulariser")
    lam_decay: Literal["epoch", "step", "none"] = Field(
        "epoch", description="linear decay: lam*(1-(e+1)/E) per epoch, lam*(1-(t+1)/T) per step, or none"
    )
    kl_scale: float | None = Field(None, gt=0, description="logit scale inside the KL; null = teacher's")
    positives: Literal["index", "label"] = Field(
        "index", description="contrastive targets: arange (open_clip) or every same-label sample (soft)"
    )
    discovered: str | None = Field(
        None, description="ravl: discovery report JSON (`trainer discover`); its top feature is mitigated"
    )
    method_options: dict[str, Any] = Field(
        default_factory=dict,
        description="the method's own options (ravl, lipsum, carot, carft, lpft; `trainer run --help`)",
    )
    # --- optimisation ---
    batch_size: int = Field(512, gt=0, description="global batch per optimizer step (all processes)")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    epochs: int = Field(10, gt=0)
    total_steps: int | None = Field(None, gt=0, description="optimizer steps; overrides epochs when set")
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup_steps: int = Field(500, ge=0)
    grad_clip: float | None = Field(None, gt=0, description="max grad norm; null = no clipping")
    freeze_logit_scale: bool = False
    freeze_text: bool = Field(
        False,
        description="train the image tower only (locked text, as RaVL's paper); freezes the logit scale",
    )
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 on a CUDA GPU that supports it, else no"
    )
    seed: int = 0
    eval_every: int = Field(1, gt=0, description="evaluate (and pick best) every N epochs and at the end")
    eval_batch_size: int = Field(256, gt=0, description="global")
    log_every: int = Field(10, gt=0, description="steps between console/JSONL step logs")
    checkpoint_every: int | None = Field(
        None, gt=0, description="save resumable state every N steps (and always at each epoch's end)"
    )
    nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="a NaN/inf loss or gradient norm: stop (keep the last save) or skip the step"
    )
    nonfinite_limit: int = Field(10, gt=0, description="nonfinite: skip stops after N skipped steps in a row")
    on_bad_image: Literal["error", "skip"] = Field(
        "error", description="an unreadable training image: stop, or skip it (a readable one in its place)"
    )
    # --- runtime knobs (RUNTIME_KEYS) ---
    runs_dir: str = "runs"
    max_steps: int | None = Field(
        None, gt=0, description="stop after N steps (resumable); schedule unchanged"
    )
    threads: int | None = Field(None, gt=0, description="torch threads per process; default min(4, cores)")
    num_workers: int = Field(0, ge=0, description="DataLoader workers per process")
    pin_memory: bool | None = Field(None, description="page-locked loader batches; null = on a CUDA GPU")
    persistent_workers: bool = Field(
        True, description="keep the loader's workers between epochs (with num_workers > 0)"
    )
    prefetch_factor: int | None = Field(
        None, gt=0, description="batches each worker loads ahead (with num_workers > 0); null = torch's 2"
    )
    teacher_cache: bool = Field(
        True,
        description="starft/kl: each spurious caption's teacher features computed once a run; with "
        "train_transform: eval, each image's too (exact)",
    )
    compile: bool = Field(False, description="torch.compile the model being trained")
    grad_checkpointing: bool = Field(
        False, description="open_clip's gradient checkpointing: less activation memory, more compute"
    )
    progress: bool = True
    log_with: str | list[str] | None = Field(
        None, description="trackers accelerate supports (tensorboard, wandb, mlflow, ...); none by default"
    )

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if self.method != "zeroshot" and self.data.train is None:
            raise ValueError(f"method {self.method} needs data.train")
        if self.method in ("starft", "kl") and self.spurious == "bank" and not self.bank:
            raise ValueError(f"method {self.method} with spurious: bank needs a bank (--bank)")
        if self.method in ("ravl", "vl_erm", "vl_gdro") and not self.discovered:
            raise ValueError(f"method {self.method} needs a discovery report (--discovered REPORT.json)")
        if "{c}" not in self.caption:
            raise ValueError(f"caption {self.caption!r} must contain {{c}}")
        return self

    def loader_options(self, cuda: bool) -> dict[str, Any]:
        """The training DataLoader's worker and memory options (DataLoader keyword arguments)."""
        out: dict[str, Any] = {"num_workers": self.num_workers}
        out["pin_memory"] = cuda if self.pin_memory is None else self.pin_memory
        if self.num_workers > 0:
            out["persistent_workers"] = self.persistent_workers
            if self.prefetch_factor is not None:
                out["prefetch_factor"] = self.prefetch_factor
        return out

    def hparams(self) -> dict[str, Any]:
        """The config without runtime knobs: what a resumed run must share."""
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in RUNTIME_KEYS + FAULT_KEYS}

    def hash(self) -> str:
        blob = json.dumps(self.hparams(), sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()

    def to_yaml(self) -> str:
        buf = io.StringIO()
        y = YAML(typ="safe", pure=True)
        y.default_flow_style = False
        y.sort_base_mapping_type_on_output = False  # type: ignore[attr-defined]
        y.dump(self.model_dump(mode="json"), buf)
        return buf.getvalue()


def _parse_value(text: str) -> Any:
    try:
        return YAML(typ="safe", pure=True).load(text)
    except YAMLError:
        return text


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {key}: {p!r} is not a mapping")
        node = nxt
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """`--set key=value` overrides into a config mapping, in place: dotted keys, YAML values."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, value = item.split("=", 1)
        _set_dotted(data, key.strip(), _parse_value(value))
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read ({e.__class__.__name__})") from None
    try:
        data = YAML(typ="safe", pure=True).load(text)
    except YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: YAML error: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys to values")
    return data


def describe_error(err: ValidationError) -> str:
    """One line naming the first offending key (and how many more there are)."""
    problems = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "config"
        if e["type"] == "extra_forbidden":
            problems.append(f"unknown config key {loc!r}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            problems.append(f"{loc}: {msg}" if e["loc"] else msg)
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return problems[0] + more


def build_config(data: dict[str, Any], overrides: list[str] | None = None, **fields: Any) -> TrainConfig:
    """Validate a config mapping plus `key=value` overrides and non-None keyword fields."""
    data = apply_overrides(json.loads(json.dumps(data)), overrides)  # deep copy, plain types
    for key, value in fields.items():
        if value is not None:
            _set_dotted(data, key, value)
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(describe_error(err)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None, **fields: Any) -> TrainConfig:
    """Read a YAML config (or start from defaults), apply overrides, validate and freeze."""
    data = read_yaml(path) if path is not None else {}
    return build_config(data, overrides, **fields)
