"""`python -m bench ...`: the benchmark's command line (bench/cli.py)."""

from bench.cli import app

app(prog_name="python -m bench")
