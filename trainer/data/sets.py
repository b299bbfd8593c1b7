"""Image sets: the files, labels, groups, class names and zero-shot templates of a data spec.

    from trainer.data.sets import load_image_set; s = load_image_set(cfg.data.train, default_templates="simple")

A set is a CSV with columns path,label[,group] (paths relative to the CSV's folder; label an index or a
class name), an ImageFolder tree, or a published layout (`layout:`, trainer.data.layouts: ImageNet and its
shifts, ObjectNet, Waterbirds, PACS). Scanning a set gives a `Listing` (files, labels, groups, classes);
the listing is what a run's index stores (trainer.data.index), so a large set is scanned once per run.
Everything is checked when loading, before a run starts, so a bad file fails fast and names its line.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from open_clip import OPENAI_IMAGENET_TEMPLATES

from trainer.config import DataSpec
from trainer.data.columns import GroupColumn, IntColumn, PathColumn
from trainer.errors import DataError

Template = Callable[[str], str]

SIMPLE_TEMPLATES = ("a photo of a {c}.",)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's


@dataclass
class Listing:
    """What scanning a set finds: its files, labels, groups and classes (no templates)."""

    layout: str
    paths: PathColumn
    labels: IntColumn
    groups: GroupColumn
    classes: list[str]
    class_ids: list[str] | None = None  # the classes' folder ids (e.g. wnids), when the layout has them
    map_ids: list[list[str]] | None = (
        None  # per class: the training-class ids it is scored on (R, A, ObjectNet)
    )
    crop_border: int = 0  # pixels cropped off every side before the preprocess (ObjectNet's 1-pixel border)
    group_by: str = "class_group"  # the layout's default

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class ImageSet:
    """A loaded, checked image set."""

    name: str
    paths: Sequence[Path]
    labels: Sequence[int]
    classes: list[str]
    groups: Sequence[str | None]  # per sample; None when the set has no group column
    templates: list[Template] = field(default_factory=list)
    group_prompts: list[str] = field(default_factory=list)
    group_by: str = "class_group"
    layout: str = "csv"
    class_ids: list[str] | None = None
    map_ids: list[list[str]] | None = None
    crop_border: int = 0
    # Set by `resolve_class_map` against the training classes: per class of this set, the training classes
    # whose logits score it (one each for a subset such as ImageNet-R; several for ObjectNet, max taken).
    class_map: list[list[int]] | None = None
    base_classes: list[str] | None = None  # the training classes' names `class_map` indexes

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def group_names(self) -> list[str]:
        if isinstance(self.groups, GroupColumn):
            return sorted(set(self.groups.names))
        return sorted({g for g in self.groups if g is not None})

    def group_keys(self) -> list[str | None]:
        """Per-sample group key used for group accuracy: 'class/group' or 'group'."""
        if not self.group_names:
            return [None] * len(self)
        if self.group_by == "group":
            return list(self.groups)
        return [None if g is None else f"{self.classes[y]}/{g}" for y, g in zip(self.labels, self.groups)]


def fill_template(template: str, c: str, g: str | None = None) -> str:
    """A template with the class name for {c} (or {}) and, if given, the group name for {g}."""
    out = template.replace("{c}", c).replace("{}", c)
    return out.replace("{g}", g) if g is not None else out


def load_templates(spec: str | Sequence[str]) -> list[Template]:
    """openai (open_clip's 80 ImageNet templates) | simple | a file (one per line) | a list of strings."""
    if isinstance(spec, str):
        if spec == "openai":
            return list(OPENAI_IMAGENET_TEMPLATES)
        if spec == "simple":
            spec = list(SIMPLE_TEMPLATES)
        else:
            spec = read_lines(spec, "templates")
    if not spec:
        raise DataError("templates: empty list")
    for t in spec:
        if "{c}" not in t and "{}" not in t:
            raise DataError(f"template {t!r} has no {{c}} placeholder")
    return [lambda c, t=t: fill_template(t, c) for t in spec]


def read_lines(path: str | Path, what: str) -> list[str]:
    """Non-empty lines of a text file, '#' comment lines skipped."""
    p = Path(path)
    try:
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    except FileNotFoundError:
        raise DataError(f"{p}: no such {what} file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{p}: cannot read {what} ({e.__class__.__name__})") from None
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise DataError(f"{p}: empty {what} file")
    return lines


def class_names(spec: str | list[str] | None, where: str) -> list[str] | None:
    """A `classes:` value (file or list) as names, checked for duplicates; None if not given."""
    if spec is None:
        return None
    names = list(spec) if isinstance(spec, list) else read_lines(spec, "class-names")
    if len(set(names)) != len(names):
        raise DataError(f"{where}: duplicate class names")
    return names


def _parse_label(raw: str, classes: list[str], where: str, index: dict[str, int]) -> int:
    raw = raw.strip()
    try:
        y = int(raw)
    except ValueError:
        if raw not in index:
            raise DataError(f"{where}: label {raw!r} is not a class name") from None
        return index[raw]
    if not 0 <= y < len(classes):
        raise DataError(f"{where}: label {y} out of range (0..{len(classes) - 1}, {len(classes)} classes)")
    return y


def scan_csv(path: Path, classes: list[str] | None) -> Listing:
    """A CSV path,label[,group]: every image must exist, every label be in range."""
    if classes is None:
        raise DataError(f"{path}: a CSV set needs `classes` (a class-names file or list)")
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            if "path" not in header or "label" not in header:
                raise DataError(f"{path}:1: header must have columns path,label[,group] (has {header})")
            rows = list(reader)
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e.__class__.__name__})") from None
    if not rows:
        raise DataError(f"{path}: no rows")
    root = path.parent
    index = {c: i for i, c in enumerate(classes)}
    rel, labels, groups = [], [], []
    for i, row in enumerate(rows, start=2):
        where = f"{path}:{i}"
        name = (row.get("path") or "").strip()
        if not name or not (root / name).is_file():
            raise DataError(f"{where}: missing image {root / name}")
        rel.append(name)
        labels.append(_parse_label(row.get("label") or "", classes, where, index))
        g = (row.get("group") or "").strip() if "group" in header else ""
        groups.append(g or None)
    return Listing(
        "csv", PathColumn.from_strings(root, rel), IntColumn(labels), GroupColumn.from_values(groups), classes
    )


