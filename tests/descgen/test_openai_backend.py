"""The OpenAI-compatible backend against a stand-in server this test starts on 127.0.0.1 (no network):
a working server, and servers that time out, send junk or errors (one line, nothing written, no key).
Run: pytest tests/descgen/test_openai_backend.py"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
from typer.testing import CliRunner

from descgen import cli
from descgen.bank import list_versions, load_bank
from descgen.errors import GenerationError
from descgen.llm import OpenAIGenerator, load_openai_generator
from tests.descgen.fixtures import write_bank

runner = CliRunner()
KEY = "sk-test-SECRET-0123456789"
REPLIES = [
    " in the city\n- on the grass\n- in the snow\n- in the mountains",
    " in a forest\n- on the beach\n- in the desert\n- under water",
]


class StandIn(BaseHTTPRequestHandler):
    """mode: ok | slow | junk | error | empty | html; records every request body and header."""

    mode = "ok"
    requests: ClassVar[list[dict]] = []
    max_n = 16  # choices per request (llama.cpp's server returns one)

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, code, body, ctype="application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client gave up (the timeout case): nothing to answer
            pass

    def do_GET(self):
        StandIn.requests.append({"path": self.path, "auth": self.headers.get("Authorization")})
        if self.path.endswith("/models"):
            self._send(200, {"object": "list", "data": [{"id": "stand-in-8b", "object": "model"}]})
        else:
            self._send(404, {"error": {"message": "no route"}})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        StandIn.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        mode = StandIn.mode
        if mode == "slow":
            time.sleep(2.0)
            self._send(200, {"choices": []})
        elif mode == "junk":
            self._send(200, b"<html>bad gateway</html>", "text/html")
        elif mode == "error":  # a server that echoes the auth header back in its error
            self._send(500, {"error": {"message": f"internal error for {self.headers.get('Authorization')}"}})
        elif mode == "empty":
            self._send(200, {"choices": []})
        else:
            n = min(body.get("n", 1), StandIn.max_n)
            choices = [
                {"index": i, "message": {"role": "assistant", "content": REPLIES[(body["seed"] + i) % 2]}}
                for i in range(n)
            ]
            self._send(200, {"choices": choices, "usage": {"completion_tokens": 12 * n}})


@pytest.fixture
def server():
    StandIn.mode, StandIn.requests, StandIn.max_n = "ok", [], 16
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    httpd.handle_error = lambda request, address: None  # no server-side tracebacks on the test's stderr
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def run(*args):
    return runner.invoke(cli.app, [str(a) for a in args])


def test_generate_batches_prefill_and_greedy(server):
    gen = OpenAIGenerator(server, "m", None, timeout=5)
    msgs = [{"role": "user", "content": "List backgrounds."}]
    out = gen.generate(msgs, ["- in the park\n-"] * 3, max_new_tokens=20, temperature=0.0, seed=4)
    assert len(out) == 3 and all("\n-" in o for o in out)
    (req,) = StandIn.requests
    body = req["body"]
    assert body["n"] == 3 and body["max_tokens"] == 20 and body["temperature"] == 0.0 and "top_p" not in body
    assert body["messages"][-1] == {"role": "assistant", "content": "- in the park\n-"}
    assert body["continue_final_message"] is True and req["auth"] is None
    assert gen.tokens == 36


def test_server_with_one_choice_per_request_is_asked_again(server):
    StandIn.max_n = 1
    gen = OpenAIGenerator(server, "m", None, timeout=5)
    out = gen.generate([{"role": "user", "content": "x"}], ["-", "-", "-"], temperature=1.0)
    assert len(out) == 3 and len(StandIn.requests) == 3
    assert len({r["body"]["seed"] for r in StandIn.requests}) == 3  # each retry samples anew


def test_model_id_from_server_and_key_from_env(server, monkeypatch):
    monkeypatch.setenv("MY_KEY", KEY)
    gen = load_openai_generator(server, api_key_env="MY_KEY", timeout=5)
    assert gen.info.id == "stand-in-8b" and gen.info.base_url == server
    assert StandIn.requests[0]["auth"] == f"Bearer {KEY}"
    assert KEY not in gen.info.model_dump_json()
    with pytest.raises(GenerationError, match="NOT_SET: that environment variable is not set"):
        load_openai_generator(server, api_key_env="NOT_SET")
    with pytest.raises(GenerationError, match="must not hold credentials"):
        load_openai_generator("http://user:pw@127.0.0.1:9/v1", "m")


def test_expand_end_to_end_records_server_not_key(server, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    banks = tmp_path / "banks"
    write_bank(banks)
    r = run(
        "expand",
        "--concept",
        "background",
        "--n",
        "5",
        "--banks-dir",
        banks,
        "--backend",
        "openai",
        "--base-url",
        server,
        "--max-rounds",
        "3",
        "--batch-size",
        "4",
    )
    assert r.exit_code == 0, r.output
    path = list_versions(banks)[-1][1]
    b = load_bank(path)
    gen = b.meta.generations[-1]
    assert gen.model.id == "stand-in-8b" and gen.model.base_url == server
    assert {d.text for d in b.concept("background").descriptors} >= {"in the snow", "in a forest"}
    for f in banks.iterdir():
        assert KEY not in f.read_text()
    assert KEY not in r.output
    assert all(req["auth"] == f"Bearer {KEY}" for req in StandIn.requests)


@pytest.mark.parametrize(
    "mode, message",
    [
        ("slow", "no answer within 0.5s"),
        ("junk", "not JSON"),
        ("error", "HTTP 500: internal error for Bearer ***"),
        ("empty", "no choices"),
    ],
)
def test_bad_servers_give_one_line_and_write_nothing(server, tmp_path, monkeypatch, mode, message):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    banks = tmp_path / "banks"
    write_bank(banks)
    before = sorted(p.name for p in banks.iterdir())
    StandIn.mode = mode
    r = run(
        "expand",
        "--concept",
        "background",
        "--banks-dir",
        banks,
        "--backend",
        "openai",
        "--base-url",
        server,
        "--model",
        "m",
        "--request-timeout",
        "0.5",
    )
    assert r.exit_code == 1
    errors = [x for x in r.stderr.strip().splitlines() if not x.startswith("model m at")]  # the info line
    assert len(errors) == 1 and errors[0].startswith("Error:") and message in errors[0], r.stderr
    assert KEY not in r.output and "Traceback" not in r.output
    assert sorted(p.name for p in banks.iterdir()) == before


def test_unreachable_server_and_bad_url(tmp_path):
    banks = tmp_path / "banks"
    write_bank(banks)
    for url, message in (("http://127.0.0.1:9/v1", "cannot connect"), ("ftp://x/v1", "expected http")):
        r = run(
            "expand",
            "--concept",
            "background",
            "--banks-dir",
            banks,
            "--backend",
            "openai",
            "--base-url",
            url,
            "--model",
            "m",
            "--request-timeout",
            "2",
        )
        errors = [x for x in r.stderr.strip().splitlines() if not x.startswith("model m at")]
        assert r.exit_code == 1 and len(errors) == 1 and message in errors[0], r.stderr
    r = run("expand", "--concept", "background", "--banks-dir", banks, "--backend", "openai")
    assert r.exit_code != 0 and "--base-url" in r.output
    assert len(list_versions(banks)) == 1
