"""Concepts and descriptors from an LLM: sample in batches, parse, judge, stop on target or budget.

    from descgen.generate import expand_concept; res = expand_concept(gen, prompt, "background", rules, n=50)

No file I/O here: the CLI turns results into a new bank version.
"""

from __future__ import annotations

import random
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from descgen.llm import Generator
from descgen.prompts import Catalog, CatalogEntry, Prompt
from descgen.qc import SENTENCE_WORDS, Candidate, Collector, Rules, normalize, parse_reply
from descgen.schema import _NAME_RE


@dataclass(frozen=True)
class Sampling:
    """Decoding settings; recorded in each generation's provenance."""

    batch_size: int = 16
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 0.9
    bootstrap: bool = True  # after round 1, few-shot examples come from the accepted phrases

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Budget:
    """When to give up before the target count is reached (None: no limit)."""

    max_rounds: int | None = 20
    max_seconds: float | None = 120.0
    max_tokens: int | None = None


@dataclass
class ExpandResult:
    concept: str
    accepted: list[Candidate]
    collector: Collector
    stop_reason: str
    rounds: int
    tokens: int
    seconds: float
    replies: list[dict] = field(default_factory=list)  # {"round", "prefill", "reply"}

    @property
    def stats(self) -> dict:
        return {
            "accepted": len(self.accepted),
            "rejected": len(self.collector.rejected()),
            "rounds": self.rounds,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 1),
            "reasons": dict(self.collector.occurrences),
        }


def descriptor_vars(concept: str, hint: str | None, examples: list[str], max_words: int) -> dict[str, str]:
    """Variables of prompts/descriptors.txt; $examples is a started bullet list."""
    return {
        "concept": concept,
        "hint": hint or concept,
        "max_words": str(max_words),
        "examples": "\n".join(f"- {e}" for e in examples),
    }


def expand_concept(
    gen: Generator,
    prompt: Prompt,
    concept: str,
    rules: Rules,
    *,
    entry: CatalogEntry | None = None,
    hint: str | None = None,
    existing: dict[str, str] | None = None,
    n: int = 50,
    min_count: int = 1,
    sampling: Sampling = Sampling(),
    budget: Budget = Budget(),
    seed: int = 0,
    clock: Callable[[], float] = time.monotonic,
    on_round: Callable[[int, int], None] = lambda rnd, accepted: None,
) -> ExpandResult:
    """Sample descriptors for one concept until n distinct ones are accepted or the budget runs out."""
    examples = list(entry.examples) if entry else []
    rng = random.Random(seed)
    collector = Collector(rules, existing, min_count)
    replies: list[dict] = []
    # A concept expanded again from the same --seed must not replay the samples it already has.
    seed_base = seed + 7919 * len(existing or {})
    start, tokens0, rnd = clock(), gen.tokens, 0
    while True:
        rnd += 1
        # Round 1 shows the catalog's examples. Later rounds show three phrases the model itself
        # proposed and we accepted: fresh examples pull new phrases out of a small model, and a
        # catalog example it then writes unprompted is no longer an echo. All rows of a round share
        # one prompt, so the generator can compute its KV cache once.
        pool = [c.text for c in collector.accepted()[:12]]
        if sampling.bootstrap and rnd > 1 and len(pool) >= 3:
            shown = rng.sample(pool, 3)
        else:
            shown = rng.sample(examples, len(examples))
        variables = descriptor_vars(concept, hint or (entry.hint if entry else None), shown, rules.max_words)
        messages, prefill = prompt.render(**variables)
        prefills = [prefill.lstrip("\n")] * sampling.batch_size
        outs = gen.generate(
            messages,
            prefills,
            max_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=seed_base + rnd,
        )
        for prefill, out in zip(prefills, outs):
            replies.append({"round": rnd, "reply": out})
            # Parse only the started last line plus the reply: the examples above it are ours.
            collector.add_reply(prefill.rsplit("\n", 1)[-1] + out, rnd, shown)
        accepted = collector.accepted()
        on_round(rnd, len(accepted))
        elapsed, tokens = clock() - start, gen.tokens - tokens0
        if len(accepted) >= n:
            stop = f"target reached: {n} accepted"
        elif budget.max_rounds is not None and rnd >= budget.max_rounds:
            stop = f"budget: --max-rounds {budget.max_rounds} used up"
        elif budget.max_seconds is not None and elapsed >= budget.max_seconds:
            stop = f"budget: --max-seconds {budget.max_seconds:g} used up"
        elif budget.max_tokens is not None and tokens >= budget.max_tokens:
            stop = f"budget: --max-tokens {budget.max_tokens} used up"
        else:
            continue
        return ExpandResult(concept, accepted[:n], collector, stop, rnd, tokens, elapsed, replies)


@dataclass
class ConceptProposals:
    matched: Counter  # catalog name -> times proposed
    unmatched: Counter  # normalised proposal -> times proposed
    rejected: Counter  # raw item -> times (not a concept-like word)
    replies: list[str]


def propose_concepts(
    gen: Generator,
    prompt: Prompt,
    catalog: Catalog,
    *,
    samples: int = 20,
    sampling: Sampling = Sampling(max_new_tokens=24),
    seed: int = 0,
) -> ConceptProposals:
    """Ask the LLM for spurious concepts `samples` times; match its words to the catalog."""
    messages, prefill = prompt.render()
    replies: list[str] = []
    rnd = 0
    while len(replies) < samples:
        rnd += 1
        k = min(sampling.batch_size, samples - len(replies))
        replies += gen.generate(
            messages,
            [prefill] * k,
            max_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=seed + rnd,
        )
    matched, unmatched, rejected = Counter(), Counter(), Counter()
    tail = prefill.rsplit("\n", 1)[-1]
    for reply in replies:
        seen: set[str] = set()  # a reply naming a concept twice counts once
        for item in parse_reply(tail + reply):
            word = normalize(item)
            entry = catalog.match(word)
            if entry is not None:
                if entry.name not in seen:
                    matched[entry.name] += 1
                seen.add(entry.name)
            elif _concept_like(word):
                if word not in seen:
                    unmatched[word] += 1
                seen.add(word)
            else:
                rejected[item] += 1
    return ConceptProposals(matched, unmatched, rejected, replies)


def _concept_like(word: str) -> bool:
    """A plausible concept name: one to three lowercase words, no chatter."""
    words = word.split()
    return (
        0 < len(words) <= 3
        and bool(_NAME_RE.match(word))
        and not re.search(r"\d", word)
        and not SENTENCE_WORDS & set(words)
    )