def list_images(folder: Path) -> list[str]:
    """Image files under `folder` (recursively, links followed), sorted as torchvision's ImageFolder does;
    paths relative to `folder`."""
    out = []
    for dirpath, _, files in sorted(os.walk(folder, followlinks=True)):
        rel = os.path.relpath(dirpath, folder)
        for f in sorted(files):
            if f.lower().endswith(IMG_EXTENSIONS):
                out.append(f if rel == "." else os.path.join(rel, f))
    return out


def subfolders(root: Path) -> list[str]:
    """Sorted names of the folders directly under `root` (DataError if `root` is not a folder)."""
    try:
        return sorted(e.name for e in os.scandir(root) if e.is_dir())
    except (FileNotFoundError, NotADirectoryError):
        raise DataError(f"{root}: no such folder") from None
    except OSError as e:
        raise DataError(f"{root}: cannot list ({e.__class__.__name__})") from None


def scan_class_folders(
    root: Path, folders: Sequence[str], labels: Sequence[int], layout: str, require_files: bool = True
) -> tuple[list[str], list[int]]:
    """Files of each class folder (relative to `root`) and their labels; empty folders are an error."""
    rel: list[str] = []
    ys: list[int] = []
    for folder, y in zip(folders, labels):
        files = list_images(root / folder)
        if not files and require_files:
            raise DataError(f"{root / folder}: no image files ({layout} class folder)")
        rel.extend(os.path.join(folder, f) for f in files)
        ys.extend([y] * len(files))
    return rel, ys


def scan_folder(root: Path, classes: list[str] | None) -> Listing:
    """An ImageFolder tree: one folder per class, sorted by name; names from `classes` or the folders."""
    folders = subfolders(root)
    if not folders:
        raise DataError(f"{root}: not a usable ImageFolder tree (no class folders)")
    names = classes or [c.replace("_", " ") for c in folders]
    if len(names) != len(folders):
        raise DataError(f"{root}: {len(folders)} class folders but {len(names)} class names")
    rel, labels = scan_class_folders(root, folders, range(len(folders)), "ImageFolder")
    return Listing(
        "imagefolder",
        PathColumn.from_strings(root, rel),
        IntColumn(labels),
        GroupColumn.from_values([None] * len(rel)),
        names,
        class_ids=folders,
    )


def scan_set(spec: DataSpec, default_classes: list[str] | None = None) -> Listing:
    """Scan a set as its layout says (default: csv for a file, imagefolder for a folder)."""
    path = Path(spec.path)
    layout = spec.layout or ("imagefolder" if path.is_dir() else "csv")
    if layout not in ("csv", "imagefolder"):
        from trainer.data.layouts import scan_layout  # layouts builds on this module's scanners

        return scan_layout(spec)
    for key in ("split", "labels", "num_samples"):
        if getattr(spec, key) is not None:
            raise DataError(f"{path}: `{key}` is not used by layout {layout}")
    if layout == "imagefolder":
        if not path.is_dir():
            raise DataError(f"{path}: no such folder (layout imagefolder)")
        return scan_folder(path, class_names(spec.classes, spec.path))
    if path.is_file():
        return scan_csv(path, class_names(spec.classes, spec.path) or default_classes)
    if spec.layout == "csv" and path.is_dir():
        raise DataError(f"{path}: is a folder, not a CSV file (layout csv)")
    raise DataError(f"{path}: no such dataset (expected a CSV file or an ImageFolder directory)")


def _group_prompts(spec: DataSpec, listing: Listing) -> list[str]:
    if spec.group_prompts is None:
        return []
    gp = spec.group_prompts
    prompts = (
        [gp]
        if isinstance(gp, str) and "{g}" in gp
        else (read_lines(gp, "group prompts") if isinstance(gp, str) else list(gp))
    )
    for t in prompts:
        if "{g}" not in t:
            raise DataError(f"group prompt {t!r} has no {{g}} placeholder")
    if not listing.groups.names:
        raise DataError(f"{spec.path}: group_prompts need a group column")
    return prompts


