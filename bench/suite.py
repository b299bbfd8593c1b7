"""The StarFT benchmark: fine-tune the synthetic world's zero-shot model on task A, measure ID, OOD and task-B shift.

    from bench.suite import BenchConfig, run_bench; results = run_bench(BenchConfig(split="val"))

Per pretraining seed: write the world's splits, get the cached zero-shot model, then run every row x
fine-tuning seed through `trainer.train.train` (and WiSE-FT through `trainer.wise.wise`). A finished run
(its metrics.json exists) is reused, so a sweep can be extended or resumed. Results go to
`<out>/results.json`; `bench.report` turns them into the table, the Welch tests and the plot.

Rows (issue 5): zeroshot, ft, flyp, flyp_lowlr (flyp at `flyp_low_lr`, matched to starft's ID), kl
(unmasked), starft (the reviewed descgen bank), clean / random (spurious: none / random), oracle (a bank of
the world's true background phrases, written to the cache dir) and wise_flyp / wise_starft (alpha 0.5).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from rich.console import Console

from bench.pretrain import PretrainConfig, get_pretrained, pretrain_vocabulary, read_meta
from bench.vocab import scene_for, vocab_coverage
from bench.world import WorldConfig, write_splits
from descgen.bank import BankDoc, list_versions, load_bank
from descgen.errors import BankError, DescgenError
from descgen.schema import Concept, Descriptor, make_template, slug
from trainer.config import apply_overrides, build_config, read_yaml
from trainer.train import train
from trainer.wise import wise

ALL_ROWS = (
    "zeroshot",
    "ft",
    "flyp",
    "flyp_lowlr",
    "kl",
    "starft",
    "clean",
    "random",
    "oracle",
    "wise_flyp",
    "wise_starft",
    "lipsum",
    "carot",
    "carft",
    "lpft",
)
# the robust fine-tuning baselines of the StarFT paper (trainer.baselines): row = method
BASELINE_ROWS = ("lipsum", "carot", "carft", "lpft")
FINETUNE_ROWS = ("ft", "flyp", "flyp_lowlr", "kl", "starft", "clean", "random", "oracle", *BASELINE_ROWS)
WISE_ROWS = {"wise_flyp": "flyp", "wise_starft": "starft"}
# Evaluation sets: name in the metrics -> world split prefix (the split suffix is _val or _test).
EVAL_SETS = ("a_sketch", "a_unseen", "b_groups", "b_plain", "b_sketch")
# Report columns: name -> (metrics set, key).
COLUMNS: dict[str, tuple[str, str]] = {
    "id": ("a", "top1"),
    "a_sketch": ("a_sketch", "top1"),
    "a_unseen": ("a_unseen", "top1"),
    "b_worst": ("b_groups", "worst_group"),
    "b_worst3": ("b_groups", "worst3_mean"),
    "b_avg": ("b_groups", "group_mean"),
    "b_plain": ("b_plain", "top1"),
    "b_sketch": ("b_sketch", "top1"),
    # derived (`metrics_row`): task-B accuracy on each class's typical pretraining background minus on the
    # others, mean over groups; the zero-shot model's spurious bias, and whether fine-tuning amplifies it
    "b_bias": ("b_groups", "bias_gap"),
    "id_ece": ("a", "ece"),  # expected calibration error on ID (%), lower is better
}


class BenchConfig(BaseModel):
    """Every setting of a benchmark run. Frozen; written to `<out>/bench.json`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pretrain: PretrainConfig = Field(
        default_factory=PretrainConfig, description="zero-shot model and its world (pretraining seed ignored)"
    )
    pretrain_seeds: list[int] = Field([0, 1], min_length=1, description="one zero-shot model per seed")
    seeds: list[int] = Field([0, 1, 2], min_length=1, description="fine-tuning seeds")
    split: Literal["val", "test"] = Field("val", description="tune on val; run test once per setting")
    rows: list[str] = Field(list(ALL_ROWS), min_length=1)
    bias_p: float | None = Field(
        None, ge=0, le=1, description="P(typical background) in task-A fine-tuning/ID data; None = world's"
    )
    # --- fine-tuning (every row) ---
    steps: int = Field(300, gt=0)
    batch_size: int = Field(128, gt=0)
    lr: float = Field(
        1.5e-5, gt=0, description="chosen on val: moderate forgetting (3e-4 collapsed every row's task B)"
    )
    flyp_low_lr: float = Field(1.3e-5, gt=0, description="lr of the flyp_lowlr row (match starft's ID)")
    weight_decay: float = Field(0.1, ge=0)
    warmup_steps: int = Field(30, ge=0)
    freeze_logit_scale: bool = True
    caption: str = Field("a photo of a {c}.", description="fine-tuning caption form")
    templates: str | list[str] = Field("simple", description="zero-shot head prompts (trainer `templates`)")
    group_prompts: str | None = Field(
        None, description="task-B head averaged over backgrounds, e.g. '{c} on {g}'"
    )
    positives: Literal["index", "label"] = "index"
    # --- regulariser (kl, starft, clean, random, oracle) ---
    lam: float = Field(1.0, ge=0)
    kl_lr: float | None = Field(
        None, gt=0, description="lr of the KL rows (kl, starft, clean, random, oracle); None = lr"
    )
    lam_decay: Literal["epoch", "step", "none"] = "epoch"
    kl_scale: float | None = Field(None, gt=0, description="logit scale in the KL; None = the teacher's")
    bank: str | None = Field(None, description="reviewed descgen bank; None = latest banks/vN.yaml with one")
    banks_dir: str = "banks"
    concepts: list[str] = Field(["background"], min_length=1)
    wise_alpha: float = Field(0.5, ge=0, le=1)
    # --- the baselines' rows (lipsum, carot, carft, lpft) ---
    baseline_options: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"lpft": {"probe_epochs": 20, "probe_lr": 1e-2}},
        description="method_options per baseline row, over the methods' defaults (their authors' weights); "
        "carot's teacher_every defaults to the authors' 500 of 25,030 steps scaled to `steps`",
    )
    # --- runtime ---
    out: str = Field("runs/bench", description="results.json, report files (and run dirs unless runs_dir)")
    runs_dir: str | None = Field(
        None,
        description="fine-tuning run dirs; None = <out>/<split>. Share one between sweeps: runs are reused",
    )
    cache_dir: str = Field(".cache/bench", description="world splits, zero-shot models, oracle bank")
    threads: int = Field(2, gt=0)
    progress: bool = True

    @model_validator(mode="after")
    def _check(self) -> BenchConfig:
        unknown = [r for r in self.rows if r not in ALL_ROWS]
        if unknown:
            raise ValueError(f"unknown rows {unknown}; known: {', '.join(ALL_ROWS)}")
        if "{c}" not in self.caption:
            raise ValueError(f"caption {self.caption!r} must contain {{c}}")
        return self

    @property
    def world(self) -> WorldConfig:
        """The fine-tuning/evaluation world: the pretraining world with `bias_p` applied."""
        w = self.pretrain.world
        return w if self.bias_p is None else w.model_copy(update={"bias_p": self.bias_p})


