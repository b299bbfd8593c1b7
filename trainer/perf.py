"""`trainer perf`: the training step's time and peak memory, FLYP against StarFT, measured side by side.

    trainer perf --model ViT-B-16 --batch 16 --json runs/perf-vitb16.json

Rows (one process, random init, the project's own step: `backward_step` + AdamW, interleaved after a
warm-up, each round in a rotated order so the machine's load falls on every row alike):
- flyp_openclip: FLYP with open_clip's text path (every caption at the full context);
- flyp: FLYP with the text tower on the batch's longest caption (trainer.model.encode_text);
- starft_ref: StarFT as its reference code runs it: the teacher's full forward of both towers, full text;
- starft: StarFT optimised, deterministic transform: the teacher's features from its caches (the steady
  state from the second epoch: every image and spurious caption seen once), trimmed text;
- starft_aug: StarFT optimised with augmentation: cached teacher text, the teacher's image forward under
  inference mode in the training precision.
Times are medians (min-max) over the measured rounds; ratios to `flyp` are medians of the per-round ratios
(interleaved pairs). Peak memory of a row: what it holds (student weights and optimizer state, its teacher,
its caches) plus its warm-up step's high-water mark above that (activations, gradients): `torch.cuda`'s
allocator on a GPU (bf16 autocast), the process's resident high-water mark on a CPU (float32;
/proc/self/clear_refs).
The loader part times the DataLoader over synthetic JPEGs at the run's settings against what the step
consumes (images/s).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.config import build_config
from trainer.methods import MethodSpec, get_method
from trainer.model import FineTuner, build_clip, make_teacher, text_length, train_transform
from trainer.step import TeacherFeatures, backward_step

ROWS = ("flyp_openclip", "flyp", "starft_ref", "starft", "starft_aug")
# Background phrases for the spurious captions (the bank's kind of descriptor), ~15-25 tokens a caption.
PHRASES = (
    "in the water", "on a sandy beach", "in a snowy forest", "on green grass at dusk", "in a city street",
    "in front of a brick wall", "on a wooden table indoors", "under a cloudy sky",
)  # fmt: skip


class OneDevice:
    """What `backward_step` needs of an accelerate Accelerator, for one process without accelerate's
    process-wide state (perf may run in a process that trains too)."""

    num_processes = 1

    def __init__(self, device: torch.device, bf16: bool):
        self.device, self.bf16 = device, bf16

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def autocast(self):
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def no_sync(self, model):
        return contextlib.nullcontext()

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def unwrap_model(self, model):
        return getattr(model, "_orig_mod", model)  # a torch.compile'd module keeps the original here


@dataclass
class Row:
    name: str
    model: FineTuner
    method: MethodSpec
    teacher: TeacherFeatures | None


def class_names() -> list[str]:
    import open_clip

    return list(open_clip.IMAGENET_CLASSNAMES)


def synthetic_batches(tokenizer, batch: int, count: int, size: int, seed: int = 0) -> list[dict]:
    """`count` batches of random images (samples 0..batch*count-1, each with its fixed image), ImageNet
    class captions and spurious captions with a background phrase."""
    g = torch.Generator().manual_seed(seed)
    names = class_names()
    out = []
    for j in range(count):
        labels = torch.randint(len(names), (batch,), generator=g)
        phrases = torch.randint(len(PHRASES), (batch,), generator=g)
        captions = [f"a photo of a {names[y]}." for y in labels.tolist()]
        out.append(
            {
                "image": torch.randn(batch, 3, size, size, generator=g),
                "label": labels,
                "index": torch.arange(j * batch, (j + 1) * batch),
                "caption": tokenizer(captions),
                "spurious": tokenizer(
                    [c[:-1] + f" {PHRASES[p]}." for c, p in zip(captions, phrases.tolist())]
                ),
            }
        )
    return out


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def module_bytes(module: torch.nn.Module | None) -> int:
    if module is None:
        return 0
    return tensor_bytes(module.parameters()) + tensor_bytes(module.buffers())


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(tensor_bytes(v for v in s.values() if torch.is_tensor(v)) for s in optimizer.state.values())


class PeakMemory:
    """The high-water mark of one block above the memory at its start, in bytes: the CUDA allocator's on a
    GPU, the resident set's on a CPU (Linux: reset through /proc/self/clear_refs; large allocations are
    made to go back to the system when freed, so the resident set follows what is allocated)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0
        self._mmap_threshold(1 << 16)  # 64 KiB: every tensor of note is mapped, and unmapped when freed

    def _mmap_threshold(self, size: int) -> None:
        if self.device.type == "cpu":
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL("libc.so.6").mallopt(-3, size)  # M_MMAP_THRESHOLD (glibc)

    def done(self) -> None:
        """Back to what glibc's threshold grows to for tensors (32 MiB) for the timed steps: the heap
        reuses freed blocks rather than mapping fresh zeroed pages at every allocation."""
        self._mmap_threshold(32 << 20)

    @staticmethod
    def _rss() -> tuple[int, int]:
        fields = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    fields[key] = int(value.split()[0]) * 1024
        return fields["VmRSS"], fields["VmHWM"]

    @contextlib.contextmanager
    def measure(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
            yield
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - start
            return
        with contextlib.suppress(OSError, AttributeError):  # free heap memory back: reusing it is then seen
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        start, _ = self._rss()
        yield
        self.peak = max(0, self._rss()[1] - start)


def make_rows(clip, teacher_model, num_samples: int) -> list[Row]:
    flyp, starft = get_method("flyp"), get_method("starft")
    plain = FineTuner(clip, trim_text=False)
    trimmed = FineTuner(clip)
    return [
        Row("flyp_openclip", plain, flyp, None),
        Row("flyp", trimmed, flyp, None),
        Row(
            "starft_ref",
            plain,
            starft,
            TeacherFeatures(teacher_model, cache_text=False, trim=False, inference=False),
        ),
        # its own teacher: the image tower is released once every sample is cached
        Row("starft", trimmed, starft, TeacherFeatures(make_teacher(teacher_model), num_samples=num_samples)),
        Row("starft_aug", trimmed, starft, TeacherFeatures(teacher_model)),
    ]


def measure(
    model: str = "ViT-B-16",
    batch: int = 16,
    steps: int = 3,
    warmup: int = 1,
    threads: int | None = 2,
    device: str = "auto",
    rows: tuple[str, ...] = ROWS,
    loader_workers: int | None = 2,
    loader_images: int = 64,
    log: Callable[[str], None] = print,
    compile: bool = False,
    grad_checkpointing: bool = False,
) -> dict[str, Any]:
    """Measure every row (see the module docstring); returns the report `--json` writes. `compile` and
    `grad_checkpointing` apply to the student as the config keys of the same names do in a run."""
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else device.replace("auto", "cpu")
    )
    bf16 = dev.type == "cuda"
    torch.manual_seed(0)
    clip, _, tokenizer = build_clip(model, None)
    clip = clip.to(dev).train()
    teacher_model = make_teacher(clip)
    if grad_checkpointing:
        clip.set_grad_checkpointing(True)
    if compile:  # as trainer.train does: in place, the student's towers
        clip.visual.compile()
        clip.transformer.compile()
    size = clip.visual.preprocess_cfg["size"]
    size = size[0] if isinstance(size, (tuple, list)) else size
    count = 2  # distinct batches: the cached row has seen every sample after the warm-up
    batches = [{k: v.to(dev) for k, v in b.items()} for b in synthetic_batches(tokenizer, batch, count, size)]
    table = [r for r in make_rows(clip, teacher_model, batch * count) if r.name in rows]
    if bf16:  # the student's forward in autocast, as accelerate wraps a prepared model's
        for m in {id(r.model): r.model for r in table}.values():
            m.forward = torch.autocast(dev.type, dtype=torch.bfloat16)(m.forward)
    params = [p for p in clip.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-7, weight_decay=0.1)  # tiny: the random init stays sane
    acc = OneDevice(dev, bf16)
    cfg = build_config({"data": {"train": {"path": "unused.csv"}}, "method": "starft", "spurious": "none"})
    scale = float(clip.logit_scale.exp().detach())
    lengths = [text_length(clip, b["spurious"]) for b in batches]
    log(
        f"{model} batch {batch} on {dev} ({'bf16' if bf16 else 'float32'}, {torch.get_num_threads()} threads); "
        f"captions cut to {max(lengths)} of {batches[0]['caption'].shape[1]} tokens; "
        f"load {os.getloadavg()[0]:.1f}"
    )

    def step(row: Row, b: dict) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        backward_step(row.model, [b], row.method, cfg, acc, row.teacher, scale, 0.5)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for row in table:  # the caches' steady state (from the second epoch): every sample and caption seen
        if row.teacher is not None and row.name != "starft_ref":
            with acc.autocast():
                for b in batches:
                    row.teacher(b)
    for p in params:  # AdamW's state exists before any row is measured: no row pays for creating it
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # The first warm-up round measures each row's peak memory (a step's high-water mark above what is held)
    peak = PeakMemory(dev)
    steps_peak: dict[str, int] = {}
    for w in range(max(1, warmup)):
        for row in table:
            with peak.measure() if w == 0 else contextlib.nullcontext():
                step(row, batches[0])
            steps_peak.setdefault(row.name, peak.peak)
    peak.done()
    if compile:  # every text length the measured rounds see is compiled before they start
        for row in table:
            for b in batches[1:]:
                step(row, b)
    load = [os.getloadavg()[0]]
    times: dict[str, list[float]] = {row.name: [] for row in table}
    for r in range(steps):
        k = r % len(table)
        for row in table[k:] + table[:k]:  # rotated: no row always follows the same one
            times[row.name].append(step(row, batches[r % count]))
        load.append(os.getloadavg()[0])
        log(f"round {r + 1}/{steps}: " + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items()))

    held = module_bytes(clip) + optimizer_bytes(optimizer)
    report_rows: dict[str, dict[str, Any]] = {}
    for row in table:
        own = module_bytes(row.teacher.teacher) + row.teacher.cache_bytes() if row.teacher else 0
        ts = times[row.name]
        report_rows[row.name] = {
            "s_per_step": statistics.median(ts),
            "min_s": min(ts),
            "max_s": max(ts),
            "images_per_s": batch / statistics.median(ts),
            "peak_mb": (held + own + steps_peak[row.name]) / 2**20,
            "held_mb": (held + own) / 2**20,
        }

    def ratio(a: str, b: str, key: str = "s_per_step") -> float | None:
        if a not in times or b not in times:
            return None
        if key == "s_per_step":
            return statistics.median(x / y for x, y in zip(times[a], times[b]))
        return report_rows[a][key] / report_rows[b][key]

    ratios = {
        "starft/flyp": ratio("starft", "flyp"),
        "starft_aug/flyp": ratio("starft_aug", "flyp"),
        "starft_ref/flyp": ratio("starft_ref", "flyp"),
        "flyp/flyp_openclip": ratio("flyp", "flyp_openclip"),
        "starft/flyp peak_mb": ratio("starft", "flyp", "peak_mb"),
        "starft_aug/flyp peak_mb": ratio("starft_aug", "flyp", "peak_mb"),
        "starft_ref/flyp peak_mb": ratio("starft_ref", "flyp", "peak_mb"),
    }
    report: dict[str, Any] = {
        "model": model,
        "batch": batch,
        "device": str(dev),
        "precision": "bf16" if bf16 else "float32",
        "threads": torch.get_num_threads(),
        "compile": compile,
        "grad_checkpointing": grad_checkpointing,
        "steps": steps,
        "load_avg": [round(x, 1) for x in load],
        "text_tokens": {"trimmed": max(lengths), "context": int(batches[0]["caption"].shape[1])},
        "rows": report_rows,
        "ratios": {k: v for k, v in ratios.items() if v is not None},
    }
    if loader_workers is not None and "starft_aug" in report_rows:
        consumed = report_rows["starft_aug"]["images_per_s"]
        report["loader"] = loader_throughput(clip, tokenizer, batch, loader_workers, loader_images, dev)
        report["loader"]["step_images_per_s"] = consumed
        report["loader"]["ratio"] = report["loader"]["images_per_s"] / consumed
    return report


