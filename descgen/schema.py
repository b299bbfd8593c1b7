"""Pydantic schema of a descriptor bank: the contract between `descgen` and `trainer`.

    from descgen.schema import Bank; bank = Bank.model_validate(data)

A bank holds concepts (background, texture, ...) and, per concept, descriptors. A descriptor is a
template with exactly one `{caption}` placeholder: suffix form "{caption} in the mountains" turns
"a photo of a dog." into "a photo of a dog in the mountains."; prefix form "blurred {caption}" turns it
into "blurred a photo of a dog.". Every concept and descriptor has a review status and provenance.

Caption styles (per concept, `caption_style`): "reference" (the default) is the StarFT paper's form
above; "adjective" puts a prefix descriptor before the class name instead ("a photo of a blurred dog.").
`inject(caption, template, classname, style)` is the one function that builds these captions, for
descgen and the trainer alike.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PLACEHOLDER = "{caption}"
MAX_DESCRIPTOR_CHARS = 60
MAX_DESCRIPTOR_WORDS = 8

Status = Literal["proposed", "approved", "rejected"]
Form = Literal["prefix", "suffix"]
Source = Literal["catalog", "llm", "manual", "discovered", "imported"]
CaptionStyle = Literal["reference", "adjective"]
CAPTION_STYLES: tuple[str, ...] = ("reference", "adjective")

_NAME_RE = re.compile(r"^[a-z][a-z0-9 _-]{0,39}$")
_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


def normalize_phrase(text: str) -> str:
    """Strip, lowercase and collapse inner whitespace."""
    return " ".join(str(text).split()).lower()


def slug(text: str) -> str:
    """A short id-safe form of a phrase: 'in the Mountains!' -> 'in-the-mountains'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "x"


def unique_id(concept: str, phrase: str, taken: set[str]) -> str:
    """A new descriptor id '<concept>.<slug>' not in `taken` (suffixed -2, -3, ...); adds it to `taken`."""
    base = f"{slug(concept)}.{slug(phrase)}"
    did, k = base, 2
    while did in taken:
        did, k = f"{base}-{k}", k + 1
    taken.add(did)
    return did


def make_template(text: str, form: Form) -> str:
    """Build a descriptor template from a bare phrase and its form."""
    text = normalize_phrase(text)
    return f"{PLACEHOLDER} {text}" if form == "suffix" else f"{text} {PLACEHOLDER}"


def inject(
    caption: str, template: str, classname: str | None = None, style: CaptionStyle = "reference"
) -> str:
    """Put a caption into a descriptor template: the spurious caption the trainer trains on.

    Reference style (the StarFT paper's; the default): a suffix descriptor follows the caption, which
    loses its final period ("a photo of a dog in the snow."); a prefix descriptor goes before the caption,
    kept as it is ("crinkled a photo of a dog."). Adjective style: a prefix descriptor goes right before
    the last whole-word `classname` in the caption, and an article "a"/"an" before it is fixed to fit
    ("a photo of an old dog."); a suffix descriptor, or a caption without `classname`, falls back to the
    reference style.
    """
    caption = caption.strip()
    if template.startswith(PLACEHOLDER):
        return template.replace(PLACEHOLDER, caption.rstrip(".").rstrip()) + "."
    if style == "adjective" and classname:
        words = template.replace(PLACEHOLDER, " ").split()
        hits = list(
            re.finditer(rf"(?<![\w-]){re.escape(classname.strip())}(?![\w-])", caption, re.IGNORECASE)
        )
        if words and hits:
            at = hits[-1].start()
            head, tail = caption[:at], caption[at:]
            m = re.search(r"(?:^|(?<=\s))(a|an|A|An)\s+$", head)
            if m:
                article = "an" if words[0][0].lower() in "aeiou" else "a"
                if m.group(1)[0].isupper():
                    article = article.capitalize()
                head = head[: m.start(1)] + article + " "
            return f"{head}{' '.join(words)} {tail}"
    return template.replace(PLACEHOLDER, caption)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelInfo(_Strict):
    """Which LLM produced a generation."""

    id: str = Field(description="hub id or local path the model was loaded from")
    weights_file: str | None = Field(None, description="weights file name (e.g. the GGUF file)")
    weights_sha256: str | None = Field(
        None, description="sha256 of the weights file, or of the list of all files and their sha256s"
    )
    base_url: str | None = Field(None, description="OpenAI-compatible server the model was served from")


