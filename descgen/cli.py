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
from descgen.bank import BankDoc, diff_banks, latest_bank, load_bank, now, read_doc, validate_doc
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
BackendOpt = Annotated[
    str, typer.Option("--backend", help="hf (transformers, local) or openai (an OpenAI-compatible server)")
]
BaseUrlOpt = Annotated[
    str | None, typer.Option("--base-url", help="openai backend: server URL, e.g. http://127.0.0.1:8000/v1")
]
KeyEnvOpt = Annotated[
    str | None,
    typer.Option(
        "--api-key-env", help="openai backend: environment variable holding the key (OPENAI_API_KEY)"
    ),
]
TimeoutOpt = Annotated[float, typer.Option("--request-timeout", min=0.1, help="openai backend: seconds")]
DeviceOpt = Annotated[
    str | None, typer.Option("--device", help="hf: cpu, cuda, cuda:1 (default: cuda if any)")
]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="hf: auto, float32, bfloat16, float16")]
DeviceMapOpt = Annotated[
    str | None, typer.Option("--device-map", help="hf: 'auto' spreads a big model over GPUs (accelerate)")
]
FourBitOpt = Annotated[bool, typer.Option("--load-in-4bit", help="hf: 4-bit weights (bitsandbytes, GPU)")]


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


def _commit(base: BankDoc | None, change, banks_dir: Path, dest: Path | None, bank: Path | None) -> Path:
    """Save `change` (the command's edits) on `base`; without --bank, re-applied on a newer version
    that another command wrote meanwhile, so neither command's change is lost."""
    from descgen.bank import save_change

    def told(path):
        err.print(f"note: {path} was written meanwhile by another command; applying this change on it")

    path = save_change(base, change, banks_dir, out=dest, follow=bank is None, on_rebase=told)
    out.print(f"wrote {path}")
    if bank is not None and base is not None and dest is None:  # a branch: say what it leaves out
        from descgen.bank import list_versions, version_of

        b = version_of(base.path) or 0
        newer = [p.name for v, p in list_versions(banks_dir) if v > b and p != path]
        if newer:
            err.print(
                f"note: built on --bank {base.path}, so it lacks the changes of {len(newer)} newer "
                f"version(s), the newest {newer[-1]}"
            )
    return path


