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
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from descgen import __version__
from descgen.errors import BankError, DescgenError
from descgen.schema import Bank, Concept, Descriptor, Generation, Status, content_hash

BANK_RE = re.compile(r"^v(\d+)\.yaml$")
SUPERSEDED = "superseded"  # banks/superseded/: older versions, still resolved by number and old path
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
    """(version, path) of every vN.yaml in `banks_dir` and its superseded/ folder, oldest first."""
    found: dict[int, Path] = {}
    for d in (Path(banks_dir) / SUPERSEDED, Path(banks_dir)):  # top level wins a (hand-made) clash
        if d.is_dir():
            found |= {int(m.group(1)): p for p in d.iterdir() if (m := BANK_RE.match(p.name))}
    return sorted(found.items())


def resolve_bank_path(path: str | Path) -> Path:
    """`path`, or banks/superseded/vN.yaml when banks/vN.yaml was moved there; unchanged if neither exists."""
    path = Path(path)
    if not path.exists() and BANK_RE.match(path.name):
        old = path.parent / SUPERSEDED / path.name
        if old.exists():
            return old
    return path


def supersede(banks_dir: str | Path, keep: Iterable[int]) -> list[Path]:
    """Move every version but `keep` (and the newest) with its log into banks_dir/superseded/.

    Nothing is rewritten: a version keeps its number, content and lineage, and `resolve_bank_path`
    (so `load_bank`, `descgen show/diff/validate --bank`) still finds it under its old path.
    """
    banks_dir = Path(banks_dir)
    versions = list_versions(banks_dir)
    keep = set(keep) | ({versions[-1][0]} if versions else set())
    dest = banks_dir / SUPERSEDED
    moved = []
    for v, p in versions:
        if v in keep or p.parent != banks_dir:
            continue
        dest.mkdir(exist_ok=True)
        for f in (p, p.with_suffix(".log.jsonl")):
            if f.exists():
                if (dest / f.name).exists():
                    raise BankError(f"{dest / f.name}: exists; not moving {f} over it")
                f.rename(dest / f.name)
                moved.append(dest / f.name)
    return moved


def latest_bank(banks_dir: str | Path) -> Path | None:
    versions = list_versions(banks_dir)
    return versions[-1][1] if versions else None


def version_of(path: str | Path) -> int | None:
    m = BANK_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


# --- reading and validation -----------------------------------------------------------------


def read_doc(path: str | Path) -> CommentedMap:
    """Parse a bank file as round-trip YAML; BankError naming file and line on any problem."""
    path = resolve_bank_path(path)
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

    return "sha256:" + hashlib.sha256(resolve_bank_path(path).read_bytes()).hexdigest()


def _plain(node: Any) -> Any:
    """ruamel containers -> plain dicts/lists (for pydantic)."""
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


FLOW_LISTS = ("synonyms", "sources", "region_ids", "alternatives")  # short lists written on one line


