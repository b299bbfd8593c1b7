"""Training from webdataset shards: split across processes and workers, shuffled, resumable at a shard boundary.

.venv/bin/pytest tests/trainer/test_webdataset.py -q        # the 2-process run is marked slow
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image
from torchvision import transforms

from tests.conftest import CLASSES_A
from trainer.config import DataSpec
from trainer.data import Collate
from trainer.data.stream import ShardStream, StreamLoader, batches_per_epoch, epoch_shards, load_shard_set
from trainer.errors import DataError

VENV_BIN = Path(sys.executable).parent


def make_shards(
    root: Path, n_shards: int, per_shard: int, label_as: str = "cls", sizes: bool = False
) -> Path:
    """n_shards tars of 32x32 PNGs coloured by class, labels as .cls (index) or .txt (class name)."""
    root.mkdir(parents=True, exist_ok=True)
    table = {}
    k = 0
    for s in range(n_shards):
        name = f"train-{s:06d}.tar"
        with wds.TarWriter(str(root / name)) as w:
            for _ in range(per_shard):
                y = k % len(CLASSES_A)
                buf = io.BytesIO()
                Image.new("RGB", (32, 32), (60 * y, 200 - 40 * y, 30 + k % 200)).save(buf, format="PNG")
                label = str(y) if label_as == "cls" else CLASSES_A[y]
                w.write({"__key__": f"s{k:06d}", "png": buf.getvalue(), label_as: label.encode()})
                k += 1
        table[name] = per_shard
    if sizes:
        (root / "sizes.json").write_text(json.dumps(table))
    return root


def spec(root: Path, **kw) -> DataSpec:
    return DataSpec(path=str(root), layout="webdataset", classes=CLASSES_A, **kw)


def test_shard_set_sizes_from_headers_sizes_json_or_num_samples(tmp_path):
    root = make_shards(tmp_path / "a", 3, 5, label_as="txt")
    s = load_shard_set(spec(root), "simple", "train")
    assert len(s) == 15 and s.sizes == [5, 5, 5] and len(s.shards) == 3
    (root / "sizes.json").write_text(json.dumps({f"train-{i:06d}.tar": 4 + i for i in range(3)}))
    assert load_shard_set(spec(root), "simple", "train").sizes == [4, 5, 6]
    os.remove(root / "sizes.json")
    assert load_shard_set(spec(root, num_samples=16), "simple", "train").sizes == [6, 5, 5]
    pattern = str(root / "train-{000000..000001}.tar")
    assert len(load_shard_set(spec(Path(pattern)), "simple", "train").shards) == 2
    with pytest.raises(DataError, match="no such shard"):
        load_shard_set(spec(Path(str(root / "train-{000000..000005}.tar"))), "simple", "train")
    with pytest.raises(DataError, match="needs `classes`"):
        load_shard_set(DataSpec(path=str(root), layout="webdataset"), "simple", "train")


def test_batches_per_epoch_holds_for_every_assignment():
    assert batches_per_epoch([10, 10, 10, 10], world=2, batch=5) == 4
    # 5 shards on 2 processes: one gets 2 shards; the 2 smallest hold 3 + 4 samples
    assert batches_per_epoch([3, 9, 4, 9, 9], world=2, batch=2) == 3
    for epoch in range(5):
        mine = [epoch_shards(5, 0, epoch, r, 2) for r in range(2)]
        assert sorted(mine[0] + mine[1]) == list(range(5))


def _indices(stream: ShardStream, workers: int) -> list[int]:
    loader = StreamLoader(stream, 4, Collate(), workers, length=10**6)
    out = []
    try:
        for batch in loader:
            out += batch["index"].tolist()
    except DataError:  # ran out: the stream is finite, `length` deliberately too large here
        pass
    return out


def test_split_across_processes_and_workers_without_duplicates(tmp_path):
    root = make_shards(tmp_path / "s", 8, 6, sizes=True)
    s = load_shard_set(spec(root), "simple", "train")
    tf = transforms.ToTensor()
    seen: dict[int, list[int]] = {}
    for epoch in (0, 1):
        per_rank = []
        for rank in range(2):
            st = ShardStream(s, tf, "a photo of a {c}.", None, seed=3, rank=rank, world=2, buffer=10)
            st.epoch = epoch
            per_rank.append(_indices(st, workers=2))
        assert all(len(x) == 24 for x in per_rank)
        both = per_rank[0] + per_rank[1]
        assert sorted(both) == list(range(48))  # every sample exactly once, none twice
        seen[epoch] = both
    assert seen[0] != seen[1]  # each epoch its own shard order and shuffle
    st = ShardStream(s, tf, None, None, seed=3, rank=0, world=2, buffer=10)
    assert _indices(st, workers=0) == _indices(st, workers=0)  # seeded: the same epoch replays


def test_loader_batches_captions_and_resume_at_a_shard_boundary(tmp_path):
    root = make_shards(tmp_path / "s", 4, 6, sizes=True)
    s = load_shard_set(spec(root), "simple", "train")
    st = ShardStream(s, transforms.ToTensor(), "a photo of a {c}.", None, seed=0, rank=0, world=1, buffer=4)
    n = batches_per_epoch(s.sizes, 1, 4)
    loader = StreamLoader(st, 4, Collate(lambda texts: texts), 0, n)
    loader.set_epoch(2)
    batches = list(loader)
    assert len(batches) == len(loader) == 6 and all(b["image"].shape == (4, 3, 32, 32) for b in batches)
    assert sorted(i for b in batches for i in b["index"].tolist()) == list(range(24))
    b = batches[0]
    assert all(y == i % 4 for y, i in zip(b["label"].tolist(), b["index"].tolist()))  # labels from .cls
    # resume after 2 batches (8 samples): the first shard (6) is skipped, the rest streamed; 4 batches left
    loader.set_epoch(2)
    rest = list(loader.resume(2))
    first_shard = epoch_shards(4, 0, 2, 0, 1)[0]
    idx = [i for b in rest for i in b["index"].tolist()]
    assert len(rest) == 4 and not set(idx) & set(range(6 * first_shard, 6 * first_shard + 6))
    assert Counter(idx).most_common(1)[0][1] == 1


def test_dry_run_of_a_streamed_training_set(tmp_path, tiny_clip):
    from ruamel.yaml import YAML
    from typer.testing import CliRunner

    from trainer.cli import app

    root = make_shards(tmp_path / "s", 3, 4, label_as="txt")
    cfg = {
        "method": "flyp",
        "model": str(tiny_clip),
        "batch_size": 4,
        "data": {"train": {"path": str(root), "layout": "webdataset", "classes": CLASSES_A}},
    }
    with (tmp_path / "c.yaml").open("w") as f:
        YAML(typ="safe", pure=True).dump(cfg, f)
    r = CliRunner().invoke(app, ["run", "-c", str(tmp_path / "c.yaml"), "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    d = plan["sets"][0]
    assert (d["layout"], d["images"], d["classes"], d["shards"]) == ("webdataset", 12, 4, 3)
    assert [label for _, label in d["samples"]] == CLASSES_A[:3]
    assert plan["schedule"]["steps_per_epoch"] == 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TWO_PROCESS_SCRIPT = r"""
