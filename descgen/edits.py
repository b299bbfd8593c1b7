"""In-memory edits of a BankDoc that the commands share: add generated or discovered items, pick items.

from descgen.edits import select; ids = select(doc, ["background.*"], match=None)
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import ValidationError

from descgen.bank import BankDoc
from descgen.errors import DescgenError
from descgen.generate import ConceptProposals, ExpandResult
from descgen.prompts import Catalog
from descgen.qc import near_key
from descgen.schema import Concept, Descriptor, Form, make_template, normalize_phrase, unique_id

# one discovered feature: candidate phrases best first as (phrase, similarity), and its evidence
Feature = tuple[Sequence[tuple[str, float]], dict[str, Any]]


def existing_keys(doc: BankDoc, concept: str) -> dict[str, str]:
    """near-duplicate key -> status of every descriptor the concept already holds."""
    c = doc.bank.concept(concept)
    return {near_key(d.text): d.status for d in c.descriptors}


def add_expansion(doc: BankDoc, res: ExpandResult, form: Form, gid: str) -> list[Descriptor]:
    """Append the accepted candidates of `res` as proposed descriptors; returns them.

    A candidate the concept already holds (near-duplicate) is left out: `res` may be re-applied to a
    newer version that another command wrote meanwhile (descgen.bank.save_change).
    """
    taken = {d.id for c in doc.bank.concepts for d in c.descriptors}
    have = set(existing_keys(doc, res.concept))
    new = []
    for cand in res.accepted:
        if near_key(cand.text) in have:
            continue
        have.add(near_key(cand.text))
        did = unique_id(res.concept, cand.text, taken)
        new.append(
            Descriptor(
                id=did,
                template=make_template(cand.text, form),
                form=form,
                status="proposed",
                source="llm",
                count=cand.count,
                provenance=gid,
            )
        )
    doc.add_descriptors(res.concept, new)
    return new


def add_proposals(
    doc: BankDoc, props: ConceptProposals | None, catalog: Catalog, gid: str, min_count: int = 2
) -> list[str]:
    """Add every catalog concept plus LLM proposals seen >= min_count times; returns names added."""
    added = []
    for e in catalog.concepts:
        n = props.matched.get(e.name, 0) if props else 0
        sources = ["catalog", "llm"] if n else ["catalog"]
        doc.add_concept(
            Concept(
                name=e.name,
                form=e.form,
                sources=sources,
                synonyms=e.synonyms,
                hint=e.hint,
                count=n,
                provenance=gid,
            )
        )
        added.append(e.name)
    for word, n in props.unmatched.most_common() if props else []:
        if n < min_count:
            continue
        doc.add_concept(
            Concept(
                name=word,
                form="suffix",
                sources=["llm"],
                count=n,
                provenance=gid,
                flag="not in catalog: check it is a spurious concept; set form and hint",
            )
        )
        added.append(word)
    return added


def add_discovered(
    doc: BankDoc,
    concept: str,
    form: Form,
    features: Sequence[Feature],
    gid: str,
    hint: str | None = None,
) -> tuple[list[str], dict[int, str]]:
    """Add discovered features to `concept` as proposed descriptors (source: discovered).

    `features` are ranked best first; each is (candidates, evidence) with candidates as (phrase,
    similarity) best first. The first phrase not used by a higher-ranked feature names a feature (none
    left: the feature is skipped). A phrase whose template is already in the bank (either form, any
    concept) gets the evidence attached there instead of a duplicate. The evidence is stored with
    `similarity` and `alternatives` (the other candidates) added, None and empty values dropped.
    The concept is created (sources ["discovered"], `hint`) or "discovered" is merged into its sources.
    Returns (ids of the added descriptors, {index in `features`: id of the existing descriptor matched}).
    """
    concept = normalize_phrase(concept)
    if not any(c.get("name") == concept for c in doc.data["concepts"]):
        doc.add_concept(
            Concept(name=concept, form=form, sources=["discovered"], provenance=gid, hint=hint or None)
        )
    else:
        doc.add_concept(Concept(name=concept, form=form, sources=["discovered"]))  # merges the source
    existing = {node["template"]: iid for iid, node in doc.items() if "template" in node}
    taken = {iid for iid, _ in doc.items()}
    used: set[str] = set()
    added: list[str] = []
    matched: dict[int, str] = {}
    for i, (cands, evidence) in enumerate(features):
        choice = next(((p, s) for p, s in cands if normalize_phrase(p) not in used), None)
        if choice is None:
            continue
        phrase, sim = normalize_phrase(choice[0]), choice[1]
        used.add(phrase)
        ev = dict(evidence)
        ev["similarity"] = sim
        ev["alternatives"] = [f"{p} ({v:.3f})" for p, v in cands if normalize_phrase(p) != phrase]
        ev = {k: v for k, v in ev.items() if v is not None and not (isinstance(v, (list, dict)) and not v)}
        templates = (make_template(phrase, "suffix"), make_template(phrase, "prefix"))
        hit = next((existing[t] for t in templates if t in existing), None)
        if hit is not None:
            doc.set_evidence(hit, ev)
            matched[i] = hit
            continue
        did = unique_id(concept, phrase, taken)
        try:
            d = Descriptor(
                id=did,
                template=make_template(phrase, form),
                form=form,
                status="proposed",
                source="discovered",
                provenance=gid,
                evidence=ev,
            )
        except ValidationError as e:  # a phrase too long or empty
            msg = e.errors()[0]["msg"].removeprefix("Value error, ")
            raise DescgenError(f"feature {i + 1}: phrase {phrase!r} cannot be a descriptor ({msg})") from None
        doc.add_descriptors(concept, [d])
        added.append(did)
    return added, matched


def select(
    doc: BankDoc,
    patterns: Iterable[str] = (),
    match: str | None = None,
    concept: str | None = None,
    status: str | None = None,
) -> list[str]:
    """Ids of concepts/descriptors matching any glob in `patterns` or whose text matches `match`."""
    patterns = list(patterns)
    if not patterns and match is None:
        raise DescgenError("name ids or glob patterns (e.g. 'background.*'), or pass --match REGEX")
    try:
        rx = re.compile(match) if match is not None else None
    except re.error as e:
        raise DescgenError(f"--match {match!r} is not a valid regular expression ({e})") from None
    bank = doc.bank
    if concept is not None:
        try:
            concept = bank.concept(concept).name
        except KeyError:
            raise DescgenError(f"no concept {concept!r} in the bank") from None
    out = []
    for c in bank.concepts:
        if concept is not None and c.name != concept:
            continue
        items = [(c.name, c.name, c.status)] + [(d.id, d.text, d.status) for d in c.descriptors]
        for iid, text, st in items:
            if status is not None and st != status:
                continue
            by_id = any(fnmatch.fnmatchcase(iid, p) for p in patterns)
            by_text = rx is not None and iid != c.name and rx.search(text) is not None
            if by_id or by_text:
                out.append(iid)
    return out
