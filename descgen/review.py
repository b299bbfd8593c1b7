"""Interactive review of a bank: one question per item; the terminal I/O is passed in.

from descgen.review import review_items; review_items(doc, "background", "proposed", ask, print)
"""

from __future__ import annotations

from collections.abc import Callable

from descgen.bank import BankDoc
from descgen.errors import DescgenError
from descgen.schema import make_template

Ask = Callable[[str, list[str], str], str]
CHOICES = ["a", "r", "e", "s", "q"]


def review_items(
    doc: BankDoc, concept: str | None, status: str, ask: Ask, show: Callable[[str], None]
) -> int:
    """Ask about every concept and descriptor with `status`; edits `doc`; returns how many changed."""
    bank = doc.bank
    if concept is not None:
        try:
            concepts = [bank.concept(concept)]
        except KeyError:
            raise DescgenError(f"unknown concept {concept!r}") from None
    else:
        concepts = bank.concepts
    todo = []
    for c in concepts:
        if c.status == status:
            todo.append(
                (c.name, f"concept [bold]{c.name}[/bold] ({c.form}; {c.flag or ', '.join(c.sources)})", None)
            )
        for d in c.descriptors:
            if d.status == status:
                todo.append(
                    (d.id, f"{d.id}: [bold]{d.text}[/bold] x{d.count} → {d.apply('a photo of a dog.')}", d)
                )
    if not todo:
        show(f"nothing with status {status!r} to review")
        return 0
    gid = doc.start_generation("review")
    changed = 0
    show("a=approve  r=reject  e=edit (then approve)  s=skip  q=quit and save")
    for i, (iid, label, d) in enumerate(todo, 1):
        show(f"({i}/{len(todo)}) {label}")
        choice = ask("decision", CHOICES if d is not None else ["a", "r", "s", "q"], "s")
        if choice == "q":
            break
        if choice == "a":
            doc.set_status(iid, "approved")
        elif choice == "r":
            doc.set_status(iid, "rejected")
        elif choice == "e":
            text = ask("new phrase", [], d.text).strip()
            if not text or "{" in text:
                show("empty or braces: skipped")
                continue
            doc.set_template(iid, make_template(text, d.form))
            doc.set_status(iid, "approved", f"edited from {d.text!r}")
        else:
            continue
        changed += 1
    doc.finish_generation(gid, stats={"changed": changed})
    _ = doc.bank  # an edit that broke the schema fails here, before anything is written
    return changed