def loader_throughput(clip, tokenizer, batch: int, workers: int, images: int, device: torch.device) -> dict:
    """Images/s the training DataLoader delivers (augmented transform, spurious captions, collate) over
    synthetic 500x375 JPEGs, with the loader options a run uses (trainer.config.TrainConfig.loader_options)."""
    import numpy as np
    from PIL import Image
    from torch.utils.data import DataLoader

    from trainer.config import DataSpec
    from trainer.data import Collate, EpochSampler, ImageDataset, SpuriousCaptions, load_image_set

    cfg = build_config({"data": {"train": {"path": "unused.csv"}}, "method": "flyp", "num_workers": workers})
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        lines = ["path,label"]
        for i in range(images):
            pixels = rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"{i}.jpg", quality=90)
            lines.append(f"{i}.jpg,{i % 4}")
        (root / "train.csv").write_text("\n".join(lines) + "\n")
        spec = DataSpec(
            path=str(root / "train.csv"), classes=["tench", "goldfish", "great white shark", "tiger shark"]
        )
        image_set = load_image_set(spec, "simple")
        spurious = SpuriousCaptions("random", 0)
        ds = ImageDataset(image_set, train_transform(clip), cfg.caption, spurious, augment_seed=0)
        sampler = EpochSampler(len(ds), 0)
        loader = DataLoader(
            ds, batch_size=batch, sampler=sampler, drop_last=True, collate_fn=Collate(tokenizer),
            **cfg.loader_options(device.type == "cuda"),
        )  # fmt: skip
        seen, t0 = 0, 0.0
        for epoch in range(2):  # the first epoch starts the workers; the second is timed
            sampler.set_epoch(epoch)
            if epoch == 1:
                t0 = time.perf_counter()
            for b in loader:
                if epoch == 1:
                    seen += b["image"].shape[0]
        seconds = time.perf_counter() - t0
    return {"workers": workers, "images": seen, "seconds": seconds, "images_per_s": seen / seconds}


