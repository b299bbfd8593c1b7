"""The training and evaluation dataset over an ImageSet, and the seeded per-epoch sampler.

from trainer.data.dataset import ImageDataset; ds = ImageDataset(image_set, preprocess, "a photo of a {c}.")
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from trainer.data.captions import SpuriousCaptions
from trainer.data.sets import ImageSet, fill_template
from trainer.errors import DataError


class ImageDataset(Dataset):
    """Samples of an ImageSet as dicts: image, label, index and, for training, caption and spurious text."""

    def __init__(
        self,
        image_set: ImageSet,
        transform: Callable[[Image.Image], torch.Tensor],
        caption: str | None = None,
        spurious: SpuriousCaptions | None = None,
        extras: dict[str, torch.Tensor] | None = None,
        augment_seed: int | None = None,
    ):
        """augment_seed: seed the (random) transform per (epoch, index); None for a deterministic one."""
        self.set, self.transform, self.caption, self.spurious = image_set, transform, caption, spurious
        self.augment_seed = augment_seed
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

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """key: an index (evaluation, epoch 0) or (index, epoch) from `EpochSampler`."""
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        path = self.set.paths[i]
        try:
            with Image.open(path) as im:
                image = self._transform(im.convert("RGB"), epoch, i)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: cannot read image ({e.__class__.__name__})") from None
        item: dict[str, Any] = {"image": image, "label": self.set.labels[i], "index": i}
        for name, value in self.extras.items():
            item[name] = value[i]
        if self.caption is not None:
            text = fill_template(self.caption, self.set.classes[self.set.labels[i]])
            item["caption"] = text
            if self.spurious is not None:
                item["spurious"] = self.spurious(text, epoch, i)
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
