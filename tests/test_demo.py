"""The command line: ``python -m cppnp demo`` (the seed's EchoServer driven by its own
client, in both modes) and ``python -m cppnp echo`` serving echoes until SIGINT."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys

import pytest

from conftest import recv_exact
from faults_support import user_env

TIMEOUT = 60.0


@pytest.mark.parametrize("threads", [0, 4], ids=["single", "pool4"])
def test_demo_verifies_every_echo(threads: int) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cppnp",
            "demo",
            "--threads",
            str(threads),
            "--conns",
            "4",
            "--messages",
            "30",
            "--fib",
            "5",
        ],
        capture_output=True,
        timeout=TIMEOUT,
        env=user_env(),
        check=False,
    )
    out = proc.stdout.decode()
    assert proc.returncode == 0, out + proc.stderr.decode()
    assert "every echo verified" in out
    assert re.search(r"echoes verified: 120 of 120 sent", out), out
    assert re.search(r"mismatches: 0\b", out), out
    assert re.search(
        r"dropped replies: 0; callback errors: 0; connections left open: 0$", out, re.M
    ), out
    mode = "single-thread mode" if threads == 0 else "%d worker threads" % threads
    assert mode in out
    # A message may reach the server in several reads (several tasks): >= 120.
    m = re.search(r"tasks: (\d+) completed, 0 failed", out)
    assert m and int(m.group(1)) >= 120, out


def test_demo_rejects_bad_arguments() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cppnp", "demo", "--threads", "many"],
        capture_output=True,
        timeout=TIMEOUT,
        env=user_env(),
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stdout == b""
    assert proc.stderr.decode().startswith("python -m cppnp demo: error: argument --threads: ")


@pytest.mark.parametrize("threads", [0, 2], ids=["single", "pool2"])
def test_echo_server_serves_then_exits_zero_on_sigint(threads: int) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cppnp",
            "echo",
            "--port",
            "0",
            "--threads",
            str(threads),
            "--fib",
            "5",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=user_env(),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        m = re.match(r"listening on ([\d.]+):(\d+)", line)
        assert m, line
        host, port = m.group(1), int(m.group(2))
        assert port != 0
        socks = [socket.create_connection((host, port), timeout=TIMEOUT) for _ in range(3)]
        try:
            for round_ in range(20):
                for i, s in enumerate(socks):
                    msg = b"conn %d round %d|" % (i, round_)
                    s.sendall(msg)
                    assert recv_exact(s, len(msg)) == msg
            big = bytes(range(256)) * 512  # 128 KiB through the pool
            socks[0].sendall(big)
            assert recv_exact(socks[0], len(big)) == big
            socks[1].shutdown(socket.SHUT_WR)  # half-close: the server closes
            assert socks[1].recv(1) == b""
        finally:
            for s in socks:
                s.close()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, err.decode()
        assert b"Traceback" not in err, err.decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
