"""Image sets: the files, labels, groups, class names and zero-shot templates of a data spec.

    from trainer.data.sets import load_image_set; s = load_image_set(cfg.data.train, default_templates="simple")

A set is a CSV with columns path,label[,group] (paths relative to the CSV's folder; label an index or a
class name) or a torchvision ImageFolder tree. Everything is checked when loading, before a run starts,
so a bad file fails fast and names its line.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from open_clip import OPENAI_IMAGENET_TEMPLATES
from torchvision.datasets import ImageFolder

from trainer.config import DataSpec
from trainer.errors import DataError

Template = Callable[[str], str]

SIMPLE_TEMPLATES = ("a photo of a {c}.",)


@dataclass
class ImageSet:
    """A loaded, checked image set."""

    name: str
    paths: list[Path]
    labels: list[int]
    classes: list[str]
    groups: list[str | None]  # per sample; None when the set has no group column
    templates: list[Template] = field(default_factory=list)
    group_prompts: list[str] = field(default_factory=list)
    group_by: str = "class_group"

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def group_names(self) -> list[str]:
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


def _classes(spec: str | list[str] | None, where: str) -> list[str] | None:
    if spec is None:
        return None
    names = list(spec) if isinstance(spec, list) else read_lines(spec, "class-names")
    if len(set(names)) != len(names):
        raise DataError(f"{where}: duplicate class names")
    return names


def _parse_label(raw: str, classes: list[str], where: str) -> int:
    raw = raw.strip()
    try:
        y = int(raw)
    except ValueError:
        if raw not in classes:
            raise DataError(f"{where}: label {raw!r} is not a class name") from None
        return classes.index(raw)
    if not 0 <= y < len(classes):
        raise DataError(f"{where}: label {y} out of range (0..{len(classes) - 1}, {len(classes)} classes)")
    return y


def _load_csv(
    path: Path, classes: list[str] | None
) -> tuple[list[Path], list[int], list[str | None], list[str]]:
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
    paths, labels, groups = [], [], []
    for i, row in enumerate(rows, start=2):
        where = f"{path}:{i}"
        p = root / (row.get("path") or "").strip()
        if not p.is_file():
            raise DataError(f"{where}: missing image {p}")
        paths.append(p)
        labels.append(_parse_label(row.get("label") or "", classes, where))
        g = (row.get("group") or "").strip() if "group" in header else ""
        groups.append(g or None)
    return paths, labels, groups, classes


def _load_folder(
    root: Path, classes: list[str] | None
) -> tuple[list[Path], list[int], list[str | None], list[str]]:
    try:
        folder = ImageFolder(str(root))
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"{root}: not a usable ImageFolder tree ({str(e).splitlines()[0]})") from None
    names = classes or [c.replace("_", " ") for c in folder.classes]
    if len(names) != len(folder.classes):
        raise DataError(f"{root}: {len(folder.classes)} class folders but {len(names)} class names")
    paths = [Path(p) for p, _ in folder.samples]
    return paths, [y for _, y in folder.samples], [None] * len(paths), names


def load_image_set(
    spec: DataSpec, default_templates: str | list[str], default_classes: list[str] | None = None
) -> ImageSet:
    """Read and check a set: every image exists, every label in range."""
    path = Path(spec.path)
    classes = _classes(spec.classes, spec.path) or default_classes
    if path.is_dir():
        paths, labels, groups, classes = _load_folder(path, _classes(spec.classes, spec.path))
    elif path.is_file():
        paths, labels, groups, classes = _load_csv(path, classes)
    else:
        raise DataError(f"{path}: no such dataset (expected a CSV file or an ImageFolder directory)")
    group_prompts: list[str] = []
    if spec.group_prompts is not None:
        gp = spec.group_prompts
        group_prompts = (
            [gp]
            if isinstance(gp, str) and "{g}" in gp
            else (read_lines(gp, "group prompts") if isinstance(gp, str) else list(gp))
        )
        for t in group_prompts:
            if "{g}" not in t:
                raise DataError(f"group prompt {t!r} has no {{g}} placeholder")
        if not any(g is not None for g in groups):
            raise DataError(f"{path}: group_prompts need a group column")
    name = spec.name or (path.stem if path.is_file() else path.name)
    return ImageSet(
        name=name,
        paths=paths,
        labels=labels,
        classes=classes,
        groups=groups,
        templates=load_templates(spec.templates if spec.templates is not None else default_templates),
        group_prompts=group_prompts,
        group_by=spec.group_by,
    )


def head_templates(s: ImageSet) -> list[Template]:
    """Templates for the zero-shot head: group prompts averaged over every group name, else the set's."""
    if not s.group_prompts:
        return s.templates
    return [lambda c, t=t, g=g: fill_template(t, c, g) for t in s.group_prompts for g in s.group_names]
