"""In-memory edits of a BankDoc that the commands share: add generated items, pick items by pattern.

from descgen.edits import select; ids = select(doc, ["background.*"], match=None)
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable

from descgen.bank import BankDoc
from descgen.errors import DescgenError
from descgen.generate import ConceptProposals, ExpandResult
from descgen.prompts import Catalog
from descgen.qc import near_key
from descgen.schema import Concept, Descriptor, Form, make_template, unique_id


def existing_keys(doc: BankDoc, concept: str) -> dict[str, str]:
    """near-duplicate key -> status of every descriptor the concept already holds."""
    c = doc.bank.concept(concept)
    return {near_key(d.text): d.status for d in c.descriptors}


def add_expansion(doc: BankDoc, res: ExpandResult, form: Form, gid: str) -> list[Descriptor]:
    """Append the accepted candidates of `res` as proposed descriptors; returns them."""
    taken = {d.id for c in doc.bank.concepts for d in c.descriptors}
    new = []
    for cand in res.accepted:
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