# --- banks ----------------------------------------------------------------------------------------------


def find_reviewed_bank(banks_dir: str | Path = "banks", concepts: tuple[str, ...] = ("background",)) -> Path:
    """The newest banks/vN.yaml with approved descriptors for `concepts`."""

    for _, path in sorted(list_versions(banks_dir), reverse=True):
        try:
            if load_bank(path).approved(list(concepts)):
                return path
        except (DescgenError, KeyError):
            continue
    raise FileNotFoundError(f"{banks_dir}: no bank with approved descriptors for {', '.join(concepts)}")


def bank_phrases(bank_path: str | Path, concepts: list[str]) -> list[str]:

    return [d.text for d in load_bank(bank_path).approved(concepts)]


def write_oracle_bank(world: WorldConfig, cache_dir: str | Path) -> Path:
    """A bank of the world's true background phrases (manual, approved), in the cache dir; reused if present."""

    bgs = world.pretrain_backgrounds
    out = Path(cache_dir) / f"oracle-{world.hash()}" / "v1.yaml"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = BankDoc.new()
    doc.add_concept(Concept(name="background", status="approved", form="suffix", sources=["manual"]))
    descriptors, seen = [], set()
    for bg in bgs:
        for phrase in scene_for(bg).phrases:
            template = make_template(phrase, "suffix")
            if template in seen:
                continue
            seen.add(template)
            descriptors.append(
                Descriptor(
                    id=f"background.{slug(phrase)}",
                    template=template,
                    form="suffix",
                    status="approved",
                    source="manual",
                    note=f"oracle: world background {bg}",
                )
            )
    doc.add_descriptors("background", descriptors)
    try:
        return doc.save(out=out)  # exclusive create: never overwrites
    except BankError:
        if out.is_file():  # a concurrent bench process (same world, another pretraining seed) wrote it first
            return out
        raise