def _generator(model, threads, allow_download, trust_remote_code, backend="hf", **opts):
    t = time.monotonic()
    if backend == "openai":
        from descgen.llm import load_openai_generator  # standard library only

        if not opts.get("base_url"):
            raise typer.BadParameter("--backend openai needs --base-url URL")
        gen = load_openai_generator(
            opts["base_url"], model, api_key_env=opts.get("api_key_env"), timeout=opts.get("timeout", 60.0)
        )
        err.print(f"[dim]model {gen.info.id} at {gen.base_url}[/dim]")
        return gen
    if backend != "hf":
        raise typer.BadParameter("--backend must be hf or openai")
    from descgen.llm import load_generator  # torch + transformers: only for commands that sample

    gen = load_generator(
        model,
        threads=threads,
        allow_download=allow_download,
        trust_remote_code=trust_remote_code,
        device=opts.get("device"),
        dtype=opts.get("dtype", "auto"),
        device_map=opts.get("device_map"),
        load_in_4bit=opts.get("load_in_4bit", False),
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
    backend: BackendOpt = "hf",
    base_url: BaseUrlOpt = None,
    api_key_env: KeyEnvOpt = None,
    request_timeout: TimeoutOpt = 60.0,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "auto",
    device_map: DeviceMapOpt = None,
    load_in_4bit: FourBitOpt = False,
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
        gen = _generator(
            model,
            threads,
            allow_download,
            trust_remote_code,
            backend,
            base_url=base_url,
            api_key_env=api_key_env,
            timeout=request_timeout,
            device=device,
            dtype=dtype,
            device_map=device_map,
            load_in_4bit=load_in_4bit,
        )
        info = gen.info
        props = propose_concepts(gen, tmpl, cat, samples=samples, sampling=sampling, seed=seed)
        log = [{"kind": "reply", "task": "concepts", "reply": r} for r in props.replies]
        log += [
            {"kind": "rejected", "task": "concepts", "phrase": p, "count": n, "reason": "not a concept word"}
            for p, n in props.rejected.items()
        ]
    started = now()

    def change(d: BankDoc) -> list[dict]:  # a recorded operation: re-applied on a newer version if needed
        gid = d.start_generation(
            "concepts",
            started_at=started,
            model=info,
            prompt=_prompt_info(tmpl) if samples else None,
            decoding=sampling.as_dict() if samples else {},
            seed=seed if samples else None,
        )
        names = add_proposals(d, props, cat, gid, min_count)
        stats = {"samples": samples, "concepts": len(names)}
        if props:
            stats |= {"matched": dict(props.matched), "uncatalogued": dict(props.unmatched)}
        d.finish_generation(gid, stop_reason=f"{samples} samples", stats=stats)
        return log

    change(doc)
    table = Table("concept", "proposed by LLM", "sources")
    for c in doc.bank.concepts:
        table.add_row(c.name, str(c.count), ", ".join(c.sources))
    out.print(table)
    _commit(base, change, banks_dir, out_path, bank)


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
    temperature: Annotated[float, typer.Option(min=0.0, help="0: greedy decoding")] = 1.0,
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
    backend: BackendOpt = "hf",
    base_url: BaseUrlOpt = None,
    api_key_env: KeyEnvOpt = None,
    request_timeout: TimeoutOpt = 60.0,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "auto",
    device_map: DeviceMapOpt = None,
    load_in_4bit: FourBitOpt = False,
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
    gen = _generator(
        model,
        threads,
        allow_download,
        trust_remote_code,
        backend,
        base_url=base_url,
        api_key_env=api_key_env,
        timeout=request_timeout,
        device=device,
        dtype=dtype,
        device_map=device_map,
        load_in_4bit=load_in_4bit,
    )
    sampling = Sampling(batch_size, max_new_tokens, temperature, top_p, bootstrap)
    budget = Budget(max_rounds, max_seconds or None, max_tokens)
    extra = [w.strip().lower() for w in (classes or "").split(",") if w.strip()]
    doc, runs, added = base.derive(), [], 0
    # Descriptors must not name a concept; uncatalogued LLM proposals count once a reviewer approves them.
    names = [e.name for e in cat.concepts] + [c.name for c in b.concepts if c.status == "approved"]
    for c in chosen:
        entry = cat.get(c.name)
        rules = rules_for(c.name, c.form, entry, list(cat.classes) + extra, names)
        fields = {
            "model": gen.info,
            "prompt": _prompt_info(tmpl),
            "decoding": sampling.as_dict(),
            "seed": seed,
        }
        started = now()
        gid = doc.start_generation(f"expand {c.name}", started_at=started, **fields)
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
        runs.append((c, fields, started, now(), res))
        _report(c.name, res, time.monotonic() - t, show_rejected)
    if not added:
        raise DescgenError(
            "no descriptor was accepted within the budget; nothing written (see --show-rejected)"
        )

    def change(d: BankDoc) -> list[dict]:  # the expansion as a recorded operation (re-applied if needed)
        log: list[dict] = []
        for c, fields, started, finished, res in runs:
            gid = d.start_generation(f"expand {c.name}", started_at=started, **fields)
            add_expansion(d, res, c.form, gid)
            d.finish_generation(gid, stop_reason=res.stop_reason, stats=res.stats, finished_at=finished)
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
        return log

    _commit(base, change, banks_dir, out_path, bank)


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

    def change(new: BankDoc) -> None:
        gid = new.start_generation("approve" if status == "approved" else "reject")
        for iid in chosen:
            new.set_status(iid, status, note)
        new.finish_generation(gid, stats={status: len(chosen)})

    out.print(f"{status} {len(chosen)}: " + ", ".join(chosen[:8]) + (" ..." if len(chosen) > 8 else ""))
    _commit(doc, change, banks_dir, out_path, bank)


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
    catalog: CatalogOpt = None,
):
    """Review items one by one: a=approve, r=reject, e=edit (then approve), s=skip, u=undo, q=quit and save.

    Keys act at once in a terminal (Enter otherwise). Ctrl-D / end of input keeps the decisions made so
    far; Ctrl-C offers to keep them. An edit is checked when typed, with the QC of generated phrases.
    """
    from descgen.review import ReviewInterrupted, apply_decisions, ask_in_terminal, qc_rules_for

    doc = _base(bank, banks_dir)
    _check_dest(banks_dir, out_path)
    rules_for = qc_rules_for(doc, catalog)
    try:
        decisions = review_items(doc, concept, status, ask_in_terminal(out), out.print, rules_for)
    except ReviewInterrupted as e:
        decisions = e.decisions
        if (
            decisions
            and not e.eof
            and not _confirm(f"interrupted: save the {len(decisions)} decisions made?")
        ):
            raise DescgenError(
                f"interrupted; {len(decisions)} decisions discarded, nothing written"
            ) from None
        out.print(f"{e}: keeping the {len(decisions)} decisions made so far")
    if not decisions:
        out.print("no changes; nothing written")
        return
    _commit(doc, lambda d: apply_decisions(d, decisions), banks_dir, out_path, bank)