import json, sys
import torch
import trainer.data.stream as stream
from trainer.config import load_config
from trainer.train import train

torch.set_num_threads(1)
out = sys.argv[2]
seen = []
original = stream.StreamLoader.__iter__


def recording(self):  # every batch a process trains on, with its epoch
    for batch in original(self):
        seen.append({"epoch": self.stream.epoch, "index": batch["index"].tolist()})
        yield batch


stream.StreamLoader.__iter__ = recording
train(load_config(sys.argv[1]))
from accelerate import PartialState

with open(f"{out}.rank{PartialState().process_index}.json", "w") as f:
    json.dump(seen, f)
"""


@pytest.mark.slow
def test_two_processes_train_from_shards_seeing_every_sample_once_an_epoch(tmp_path, tiny_clip, image_data):
    """`trainer run` on 2 CPU processes from 4 shards x 8: each epoch, the 32 samples exactly once."""
    from ruamel.yaml import YAML

    from tests.trainer.test_distributed import _env

    shards = make_shards(tmp_path / "shards", 4, 8, sizes=True)
    cfg = {
        "name": "wds",
        "runs_dir": str(tmp_path / "runs"),
        "method": "flyp",
        "model": str(tiny_clip),
        "templates": "simple",
        "batch_size": 8,
        "epochs": 2,
        "lr": 1e-4,
        "warmup_steps": 1,
        "eval_batch_size": 8,
        "threads": 1,
        "progress": False,
        "data": {
            "train": {"path": str(shards), "layout": "webdataset", "classes": CLASSES_A},
            "val": {"path": str(image_data["val"]), "classes": str(image_data["classes_a"]), "name": "val"},
        },
    }
    with (tmp_path / "c.yaml").open("w") as f:
        YAML(typ="safe", pure=True).dump(cfg, f)
    (tmp_path / "script.py").write_text(TWO_PROCESS_SCRIPT)
    cmd = [
        str(VENV_BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        str(tmp_path / "script.py"), str(tmp_path / "c.yaml"), str(tmp_path / "seen"),
    ]  # fmt: skip
    env = dict(_env(), ACCELERATE_USE_CPU="1", CUDA_VISIBLE_DEVICES="")
    p = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    metrics = json.loads((tmp_path / "runs" / "wds" / "metrics.json").read_text())
    assert metrics["complete"] and metrics["step"] == 8  # 4 steps of 8 an epoch, 2 epochs
    per_epoch: dict[int, list[int]] = {0: [], 1: []}
    for rank in (0, 1):
        rows = json.loads((tmp_path / f"seen.rank{rank}.json").read_text())
        assert [len(r["index"]) for r in rows] == [4] * 8  # each process: its half of every global batch
        for r in rows:
            per_epoch[r["epoch"]] += r["index"]
    for epoch, idx in per_epoch.items():
        assert sorted(idx) == list(range(32)), epoch  # every sample exactly once an epoch
    assert per_epoch[0] != per_epoch[1]
