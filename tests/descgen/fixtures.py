"""Shared helpers for the descgen tests: a queued fake LLM, a tiny bank, a tiny random Llama.

from tests.descgen.fixtures import FakeGenerator, write_bank, build_tiny_llama
"""

from __future__ import annotations

from pathlib import Path

from descgen.bank import BankDoc
from descgen.schema import Concept, Descriptor, ModelInfo, make_template


class FakeGenerator:
    """Returns queued replies in order (cycling); records every call."""

    def __init__(self, replies: list[str]):
        self.replies = list(replies)
        self.calls: list[dict] = []
        self.info = ModelInfo(id="fake", weights_file="fake.bin", weights_sha256="sha256:" + "0" * 64)
        self.tokens = 0
        self.device = "cpu"
        self._i = 0

    def generate(self, messages, prefills, **sampling):
        self.calls.append({"messages": messages, "prefills": list(prefills), **sampling})
        out = []
        for _ in prefills:
            out.append(self.replies[self._i % len(self.replies)])
            self._i += 1
        self.tokens += sum(len(r.split()) for r in out)
        return out


def make_doc(descriptors: dict[str, list[str]] | None = None) -> BankDoc:
    """A bank with background (suffix) and resolution (prefix) concepts and some descriptors."""
    doc = BankDoc.new()
    gid = doc.start_generation("test")
    doc.add_concept(Concept(name="background", form="suffix", sources=["catalog"], provenance=gid))
    doc.add_concept(Concept(name="resolution", form="prefix", sources=["catalog"], provenance=gid))
    forms = {"background": "suffix", "resolution": "prefix"}
    for concept, texts in (descriptors or {}).items():
        doc.add_descriptors(
            concept,
            [
                Descriptor(
                    id=f"{concept}.{t.replace(' ', '-')}",
                    template=make_template(t, forms[concept]),
                    form=forms[concept],
                    provenance=gid,
                )
                for t in texts
            ],
        )
    doc.finish_generation(gid)
    return doc


def write_bank(banks_dir: Path, descriptors: dict[str, list[str]] | None = None) -> Path:
    banks_dir.mkdir(parents=True, exist_ok=True)
    return make_doc(descriptors).save(banks_dir)


def build_tiny_llama(path: Path) -> Path:
    """A randomly initialised 2-layer Llama and a byte-level BPE tokenizer with a chat template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|im_start|>", "<|im_end|>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["- in the city\n- on the beach\n- in the snow\n- blurred\n- rough", "List short phrases."] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        pad_token="<|im_end|>",
    )
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    return path
