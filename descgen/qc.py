"""Quality control of LLM replies: parse list items, normalise them, accept or reject with a reason.

    from descgen.qc import Collector, rules_for; c = Collector(rules_for(entry, catalog)); c.add_reply(text)

A small model numbers its lines, writes sentences, echoes the prompt's examples, names classes and
repeats itself. Every parsed item gets exactly one verdict: accepted, or the first rule it breaks.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from descgen.schema import MAX_DESCRIPTOR_CHARS, MAX_DESCRIPTOR_WORDS, PLACEHOLDER, Form

# Rejection reasons, in the order the rules are tried.
EMPTY = "empty"
NOT_PHRASE = "not a phrase"
PLACEHOLDER_COUNT = "placeholder count != 1"
TOO_LONG = "too long"
INCOMPLETE = "incomplete"
ECHO = "echo of an example"
NAMES_CLASS = "names a class"
NAMES_CONCEPT = "names a concept"
OFF_CONCEPT = "off-concept"
DUPLICATE = "duplicate"
NEAR_DUPLICATE = "near-duplicate"
IN_BANK = "already in bank"
PREV_REJECTED = "rejected before"
RARE = "rare (below --min-count)"

ARTICLES = {"a", "an", "the"}
PREPOSITIONS = {
    "in",
    "on",
    "at",
    "by",
    "near",
    "under",
    "with",
    "from",
    "of",
    "to",
    "into",
    "over",
    "for",
    "inside",
    "outside",
    "behind",
    "beside",
    "through",
    "during",
    "against",
    "among",
    "and",
    "or",
}
# Words that mark a sentence or chatter rather than a descriptor phrase.
SENTENCE_WORDS = {
    "i",
    "you",
    "we",
    "he",
    "she",
    "they",
    "me",
    "my",
    "your",
    "our",
    "their",
    "is",
    "are",
    "was",
    "were",
    "be",
    "been",
    "am",
    "can",
    "could",
    "would",
    "should",
    "will",
    "may",
    "might",
    "must",
    "do",
    "does",
    "this",
    "these",
    "those",
    "here",
    "which",
    "who",
    "what",
    "please",
    "example",
    "examples",
    "phrase",
    "phrases",
    "list",
    "sure",
    "note",
    "word",
    "words",
    "descriptor",
    "descriptors",
    "describe",
    "etc",
    "adjective",
    "adjectives",
    "answer",
    "answers",
    "character",
    "characters",
    "sentence",
    "tense",
}
_BULLET_RE = re.compile(r"^\s*(?:[-*•·+>]+|#+|\(?\d{1,3}\s*[.):-]|\(?[a-z][.)](?=\s))\s*")
_PLACEHOLDER_RE = re.compile(r"\{[^{}]*\}|\[[^\[\]]*\]|<[^<>]*>")
_CAPTION_NAMES = {"caption", "class", "classname", "class name", "label", "object", "subject"}
_PHRASE_RE = re.compile(r"^[a-z][a-z' -]*$")  # no digits: "just 23", "255 characters" are chatter
_QUOTES = "\"'`“”‘’*_"


def parse_reply(text: str) -> list[str]:
    """Items of a list-like reply: one per line, bullets and numbers removed, comma lists split."""
    items: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        prev = None
        while line and line != prev:  # "1. - foo" -> "foo"
            prev, line = line, _BULLET_RE.sub("", line, count=1).strip()
        if not line:
            continue
        line = re.sub(r"\([^()]*\)", " ", line)  # "in the mountains (the mountains)"
        head, colon, _ = line.partition(":")
        if colon and head.strip():
            line = head  # "in the mountains: The phrase could be ..."
        words = line.split()
        if len(words) > MAX_DESCRIPTOR_WORDS and line.rstrip().endswith((".", "!", "?")):
            items.append(line.strip())  # a sentence: keep whole, to be rejected as one
            continue
        for part in re.split(r"[,;]|\s/\s|\s+-\s+", line):
            part = re.sub(r"^(?:or|and|etc)\b", "", part.strip(), flags=re.IGNORECASE).strip()
            if part:
                items.append(part)
    return items


def normalize(item: str) -> str:
    """Lowercase, strip quotes and end punctuation, collapse whitespace."""
    s = " ".join(item.split()).lower()
    s = s.strip(_QUOTES + " ")
    s = s.rstrip(".!?;:,").strip(_QUOTES + " ")
    return " ".join(s.split())


def near_key(text: str) -> str:
    """Key for near-duplicates: no articles, case or punctuation ('In a forest.' ~ 'in the forest')."""
    words = re.sub(r"[^a-z0-9 ]+", " ", text.lower()).split()
    return " ".join(w for w in words if w not in ARTICLES)


def _has_word(text: str, words: Iterable[str]) -> str | None:
    padded = f" {re.sub(r'[^a-z0-9 ]+', ' ', text)} "
    return next((w for w in words if f" {w} " in padded), None)


@dataclass(frozen=True)
class Rules:
    """What an acceptable descriptor of one concept looks like."""

    concept: str
    form: Form
    examples: frozenset[str] = frozenset()
    starts: frozenset[str] = frozenset()
    max_words: int = 5
    hint_words: frozenset[str] = frozenset()
    classes: frozenset[str] = frozenset()
    concept_names: frozenset[str] = frozenset()


def rules_for(concept: str, form: Form, entry=None, classes: Iterable[str] = (), concept_names=()) -> Rules:
    """Rules from a catalog entry (or defaults for a concept the catalog does not know)."""
    return Rules(
        concept=concept,
        form=form,
        examples=frozenset(near_key(e) for e in (entry.examples if entry else [])),
        starts=frozenset(entry.starts if entry else []),
        max_words=entry.max_words if entry else 5,
        hint_words=frozenset(near_key(entry.hint).split() if entry else []),
        classes=frozenset(classes),
        concept_names=frozenset(concept_names) | {concept},
    )


def judge(item: str, rules: Rules) -> tuple[str, str | None]:
    """(normalised text without placeholder, rejection reason or None) for one parsed item."""
    text = normalize(item)
    if not text:
        return text, EMPTY
    holes = _PLACEHOLDER_RE.findall(text)
    bare = normalize(_PLACEHOLDER_RE.sub(" ", text))
    if not bare:
        return text, EMPTY
    if not _PHRASE_RE.match(bare) or _has_word(bare, SENTENCE_WORDS):
        return text, NOT_PHRASE
    if holes:
        names = {h.strip("{}[]<> ").replace("_", " ") for h in holes}
        if len(holes) != 1 or not names <= _CAPTION_NAMES:
            return text, PLACEHOLDER_COUNT
    text, words = bare, bare.split()
    if len(words) > min(rules.max_words, MAX_DESCRIPTOR_WORDS) or len(text) > MAX_DESCRIPTOR_CHARS:
        return text, TOO_LONG
    if words[-1] in ARTICLES | PREPOSITIONS or words[-1].endswith("'"):
        return text, INCOMPLETE
    if near_key(text) in rules.examples or (
        rules.hint_words and set(near_key(text).split()) <= rules.hint_words
    ):
        return text, ECHO  # "one adjective" echoes the hint
    if len(text.replace(" ", "")) < 3:
        return text, NOT_PHRASE
    if _has_word(text, rules.classes):
        return text, NAMES_CLASS
    if _has_word(text, rules.concept_names):
        return text, NAMES_CONCEPT
    if rules.starts and words[0] not in rules.starts:
        return text, OFF_CONCEPT
    if rules.form == "prefix" and words[0] in ARTICLES | PREPOSITIONS:
        return text, OFF_CONCEPT  # prefix descriptors are adjectives: "blurred", not "in blur"
    if rules.form == "suffix" and len(words) < 2:
        return text, OFF_CONCEPT  # a suffix needs a preposition and a noun: "in the snow"
    return text, None


@dataclass
class Candidate:
    """One distinct phrase seen in the replies, with its verdict."""

    text: str
    count: int = 1
    reason: str | None = None  # None: accepted
    first_round: int = 0
    variants: set[str] = field(default_factory=set)

    @property
    def accepted(self) -> bool:
        return self.reason is None


class Collector:
    """Accumulates replies round by round; keeps one candidate per near-duplicate key."""

    def __init__(self, rules: Rules, existing: dict[str, str] | None = None, min_count: int = 1):
        # existing: near_key -> status of descriptors already in the bank
        self.rules = rules
        self.existing = existing or {}
        self.min_count = min_count
        self.candidates: dict[str, Candidate] = {}
        self.occurrences: Counter[str] = Counter()  # reason -> how many parsed items got it

    def add_reply(self, reply: str, round_no: int = 0, shown: Iterable[str] | None = None) -> None:
        """Judge every item of a reply; `shown` are the examples its prompt showed (default: the rules')."""
        rules = self.rules if shown is None else replace(self.rules, examples=frozenset(map(near_key, shown)))
        for item in parse_reply(reply):
            text, reason = judge(item, rules)
            if reason == ECHO and near_key(text) in self.candidates:
                self.occurrences[ECHO] += 1  # repeats an accepted phrase we showed it: no new evidence
                continue
            key = near_key(text) if reason is None else f"{reason}\x00{text}"
            if reason is None and key in self.existing:
                reason = PREV_REJECTED if self.existing[key] == "rejected" else IN_BANK
            cand = self.candidates.get(key)
            if cand is None:
                self.candidates[key] = Candidate(text, 1, reason, round_no, {text})
                self.occurrences[reason or "accepted"] += 1
                continue
            cand.count += 1
            if reason is not None:
                self.occurrences[reason] += 1
            elif text in cand.variants:
                self.occurrences[DUPLICATE] += 1
            else:
                cand.variants.add(text)
                self.occurrences[NEAR_DUPLICATE] += 1

    def accepted(self) -> list[Candidate]:
        """Accepted candidates sampled at least min_count times, most frequent first."""
        ok = [c for c in self.candidates.values() if c.accepted and c.count >= self.min_count]
        return sorted(ok, key=lambda c: (-c.count, c.first_round))

    def rejected(self) -> list[Candidate]:
        """Rejected candidates; rare ones (below min_count) are marked so."""
        out = []
        for c in self.candidates.values():
            if c.accepted and c.count < self.min_count:
                out.append(Candidate(c.text, c.count, RARE, c.first_round, c.variants))
            elif not c.accepted:
                out.append(c)
        return out

    def summary(self) -> list[tuple[str, int, int]]:
        """(reason, parsed items, distinct phrases) rows; 'accepted' first."""
        distinct = Counter(c.reason for c in self.rejected())
        n_ok = len(self.accepted())
        rows = [("accepted", self.occurrences["accepted"], n_ok)]
        for reason, n in self.occurrences.most_common():
            if reason != "accepted":
                rows.append((reason, n, distinct.get(reason, 0)))
        if distinct.get(RARE):
            rows.append((RARE, sum(c.count for c in self.rejected() if c.reason == RARE), distinct[RARE]))
        return rows


__all__ = ["PLACEHOLDER", "Candidate", "Collector", "Rules", "judge", "parse_reply", "rules_for"]
