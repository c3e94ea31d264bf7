"""What is installed: one version everywhere, the CLI package, no examples in the library;
the developer tooling the README promises (make targets, in-repo scripts)."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import cppnp

ROOT = Path(__file__).resolve().parents[1]


def test_version_is_written_once() -> None:
    assert cppnp.__version__ == importlib.metadata.version("cppnp")
    pyproject = (ROOT / "pyproject.toml").read_text()
    project = pyproject.split("[project]", 1)[1].split("\n[", 1)[0]
    assert 'dynamic = ["version"]' in project
    assert not re.search(r"(?m)^version\s*=", project), "version written in pyproject too"
    assert 'attr = "cppnp._version.__version__"' in pyproject
    top = re.search(r"(?m)^## (\S+)", (ROOT / "CHANGELOG.md").read_text())
    assert top is not None
    assert cppnp.__version__.split(".dev")[0] == top.group(1)


def test_installed_package_has_the_cli_and_no_examples() -> None:
    files = {str(f) for f in importlib.metadata.files("cppnp") or []}
    assert "cppnp/cli/__init__.py" in files and "cppnp/cli/servers.py" in files
    assert not [f for f in files if "examples" in f], sorted(files)
    scripts = [
        ep for ep in importlib.metadata.entry_points(group="console_scripts") if ep.name == "cppnp"
    ]
    assert [ep.value for ep in scripts] == ["cppnp.cli:main"]


def test_check_runs_free_threaded_and_tsan() -> None:
    makefile = (ROOT / "Makefile").read_text()
    check = makefile.split("\ncheck:", 1)[1].split("\n\n", 1)[0]
    for step in ("scripts/sanitize.sh", "$(MAKE) test-ft", "$(MAKE) tsan"):
        assert step in check, step
    assert "\n\t-" not in check, "a step of make check ignores its failure"
    test_ft = makefile.split("\ntest-ft:", 1)[1].split("\n\n", 1)[0]
    assert "tools/free-threaded-python.sh" in test_ft
    assert "env -u PYTHON_GIL" in test_ft and "assert_gil_disabled.py" in test_ft
    assert "PYTHON_GIL=0" in test_ft
    assert "make check" in (ROOT / ".ci" / "run").read_text()


def test_tsan_suppressions_are_commented_and_cpython_only() -> None:
    lines = (ROOT / "scripts" / "tsan.supp").read_text().splitlines()
    previous = ""
    for line in lines:
        if line.strip() and not line.startswith("#"):
            kind, _, name = line.partition(":")
            assert kind == "race_top", "only race_top entries (innermost frame): %s" % line
            assert previous.startswith("#"), "suppression without a comment: %s" % line
            assert not re.search(r"pyx|_core|cppnp", name), "suppresses our code: %s" % line
        previous = line


def test_test_extra_matches_tests_requirements() -> None:
    """The `test` extra and tests/requirements.txt (used by the sanitizer, 3.13t and TSan
    venvs) list the same packages."""
    reqs = {
        line.strip()
        for line in (ROOT / "tests" / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    extra = {
        r.split(";")[0].strip()
        for r in importlib.metadata.requires("cppnp") or []
        if 'extra == "test"' in r
    }

    def norm(req: str) -> tuple[str, tuple[str, ...]]:
        req = re.sub(r"\s+", "", req).lower()
        name = re.match(r"[a-z0-9_.-]+", req)
        assert name is not None, req
        return name.group(0), tuple(sorted(req[name.end() :].split(",")))

    assert sorted(map(norm, reqs)) == sorted(map(norm, extra))
