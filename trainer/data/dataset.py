"""The training and evaluation dataset over an ImageSet, and the seeded per-epoch sampler.

from trainer.data.dataset import ImageDataset; ds = ImageDataset(image_set, preprocess, "a photo of a {c}.")
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from trainer.data.captions import SpuriousCaptions, TemplateCaptions, training_caption
from trainer.data.sets import ImageSet
from trainer.errors import DataError


class ImageReadError(DataError):
    """An image that cannot be read or decoded: one line naming the file (and its CSV line).

    A DataLoader worker's exception comes back to the main process as this type built on a message that
    holds the worker's whole traceback; the message is cut back to the original line here."""

    def __init__(self, message: str):
        super().__init__(original_message(message))


def original_message(message: str) -> str:
    """The original one-line message of an exception torch re-raised from a DataLoader worker."""
    if not (message.startswith("Caught ") and "Traceback" in message):
        return message
    last = [ln for ln in message.splitlines() if ln.strip()][-1]  # "pkg.module.ErrorName: the message"
    _, sep, text = last.partition(": ")
    return text if sep else last


class ImageDataset(Dataset):
    """Samples of an ImageSet as dicts: image, label, index and, for training, caption and spurious text."""

    def __init__(
        self,
        image_set: ImageSet,
        transform: Callable[[Image.Image], torch.Tensor],
        caption: str | TemplateCaptions | None = None,
        spurious: SpuriousCaptions | None = None,
        extras: dict[str, torch.Tensor] | None = None,
        augment_seed: int | None = None,
        source: str | None = None,
        on_bad_image: str = "error",
    ):
        """augment_seed: seed the (random) transform per (epoch, index); None for a deterministic one.
        source: the set's CSV file (sample i is its line i + 2), named in read errors. on_bad_image:
        error (raise ImageReadError) or skip (warn, count, and give the next readable sample in its place;
        items then carry `bad_image`, the number skipped for them)."""
        self.set, self.transform, self.caption, self.spurious = image_set, transform, caption, spurious
        self.augment_seed, self.source, self.on_bad_image = augment_seed, source, on_bad_image
        self.extras = extras or {}  # per-sample tensors (N, ...), e.g. a method's region masks
        for key, value in self.extras.items():
            if len(value) != len(image_set):
                raise DataError(
                    f"{image_set.name}: extra {key!r} has {len(value)} rows for {len(image_set)} samples"
                )

    def __len__(self) -> int:
        return len(self.set)

    def _transform(self, image: Image.Image, epoch: int, i: int) -> torch.Tensor:
        if self.augment_seed is None:
            return self.transform(image)
        # torchvision's random transforms draw from torch's global generator: seed a private copy of it.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.augment_seed * 1_000_003 + epoch) * 10_000_019 + i) % 2**63)
            return self.transform(image)

    def where(self, i: int) -> str:
        """Where sample i comes from: 'set.csv:LINE: path' or the path."""
        path = self.set.paths[i]
        return f"{self.source}:{i + 2}: {path}" if self.source else str(path)

    def _load(self, i: int, epoch: int) -> torch.Tensor:
        try:
            with Image.open(self.set.paths[i]) as im:
                return self._transform(im.convert("RGB"), epoch, i)
        except (OSError, ValueError, SyntaxError) as e:  # PIL raises SyntaxError on some broken headers
            raise ImageReadError(f"{self.where(i)}: cannot read image ({e.__class__.__name__})") from None

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """key: an index (evaluation, epoch 0) or (index, epoch) from `EpochSampler`."""
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        bad = 0
        while True:
            try:
                image = self._load(i, epoch)
                break
            except ImageReadError as e:
                if self.on_bad_image != "skip" or bad + 1 >= len(self):
                    raise
                bad += 1
                i = (i + 1) % len(self)
                print(f"warning: {e}; skipped (sample {i} in its place)", file=sys.stderr, flush=True)
        item: dict[str, Any] = {"image": image, "label": self.set.labels[i], "index": i}
        if self.on_bad_image == "skip":
            item["bad_image"] = torch.tensor(bad)
        for name, value in self.extras.items():
            item[name] = value[i]
        if self.caption is not None:
            classname = self.set.classes[self.set.labels[i]]
            text = training_caption(self.caption, classname, epoch, i)
            item["caption"] = text
            if self.spurious is not None:
                item["spurious"] = self.spurious(text, epoch, i, classname)
        return item


class EpochSampler(Sampler[tuple[int, int]]):
    """A seeded permutation per epoch, as (index, epoch) keys: the order depends on (seed, epoch) only."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        if not self.shuffle:
            order = list(range(self.n))
        else:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        return iter([(i, self.epoch) for i in order])
