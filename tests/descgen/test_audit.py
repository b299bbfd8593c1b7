"""descgen audit: tiny open_clip models built blind and not blind to suffix descriptors; measures, verdicts,
duplicate clusters, --reject-duplicates, --json and bad input.  Run: pytest tests/descgen/test_audit.py"""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from descgen import cli
from descgen.audit import (
    Clip,
    audit_concept,
    clusters_above,
    effective_number,
    entropy_share,
    image_measures,
    load_clip,
)
from descgen.bank import list_versions, load_bank
from descgen.schema import Concept, Descriptor
from tests.descgen.fixtures import write_bank

runner = CliRunner()
SUFFIXES = ["in the snow", "on the beach", "in a forest", "in the desert", "under water"]


def run(*args):
    return runner.invoke(cli.app, [str(a) for a in args])


def _tiny_clip(folder, context_length):
    """A random-init open_clip CLIP (model.json + model.safetensors). With context_length 7 the tokenizer
    cuts "a photo of a dog ..." right after the class name, so every suffix is invisible: a blind model."""
    import open_clip
    from safetensors.torch import save_file

    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {
            "context_length": context_length,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 1,
        },
    }
    folder.mkdir()
    (folder / "model.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder / "model.json")
    torch.manual_seed(0)
    model = open_clip.create_model("model")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    return {"blind": _tiny_clip(root / "blind", 7), "reads": _tiny_clip(root / "reads", 24)}


@pytest.fixture
def bank(tmp_path):
    from descgen.bank import BankDoc

    path = write_bank(tmp_path / "banks", {"background": SUFFIXES, "resolution": ["blurred", "grainy"]})
    doc = BankDoc.load(path).derive()
    for iid, _ in list(doc.items()):
        if "." in iid:
            doc.set_status(iid, "approved")
    return doc.save(tmp_path / "banks")


def test_measures_on_known_matrices():
    assert effective_number(torch.ones(4, 4)) == pytest.approx(1.0)
    assert effective_number(torch.eye(4)) == pytest.approx(4.0)
    assert entropy_share(torch.zeros(3, 5)) == pytest.approx(1.0)
    assert entropy_share(torch.tensor([[50.0, 0.0, 0.0]])) < 0.01
    sim = torch.tensor([[1, 0.99, 0.1, 0.1], [0.99, 1, 0.1, 0.1], [0.1, 0.1, 1, 0.2], [0.1, 0.1, 0.2, 1]])
    assert clusters_above(sim, 0.97) == [[0, 1]]


def test_image_side_uniform_when_captions_alike_and_masks_own_class():
    img = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    same = torch.nn.functional.normalize(torch.randn(2, 1, 8), dim=-1).expand(2, 3, 8)  # 3 identical captions
    share, kl = image_measures(img, same, same[:, 0], 100.0)
    assert share == pytest.approx(1.0) and kl == pytest.approx(0.0, abs=1e-6)
    distinct = torch.nn.functional.normalize(torch.randn(2, 3, 8), dim=-1)
    share2, _ = image_measures(img, distinct, distinct[:, 0], 100.0, labels=[0, 1, 0, 1, -1, -1])
    assert share2 < 0.9 and math.isfinite(share2)


def test_fake_encoders_blind_and_reading():
    """A model that sees only the class name vs one that hashes every word."""

    def reading(texts):
        out = []
        for t in texts:
            g = torch.Generator().manual_seed(hash(t) % (2**31))
            out.append(torch.randn(16, generator=g))
        return torch.nn.functional.normalize(torch.stack(out), dim=-1)

    def blind(texts):
        return reading(["dog" if "dog" in t else "cat" for t in texts])

    c = Concept(
        name="background",
        form="suffix",
        sources=["manual"],
        descriptors=[
            Descriptor(id=f"b.{i}", template="{caption} " + s, form="suffix", status="approved")
            for i, s in enumerate(SUFFIXES)
        ],
    )
    a_blind = audit_concept(Clip("blind", blind, None, 100.0), c, classes=["dog", "cat"])
    a_read = audit_concept(Clip("reads", reading, None, 100.0), c, classes=["dog", "cat"])
    assert a_blind.effective_n == pytest.approx(1.0) and a_blind.text_share == pytest.approx(1.0)
    assert a_blind.verdict.startswith("blind") and len(a_blind.clean_like) == len(SUFFIXES)
    assert a_blind.clusters == [[f"b.{i}" for i in range(len(SUFFIXES))]]
    assert a_read.effective_n > 3 and a_read.text_share < 0.5 and not a_read.clusters
    assert not a_read.verdict.startswith("blind")


def test_audit_tells_tiny_models_apart(models, bank):
    res = {}
    for name, folder in models.items():
        r = run(
            "audit",
            bank,
            "--clip",
            folder,
            "--class",
            "dog",
            "--class",
            "cat",
            "--concept",
            "background",
            "--json",
        )
        assert r.exit_code == 0, r.output
        res[name] = json.loads(r.stdout)["concepts"][0]
    blind, reads = res["blind"], res["reads"]
    assert blind["effective_n"] == pytest.approx(1.0, abs=1e-3) and blind["text_share"] > 0.99
    assert blind["verdict"].startswith("blind") and len(blind["clean_like"]) == len(SUFFIXES)
    assert reads["effective_n"] > 1.5 and reads["text_share"] < blind["text_share"] - 0.1
    assert not reads["verdict"].startswith("blind")


def test_audit_with_images_and_prefix_styles(models, bank, tmp_path):
    from PIL import Image

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        arr = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(imgs / f"{i}.png")
    (tmp_path / "imgs.csv").write_text("path,label\nimgs/0.png,dog\nimgs/1.png,cat\nimgs/2.png,\n")
    for spec, n in ((imgs, 4), (tmp_path / "imgs.csv", 3)):
        r = run(
            "audit",
            bank,
            "--clip",
            models["blind"] / "model.json",
            "--pretrained",
            models["blind"] / "model.safetensors",
            "--images",
            spec,
            "--class",
            "dog",
            "--class",
            "cat",
            "--json",
        )
        assert r.exit_code == 0, r.output
        rep = json.loads(r.stdout)
        assert rep["images"] == n
        bg, res = rep["concepts"]
        assert bg["image_share"] == pytest.approx(1.0, abs=1e-4)  # blind to suffixes on any image
        assert res["other_style"] == "adjective" and "caption style" in res["verdict"]
    r = run("audit", bank, "--clip", models["reads"], "--class", "dog")
    assert r.exit_code == 0 and "background:" in r.stdout and "eff. n" in r.stdout


def test_reject_duplicates_writes_a_new_version(models, bank):
    banks = bank.parent
    before = list_versions(banks)
    r = run(
        "audit",
        bank,
        "--clip",
        models["blind"],
        "--concept",
        "background",
        "--reject-duplicates",
        "--banks-dir",
        banks,
    )
    assert r.exit_code == 0, r.output
    after = list_versions(banks)
    assert len(after) == len(before) + 1
    new = load_bank(after[-1][1]).concept("background")
    kept = [d.id for d in new.descriptors if d.status == "approved"]
    assert len(kept) == 1  # blind: every suffix is one cluster; the first one stays
    assert all("near-duplicate" in (d.note or "") for d in new.descriptors if d.status == "rejected")
    assert load_bank(bank).concept("background").approved()  # the audited version is untouched


@pytest.mark.parametrize(
    "args, message",
    [
        (["--clip", "/nonexistent/model.json"], "no such model config"),
        (["--clip", "/nonexistent/folder"], "no such model folder"),
        (["--clip", "no-such-arch"], "cannot build CLIP model"),
        (["--clip", "{models}/model.json", "--pretrained", "/nope.safetensors"], "no such weights file"),
        (["--clip", "{models}", "--images", "/nonexistent"], "not a folder of images"),
        (["--clip", "{models}", "--concept", "weather"], "unknown concept"),
    ],
)
def test_bad_input_is_one_line(models, bank, args, message):
    args = [a.replace("{models}", str(models["blind"])) for a in args]
    before = list_versions(bank.parent)
    r = run("audit", bank, *args)
    assert r.exit_code == 1
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert list_versions(bank.parent) == before


def test_load_clip_weights_that_do_not_fit(models, tmp_path):
    from descgen.audit import AuditError

    with pytest.raises(AuditError, match="does not fit"):
        load_clip(str(models["blind"] / "model.json"), str(models["reads"] / "model.safetensors"))


# --- a text-only sentence encoder (--text-model) ---------------------------------------------------

WORDS = [
    "a",
    "photo",
    "of",
    "dog",
    "cat",
    "in",
    "the",
    "snow",
    "on",
    "beach",
    "forest",
    "desert",
    "under",
    "water",
    ".",
]


def _tiny_text_model(folder, pooling=None):
    """A random-init BERT with a word-level vocabulary, saved as a sentence-encoder folder. Words not in
    WORDS become [UNK], so "in the qwzx" and "in the vbnm" are the same tokens: duplicates to any encoder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True)
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    BertTokenizerFast(vocab=vocab).save_pretrained(folder)
    cfg = BertConfig(
        vocab_size=5 + len(WORDS),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        initializer_range=1.0,  # words far apart (at the default 0.02 every caption embeds alike)
    )
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(folder)
    if pooling:
        (folder / "1_Pooling").mkdir()
        (folder / "1_Pooling" / "config.json").write_text(json.dumps({f"pooling_mode_{pooling}": True}))
    return folder


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    return _tiny_text_model(tmp_path_factory.mktemp("st") / "mean")


@pytest.fixture(scope="module")
def bad_pooling_model(tmp_path_factory):
    return _tiny_text_model(tmp_path_factory.mktemp("st") / "badpool", "max_tokens")


def test_text_model_pools_only_real_tokens(text_model, tmp_path):
    from descgen.audit import load_text_model

    enc = load_text_model(str(text_model)).encode_text
    alone = enc(["a dog"])
    padded = enc(["a dog", "a photo of a dog in the snow on the beach"])  # "a dog" is padded here
    assert torch.allclose(alone[0], padded[0], atol=1e-5)
    assert torch.allclose(padded.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(padded[0], padded[1], atol=1e-3)

    cls = load_text_model(str(_tiny_text_model(tmp_path / "cls", "cls_token"))).encode_text
    from transformers import AutoModel, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(text_model), AutoModel.from_pretrained(text_model)
    with torch.no_grad():
        first = model(**tok(["a dog"], return_tensors="pt")).last_hidden_state[:, 0]
    assert torch.allclose(cls(["a dog"]), torch.nn.functional.normalize(first, dim=-1), atol=1e-5)
    assert not torch.allclose(cls(["a dog"]), alone, atol=1e-3)


def test_text_model_finds_duplicates_and_gives_no_verdict(text_model, tmp_path):
    from descgen.bank import BankDoc

    path = write_bank(
        tmp_path / "banks", {"background": ["in the snow", "on the beach", "in the qwzx", "in the vbnm"]}
    )
    doc = BankDoc.load(path).derive()
    for iid, _ in list(doc.items()):
        if "." in iid:
            doc.set_status(iid, "approved")
    bank = doc.save(tmp_path / "banks")
    r = run("audit", bank, "--text-model", text_model, "--dup-threshold", "0.9999", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    res = rep["concepts"][0]
    assert rep["scale"] is None and res["text_share"] is None and res["text_share_random"] is None
    assert res["clusters"] == [["background.in-the-qwzx", "background.in-the-vbnm"]]
    assert res["verdict"].startswith("no verdict") and 1.0 < res["effective_n"] < 4.0

    r = run("audit", bank, "--text-model", text_model, "--dup-threshold", "0.9999")
    assert r.exit_code == 0 and "no teacher measures" in r.stdout and "text H" not in r.stdout

    r = run(
        "audit",
        bank,
        "--text-model",
        text_model,
        "--dup-threshold",
        "0.9999",
        "--reject-duplicates",
        "--banks-dir",
        bank.parent,
    )
    assert r.exit_code == 0, r.output
    new = load_bank(list_versions(bank.parent)[-1][1]).concept("background")
    rejected = [d for d in new.descriptors if d.status == "rejected"]
    assert [d.id for d in rejected] == ["background.in-the-vbnm"]
    assert "text only" in rejected[0].note and "near-duplicate of background.in-the-qwzx" in rejected[0].note


@pytest.mark.parametrize(
    "args, message, code",
    [
        (["--text-model", "/nonexistent/st"], "no such text-model folder", 1),
        (["--text-model", "descgen-tests/no-such-encoder"], "--allow-download fetches a hub id", 1),
        (["--text-model", "{empty}"], "cannot load text model", 1),
        (["--text-model", "{badpool}"], "pooling max_tokens is not supported", 1),
        (["--text-model", "{st}", "--clip", "{st}"], "not both", 2),
        (["--text-model", "{st}", "--images", "{st}"], "need --clip", 2),
    ],
)
def test_text_model_bad_input(text_model, bad_pooling_model, bank, tmp_path, args, message, code):
    empty = tmp_path / "empty"
    empty.mkdir()
    subs = {"{st}": str(text_model), "{empty}": str(empty), "{badpool}": str(bad_pooling_model)}
    args = [subs.get(a, a) for a in args]
    before = list_versions(bank.parent)
    r = run("audit", bank, *args, "--reject-duplicates", "--banks-dir", bank.parent)
    assert r.exit_code == code and "Traceback" not in r.output
    assert message in " ".join(r.stderr.split())
    if code == 1:
        assert len(r.stderr.strip().splitlines()) == 1
    assert list_versions(bank.parent) == before
