"""``cppnp wsgi --unix PATH`` (issue 10 item 3): the WSGI server on a Unix socket, driven
by a raw AF_UNIX client speaking HTTP/1.1; SIGTERM stops it and removes the file."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import wait_for
from wsgi_support import HERE, read_response

pytest.importorskip("httptools")


def spawn(*args: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, "-m", "cppnp", "wsgi", *args, "--log-level", "warning"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=HERE,
    )


def unix_up(proc: subprocess.Popen[bytes], address: str) -> bool:
    assert proc.poll() is None, proc.communicate()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(address)
        return True
    except OSError:
        return False


def finish(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError("server did not exit: %s" % err.decode()) from None
    return proc.returncode, err.decode("utf-8", "replace")


def request(address: str, raw: bytes, count: int = 1) -> list[object]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(address)
        s.sendall(raw * count)
        f = s.makefile("rb")
        return [read_response(f) for _ in range(count)]


def test_wsgi_unix_path(tmp_path: Path) -> None:
    path = str(tmp_path / "wsgi.sock")
    proc = spawn("wsgi_apps:echo", "--unix", path)
    try:
        wait_for(lambda: unix_up(proc, path), timeout=20)
        raw = b"GET /x?y=1 HTTP/1.1\r\nHost: t\r\n\r\n"
        responses = request(path, raw, count=3)  # keep-alive: three on one connection
        for r in responses:
            assert r.status == 200  # type: ignore[attr-defined]
            info = json.loads(r.body)  # type: ignore[attr-defined]
            assert info["PATH_INFO"] == "/x" and info["QUERY_STRING"] == "y=1"
            assert info["SERVER_NAME"] == path and info["SERVER_PORT"] == ""
            assert "REMOTE_ADDR" not in info
        code, err = finish(proc)
        assert code == 0, err
        assert not os.path.exists(path)  # removed on stop
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_wsgi_unix_abstract_and_live_refused(tmp_path: Path) -> None:
    name = "@cppnp-wsgi-%d" % os.getpid()
    proc = spawn("wsgi_apps:hello", "--unix", name)
    try:
        wait_for(lambda: unix_up(proc, "\0" + name[1:]), timeout=20)
        (r,) = request("\0" + name[1:], b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        assert r.status == 200 and r.body == b"Hello, World!"  # type: ignore[attr-defined]
        # A second server on the same (live) name refuses to start.
        second = spawn("wsgi_apps:hello", "--unix", name)
        _, err2 = second.communicate(timeout=30)
        assert second.returncode != 0, err2.decode()
        assert "unix:%s: Address already in use" % name in err2.decode(), err2.decode()
        code, err = finish(proc)
        assert code == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_wsgi_unix_live_file_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "live.sock")
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(path)
    live.listen(1)
    try:
        proc = spawn("wsgi_apps:hello", "--unix", path)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode != 0 and "live server" in err.decode(), err.decode()
        assert os.path.exists(path)
    finally:
        live.close()


def test_wsgi_unix_refuses_processes(tmp_path: Path) -> None:
    proc = spawn("wsgi_apps:hello", "--unix", str(tmp_path / "p.sock"), "--processes", "2")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "--processes 1" in err.decode()
