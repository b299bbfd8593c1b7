"""Two CPU processes under accelerate equal one process on the same global batch.

    .venv/bin/pytest tests/trainer/test_distributed.py -q      # slow: launches subprocesses (~1 minute on 2 cores)

Launched as `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2` (torchrun, gloo on CPU).
The step gathers features with gradient (torch.distributed.nn.all_gather, as open_clip's ClipLoss does);
DDP then averages the per-process gradients, which equals the single-process gradient of the global loss.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent

STEP_SCRIPT = r"""
import sys
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from trainer.config import build_config
from trainer.model import FineTuner, build_clip, make_teacher
from trainer.methods import get_method
from trainer.step import TeacherFeatures, backward_step, compute_losses

torch.set_num_threads(1)
model_json, out, run_config = sys.argv[1], sys.argv[2], sys.argv[3]
acc = Accelerator(cpu=True)
set_seed(0)
clip, _, tokenizer = build_clip(model_json, None)
teacher = make_teacher(clip)
teacher_scale = float(clip.logit_scale.exp().detach())
with torch.no_grad():  # move the student away from the teacher so the KL has a gradient
    g = torch.Generator().manual_seed(3)
    for p in clip.parameters():
        p.add_(0.05 * torch.randn(p.shape, generator=g))
model = acc.prepare(FineTuner(clip))
g = torch.Generator().manual_seed(1)
n = 8
labels = torch.tensor([0, 0, 1, 1, 2, 0, 3, 1])
words = ["water", "snow", "grass", "city", "sand", "forest", "night", "fog"]
full = {
    "image": torch.randn(n, 3, 32, 32, generator=g),
    "label": labels,
    "index": torch.arange(n),
    "caption": tokenizer([f"a photo of a c{int(y)}." for y in labels]),
    "spurious": tokenizer([f"a photo of a c{int(y)} in the {w}." for y, w in zip(labels, words)]),
    "region_mask": torch.tensor([[(i + j) % 3 == 0 for j in range(4)] for i in range(n)]),  # ravl: 2x2 grid
}
from trainer.ravl.method import RavlOptions