def bank_coverage(bank_path: str | Path, concepts: list[str], world: WorldConfig) -> dict[str, Any]:
    """Share of the bank's approved descriptors whose every word occurs in the pretraining captions."""

    phrases = bank_phrases(bank_path, concepts)
    cov = vocab_coverage(phrases, pretrain_vocabulary(world))
    return {
        "bank": str(bank_path),
        "share": round(100 * cov.share, 1),
        "covered": cov.covered,
        "total": cov.total,
        "missing_words": sorted({w for ws in cov.missing.values() for w in ws}),
    }


# --- trainer configs ------------------------------------------------------------------------------------


def _spec(split_dir: Path, name: str, **extra: Any) -> dict[str, Any]:
    return {
        "path": str(split_dir / "data.csv"),
        "classes": str(split_dir / "classnames.txt"),
        "name": name,
        **{k: v for k, v in extra.items() if v is not None},
    }


def data_section(cfg: BenchConfig, splits: dict[str, Path]) -> dict[str, Any]:
    """The trainer `data:` mapping: a_train, ID = a_<split>, the five evaluation sets."""
    s = cfg.split
    evals = []
    for name in EVAL_SETS:
        extra = {"group_prompts": cfg.group_prompts} if name == "b_groups" else {}
        evals.append(_spec(splits[f"{name}_{s}"], name, **extra))
    return {
        "train": _spec(splits["a_train"], "a_train"),
        "val": _spec(splits[f"a_{s}"], "a"),
        "eval": evals,
    }


def row_config(
    cfg: BenchConfig, row: str, seed: int, model_dir: Path, data: dict, banks: dict[str, str], runs_dir: Path
) -> dict[str, Any]:
    """The trainer config mapping of one fine-tuning row."""
    same = ("ft", "flyp", "kl", "zeroshot", *BASELINE_ROWS)
    method = {"flyp_lowlr": "flyp", **{r: r for r in same}}.get(row, "starft")
    lr = cfg.lr
    if row == "flyp_lowlr":
        lr = cfg.flyp_low_lr
    elif method in ("kl", "starft"):
        lr = cfg.kl_lr or cfg.lr
    c: dict[str, Any] = {
        "name": f"{row}-s{seed}",
        "method": method,
        "model": str(model_dir / "model.json"),
        "pretrained": str(model_dir / "model.safetensors"),
        "data": data,
        "caption": cfg.caption,
        # The benchmark's figures were made with the deterministic preprocess; it keeps it (notebook, Step 12).
        "train_transform": "eval",
        "templates": cfg.templates,
        "batch_size": cfg.batch_size,
        "total_steps": cfg.steps,
        "lr": lr,
        "weight_decay": cfg.weight_decay,
        "warmup_steps": cfg.warmup_steps,
        "freeze_logit_scale": cfg.freeze_logit_scale,
        "positives": cfg.positives,
        "seed": seed,
        "eval_every": 1_000_000,  # evaluate once, at the end (best = last)
        "log_every": 50,
        "runs_dir": str(runs_dir),
        "threads": cfg.threads,
        "progress": cfg.progress,
    }
    if method in ("kl", "starft"):
        c.update(lam=cfg.lam, lam_decay=cfg.lam_decay, kl_scale=cfg.kl_scale, concepts=cfg.concepts)
        c["spurious"] = {"clean": "none", "random": "random"}.get(row, "bank")
        if c["spurious"] == "bank":
            c["bank"] = banks["oracle" if row == "oracle" else "reviewed"]
    if method in BASELINE_ROWS:
        options = dict(cfg.baseline_options.get(method, {}))
        if method == "carot":
            options.setdefault("teacher_every", max(1, round(cfg.steps * 500 / 25_030)))
            c["caption_templates"] = cfg.templates  # its captions: every template (the bench's prompts)
        c["method_options"] = options
    if method == "zeroshot":
        del c["data"]["train"]
    return c


def metrics_row(
    final: dict[str, dict[str, Any]], typical: dict[str, set[str]] | None = None
) -> dict[str, float]:
    """The report columns of one run's final metrics; `typical` (class name -> its typical backgrounds)
    adds the task-B bias gap from the per-group accuracies ("class/background")."""
    out = {}
    for col, (set_name, key) in COLUMNS.items():
        m = final.get(set_name)
        if m is not None and key in m:
            out[col] = round(float(m[key]), 3)
    groups = (final.get("b_groups") or {}).get("per_group")
    if typical and groups:
        split = {True: [], False: []}
        for name, acc in groups.items():
            cls, _, bg = name.partition("/")
            split[bg in typical.get(cls, ())].append(acc)
        if split[True] and split[False]:
            gap = sum(split[True]) / len(split[True]) - sum(split[False]) / len(split[False])
            out["b_bias"] = round(gap, 3)
    return out


