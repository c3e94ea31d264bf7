"""cppnp.serve(): the prefork supervisor, with real processes on 127.0.0.1.

The supervisor runs prefork_app.py in a subprocess (it forks and installs signal handlers,
which the test process must not do).  Every test ends with a /proc check that no process
it started -- supervisor or child -- is still alive.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import recv_until_eof, wait_for
from faults_support import child_env

APP = str(Path(__file__).resolve().parent / "prefork_app.py")
PR_SET_CHILD_SUBREAPER = 36


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_state(pid: int) -> str | None:
    """The state letter of *pid* from /proc (None if there is no such process)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[0]


def alive(pid: int) -> bool:
    return proc_state(pid) not in (None, "Z", "X")


def children_of(ppid: int) -> set[int]:
    """Live processes whose parent is *ppid* (/proc scan)."""
    out = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == ppid and fields[0] not in ("Z", "X"):
            out.add(int(name))
    return out


class Service:
    """prefork_app.py under the supervisor; remembers every pid it has seen."""

    def __init__(self, *args: str, processes: int = 2, port: int | None = None) -> None:
        self.port = free_port() if port is None else port
        self.proc = subprocess.Popen(
            [sys.executable, APP, "--port", str(self.port), "--processes", str(processes), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(),
            start_new_session=True,
        )
        self.pids: set[int] = {self.proc.pid}
        self.children: list[int] = []
        self.stderr = ""

    def wait_ready(self, timeout: float = 30.0) -> list[int]:
        assert self.proc.stdout is not None
        box: dict[str, str] = {}
        reader = threading.Thread(target=lambda: box.update(line=self.proc.stdout.readline()))
        reader.start()
        reader.join(timeout)
        line = box.get("line", "")
        if not line.startswith("ready "):
            self.proc.kill()
            reader.join()
            _, err = self.proc.communicate()
            pytest.fail("service not ready: stdout %r, stderr:\n%s" % (line, err))
        self.children = [int(x) for x in line.split()[1:]]
        self.pids.update(self.children)
        return self.children

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=20)

    def finish(self, timeout: float = 40.0) -> int:
        """Wait for the supervisor to exit; keep its stderr; return its status."""
        try:
            _, err = self.proc.communicate(timeout=timeout)
            self.stderr += err
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail("supervisor did not exit; stderr:\n%s" % self.stderr)
        return self.proc.returncode

    def kill(self) -> None:
        for pid in self.pids | children_of(self.proc.pid):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        _, err = self.proc.communicate()
        self.stderr += err


@pytest.fixture
def services() -> Iterator[list[Service]]:
    """Started services; afterwards no process any of them started may be alive."""
    started: list[Service] = []
    yield started
    leaked = []
    for svc in started:
        if svc.proc.poll() is None:
            svc.proc.send_signal(signal.SIGTERM)
        svc.finish()  # also closes its pipes
        pids = set(svc.pids)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.02)
        leaked += [p for p in pids if alive(p)]
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert not leaked, "processes left alive: %s" % leaked


def start(
    services: list[Service], *args: str, processes: int = 2, port: int | None = None
) -> Service:
    svc = Service(*args, processes=processes, port=port)
    services.append(svc)
    return svc


def ask(sock: socket.socket, line: str) -> str:
    sock.sendall(line.encode() + b"\n")
    out = b""
    while not out.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("EOF after %r" % out)
        out += chunk
    return out.decode().strip()


def pid_of(sock: socket.socket) -> int:
    reply = ask(sock, "pid")
    assert reply.startswith("pid "), reply
    return int(reply.split()[1])


def test_connections_spread_over_every_child(services: list[Service]) -> None:
    svc = start(services, processes=4)
    children = svc.wait_ready()
    assert len(set(children)) == 4 and os.getpid() not in children
    assert children_of(svc.proc.pid) == set(children)
    socks = [svc.connect() for _ in range(64)]
    try:
        answered = [pid_of(s) for s in socks]
    finally:
        for s in socks:
            s.close()
    counts = {pid: answered.count(pid) for pid in children}
    print("connections per child:", counts)
    # 64 connections hashed over 4 listeners: all four answer unless p < 1e-7.
    assert set(answered) == set(children)
    svc.proc.send_signal(signal.SIGTERM)
    assert svc.finish() == 0
    assert "Traceback" not in svc.stderr


