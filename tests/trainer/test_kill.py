"""Kills lose nothing (issue 19): `kill -9` a starft `trainer run` at random moments and at every phase of a
save, then `--resume`: every run finishes, and its checkpoints, state and metrics equal the uninterrupted
run's bit for bit (measured times aside).

.venv/bin/pytest tests/trainer/test_kill.py -q -m slow

Each run is a child process forked from a warm wrapper (one Python process that has imported trainer once),
running `trainer run` through the CLI; the test sends SIGKILL to the child. A kill inside a save is placed
by $TRAINER_FAULT_KILL (trainer.runlog.fault_point): the child kills itself when the save reaches a phase.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import tiny_config_for

# The wrapper: reads one JSON request a line ({"args", "env", "log"}), forks a child that runs the trainer
# CLI with those arguments, answers {"pid"} at once and {"code", "signal", "seconds"} when the child ends.
WRAPPER = r"""
import json, os, sys, time
import trainer.cli, trainer.train  # noqa: F401  (imported once, before any fork)

for line in sys.stdin:
    req = json.loads(line)
    t0 = time.time()
    pid = os.fork()
    if pid == 0:
        os.environ.update(req["env"])
        fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        code = 0
        try:
            trainer.cli.app(req["args"])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 99
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    out = {"seconds": time.time() - t0, "code": None, "signal": None}
    if os.WIFSIGNALED(status):
        out["signal"] = os.WTERMSIG(status)
    else:
        out["code"] = os.WEXITSTATUS(status)
    print(json.dumps(out), flush=True)
"""


class Wrapper:
    """A warm process that forks one `trainer run` child per request."""

    def __init__(self, tmp: Path):
        script = tmp / "wrapper.py"
        script.write_text(WRAPPER)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("TRAINER_FAULT_KILL", None)
        self.proc = subprocess.Popen(
            [sys.executable, str(script)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tmp,
        )
        self.log = tmp / "runs.log"

    def start(self, args: list[str], env: dict[str, str] | None = None) -> int:
        req = {"args": args, "env": env or {}, "log": str(self.log)}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["pid"]

    def wait(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, f"wrapper died; log:\n{self.log.read_text()[-3000:]}"
        return json.loads(line)

    def run(self, args: list[str], env: dict[str, str] | None = None) -> dict:
        self.start(args, env)
        return self.wait()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# Measured times (metrics.json, step rows): the only values a resumed run may not reproduce.
TIMINGS = {"seconds", "cpu_seconds", "samples_per_s", "data_wait"}


def outcome(run: Path) -> dict:
    """What a finished run must reproduce exactly: weights, training state, metrics (without timings)."""
    metrics = json.loads((run / "metrics.json").read_text())
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]
    files = ["checkpoints/last.safetensors", "checkpoints/best.safetensors"]
    # the state's model, optimizer and scheduler; not random_states_*.pkl: a resume inside an epoch draws
    # one more DataLoader base seed from torch's generator (training draws nothing from it: the order and
    # the augmentations are seeded by (seed, epoch, index)), so the generator's final position differs.
    files += [
        str(p.relative_to(run))
        for p in sorted((run / "state").iterdir())
        if p.name != "meta.json" and not p.name.startswith("random_states")
    ]
    meta = json.loads((run / "state" / "meta.json").read_text())
    meta.pop("config_hash")  # of the hyperparameters, run name included
    metrics = {k: v for k, v in metrics.items() if k not in TIMINGS}
    return {"metrics": metrics, "rows": rows, "meta": meta, **{f: digest(run / f) for f in files}}


# Kills inside saves: (phase, n) = the n-th time a save reaches `phase`. The run saves at steps 3, 4 (the
# epoch's end, after its evaluation), 6 and 8 (its end); it logs 8 step rows and 2 epoch rows.
PHASES = [
    ("written", 1),  # the first state written to state.tmp, not marked complete: nothing saved yet
    ("marked", 1),  # state.tmp complete, no state/
    ("unmarked", 1),  # the older state/ being deleted (its mark gone), state.tmp complete
    ("discarded", 2),  # the older state/ gone, state.tmp complete, not yet renamed
    ("renamed", 4),  # the final state in place, metrics.json not yet written
    ("torn", 6),  # half a metrics.jsonl row written
]
RANDOM_KILLS = 4


@pytest.mark.slow
def test_kill_9_at_any_moment_then_resume_ends_bit_for_bit_as_the_uninterrupted_run(
    tmp_path, tiny_clip, image_data, tiny_bank
):
    cfg = tiny_config_for(tmp_path, tiny_clip, image_data, tiny_bank)
    cfg.update(method="starft", epochs=2, checkpoint_every=3)
    config = tmp_path / "kill.yaml"
    config.write_text(json.dumps(cfg))  # JSON is YAML
    runs = Path(cfg["runs_dir"])

    def args(name: str, resume: bool = False) -> list[str]:
        return ["run", "--config", str(config), "--name", name] + (["--resume"] if resume else [])

    wrapper = Wrapper(tmp_path)
    try:
        ref = wrapper.run(args("reference"))
        assert ref["code"] == 0, wrapper.log.read_text()[-3000:]
        expected = outcome(runs / "reference")

        rng = random.Random(int(os.environ.get("KILL_TEST_SEED", "19")))
        scenarios: list[tuple[str, dict[str, str], float | None]] = [
            (f"{phase}-{n}", {"TRAINER_FAULT_KILL": f"{phase}:{n}"}, None) for phase, n in PHASES
        ]
        scenarios += [(f"random-{i}", {}, rng.uniform(0.05, 0.95)) for i in range(RANDOM_KILLS)]
        killed, finished = [], []
        for name, env, at in scenarios:
            for _ in range(3):  # a random moment past the run's end (a slow machine) is drawn again, earlier
                pid = wrapper.start(args(name), env)
                if at is not None:
                    time.sleep(at * ref["seconds"])
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                first = wrapper.wait()
                if first["signal"] == signal.SIGKILL:
                    break
                assert first["code"] == 0, (name, wrapper.log.read_text()[-3000:])
                if at is None:
                    pytest.fail(f"{name}: the run never reached its fault point")
                at /= 2
                shutil.rmtree(runs / name)
            else:
                pytest.fail(f"{name}: never killed")
            killed.append(name)
            second = wrapper.run(args(name, resume=True))
            assert second["code"] == 0, (name, wrapper.log.read_text()[-3000:])
            assert outcome(runs / name) == expected, name
            finished.append(name)
    finally:
        wrapper.close()
    print(f"\nkilled {len(killed)} runs ({', '.join(killed)}); {len(finished)} resumed and equal bit for bit")
    assert len(killed) >= 10 and finished == killed
    log = wrapper.log.read_text()
    assert "Traceback" not in log, log[-3000:]