def typical_backgrounds(world: WorldConfig) -> dict[str, set[str]]:
    """Task-B class name -> its typical backgrounds in pretraining (the bias the zero-shot model carries)."""
    return {world.class_names[d]: set(bgs) for d, bgs in world.typical_b.items()}


def _run_train(config: dict[str, Any]) -> tuple[Path, dict[str, Any], float | None, float | None]:
    """Train one row (or reuse its finished run dir); returns (run dir, metrics.json, wall s, CPU s of this call)."""

    # The dir name carries the hash of the run's hyperparameters: a finished run is reused only when its
    # settings are the same, so sweeps may share an output folder.
    digest = build_config({**config, "name": None}).hash().removeprefix("sha256:")[:8]
    config = {**config, "name": f"{config['name']}-{digest}"}
    run_dir = Path(config["runs_dir"]) / config["name"]
    if (run_dir / "metrics.json").is_file():
        return _reused(run_dir)
    if run_dir.exists():  # an interrupted run of ours: start it again
        shutil.rmtree(run_dir)
    t0, c0 = time.time(), time.process_time()
    run_dir = train(build_config(config))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return run_dir, metrics, time.time() - t0, time.process_time() - c0


def _reused(out: Path) -> tuple[Path, dict[str, Any], float | None, float | None]:
    """A finished run: its metrics and the times it recorded when it ran (None for runs older than that)."""
    metrics = json.loads((out / "metrics.json").read_text())
    return out, {**metrics, "reused": True}, metrics.get("seconds"), metrics.get("cpu_seconds")


def _run_wise(run_dir: Path, alpha: float) -> tuple[Path, dict[str, Any], float | None, float | None]:

    out = run_dir / "wise" / f"alpha-{alpha:g}"
    if (out / "metrics.json").is_file():
        return _reused(out)
    t0, c0 = time.time(), time.process_time()
    out = wise(run_dir, alpha)
    return out, json.loads((out / "metrics.json").read_text()), time.time() - t0, time.process_time() - c0