def test_child_killed_under_load_is_restarted_and_others_see_no_error(
    services: list[Service],
) -> None:
    svc = start(services, "--threads", "0", processes=3)
    children = svc.wait_ready()
    socks = [svc.connect() for _ in range(24)]
    owners = [pid_of(s) for s in socks]
    victim = owners[0]
    killed = threading.Event()
    stop = threading.Event()
    after_kill = [0] * len(socks)
    errors: list[tuple[int, str]] = []

    def client(i: int) -> None:
        sock = socks[i]
        try:
            while not stop.is_set():
                was_killed = killed.is_set()
                assert pid_of(sock) == owners[i]
                if was_killed:
                    after_kill[i] += 1
        except (OSError, AssertionError) as exc:
            errors.append((i, repr(exc)))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(socks))]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)  # load running on every connection
        os.kill(victim, signal.SIGKILL)
        killed.set()
        survivors = [i for i, pid in enumerate(owners) if pid != victim]
        wait_for(lambda: all(after_kill[i] >= 50 for i in survivors) or errors, timeout=30)
        # The supervisor restarts the victim's slot with a new child.
        new = wait_for(lambda: children_of(svc.proc.pid) - set(children), timeout=20)
        svc.pids.update(new)
        (newpid,) = new
        # New connections reach it (the kernel hashes them over all listeners).
        for _ in range(400):
            with svc.connect() as s:
                if pid_of(s) == newpid:
                    break
        else:
            pytest.fail("no connection reached the restarted child %d" % newpid)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        for s in socks:
            s.close()
    victims = [i for i, pid in enumerate(owners) if pid == victim]
    print("victim %d had %d connections; restarted as %d" % (victim, len(victims), newpid))
    assert victims and len(victims) < len(socks)
    # Only the killed child's connections failed.
    assert {i for i, _ in errors} <= set(victims), errors
    svc.proc.send_signal(signal.SIGTERM)
    assert svc.finish() == 0
    assert "(pid %d) killed by SIGKILL" % victim in svc.stderr
    assert "restarting in" in svc.stderr
    assert "ready (pid %d)" % newpid in svc.stderr


def test_sigterm_drains_in_flight_requests_and_every_process_exits(services: list[Service]) -> None:
    svc = start(services, "--threads", "4", "--work", "0.5", processes=2)
    children = svc.wait_ready()
    busy = [svc.connect() for _ in range(20)]
    idle = [svc.connect() for _ in range(6)]
    try:
        for i, s in enumerate(busy):
            s.sendall(b"slow %d\n" % i)
        # Every request reached a child and is queued or running in its pool.
        acks = [recv_line(s) for s in busy]
        assert all(a.startswith("ack %d " % i) for i, a in enumerate(acks)), acks
        idle_pids = {pid_of(s) for s in idle}
        served_by = {int(a.split()[2]) for a in acks} | idle_pids
        assert served_by <= set(children)
        svc.proc.send_signal(signal.SIGTERM)
        # Every in-flight request is answered, then the connection is closed (FIN).
        for i, s in enumerate(busy):
            rest = recv_until_eof(s).decode()
            assert rest.startswith("done %d " % i), (i, rest)
        for s in idle:
            assert recv_until_eof(s) == b""
    finally:
        for s in busy + idle:
            s.close()
    assert svc.finish() == 0
    for pid in children:
        wait_for(lambda pid=pid: not alive(pid), timeout=10)
    assert "exited with status 0" in svc.stderr
    assert "Traceback" not in svc.stderr and "force-closed" not in svc.stderr
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", svc.port), timeout=5).close()


def recv_line(sock: socket.socket) -> str:
    out = b""
    while not out.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        out += chunk
    return out.decode().strip()


def test_ctrl_c_to_the_process_group_drains_and_exits_zero(services: list[Service]) -> None:
    """A terminal's Ctrl-C reaches the supervisor and every child at once."""
    svc = start(services, "--threads", "2", "--work", "0.3", processes=2)
    children = svc.wait_ready()
    socks = [svc.connect() for _ in range(6)]
    try:
        for i, s in enumerate(socks):
            s.sendall(b"slow %d\n" % i)
        assert all(recv_line(s).startswith("ack %d " % i) for i, s in enumerate(socks))
        os.killpg(svc.proc.pid, signal.SIGINT)
        for i, s in enumerate(socks):
            assert recv_until_eof(s).decode().startswith("done %d " % i)
    finally:
        for s in socks:
            s.close()
    assert svc.finish() == 0
    assert "SIGINT: draining 2 children" in svc.stderr
    assert svc.stderr.count("exited with status 0") == 2
    assert not any(alive(pid) for pid in children)


def test_stop_from_on_ready(services: list[Service]) -> None:
    """Supervisor.stop() drains like SIGTERM; on_ready sees every child's pid."""
    svc = start(services, "--stop-when-ready", processes=3)
    children = svc.wait_ready()
    assert len(set(children)) == 3 and 0 not in children
    assert svc.finish() == 0
    assert "stop(): draining 3 children" in svc.stderr
    for pid in children:
        assert "(pid %d) exited with status 0" % pid in svc.stderr


