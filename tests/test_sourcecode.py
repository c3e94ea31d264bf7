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


# -- thread contracts --------------------------------------------------------------------------

CONTRACTS = ("Thread-safe.", "Loop thread only.")


def _public_members(cls: type) -> list[tuple[str, object]]:
    import inspect

    members = []
    for name, obj in inspect.getmembers(cls):
        if name.startswith("_"):
            continue
        if callable(obj) or isinstance(obj, property) or inspect.isgetsetdescriptor(obj):
            members.append((name, obj))
    return members


def test_every_public_method_and_property_states_its_thread_contract() -> None:
    """The last line of each public method's and property's docstring is exactly
    ``Thread-safe.`` or ``Loop thread only.`` (the installed classes: what users see)."""
    import inspect

    import cppnp
    import cppnp.codec

    classes = [
        cppnp.Buffer,
        cppnp.EventLoop,
        cppnp.EventLoopThread,
        cppnp.TcpConnection,
        cppnp.TcpServer,
        cppnp.ThreadPool,
        cppnp.Task,
        cppnp.IRun0,
        cppnp.IRun2,
        cppnp.ICppnpUsr,
        cppnp.codec.LengthFieldCodec,
        cppnp.codec.LineCodec,
    ]
    missing = []
    checked = 0
    for cls in classes:
        for name, obj in _public_members(cls):
            doc = (inspect.getdoc(obj) or "").strip()
            last = doc.splitlines()[-1].strip() if doc else ""
            checked += 1
            if last not in CONTRACTS:
                missing.append(f"{cls.__name__}.{name}: last line {last[-50:]!r}")
    for fn in (cppnp.live_buffers, cppnp.live_connections):
        doc = (inspect.getdoc(fn) or "").strip()
        checked += 1
        if not doc or doc.splitlines()[-1].strip() not in CONTRACTS:
            missing.append(fn.__name__)
    assert checked > 150, checked  # the walk really saw the API
    assert not missing, "no thread contract as the docstring's last line:\n" + "\n".join(missing)


# -- the import graph (ARCHITECTURE.md) --------------------------------------------------------

# What each module of src/_core and src/cppnp may import or cimport from the two packages
# (_core.includes.* are C declarations, free for all).  A new edge is a design decision:
# add it here and to ARCHITECTURE.md.  No back-edges: the pool never reaches the
# connection, the loop never reaches the pool's queue, the acceptor never reaches the
# connection, and the core never imports the API layer.
ALLOWED_IMPORTS: dict[str, set[str]] = {
    "_core.blocking_queue": set(),
    "_core.buffer": set(),
    "_core.gil_share": set(),
    "_core.handler": set(),
    "_core.pending": set(),
    "_core.socket_ops": set(),
    "_core.task": set(),
    "_core.timer_queue": set(),
    "_core.tls": {"_core.buffer"},
    "_core.channel": {"_core.task"},
    "_core.event_loop": {
        "_core.channel",
        "_core.gil_share",
        "_core.pending",
        "_core.task",
        "_core.timer_queue",
    },
    "_core.idle_wheel": {"_core.channel", "_core.event_loop"},
    "_core.acceptor": {"_core.channel", "_core.event_loop", "_core.socket_ops"},
    "_core.connector": {"_core.channel", "_core.event_loop", "_core.socket_ops"},
    "_core.tcp_client": {
        "_core.connector",
        "_core.event_loop",
        "_core.handler",
        "_core.idle_wheel",
        "_core.socket_ops",
        "_core.tcp_connection",
        "_core.tls",
    },
    "_core.codec": {"_core.buffer", "_core.event_loop"},
    "_core.tcp_connection": {
        "_core.buffer",
        "_core.channel",
        "_core.event_loop",
        "_core.handler",
        "_core.idle_wheel",
        "_core.socket_ops",
        "_core.tls",
    },
    "_core.thread_pool": {
        "_core.blocking_queue",
        "_core.channel",
        "_core.event_loop",
        "_core.gil_share",
        "_core.task",
    },
    "_core.event_loop_pool": {"_core.event_loop", "_core.tcp_connection"},
    "_core.tcp_server": {
        "_core.acceptor",
        "_core.event_loop",
        "_core.event_loop_pool",
        "_core.handler",
        "_core.socket_ops",
        "_core.idle_wheel",
        "_core.tcp_connection",
        "_core.tls",
    },
}


def import_graph() -> dict[str, set[str]]:
    """Module -> the _core/cppnp modules it imports or cimports (from the source lines)."""
    import re

    graph: dict[str, set[str]] = {}
    sources = sorted((ROOT / "src" / "_core").glob("*.p[yx][xd]")) + sorted(
        (ROOT / "src" / "cppnp").glob("*.py")
    )
    line = re.compile(r"^\s*from\s+(_core|cppnp)(?:\.(\w+))?\s+c?import\s+\(?\s*([\w, ]*)", re.M)
    for path in sources:
        if path.suffix not in (".pyx", ".pxd", ".py"):
            continue
        key = f"{path.parent.name}.{path.stem}"
        deps = graph.setdefault(key, set())
        for pkg, mod, names in line.findall(path.read_text()):
            if mod == "includes":
                continue
            if mod:
                deps.add(f"{pkg}.{mod}")
            else:  # from _core import codec
                deps.update(f"{pkg}.{n.strip()}" for n in names.split(",") if n.strip())
        deps.discard(key)
    return graph


def test_import_graph_has_only_allowed_edges_and_no_cycle() -> None:
    graph = import_graph()
    core = {k: v for k, v in graph.items() if k.startswith("_core.")}
    assert set(core) == set(ALLOWED_IMPORTS), "update ALLOWED_IMPORTS for new/removed modules"
    extra = sorted(f"{k} -> {d}" for k, deps in core.items() for d in deps - ALLOWED_IMPORTS[k])
    assert not extra, "imports not allowed by ARCHITECTURE.md: " + ", ".join(extra)
    # The API layer imports the core, never the reverse; library modules never the CLI.
    for k, deps in graph.items():
        if k.startswith("cppnp."):
            assert not any(d.startswith("cppnp.cli") for d in deps) or k == "cppnp.__main__", k
    # No cycle (a depth-first walk over the whole graph).
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join([*path, node, nxt])
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