ravl_state = {  # what the ravl method's setup returns, without a report
    "opts": RavlOptions(lam=0.5),
    "grid": (2, 2),
    "class_emb": torch.nn.functional.normalize(torch.randn(4, 32, generator=g), dim=-1),
}
rank, world = acc.process_index, acc.num_processes
part = slice(rank * n // world, (rank + 1) * n // world)
batch = {k: v[part].to(acc.device) for k, v in full.items()}
results = {}
for name, overrides in [
    ("starft", ["method=starft", "spurious=none"]),
    ("kl", ["method=kl", "spurious=none"]),
    ("flyp", ["method=flyp"]),
    ("flyp_label", ["method=flyp", "positives=label"]),
    ("ravl", ["method=ravl", "discovered=unused.json"]),  # regions embedded in the DDP forward, gathered
]:
    cfg = build_config({"data": {"train": {"path": "unused.csv"}}}, overrides)
    model.zero_grad(set_to_none=True)
    state = ravl_state if name == "ravl" else None
    terms = compute_losses(
        model, batch, get_method(cfg.method), cfg, acc, TeacherFeatures(teacher), teacher_scale, 0.5, state=state
    )
    acc.backward(terms["loss"])
    grads = {k: p.grad.detach().clone() for k, p in acc.unwrap_model(model).named_parameters() if p.grad is not None}
    results[name] = {"terms": {k: float(v) for k, v in terms.items()}, "grads": grads}

# Exact accumulation across processes: the batch as K global micro-batches, each split across the processes.
for name in ("starft", "kl", "flyp"):
    cfg = build_config({"data": {"train": {"path": "unused.csv"}}}, [f"method={name}", "spurious=none"])
    for k in (2, 4):
        model.zero_grad(set_to_none=True)
        m = n // k
        micro = [
            {key: v[j * m + rank * m // world : j * m + (rank + 1) * m // world].to(acc.device) for key, v in full.items()}
            for j in range(k)
        ]
        terms = backward_step(model, micro, get_method(name), cfg, acc, TeacherFeatures(teacher), teacher_scale, 0.5)
        grads = {kk: p.grad.detach().clone() for kk, p in acc.unwrap_model(model).named_parameters() if p.grad is not None}
        results[f"{name}-accum{k}"] = {"terms": {kk: float(v) for kk, v in terms.items()}, "grads": grads}
torch.save(results, f"{out}.rank{rank}.pt")

# Then a whole `trainer run` in the same processes (saves a second launch).
from trainer.config import load_config
from trainer.train import train

train(load_config(run_config))

# The robust fine-tuning baselines, each a whole run in the same processes.
base = load_config(run_config).name
for method, extra in [
    ("lipsum", []),
    ("carot", ["method_options.teacher_every=2", "caption_templates=simple"]),
    ("carft", []),
    ("lpft", ["method_options.probe_epochs=2"]),
]:
    train(load_config(run_config, [f"method={method}", f"name={base}-{method}", *extra]))
# As `trainer run` ends: a gloo group left to the interpreter's exit can abort the process ("terminate
# called without an active exception", seen once in CI).
acc.wait_for_everyone()
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2]) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _launch(args: list[str], nproc: int) -> subprocess.Popen:
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        # `accelerate launch --cpu --num_processes 2` starts ONE process in accelerate 1.x unless mpirun is
        # configured; torchrun (--multi_gpu) with ACCELERATE_USE_CPU=1 gives two gloo CPU processes.
        cmd = [
            str(VENV_BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(nproc), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), *args,
        ]  # fmt: skip
    env = dict(_env(), ACCELERATE_USE_CPU="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(p: subprocess.Popen, timeout: int = 240) -> str:
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out[-3000:]
    return out


@pytest.fixture(scope="module")
def launched(tmp_path_factory, tiny_clip, image_data):
    """One single-process and one two-process launch of STEP_SCRIPT, run concurrently."""
    from ruamel.yaml import YAML

    from tests.conftest import make_bank, tiny_config_for

    tmp = tmp_path_factory.mktemp("dist")
    script = tmp / "step.py"
    script.write_text(STEP_SCRIPT)
    cfg = dict(
        tiny_config_for(tmp, tiny_clip, image_data, make_bank(tmp / "banks")), epochs=1, eval_batch_size=8
    )
    procs = []
    for tag, nproc in (("one", 1), ("two", 2)):
        path = tmp / f"{tag}.yaml"
        with path.open("w") as f:
            YAML(typ="safe", pure=True).dump(dict(cfg, name=f"run-{tag}"), f)
        procs.append(_launch([str(script), str(tiny_clip), str(tmp / tag), str(path)], nproc))
    for p in procs:
        _wait(p)
    return tmp, Path(cfg["runs_dir"])


def test_two_processes_equal_one_on_the_global_batch(launched):
    tmp_path, _ = launched
    ref = torch.load(tmp_path / "one.rank0.pt")
    ranks = [torch.load(tmp_path / f"two.rank{r}.pt") for r in (0, 1)]
    for name, expected in ref.items():
        assert expected["terms"]["reg_loss"] > 0 or name.startswith("flyp")
        for got in ranks:
            for term, value in expected["terms"].items():
                assert got[name]["terms"][term] == pytest.approx(value, rel=1e-5, abs=1e-6), (name, term)
            assert got[name]["grads"].keys() == expected["grads"].keys()
            for k, g in expected["grads"].items():
                assert torch.allclose(got[name]["grads"][k], g, rtol=1e-4, atol=1e-6), (name, k)


@pytest.mark.parametrize("name", ["starft", "kl", "flyp"])
def test_accumulation_on_two_processes_gives_the_full_batch_gradient(launched, name):
    """Batch 8 in one process and one micro-batch vs grad_accum 2 and 4 on two processes: equal gradients."""
    tmp_path, _ = launched
    ref = torch.load(tmp_path / "one.rank0.pt")
    full = ref[name]
    for rank in (0, 1):
        got = torch.load(tmp_path / f"two.rank{rank}.pt")
        for k in (2, 4):
            grads = got[f"{name}-accum{k}"]["grads"]
            assert grads.keys() == full["grads"].keys()
            for key, g in full["grads"].items():
                rel = float((grads[key] - g).norm() / g.norm().clamp_min(1e-12))
                assert rel < 1e-5, (name, k, key, rel)


@pytest.mark.parametrize("method", ["", "-lipsum", "-carot", "-carft", "-lpft"])
def test_two_process_run_matches_one_process_run(launched, method):
    """`trainer run` end to end in two processes (starft and each baseline): same step losses and final
    metrics as one process."""
    _, runs = launched

    def steps(tag):
        path = runs / f"run-{tag}{method}" / "metrics.jsonl"
        rows = [json.loads(ln) for ln in path.read_text().splitlines()]
        return [r for r in rows if r["kind"] == "step"]

    a, b = steps("one"), steps("two")
    assert len(a) == len(b) == 4
    for ra, rb in zip(a, b):
        for key in ("loss", "contrastive_loss", "reg_loss"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-5)
    ma = json.loads((runs / f"run-one{method}" / "metrics.json").read_text())
    mb = json.loads((runs / f"run-two{method}" / "metrics.json").read_text())
    assert mb["final"]["val"]["n"] == ma["final"]["val"]["n"] == 16  # gather_for_metrics drops the padding
    assert mb["final"]["val"]["top1"] == pytest.approx(ma["final"]["val"]["top1"])
    assert json.loads((runs / f"run-two{method}" / "run.json").read_text())["num_processes"] == 2