def _say(cfg: BenchConfig, text: str) -> None:
    if cfg.progress:
        Console(stderr=True).print(text, highlight=False)


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Run every row x pretraining seed x fine-tuning seed; write and return `<out>/results.json`."""

    t_start = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=1))
    torch.set_num_threads(cfg.threads)

    world = cfg.world
    names = ["a_train", *(f"{n}_{cfg.split}" for n in ("a", *EVAL_SETS))]
    _say(cfg, f"[bold]world[/bold] {world.hash()}: writing splits {', '.join(names)}")
    t0 = time.time()
    splits = write_splits(world, names, cfg.cache_dir)
    splits_seconds = time.time() - t0
    data = data_section(cfg, splits)

    banks: dict[str, str] = {}
    coverage: dict[str, Any] = {}
    needs_bank = {"kl", "starft"} & set(cfg.rows) or "wise_starft" in cfg.rows
    if needs_bank:
        reviewed = Path(cfg.bank) if cfg.bank else find_reviewed_bank(cfg.banks_dir, tuple(cfg.concepts))
        banks["reviewed"] = str(reviewed)
        coverage["reviewed"] = bank_coverage(reviewed, cfg.concepts, cfg.pretrain.world)
        _say(
            cfg,
            f"[bold]bank[/bold] {reviewed}: {coverage['reviewed']['total']} approved "
            f"{'/'.join(cfg.concepts)} descriptors, vocabulary coverage {coverage['reviewed']['share']}%",
        )
    if "oracle" in cfg.rows:
        banks["oracle"] = str(write_oracle_bank(cfg.pretrain.world, cfg.cache_dir))
        coverage["oracle"] = bank_coverage(banks["oracle"], ["background"], cfg.pretrain.world)

    rows = [r for r in ALL_ROWS if r in cfg.rows]
    # WiSE-FT rows need their fine-tuned run
    train_rows = [r for r in rows if r in FINETUNE_ROWS]
    for w, base in WISE_ROWS.items():
        if w in rows and base not in train_rows:
            train_rows.append(base)
    records: list[dict[str, Any]] = []
    zero_shot: dict[str, Any] = {}
    pretrain_seconds: dict[str, float] = {}
    n_jobs = len(cfg.pretrain_seeds) * (
        ("zeroshot" in rows) + len(cfg.seeds) * sum(r != "zeroshot" for r in rows)
    )
    job = 0
    for pseed in cfg.pretrain_seeds:
        pcfg = cfg.pretrain.model_copy(update={"seed": pseed})
        _say(cfg, f"[bold]zero-shot model[/bold] pretraining seed {pseed}")
        t0 = time.time()
        model_dir = get_pretrained(pcfg, cfg.cache_dir, threads=cfg.threads, progress=cfg.progress)
        pretrain_seconds[str(pseed)] = round(time.time() - t0, 1)
        meta = read_meta(model_dir)
        zero_shot[str(pseed)] = {"dir": str(model_dir), "summary": meta.get("zero_shot", {}).get(cfg.split)}
        runs_dir = (Path(cfg.runs_dir) if cfg.runs_dir else out / cfg.split) / f"p{pseed}"

        def record(
            row: str,
            seed: int,
            run_dir: Path,
            metrics: dict,
            seconds: float | None,
            cpu: float | None,
            pseed: int = pseed,
        ) -> None:
            nonlocal job
            job += 1
            rec = {
                "row": row,
                "pretrain_seed": pseed,
                "seed": seed,
                "split": cfg.split,
                "run_dir": str(run_dir),
                # wall and process CPU time (all threads; wall on an idle machine ~ cpu/threads) of the
                # run: of this call, or as recorded when a reused run ran (None if it predates that)
                "seconds": None if seconds is None else round(seconds, 1),
                "cpu_seconds": None if cpu is None else round(cpu, 1),
                "reused": bool(metrics.get("reused")),
                "train_seconds": metrics.get("seconds"),
                "metrics": metrics_row(metrics["final"], typical_backgrounds(world)),
            }
            records.append(rec)
            m = rec["metrics"]
            how = "reused" if metrics.get("reused") else f"{seconds:.0f} s"
            _say(
                cfg,
                f"[{job}/{n_jobs}] p{pseed} {row} s{seed}: ID {m.get('id', float('nan')):.1f}  "
                f"B worst {m.get('b_worst', float('nan')):.1f}  B avg {m.get('b_avg', float('nan')):.1f}  ({how})",
            )

        if "zeroshot" in rows:
            c = row_config(cfg, "zeroshot", 0, model_dir, json.loads(json.dumps(data)), banks, runs_dir)
            record("zeroshot", 0, *_run_train(c))
        for seed in cfg.seeds:
            done: dict[str, Path] = {}
            for row in train_rows:
                c = row_config(cfg, row, seed, model_dir, json.loads(json.dumps(data)), banks, runs_dir)
                run_dir, metrics, secs, cpu = _run_train(c)
                done[row] = run_dir
                if row in rows:
                    record(row, seed, run_dir, metrics, secs, cpu)
            for w, base in WISE_ROWS.items():
                if w in rows:
                    record(w, seed, *_run_wise(done[base], cfg.wise_alpha))

    results = {
        "config": cfg.model_dump(mode="json"),
        "split": cfg.split,
        "world_hash": world.hash(),
        "banks": banks,
        "coverage": coverage,
        "zero_shot_models": zero_shot,
        "records": records,
        "seconds": {
            "total": round(time.time() - t_start, 1),
            "splits": round(splits_seconds, 1),
            "pretrain": pretrain_seconds,
        },
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def config_data(path: str | Path | None, sets: list[str] | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """A config mapping: the YAML file (or nothing), then `key=value` overrides (dotted keys, YAML values:
    `pretrain.world.bias_p=0.8`), then the non-None entries of `overrides`."""

    data = apply_overrides(read_yaml(path) if path is not None else {}, sets)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return data


def load_bench_config(
    path: str | Path | None, sets: list[str] | None = None, **overrides: Any
) -> BenchConfig:
    """A BenchConfig from a YAML file (or defaults), `--set` overrides, then non-None keyword overrides."""
    return BenchConfig.model_validate(config_data(path, sets, overrides))


__all__ = [
    "ALL_ROWS",
    "COLUMNS",
    "BenchConfig",
    "bank_coverage",
    "config_data",
    "find_reviewed_bank",
    "load_bench_config",
    "metrics_row",
    "run_bench",
    "write_oracle_bank",
]
