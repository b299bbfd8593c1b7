"""`pip install .` (not editable): the wheel gives working descgen and trainer commands, prompts included.

pytest -m slow tests/descgen/test_packaging.py

The wheel is built from a copy of the checkout and installed with --no-deps into a fresh venv that
borrows .venv's site-packages for the dependencies (a .pth line: nothing is downloaded, and .venv's
editable install of this project is not activated). Every command runs from an empty temp dir, so
nothing can come from the checkout.
"""

import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ["pyproject.toml", "README.md", "descgen", "trainer", "prompts"]


def _sh(*cmd, cwd, timeout=120):
    cmd = [str(c) for c in cmd]
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    assert r.returncode == 0, f"{cmd}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python, site-packages, empty work dir) of a fresh venv with the wheel installed."""
    tmp_path = tmp_path_factory.mktemp("wheel")
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        p = ROOT / name
        if p.is_dir():  # symlinks=True: descgen/prompt_files stays a link to ../prompts, as in git
            shutil.copytree(p, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(p, src / name)
    _sh(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist",
        src, cwd=tmp_path)  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("starft_toolkit-*.whl")
    names = _sh(sys.executable, "-m", "zipfile", "-l", wheel, cwd=tmp_path)
    for f in ("catalog.yaml", "concepts.txt", "descriptors.txt", "qc.yaml"):
        assert f"descgen/prompt_files/{f}" in names
    for f in (ROOT / "trainer" / "data" / "meta").glob("*"):  # trainer's class lists, if any
        assert f"trainer/data/meta/{f.name}" in names

    env = tmp_path / "env"
    venv.create(env, with_pip=False)
    py = env / "bin" / "python"
    site = Path(
        _sh(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).strip()
    )
    (site / "_deps_from_dev_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _sh(sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-index", wheel,
        cwd=tmp_path)  # fmt: skip

    work = tmp_path / "work"
    work.mkdir()
    return py, site, work


@pytest.mark.slow
def test_wheel_installs_with_prompts_and_runs_from_anywhere(installed):
    py, site, work = installed
    env = py.parent.parent
    where = _sh(py, "-c", "import descgen.prompts as p; print(p.__file__); print(p.PROMPTS_DIR)", cwd=work)
    assert all(line.startswith(str(site)) for line in where.split()), where  # the installed copy
    assert "--samples" in _sh(env / "bin" / "descgen", "concepts", "--help", cwd=work)
    load = "from descgen.prompts import load_prompt, load_catalog; p = load_prompt('descriptors'); "
    load += "print(p.path); print(len(load_catalog().concepts))"
    path, n = _sh(py, "-c", load, cwd=work).split()
    assert path.startswith(str(site)) and int(n) >= 6
    # the command a non-editable install used to fail: the catalog and the prompt from the package
    out = _sh(env / "bin" / "descgen", "concepts", "--samples", "0", cwd=work)
    assert "wrote banks/v1.yaml" in out and (work / "banks" / "v1.yaml").is_file()
    assert "run" in _sh(env / "bin" / "trainer", "--help", cwd=work, timeout=180)


@pytest.mark.slow
def test_installed_qc_rules_load_from_the_package(installed):
    py, _, work = installed
    _sh(py, "-c", "from descgen.qc import load_vocab; assert load_vocab()['concepts']", cwd=work)