class PromptInfo(_Strict):
    """Which prompt file produced a generation."""

    name: str
    sha256: str = Field(description="sha256 of the prompt file's text")


class Generation(_Strict):
    """Provenance of one descgen command that changed the bank."""

    id: str = Field(description="short id referenced by concepts and descriptors, e.g. g3")
    command: str = Field(description="what ran, e.g. 'expand background' or 'approve'")
    tool_version: str
    started_at: str
    finished_at: str | None = None
    model: ModelInfo | None = None
    prompt: PromptInfo | None = None
    decoding: dict[str, Any] = Field(default_factory=dict, description="sampling settings")
    seed: int | None = None
    stop_reason: str | None = Field(None, description="why sampling stopped: target reached, budget")
    stats: dict[str, Any] = Field(default_factory=dict, description="accepted / rejected counts")


class Descriptor(_Strict):
    """One fine-grained spurious descriptor, a caption template."""

    id: str = Field(description="stable id, '<concept>.<slug>'; kept when the template is edited")
    template: str = Field(description="phrase with exactly one {caption} placeholder")
    form: Form
    status: Status = "proposed"
    source: Source = "llm"
    count: int = Field(1, ge=0, description="how often the LLM sampled this phrase")
    provenance: str | None = Field(None, description="id of the generation that added it")
    note: str | None = Field(None, description="reviewer's note or the reason of a status change")
    evidence: dict[str, Any] | None = Field(None, description="discovery evidence (source: discovered)")

    @field_validator("template", mode="before")
    @classmethod
    def _clean_template(cls, v: Any) -> Any:
        return " ".join(v.split()) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check_template(self) -> Descriptor:
        if not _ID_RE.match(self.id):
            raise ValueError(f"id {self.id!r} must be lowercase letters, digits, '.', '-', '_'")
        n = self.template.count(PLACEHOLDER)
        if n != 1:
            raise ValueError(f"template {self.template!r} must hold exactly one {PLACEHOLDER} (has {n})")
        if self.form == "suffix" and not self.template.startswith(PLACEHOLDER + " "):
            raise ValueError(f"suffix template {self.template!r} must start with '{PLACEHOLDER} '")
        if self.form == "prefix" and not self.template.endswith(" " + PLACEHOLDER):
            raise ValueError(f"prefix template {self.template!r} must end with ' {PLACEHOLDER}'")
        text = self.text
        if not text:
            raise ValueError("template has no words besides the placeholder")
        if len(text) > MAX_DESCRIPTOR_CHARS or len(text.split()) > MAX_DESCRIPTOR_WORDS:
            raise ValueError(
                f"descriptor {text!r} is too long (max {MAX_DESCRIPTOR_WORDS} words, "
                f"{MAX_DESCRIPTOR_CHARS} characters)"
            )
        return self

    @property
    def text(self) -> str:
        """The descriptor phrase without its placeholder."""
        return " ".join(self.template.replace(PLACEHOLDER, " ").split())

    def apply(self, caption: str) -> str:
        """The spurious caption: this descriptor injected into `caption` (reference style)."""
        return inject(caption, self.template)

    def caption(self, caption: str, classname: str | None = None, style: CaptionStyle = "reference") -> str:
        """The spurious caption in the given style (see `inject`)."""
        return inject(caption, self.template, classname, style)