def _confirm(question: str) -> bool:
    """Yes unless the user says no; end of input or a second Ctrl-C keeps (never loses) the work."""
    try:
        return typer.confirm(question, default=True, err=True)
    except (EOFError, KeyboardInterrupt, typer.Abort):
        return True


# --- inspecting -----------------------------------------------------------------------------


@app.command()
def validate(
    files: Annotated[list[Path], typer.Argument(help="bank files")],
    json_: Annotated[bool, typer.Option("--json", help="print one JSON report on stdout")] = False,
):
    """Check bank files against the schema; one file:line message per problem, exit 1 if any."""
    bad = 0
    report = []
    for f in files:
        try:
            bank = validate_doc(read_doc(f), f)
        except BankError as e:
            if not json_:
                for p in e.problems:
                    err.print(p)
            report.append({"file": str(f), "ok": False, "problems": list(e.problems)})
            bad += 1
            continue
        stale = not bank.hash_is_current
        if stale and not json_:
            err.print(
                f"{f}:1: warning: meta.content_hash is stale (hand-edited); descgen refreshes it on save"
            )
        n_desc = sum(len(c.descriptors) for c in bank.concepts)
        report.append(
            {
                "file": str(f),
                "ok": True,
                "concepts": len(bank.concepts),
                "descriptors": n_desc,
                "stale_hash": stale,
            }
        )
        if not json_:
            out.print(f"{f}: ok ({len(bank.concepts)} concepts, {n_desc} descriptors)")
    if json_:
        import json as _json

        out.print_json(_json.dumps({"files": report}))
    if bad:
        raise typer.Exit(1)


@app.command()
@boundary
def diff(
    a: Path,
    b: Path,
    json_: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
):
    """Changes from bank A to bank B (status, template and note changes)."""
    ba, bb = load_bank(a), load_bank(b)
    changes = diff_banks(ba, bb) + _note_changes(ba, bb)
    if json_:
        import json as _json

        rows = [{"kind": k, "change": t} for k, t in changes]
        out.print_json(_json.dumps({"a": str(a), "b": str(b), "changes": rows}))
        return
    for kind, text in changes:
        colour = {"+": "green", "-": "red", "~": "yellow"}[kind]
        out.print(f"[{colour}]{kind} {text}[/{colour}]")
    if not changes:
        out.print("no differences")


def _note_changes(a, b) -> list[tuple[str, str]]:
    """'~' rows for notes added, changed or removed on concepts and descriptors present in both banks."""
    rows = []
    items_a = {c.name: c for c in a.concepts} | {d.id: d for c in a.concepts for d in c.descriptors}
    items_b = {c.name: c for c in b.concepts} | {d.id: d for c in b.concepts for d in c.descriptors}
    for iid, y in items_b.items():
        x = items_a.get(iid)
        if x is not None and x.note != y.note:
            rows.append(("~", f"{iid}: note {x.note!r} -> {y.note!r}"))
    return rows


