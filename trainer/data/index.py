"""A run's index of its sets: each set is listed once per run, by the main process, and read by the others.

    from trainer.data.index import indexed_listings; listings = indexed_listings(specs, run_dir / "index", scan)

Scanning 1.28M files takes minutes; doing it on every process (and holding the listing once per
DataLoader worker) costs time and memory. The main process scans each set and writes its listing into
`<run dir>/index/<key>/` (numpy arrays plus a small JSON); every process then memory-maps the arrays, so
the operating system keeps one copy in memory however many processes and workers read it. The key is a
hash of the data spec, so a `--resume` reuses the index (the same files in the same order) and a changed
spec is listed afresh.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from trainer.config import DataSpec
from trainer.data.columns import GroupColumn, IntColumn, PathColumn
from trainer.data.sets import Listing
from trainer.errors import DataError, TrainerError, WriteError

FORMAT = 1


def spec_key(spec: DataSpec) -> str:
    """The index entry's name: the set's name-ish stem plus a hash of its spec."""
    blob = json.dumps(spec.model_dump(mode="json"), sort_keys=True)
    stem = "".join(c if c.isalnum() or c in "-_" else "-" for c in (spec.name or Path(spec.path).name))
    return f"{stem[:40]}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def save_listing(listing: Listing, folder: Path) -> None:
    """Write a listing into `folder` (through a temporary folder and a rename)."""
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    np.save(tmp / "paths_blob.npy", listing.paths.blob)
    np.save(tmp / "paths_offsets.npy", listing.paths.offsets)
    np.save(tmp / "labels.npy", listing.labels.values)
    np.save(tmp / "groups.npy", listing.groups.codes)
    meta = {
        "format": FORMAT,
        "layout": listing.layout,
        "root": listing.paths.root,
        "classes": listing.classes,
        "class_ids": listing.class_ids,
        "map_ids": listing.map_ids,
        "crop_border": listing.crop_border,
        "group_by": listing.group_by,
        "group_names": listing.groups.names,
        "n": len(listing),
    }
    (tmp / "meta.json").write_text(json.dumps(meta) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def load_listing(folder: Path) -> Listing | None:
    """A listing written by `save_listing`, its arrays memory-mapped; None if there is none."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            return None

        def arr(name: str) -> np.ndarray:
            return np.load(folder / f"{name}.npy", mmap_mode="r")

        listing = Listing(
            meta["layout"],
            PathColumn(meta["root"], arr("paths_blob"), arr("paths_offsets")),
            IntColumn(arr("labels")),  # asarray of a memory map of the same dtype: no copy
            GroupColumn(meta["group_names"], arr("groups")),
            meta["classes"],
            class_ids=meta["class_ids"],
            map_ids=meta["map_ids"],
            crop_border=meta["crop_border"],
            group_by=meta["group_by"],
        )
    except (OSError, ValueError, KeyError) as e:
        raise DataError(
            f"{folder}: unreadable index ({e.__class__.__name__}); remove it to list again"
        ) from None
    if len(listing.paths) != meta["n"] or len(listing.labels) != meta["n"]:
        raise DataError(f"{folder}: index is incomplete; remove it to list the set again")
    return listing


def process_state():
    """accelerate's process group, before any Accelerator exists (reading ACCELERATE_USE_CPU as an
    Accelerator does: a bare PartialState would start a single-process state on CPU launches)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def indexed_listings(
    specs: Sequence[DataSpec],
    index_dir: Path,
    scan: Callable[[int, list[Listing]], Listing],
    check: Callable[[list[Listing]], object] | None = None,
) -> list[Listing]:
    """The listings of `specs`, scanned once into `index_dir` by the main process: `scan(i, done)` lists
    the i-th given the listings before it; `check(listings)` validates them all before anything is written.

    Reuses an entry already there (a resumed run). Every process must call this; an error on the main
    process reaches the others, and nothing is left written.
    """
    from accelerate.utils import broadcast_object_list

    state = process_state()
    state.wait_for_everyone()  # every process has checked the run dir before the main one writes into it
    message: list[str | None] = [None]
    error: BaseException | None = None
    if state.is_main_process:
        created = [p for p in (index_dir.parent, index_dir) if not p.exists()]
        written: list[Path] = []
        try:
            done: list[Listing] = []
            fresh: list[bool] = []
            for i, spec in enumerate(specs):
                listing = load_listing(index_dir / spec_key(spec))
                fresh.append(listing is None)
                done.append(scan(i, done) if listing is None else listing)
            if check is not None:
                check(done)
            for spec, listing, new in zip(specs, done, fresh):
                if new:
                    folder = index_dir / spec_key(spec)
                    folder.parent.mkdir(parents=True, exist_ok=True)
                    save_listing(listing, folder)
                    written.append(folder)
        except Exception as e:  # noqa: BLE001 - the other processes must learn of any failure, or they hang
            if isinstance(e, OSError):  # writing the index: one line naming the path
                e = WriteError(f"{e.filename or index_dir}: cannot write the run's index ({e.strerror or e})")
            error, message = e, [str(e) if isinstance(e, TrainerError) else f"{e.__class__.__name__}: {e}"]
            for p in written + created[::-1]:  # leave nothing behind: the run has not started
                shutil.rmtree(p, ignore_errors=True)
    if state.num_processes > 1:
        broadcast_object_list(message)
    if error is not None:
        raise error
    if message[0] is not None:
        raise DataError(message[0])
    out = []
    for spec in specs:
        listing = load_listing(index_dir / spec_key(spec))
        if listing is None:
            raise DataError(f"{index_dir}: no index for {spec.path}")
        out.append(listing)
    return out
