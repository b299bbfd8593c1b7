"""The descgen CLI end to end (typer CliRunner): fake LLM, a tiny random Llama, and bad input.

pytest tests/descgen/test_cli.py
"""

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from descgen import cli
from descgen.bank import file_sha256, list_versions, load_bank
from tests.descgen.fixtures import FakeGenerator, build_tiny_llama, write_bank

runner = CliRunner()

BG_REPLY = " in the city\n- on the grass\n- in a city\n- the jungle\n- in the mountains\n- next to a dog\n- in the snow"
RES_REPLY = " grainy\n- blurry\n- in the fog\n- pixelated"


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DESCGEN_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def fake(monkeypatch):
    gen = FakeGenerator([BG_REPLY, RES_REPLY])
    monkeypatch.setattr(cli, "_generator", lambda *a, **k: gen)
    return gen


def run(*args, input=None):
    return runner.invoke(cli.app, [str(a) for a in args], input=input)


def snapshot(d: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in sorted(d.iterdir())} if d.is_dir() else {}


def test_concepts_then_expand_then_review_cycle(fake):
    fake.replies = [" Background\n- textures\n- colour", " scenery\n- colour\n- I think so."]
    r = run("concepts", "--samples", "4")
    assert r.exit_code == 0, r.output
    bank = load_bank("banks/v1.yaml")
    assert {"background", "texture", "resolution", "colour"} <= {c.name for c in bank.concepts}
    assert bank.concept("background").count == 4 and bank.concept("background").sources == ["catalog", "llm"]
    assert bank.concept("colour").flag.startswith("not in catalog") and bank.concept("colour").count == 4

    fake.replies = [BG_REPLY]
    r = run("expand", "--concept", "background", "--n", "3", "--batch-size", "1", "--show-rejected")
    assert r.exit_code == 0, r.output
    assert "target reached: 3 accepted" in r.output and "echo of an example" in r.output
    bank = load_bank("banks/v2.yaml")
    bg = bank.concept("background")
    assert [d.text for d in bg.descriptors] == ["in the city", "on the grass", "in the snow"]
    assert bg.descriptors[0].count == 2 and bg.descriptors[0].provenance == bank.meta.generations[-1].id
    assert bank.meta.parent == 1 and bank.meta.generations[-1].stop_reason.startswith("target reached")
    log = [json.loads(x) for x in Path("banks/v2.log.jsonl").read_text().splitlines()]
    assert {x["kind"] for x in log} == {"reply", "rejected"}
    assert {"phrase": "next to a dog", "reason": "names a class"}.items() <= next(
        x for x in log if x.get("phrase") == "next to a dog"
    ).items()

    r = run("approve", "background.in-the-*", "--note", "common")
    assert r.exit_code == 0, r.output
    r = run("reject", "--match", "grass$")
    assert r.exit_code == 0, r.output
    r = run("reject", "background.*", "--status", "proposed")  # the approved ones stay approved
    assert r.exit_code == 1 and "nothing matched" in r.stderr
    bg = load_bank("banks/v4.yaml").concept("background")
    assert {d.text: d.status for d in bg.descriptors} == {
        "in the city": "approved",
        "on the grass": "rejected",
        "in the snow": "approved",
    }

    r = run("diff", "banks/v2.yaml", "banks/v4.yaml")
    assert "background.on-the-grass: status proposed -> rejected" in r.output
    r = run("show", "--concept", "background")
    assert r.exit_code == 0 and "a photo of a dog in the snow." in r.output


def test_expand_all_and_budget_reason(fake):
    write_bank(Path("banks"))
    fake.replies = [RES_REPLY]
    r = run("expand", "--all", "--n", "10", "--max-rounds", "2", "--batch-size", "2")
    assert r.exit_code == 0, r.output
    assert "budget: --max-rounds 2 used up" in r.output
    bank = load_bank("banks/v2.yaml")
    assert [d.template for d in bank.concept("resolution").descriptors] == [
        "grainy {caption}",
        "blurry {caption}",
        "pixelated {caption}",
    ]
    # The resolution reply's "in the fog" is shaped like a background descriptor, so background gets it.
    assert [d.text for d in bank.concept("background").descriptors] == ["in the fog"]
    assert [g.stop_reason for g in bank.meta.generations[-2:]] == ["budget: --max-rounds 2 used up"] * 2


def test_nothing_accepted_writes_nothing(fake):
    write_bank(Path("banks"))
    fake.replies = [" you are right\n- the"]
    before = snapshot(Path("banks"))
    r = run("expand", "--concept", "background", "--max-rounds", "1")
    assert r.exit_code == 1 and "Error: no descriptor was accepted" in r.output
    assert snapshot(Path("banks")) == before


def test_review_from_stdin(fake):
    write_bank(Path("banks"), {"background": ["in the city", "on the grass", "at home"]})
    r = run("review", "--concept", "background", input="s\na\nr\ne\nin the snow\n")
    assert r.exit_code == 0, r.output
    bg = load_bank("banks/v2.yaml").concept("background")
    assert [(d.text, d.status) for d in bg.descriptors] == [
        ("in the city", "approved"),
        ("on the grass", "rejected"),
        ("in the snow", "approved"),
    ]
    assert bg.descriptors[2].note == "edited from 'at home'"
    assert bg.status == "proposed"  # skipped