@app.command()
@boundary
def show(
    file: Annotated[Path | None, typer.Argument(help="bank (default: latest)")] = None,
    concept: ConceptOpt = None,
    status: Annotated[str | None, typer.Option(help="only descriptors with this status")] = None,
    banks_dir: BanksDir = Path("banks"),
    json_: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
):
    """Summarise a bank; with --concept list its descriptors."""
    doc = _base(file, banks_dir)
    b = doc.bank
    if json_:
        import json as _json

        try:
            chosen = [b.concept(concept)] if concept else b.concepts
        except KeyError:
            raise DescgenError(f"unknown concept {concept!r} in {doc.path}") from None
        data = {
            "file": str(doc.path),
            "version": b.meta.version,
            "parent": b.meta.parent,
            "content_hash": b.meta.content_hash,
            "concepts": [
                c.model_dump(mode="json", exclude={"descriptors"})
                | {
                    "descriptors": [
                        d.model_dump(mode="json")
                        | {"example": d.caption("a photo of a dog.", "dog", c.style)}
                        for d in c.descriptors
                        if status is None or d.status == status
                    ]
                }
                for c in chosen
            ],
        }
        out.print_json(_json.dumps(data))
        return
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


# --- importing and previewing (issue 21) ------------------------------------------------------


@app.command("import")
@boundary
def import_(
    file: Annotated[Path, typer.Argument(help="descriptor list: .pt (torch-saved list), .txt or .yaml")],
    concept: Annotated[str, typer.Option("--concept", help="concept to add them to (created if missing)")],
    form: Annotated[
        str | None, typer.Option("--form", help="prefix|suffix for bare phrases without a '{}' placeholder")
    ] = None,
    approve_: Annotated[
        bool, typer.Option("--approve", help="add them approved (default: proposed)")
    ] = False,
    caption_style: Annotated[
        str | None,
        typer.Option("--caption-style", help="set the concept's caption style: reference|adjective"),
    ] = None,
    banks_dir: BanksDir = Path("banks"),
    bank: BankOpt = None,
    out_path: OutOpt = None,
):
    """Import a published descriptor list (e.g. the StarFT authors' keywords/*.pt) as a new bank version."""
    from descgen.importer import add_imported, file_digest, read_templates
    from descgen.schema import CAPTION_STYLES

    if form not in (None, "prefix", "suffix"):
        raise typer.BadParameter("--form must be prefix or suffix")
    if caption_style not in (None, *CAPTION_STYLES):
        raise typer.BadParameter("--caption-style must be reference or adjective")
    items = read_templates(file, form)
    base = _base(bank, banks_dir, required=False)
    _check_dest(banks_dir, out_path)
    doc = base.derive() if base else BankDoc.new()
    digest = file_digest(file)
    gid = doc.start_generation(f"import {file.name}")
    added, skipped = add_imported(
        doc, concept, items, gid, "approved" if approve_ else "proposed", caption_style
    )
    doc.finish_generation(
        gid,
        stop_reason=f"imported from {file.name}",
        stats={"file": file.name, "sha256": digest, "imported": len(added), "skipped": len(skipped)},
    )
    if not added:
        raise DescgenError(f"{file}: every template is already in the bank; nothing written")
    out.print(f"{concept}: {len(added)} imported, {len(skipped)} already there ({file.name}, {digest[:19]}…)")
    _save(doc, banks_dir, out_path)