class Concept(_Strict):
    """A spurious concept (background, texture, ...) and its descriptors."""

    name: str
    status: Status = "proposed"
    form: Form = Field(description="default caption form of its descriptors")
    sources: list[Source] = Field(description="where the concept came from: catalog and/or llm")
    synonyms: list[str] = Field(default_factory=list)
    hint: str | None = Field(None, description="short guidance for the descriptor prompt")
    count: int = Field(0, ge=0, description="how often the LLM proposed it")
    provenance: str | None = None
    flag: str | None = Field(None, description="why a reviewer should look, e.g. 'not in catalog'")
    note: str | None = None
    caption_style: CaptionStyle | None = Field(
        None, description="how descriptors enter a caption: reference (default, the paper's) or adjective"
    )
    descriptors: list[Descriptor] = Field(default_factory=list)

    @field_validator("name", mode="before")
    @classmethod
    def _clean_name(cls, v: Any) -> Any:
        return normalize_phrase(v) if isinstance(v, str) else v

    @field_validator("synonyms", mode="before")
    @classmethod
    def _clean_synonyms(cls, v: Any) -> Any:
        return [normalize_phrase(s) for s in v] if isinstance(v, list) else v

    @model_validator(mode="after")
    def _check(self) -> Concept:
        if not _NAME_RE.match(self.name):
            raise ValueError(f"concept name {self.name!r} must be a short lowercase word or phrase")
        if not self.sources:
            raise ValueError("sources must name at least one of catalog, llm, manual, discovered")
        seen: dict[str, str] = {}
        for d in self.descriptors:
            key = d.template
            if key in seen:
                raise ValueError(f"descriptors {seen[key]!r} and {d.id!r} share the template {key!r}")
            seen[key] = d.id
        return self

    def approved(self) -> list[Descriptor]:
        """Approved descriptors; none when the concept itself was rejected."""
        if self.status == "rejected":
            return []
        return [d for d in self.descriptors if d.status == "approved"]

    @property
    def style(self) -> CaptionStyle:
        """The caption style of this concept's descriptors ("reference" unless set)."""
        return self.caption_style or "reference"


class BankMeta(_Strict):
    """Version, lineage and provenance of a bank file."""

    version: int = Field(ge=1)
    parent: int | None = Field(None, ge=1, description="version this one was derived from")
    created_at: str
    tool_version: str
    content_hash: str = Field(description="sha256 of the concepts section; trainer records it")
    generations: list[Generation] = Field(default_factory=list)


class Bank(_Strict):
    """A versioned bank of spurious concepts and descriptors."""

    meta: BankMeta
    concepts: list[Concept] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> Bank:
        names: set[str] = set()
        ids: set[str] = set()
        gens = {g.id for g in self.meta.generations}
        for c in self.concepts:
            if c.name in names:
                raise ValueError(f"concept {c.name!r} appears twice")
            names.add(c.name)
            for d in c.descriptors:
                if d.id in ids:
                    raise ValueError(f"descriptor id {d.id!r} appears twice")
                ids.add(d.id)
                if d.provenance is not None and d.provenance not in gens:
                    raise ValueError(f"descriptor {d.id!r} names unknown generation {d.provenance!r}")
            if c.provenance is not None and c.provenance not in gens:
                raise ValueError(f"concept {c.name!r} names unknown generation {c.provenance!r}")
        return self

    def concept(self, name: str) -> Concept:
        """The concept called `name` (or having it as a synonym); KeyError if none."""
        name = normalize_phrase(name)
        for c in self.concepts:
            if c.name == name or name in c.synonyms:
                return c
        raise KeyError(name)

    def approved(self, concepts: list[str] | None = None) -> list[Descriptor]:
        """Approved descriptors of the named concepts (all concepts when None)."""
        chosen = self.concepts if concepts is None else [self.concept(n) for n in concepts]
        return [d for c in chosen for d in c.approved()]

    def approved_styled(self, concepts: list[str] | None = None) -> list[tuple[Descriptor, CaptionStyle]]:
        """(descriptor, its concept's caption style) for the approved descriptors, as `approved` orders them.

        The trainer draws from this and builds each caption with `inject(caption, d.template, classname,
        style)`.
        """
        chosen = self.concepts if concepts is None else [self.concept(n) for n in concepts]
        return [(d, c.style) for c in chosen for d in c.approved()]

    def compute_hash(self) -> str:
        return content_hash([c.model_dump(mode="json") for c in self.concepts])

    @property
    def hash_is_current(self) -> bool:
        return self.meta.content_hash == self.compute_hash()


def content_hash(concepts: list[dict[str, Any]]) -> str:
    """sha256 of the canonical JSON of a bank's concepts section (defaults filled in)."""
    canon = [Concept.model_validate(c).model_dump(mode="json") for c in concepts]
    for c in canon:  # an unset caption style hashes as before the field existed: old banks keep their hash
        if c.get("caption_style") is None:
            c.pop("caption_style", None)
    blob = json.dumps(canon, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()
