"""Quality control of LLM replies: parse list items, normalise them, accept or reject with a reason.

    from descgen.qc import Collector, rules_for; c = Collector(rules_for(entry, catalog)); c.add_reply(text)

A small model numbers its lines, writes sentences, echoes the prompt's examples, names classes and
repeats itself. Every parsed item gets exactly one verdict: accepted, or the first rule it breaks.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from pathlib import Path

from ruamel.yaml import YAML

from descgen.prompts import PROMPTS_DIR
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
UNKNOWN_WORD = "unknown word"
COINED = "coined compound"
VAGUE = "vague"
OTHER_CONCEPT = "another concept's word"
NOT_ADJECTIVE = "not an adjective"
PROPER_NOUN = "proper noun"
NOT_VISIBLE = "not visible"
UNGRAMMATICAL = "ungrammatical"
SAME_NOUN = "same noun as accepted ones"
REPEATED = "word repeated"
ADVERB = "an adverb"
WRONG_PREPOSITION = "preposition does not fit the noun"
POSITION = "a position, not a scene"
NOT_IN_LEXICON = "not a word of the concept's vocabulary"
NOT_SCENE = "not a scene"
TWO_ADJECTIVES = "two adjectives"
# Rules that keep a run's descriptors varied rather than plausible ("glossy smooth" and "smooth glossy"
# are both plausible; the tenth "in a ... city" too): a plausibility label cannot judge them.
DIVERSITY_RULES = frozenset({TWO_ADJECTIVES, SAME_NOUN})

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
# Hyphens join words ("close-up", "out-of-focus", "black-and-white"); a word that starts or ends with one
# ("beach-side-", "a- town") or chains content words ("beach-side-block") is a broken phrase. A small
# model copies such forms from the bootstrap examples into every later round (docs/descgen-quality.md §3).
_HYPHEN_JOINERS = frozenset({"a", "and", "in", "of", "or", "the", "to"})


def _broken_hyphens(text: str) -> bool:
    for word in text.split():
        if "-" not in word:
            continue
        parts = word.split("-")
        if any(not p for p in parts):  # leading, trailing or doubled hyphen
            return True
        if len(parts) > 2 and not all(p in _HYPHEN_JOINERS for p in parts[1:-1]):
            return True
    return False


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


# Endings of adjectives ("glossy", "weathered", "metallic", "translucent") and of nouns / -ing forms
# ("overexposure", "illumination", "shimmering") for prefix descriptors, which must be adjectives.
_ADJ_ENDINGS = (
    "y",
    "ed",
    "en",
    "ic",
    "al",
    "ent",
    "ant",
    "ous",
    "ful",
    "less",
    "ive",
    "ile",
    "ate",
    "ish",
    "able",
    "ible",
    "ar",
    "id",
)
_NOUN_ENDINGS = ("tion", "sion", "ure", "ness", "ment", "ance", "ence", "ity", "ism", "ing", "er")
QC_VOCAB = PROMPTS_DIR / "qc.yaml"  # package data: prompts/ through descgen/prompt_files


@functools.cache
def load_vocab(path: str | Path | None = None) -> dict:
    """prompts/qc.yaml: QC word lists, global and per concept (see the file's header)."""
    data = YAML(typ="safe").load(Path(path or QC_VOCAB).read_text(encoding="utf-8")) or {}
    return data


@functools.cache
def zipf(word: str) -> float:
    """English word frequency on the Zipf scale (0: never seen); wordfreq, offline."""
    from wordfreq import zipf_frequency

    return zipf_frequency(word, "en")


def content_words(text: str) -> list[str]:
    """Words that carry meaning: no articles, prepositions, conjunctions; possessive 's dropped."""
    words = [re.sub(r"'s?$", "", w).strip("'-") for w in text.split()]
    return [w for w in words if w and w not in ARTICLES | PREPOSITIONS | {"or", "and", "of", "either"}]


def _matches(word: str, patterns: Iterable[str]) -> str | None:
    return next((p for p in patterns if fnmatchcase(word, p)), None)


def _adjective_shaped(word: str, rules: Rules) -> bool:
    if word in rules.adjectives:
        return True
    if "-" in word:  # "over-exposed": judge the last part
        return _adjective_shaped(word.rsplit("-", 1)[1], rules)
    if word.endswith(_NOUN_ENDINGS) or word.endswith("s") and not word.endswith(("ous", "less")):
        return False
    return word.endswith(_ADJ_ENDINGS)


def _coined_y(word: str, rules: Rules) -> bool:
    """'smoothy', 'roughy': a plain adjective plus -y, and a rare word (real ones: 'silky', 'wrinkly')."""
    if not word.endswith("y") or len(word) < 5 or word in rules.adjectives:
        return False
    base = word[:-1]
    bases = {base, base[:-1] if len(base) > 2 and base[-1] == base[-2] else base}
    return any(b in rules.adjectives for b in bases) and zipf(word) < 2.5


def _has_word(text: str, words: Iterable[str]) -> str | None:
    padded = f" {re.sub(r'[^a-z0-9 ]+', ' ', text)} "
    return next((w for w in words if f" {w} " in padded), None)


# First and last words of phrases that the rules read structurally.
_TRAILING = {
    "above",
    "below",
    "beneath",
    "underneath",
    "behind",
    "inside",
    "outside",
    "beyond",
    "nearby",
    "away",
    "there",
    "ahead",
    "along",
    "across",
    "between",
    "upon",
    "onto",
    "toward",
    "towards",
    "within",
    "amid",
    "amidst",
    "atop",
    "next",
    "up",
    "down",
    "off",
    "out",
}
# "-side" words that are nouns ("on a hillside"); others are adjectives ("a beachside hotel").
_SIDE_NOUNS = {
    "side",
    "countryside",
    "seaside",
    "hillside",
    "mountainside",
    "riverside",
    "roadside",
    "wayside",
    "fireside",
    "poolside",
    "lakeside",
    "waterside",
    "bedside",
    "curbside",
    "kerbside",
    "quayside",
    "dockside",
    "ringside",
    "streetside",
    "outside",
    "inside",
    "underside",
    "flipside",
    "cliffside",
    "bayside",
}
# Nouns ending in "-ed" ("in the riverbed"); any other "-ed" last word of a suffix hangs ("in the castle darkened").
_ED_NOUNS = ("bed", "shed", "sled", "stead", "reed", "weed", "seed", "feed", "speed", "steed", "breed")
# Adverb endings: "woefully", "unnaturally" are not adjectives (real "-ly" adjectives: "woolly", "prickly").
_ADVERB_ENDINGS = (
    "ally",
    "fully",
    "ously",
    "ively",
    "ently",
    "antly",
    "lessly",
    "ably",
    "ibly",
    "edly",
    "ishly",
    "arly",
    "ingly",
)


def _pairs(raw) -> tuple[tuple[frozenset[str], frozenset[str]], ...]:
    return tuple((frozenset(a), frozenset(b)) for a, b in (raw or []))


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
    # Word lists from prompts/qc.yaml (globs allowed); empty: rule off.
    min_zipf: float = 0.0
    vague: frozenset[str] = frozenset()
    avoid: frozenset[str] = frozenset()
    keywords: frozenset[str] = frozenset()
    adjectives: frozenset[str] = frozenset()
    modifiers: frozenset[str] = frozenset()
    compound_prefixes: frozenset[str] = frozenset()
    dangling: frozenset[str] = frozenset()
    min_count: int = 1
    invisible: frozenset[str] = frozenset()
    places: frozenset[str] = frozenset()
    place_nouns: frozenset[str] = frozenset()
    bad_patterns: tuple[str, ...] = ()
    max_same_noun: int = 0  # 0: off; else at most this many accepted phrases share a head noun
    noun_groups: tuple[frozenset[str], ...] = ()
    lexicon: frozenset[str] = frozenset()  # if set, a phrase needs one of these words (globs)
    prep_misfits: tuple[tuple[frozenset[str], frozenset[str]], ...] = ()  # (first words, head nouns)
    positions: tuple[tuple[frozenset[str], frozenset[str]], ...] = ()  # (first words, head-noun globs)
    bare_vague: frozenset[str] = frozenset()  # head nouns that are vague with no modifier
    scene_nouns: frozenset[str] = frozenset()  # if set, a suffix's scene head must be one (globs)
    part_nouns: frozenset[str] = frozenset()  # "edge", "depths": the scene is what they are part of
    max_adjectives: int = 0  # 0: off; else a prefix descriptor holds at most this many (modifiers aside)


def rules_for(
    concept: str, form: Form, entry=None, classes: Iterable[str] = (), concept_names=(), vocab=None
) -> Rules:
    """Rules from a catalog entry and prompts/qc.yaml (or defaults for a concept neither knows)."""
    v = load_vocab() if vocab is None else vocab
    per = (v.get("concepts") or {}).get(concept) or {}
    return Rules(
        concept=concept,
        form=form,
        examples=frozenset(near_key(e) for e in (entry.examples if entry else [])),
        starts=frozenset(entry.starts if entry else []) | frozenset(per.get("extra_starts") or []),
        max_words=entry.max_words if entry else 5,
        hint_words=frozenset(near_key(entry.hint).split() if entry else []),
        classes=frozenset(classes),
        concept_names=frozenset(concept_names) | {concept},
        min_zipf=float(per.get("min_zipf", v.get("min_zipf", 0.0))),
        vague=frozenset(v.get("vague") or []) | frozenset(per.get("vague") or []),
        avoid=frozenset(per.get("avoid") or []),
        keywords=frozenset(per.get("keywords") or []),
        adjectives=frozenset(per.get("adjectives") or []),
        modifiers=frozenset(v.get("modifiers") or []),
        compound_prefixes=frozenset(v.get("compound_prefixes") or []),
        dangling=frozenset(v.get("dangling") or []),
        min_count=int(per.get("min_count", 1)),
        invisible=frozenset(v.get("invisible") or []) | frozenset(per.get("invisible") or []),
        places=frozenset(v.get("places") or []),
        place_nouns=frozenset(v.get("place_nouns") or []),
        bad_patterns=tuple(v.get("bad_patterns") or []) + tuple(per.get("bad_patterns") or []),
        max_same_noun=int(per.get("max_same_noun", v.get("max_same_noun", 0))),
        noun_groups=tuple(frozenset(g) for g in (v.get("noun_groups") or [])),
        lexicon=frozenset(per.get("lexicon") or []),
        prep_misfits=_pairs(per.get("prep_misfits")),
        positions=_pairs(per.get("positions")),
        bare_vague=frozenset(per.get("bare_vague") or []),
        scene_nouns=frozenset(per.get("scene_nouns") or []),
        part_nouns=frozenset(per.get("part_nouns") or []),
        max_adjectives=int(per.get("max_adjectives", 0)),
    )


def for_form(rules: Rules, form: Form) -> Rules:
    """The rules for a phrase in `form` when its concept's own form is the other one (an imported or
    published template: "{} with a rough texture" under texture): the concept's first words and its
    word limit are for its own form, so they are dropped (5 words at most)."""
    if form == rules.form:
        return rules
    return replace(rules, form=form, starts=frozenset(), max_words=max(rules.max_words, 5))


_OF_PREFIX_RE = re.compile(r"^(?:(?:a|an) )?(.+?)(?: (?:photo|image|picture|shot|version))? of$")


def _proper_noun(item: str, text: str, rules: Rules) -> bool:
    """A place or other name: a capitalised word after the first ("in the city of Zanzibar"), a known
    place name, or "<place noun> of <word>" ("in the countryside of alaska")."""
    raw = normalize_case(item).split()
    if any(w[:1].isupper() and w.lower() not in ARTICLES | PREPOSITIONS for w in raw[1:]):
        return True
    words = text.split()
    if _has_word(text, rules.places):
        return True
    for i, w in enumerate(words[:-2]):
        if w in rules.place_nouns and words[i + 1] == "of" and words[i + 2] not in ARTICLES:
            return True
    return False


def normalize_case(item: str) -> str:
    """Like `normalize` but keeping the case (for the proper-noun rule)."""
    s = " ".join(item.split()).strip(_QUOTES + " ")
    return s.rstrip(".!?;:,").strip(_QUOTES + " ")


def _names_concept(text: str, rules: Rules) -> bool:
    """The phrase names a concept: another one anywhere, its own other than as the head of a described
    noun ("with a rough texture", "low resolution" are fine; "in the background", "texture" are not)."""
    words = re.sub(r"[^a-z0-9 ]+", " ", text).split()
    for name in rules.concept_names:
        n = name.split()
        for i in range(len(words) - len(n) + 1):
            if words[i : i + len(n)] == n:
                before = words[i - 1] if i else None
                if name != rules.concept or before is None or before in ARTICLES | PREPOSITIONS:
                    return True  # another concept's name anywhere; its own only as a described noun
    return False


def judge(item: str, rules: Rules, form: Form | None = None) -> tuple[str, str | None]:
    """(normalised text without placeholder, rejection reason or None) for one parsed item.

    `form`: the phrase's own form when it differs from its concept's (see `for_form`).
    """
    if form is not None:
        rules = for_form(rules, form)
    text = normalize(item)
    if not text:
        return text, EMPTY
    holes = _PLACEHOLDER_RE.findall(text)
    bare = normalize(_PLACEHOLDER_RE.sub(" ", text))
    if not bare:
        return text, EMPTY
    if not _PHRASE_RE.match(bare) or _broken_hyphens(bare) or _has_word(bare, SENTENCE_WORDS):
        return text, NOT_PHRASE
    if holes:
        names = {h.strip("{}[]<> ").replace("_", " ") for h in holes}
        if len(holes) != 1 or not names <= _CAPTION_NAMES:
            return text, PLACEHOLDER_COUNT
    text, words = bare, bare.split()
    core = text
    m = _OF_PREFIX_RE.match(text) if rules.form == "prefix" and len(words) > 1 else None
    if m:  # the paper's "low resolution of {}", "a blurry photo of {}": judge the modifiers
        core = m.group(1)
        if (
            len(core.split()) > min(rules.max_words + 1, MAX_DESCRIPTOR_WORDS)
            or len(text) > MAX_DESCRIPTOR_CHARS
        ):
            return text, TOO_LONG
    elif len(words) > min(rules.max_words, MAX_DESCRIPTOR_WORDS) or len(text) > MAX_DESCRIPTOR_CHARS:
        return text, TOO_LONG
    if not m and (words[-1] in ARTICLES | PREPOSITIONS or words[-1].endswith("'")):
        return text, INCOMPLETE
    if rules.form == "suffix" and len(words) > 1 and words[-1] in _TRAILING:
        return text, INCOMPLETE  # "on the hill above"
    reason = _structure(core, rules)
    if reason:
        return text, reason
    if _proper_noun(item, text, rules):
        return text, PROPER_NOUN
    if any(re.search(p, text) for p in rules.bad_patterns):
        return text, UNGRAMMATICAL  # "in a sunny day"
    if near_key(text) in rules.examples or (
        rules.hint_words and set(near_key(text).split()) <= rules.hint_words
    ):
        return text, ECHO  # "one adjective" echoes the hint
    if len(text.replace(" ", "")) < 3:
        return text, NOT_PHRASE
    if _has_word(core, rules.classes):
        return text, NAMES_CLASS
    if _names_concept(core, rules):
        return text, NAMES_CONCEPT
    if rules.starts and words[0] not in rules.starts:
        return text, OFF_CONCEPT
    if rules.form == "prefix" and core.split()[0] in ARTICLES | PREPOSITIONS:
        return text, OFF_CONCEPT  # prefix descriptors are adjectives: "blurred", not "in blur"
    if rules.form == "suffix" and len(words) < 2:
        return text, OFF_CONCEPT  # a suffix needs a preposition and a noun: "in the snow"
    return text, _vocabulary(core, rules)


def _wrong_article(article: str, word: str) -> bool:
    """ "a island", "an forest": the article does not fit the next word's sound (u- and h- words are
    left alone: "a university", "an hour")."""
    if article == "a":
        return word[:1] in ("a", "e", "i", "o") and not word.startswith(("one", "once"))
    if article == "an":
        return bool(word) and word[0] not in "aeiouh"
    return False


def _structure(text: str, rules: Rules) -> str | None:
    """Rules on the phrase's shape: a word said twice, an article that does not fit, an adverb for an
    adjective, a suffix whose last word hangs or whose preposition does not fit its noun, a position
    instead of a scene."""
    words = text.split()
    content = content_words(text)
    if len(set(content)) < len(content):
        return REPEATED  # "in the desert desert", "slippy slippy"
    if any(_wrong_article(a, b) for a, b in itertools.pairwise(words)):
        return UNGRAMMATICAL  # "on a island"
    if rules.form == "prefix":
        if any(
            w.endswith(_ADVERB_ENDINGS) and w not in rules.modifiers and w not in rules.adjectives
            for w in words[-1:]
        ):
            return ADVERB  # "woefully"; "slightly blurred" is a modifier and an adjective
        return None
    if len(words) < 2:
        return None
    first, last = words[0], words[-1]
    if last.endswith("ed") and len(content) > 1 and not last.endswith(_ED_NOUNS):
        return UNGRAMMATICAL  # "in the castle darkened": a participle after the noun
    if last.endswith("side") and last not in _SIDE_NOUNS:
        return UNGRAMMATICAL  # "in a beachside": an adjective with no noun
    head = content[-1] if content else ""
    if first == "outside" and len(words) > 2 and words[1] == "of":
        first = "outside"  # "outside of a mountain range" reads as "outside a mountain range"
    for preps, nouns in rules.positions:
        if first in preps and (_matches(head, nouns) or _matches(last, nouns)):
            return POSITION  # "above the mountains", "outside the city streets"
    np = []  # the first noun phrase: up to the next preposition ("on the outskirts | of town")
    for w in words[1:]:
        if w in PREPOSITIONS:
            break
        np.append(w)
    np_head = re.sub(r"'s?$", "", np[-1]) if np else ""
    for preps, nouns in rules.prep_misfits:
        if first in preps and np_head in nouns:
            return WRONG_PREPOSITION  # "on the planetarium", "at a mountain"
    if head in rules.bare_vague and len(content) == 1:
        return VAGUE  # "in a room"
    return None


def _vocabulary(text: str, rules: Rules) -> str | None:
    """The word-level rules (prompts/qc.yaml): invented words, vague words, other concepts' words,
    the concept's keywords, and adjectives for prefix descriptors."""
    content = content_words(text)
    if rules.form == "suffix" and text.split()[-1] in rules.dangling:
        return INCOMPLETE  # "in a bright", "from a wide": the noun is missing
    if rules.min_zipf:
        for w in content:
            if w in rules.adjectives:
                continue  # listed by hand: "vignetted", "out-of-focus"
            if zipf(w) < rules.min_zipf or any(p and zipf(p) < rules.min_zipf for p in w.split("-")):
                return UNKNOWN_WORD  # "overexl", "mountaintribe"
    if rules.form == "prefix" and rules.compound_prefixes:
        for w in content:
            if "-" in w and w not in rules.adjectives and w.split("-", 1)[0] not in rules.compound_prefixes:
                return COINED  # "glossy-varnished"; "over-exposed" is fine
    if rules.form == "prefix" and any(_coined_y(w, rules) for w in content):
        return COINED  # "smoothy": an adjective with a -y glued on
    bigrams = [f"{a}-{b}" for a, b in itertools.pairwise(content)]  # "high end" ~ "high-end"
    if any(_matches(w, rules.invisible) for w in content + bigrams):
        return NOT_VISIBLE  # "in the heat", "tasty"
    if any(_matches(w, rules.vague) for w in content):
        return VAGUE  # "in a location", "in the scene"
    if any(_matches(w, rules.avoid) for w in content):
        return OTHER_CONCEPT  # "at night" under background
    if rules.keywords and not any(_matches(w, rules.keywords) for w in content):
        return OFF_CONCEPT  # "on the beach" under weather
    if rules.form == "prefix" and 0 < rules.max_adjectives < sum(
        w not in rules.modifiers for w in text.split()
    ):
        return TWO_ADJECTIVES  # "glossy smooth": one descriptor names one texture
    if rules.form == "prefix" and (rules.adjectives or rules.modifiers):
        *mods, head = text.split()
        if head in rules.modifiers and head not in rules.adjectives:
            return NOT_ADJECTIVE  # "very very": modifiers with nothing to modify
        if not _adjective_shaped(head, rules) or any(
            m not in rules.modifiers and not _adjective_shaped(m, rules) for m in mods
        ):
            return NOT_ADJECTIVE  # "silk", "glass", "overexposure"
    if rules.form == "prefix" and any(
        w in _stems(rules.lexicon) and w not in rules.adjectives for w in content
    ):
        return NOT_ADJECTIVE  # "polish" for polish*, "crystal" for crystal*: the noun or verb
    if rules.lexicon and not any(_matches(w, rules.lexicon) for w in content):
        return NOT_IN_LEXICON  # texture: "gleeful", "shinny", "verdant" name no surface
    if (
        rules.form == "suffix"
        and rules.scene_nouns
        and not _noun_in(scene_head(text, rules), rules.scene_nouns)
    ):
        return NOT_SCENE  # "in a story", "at a game", "with a hat"
    return None


@functools.cache
def _stems(lexicon: frozenset[str]) -> frozenset[str]:
    """The stems of a vocabulary's globs ("polish" for "polish*"), computed once per vocabulary."""
    return frozenset(p[:-1] for p in lexicon if p.endswith("*"))


def _noun_in(word: str, patterns: Iterable[str]) -> bool:
    """Does the noun, or its singular ("cliffs", "ruins" -> "ruin", "cities" -> "city"), match?"""
    forms = {word}
    if word.endswith("ies"):
        forms.add(word[:-3] + "y")
    if word.endswith("es"):
        forms.add(word[:-2])
    if word.endswith("s"):
        forms.add(word[:-1])
    return bool(word) and any(_matches(f, patterns) for f in forms)


def scene_head(text: str, rules: Rules) -> str:
    """The noun that names a suffix descriptor's scene: the last word of its first noun phrase after
    the opening preposition(s) ("in a crowded **city**", "surrounded by **wildlife**"). A part noun
    gives way to what it is part of: "on the edge of a **cliff**", "in the **sea**'s depths"."""
    words = text.split()
    i = 1
    while i < len(words) and words[i] in PREPOSITIONS:
        i += 1
    head = ""
    while i < len(words):
        np = []
        while i < len(words) and words[i] not in PREPOSITIONS:
            np.append(words[i])
            i += 1
        while len(np) > 1 and np[-1] in _TRAILING | {"around"}:
            np.pop()  # "with fish around"
        if not np:
            break
        head = re.sub(r"'s?$", "", np[-1])
        if not _noun_in(head, rules.part_nouns):
            return head
        owner = next((re.sub(r"'s?$", "", w) for w in np[:-1] if w.endswith(("'s", "'"))), None)
        if owner:
            return owner  # "the sea's depths"
        if len(np) > 1 and np[-2] not in ARTICLES and not (i < len(words) and words[i] == "of"):
            return np[-2]  # "a cliff face", "the mountain top"
        if i < len(words) and words[i] == "of":
            i += 1  # "the edge of | a cliff"
            while i < len(words) and words[i] in PREPOSITIONS:
                i += 1
            continue
        break
    return head


def head_noun(text: str, rules: Rules) -> str:
    """The last content word, singular, mapped to its group ("towns" -> "city" with [city, town, ...])."""
    words = content_words(text)
    if not words:
        return ""
    w = words[-1]
    if w.endswith("s") and not w.endswith(("ss", "us", "is")) and len(w) > 3:
        w = w[:-1]
    for group in rules.noun_groups:
        if w in group:
            return min(group)
    return w


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
            if reason is None and key not in self.candidates and self._noun_is_full(text):
                reason, key = SAME_NOUN, f"{SAME_NOUN}\x00{text}"  # the 8th "in a ... city"
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

    def _noun_is_full(self, text: str) -> bool:
        """Do `max_same_noun` accepted phrases already end in this phrase's head noun (or its group)?"""
        limit = self.rules.max_same_noun
        if not limit or self.rules.form != "suffix":
            return False
        noun = head_noun(text, self.rules)
        same = sum(
            1 for c in self.candidates.values() if c.accepted and head_noun(c.text, self.rules) == noun
        )
        return same >= limit

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
