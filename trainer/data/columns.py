"""Compact read-only columns for large listings: paths, labels and groups as numpy arrays, not Python objects.

    from trainer.data.columns import PathColumn; paths = PathColumn.from_strings("/data/imagenet", ["a.jpg"])

A listing of 1.28M files held as a list of `Path` objects costs hundreds of MB and, because reading a
Python object touches its reference count, every forked DataLoader worker ends up with its own copy of the
pages (the copy-on-access problem open_clip notes for its CSV datasets). These columns keep the same data
in a few numpy arrays (memory-mapped when read from a run's index), which workers share with the parent.
They behave as sequences: `col[i]`, `len(col)`, iteration, and `==` against a list.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np


class _Column(Sequence):
    def __eq__(self, other: object) -> bool:
        if isinstance(other, (list, tuple, _Column)):
            return len(self) == len(other) and list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        head = ", ".join(repr(self[i]) for i in range(min(3, len(self))))
        return f"{self.__class__.__name__}([{head}{', ...' if len(self) > 3 else ''}], n={len(self)})"


class PathColumn(_Column):
    """Paths under one root, stored as one UTF-8 blob plus offsets; `col[i]` is a `Path`."""

    def __init__(self, root: str, blob: np.ndarray, offsets: np.ndarray):
        self.root, self.blob, self.offsets = root, blob, offsets

    @classmethod
    def from_strings(cls, root: str | Path, rel: Sequence[str]) -> PathColumn:
        """Paths relative to `root` (absolute paths are kept as they are)."""
        encoded = [s.encode("utf-8") for s in rel]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
        blob = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, np.uint8)
        return cls(str(root), blob, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def relative(self, i: int) -> str:
        return self.blob[self.offsets[i] : self.offsets[i + 1]].tobytes().decode("utf-8")

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return Path(self.root) / self.relative(i)

    def __iter__(self) -> Iterator[Path]:
        root = Path(self.root)
        for i in range(len(self)):
            yield root / self.relative(i)


class IntColumn(_Column):
    """Integers (labels) as a numpy array; `col[i]` is a Python int."""

    def __init__(self, values: np.ndarray | Sequence[int]):
        self.values = np.asarray(values, dtype=np.int32)

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return self.values[i].tolist()
        return int(self.values[i])

    def __iter__(self) -> Iterator[int]:
        return iter(self.values.tolist())

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        return np.asarray(self.values, dtype=dtype)  # numpy / torch.as_tensor read the array directly


class GroupColumn(_Column):
    """Group names as codes into `names` (-1: no group); `col[i]` is a name or None."""

    def __init__(self, names: list[str], codes: np.ndarray | Sequence[int]):
        self.names, self.codes = list(names), np.asarray(codes, dtype=np.int16)

    @classmethod
    def from_values(cls, values: Sequence[str | None]) -> GroupColumn:
        names = sorted({v for v in values if v is not None})
        code = {n: i for i, n in enumerate(names)}
        return cls(names, [-1 if v is None else code[v] for v in values])

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        c = int(self.codes[i])
        return None if c < 0 else self.names[c]

    def __iter__(self) -> Iterator[str | None]:
        names = self.names
        return iter(None if c < 0 else names[c] for c in self.codes.tolist())