def default_set_name(spec: DataSpec) -> str:
    path = Path(spec.path)
    return spec.name or (path.stem if path.suffix.lower() == ".csv" else path.name)


def load_image_set(
    spec: DataSpec,
    default_templates: str | list[str],
    default_classes: list[str] | None = None,
    listing: Listing | None = None,
) -> ImageSet:
    """Read and check a set (or build it on a `listing` read from a run's index)."""
    listing = listing if listing is not None else scan_set(spec, default_classes)
    return ImageSet(
        name=default_set_name(spec),
        paths=listing.paths,
        labels=listing.labels,
        classes=listing.classes,
        groups=listing.groups,
        templates=load_templates(spec.templates if spec.templates is not None else default_templates),
        group_prompts=_group_prompts(spec, listing),
        group_by=spec.group_by or listing.group_by,
        layout=listing.layout,
        class_ids=listing.class_ids,
        map_ids=listing.map_ids,
        crop_border=listing.crop_border,
    )


def _subset_spec(spec: str | list[str | int]) -> list[str | int]:
    if isinstance(spec, str):
        return [int(x) if x.isdigit() else x for x in read_lines(spec, "class-subset")]
    return list(spec)


def resolve_class_map(s: ImageSet, base: ImageSet | None, subset: str | list[str | int] | None) -> None:
    """Set `s.class_map`: which of the training classes (`base`) score each class of `s`.

    `subset` (the spec's `class_subset`): one entry per class of `s`, an index into the training classes
    or a training class's name or folder id. Without it, a layout's own mapping (ImageNet-R/-A, ObjectNet)
    is used when the training classes carry the ids it names, and an ImageFolder whose class folders are
    a strict subset of the training folders is mapped by folder. Otherwise `s` keeps its own head.
    """
    s.class_map, s.base_classes = None, None
    if base is None or base is s:
        if subset is not None:
            raise DataError(f"{s.name}: class_subset needs training (or ID validation) classes to refer to")
        return
    where = f"{s.name}: class_subset"
    if subset is not None:
        entries = _subset_spec(subset)
        if len(entries) != len(s.classes):
            raise DataError(f"{where} has {len(entries)} entries for {len(s.classes)} classes")
        by_name = {c: i for i, c in enumerate(base.classes)}
        by_id = {c: i for i, c in enumerate(base.class_ids or [])}
        cmap = []
        for e in entries:
            if isinstance(e, int):
                if not 0 <= e < len(base.classes):
                    raise DataError(f"{where}: index {e} out of range (0..{len(base.classes) - 1})")
                cmap.append([e])
            elif e in by_id or e in by_name:
                cmap.append([by_id[e] if e in by_id else by_name[e]])
            else:
                raise DataError(f"{where}: {e!r} is not a training class of {base.name}")
        s.class_map, s.base_classes = cmap, list(base.classes)
        return
    ids = base.class_ids
    if s.map_ids is not None and ids is not None:
        index = {c: i for i, c in enumerate(ids)}
        missing = sorted({w for ws in s.map_ids for w in ws if w not in index})
        if not missing:
            s.class_map, s.base_classes = [[index[w] for w in ws] for ws in s.map_ids], list(base.classes)
        elif len(missing) < sum(len(ws) for ws in s.map_ids):
            raise DataError(
                f"{s.name}: {len(missing)} of its classes are not among {base.name}'s (e.g. {missing[0]})"
            )
        return
    if s.class_ids is not None and ids is not None and s.class_ids != ids and set(s.class_ids) < set(ids):
        index = {c: i for i, c in enumerate(ids)}
        s.class_map, s.base_classes = [[index[c]] for c in s.class_ids], list(base.classes)


def head_templates(s: ImageSet) -> list[Template]:
    """Templates for the zero-shot head: group prompts averaged over every group name, else the set's."""
    if not s.group_prompts:
        return s.templates
    return [lambda c, t=t, g=g: fill_template(t, c, g) for t in s.group_prompts for g in s.group_names]


def sample_pairs(s: ImageSet | Listing, k: int = 3) -> list[tuple[str, str]]:
    """k (path, class name) pairs spread over the set: what `--dry-run` shows."""
    n = len(s.paths)
    picks = sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(k)}) if n else []
    return [(str(s.paths[i]), s.classes[s.labels[i]]) for i in picks]


def describe(s: ImageSet) -> dict[str, Any]:
    """A set's sizes as a plain dict (for the plan and logs)."""
    return {
        "name": s.name,
        "layout": s.layout,
        "images": len(s),
        "classes": len(s.classes),
        "groups": s.group_names,
        "group_keys": len({k for k in s.group_keys() if k is not None}),
        "scored_on": None if s.class_map is None else f"{len(s.class_map)} of {len(s.base_classes or [])}",
        "samples": sample_pairs(s),
    }
