"""Parsing, normalisation and the quality-control rules.  Run: pytest tests/test_descgen_qc.py"""

import pytest

from descgen import qc
from descgen.prompts import load_catalog
from descgen.qc import Collector, judge, near_key, normalize, parse_reply, rules_for

CAT = load_catalog()
BG = rules_for("background", "suffix", CAT.get("background"), CAT.classes, [e.name for e in CAT.concepts])
RES = rules_for("resolution", "prefix", CAT.get("resolution"), CAT.classes, [e.name for e in CAT.concepts])


@pytest.mark.parametrize(
    "reply, items",
    [
        ("- in the city\n- on the grass", ["in the city", "on the grass"]),
        ("1. in the city\n2) on the grass\n3 - at night", ["in the city", "on the grass", "at night"]),
        ("* **in the snow**\n• on the sand", ["in the snow**", "on the sand"]),
        (
            "- in the mountains, on the beach, or in the desert",
            ["in the mountains", "on the beach", "in the desert"],
        ),
        ("- in the mountains (the mountains)", ["in the mountains"]),
        ("- in the mountains: The phrase is a common idiom that people use.", ["in the mountains"]),
        ("\n\n-  \n- in a park\n", ["in a park"]),
        (
            "These are just some examples of how to list places without special tools.",
            ["These are just some examples of how to list places without special tools."],
        ),
    ],
)
def test_parse_reply(reply, items):
    assert parse_reply(reply) == items


@pytest.mark.parametrize(
    "raw, norm",
    [
        ("  In the City. ", "in the city"),
        ('"on the beach"', "on the beach"),
        ("**in the snow**", "in the snow"),
    ],
)
def test_normalize(raw, norm):
    assert normalize(raw) == norm


def test_near_key_ignores_articles_case_punctuation():
    assert near_key("In a forest.") == near_key("in the forest") == "in forest"


@pytest.mark.parametrize(
    "item, rules, reason",
    [
        ("in the city", BG, None),
        ("on the grass", BG, None),
        ("grainy", RES, None),
        ("blurred", RES, qc.ECHO),
        ("", BG, qc.EMPTY),
        ("...", BG, qc.EMPTY),
        ("you can take it in the city", BG, qc.NOT_PHRASE),
        ("in the city 😀", BG, qc.NOT_PHRASE),
        ("{caption} in the snow", BG, None),
        ("{caption} in the {place}", BG, qc.PLACEHOLDER_COUNT),
        ("[class] in [place]", BG, qc.PLACEHOLDER_COUNT),
        ("in a small town near the old river", BG, qc.TOO_LONG),
        ("near a", BG, qc.INCOMPLETE),
        ("in the", BG, qc.INCOMPLETE),
        ("in a desert", BG, qc.ECHO),
        ("On the beach.", BG, qc.ECHO),
        ("image quality", RES, qc.ECHO),
        ("ex", RES, qc.NOT_PHRASE),
        ("possible answers", RES, qc.NOT_PHRASE),
        ("255 characters", RES, qc.NOT_PHRASE),
        ("next to a dog", BG, qc.NAMES_CLASS),
        ("in the background", BG, qc.NAMES_CONCEPT),
        ("with low resolution", BG, qc.NAMES_CONCEPT),
        ("the city", BG, qc.OFF_CONCEPT),
        ("outdoors", BG, qc.OFF_CONCEPT),
        ("in blur", RES, qc.OFF_CONCEPT),
        ("very very grainy", RES, qc.TOO_LONG),
    ],
)
def test_judge(item, rules, reason):
    assert judge(item, rules)[1] == reason


def test_collector_counts_duplicates_and_near_duplicates():
    c = Collector(BG)
    c.add_reply("- in the city\n- in a city\n- In the city.\n- on the grass\n- the city", 1)
    acc = {x.text: x.count for x in c.accepted()}
    assert acc == {"in the city": 3, "on the grass": 1}
    assert c.occurrences[qc.DUPLICATE] == 1
    assert c.occurrences[qc.NEAR_DUPLICATE] == 1
    assert c.occurrences[qc.OFF_CONCEPT] == 1
    assert [x.reason for x in c.rejected()] == [qc.OFF_CONCEPT]


def test_collector_knows_the_bank():
    c = Collector(BG, existing={"in city": "approved", "on grass": "rejected"})
    c.add_reply("- in a city\n- on the grass\n- in the snow")
    assert [x.text for x in c.accepted()] == ["in the snow"]
    assert {x.text: x.reason for x in c.rejected()} == {
        "in a city": qc.IN_BANK,
        "on the grass": qc.PREV_REJECTED,
    }


def test_min_count_frequency_filter():
    c = Collector(BG, min_count=2)
    c.add_reply("- in the city\n- on the grass")
    c.add_reply("- in the city")
    assert [x.text for x in c.accepted()] == ["in the city"]
    assert [(x.text, x.reason) for x in c.rejected()] == [("on the grass", qc.RARE)]
    assert ("rare (below --min-count)", 1, 1) in c.summary()


def test_accepted_most_frequent_first():
    c = Collector(BG)
    c.add_reply("- on the grass\n- in the city\n- in the city")
    assert [x.text for x in c.accepted()] == ["in the city", "on the grass"]


def test_echo_is_relative_to_what_the_prompt_showed():
    c = Collector(BG)
    c.add_reply("- in the city\n- on the beach", 1)  # catalog examples shown: the beach is an echo
    c.add_reply("- on the beach\n- in the city", 2, shown=["in the city", "at home", "in a park"])
    assert {x.text: x.count for x in c.accepted()} == {"in the city": 1, "on the beach": 1}
    assert c.occurrences[qc.ECHO] == 2
