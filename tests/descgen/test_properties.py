"""Property-based tests (hypothesis): schema, loader and LLM-reply parser never crash or change files.

pytest tests/descgen/test_properties.py

550 generated cases (200 schema, 150 loader, 200 parser). Every generated case ends in a valid result or one clean error (one line, naming the file where there
is one); never a traceback of another kind, never a changed or partial file.
"""

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from descgen.bank import BankDoc, list_versions, load_bank
from descgen.errors import BankError
from descgen.qc import judge, parse_reply, rules_for
from descgen.schema import PLACEHOLDER, Bank
from tests.descgen.fixtures import make_doc

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
GOOD = make_doc({"background": ["in the city", "on the grass"], "resolution": ["blurry"]}).dumps()

words = st.sampled_from(["in", "the", "city", "{caption}", "blurry", "", " ", "x" * 70, "é", "{", "}"])
phrase = st.lists(words, max_size=6).map(" ".join) | st.text(max_size=30)
scalar = st.none() | st.booleans() | st.integers(-3, 3) | phrase
descriptor = st.fixed_dictionaries(
    {"id": st.sampled_from(["background.a", "background.b", "Bad Id", ""]) | phrase, "template": phrase},
    optional={
        "form": st.sampled_from(["prefix", "suffix", "middle"]),
        "status": st.sampled_from(["proposed", "approved", "rejected", "maybe"]),
        "count": st.integers(-2, 5),
        "provenance": st.sampled_from(["g1", "g9", None]),
        "evidence": st.dictionaries(st.text(max_size=5), scalar, max_size=3),
    },
)
concept = st.fixed_dictionaries(
    {"name": st.sampled_from(["background", "texture", "Background ", "1x", ""]) | phrase},
    optional={
        "form": st.sampled_from(["prefix", "suffix", 3]),
        "sources": st.lists(st.sampled_from(["catalog", "llm", "manual", "discovered", "web"]), max_size=3),
        "descriptors": st.lists(descriptor, max_size=4),
        "synonyms": st.lists(phrase, max_size=2) | scalar,
    },
)
meta = st.fixed_dictionaries(
    {"version": st.integers(-1, 3), "created_at": st.just("2026-01-01"), "tool_version": st.just("0")},
    optional={
        "content_hash": st.text(max_size=8),
        "parent": st.integers(-1, 3) | st.none(),
        "generations": st.lists(
            st.fixed_dictionaries(
                {"id": st.sampled_from(["g1", "g2"]), "command": st.just("t"), "tool_version": st.just("0")},
                optional={"started_at": st.just("2026")},
            ),
            max_size=2,
        ),
    },
)
bank_like = st.fixed_dictionaries({"meta": meta, "concepts": st.lists(concept, max_size=3)}) | st.recursive(
    scalar, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3)
)


@FAST
@given(bank_like)
def test_schema_gives_a_valid_bank_or_a_validation_error(data):
    try:
        bank = Bank.model_validate(data)
    except ValidationError as e:
        assert e.errors()  # a clean error: every problem has a location and a message
        return
    ids = [d.id for c in bank.concepts for d in c.descriptors]
    assert len(ids) == len(set(ids))
    for d in (d for c in bank.concepts for d in c.descriptors):
        assert d.template.count(PLACEHOLDER) == 1 and d.text


edits = st.lists(
    st.tuples(
        st.integers(0, len(GOOD)),
        st.integers(0, 8),
        st.text(max_size=6) | st.sampled_from(["\n", ":", "- ", "  ", "{", "'"]),
    ),
    min_size=1,
    max_size=4,
)


def _mutate(text, ops):
    for pos, n, ins in ops:
        pos = min(pos, len(text))
        text = text[:pos] + ins + text[pos + n :]
    return text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits)
def test_loader_gives_a_bank_or_one_line_naming_the_file_and_changes_nothing(ops):
    text = _mutate(GOOD, ops)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "v1.yaml"
        data = text.encode("utf-8", errors="surrogatepass")
        path.write_bytes(data)
        try:
            bank = load_bank(path)
        except BankError as e:
            msg = str(e)
            assert msg.startswith(str(path)) and "\n" not in msg, msg
            assert all(p.startswith(str(path)) and "\n" not in p for p in e.problems)
        else:
            assert bank.meta.version >= 1
            try:  # a loadable bank also saves: a complete new version, the base untouched
                out = BankDoc.load(path).derive().save(d)
            except BankError as e:
                assert "\n" not in str(e)
                assert [p.name for p in Path(d).iterdir()] == ["v1.yaml"]
            else:
                assert load_bank(out).meta.parent == bank.meta.version
                assert [v for v, _ in list_versions(d)][-1] == int(out.stem[1:])
        assert path.read_bytes() == data
        assert not [p for p in Path(d).iterdir() if p.name.startswith(".")]  # no partial temp file


RULES = rules_for("background", "suffix", None, ["dog"], ["texture"], vocab={})
reply = st.lists(
    st.sampled_from(
        ["- ", "1. ", "* ", "in the city", ", ", "\n", "(x)", ": ", "{caption}", "I think so.", "é"]
    )
    | st.text(max_size=12),
    max_size=12,
).map("".join)


@settings(max_examples=200, deadline=None)
@given(reply)
def test_reply_parser_gives_clean_items_and_a_verdict_each(text):
    items = parse_reply(text)
    assert all(isinstance(i, str) and i.strip() and "\n" not in i for i in items)
    for i in items:
        norm, reason = judge(i, RULES)
        assert isinstance(norm, str) and (reason is None or isinstance(reason, str))
