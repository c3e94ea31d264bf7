"""``cppnp wsgi --processes N``: N prefork children serve one port; SIGTERM drains them all.

Real processes (``python -m cppnp.wsgi``), real loopback sockets.  The port is reserved here
with SO_REUSEPORT (cppnp.prefork.reserve_port) so that the children can share it."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import wait_for
from cppnp.prefork import reserve_port
from wsgi_support import HERE, get, read_response

_READY = re.compile(r"serving on http://\S+ with (\d+) processes \(pids ([\d ]+)\)")


class PreforkProcess:
    """``python -m cppnp.wsgi wsgi_apps:dispatch --processes N`` on a reserved port."""

    def __init__(self, processes: int, *args: str, env: dict[str, str] | None = None) -> None:
        self.reserved = reserve_port("127.0.0.1", 0)
        self.port = self.reserved.getsockname()[1]
        self.address = ("127.0.0.1", self.port)
        self.err = tempfile.TemporaryFile()
        environ = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
        environ.update(env or {})
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cppnp.wsgi",
                "wsgi_apps:dispatch",
                "--port",
                str(self.port),
                "--processes",
                str(processes),
                "--log-level",
                "info",
                *args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=self.err,
            env=environ,
            cwd=HERE,
        )
        self.pids: list[int] = []

        def ready() -> bool:
            assert self.proc.poll() is None, self.stderr()
            m = _READY.search(self.stderr())
            if m is None:
                return False
            assert int(m.group(1)) == processes
            self.pids = [int(p) for p in m.group(2).split()]
            return True

        wait_for(ready, timeout=30)

    def stderr(self) -> str:
        self.err.seek(0)
        return self.err.read().decode("utf-8", "replace")

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("server did not exit: %s" % self.stderr()) from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # the children follow (PR_SET_PDEATHSIG)
            self.proc.wait()
        self.reserved.close()
        self.err.close()


@pytest.fixture
def prefork() -> Iterator[Any]:
    started: list[PreforkProcess] = []

    def make(processes: int, *args: str, **kw: Any) -> PreforkProcess:
        p = PreforkProcess(processes, *args, **kw)
        started.append(p)
        return p

    yield make
    for p in started:
        p.close()


def _ppid(pid: int) -> int:
    with open("/proc/%d/stat" % pid) as f:
        data = f.read()
    return int(data[data.rindex(")") + 2 :].split()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _get_json(address: tuple[str, int], path: str) -> dict[str, Any]:
    with socket.create_connection(address, timeout=30) as s:
        s.sendall(get(path))
        with s.makefile("rb") as f:
            r = read_response(f)
    assert r.status == 200, r
    data: dict[str, Any] = json.loads(r.body)
    return data


@pytest.mark.parametrize("threads", ["0", "2"])
def test_requests_are_answered_by_n_distinct_child_processes(prefork: Any, threads: str) -> None:
    srv = prefork(3, "--threads", threads)
    assert len(set(srv.pids)) == 3
    assert srv.proc.pid not in srv.pids
    assert all(_ppid(pid) == srv.proc.pid for pid in srv.pids)
    seen: set[int] = set()
    # New connections are spread over the children by the kernel (SO_REUSEPORT hashes the
    # 4-tuple): 300 connections reach all 3 unless the hash is badly broken.
    for _ in range(300):
        info = _get_json(srv.address, "/procinfo")
        assert info["multiprocess"] is True
        assert info["multithread"] is (threads != "0")
        seen.add(info["pid"])
        if len(seen) == 3:
            break
    assert seen == set(srv.pids)
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.wait() == 0, srv.stderr()
    wait_for(lambda: not any(_alive(pid) for pid in srv.pids), timeout=10)


@pytest.mark.parametrize("io_threads", ["0", "2"], ids=["io0", "io2"])
def test_sigterm_drains_every_process_and_loses_no_in_flight_request(
    prefork: Any, io_threads: str
) -> None:
    marks = tempfile.mkdtemp(prefix="cppnp-wsgi-marks-")
    srv = prefork(
        2,
        "--threads",
        "4",
        "--io-threads",
        io_threads,
        "--graceful-timeout",
        "20",
        env={"WSGI_MARK_DIR": marks},
    )
    conns: dict[int, list[socket.socket]] = {pid: [] for pid in srv.pids}
    idle: list[socket.socket] = []
    try:
        # Keep-alive connections stay with the child that accepted them: find 3 per child
        # (bounded: 400 connections), plus one idle keep-alive connection per child.
        for _ in range(400):
            if all(len(v) >= 4 for v in conns.values()):
                break
            s = socket.create_connection(srv.address, timeout=30)
            s.sendall(get("/pid"))
            r = read_response(s.makefile("rb"))
            assert r.status == 200
            mine = conns[int(r.body)]
            if len(mine) < 4:
                mine.append(s)
            else:
                s.close()
        assert all(len(v) == 4 for v in conns.values()), {k: len(v) for k, v in conns.items()}
        busy: list[tuple[str, socket.socket]] = []
        for pid, socks in conns.items():
            idle.append(socks[3])
            for i, s in enumerate(socks[:3]):
                name = "r%d-%d" % (pid, i)
                s.sendall(get("/inflight/%s?ms=700" % name))
                busy.append((name, s))
        # Every request is inside the app (its mark exists) before the signal.
        wait_for(lambda: len(os.listdir(marks)) == len(busy), timeout=20)
        srv.proc.send_signal(signal.SIGTERM)
        for name, s in busy:
            f = s.makefile("rb")
            r = read_response(f)
            pid = int(name[1:].split("-")[0])
            assert r.status == 200 and r.body == b"%s %d" % (name.encode(), pid)
            assert r.header("Connection") == "close"
            assert f.read() == b""
            f.close()
        for s in idle:
            assert s.recv(100) == b""  # closed between requests
        assert srv.wait() == 0, srv.stderr()  # 0: every child exited 0
        wait_for(lambda: not any(_alive(pid) for pid in srv.pids), timeout=10)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(srv.address, timeout=5).close()
        assert "killed" not in srv.stderr()
    finally:
        for socks in conns.values():
            for s in socks:
                s.close()
        for name in os.listdir(marks):
            os.unlink(os.path.join(marks, name))
        os.rmdir(marks)


def test_processes_with_io_threads_run_the_app_on_each_childs_io_loops(prefork: Any) -> None:
    # --threads 0: the app runs on the io loop that owns the connection, in each child.
    srv = prefork(2, "--threads", "0", "--io-threads", "2")
    seen: dict[int, set[str]] = {pid: set() for pid in srv.pids}
    socks: list[socket.socket] = []
    try:
        # Keep the connections open so that each child's least-connections choice moves
        # on to its other io loop (bounded: 400 connections).
        for _ in range(400):
            if all(len(v) == 2 for v in seen.values()):
                break
            s = socket.create_connection(srv.address, timeout=30)
            socks.append(s)
            s.sendall(get("/procinfo"))
            with s.makefile("rb") as f:
                info = json.loads(read_response(f).body)
            assert info["multiprocess"] is True and info["multithread"] is True
            seen[info["pid"]].add(info["thread"])
        assert all(
            v == {"wsgi-127.0.0.1:%d-io0" % srv.port, "wsgi-127.0.0.1:%d-io1" % srv.port}
            for v in seen.values()
        ), seen
    finally:
        for s in socks:
            s.close()
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.wait() == 0, srv.stderr()
    wait_for(lambda: not any(_alive(pid) for pid in srv.pids), timeout=10)


def test_processes_must_be_a_positive_int() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "cppnp.wsgi", "wsgi_apps:hello", "--processes", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=HERE,
    )
    assert out.returncode == 2 and "--processes" in out.stderr, out.stderr
    from cppnp.wsgi import serve
    from wsgi_apps import hello

    with pytest.raises(ValueError, match="processes"):
        serve(hello, "127.0.0.1", 0, processes=0)


def test_a_port_in_use_stops_the_service_with_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))  # no SO_REUSEPORT: the children cannot bind beside it
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "cppnp.wsgi",
                "wsgi_apps:hello",
                "--processes",
                "2",
                "--port",
                str(port),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=HERE,
        )
    assert out.returncode == 3, out.stderr  # EXIT_BOOT_FAILED
    assert "cannot serve" in out.stderr and "Address already in use" in out.stderr, out.stderr
