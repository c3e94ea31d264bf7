"""Examples: echo, discard and daytime each serve one exchange; timers.run() output; the
`python -m cppnp` command line serves and exits cleanly on SIGINT/SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any, Callable

import pytest

from conftest import call_in_loop, wait_for
from cppnp import EventLoop, EventLoopThread, TcpServer
from cppnp.examples import daytime, discard, echo, timers

# -- helpers ------------------------------------------------------------------------------


def recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def recv_until_eof(sock: socket.socket) -> bytes:
    out = bytearray()
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return bytes(out)
        out += chunk


@pytest.fixture
def example() -> Iterator[Callable[[Callable[..., TcpServer]], tuple[EventLoop, TcpServer]]]:
    """example(module.serve) -> (loop, server), served from a loop thread on port 0."""
    threads: list[tuple[EventLoopThread, TcpServer]] = []

    def start(serve_fn: Callable[..., TcpServer]) -> tuple[EventLoop, TcpServer]:
        lt = EventLoopThread(lambda lp: serve_fn(lp, "127.0.0.1", 0), name="example")
        lp = lt.start()
        server = lt.result
        assert isinstance(server, TcpServer)
        threads.append((lt, server))
        return lp, server

    yield start
    for lt, server in threads:
        call_in_loop(lt.loop, server.stop)
        lt.stop()


# -- the example servers -----------------------------------------------------------------------


def test_echo_example(example: Any) -> None:
    lp, server = example(echo.serve)
    assert server.name == "echo"
    with socket.create_connection(server.address, timeout=10) as s:
        s.sendall(b"hello, echo\r\n")
        assert recv_exact(s, 13) == b"hello, echo\r\n"
    wait_for(lambda: call_in_loop(lp, lambda: server.connection_count) == 0)


def test_discard_example(example: Any) -> None:
    lp, server = example(discard.serve)
    data = b"d" * 100_000
    with socket.create_connection(server.address, timeout=10) as s:
        s.sendall(data)
        handler = server.handler
        wait_for(lambda: call_in_loop(lp, lambda: handler.discarded) == len(data))
        s.shutdown(socket.SHUT_WR)
        assert recv_until_eof(s) == b""          # nothing ever comes back
    wait_for(lambda: call_in_loop(lp, lambda: server.connection_count) == 0)


def test_daytime_example(example: Any) -> None:
    lp, server = example(daytime.serve)
    with socket.create_connection(server.address, timeout=10) as s:
        text = recv_until_eof(s).decode("ascii")   # one line, then the server's FIN
    assert re.fullmatch(r"\w+, \w+ \d{2}, \d{4} \d{2}:\d{2}:\d{2}-.*\r\n", text), text
    wait_for(lambda: call_in_loop(lp, lambda: server.connection_count) == 0)


def test_timers_example() -> None:
    with EventLoop() as lp:
        lines = timers.run(lp, ticks=5, interval=0.02)
        assert lp.timer_count == 0
    ticks = [line for line in lines if line.startswith("tick ")]
    assert [t.split()[1] for t in ticks] == ["1", "2", "3", "4", "5"]
    offsets = [int(re.search(r"\+(\d+) ms", t).group(1)) for t in ticks]  # type: ignore[union-attr]
    assert offsets == sorted(offsets)
    for k, ms in enumerate(offsets, 1):
        assert ms >= k * 20 - 1                  # never before its deadline
    assert "worker timer ran on the loop thread: True" in lines
    assert "never" not in lines
    assert lines[-1] == "main thread %s" % threading.current_thread().name


# -- the command line ---------------------------------------------------------------------------


def _default_sigint() -> None:
    """preexec_fn: a child of a background job inherits SIGINT ignored; Python then
    installs no KeyboardInterrupt handler.  Give the child the default disposition."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _cli(*args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "cppnp", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd="/",
                            preexec_fn=_default_sigint)


def _listening(proc: subprocess.Popen[str]) -> tuple[str, int]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    m = re.fullmatch(r"listening on ([\d.]+):(\d+)\n", line)
    if m is None:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail("unexpected first line %r; stderr: %s" % (line, err))
    return m.group(1), int(m.group(2))


def _finish(proc: subprocess.Popen[str], sig: int) -> tuple[int, str, str]:
    proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail("did not exit on signal %d: %s" % (sig, err))
    return proc.returncode, out, err


@pytest.mark.parametrize("args", [(), ("--threads", "2", "--fib", "5")],
                         ids=["single-thread", "pool"])
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
        rc, _, err = _finish(proc, sig)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert rc == 0, err
    assert "Traceback" not in err, err


def test_cli_daytime() -> None:
    proc = _cli("daytime", "--port", "0")
    try:
        host, port = _listening(proc)
        with socket.create_connection((host, port), timeout=10) as s:
            assert recv_until_eof(s).endswith(b"\r\n")
        rc, _, err = _finish(proc, signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert rc == 0, err


def test_cli_timers() -> None:
    proc = subprocess.run([sys.executable, "-m", "cppnp", "timers"], capture_output=True,
                          text=True, timeout=30, cwd="/")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [ln.split()[1] for ln in lines if ln.startswith("tick ")] == ["1", "2", "3", "4", "5"]
    assert "worker timer ran on the loop thread: True" in lines
    assert lines[-1] == "main thread MainThread"
