"""Published dataset layouts: ImageNet and its shifts, ObjectNet, Waterbirds and PACS, read as released.

    from trainer.data.layouts import scan_layout; listing = scan_layout(DataSpec(path="imagenet-r", layout="imagenet-r"))

The class lists these layouts need ship in trainer/data/meta/ (each file says where it came from): ImageNet's
1000 wnids (sorted: the index order of its wnid folders) and names, the 200-class subsets of ImageNet-R and
ImageNet-A, and ObjectNet's 113 classes shared with ImageNet. ImageNet-V2's folders are named by class
index ("0" ... "999"), so they are read by number, never sorted as strings (folder "10" is class 10, not the
third folder). Subsets (R, A) and ObjectNet name the ImageNet classes they are scored on (`map_ids`); an
evaluation projects the training-class logits onto them (trainer.evaluate).
"""

from __future__ import annotations

import csv
import json
import os
from functools import cache
from pathlib import Path

from trainer.config import DataSpec
from trainer.data.columns import GroupColumn, IntColumn, PathColumn
from trainer.data.sets import (
    IMG_EXTENSIONS,
    Listing,
    class_names,
    read_lines,
    scan_class_folders,
    subfolders,
)
from trainer.errors import DataError

META = Path(__file__).parent / "meta"
WATERBIRDS_CLASSES = ["landbird", "waterbird"]
WATERBIRDS_PLACES = ["land", "water"]  # metadata.csv `place`: 0 land, 1 water
WATERBIRDS_SPLITS = {"train": "0", "val": "1", "test": "2"}


@cache
def imagenet_wnids() -> list[str]:
    """ImageNet-1k's 1000 WordNet ids, sorted (the class index order)."""
    return read_lines(META / "imagenet_wnids.txt", "metadata")


@cache
def imagenet_classes() -> list[str]:
    """ImageNet-1k's 1000 class names, in wnid order (CLIP's names, as open_clip ships them)."""
    return read_lines(META / "imagenet_classes.txt", "metadata")


@cache
def imagenet_subset(which: str) -> list[str]:
    """The 200 wnids of ImageNet-R (`r`) or ImageNet-A (`a`), sorted."""
    return read_lines(META / f"imagenet_{which}_wnids.txt", "metadata")


@cache
def objectnet_classes() -> dict[str, dict[str, list[str]]]:
    """ObjectNet's classes shared with ImageNet: {name: {folders: [...], imagenet_wnids: [...]}}."""
    return json.loads((META / "objectnet_imagenet.json").read_text())["classes"]


def _names(spec: DataSpec, default: list[str]) -> list[str]:
    names = class_names(spec.classes, spec.path)
    if names is None:
        return default
    if len(names) != len(default):
        raise DataError(f"{spec.path}: {len(names)} class names for the layout's {len(default)} classes")
    return names


def _check_folders(root: Path, found: list[str], expected: list[str], layout: str) -> None:
    exp = set(expected)
    unknown = [f for f in found if f not in exp and not f.startswith(".")]
    if unknown:
        raise DataError(
            f"{root}: folder {unknown[0]!r} is not a {layout} class folder "
            f"({len(unknown)} unknown; point `path` at the folder that holds the class folders)"
        )
    missing = sorted(exp - set(found))
    if missing:
        raise DataError(
            f"{root}: {len(missing)} of {len(expected)} {layout} class folders missing (e.g. {missing[0]})"
        )


def _listing(layout: str, root: Path, rel, labels, classes, groups=None, **kw) -> Listing:
    return Listing(
        layout,
        PathColumn.from_strings(root, rel),
        IntColumn(labels),
        GroupColumn.from_values(groups if groups is not None else [None] * len(rel)),
        classes,
        **kw,
    )


def _wnid_folders(spec: DataSpec, wnids: list[str], layout: str) -> tuple[Path, list[str], list[int]]:
    root = Path(spec.path)
    _check_folders(root, subfolders(root), wnids, layout)
    rel, labels = scan_class_folders(root, wnids, range(len(wnids)), layout)
    return root, rel, labels


def _imagenet_label_file(root: Path, spec: DataSpec) -> Path:
    if spec.labels is not None:
        return Path(spec.labels)
    for cand in (root / "LOC_val_solution.csv", root.parent / "LOC_val_solution.csv"):
        if cand.is_file():
            return cand
    raise DataError(
        f"{root}: flat ImageNet files need a label file (`labels:` LOC_val_solution.csv, lines 'file wnid', "
        "or the devkit's ground truth with map_clsloc.txt beside it), or wnid folders"
    )


