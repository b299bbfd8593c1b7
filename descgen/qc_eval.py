"""Precision and recall of descgen's QC against a labelled set of phrases, overall and per rule.

    python -m descgen.qc_eval [tests/descgen/data/qc_labels.yaml] [--bank banks/v48.yaml --concept background]

The labelled set holds "PHRASE | + or - | reason" lines per concept (see its header). Every phrase is
judged by the rules `descgen expand` uses for that concept (catalog entry, prompts/qc.yaml); accepted
counts as "predicted plausible". Precision = plausible share of the accepted; recall = accepted share of
the plausible. Per rule: how many phrases it rejected, how many of those were plausible (its false
rejections) and its precision as a filter (implausible share of what it rejected). With --bank, the
accepted (proposed) descriptors of that bank's concepts are looked up in the labels: a fresh run's
plausibility, with any phrase the set lacks listed as unlabelled.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from descgen.qc import judge, near_key, rules_for

DEFAULT_LABELS = Path(__file__).resolve().parent.parent / "tests" / "descgen" / "data" / "qc_labels.yaml"
# The labelled set's captions are about a dog: the class words a descriptor must not name.
EVAL_CLASSES = ("photo", "photos", "picture", "image", "images", "dog", "dogs")


@dataclass(frozen=True)
class Labelled:
    concept: str
    phrase: str  # as written, with {} for a template
    plausible: bool
    reason: str
    line: int


def load_labels(path: str | Path = DEFAULT_LABELS) -> list[Labelled]:
    """The labelled set; ValueError naming file:line for a malformed entry."""
    from ruamel.yaml import YAML

    path = Path(path)
    data = YAML(typ="rt").load(path.read_text(encoding="utf-8"))
    out = []
    for concept, items in data.items():
        for i, raw in enumerate(items):
            line = items.lc.item(i)[0] + 1
            parts = [p.strip() for p in str(raw).split("|")]
            if len(parts) != 3 or parts[1] not in ("+", "-") or not parts[0] or not parts[2]:
                raise ValueError(f"{path}:{line}: expected 'PHRASE | + or - | reason', got {raw!r}")
            # "background@fresh-run-seed-0": more background phrases, from a named source
            out.append(Labelled(str(concept).split("@")[0], parts[0], parts[1] == "+", parts[2], line))
    return out


def phrase_and_form(phrase: str, default: str) -> tuple[str, str]:
    """'{} with a rough texture' -> ('with a rough texture', 'suffix'); a bare phrase keeps `default`."""
    if "{}" not in phrase:
        return phrase, default
    head, _, tail = phrase.partition("{}")
    return (tail.strip(), "suffix") if not head.strip() else (head.strip(), "prefix")


def concept_rules(concept: str, form: str | None = None, classes=EVAL_CLASSES):
    from descgen.prompts import load_catalog

    cat = load_catalog()
    entry = cat.get(concept)
    names = [e.name for e in cat.concepts]
    return rules_for(concept, form or (entry.form if entry else "suffix"), entry, list(classes), names)


def judge_labelled(items: list[Labelled]) -> list[tuple[Labelled, str | None]]:
    """(item, rejection reason or None) for every labelled phrase."""
    out = []
    cache = {}
    for it in items:
        if it.concept not in cache:
            cache[it.concept] = concept_rules(it.concept)
        base = cache[it.concept]
        text, form = phrase_and_form(it.phrase, base.form)
        # no examples were shown: "echo of an example" is about a sampling round, not plausibility
        _, reason = judge(text, replace(base, examples=frozenset()), form)
        out.append((it, reason))
    return out


def scores(judged) -> dict:
    tp = sum(1 for it, r in judged if r is None and it.plausible)
    fp = sum(1 for it, r in judged if r is None and not it.plausible)
    fn = sum(1 for it, r in judged if r is not None and it.plausible)
    per_rule: dict[str, Counter] = {}
    for it, r in judged:
        if r is not None:
            per_rule.setdefault(r, Counter())["plausible" if it.plausible else "implausible"] += 1
    return {
        "n": len(judged),
        "plausible": sum(it.plausible for it, _ in judged),
        "accepted": tp + fp,
        "precision": tp / (tp + fp) if tp + fp else 1.0,
        "recall": tp / (tp + fn) if tp + fn else 1.0,
        "rules": {
            r: {
                "rejected": c["plausible"] + c["implausible"],
                "plausible_rejected": c["plausible"],
                "precision": c["implausible"] / (c["plausible"] + c["implausible"]),
            }
            for r, c in sorted(per_rule.items(), key=lambda kv: -sum(kv[1].values()))
        },
    }


def fresh_run(
    bank_path: str | Path, concepts: list[str], labels: list[Labelled], generation: str | None = None
):
    """(concept, phrase, label or None) for the proposed descriptors of a bank's concepts (newest generation)."""
    from descgen.bank import load_bank

    b = load_bank(bank_path)
    known = {(it.concept, near_key(phrase_and_form(it.phrase, "suffix")[0])): it for it in labels}
    out = []
    for name in concepts:
        c = b.concept(name)
        gen = generation or max(
            (d.provenance for d in c.descriptors if d.provenance), key=lambda g: int(g[1:])
        )
        for d in c.descriptors:
            if d.provenance == gen and d.source == "llm":
                it = known.get((c.name, near_key(d.text)))
                out.append((c.name, d.text, it))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m descgen.qc_eval", description=__doc__.splitlines()[0])
    ap.add_argument("labels", nargs="?", default=str(DEFAULT_LABELS))
    ap.add_argument("--bank", help="a bank written by a fresh `descgen expand`: judge its new descriptors")
    ap.add_argument("--concept", action="append", default=[], help="concepts of --bank (repeatable)")
    args = ap.parse_args(argv)
    try:
        labels = load_labels(args.labels)
    except (OSError, ValueError) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    s = scores(judge_labelled(labels))
    by_concept = Counter(it.concept for it in labels)
    print(
        f"{args.labels}: {s['n']} phrases ({', '.join(f'{c} {n}' for c, n in by_concept.items())}), "
        f"{s['plausible']} plausible"
    )
    print(f"QC accepts {s['accepted']}: precision {s['precision']:.3f}, recall {s['recall']:.3f}")
    print(f"{'rule':28} {'rejected':>8} {'of them plausible':>18} {'precision':>9}")
    for r, v in s["rules"].items():
        print(f"{r:28} {v['rejected']:>8} {v['plausible_rejected']:>18} {v['precision']:>9.3f}")
    judged = judge_labelled(labels)
    for it, r in judged:
        if (r is None) != it.plausible:
            kind = "accepted, labelled -" if r is None else f"rejected ({r}), labelled +"
            print(f"  {it.concept}: {it.phrase!r}: {kind} ({it.reason})")
    if args.bank:
        rows = fresh_run(args.bank, args.concept, labels)
        good = sum(1 for *_, it in rows if it is not None and it.plausible)
        bad = [(c, p, it) for c, p, it in rows if it is not None and not it.plausible]
        unl = [(c, p) for c, p, it in rows if it is None]
        print(
            f"fresh run {args.bank}: {len(rows)} accepted; labelled plausible {good}, implausible {len(bad)}, "
            f"unlabelled {len(unl)}"
        )
        for c, p, it in bad:
            print(f"  implausible: {c}: {p!r} ({it.reason})")
        for c, p in unl:
            print(f"  unlabelled: {c}: {p!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