def test_drain_deadline_force_closes_and_exits_zero(services: list[Service]) -> None:
    svc = start(services, "--threads", "1", "--work", "30", "--drain-timeout", "0.5", processes=1)
    (child,) = svc.wait_ready()
    with svc.connect() as s:
        s.sendall(b"slow 1\n")
        assert recv_line(s).startswith("ack 1 ")
        svc.proc.send_signal(signal.SIGTERM)
        assert recv_until_eof(s) == b""  # force-closed at the deadline, no reply
    assert svc.finish() == 0
    assert "1 connection(s) force-closed" in svc.stderr
    assert "child 0 (pid %d) exited with status 0" % child in svc.stderr


def test_second_signal_kills_at_once(services: list[Service]) -> None:
    svc = start(services, "--threads", "1", "--work", "30", processes=2)
    children = svc.wait_ready()
    with svc.connect() as s:
        s.sendall(b"slow 1\n")
        assert recv_line(s).startswith("ack 1 ")
        svc.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "draining 2 children" in read_log_so_far(svc), timeout=10)
        svc.proc.send_signal(signal.SIGINT)
        assert svc.finish() == 1
    assert "SIGINT again: killing the children now" in svc.stderr
    assert "killed by SIGKILL" in svc.stderr
    for pid in children:
        assert not alive(pid)


def read_log_so_far(svc: Service) -> str:
    """The supervisor's stderr up to now (non-blocking; kept in svc.stderr)."""
    assert svc.proc.stderr is not None
    fd = svc.proc.stderr.fileno()
    os.set_blocking(fd, False)
    try:
        chunk = os.read(fd, 65536)
    except BlockingIOError:
        chunk = b""
    finally:
        os.set_blocking(fd, True)
    svc.stderr += chunk.decode(errors="replace")
    return svc.stderr


def test_parent_killed_children_exit(services: list[Service]) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    # Orphans are re-parented to this process, so they can be reaped and their exit
    # status read here instead of by init.
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    try:
        svc = start(services, processes=2)
        children = svc.wait_ready()
        conns = [svc.connect() for _ in range(8)]
        try:
            for s in conns:
                pid_of(s)
            svc.proc.kill()
            svc.proc.wait(10)
            t0 = time.monotonic()
            statuses: dict[int, int] = {}

            def reaped() -> bool:
                for pid in children:
                    if pid not in statuses:
                        done, status = os.waitpid(pid, os.WNOHANG)
                        if done:
                            statuses[pid] = status
                return len(statuses) == len(children)

            wait_for(reaped, timeout=10)
            took = time.monotonic() - t0
            for s in conns:
                assert recv_until_eof(s) == b""  # drained: a FIN, not a reset
        finally:
            for s in conns:
                s.close()
        print("children exited %.3f s after the parent was killed: %s" % (took, statuses))
        # PDEATHSIG (SIGTERM) made each drain and exit 0.
        assert all(os.waitstatus_to_exitcode(st) == 0 for st in statuses.values())
        assert not children_of(os.getpid()) & set(children)
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def test_all_children_fail_to_bind_clear_error_no_restart(services: list[Service]) -> None:
    with socket.socket() as squatter:  # holds the port without SO_REUSEPORT
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        svc = start(services, processes=3, port=port)
        assert svc.finish() == 1  # PreforkError out of main()
    err = svc.stderr
    assert "PreforkError" in err and "failed to start" in err, err
    assert "Address already in use" in err and "reuse_port=True" in err
    assert err.count("started (pid") == 3, err  # no restart
    assert "restarting in" not in err


def test_server_without_reuse_port_is_a_clear_error(services: list[Service]) -> None:
    svc = start(services, "--no-reuse-port", processes=2)
    assert svc.finish() == 1
    assert "reuse_port=True" in svc.stderr, svc.stderr
    assert svc.stderr.count("started (pid") == 2 and "restarting in" not in svc.stderr


def test_port_zero_without_reservation_is_a_clear_error(services: list[Service]) -> None:
    svc = start(services, processes=2, port=0)
    assert svc.finish() == 1
    assert "different addresses" in svc.stderr and "reserve_port" in svc.stderr, svc.stderr


def test_cli_echo_processes() -> None:
    """``cppnp echo --processes 2``: two children answer on one port; SIGTERM stops all."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cppnp", "echo", "--port", "0", "--processes", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on 127.0.0.1:"), (line, proc.stderr)
        port = int(line.rsplit(":", 1)[1])
        pids = [int(p) for p in proc.stdout.readline().split(":", 1)[1].split()]
        assert len(pids) == 2 and all(alive(p) for p in pids)
        for i in range(20):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                msg = b"hello %d" % i
                s.sendall(msg)
                s.shutdown(socket.SHUT_WR)
                assert recv_until_eof(s) == msg
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        wait_for(lambda: not any(alive(p) for p in pids))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
