"""Import published descriptor lists (the StarFT authors' keywords/*.pt, a .txt or a .yaml) into a bank.

    from descgen.importer import read_templates; items = read_templates("spurious_bg.pt")

The reference code stores a list of Python format strings, e.g. '{} in snowy landscapes.' or
'crinkled {}.', filled with the caption minus its final period. Each becomes a descriptor template
("{caption} in snowy landscapes", "crinkled {caption}") that `descgen.schema.inject` turns into exactly
the reference's caption. A .pt file is read with torch.load(weights_only=True) only: no code runs.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from descgen.errors import DescgenError
from descgen.schema import PLACEHOLDER, Descriptor, Form, normalize_phrase

SUFFIXES = (".pt", ".pth", ".txt", ".yaml", ".yml")
# '{}' (the reference's), '{caption}' (descgen's) or '{0}' mark where the caption goes
_HOLE_RE = re.compile(r"\{(?:|0|caption)\}")


class ImportFileError(DescgenError):
    """A descriptor list cannot be read or holds an entry that is not a usable template."""


@dataclass(frozen=True)
class Imported:
    """One entry of a list: its descgen template and form, and where it was (line or item number)."""

    template: str
    form: Form
    where: str  # "line 3" or "item 3"


def file_digest(path: str | Path) -> str:
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()


def to_template(entry: str, form: Form | None = None) -> tuple[str, Form]:
    """A reference template ('{} in the snow.', 'crinkled {}.') or, with `form`, a bare phrase -> template.

    ValueError with the reason if the entry is no usable template.
    """
    text = " ".join(str(entry).split())
    holes = _HOLE_RE.findall(text)
    if not holes:
        if form is None:
            raise ValueError(f"{text!r} has no '{{}}' placeholder (pass --form for bare phrases)")
        phrase = normalize_phrase(text.rstrip("."))
        template = f"{PLACEHOLDER} {phrase}" if form == "suffix" else f"{phrase} {PLACEHOLDER}"
        return template, form
    if len(holes) > 1 or re.search(r"\{[^{}]*\}", _HOLE_RE.sub("", text)):
        raise ValueError(f"{text!r} must hold exactly one '{{}}' placeholder")
    head, tail = (part.strip() for part in _HOLE_RE.split(text.rstrip(". ").strip()))
    if head and tail:
        raise ValueError(f"{text!r}: the placeholder must start or end the template")
    if tail:
        return f"{PLACEHOLDER} {normalize_phrase(tail)}", "suffix"
    if head:
        return f"{normalize_phrase(head)} {PLACEHOLDER}", "prefix"
    raise ValueError(f"{text!r} has no words besides the placeholder")


def _entries(path: Path) -> list[tuple[str, str]]:
    """(entry, where) of a .pt, .txt or .yaml list."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ImportFileError(f"{path}: unsupported list type {suffix or '(none)'}; use .pt, .txt or .yaml")
    if not path.is_file():
        raise ImportFileError(f"{path}: no such file")
    if suffix in (".pt", ".pth"):
        return _pt_entries(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ImportFileError(f"{path}: cannot read ({e.__class__.__name__})") from None
    if suffix == ".txt":
        return [
            (line.strip(), f"line {i}")
            for i, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.lstrip().startswith("#")
        ]
    return _yaml_entries(path, text)


def _pt_entries(path: Path) -> list[tuple[str, str]]:
    import pickle

    import torch  # heavy: only for .pt lists; weights_only=True unpickles plain data, never code

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    # arbitrary bytes reach torch's legacy loader too, which fails with KeyError/IndexError/TypeError
    except (
        pickle.UnpicklingError,
        RuntimeError,
        EOFError,
        OSError,
        ValueError,
        KeyError,
        IndexError,
        TypeError,
    ) as e:
        first = (str(e).splitlines() or [e.__class__.__name__])[0][:160]
        raise ImportFileError(
            f"{path}: not a plain torch-saved list (weights_only load failed: {first})"
        ) from None
    if not isinstance(data, (list, tuple)) or not all(isinstance(x, str) for x in data):
        raise ImportFileError(f"{path}: expected a list of template strings, found {type(data).__name__}")
    return [(x, f"item {i}") for i, x in enumerate(data, 1)]


def _yaml_entries(path: Path, text: str) -> list[tuple[str, str]]:
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    try:
        data = YAML(typ="rt").load(text)
    except YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f"{mark.line + 1}:" if mark is not None else ""
        raise ImportFileError(f"{path}:{line} YAML syntax error") from None
    if isinstance(data, dict):
        data = data.get("templates")
    if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
        raise ImportFileError(f"{path}: expected a list of template strings (or a mapping with `templates:`)")
    return [(x, f"line {data.lc.item(i)[0] + 1}") for i, x in enumerate(data)]


def read_templates(path: str | Path, form: Form | None = None) -> list[Imported]:
    """Every entry of a descriptor list as a checked template; ImportFileError naming file and line."""
    path = Path(path)
    out = []
    for entry, where in _entries(path):
        try:
            template, f = to_template(entry, form)
            Descriptor(id="import.check", template=template, form=f)  # length and shape limits
        except ValueError as e:
            msg = str(e).splitlines()[0] if not hasattr(e, "errors") else e.errors()[0]["msg"]
            raise ImportFileError(f"{path}: {where}: {msg.removeprefix('Value error, ')}") from None
        out.append(Imported(template, f, where))
    if not out:
        raise ImportFileError(f"{path}: holds no templates")
    return out


def add_imported(
    doc, concept: str, items: list[Imported], gid: str, status: str = "proposed", style: str | None = None
) -> tuple[list[str], list[str]]:
    """Add imported templates to `concept` of a BankDoc (created, source "imported", if missing).

    A template the concept already holds, or one repeated in the list, is skipped. `style` sets the
    concept's caption_style. Returns (ids added, templates skipped).
    """
    from descgen.schema import Concept, unique_id

    name = normalize_phrase(concept)
    forms = [it.form for it in items]
    form: Form = max(("suffix", "prefix"), key=forms.count)
    try:
        node_name = doc.bank.concept(name).name  # a synonym names the existing concept
    except KeyError:
        doc.add_concept(Concept(name=name, form=form, sources=["imported"], provenance=gid))
        node_name = name
    else:
        doc.add_concept(Concept(name=node_name, form=form, sources=["imported"]))  # merges the source
    if style is not None:
        for node in doc.data["concepts"]:
            if node.get("name") == node_name:
                if "caption_style" in node:
                    node["caption_style"] = style
                else:  # before the descriptors, where a reviewer looks for it
                    keys = list(node.keys())
                    at = keys.index("descriptors") if "descriptors" in keys else len(keys)
                    node.insert(at, "caption_style", style)
    have = {d.template for d in doc.bank.concept(node_name).descriptors}
    taken = {iid for iid, _ in doc.items()}
    added, skipped, new = [], [], []
    for it in items:
        if it.template in have:
            skipped.append(it.template)
            continue
        have.add(it.template)
        text = " ".join(it.template.replace(PLACEHOLDER, " ").split())
        did = unique_id(node_name, text, taken)
        new.append(
            Descriptor(
                id=did, template=it.template, form=it.form, status=status, source="imported", provenance=gid
            )
        )
        added.append(did)
    doc.add_descriptors(node_name, new)
    return added, skipped