@app.command()
@boundary
def preview(
    file: Annotated[Path | None, typer.Argument(help="bank (default: latest)")] = None,
    caption: Annotated[str, typer.Option("--caption", help="caption template, {c} is the class")] = (
        "a photo of a {c}."
    ),
    class_: Annotated[list[str] | None, typer.Option("--class", help="class name (repeatable)")] = None,
    concept: ConceptOpt = None,
    all_: Annotated[bool, typer.Option("--all", help="every descriptor, not only the approved ones")] = False,
    json_: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    banks_dir: BanksDir = Path("banks"),
):
    """The exact captions the trainer builds from a bank, in the concept's style, next to the other style."""
    import json as _json

    from descgen.schema import inject

    doc = _base(file, banks_dir)
    b = doc.bank
    classes = class_ or ["dog"]
    try:
        chosen = [b.concept(concept)] if concept else b.concepts
    except KeyError:
        raise DescgenError(f"unknown concept {concept!r} in {doc.path}") from None
    rows = []
    for c in chosen:
        for d in c.descriptors if all_ else c.approved():
            for k in classes:
                base_cap = caption.replace("{c}", k).replace("{}", k)
                other = "adjective" if c.style == "reference" else "reference"
                rows.append(
                    {
                        "concept": c.name,
                        "id": d.id,
                        "class": k,
                        "style": c.style,
                        "caption": inject(base_cap, d.template, k, c.style),
                        "other_style": other,
                        "other_caption": inject(base_cap, d.template, k, other),
                    }
                )
    if json_:
        out.print_json(_json.dumps({"bank": str(doc.path), "captions": rows}))
        return
    t = Table("id", "style", "trainer caption", "other style", title=f"{doc.path}: {len(rows)} captions")
    for r in rows:
        t.add_row(r["id"], r["style"], r["caption"], r["other_caption"])
    out.print(t)


@app.command()
@boundary
def audit(
    file: Annotated[Path | None, typer.Argument(help="bank (default: latest)")] = None,
    clip: Annotated[
        str,
        typer.Option("--clip", help="open_clip architecture, model-config JSON, or a folder holding both"),
    ] = "",
    pretrained: Annotated[
        str | None, typer.Option("--pretrained", help="open_clip pretrained tag, or a local .safetensors/.pt")
    ] = None,
    text_model: Annotated[
        str,
        typer.Option(
            "--text-model",
            help="instead of --clip: a Hugging Face sentence-encoder folder (e.g. all-MiniLM-L6-v2) for "
            "duplicate clusters and effective n only, no verdict (try --dup-threshold 0.9)",
        ),
    ] = "",
    images: Annotated[
        Path | None, typer.Option("--images", help="folder of images, or CSV with path[,label] columns")
    ] = None,
    caption: Annotated[str, typer.Option("--caption", help="caption template, {c} is the class")] = (
        "a photo of a {c}."
    ),
    class_: Annotated[list[str] | None, typer.Option("--class", help="class name (repeatable)")] = None,
    concept: Annotated[list[str] | None, typer.Option("--concept", help="only these concepts")] = None,
    dup_threshold: Annotated[
        float, typer.Option("--dup-threshold", help="cosine at or above which captions are duplicates")
    ] = 0.97,
    clean_threshold: Annotated[
        float, typer.Option("--clean-threshold", help="cosine to the clean caption that counts as no change")
    ] = 0.995,
    max_images: Annotated[
        int, typer.Option("--max-images", min=1, help="use at most this many images")
    ] = 500,
    reject_duplicates: Annotated[
        bool, typer.Option("--reject-duplicates", help="write a version rejecting all but one per cluster")
    ] = False,
    json_: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    allow_download: Annotated[
        bool, typer.Option("--allow-download", help="fetch a --text-model hub id if it is not cached")
    ] = False,
    threads: ThreadsOpt = None,
    banks_dir: BanksDir = Path("banks"),
    out_path: OutOpt = None,
):
    """Will this bank do anything for this CLIP model? Per concept: distinct descriptors, duplicates, verdict."""
    import json as _json

    from descgen.audit import (
        AuditError,
        audit_concept,
        duplicate_rejections,
        load_clip,
        load_text_model,
        read_images,
    )

    if bool(clip) == bool(text_model):
        raise typer.BadParameter(
            "pass --clip MODEL (open_clip name, model-config JSON or folder) or --text-model FOLDER, not both"
        )
    if text_model and (images is not None or pretrained):
        raise typer.BadParameter("--images and --pretrained need --clip: a text model reads no images")
    doc = _base(file, banks_dir)
    b = doc.bank
    try:
        chosen = [b.concept(c) for c in concept] if concept else [c for c in b.concepts if c.approved()]
    except KeyError as e:
        raise DescgenError(f"unknown concept {e.args[0]!r} in {doc.path}") from None
    chosen = [c for c in chosen if c.approved()]
    if not chosen:
        raise AuditError(f"{doc.path}: no approved descriptors to audit")
    classes = class_ or ["dog"]
    if reject_duplicates:
        _check_dest(banks_dir, out_path)
    model = (
        load_clip(clip, pretrained, threads)
        if clip
        else load_text_model(text_model, threads, allow_download=allow_download)
    )
    img, labels = None, None
    if images is not None:
        paths, labels = read_images(images, classes, max_images)
        img = model.encode_images(paths)
        labels = labels if any(x >= 0 for x in labels) else None
    res = [
        audit_concept(
            model,
            c,
            caption,
            classes,
            images=img,
            labels=labels,
            dup_threshold=dup_threshold,
            clean_threshold=clean_threshold,
        )
        for c in chosen
    ]
    if json_:
        report = {
            "bank": str(doc.path),
            "clip": model.name,
            "scale": model.scale,
            "classes": classes,
            "images": None if img is None else int(img.shape[0]),
            "concepts": [r.as_dict() for r in res],
        }
        out.print_json(_json.dumps(report))
    else:
        _audit_table(doc.path, model, res, img is not None)
    if reject_duplicates:
        dups = duplicate_rejections(res)
        if not dups:
            out.print("no duplicate clusters; nothing written")
            return
        new = doc.derive()
        gid = new.start_generation(f"audit --reject-duplicates ({model.name})")
        for did, keep in dups.items():
            new.set_status(did, "rejected", f"audit: near-duplicate of {keep} for {model.name}")
        new.finish_generation(gid, stats={"rejected": len(dups), "dup_threshold": dup_threshold})
        err.print(f"rejected {len(dups)} near-duplicates")
        new.save(banks_dir, out=out_path)
        (err if json_ else out).print(f"wrote {new.path}")


