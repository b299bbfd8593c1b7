"""Interactive review of a bank: one question per item, decisions recorded, then applied; I/O passed in.

from descgen.review import review_items, apply_decisions; ds = review_items(doc, None, "proposed", ask, print)

The review does not edit the bank while it asks: it records decisions (approve, reject, edit, each
undoable), so an interrupted review can still save what was decided, and the decisions can be applied
again on a newer version that another command wrote meanwhile (descgen.bank.save_change).
An edited phrase is checked when typed: schema (one placeholder, length), collision with another
descriptor, and the same QC as generated phrases (descgen.qc.judge), which the reviewer may override.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from descgen.bank import BankDoc
from descgen.errors import DescgenError
from descgen.qc import Rules, judge, near_key
from descgen.schema import Concept, Descriptor, Status, make_template

Ask = Callable[[str, list[str], str], str]
RulesFor = Callable[[Concept], Rules]
CHOICES = ["a", "r", "e", "s", "u", "q"]
HELP = "a=approve  r=reject  e=edit (then approve)  s=skip  u=undo last decision  q=quit and save"


@dataclass(frozen=True)
class Decision:
    """What the reviewer decided about one item (a concept name or a descriptor id)."""

    item: str
    status: Status
    template: str | None = None  # an edit: the new template
    note: str | None = None
    index: int = 0  # position in the review, to go back to on undo


class ReviewInterrupted(Exception):
    """Ctrl-C or end of input during the review; carries the decisions made so far."""

    def __init__(self, decisions: list[Decision], eof: bool):
        super().__init__("end of input" if eof else "interrupted")
        self.decisions = decisions
        self.eof = eof


def _todo(
    doc: BankDoc, concept: str | None, status: str
) -> list[tuple[str, str, Concept, Descriptor | None]]:
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
            label = f"concept [bold]{c.name}[/bold] ({c.form}; {c.flag or ', '.join(c.sources)})"
            todo.append((c.name, label, c, None))
        for d in c.descriptors:
            if d.status == status:
                # the caption the trainer will build, in the concept's caption style
                shown = d.caption("a photo of a dog.", "dog", c.style)
                label = f"{d.id}: [bold]{d.text}[/bold] x{d.count} → {shown}"
                todo.append((d.id, label, c, d))
    return todo


def check_edit(
    text: str, d: Descriptor, c: Concept, edits: dict[str, str], rules: Rules | None
) -> tuple[str | None, str | None, str | None]:
    """(template, hard problem, QC reason) of an edited phrase for descriptor `d` of concept `c`.

    `edits` maps ids to templates already edited in this review. A hard problem (empty, braces, schema,
    same template as another descriptor) means re-type; a QC reason may be overridden by the reviewer.
    """
    text = " ".join(text.split())
    if not text:
        return None, "empty phrase", None
    if "{" in text or "}" in text:
        return None, "type the phrase only, without {caption} or braces", None
    template = make_template(text, d.form)
    try:
        Descriptor(id=d.id, template=template, form=d.form)
    except ValidationError as e:
        return None, e.errors()[0]["msg"].removeprefix("Value error, "), None
    key = near_key(template.replace("{caption}", " "))
    for other in c.descriptors:
        if other.id == d.id:
            continue
        t = edits.get(other.id, other.template)
        if t == template:
            return None, f"same template as {other.id} ({t!r})", None
        if near_key(t.replace("{caption}", " ")) == key:
            return template, None, f"near-duplicate of {other.id} ({t!r})"
    if rules is not None:
        _, reason = judge(text, rules)
        if reason is not None:
            return template, None, reason
    return template, None, None


def review_items(
    doc: BankDoc,
    concept: str | None,
    status: str,
    ask: Ask,
    show: Callable[[str], None],
    rules_for: RulesFor | None = None,
) -> list[Decision]:
    """Ask about every concept and descriptor with `status`; returns the decisions (`doc` is unchanged).

    `ask` may raise EOFError or KeyboardInterrupt: ReviewInterrupted then carries the decisions so far.
    """
    todo = _todo(doc, concept, status)
    if not todo:
        show(f"nothing with status {status!r} to review")
        return []
    decisions: list[Decision] = []
    show(HELP)
    i = 0
    try:
        while i < len(todo):
            iid, label, c, d = todo[i]
            show(f"({i + 1}/{len(todo)}) {label}")
            choices = CHOICES if d is not None else [k for k in CHOICES if k != "e"]
            choice = ask("decision", choices, "s")
            if choice == "q":
                break
            if choice == "u":
                if not decisions:
                    show("nothing to undo")
                    continue
                last = decisions.pop()
                show(f"undone: {last.item} {last.status}" + (" (edit)" if last.template else ""))
                i = last.index
                continue
            if choice in ("a", "r"):
                decisions.append(Decision(iid, "approved" if choice == "a" else "rejected", index=i))
            elif choice == "e":
                dec = _edit(d, c, decisions, ask, show, rules_for, i)
                if dec is None:
                    continue  # back to the same item
                decisions.append(dec)
            i += 1
    except (EOFError, KeyboardInterrupt) as e:
        raise ReviewInterrupted(decisions, eof=isinstance(e, EOFError)) from None
    return decisions


def _edit(d, c, decisions, ask, show, rules_for, i) -> Decision | None:
    """Ask for a new phrase until it passes the checks (or QC is overridden); None: back to the item."""
    rules = rules_for(c) if rules_for is not None else None
    edits = {x.item: x.template for x in decisions if x.template}
    while True:
        text = ask("new phrase (empty: back)", [], "")
        if not text.strip():
            return None
        template, problem, reason = check_edit(text, d, c, edits, rules)
        if problem is not None:
            show(f"edit {text.strip()!r}: {problem}; type another phrase")
            continue
        if template == d.template:  # typed the phrase unchanged: a plain approval
            return Decision(d.id, "approved", index=i)
        if reason is not None:
            show(f"edit {text.strip()!r}: QC says {reason}")
            k = ask("keep it anyway (y), or type another phrase (n)", ["y", "n"], "n")
            if k != "y":
                continue
            note = f"edited from {d.text!r}; QC overridden: {reason}"
        else:
            note = f"edited from {d.text!r}"
        return Decision(d.id, "approved", template=template, note=note, index=i)


def apply_decisions(doc: BankDoc, decisions: list[Decision]) -> None:
    """Apply review decisions to `doc` under one 'review' generation; DescgenError if one no longer fits."""
    gid = doc.start_generation("review")
    for x in decisions:
        if x.template is not None:
            doc.set_template(x.item, x.template)
        doc.set_status(x.item, x.status, x.note)
    doc.finish_generation(gid, stats={"changed": len(decisions)})
    try:
        _ = doc.bank
    except DescgenError as e:
        edited = [x.item for x in decisions if x.template]
        raise DescgenError(
            f"the review's edits ({', '.join(edited) or 'none'}) do not fit the bank: {e}"
        ) from None


def qc_rules_for(doc: BankDoc, catalog: str | Path | None = None) -> RulesFor:
    """QC rules per concept, built as `descgen expand` builds them (catalog entry, classes, concept names)."""
    from descgen.prompts import load_catalog
    from descgen.qc import rules_for

    cat = load_catalog(catalog)
    names = [e.name for e in cat.concepts] + [c.name for c in doc.bank.concepts if c.status == "approved"]
    return lambda c: rules_for(c.name, c.form, cat.get(c.name), list(cat.classes), names)


def ask_in_terminal(console) -> Ask:
    """`ask` for a person: one key, no Enter, when stdin is a terminal; a line of input otherwise.

    Ctrl-C raises KeyboardInterrupt, Ctrl-D (or end of input) EOFError, in both modes.
    """
    from rich.prompt import Prompt

    keys = sys.stdin.isatty()

    def ask(question: str, choices: list[str], default: str) -> str:
        if keys and choices:
            console.print(f"{question} [{'/'.join(choices)}] ({default}): ", end="", markup=False)
            while True:
                ch = read_key().lower()
                ch = default if ch in ("\r", "\n") else ch
                if ch in choices:
                    console.print(ch, markup=False)
                    return ch
        return Prompt.ask(
            question, choices=choices or None, default=default, show_default=bool(default), console=console
        )

    return ask


def read_key() -> str:
    """One key from the terminal without Enter; Ctrl-C -> KeyboardInterrupt, Ctrl-D -> EOFError."""
    try:
        import termios
        import tty
    except ImportError:  # Windows: click reads the console's keys
        import click

        return click.getchar()
    fd = sys.stdin.fileno()
    old = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)  # TCSANOW, not the default flush: keys typed ahead are kept
        ch = os.read(fd, 1).decode(errors="replace")  # one byte: keys typed ahead stay queued
        if ch == "\x1b":  # an arrow or function key: drop the rest of its escape sequence
            import select

            while select.select([fd], [], [], 0.05)[0]:
                os.read(fd, 16)
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, old)
    if ch == "\x03":
        raise KeyboardInterrupt
    if ch in ("\x04", ""):
        raise EOFError
    return ch