def _read_imagenet_labels(label_file: Path, files: list[str]) -> dict[str, str]:
    """{file stem: wnid} from a label file in one of the published forms."""
    wnids = set(imagenet_wnids())
    try:
        text = label_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{label_file}: no such label file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{label_file}: cannot read ({e.__class__.__name__})") from None
    lines = text.splitlines()
    out: dict[str, str] = {}
    if lines and lines[0].replace(" ", "").lower().startswith("imageid,predictionstring"):
        for i, row in enumerate(csv.reader(lines[1:]), start=2):  # Kaggle's LOC_val_solution.csv
            if not row:
                continue
            if len(row) < 2 or not row[1].split():
                raise DataError(f"{label_file}:{i}: expected ImageId,PredictionString")
            out[row[0].strip()] = row[1].split()[0]
    else:
        body = [(i, ln.replace(",", " ").split()) for i, ln in enumerate(lines, start=1) if ln.strip()]
        if body and all(len(t) == 1 for _, t in body):  # one label per line, in the sorted files' order
            if len(body) != len(files):
                raise DataError(f"{label_file}: {len(body)} labels for {len(files)} image files")
            tokens = [t[0] for _, t in body]
            if all(t.isdigit() for t in tokens):  # the devkit's ILSVRC2012_ID (1-based, devkit order)
                tokens = _devkit_ids_to_wnids(label_file, tokens)
            out = {Path(f).stem: t for f, t in zip(files, tokens)}
        else:
            for i, t in body:
                if len(t) < 2:
                    raise DataError(f"{label_file}:{i}: expected 'file wnid'")
                out[Path(t[0]).stem] = t[1]
    for stem, w in out.items():
        if w not in wnids:
            raise DataError(f"{label_file}: label {w!r} of {stem} is not an ImageNet wnid")
    return out


def _devkit_ids_to_wnids(label_file: Path, ids: list[str]) -> list[str]:
    map_file = label_file.parent / "map_clsloc.txt"
    if not map_file.is_file():
        raise DataError(
            f"{label_file}: numeric labels are the devkit's class ids; put the devkit's map_clsloc.txt "
            "beside it (or use LOC_val_solution.csv / 'file wnid' lines)"
        )
    by_id = {}
    for ln in read_lines(map_file, "devkit class map"):
        parts = ln.split()
        if len(parts) >= 2 and parts[1].isdigit():
            by_id[parts[1]] = parts[0]
    try:
        return [by_id[t] for t in ids]
    except KeyError as e:
        raise DataError(f"{label_file}: class id {e.args[0]} is not in {map_file}") from None


def scan_imagenet(spec: DataSpec) -> Listing:
    """ImageNet-1k: wnid folders (train, or a reorganised val), or flat val files plus a label file."""
    root, wnids = Path(spec.path), imagenet_wnids()
    names = _names(spec, imagenet_classes())
    if subfolders(root):
        root, rel, labels = _wnid_folders(spec, wnids, "imagenet")
    else:
        files = sorted(f for f in os.listdir(root) if f.lower().endswith(IMG_EXTENSIONS))
        if not files:
            raise DataError(f"{root}: no wnid folders and no image files (layout imagenet)")
        by_stem = _read_imagenet_labels(_imagenet_label_file(root, spec), files)
        index = {w: i for i, w in enumerate(wnids)}
        missing = [f for f in files if Path(f).stem not in by_stem]
        if missing:
            raise DataError(f"{root}: {len(missing)} image files have no label (e.g. {missing[0]})")
        rel, labels = files, [index[by_stem[Path(f).stem]] for f in files]
    return _listing("imagenet", root, rel, labels, names, class_ids=list(wnids))


def scan_imagenet_v2(spec: DataSpec) -> Listing:
    """ImageNet-V2: folders "0" ... "999", each named by its class index (read as numbers)."""
    root, wnids = Path(spec.path), imagenet_wnids()
    found = subfolders(root)
    _check_folders(root, found, [str(i) for i in range(len(wnids))], "imagenet-v2")
    folders = [str(i) for i in range(len(wnids))]  # numeric order: folder "10" is class 10
    rel, labels = scan_class_folders(root, folders, range(len(wnids)), "imagenet-v2")
    return _listing("imagenet-v2", root, rel, labels, _names(spec, imagenet_classes()), class_ids=list(wnids))


def scan_imagenet_sketch(spec: DataSpec) -> Listing:
    """ImageNet-Sketch: wnid folders, all 1000 classes."""
    root, rel, labels = _wnid_folders(spec, imagenet_wnids(), "imagenet-sketch")
    return _listing(
        "imagenet-sketch", root, rel, labels, _names(spec, imagenet_classes()), class_ids=imagenet_wnids()
    )


def scan_imagenet_subset(spec: DataSpec, which: str) -> Listing:
    """ImageNet-R / ImageNet-A: wnid folders of their 200 classes, scored on those ImageNet classes."""
    layout, sub = f"imagenet-{which}", imagenet_subset(which)
    root, rel, labels = _wnid_folders(spec, sub, layout)
    name_of = dict(zip(imagenet_wnids(), imagenet_classes()))
    names = _names(spec, [name_of[w] for w in sub])
    return _listing(layout, root, rel, labels, names, class_ids=list(sub), map_ids=[[w] for w in sub])


