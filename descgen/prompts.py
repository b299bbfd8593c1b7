"""Prompt files and the concept catalog: package data (prompts/, PROMPTS_DIR), rendered strictly.

    from descgen.prompts import load_prompt; p = load_prompt("descriptors"); msgs, prefill = p.render(concept="texture", ...)

A prompt file is the user message; an optional line `--- prefill ---` starts the assistant-turn
prefill (a started bullet list keeps small models on task). Both parts use `$var` placeholders
rendered with string.Template.substitute, so a missing variable fails loudly.
"""

from __future__ import annotations

import hashlib
import string
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from descgen.errors import DescgenError
from descgen.schema import Form, normalize_phrase

# Package data: descgen/prompt_files is a link to the top-level prompts/ in a checkout (where reviewers
# find it) and a real folder in an installed wheel. Resolved, so messages name prompts/ in a checkout.
PROMPTS_DIR = (Path(__file__).resolve().parent / "prompt_files").resolve()
PREFILL_MARK = "--- prefill ---"


@dataclass(frozen=True)
class Prompt:
    """A prompt file: user message template and assistant prefill template."""

    name: str
    path: Path
    sha256: str
    user: str
    prefill: str

    def render(self, **variables: str) -> tuple[list[dict[str, str]], str]:
        """Chat messages and prefill with `variables` substituted; DescgenError on a missing one."""
        try:
            user = string.Template(self.user).substitute(variables)
            prefill = string.Template(self.prefill).substitute(variables)
        except KeyError as e:
            raise DescgenError(f"{self.path}: prompt needs variable ${e.args[0]}, which descgen does not set")
        except ValueError as e:
            raise DescgenError(f"{self.path}: bad placeholder in prompt ({e})")
        return [{"role": "user", "content": user}], prefill


def load_prompt(name_or_path: str | Path) -> Prompt:
    """A prompt by task name (prompts/<name>.txt) or by file path."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = PROMPTS_DIR / f"{name_or_path}.txt"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DescgenError(f"{path}: cannot read prompt file ({e.__class__.__name__})") from None
    user, _, prefill = text.partition("\n" + PREFILL_MARK + "\n")
    prefill = prefill.removesuffix("\n")  # the file's final newline is not part of the prefill
    if not user.strip():
        raise DescgenError(f"{path}: prompt file has no user message")
    return Prompt(path.stem, path, hashlib.sha256(text.encode()).hexdigest(), user.strip(), prefill)


class CatalogEntry(BaseModel):
    """One catalog concept: how to find it among LLM proposals and how to prompt for it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    synonyms: list[str] = Field(default_factory=list)
    form: Form
    hint: str
    examples: list[str] = Field(default_factory=list, description="few-shot examples in the prefill")
    starts: list[str] = Field(default_factory=list, description="allowed first words; empty = any")
    max_words: int = Field(5, ge=1, le=8)

    @field_validator("name", "examples", "synonyms", "starts", mode="before")
    @classmethod
    def _norm(cls, v):
        if isinstance(v, str):
            return normalize_phrase(v)
        return [normalize_phrase(s) for s in v] if isinstance(v, list) else v


class Catalog(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    concepts: list[CatalogEntry]
    classes: list[str] = Field(default_factory=list)

    def match(self, word: str) -> CatalogEntry | None:
        """The entry whose name or synonym is `word` (singular/plural tolerant)."""
        w = normalize_phrase(word)
        keys = {w, w.rstrip("s"), w + "s"}
        for e in self.concepts:
            if keys & ({e.name} | set(e.synonyms)):
                return e
        return None

    def get(self, name: str) -> CatalogEntry | None:
        return next((e for e in self.concepts if e.name == normalize_phrase(name)), None)


def load_catalog(path: str | Path | None = None) -> Catalog:
    path = Path(path) if path else PROMPTS_DIR / "catalog.yaml"
    try:
        data = YAML(typ="safe").load(path.read_text(encoding="utf-8"))
        return Catalog.model_validate(data)
    except OSError as e:
        raise DescgenError(f"{path}: cannot read concept catalog ({e.strerror})") from None
    except YAMLError as e:
        raise DescgenError(f"{path}: YAML error in concept catalog: {str(e).splitlines()[0]}") from None
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(k) for k in first["loc"])
        raise DescgenError(f"{path}: invalid concept catalog: {where}: {first['msg']}") from None
