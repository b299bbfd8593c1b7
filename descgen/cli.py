"""descgen: LLM-generated, schema-validated, versioned banks of spurious descriptors.

descgen concepts && descgen expand --concept background --n 50 && descgen review
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from descgen import __version__
from descgen.bank import BankDoc, diff_banks, latest_bank, load_bank, read_doc, validate_doc
from descgen.errors import BankError, DescgenError
from descgen.review import review_items

app = typer.Typer(
    help=__doc__.splitlines()[0],
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

BanksDir = Annotated[Path, typer.Option("--banks-dir", help="folder of versioned banks vN.yaml")]
BankOpt = Annotated[Path | None, typer.Option("--bank", help="base bank (default: latest in --banks-dir)")]
OutOpt = Annotated[Path | None, typer.Option("--out", help="write the new version here instead")]
ModelOpt = Annotated[
    str | None, typer.Option("--model", help="local dir, .gguf file/dir or hub id (default: embedded)")
]
PromptOpt = Annotated[Path | None, typer.Option("--prompt", help="prompt file overriding prompts/")]
CatalogOpt = Annotated[Path | None, typer.Option("--catalog", help="concept catalog (prompts/catalog.yaml)")]
SeedOpt = Annotated[int, typer.Option("--seed", help="sampling seed")]
ThreadsOpt = Annotated[
    int | None, typer.Option("--threads", min=1, help="torch threads (default min(4, cores))")
]
DownloadOpt = Annotated[bool, typer.Option("--allow-download", help="fetch --model from the hub if missing")]
RemoteOpt = Annotated[bool, typer.Option("--trust-remote-code", help="run model code from the model repo")]
NoteOpt = Annotated[str | None, typer.Option("--note", help="reviewer note stored on each item")]


def boundary(fn):
    """Every DescgenError becomes one 'Error: ...' line on stderr and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DescgenError as e:
            err.print(f"[red]Error:[/red] {e}", markup=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("[red]Error:[/red] interrupted; nothing was written")
            raise typer.Exit(130) from None

    return wrapper


# --- helpers --------------------------------------------------------------------------------


def _base(bank: Path | None, banks_dir: Path, required: bool = True) -> BankDoc | None:
    if bank is not None:
        return BankDoc.load(bank)
    path = latest_bank(banks_dir)
    if path is None:
        if required:
            raise BankError(
                f"{banks_dir}: no bank yet (vN.yaml); run `descgen concepts` first or pass --bank"
            )
        return None
    return BankDoc.load(path)


def _check_dest(banks_dir: Path, dest: Path | None) -> None:
    """Fail before any work if the new version cannot be written."""
    d = dest.parent if dest is not None else banks_dir
    if dest is not None and dest.exists():
        raise BankError(f"{dest}: exists; a bank version is never overwritten")
    if not d.exists():
        if dest is not None:
            raise BankError(f"{d}: no such directory")
        try:
            d.mkdir(parents=True)
        except OSError as e:
            raise BankError(f"{d}: cannot create banks folder ({e.strerror})") from None
    if not d.is_dir():
        raise BankError(f"{d}: not a directory")
    if not os.access(d, os.W_OK | os.X_OK):
        raise BankError(f"{d}: not writable (permission denied); nothing was written")


def _save(doc: BankDoc, banks_dir: Path, dest: Path | None, log: list[dict] | None = None) -> Path:
    path = doc.save(banks_dir, out=dest, log=log)
    out.print(f"wrote {path}")
    return path


def _generator(model, threads, allow_download, trust_remote_code):
    from descgen.llm import load_generator  # torch + transformers: only for commands that sample

    t = time.monotonic()
    gen = load_generator(
        model,
        threads=threads,
        allow_download=allow_download,
        trust_remote_code=trust_remote_code,
        log=lambda m: err.print(f"[dim]{m}[/dim]"),
    )
    err.print(f"[dim]model {gen.info.id} loaded on {gen.device} in {time.monotonic() - t:.1f}s[/dim]")
    return gen


def _prompt_info(prompt):
    from descgen.schema import PromptInfo

    return PromptInfo(name=prompt.path.name, sha256="sha256:" + prompt.sha256)


# --- generating -----------------------------------------------------------------------------


@app.command()
@boundary
def concepts(
    banks_dir: BanksDir = Path("banks"),
    bank: BankOpt = None,
    out_path: OutOpt = None,
    model: ModelOpt = None,
    prompt: PromptOpt = None,
    catalog: CatalogOpt = None,
    samples: Annotated[int, typer.Option(min=0, help="LLM samples (0: catalog only)")] = 20,
    min_count: Annotated[int, typer.Option(min=1, help="keep an uncatalogued proposal seen >= k times")] = 2,
    seed: SeedOpt = 0,
    threads: ThreadsOpt = None,
    allow_download: DownloadOpt = False,
    trust_remote_code: RemoteOpt = False,
):
    """Propose spurious concepts (catalog + LLM) and write them into a new bank version."""
    from descgen.edits import add_proposals
    from descgen.generate import Sampling, propose_concepts
    from descgen.prompts import load_catalog, load_prompt

    base = _base(bank, banks_dir, required=False)
    cat, tmpl = load_catalog(catalog), load_prompt(prompt or "concepts")
    _check_dest(banks_dir, out_path)
    doc = base.derive() if base else BankDoc.new()
    props, info, log = None, None, []
    sampling = Sampling(batch_size=min(20, max(samples, 1)), max_new_tokens=24)
    if samples:
        gen = _generator(model, threads, allow_download, trust_remote_code)
        info = gen.info
        props = propose_concepts(gen, tmpl, cat, samples=samples, sampling=sampling, seed=seed)
        log = [{"kind": "reply", "task": "concepts", "reply": r} for r in props.replies]
        log += [
            {"kind": "rejected", "task": "concepts", "phrase": p, "count": n, "reason": "not a concept word"}
            for p, n in props.rejected.items()
        ]
    gid = doc.start_generation(
        "concepts",
        model=info,
        prompt=_prompt_info(tmpl) if samples else None,
        decoding=sampling.as_dict() if samples else {},
        seed=seed if samples else None,
    )
    names = add_proposals(doc, props, cat, gid, min_count)
    stats = {"samples": samples, "concepts": len(names)}
    if props:
        stats |= {"matched": dict(props.matched), "uncatalogued": dict(props.unmatched)}
    doc.finish_generation(gid, stop_reason=f"{samples} samples", stats=stats)
    table = Table("concept", "proposed by LLM", "sources")
    for c in doc.bank.concepts:
        table.add_row(c.name, str(c.count), ", ".join(c.sources))
    out.print(table)
    _save(doc, banks_dir, out_path, log)


@app.command()
@boundary
def expand(
    concept: Annotated[
        list[str] | None, typer.Option("--concept", help="concept to expand (repeatable)")
    ] = None,
    all_: Annotated[bool, typer.Option("--all", help="expand every approved or catalog concept")] = False,
    n: Annotated[
        int, typer.Option("--n", min=1, help="distinct accepted descriptors wanted per concept")
    ] = 50,
    banks_dir: BanksDir = Path("banks"),
    bank: BankOpt = None,
    out_path: OutOpt = None,
    model: ModelOpt = None,
    prompt: PromptOpt = None,
    catalog: CatalogOpt = None,
    classes: Annotated[str | None, typer.Option(help="extra class names to reject, comma-separated")] = None,
    min_count: Annotated[
        int | None,
        typer.Option(
            min=1, help="keep a phrase only if sampled >= k times (default: prompts/qc.yaml, else 1)"
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="sequences sampled per batch")] = 16,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 48,
    temperature: Annotated[float, typer.Option(min=0.01)] = 1.0,
    top_p: Annotated[float, typer.Option(min=0.01, max=1.0)] = 0.9,
    max_rounds: Annotated[int, typer.Option(min=1, help="budget: batches per concept")] = 20,
    max_seconds: Annotated[float, typer.Option(min=0, help="budget: sampling seconds per concept")] = 120.0,
    max_tokens: Annotated[int | None, typer.Option(min=1, help="budget: new tokens per concept")] = None,
    bootstrap: Annotated[
        bool, typer.Option(help="after round 1, show accepted phrases as the few-shot examples")
    ] = True,
    show_rejected: Annotated[bool, typer.Option(help="list every rejected phrase with its reason")] = False,
    seed: SeedOpt = 0,
    threads: ThreadsOpt = None,
    allow_download: DownloadOpt = False,
    trust_remote_code: RemoteOpt = False,
):
    """Generate descriptors for concepts; the base bank plus the new ones becomes a new version."""
    from descgen.edits import add_expansion, existing_keys
    from descgen.generate import Budget, Sampling, expand_concept
    from descgen.prompts import load_catalog, load_prompt
    from descgen.qc import rules_for

    if bool(concept) == all_:
        raise typer.BadParameter("pass --concept NAME (repeatable) or --all")
    base = _base(bank, banks_dir)
    cat, tmpl = load_catalog(catalog), load_prompt(prompt or "descriptors")
    b = base.bank
    try:
        chosen = [b.concept(c) for c in concept] if concept else [c for c in b.concepts if _expandable(c)]
    except KeyError as e:
        known = ", ".join(c.name for c in b.concepts) or "none"
        raise DescgenError(f"unknown concept {e.args[0]!r} in {base.path} (known: {known})") from None
    _check_dest(banks_dir, out_path)
    gen = _generator(model, threads, allow_download, trust_remote_code)
    sampling = Sampling(batch_size, max_new_tokens, temperature, top_p, bootstrap)
    budget = Budget(max_rounds, max_seconds or None, max_tokens)
    extra = [w.strip().lower() for w in (classes or "").split(",") if w.strip()]
    doc, log, added = base.derive(), [], 0
    # Descriptors must not name a concept; uncatalogued LLM proposals count once a reviewer approves them.
    names = [e.name for e in cat.concepts] + [c.name for c in b.concepts if c.status == "approved"]
    for c in chosen:
        entry = cat.get(c.name)
        rules = rules_for(c.name, c.form, entry, list(cat.classes) + extra, names)
        gid = doc.start_generation(
            f"expand {c.name}",
            model=gen.info,
            prompt=_prompt_info(tmpl),
            decoding=sampling.as_dict(),
            seed=seed,
        )
        t = time.monotonic()
        res = expand_concept(
            gen,
            tmpl,
            c.name,
            rules,
            entry=entry,
            hint=c.hint,
            existing=existing_keys(doc, c.name),
            n=n,
            min_count=min_count or rules.min_count,
            sampling=sampling,
            budget=budget,
            seed=seed,
            on_round=lambda r, k, name=c.name: err.print(f"[dim]{name}: round {r}, {k} accepted[/dim]"),
        )
        new = add_expansion(doc, res, c.form, gid)
        added += len(new)
        doc.finish_generation(gid, stop_reason=res.stop_reason, stats=res.stats)
        log += [{"kind": "reply", "generation": gid, "concept": c.name} | r for r in res.replies]
        log += [
            {
                "kind": "rejected",
                "generation": gid,
                "concept": c.name,
                "phrase": x.text,
                "count": x.count,
                "reason": x.reason,
            }
            for x in res.collector.rejected()
        ]
        _report(c.name, res, time.monotonic() - t, show_rejected)
    if not added:
        raise DescgenError(
            "no descriptor was accepted within the budget; nothing written (see --show-rejected)"
        )
    _save(doc, banks_dir, out_path, log)


def _expandable(c) -> bool:
    """--all takes catalog concepts and approved ones; an uncatalogued LLM proposal needs approval first."""
    return c.status == "approved" or (c.status == "proposed" and "catalog" in c.sources)


def _report(name, res, seconds, show_rejected):
    table = Table("reason", "items", "distinct", title=f"{name}: {len(res.accepted)} accepted")
    for reason, items, distinct in res.collector.summary():
        table.add_row(reason, str(items), str(distinct))
    out.print(table)
    out.print(f"{name}: {res.stop_reason}; {res.rounds} rounds, {res.tokens} tokens, {seconds:.1f}s")
    if show_rejected:
        rej = Table("phrase", "count", "reason", title=f"{name}: rejected")
        for x in sorted(res.collector.rejected(), key=lambda x: (x.reason, -x.count)):
            rej.add_row(x.text, str(x.count), x.reason)
        out.print(rej)


# --- reviewing ------------------------------------------------------------------------------


def _set_status(status, ids, match, concept, only, note, banks_dir, bank, out_path):
    from descgen.edits import select

    doc = _base(bank, banks_dir)
    chosen = select(doc, ids or [], match, concept, only)
    if not chosen:
        raise DescgenError("nothing matched; see `descgen show` for ids")
    _check_dest(banks_dir, out_path)
    new = doc.derive()
    gid = new.start_generation("approve" if status == "approved" else "reject")
    for iid in chosen:
        new.set_status(iid, status, note)
    new.finish_generation(gid, stats={status: len(chosen)})
    out.print(f"{status} {len(chosen)}: " + ", ".join(chosen[:8]) + (" ..." if len(chosen) > 8 else ""))
    _save(new, banks_dir, out_path)


IdsArg = Annotated[list[str] | None, typer.Argument(help="ids or glob patterns, e.g. 'background.*'")]
MatchOpt = Annotated[str | None, typer.Option("--match", help="regex over descriptor text")]
ConceptOpt = Annotated[str | None, typer.Option("--concept", help="only this concept")]
OnlyOpt = Annotated[str | None, typer.Option("--status", help="only items that now have this status")]


@app.command()
@boundary
def approve(
    ids: IdsArg = None,
    match: MatchOpt = None,
    concept: ConceptOpt = None,
    only: OnlyOpt = None,
    note: NoteOpt = None,
    banks_dir: BanksDir = Path("banks"),
    bank: BankOpt = None,
    out_path: OutOpt = None,
):
    """Approve concepts/descriptors by id, glob or --match; writes a new version."""
    _set_status("approved", ids, match, concept, only, note, banks_dir, bank, out_path)


@app.command()
@boundary
def reject(
    ids: IdsArg = None,
    match: MatchOpt = None,
    concept: ConceptOpt = None,
    only: OnlyOpt = None,
    note: NoteOpt = None,
    banks_dir: BanksDir = Path("banks"),
    bank: BankOpt = None,
    out_path: OutOpt = None,
):
    """Reject concepts/descriptors by id, glob or --match; writes a new version."""
    _set_status("rejected", ids, match, concept, only, note, banks_dir, bank, out_path)


@app.command()
@boundary
def review(
    concept: ConceptOpt = None,
    status: Annotated[str, typer.Option(help="review items with this status")] = "proposed",
    banks_dir: BanksDir = Path("banks"),
    bank: BankOpt = None,
    out_path: OutOpt = None,
):
    """Review items one by one: a=approve, r=reject, e=edit (then approve), s=skip, q=quit and save."""
    from rich.prompt import Prompt

    doc = _base(bank, banks_dir)
    _check_dest(banks_dir, out_path)
    new = doc.derive()

    def ask(question, choices, default):
        return Prompt.ask(question, choices=choices or None, default=default, console=out)

    changed = review_items(new, concept, status, ask, out.print)
    if not changed:
        out.print("no changes; nothing written")
        return
    _save(new, banks_dir, out_path)


# --- inspecting -----------------------------------------------------------------------------


@app.command()
def validate(files: Annotated[list[Path], typer.Argument(help="bank files")]):
    """Check bank files against the schema; one file:line message per problem, exit 1 if any."""
    bad = 0
    for f in files:
        try:
            bank = validate_doc(read_doc(f), f)
        except BankError as e:
            for p in e.problems:
                err.print(p)
            bad += 1
            continue
        if not bank.hash_is_current:
            err.print(
                f"{f}:1: warning: meta.content_hash is stale (hand-edited); descgen refreshes it on save"
            )
        out.print(
            f"{f}: ok ({len(bank.concepts)} concepts, {sum(len(c.descriptors) for c in bank.concepts)} descriptors)"
        )
    if bad:
        raise typer.Exit(1)


@app.command()
@boundary
def diff(a: Path, b: Path):
    """Changes from bank A to bank B."""
    changes = diff_banks(load_bank(a), load_bank(b))
    for kind, text in changes:
        colour = {"+": "green", "-": "red", "~": "yellow"}[kind]
        out.print(f"[{colour}]{kind} {text}[/{colour}]")
    if not changes:
        out.print("no differences")


@app.command()
@boundary
def show(
    file: Annotated[Path | None, typer.Argument(help="bank (default: latest)")] = None,
    concept: ConceptOpt = None,
    status: Annotated[str | None, typer.Option(help="only descriptors with this status")] = None,
    banks_dir: BanksDir = Path("banks"),
):
    """Summarise a bank; with --concept list its descriptors."""
    doc = _base(file, banks_dir)
    b = doc.bank
    out.print(f"{doc.path}: version {b.meta.version}, parent {b.meta.parent}, {b.meta.content_hash[:19]}…")
    if concept is None:
        t = Table("concept", "status", "form", "sources", "approved", "proposed", "rejected")
        for c in b.concepts:
            k = {s: sum(d.status == s for d in c.descriptors) for s in ("approved", "proposed", "rejected")}
            t.add_row(c.name, c.status, c.form, ",".join(c.sources), *(str(v) for v in k.values()))
        out.print(t)
        return
    try:
        c = b.concept(concept)
    except KeyError:
        raise DescgenError(f"unknown concept {concept!r} in {doc.path}") from None
    t = Table("id", "status", "count", "example caption", title=f"{c.name} ({c.status})")
    for d in c.descriptors:
        if status is None or d.status == status:
            t.add_row(d.id, d.status, str(d.count), d.apply("a photo of a dog."))
    out.print(t)


def version_callback(value: bool):
    if value:
        out.print(f"descgen {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True)] = False,
):
    """descgen: LLM-generated, schema-validated, versioned banks of spurious descriptors."""
