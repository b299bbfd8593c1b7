"""A run's inputs, all checked before anything is written: the method, the image sets, the bank.

    from trainer.inputs import load_inputs; inputs = load_inputs(cfg)   # raises TrainerError, one line

The bank's provenance (path, version, file sha256, content hash, the descriptor ids drawn from) is what
run.json records, so a run names exactly the descriptors it trained with. The bank is checked first, so a
bad bank fails in seconds, before a scan of a large set. With `index_dir` (a run's `index/`), each set is
listed once by the main process and read by the others (trainer.data.index).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from descgen.bank import file_sha256, load_bank
from descgen.errors import DescgenError
from trainer.config import DataSpec, TrainConfig
from trainer.data import ImageSet, SpuriousCaptions, load_image_set, load_templates, read_lines
from trainer.data.index import indexed_listings
from trainer.data.sets import Listing, default_set_name, resolve_class_map, scan_set
from trainer.data.stream import load_shard_set
from trainer.errors import ConfigError, DataError
from trainer.methods import MethodSpec, get_method, method_options


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
        descriptors = bank.approved_styled(cfg.concepts)  # (descriptor, its concept's caption style)
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
        "descriptors": [d.id for d, _ in descriptors],
    }
    return descriptors, info


def load_sets(cfg: TrainConfig, index_dir: Path | None = None) -> list[ImageSet]:
    """The train (if any), val (if any) and eval sets, in that order, loaded and their class maps resolved."""
    specs: list[DataSpec] = [s for s in (cfg.data.train, cfg.data.val) if s is not None] + list(cfg.data.eval)
    for spec in specs[1:] if cfg.data.train is not None else specs:
        if spec.layout == "webdataset":
            raise DataError(f"{spec.path}: a webdataset is streamed for training; evaluation sets are listed")
    stream = None
    if cfg.data.train is not None and cfg.data.train.layout == "webdataset":
        stream = load_shard_set(cfg.data.train, cfg.templates, default_set_name(cfg.data.train))
        specs = specs[1:]
    has_train = cfg.data.train is not None

    def scan(i: int, done: list[Listing]) -> Listing:
        if stream is not None:
            return scan_set(specs[i], stream.classes)
        default_classes = done[0].classes if has_train and i > 0 else None
        return scan_set(specs[i], default_classes)

    def build(listings: list[Listing]) -> list[ImageSet]:
        sets = [load_image_set(spec, cfg.templates, listing=ls) for spec, ls in zip(specs, listings)]
        all_specs = [cfg.data.train, *specs] if stream is not None else specs
        sets = [stream, *sets] if stream is not None else sets
        base = sets[0] if sets and (has_train or cfg.data.val is not None) else None
        for spec, s in zip(all_specs, sets):
            resolve_class_map(s, None if s is base else base, spec.class_subset)  # type: ignore[union-attr]
        return sets

    if index_dir is None:
        listings: list[Listing] = []
        for i in range(len(specs)):
            listings.append(scan(i, listings))
    else:  # the main process checks everything before it writes the index
        listings = indexed_listings(specs, index_dir, scan, check=build)
    return build(listings)


def load_inputs(cfg: TrainConfig, index_dir: Path | None = None) -> Inputs:
    """Method, bank and datasets, all validated (raises TrainerError with a one-line message)."""
    method = get_method(cfg.method)
    names = [default_set_name(s) for s in ([cfg.data.val] if cfg.data.val else []) + list(cfg.data.eval)]
    if len(set(names)) != len(names):
        raise ConfigError(f"evaluation sets need distinct names (have {names}); set `name:` on each")
    if method.objective == "none" and not names:
        raise ConfigError("method zeroshot needs data.val or data.eval")
    method_options(method, cfg)  # the method's own options, checked before anything is written
    if cfg.caption_templates is not None:
        load_templates(cfg.caption_templates)
    spurious, bank_info = None, None
    if method.needs_spurious:
        descriptors: list[Any] = []
        if cfg.spurious == "bank":
            descriptors, bank_info = load_bank_descriptors(cfg)
        words = read_lines(cfg.random_words, "word-list") if cfg.random_words else ()
        spurious = SpuriousCaptions(cfg.spurious, cfg.seed, descriptors, words)
    if method.setup is not None and cfg.data.train is not None and cfg.data.train.layout == "webdataset":
        raise ConfigError(f"method {cfg.method} prepares every training image first; it needs a listed set")
    sets = load_sets(cfg, index_dir)
    train = sets.pop(0) if cfg.data.train is not None else None
    val = sets.pop(0) if cfg.data.val is not None else None
    return Inputs(method, train, val, sets, spurious, bank_info)


def default_run_name(cfg: TrainConfig) -> str:
    """runs/<bank>-<method>-<model>-lr<lr>-b<batch>-s<seed>: the key hyperparameters, readable."""
    bank = Path(cfg.bank).stem if cfg.bank and cfg.method in ("starft", "kl") else "nobank"
    model = Path(cfg.model).stem if cfg.model.endswith(".json") else cfg.model
    return f"{bank}-{cfg.method}-{model}-lr{cfg.lr:g}-b{cfg.batch_size}-s{cfg.seed}"