def _to_yaml(node: Any, flow_lists: bool = False) -> Any:
    """Plain data -> ruamel containers laid out for people (short lists in flow style)."""
    if isinstance(node, dict):
        m = CommentedMap()
        for k, v in node.items():
            if v is None or (isinstance(v, (dict, list)) and not v and k != "descriptors"):
                continue
            m[k] = _to_yaml(v, flow_lists=k in FLOW_LISTS)
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
        path = resolve_bank_path(path)
        doc = cls(read_doc(path), path)
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

    def start_generation(self, command: str, started_at: str | None = None, **fields: Any) -> str:
        """Append a provenance record; returns its id (g1, g2, ...)."""
        gens = self.data["meta"].setdefault("generations", CommentedSeq())
        gid = f"g{len(gens) + 1}"
        while any(g.get("id") == gid for g in gens):
            gid = f"g{int(gid[1:]) + 1}"
        started_at = started_at or now()
        rec = Generation(id=gid, command=command, tool_version=__version__, started_at=started_at, **fields)
        gens.append(_to_yaml(rec.model_dump(mode="json")))
        return gid

    def finish_generation(
        self,
        gid: str,
        stop_reason: str | None = None,
        stats: dict | None = None,
        finished_at: str | None = None,
    ) -> None:
        for g in self.data["meta"]["generations"]:
            if g.get("id") == gid:
                g["finished_at"] = finished_at or now()
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

    def set_evidence(self, item_id: str, evidence: dict[str, Any]) -> None:
        """Attach (replace) the discovery evidence of a descriptor."""
        for iid, node in self.items():
            if iid == item_id and "template" in node:
                node["evidence"] = _to_yaml(evidence)
                return
        raise BankError(f"{self.path or 'bank'}: no descriptor with id {item_id!r}")

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
        self,
        banks_dir: str | Path = "banks",
        out: str | Path | None = None,
        log: list[dict] | None = None,
        version: int | None = None,
    ) -> Path:
        """Write this document as a new bank version; never overwrites. Returns the new path.

        With `out`, write exactly there (fails if it exists). With `version`, write exactly that vN.yaml
        in `banks_dir` (VersionTaken if it exists). Otherwise take the next free vN.yaml in `banks_dir`
        (superseded versions count), moving on to the next number if another process takes one first.
        `log` records (raw LLM replies, rejected phrases and their reasons) go to a sidecar vN.log.jsonl.
        """
        banks_dir = Path(banks_dir)
        parent = self.version
        wanted = version
        for _ in range(20):
            if out is not None:
                dest = Path(out)
                version = version_of(dest) or _next_version(dest.parent)
            else:
                version = wanted or _next_version(banks_dir)
                dest = banks_dir / f"v{version}.yaml"
                if wanted is not None and resolve_bank_path(dest).exists():
                    raise VersionTaken(dest)
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
                if wanted is not None:
                    raise VersionTaken(dest) from None
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


class VersionTaken(BankError):
    """The exact version `save(version=N)` was asked for exists already (another writer took it)."""

    def __init__(self, dest: Path):
        super().__init__(f"{dest}: exists; a bank version is never overwritten")
        self.dest = dest


# A command's edits as a recorded operation: applied to a fresh copy of its base, and again to a newer
# version if another command wrote one meanwhile. It may return the sidecar log records.
Change = Callable[["BankDoc"], "list[dict] | None"]
MAX_REBASES = 20


def save_change(
    base: BankDoc | None,
    change: Change,
    banks_dir: str | Path = "banks",
    out: str | Path | None = None,
    follow: bool = True,
    on_rebase: Callable[[Path], None] | None = None,
) -> Path:
    """Apply `change` to a copy of `base` (None: a new bank) and write the result as a new version.

    With `follow` (the base is the newest version, i.e. no --bank given) and no `out`, the new version
    must be the base's successor: if another writer has written a newer version meanwhile, the change
    is re-applied on the newest version (`on_rebase` is told which), so no writer's change is lost.
    If it no longer applies there, DescgenError saying what to rerun; nothing is written.
    """
    banks_dir = Path(banks_dir)
    current, rebased = base, False
    for _ in range(MAX_REBASES):
        doc = current.derive() if current is not None else BankDoc.new()
        try:
            log = change(doc)
            if out is not None or not follow:
                return doc.save(banks_dir, out=out, log=log)
            base_version = (version_of(current.path) or current.version or 0) if current is not None else 0
            newest = list_versions(banks_dir)
            if newest and newest[-1][0] > base_version:
                current, rebased = BankDoc.load(newest[-1][1]), True
                if on_rebase is not None:
                    on_rebase(current.path)
                continue
            return doc.save(banks_dir, log=log, version=base_version + 1)
        except VersionTaken:
            continue  # another writer took the number: re-read the newest and re-apply
        except DescgenError as e:
            if not rebased:
                raise
            raise DescgenError(
                f"{current.path} was written meanwhile by another command and this change no longer "
                f"applies to it ({e}); nothing was written: rerun the command"
            ) from None
    raise BankError(f"{banks_dir}: too many concurrent writers; nothing was written: rerun the command")


def _umask() -> int:
    """The process's file-creation mask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: give the user's usual permissions
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