def _audit_table(path, model, res, with_images):
    cols = ["concept", "n", "eff. n"]
    if model.teacher:
        cols += ["text H (random)"]
    if with_images:
        cols += ["image H (random)", "KL vs clean"]
    cols += ["dup. clusters", "like clean"]
    scale = f"scale {model.scale:.0f}" if model.teacher else "no teacher measures"
    t = Table(*cols, title=f"{path}: {model.name}, {scale}")
    for r in res:
        row = [r.concept, str(r.n), f"{r.effective_n:.1f}"]
        if model.teacher:
            row += [f"{r.text_share:.3f} ({r.text_share_random:.3f})"]
        if with_images:
            row += [f"{r.image_share:.3f} ({r.image_share_random:.3f})", f"{r.image_kl_clean:.3f}"]
        row += [f"{len(r.clusters)} ({sum(len(g) for g in r.clusters)} ids)", str(len(r.clean_like))]
        t.add_row(*row)
    out.print(t)
    if not model.teacher:
        out.print(res[0].verdict.replace("no verdict: ", "No verdicts: ", 1))
    for r in res:
        out.print(f"{r.concept}: {r.verdict}" if model.teacher else f"{r.concept}:")
        for g in r.clusters[:10]:
            out.print(f"  [dim]cluster:[/dim] keep {g[0]}; duplicates {', '.join(g[1:])}")
        if len(r.clusters) > 10:
            out.print(f"  [dim]... and {len(r.clusters) - 10} more clusters (--json lists all)[/dim]")


def version_callback(value: bool):
    if value:
        out.print(f"descgen {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True)] = False,
):
    """descgen: LLM-generated, schema-validated, versioned banks of spurious descriptors."""