def test_review_quit_without_changes_writes_nothing(fake):
    write_bank(Path("banks"), {"background": ["in the city"]})
    r = run("review", input="s\ns\nq\n")
    assert r.exit_code == 0 and "nothing written" in r.output
    assert len(list_versions("banks")) == 1


def test_validate_reports_file_and_line(tmp_path):
    good = write_bank(Path("banks"), {"background": ["in the city"]})
    bad = Path("bad.yaml")
    bad.write_text(
        good.read_text().replace("form: suffix", "form: sideways").replace("count: 1", "count: -1")
    )
    r = run("validate", good, bad)
    assert r.exit_code == 1
    lines = [x for x in r.output.splitlines() if x.startswith("bad.yaml:")]
    assert len(lines) == 3 and all(x.split(":")[1].isdigit() for x in lines)
    assert run("validate", good).exit_code == 0


BAD_INPUTS = {
    "schema error": lambda: Path("banks/v1.yaml").write_text(
        Path("banks/v1.yaml").read_text().replace("form: suffix", "form: sideways", 1)
    ),
    "yaml syntax error": lambda: Path("banks/v1.yaml").write_text(
        Path("banks/v1.yaml").read_text().replace("meta:", "meta: [", 1)
    ),
}


@pytest.mark.parametrize(
    "case, args, message",
    [
        ("schema error", ["expand", "--concept", "background"], r"v1.yaml:\d+: concepts.0.form"),
        ("yaml syntax error", ["approve", "background.*"], r"v1.yaml:\d+: YAML syntax error"),
        (None, ["expand", "--concept", "colour"], "unknown concept 'colour'"),
        (
            None,
            ["expand", "--concept", "background", "--model", "./no/such/model"],
            "model path ./no/such/model",
        ),
        (
            None,
            ["expand", "--concept", "background", "--bank", "banks/v7.yaml"],
            "banks/v7.yaml: no such bank",
        ),
        (None, ["concepts", "--samples", "0", "--banks-dir", "afile/banks"], "afile/banks: cannot create"),
        (None, ["approve", "background", "--out", "afile/v2.yaml"], "afile: not a directory"),
        (None, ["approve", "nothing-like-this"], "nothing matched"),
    ],
)
def test_bad_input_one_line_error_nothing_changed(monkeypatch, case, args, message):
    write_bank(Path("banks"), {"background": ["in the city"]})
    Path("afile").write_text("a regular file, so afile/banks can never be a folder\n")
    if case:
        BAD_INPUTS[case]()
    # Loading a real model must never be reached: fail if it is.
    if "--model" not in args:  # a bad --model must fail while resolving, before anything loads
        monkeypatch.setattr("descgen.llm.load_generator", lambda *a, **k: pytest.fail("model loaded"))
    before = snapshot(Path("banks"))
    r = run(*args)
    assert r.exit_code == 1
    err_lines = r.stderr.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("Error: ")
    assert "Traceback" not in r.output
    import re

    assert re.search(message, err_lines[0]), err_lines[0]
    assert snapshot(Path("banks")) == before


def test_unwritable_banks_folder_by_permission(fake):
    # Tests may run as root, which writes through chmod 555; then only os.access can tell.
    d = Path("banks")
    write_bank(d)
    d.chmod(0o555)
    try:
        if os.access(d, os.W_OK):
            pytest.skip("running as root: permission bits do not stop writes (see the afile/banks case)")
        r = run("approve", "background")
        assert r.exit_code == 1 and "not writable" in r.stderr
    finally:
        d.chmod(0o755)


def test_tiny_random_llama_full_path(tmp_path):
    model = build_tiny_llama(tmp_path / "tiny")
    r = run("concepts", "--model", model, "--samples", "3", "--threads", "1")
    assert r.exit_code == 0, r.output
    bank = load_bank("banks/v1.yaml")
    assert bank.meta.generations[0].model.id == str(model)
    assert bank.meta.generations[0].model.weights_sha256.startswith("sha256:")
    assert len(Path("banks/v1.log.jsonl").read_text().splitlines()) >= 3
    r = run(
        "expand",
        "--concept",
        "background",
        "--model",
        model,
        "--n",
        "5",
        "--max-rounds",
        "2",
        "--batch-size",
        "4",
        "--max-new-tokens",
        "12",
        "--threads",
        "1",
        "--seed",
        "1",
    )
    # Random weights babble: the command must end cleanly either way, and say why it stopped.
    assert "background: budget: --max-rounds 2 used up" in r.output or "target reached" in r.output
    if r.exit_code == 1:
        assert r.stderr.splitlines()[-1].startswith("Error: no descriptor was accepted")
        assert len(list_versions("banks")) == 1


def test_expand_all_skips_unapproved_uncatalogued_concepts(fake):
    fake.replies = [" colour\n- colour"]
    assert run("concepts", "--samples", "2").exit_code == 0
    fake.replies = [BG_REPLY]
    r = run("expand", "--all", "--n", "1", "--batch-size", "1")
    assert r.exit_code == 0, r.output
    commands = [g.command for g in load_bank("banks/v2.yaml").meta.generations]
    assert "expand background" in commands and "expand colour" not in commands