def render(report: dict[str, Any]) -> str:
    """The report as a few aligned lines."""
    ref = report["rows"].get("flyp")
    head = (
        f"{report['model']} batch {report['batch']} {report['device']} {report['precision']} "
        f"threads {report['threads']} steps {report['steps']} load {report['load_avg']}"
    )
    lines = [
        head,
        f"{'row':<14} {'s/step':>8} {'min-max':>15} {'img/s':>7} {'peak MB':>9} {'x flyp':>7} {'mem x':>6}",
    ]
    ratio_key = {"starft": "starft/flyp", "starft_aug": "starft_aug/flyp", "starft_ref": "starft_ref/flyp",
                 "flyp": None, "flyp_openclip": None}  # fmt: skip
    for name, r in report["rows"].items():
        key = ratio_key.get(name)
        if name == "flyp_openclip" and "flyp/flyp_openclip" in report["ratios"]:
            x = 1 / report["ratios"]["flyp/flyp_openclip"]
        else:
            x = report["ratios"].get(key, 1.0) if key else 1.0
        mem = r["peak_mb"] / ref["peak_mb"] if ref else float("nan")
        lines.append(
            f"{name:<14} {r['s_per_step']:>8.2f} {r['min_s']:>7.2f}-{r['max_s']:<7.2f} {r['images_per_s']:>7.2f} "
            f"{r['peak_mb']:>9.0f} {x:>7.2f} {mem:>6.2f}"
        )
    ratios = report["ratios"]
    if "flyp/flyp_openclip" in ratios:
        lines.append(f"flyp trimmed is {1 / ratios['flyp/flyp_openclip']:.2f}x faster than open_clip's text path "
                     f"({report['text_tokens']['trimmed']} of {report['text_tokens']['context']} tokens)")  # fmt: skip
    if "loader" in report:
        ld = report["loader"]
        lines.append(
            f"loader: {ld['images_per_s']:.1f} images/s with {ld['workers']} workers; the step consumes "
            f"{ld['step_images_per_s']:.2f} (starft_aug): {ld['ratio']:.1f}x"
        )
    return "\n".join(lines)


def write_report(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