def scan_objectnet(spec: DataSpec) -> Listing:
    """ObjectNet: its folders of the 113 classes shared with ImageNet (others dropped); 1-pixel border off."""
    root = Path(spec.path)
    if (root / "images").is_dir():  # the release's objectnet-1.0/ with images/ and mappings/
        root = root / "images"
    shared = objectnet_classes()
    names = sorted(shared)
    found = set(subfolders(root))
    folders = [f for n in names for f in shared[n]["folders"]]
    missing = [f for f in folders if f not in found]
    if missing:
        raise DataError(
            f"{root}: {len(missing)} of ObjectNet's {len(folders)} shared class folders missing (e.g. {missing[0]})"
        )
    labels_of = [i for i, n in enumerate(names) for _ in shared[n]["folders"]]
    rel, labels = scan_class_folders(root, folders, labels_of, "objectnet")
    return _listing(
        "objectnet",
        root,
        rel,
        labels,
        _names(spec, names),
        class_ids=names,
        map_ids=[list(shared[n]["imagenet_wnids"]) for n in names],
        crop_border=1,  # the dataset's authors: every image has a 1-pixel red border to crop before use
    )


def scan_waterbirds(spec: DataSpec) -> Listing:
    """Waterbirds: metadata.csv (img_filename, y, split, place); bird type is the class, place the group."""
    path = Path(spec.path)
    meta = path if path.is_file() else path / "metadata.csv"
    root = meta.parent
    split = None
    if spec.split is not None:
        split = WATERBIRDS_SPLITS.get(spec.split, spec.split)
        if split not in WATERBIRDS_SPLITS.values():
            raise DataError(f"{meta}: split {spec.split!r} is not train, val or test (or 0, 1, 2)")
    try:
        with meta.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            need = ("img_filename", "y", "split", "place")
            if any(k not in header for k in need):
                raise DataError(f"{meta}:1: header must have columns {', '.join(need)} (has {header})")
            rows = list(reader)
    except FileNotFoundError:
        raise DataError(f"{meta}: no such file (Waterbirds' metadata.csv)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{meta}: cannot read ({e.__class__.__name__})") from None
    rel, labels, groups = [], [], []
    for i, row in enumerate(rows, start=2):
        if split is not None and row["split"].strip() != split:
            continue
        y, place = row["y"].strip(), row["place"].strip()
        if y not in ("0", "1") or place not in ("0", "1"):
            raise DataError(f"{meta}:{i}: y and place must be 0 or 1")
        name = row["img_filename"].strip()
        if not (root / name).is_file():
            raise DataError(f"{meta}:{i}: missing image {root / name}")
        rel.append(name)
        labels.append(int(y))
        groups.append(WATERBIRDS_PLACES[int(place)])
    if not rel:
        raise DataError(f"{meta}: no rows" + (f" in split {spec.split}" if split is not None else ""))
    return _listing("waterbirds", root, rel, labels, _names(spec, WATERBIRDS_CLASSES), groups)


def scan_pacs(spec: DataSpec) -> Listing:
    """PACS: domain/class/image folders; the domain is the group, accuracy per domain."""
    root = Path(spec.path)
    if (root / "kfold").is_dir():  # the release's PACS/kfold/<domain>/<class>/
        root = root / "kfold"
    domains = subfolders(root)
    if not domains:
        raise DataError(f"{root}: no domain folders (layout pacs: domain/class/image)")
    folders = sorted({c for d in domains for c in subfolders(root / d)})
    if not folders:
        raise DataError(f"{root}: no class folders under the domains (layout pacs)")
    rel, labels, groups = [], [], []
    for d in domains:
        present = subfolders(root / d)
        if present != folders:
            raise DataError(f"{root / d}: classes {present} differ from the other domains' {folders}")
        r, y = scan_class_folders(root / d, folders, range(len(folders)), "pacs")
        rel += [os.path.join(d, p) for p in r]
        labels += y
        groups += [d] * len(r)
    names = _names(spec, [c.replace("_", " ") for c in folders])
    return _listing("pacs", root, rel, labels, names, groups, class_ids=folders, group_by="group")


SCANNERS = {
    "imagenet": scan_imagenet,
    "imagenet-v2": scan_imagenet_v2,
    "imagenet-sketch": scan_imagenet_sketch,
    "imagenet-r": lambda spec: scan_imagenet_subset(spec, "r"),
    "imagenet-a": lambda spec: scan_imagenet_subset(spec, "a"),
    "objectnet": scan_objectnet,
    "waterbirds": scan_waterbirds,
    "pacs": scan_pacs,
}
_USES = {"split": ("waterbirds",), "labels": ("imagenet",), "num_samples": ("webdataset",)}


def scan_layout(spec: DataSpec) -> Listing:
    """Scan a set in a published layout (not csv / imagefolder / webdataset)."""
    layout = spec.layout or ""
    if layout == "webdataset":
        raise DataError(f"{spec.path}: a webdataset is streamed, not listed (training sets only)")
    for key, layouts in _USES.items():
        if getattr(spec, key) is not None and layout not in layouts:
            raise DataError(f"{spec.path}: `{key}` is not used by layout {layout}")
    path = Path(spec.path)
    if not path.exists():
        raise DataError(f"{path}: no such dataset (layout {layout})")
    return SCANNERS[layout](spec)
