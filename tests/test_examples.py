"""The teaching examples (top-level examples/: each runs as a script and serves one
exchange) and the ``cppnp`` command line (src/cppnp/cli: it serves and exits cleanly on
SIGINT/SIGTERM); the library never imports the command line."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import recv_exact, recv_until_eof
from faults_support import finish, reap, run_child, run_python, spawn_python, user_env

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TIMEOUT = 20.0


def _spawn(*argv: str) -> subprocess.Popen[str]:
    return spawn_python(*argv, env=user_env())


def _cli(*args: str) -> subprocess.Popen[str]:
    return _spawn("-m", "cppnp", *args)


def _listening(proc: subprocess.Popen[str]) -> tuple[str, int]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    m = re.fullmatch(r"listening on ([\d.]+):(\d+)\n", line)
    if m is None:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail("unexpected first line %r; stderr: %s" % (line, err))
    return m.group(1), int(m.group(2))


# -- examples/ ------------------------------------------------------------------------------

EXAMPLE_TESTS = {
    "echo.py": "test_example_echo",
    "discard.py": "test_example_discard",
    "daytime.py": "test_example_daytime",
    "seed_echo.py": "test_example_seed_echo",
    "timers.py": "test_example_timers",
    "resp_server.py": "test_example_resp.py::test_strings_counters_and_keys",
    "tcprelay.py": "test_example_tcprelay",
    "unix_echo.py": "test_example_unix_echo",
    "rpc.py": "test_example_rpc",
    "tls_echo.py": "test_tls.py::test_example_tls_echo",
}


def test_every_example_has_a_test() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXAMPLE_TESTS)
    for name in EXAMPLE_TESTS.values():
        if "::" in name:  # tested in a file of its own
            module, func = name.split("::")
            assert re.search(r"(?m)^def %s\(" % func, (ROOT / "tests" / module).read_text()), name
        else:
            assert callable(globals()[name]), name


def _example(name: str, *args: str) -> tuple[subprocess.Popen[str], tuple[str, int]]:
    proc = _spawn(str(EXAMPLES / name), "0", *args)
    return proc, _listening(proc)


def assert_echoes(s: socket.socket, greeting: bytes) -> None:
    """A short message, then 100 KiB, each echoed back byte for byte."""
    for msg in (greeting, bytes(range(256)) * 400):
        s.sendall(msg)
        assert recv_exact(s, len(msg)) == msg


def test_example_echo() -> None:
    proc, address = _example("echo.py")
    try:
        with socket.create_connection(address, timeout=10) as s:
            assert_echoes(s, b"hello, echo\r\n")
        rc, out, err = finish(proc, TIMEOUT, sig=signal.SIGINT)
    finally:
        reap(proc)
    assert (rc, out, err) == (0, "", "")


def test_example_discard() -> None:
    proc, address = _example("discard.py")
    try:
        data = b"d" * 100_000
        with socket.create_connection(address, timeout=10) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            assert recv_until_eof(s) == b""  # nothing ever comes back
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert re.fullmatch(r"\S+ closed; 100000 bytes discarded so far\n", line), line
        rc, _, err = finish(proc, TIMEOUT, sig=signal.SIGINT)
    finally:
        reap(proc)
    assert (rc, err) == (0, "")


def test_example_daytime() -> None:
    proc, address = _example("daytime.py")
    try:
        with socket.create_connection(address, timeout=10) as s:
            text = recv_until_eof(s).decode("ascii")  # one line, then the server's FIN
        assert re.fullmatch(r"\w+, \w+ \d{2}, \d{4} \d{2}:\d{2}:\d{2}-.*\r\n", text), text
        rc, _, err = finish(proc, TIMEOUT, sig=signal.SIGINT)
    finally:
        reap(proc)
    assert (rc, err) == (0, "")


@pytest.mark.parametrize("threads", ["0", "3"], ids=["single", "pool3"])
def test_example_seed_echo(threads: str) -> None:
    proc, address = _example("seed_echo.py", threads)
    try:
        socks = [socket.create_connection(address, timeout=10) for _ in range(3)]
        try:
            for round_ in range(10):
                for i, s in enumerate(socks):
                    msg = b"conn %d round %d|" % (i, round_)
                    s.sendall(msg)
                    assert recv_exact(s, len(msg)) == msg
            big = bytes(range(256)) * 512  # several reads: several ordered tasks
            socks[0].sendall(big)
            assert recv_exact(socks[0], len(big)) == big
        finally:
            for s in socks:
                s.close()
        rc, _, err = finish(proc, TIMEOUT, sig=signal.SIGINT)
    finally:
        reap(proc)
    assert (rc, err) == (0, "")


def test_example_tcprelay() -> None:
    """echo.py behind tcprelay.py: bytes both ways, large payloads (flow control), and
    a half-close passed on (the echo server closes, the relay closes the client)."""
    backend, backend_address = _example("echo.py")
    relay: subprocess.Popen[str] | None = None
    try:
        relay, address = _example("tcprelay.py", *map(str, backend_address))
        with socket.create_connection(address, timeout=10) as s:
            for msg in (b"through the relay\r\n", bytes(range(256)) * 8192):
                s.sendall(msg)
                assert recv_exact(s, len(msg)) == msg
            s.shutdown(socket.SHUT_WR)
            assert recv_until_eof(s) == b""
        rc, _, err = finish(relay, TIMEOUT, sig=signal.SIGINT)
        assert (rc, err) == (0, "")
        rc, _, err = finish(backend, TIMEOUT, sig=signal.SIGINT)
        assert (rc, err) == (0, "")
    finally:
        if relay is not None:
            reap(relay)
        reap(backend)


def test_example_unix_echo(tmp_path: Path) -> None:
    path = str(tmp_path / "echo.sock")
    proc = _spawn(str(EXAMPLES / "unix_echo.py"), path)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "listening on unix:%s\n" % path
        assert oct(Path(path).stat().st_mode & 0o777) == oct(0o600)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(path)
            assert_echoes(s, b"hello, unix\n")
        rc, out, err = finish(proc, TIMEOUT, sig=signal.SIGINT)
    finally:
        reap(proc)
    assert (rc, out, err) == (0, "", "")
    assert not Path(path).exists()


def test_example_rpc() -> None:
    proc = _spawn(str(EXAMPLES / "rpc.py"), "serve", "0", "4")
    try:
        _, port = _listening(proc)
        child = run_python(
            str(EXAMPLES / "rpc.py"), "call", str(port), "6", timeout=TIMEOUT, env=user_env()
        )
        assert (child.returncode, child.stderr) == (0, "")
        assert child.stdout.splitlines() == [
            "0 add(0, 0) -> 0",
            "1 upper('call 1',) -> 'CALL 1'",
            "2 add(2, 2) -> 4",
            "3 upper('call 3',) -> 'CALL 3'",
            "4 add(4, 4) -> 8",
            "5 upper('call 5',) -> 'CALL 5'",
        ]
        rc, _, err = finish(proc, TIMEOUT, sig=signal.SIGINT)
    finally:
        reap(proc)
    assert (rc, err) == (0, "")
    # Nothing listens any more: the client reports the refused connect and exits 1.
    child = run_python(
        str(EXAMPLES / "rpc.py"), "call", str(port), "1", timeout=TIMEOUT, env=user_env()
    )
    assert child.returncode == 1 and "cannot connect" in child.stderr


def test_example_timers() -> None:
    proc = run_python(str(EXAMPLES / "timers.py"), timeout=TIMEOUT, env=user_env())
    assert (proc.returncode, proc.stderr) == (0, "")
    lines = proc.stdout.splitlines()
    ticks = [line for line in lines if line.startswith("tick ")]
    assert [t.split()[1] for t in ticks] == ["1", "2", "3", "4", "5"]
    offsets = [int(re.search(r"\+(\d+) ms", t).group(1)) for t in ticks]  # type: ignore[union-attr]
    for k, ms in enumerate(offsets, 1):
        assert ms >= k * 50 - 1  # never before its deadline
    assert "worker's timer ran on the loop thread: True" in lines
    assert "never printed" not in lines
    assert len(lines) == 6, lines


# -- the command line ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args", [(), ("--threads", "2", "--fib", "5")], ids=["single-thread", "pool"]
)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_cli_echo_serves_and_exits_cleanly(args: tuple[str, ...], sig: int) -> None:
    proc = _cli("echo", "--port", "0", *args)
    try:
        host, port = _listening(proc)
        assert host == "127.0.0.1" and port > 0
        with socket.create_connection((host, port), timeout=10) as s:
            for msg in (b"one", b"two two", b"x" * 100_000):
                s.sendall(msg)
                assert recv_exact(s, len(msg)) == msg
        rc, _, err = finish(proc, TIMEOUT, sig=sig)
    finally:
        reap(proc)
    assert rc == 0, err
    assert "Traceback" not in err, err


def test_cli_daytime() -> None:
    proc = _cli("daytime", "--port", "0")
    try:
        host, port = _listening(proc)
        with socket.create_connection((host, port), timeout=10) as s:
            assert recv_until_eof(s).endswith(b"\r\n")
        rc, _, err = finish(proc, TIMEOUT, sig=signal.SIGTERM)
    finally:
        reap(proc)
    assert rc == 0, err


def test_cli_discard() -> None:
    proc = _cli("discard", "--port", "0")
    try:
        host, port = _listening(proc)
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(b"z" * 10_000)
            s.shutdown(socket.SHUT_WR)
            assert recv_until_eof(s) == b""
        rc, _, err = finish(proc, TIMEOUT, sig=signal.SIGINT)
    finally:
        reap(proc)
    assert (rc, err) == (0, "")


def test_cli_timers() -> None:
    proc = run_python("-m", "cppnp", "timers", "--interval", "0.02", timeout=30, env=user_env())
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [ln.split()[1] for ln in lines if ln.startswith("tick ")] == ["1", "2", "3", "4", "5"]
    assert "worker timer ran on the loop thread: True" in lines
    assert "never" not in lines
    assert lines[-1] == (
        "loop() returned in MainThread, the thread that owns the loop; "
        "every callback above ran there"
    )


def test_library_never_imports_the_cli() -> None:
    code = (
        "import importlib, pkgutil, sys, cppnp, _core\n"
        "for pkg in (cppnp, _core):\n"
        "    for m in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + '.'):\n"
        "        if m.name not in ('cppnp.cli', 'cppnp.__main__'):\n"
        "            importlib.import_module(m.name)\n"
        "print(sorted(m for m in sys.modules if m.startswith('cppnp.cli')))\n"
    )
    proc = run_child(code, timeout=TIMEOUT, env=user_env())
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout == "[]\n"
    for path in [*(ROOT / "src" / "cppnp").glob("*.py"), *(ROOT / "src" / "_core").iterdir()]:
        if path.name != "__main__.py" and path.is_file():
            assert "cppnp.cli" not in path.read_text(errors="replace"), path
