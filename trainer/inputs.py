"""A run's inputs, all checked before anything is written: the method, the image sets, the bank.

    from trainer.inputs import load_inputs; inputs = load_inputs(cfg)   # raises TrainerError, one line

The bank's provenance (path, version, file sha256, content hash, the descriptor ids drawn from) is what
run.json records, so a run names exactly the descriptors it trained with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from descgen.bank import file_sha256, load_bank
from descgen.errors import DescgenError
from trainer.config import TrainConfig
from trainer.data import ImageSet, SpuriousCaptions, load_image_set, read_lines
from trainer.errors import ConfigError
from trainer.methods import MethodSpec, get_method


@dataclass
class Inputs:
    method: MethodSpec
    train: ImageSet | None
    val: ImageSet | None
    evals: list[ImageSet]
    spurious: SpuriousCaptions | None
    bank_info: dict[str, Any] | None

    @property
    def eval_sets(self) -> list[ImageSet]:
        """The sets every evaluation scores: the ID validation set first, then the others."""
        return ([self.val] if self.val else []) + self.evals


def load_bank_descriptors(cfg: TrainConfig) -> tuple[list[Any], dict[str, Any]]:
    """The approved descriptors of `cfg.concepts` in `cfg.bank`, and the bank's provenance."""
    try:
        bank = load_bank(cfg.bank)  # type: ignore[arg-type]
    except DescgenError as e:
        raise ConfigError(f"bank: {e}") from None
    try:
        descriptors = bank.approved(cfg.concepts)
    except KeyError as e:
        raise ConfigError(f"bank {cfg.bank}: no concept {e.args[0]!r}") from None
    if not descriptors:
        raise ConfigError(f"bank {cfg.bank}: no approved descriptor for concept(s) {', '.join(cfg.concepts)}")
    info = {
        "path": str(cfg.bank),
        "version": bank.meta.version,
        "file_sha256": file_sha256(cfg.bank),  # type: ignore[arg-type]
        "content_hash": bank.compute_hash(),
        "concepts": list(cfg.concepts),
        "descriptors": [d.id for d in descriptors],
    }
    return descriptors, info


def load_inputs(cfg: TrainConfig) -> Inputs:
    """Method, datasets and bank, all validated (raises TrainerError with a one-line message)."""
    method = get_method(cfg.method)
    train = load_image_set(cfg.data.train, cfg.templates) if cfg.data.train else None
    base_classes = train.classes if train else None
    val = load_image_set(cfg.data.val, cfg.templates, base_classes) if cfg.data.val else None
    evals = [load_image_set(spec, cfg.templates, base_classes) for spec in cfg.data.eval]
    names = [s.name for s in ([val] if val else []) + evals]
    if len(set(names)) != len(names):
        raise ConfigError(f"evaluation sets need distinct names (have {names}); set `name:` on each")
    if method.objective == "none" and not names:
        raise ConfigError("method zeroshot needs data.val or data.eval")
    spurious, bank_info = None, None
    if method.needs_spurious:
        descriptors: list[Any] = []
        if cfg.spurious == "bank":
            descriptors, bank_info = load_bank_descriptors(cfg)
        words = read_lines(cfg.random_words, "word-list") if cfg.random_words else ()
        spurious = SpuriousCaptions(cfg.spurious, cfg.seed, descriptors, words)
    return Inputs(method, train, val, evals, spurious, bank_info)


def default_run_name(cfg: TrainConfig) -> str:
    """runs/<bank>-<method>-<model>-lr<lr>-b<batch>-s<seed>: the key hyperparameters, readable."""
    bank = Path(cfg.bank).stem if cfg.bank and cfg.method in ("starft", "kl") else "nobank"
    model = Path(cfg.model).stem if cfg.model.endswith(".json") else cfg.model
    return f"{bank}-{cfg.method}-{model}-lr{cfg.lr:g}-b{cfg.batch_size}-s{cfg.seed}"
