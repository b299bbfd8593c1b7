"""Versioned bank files: banks/v1.yaml, v2.yaml, ... read safely, validated, written once.

    from descgen.bank import BankDoc; doc = BankDoc.load("banks/v2.yaml"); doc.save("banks")

Banks are round-trip YAML (ruamel.yaml), so the comments a reviewer writes survive every later
rewrite by descgen. A version is never overwritten: a new one is written to a temporary file and
hard-linked into place, which fails if the name exists, also when two processes race for it.
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
import tempfile
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from descgen import __version__
from descgen.errors import BankError
from descgen.schema import Bank, Concept, Descriptor, Generation, Status, content_hash

BANK_RE = re.compile(r"^v(\d+)\.yaml$")
HEADER = """\
descgen descriptor bank. Review: set `status:` to approved or rejected (or run `descgen review`).
Edit a template freely but keep exactly one {caption}; comments you add here are kept by descgen.
trainer uses only approved descriptors of approved or proposed concepts.
"""


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _yaml() -> YAML:
    y = YAML(typ="rt")  # round-trip loader: builds plain maps/lists/scalars only, never objects
    y.width = 100
    y.indent(mapping=2, sequence=4, offset=2)
    y.preserve_quotes = True
    return y


# --- versions -------------------------------------------------------------------------------


def list_versions(banks_dir: str | Path) -> list[tuple[int, Path]]:
    """(version, path) of every vN.yaml in `banks_dir`, oldest first."""
    d = Path(banks_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := BANK_RE.match(p.name))]
    return sorted(found)


def latest_bank(banks_dir: str | Path) -> Path | None:
    versions = list_versions(banks_dir)
    return versions[-1][1] if versions else None


def version_of(path: str | Path) -> int | None:
    m = BANK_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


# --- reading and validation -----------------------------------------------------------------


def read_doc(path: str | Path) -> CommentedMap:
    """Parse a bank file as round-trip YAML; BankError naming file and line on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BankError(f"{path}: no such bank file") from None
    except IsADirectoryError:
        raise BankError(f"{path}: is a directory, not a bank file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BankError(f"{path}: cannot read ({e.__class__.__name__}: {e})") from None
    try:
        data = _yaml().load(text)
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f"{mark.line + 1}:" if mark is not None else ""
        raise BankError(f"{path}:{line} YAML syntax error: {e.problem or e.context}") from None
    except YAMLError as e:
        raise BankError(f"{path}: YAML error: {str(e).splitlines()[0]}") from None
    if data is None:
        raise BankError(f"{path}: empty file, expected a bank with meta and concepts")
    if not isinstance(data, CommentedMap):
        raise BankError(f"{path}:1: a bank must be a mapping with keys meta and concepts")
    return data


def _line_of(doc: Any, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the deepest node of `loc` that exists in the YAML document."""
    node, line = doc, None
    for key in loc:
        if isinstance(node, CommentedMap) and key in node:
            line = node.lc.key(key)[0]
            node = node[key]
        elif isinstance(node, CommentedSeq) and isinstance(key, int) and 0 <= key < len(node):
            line = node.lc.item(key)[0]
            node = node[key]
        else:
            break
    return None if line is None else line + 1


def validation_problems(err: ValidationError, doc: Any, path: str | Path) -> list[str]:
    """One 'file:line: where: what' line per pydantic error."""
    out = []
    for e in err.errors():
        loc = tuple(e["loc"])
        line = _line_of(doc, loc)
        where = ".".join(str(k) for k in loc) or "(top)"
        msg = e["msg"].removeprefix("Value error, ")
        out.append(f"{path}:{line or 1}: {where}: {msg}")
    return out


def validate_doc(doc: CommentedMap, path: str | Path) -> Bank:
    try:
        return Bank.model_validate(_plain(doc))
    except ValidationError as err:
        problems = validation_problems(err, doc, path)
        more = f" (and {len(problems) - 1} more; see `descgen validate`)" if len(problems) > 1 else ""
        raise BankError(problems[0] + more, problems) from None


def load_bank(path: str | Path) -> Bank:
    """Read and validate a bank file (safe round-trip loading, no objects constructed)."""
    return validate_doc(read_doc(path), path)


def file_sha256(path: str | Path) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _plain(node: Any) -> Any:
    """ruamel containers -> plain dicts/lists (for pydantic)."""
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def _to_yaml(node: Any, flow_lists: bool = False) -> Any:
    """Plain data -> ruamel containers laid out for people (short lists in flow style)."""
    if isinstance(node, dict):
        m = CommentedMap()
        for k, v in node.items():
            if v is None or (isinstance(v, (dict, list)) and not v and k != "descriptors"):
                continue
            m[k] = _to_yaml(v, flow_lists=k in ("synonyms", "sources"))
        return m
    if isinstance(node, list):
        s = CommentedSeq(_to_yaml(v) for v in node)
        if flow_lists:
            s.fa.set_flow_style()
        return s
    return node


# --- writing --------------------------------------------------------------------------------


class BankDoc:
    """A bank as a round-trip YAML document, edited in place and saved as a new version."""

    def __init__(self, data: CommentedMap, path: Path | None = None):
        self.data = data
        self.path = path  # file it was read from (None for a new bank)

    @classmethod
    def load(cls, path: str | Path) -> BankDoc:
        doc = cls(read_doc(path), Path(path))
        _ = doc.bank  # validate now: never build on an invalid base
        return doc

    @classmethod
    def new(cls) -> BankDoc:
        data = CommentedMap()
        data["meta"] = _to_yaml(
            {"version": 1, "created_at": now(), "tool_version": __version__, "content_hash": ""}
        )
        data["meta"]["generations"] = CommentedSeq()
        data["concepts"] = CommentedSeq()
        data.yaml_set_start_comment(HEADER)
        return cls(data)

    def derive(self) -> BankDoc:
        """A copy to edit into the next version; comments come along."""
        return BankDoc(copy.deepcopy(self.data), self.path)

    @property
    def bank(self) -> Bank:
        return validate_doc(self.data, self.path or "<new bank>")

    @property
    def version(self) -> int | None:
        return self.data["meta"].get("version") if self.path else None

    # -- edits --

    def start_generation(self, command: str, **fields: Any) -> str:
        """Append a provenance record; returns its id (g1, g2, ...)."""
        gens = self.data["meta"].setdefault("generations", CommentedSeq())
        gid = f"g{len(gens) + 1}"
        while any(g.get("id") == gid for g in gens):
            gid = f"g{int(gid[1:]) + 1}"
        rec = Generation(id=gid, command=command, tool_version=__version__, started_at=now(), **fields)
        gens.append(_to_yaml(rec.model_dump(mode="json")))
        return gid

    def finish_generation(self, gid: str, stop_reason: str | None = None, stats: dict | None = None) -> None:
        for g in self.data["meta"]["generations"]:
            if g.get("id") == gid:
                g["finished_at"] = now()
                if stop_reason:
                    g["stop_reason"] = stop_reason
                if stats:
                    g["stats"] = _to_yaml(stats)
                return
        raise KeyError(gid)

    def _concept_node(self, name: str) -> CommentedMap:
        for c in self.data["concepts"]:
            if c.get("name") == name:
                return c
        raise BankError(f"{self.path or 'bank'}: no concept {name!r}")

    def add_concept(self, concept: Concept) -> None:
        """Add a concept, or merge sources/count/synonyms into the existing one of that name."""
        for c in self.data["concepts"]:
            if c.get("name") == concept.name:
                srcs = list(c.get("sources", []))
                c["sources"] = _to_yaml(srcs + [s for s in concept.sources if s not in srcs], True)
                c["count"] = int(c.get("count", 0)) + concept.count
                return
        self.data["concepts"].append(_to_yaml(concept.model_dump(mode="json")))

    def add_descriptors(self, concept: str, descriptors: Iterable[Descriptor]) -> None:
        node = self._concept_node(concept)
        seq = node.setdefault("descriptors", CommentedSeq())
        for d in descriptors:
            seq.append(_to_yaml(d.model_dump(mode="json")))

    def items(self) -> Iterable[tuple[str, CommentedMap]]:
        """(id, node) for every concept (id = its name) and descriptor."""
        for c in self.data["concepts"]:
            yield c["name"], c
            for d in c.get("descriptors") or []:
                yield d["id"], d

    def set_status(self, item_id: str, status: Status, note: str | None = None) -> None:
        for iid, node in self.items():
            if iid == item_id:
                node["status"] = status
                if note:
                    node["note"] = note
                return
        raise BankError(f"{self.path or 'bank'}: no concept or descriptor with id {item_id!r}")

    def set_template(self, item_id: str, template: str) -> None:
        for iid, node in self.items():
            if iid == item_id and "template" in node:
                node["template"] = template
                return
        raise BankError(f"{self.path or 'bank'}: no descriptor with id {item_id!r}")

    # -- saving --

    def dumps(self) -> str:
        buf = io.StringIO()
        _yaml().dump(self.data, buf)
        return buf.getvalue()

    def save(
        self, banks_dir: str | Path = "banks", out: str | Path | None = None, log: list[dict] | None = None
    ) -> Path:
        """Write this document as a new bank version; never overwrites. Returns the new path.

        With `out`, write exactly there (fails if it exists). Otherwise take the next free vN.yaml in
        `banks_dir`, moving on to the next number if another process takes one first. `log` records
        (raw LLM replies, rejected phrases and their reasons) go to a sidecar vN.log.jsonl.
        """
        banks_dir = Path(banks_dir)
        parent = self.version
        for _ in range(20):
            if out is not None:
                dest = Path(out)
                version = version_of(dest) or _next_version(dest.parent)
            else:
                version = _next_version(banks_dir)
                dest = banks_dir / f"v{version}.yaml"
            meta = self.data["meta"]
            meta["version"] = version
            if parent is not None:
                meta["parent"] = parent
            elif "parent" in meta:
                del meta["parent"]
            meta["created_at"] = now()
            meta["tool_version"] = __version__
            meta["content_hash"] = content_hash(_plain(self.data.get("concepts") or []))
            if "parent" in meta:  # keep a readable key order: version, parent, created_at, ...
                meta.move_to_end("parent", last=False)
            meta.move_to_end("version", last=False)
            bank = validate_doc(self.data, dest)
            assert bank.hash_is_current
            try:
                _write_exclusive(self.dumps(), dest)
            except FileExistsError:
                if out is not None:
                    raise BankError(f"{dest}: exists; a bank version is never overwritten") from None
                continue  # another process took this number: try the next one
            if log:
                lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in log)
                try:
                    _write_exclusive(lines, dest.with_suffix(".log.jsonl"))
                except FileExistsError:
                    pass  # a stale sidecar of a deleted version; the bank itself is written
            self.path = dest
            return dest
        raise BankError(f"{banks_dir}: could not claim a free version number (too many concurrent writers)")


def _next_version(banks_dir: Path) -> int:
    versions = list_versions(banks_dir)
    return versions[-1][0] + 1 if versions else 1


def _write_exclusive(text: str, dest: Path) -> None:
    """Write `text` to `dest` atomically; FileExistsError if `dest` exists (never clobbers)."""
    d = dest.parent
    if not d.is_dir():
        raise BankError(f"{d}: no such directory")
    if dest.exists():
        raise FileExistsError(dest)
    try:
        fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{dest.name}.", suffix=".tmp")
    except PermissionError:
        raise BankError(f"{d}: not writable (permission denied); nothing was written") from None
    except OSError as e:
        raise BankError(f"{d}: cannot write ({e.strerror}); nothing was written") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, dest)  # atomic and exclusive: fails if dest appeared meanwhile
    except OSError as e:
        if isinstance(e, FileExistsError):
            raise
        raise BankError(f"{dest}: cannot write ({e.strerror}); nothing was written") from None
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


# --- comparing ------------------------------------------------------------------------------


def diff_banks(a: Bank, b: Bank) -> list[tuple[str, str]]:
    """Changes from bank a to bank b as (kind, text); kind is '+', '-' or '~'."""
    out: list[tuple[str, str]] = []
    ca = {c.name: c for c in a.concepts}
    cb = {c.name: c for c in b.concepts}
    for name in ca.keys() - cb.keys():
        out.append(("-", f"concept {name} ({len(ca[name].descriptors)} descriptors)"))
    for name in cb.keys() - ca.keys():
        out.append(("+", f"concept {name} ({len(cb[name].descriptors)} descriptors)"))
    for name in [n for n in cb if n in ca]:
        x, y = ca[name], cb[name]
        if x.status != y.status:
            out.append(("~", f"concept {name}: status {x.status} -> {y.status}"))
        da = {d.id: d for d in x.descriptors}
        db = {d.id: d for d in y.descriptors}
        for i in da.keys() - db.keys():
            out.append(("-", f"{i}: {da[i].template!r}"))
        for i in [i for i in db if i not in da]:
            out.append(("+", f"{i}: {db[i].template!r} [{db[i].status}]"))
        for i in [i for i in db if i in da]:
            if da[i].status != db[i].status:
                out.append(("~", f"{i}: status {da[i].status} -> {db[i].status}"))
            if da[i].template != db[i].template:
                out.append(("~", f"{i}: template {da[i].template!r} -> {db[i].template!r}"))
    return out
