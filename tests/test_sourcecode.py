"""Lint and type checks run as tests (uvloop's test_sourcecode): ruff, cython-lint, mypy.
Each is skipped when its tool is not installed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def find_tool(name: str) -> str:
    """The tool next to this interpreter (a venv), else on PATH; a missing tool fails.

    `make test` installs the tools.  The runs that check the compiled core rather than the
    sources (make sanitize, make test-ft) leave this file out with --ignore.
    """
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        pytest.fail("%s is not installed (pip install -e '.[dev]', or run make test)" % name)
    return found


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    # Tools call helpers by name (cython-lint runs pycodestyle): find the venv's first.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def test_ruff() -> None:
    ruff = find_tool("ruff")
    proc = run([ruff, "check", "--no-cache", "src", "tests", "examples"])
    assert proc.returncode == 0, "ruff check failed:\n%s\n%s" % (proc.stdout, proc.stderr)


def test_cython_lint() -> None:
    tool = find_tool("cython-lint")
    files = sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "src" / "_core").rglob("*")
        if p.suffix in (".pyx", ".pxd", ".pxi")
    )
    assert files, "no Cython sources found"
    proc = run([tool, *files])
    assert proc.returncode == 0, "cython-lint failed:\n%s\n%s" % (proc.stdout, proc.stderr)


def test_mypy() -> None:
    find_tool("mypy")
    # Uses [tool.mypy] from pyproject.toml (files, strict); the cache stays out of the repo.
    cache = Path(os.environ.get("TMPDIR", "/tmp")) / ("cppnp-mypy-cache-%d" % os.getuid())
    proc = run([sys.executable, "-m", "mypy", "--cache-dir", str(cache)])
    assert proc.returncode == 0, "mypy failed:\n%s\n%s" % (proc.stdout[-8000:], proc.stderr)
