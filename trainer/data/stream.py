"""Training from webdataset shards (open_clip's format), streamed: for sets too large to list.

    from trainer.data.stream import load_shard_set, StreamLoader; s = load_shard_set(spec, "simple")

A shard is a tar of samples: an image (`.jpg`, `.jpeg`, `.png`, `.webp`) plus its class, as an index
(`.cls`) or a class name (`.txt`, one of the spec's `classes`). Sample counts come from `sizes.json` beside
the shards (open_clip's: {"shard.tar": n}), else from `num_samples` (split evenly), else from reading the
tar headers once.

Each epoch, the shard order is a permutation seeded by (seed, epoch), the same on every process; process
r takes shards r, r+W, ... and its DataLoader worker w every nw-th of those, so no sample is read twice.
Samples pass through a shuffle buffer (seeded too) and are batched in the process, so every process yields
the same number of full batches: `batches_per_epoch`, computed from the shard sizes so it holds for every
epoch's assignment. With shards of equal size and a shard count divisible by the number of processes,
every sample is seen exactly once an epoch. A resumed epoch restarts at a shard boundary: the shards the
process had already finished are skipped (samples in flight in the buffer when it stopped are seen again).
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from trainer.config import DataSpec
from trainer.data.captions import TemplateCaptions, training_caption
from trainer.data.sets import ImageSet, class_names, load_templates
from trainer.errors import DataError

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def expand_shards(path: str) -> list[Path]:
    """A folder of .tar shards (sorted), or a brace pattern such as data/train-{000000..000099}.tar."""
    p = Path(path)
    if p.is_dir():
        shards = sorted(p.glob("*.tar"))
        if not shards:
            raise DataError(f"{p}: no .tar shards in the folder (layout webdataset)")
        return shards
    from braceexpand import braceexpand  # installed with webdataset

    shards = [Path(s) for s in braceexpand(path)]
    missing = [s for s in shards if not s.is_file()]
    if missing:
        raise DataError(
            f"{missing[0]}: no such shard ({len(missing)} of {len(shards)} missing; layout webdataset)"
        )
    return shards


def count_samples(shard: Path) -> int:
    """Samples in a shard: distinct keys (file names up to the first dot) among its members."""
    keys = set()
    try:
        with tarfile.open(shard) as tar:
            for m in tar:
                if m.isfile():  # webdataset's key: the folder plus the file name up to its first dot
                    folder, _, base = m.name.rpartition("/")
                    keys.add(f"{folder}/{base.split('.', 1)[0]}")
    except (OSError, tarfile.TarError) as e:
        raise DataError(f"{shard}: not a readable tar shard ({e.__class__.__name__})") from None
    return len(keys)


def shard_sizes(shards: list[Path], num_samples: int | None) -> list[int]:
    sizes_file = shards[0].parent / "sizes.json"
    if sizes_file.is_file():
        try:
            table = json.loads(sizes_file.read_text())
            return [int(table[s.name]) for s in shards]
        except (ValueError, KeyError) as e:
            raise DataError(f"{sizes_file}: no size for shard {e.args[0] if e.args else '?'}") from None
    if num_samples is not None:
        base, extra = divmod(num_samples, len(shards))
        return [base + (i < extra) for i in range(len(shards))]
    return [count_samples(s) for s in shards]


@dataclass
class ShardSet(ImageSet):
    """A streamed training set: its shards, their sample counts, and its classes (no per-file listing)."""

    shards: list[Path] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return sum(self.sizes)


def load_shard_set(spec: DataSpec, default_templates: str | list[str], name: str) -> ShardSet:
    """Check a webdataset spec: the shards exist, their sizes are known, the classes are given."""
    classes = class_names(spec.classes, spec.path)
    if classes is None:
        raise DataError(f"{spec.path}: a webdataset needs `classes` (a class-names file or list)")
    for key in ("split", "labels", "class_subset", "group_prompts"):
        if getattr(spec, key) is not None:
            raise DataError(f"{spec.path}: `{key}` is not used by layout webdataset")
    shards = expand_shards(spec.path)
    return ShardSet(
        name=name,
        paths=[],
        labels=[],
        classes=classes,
        groups=[],
        templates=load_templates(spec.templates if spec.templates is not None else default_templates),
        layout="webdataset",
        shards=shards,
        sizes=shard_sizes(shards, spec.num_samples),
    )


def batches_per_epoch(sizes: list[int], world: int, batch: int) -> int:
    """Full batches of `batch` (per process) every process can yield in any epoch: its fewest samples are
    the sum of the len(sizes) // world smallest shards."""
    fewest = sum(sorted(sizes)[: len(sizes) // world])
    return fewest // batch


def epoch_shards(n: int, seed: int, epoch: int, rank: int, world: int) -> list[int]:
    """This process's shards in epoch `epoch`: a seeded permutation, every world-th from `rank`."""
    order = list(range(n))
    random.Random(f"shards-{seed}-{epoch}").shuffle(order)
    return order[rank::world]


class ShardStream(IterableDataset):
    """Samples (dicts, as ImageDataset's) of this process's shards for one epoch, split across workers."""

    def __init__(
        self,
        s: ShardSet,
        transform: Callable[[Image.Image], torch.Tensor],
        caption: str | TemplateCaptions | None,
        spurious: Any,
        seed: int,
        rank: int,
        world: int,
        buffer: int = 1000,
        augment_seed: int | None = None,
    ):
        self.s, self.transform, self.caption, self.spurious = s, transform, caption, spurious
        self.seed, self.rank, self.world, self.buffer = seed, rank, world, buffer
        self.augment_seed = augment_seed
        self.offsets = [0]
        for n in s.sizes:
            self.offsets.append(self.offsets[-1] + n)
        self.epoch, self.skip_shards = 0, 0
        self.class_index = {c: i for i, c in enumerate(s.classes)}

    def shards(self) -> list[int]:
        """This process's shard indices of the current epoch, after the skipped ones."""
        return epoch_shards(len(self.s.shards), self.seed, self.epoch, self.rank, self.world)[
            self.skip_shards :
        ]

    def _raw(self, shard_ids: list[int]) -> Iterator[dict[str, Any]]:
        import webdataset as wds  # optional at import time: only streamed training needs it

        for sid in shard_ids:
            url = str(self.s.shards[sid])
            for pos, sample in enumerate(wds.tarfile_to_samples()(iter([{"url": url}]))):
                sample["__index__"] = self.offsets[sid] + pos
                yield sample

    def _label(self, sample: dict[str, Any]) -> int:
        where = f"{sample.get('__url__')}: {sample.get('__key__')}"
        if "cls" in sample:
            try:
                y = int(sample["cls"].decode().strip())
            except ValueError:
                raise DataError(f"{where}: .cls is not a class index") from None
            if not 0 <= y < len(self.s.classes):
                raise DataError(f"{where}: class {y} out of range ({len(self.s.classes)} classes)")
            return y
        if "txt" in sample:
            name = sample["txt"].decode().strip()
            if name not in self.class_index:
                raise DataError(f"{where}: .txt {name!r} is not a class name")
            return self.class_index[name]
        raise DataError(f"{where}: no .cls or .txt")

    def _image(self, sample: dict[str, Any], index: int) -> torch.Tensor:
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        if key is None:
            raise DataError(f"{sample.get('__url__')}: {sample.get('__key__')}: no image (.jpg/.png/.webp)")
        with Image.open(io.BytesIO(sample[key])) as im:
            image = im.convert("RGB")
        if self.augment_seed is None:
            return self.transform(image)
        with torch.random.fork_rng(devices=[]):  # random transforms seeded per (epoch, sample)
            torch.manual_seed(((self.augment_seed * 1_000_003 + self.epoch) * 10_000_019 + index) % 2**63)
            return self.transform(image)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        import webdataset as wds

        raw = self._raw(self.shards()[wid::nw])
        seed = ((self.seed * 1_000_003 + self.epoch) * 1009 + self.rank) * 1009 + wid
        shuffled = wds.shuffle(self.buffer, initial=min(self.buffer, 100), seed=seed)(raw)
        for sample in shuffled:
            i, y = sample["__index__"], self._label(sample)
            item: dict[str, Any] = {"image": self._image(sample, i), "label": y, "index": i}
            if self.caption is not None:
                text = training_caption(self.caption, self.s.classes[y], self.epoch, i)
                item["caption"] = text
                if self.spurious is not None:
                    item["spurious"] = self.spurious(text, self.epoch, i, self.s.classes[y])
            yield item


class StreamLoader:
    """Full per-process batches of a ShardStream, `length` of them an epoch, on `device`.

    Workers decode and transform; batching happens here, in the process, so a worker's leftover samples
    are not lost. `set_epoch(e)` before iterating; `resume(k)`: the epoch's first k batches were done.
    """

    def __init__(
        self,
        stream: ShardStream,
        batch_size: int,
        collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
        num_workers: int,
        length: int,
        device: Any = None,
    ):
        self.stream, self.batch_size, self.collate, self.length = stream, batch_size, collate, length
        self.num_workers, self.device, self.done = num_workers, device, 0

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self.stream.epoch, self.stream.skip_shards, self.done = epoch, 0, 0

    def resume(self, done_batches: int) -> StreamLoader:
        """Continue an epoch of which `done_batches` were trained: from the shard boundary at or before."""
        consumed = done_batches * self.batch_size
        sizes = [self.stream.s.sizes[i] for i in self.stream.shards()]
        k, total = 0, 0
        while k < len(sizes) and total + sizes[k] <= consumed:
            total += sizes[k]
            k += 1
        self.stream.skip_shards, self.done = k, done_batches
        return self

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        loader = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers)
        want, buf, n = self.length - self.done, [], 0
        if want <= 0:
            return
        for item in loader:
            buf.append(item)
            if len(buf) == self.batch_size:
                batch = self.collate(buf)
                buf = []
                yield {k: v.to(self.device) for k, v in batch.items()} if self.device is not None else batch
                n += 1
                if n == want:
                    return
        raise DataError(
            f"{self.stream.s.shards[0].parent}: shards ran out after {n} of {want} batches (wrong sizes.json?)"
        )


def peek_samples(s: ShardSet, k: int = 3) -> list[tuple[str, str]]:
    """The first k (shard:key, class name) pairs of the first shard: what `--dry-run` shows."""
    stream = ShardStream(s, lambda im: im, None, None, seed=0, rank=0, world=1)
    out = []
    for sample in stream._raw([0]):
        out.append((f"{s.shards[0]}:{sample['__key__']}", s.classes[stream._label(sample)]))
        if len(out) == k:
            break
    return out


def stream_loader(
    s: ShardSet,
    transform: Callable[[Image.Image], torch.Tensor],
    caption: str | None,
    spurious: Any,
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    accelerator: Any,
    micro: int,
    seed: int,
    num_workers: int = 0,
    augment_seed: int | None = None,
) -> StreamLoader:
    """The training loader of a streamed set: this process's share of the global micro-batch `micro`, on
    the accelerator's device. Not for `accelerator.prepare`: the stream is already split by process."""
    world, rank = accelerator.num_processes, accelerator.process_index
    per = micro // world
    stream = ShardStream(s, transform, caption, spurious, seed, rank, world, augment_seed=augment_seed)
    length = batches_per_epoch(s.sizes, world, per)
    if length == 0:
        raise DataError(f"{s.shards[0].parent}: too few samples per process for one batch of {per}")
    return StreamLoader(stream, per, collate, num_workers, length, accelerator.device)
