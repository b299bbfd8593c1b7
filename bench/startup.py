"""Start-up at scale: time and memory to list a large set on 1 and 2 processes, with and without the run index.

    python -m bench.startup all --root /tmp/startup-tree --entries 200000     # prints a markdown table

`make` writes an ImageNet-style tree of empty files (1000 wnid folders; only the listing is measured).
`measure` is what each process runs: `old` lists the tree on every process with torchvision's ImageFolder
into Python lists of `Path`s and labels (trainer's sets before the run index); `new` loads the set through
trainer.inputs.load_sets with the run's index (the main process scans and writes it, the others memory-map
it; a second launch reuses it, as `--resume` does). Each process then forks DataLoader workers that read
every path of the listing, and reports how much private (dirty) memory a worker gained doing so: a Python
list is copied page by page into each worker as reading it touches reference counts; the index's
memory-mapped arrays are only read, so the page cache holds them once for all processes and workers.
(What remains in a worker is pathlib's own: it interns the file names of the `Path`s a worker creates.)
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True)


def _private_mb() -> float:
    """This process's own written or copied memory (Private_Dirty in /proc/self/smaps_rollup), in MB.

    Pages of a memory-mapped file that are only read are not counted: the page cache holds them once
    for every process that maps them."""
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Private_Dirty:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@app.command()
def make(root: Path, entries: int = 200_000) -> None:
    """An ImageNet-layout tree of `entries` empty files under ROOT/train (1000 wnid folders)."""
    from trainer.data.layouts import imagenet_wnids

    wnids = imagenet_wnids()
    train = root / "train"
    if train.exists():
        shutil.rmtree(train)
    for k in range(entries):
        d = train / wnids[k % 1000]
        if k < 1000:
            d.mkdir(parents=True)
        (d / f"{wnids[k % 1000]}_{k:07d}.JPEG").touch()
    typer.echo(f"{entries} files under {train}")


class _Touch:
    """A dataset whose items read one path and label of the listing (what a training worker does)."""

    def __init__(self, paths, labels):
        self.paths, self.labels = paths, labels

    def __len__(self) -> int:
        return 4  # one item per worker is enough: each reads the whole listing

    def __getitem__(self, i: int):
        before = _private_mb()
        total = 0
        for j in range(len(self.paths)):
            total += len(str(self.paths[j])) + int(self.labels[j])
        return _private_mb() - before


def _worker_growth(paths, labels, workers: int) -> float:
    from torch.utils.data import DataLoader

    loader = DataLoader(
        _Touch(paths, labels), batch_size=None, num_workers=workers, multiprocessing_context="fork"
    )
    return max(float(x) for x in loader)


@app.command()
def measure(
    root: Path, run_dir: Path, out: Annotated[Path, typer.Option()], mode: str = "new", workers: int = 2
) -> None:
    """One process's start-up: list ROOT/train (old: ImageFolder; new: the run index); OUT.<rank>.json."""
    import torch  # noqa: F401 - imported before timing, as trainer's start-up does
    from torchvision.datasets import ImageFolder

    from trainer.config import build_config
    from trainer.data.index import process_state
    from trainer.inputs import load_sets

    state = process_state()
    t0, mem0 = time.perf_counter(), _private_mb()
    if mode == "old":
        folder = ImageFolder(str(root / "train"))  # as trainer's sets were: a list of Path objects
        paths, labels = [Path(p) for p, _ in folder.samples], [y for _, y in folder.samples]
        n = len(paths)
    else:
        cfg = build_config(
            {"method": "flyp", "data": {"train": {"path": str(root / "train"), "layout": "imagenet"}}}
        )
        s = load_sets(cfg, index_dir=run_dir / "index")[0]
        paths, labels, n = s.paths, s.labels, len(s)
    seconds = time.perf_counter() - t0
    row = {
        "mode": mode,
        "rank": state.process_index,
        "processes": state.num_processes,
        "entries": n,
        "seconds": round(seconds, 2),
        "listing_private_mb": round(_private_mb() - mem0, 1),
        "peak_rss_mb": round(_peak_mb(), 1),
        "worker_private_growth_mb": round(_worker_growth(paths, labels, workers), 1) if workers else None,
    }
    Path(f"{out}.{state.process_index}.json").write_text(json.dumps(row))
    state.wait_for_everyone()


def _launch(nproc: int, args: list[str]) -> list[dict]:
    here = Path(__file__).resolve().parents[1]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(here) + os.pathsep + env.get("PYTHONPATH", "")
    if nproc == 1:
        cmd = [sys.executable, "-m", "bench.startup", "measure", *args]
    else:
        accelerate = Path(sys.executable).parent / "accelerate"
        cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", str(nproc), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "bench.startup", "measure", *args]  # fmt: skip
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    prefix = Path(args[args.index("--out") + 1])
    files = sorted(prefix.parent.glob(prefix.name + ".*.json"))
    if res.returncode != 0 or len(files) != nproc:
        raise SystemExit(f"measure failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    rows = [json.loads(f.read_text()) for f in files]
    for f in files:
        f.unlink()
    return sorted(rows, key=lambda r: r["rank"])


@app.command()
def all(root: Path, entries: int = 200_000, workers: int = 2) -> None:
    """Make the tree (if needed), measure old and new on 1 and 2 processes, print a markdown table."""
    train = root / "train"
    have = sum(len(os.listdir(train / d)) for d in os.listdir(train)) if train.is_dir() else 0
    if have != entries:
        make(root, entries)
    rows = []
    for nproc in (1, 2):
        for mode, label in (("old", "ImageFolder on every process"), ("new", "run index: scan + write"),
                            ("new", "run index: reuse (--resume)")):  # fmt: skip
            run_dir = root / f"run-{nproc}"
            if label.endswith("scan + write") and run_dir.exists():
                shutil.rmtree(run_dir)
            args = [str(root), str(run_dir), "--out", str(root / "measure"), "--mode", mode]
            for r in _launch(nproc, [*args, "--workers", str(workers)]):
                rows.append({"what": label, **r})
    typer.echo(f"{entries} entries, {workers} DataLoader workers per process")
    typer.echo(
        "| processes | what | rank | seconds | listing MB (private) | peak RSS MB | a worker's copy MB |"
    )
    typer.echo("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        typer.echo(
            f"| {r['processes']} | {r['what']} | {r['rank']} | {r['seconds']} | {r['listing_private_mb']} | "
            f"{r['peak_rss_mb']} | {r['worker_private_growth_mb']} |"
        )


if __name__ == "__main__":
    app()
