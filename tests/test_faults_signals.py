"""Fault suite, checklist section E (signals and shutdown), in subprocesses where a signal
or a fork is involved: E1 SIGINT/SIGTERM while blocked in epoll_wait with a server, a pool
and queued replies (graceful stop), SIGINT caught inside a callback, E2 the loop in a
non-main thread, E3 an EINTR storm under traffic, E4 SIGPIPE left at SIG_DFL, E5 a
graceful stop with 100 clients and tasks in flight, E6 fork.  E7 (reentrancy) is in
test_faults_misuse.py.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from typing import Any, Callable

import pytest

from conftest import ServerThread, call_in_loop, wait_for
from cppnp import Buffer, ICppnpUsr, IRun2, Task, TcpConnection, ThreadPool
from faults_support import (
    POOL_IDS,
    POOL_SIZES,
    TIMEOUT,
    finish,
    recv_exact,
    recv_until_eof,
    run_child,
    small_rcvbuf_client,
    spawned,
)

Serve = Callable[..., ServerThread]


def in_epoll_wait(pid: int) -> bool:
    """True while the main thread of *pid* sleeps in epoll_wait (x86_64 numbers)."""
    try:
        with open("/proc/%d/wchan" % pid) as f:
            if "epoll" in f.read():
                return True
        with open("/proc/%d/syscall" % pid) as f:
            return f.read().split()[0] in ("232", "281")
    except (OSError, IndexError):
        return False


# -- E1: SIGINT / SIGTERM while blocked in epoll_wait, then a graceful stop -------------------

_GRACEFUL_CHILD = r"""
import json, signal, socket, sys, threading
from cppnp import EventLoop, ICppnpUsr, IRun2, Task, TcpServer, ThreadPool

sig, nthreads = sys.argv[1], int(sys.argv[2])
if sig == "SIGTERM":
    def on_term(signum, frame):
        raise SystemExit(0)             # what `python -m cppnp echo` does
    signal.signal(signal.SIGTERM, on_term)
BIG = b"r" * (8 << 20)

class Handler(ICppnpUsr, IRun2):
    def __init__(self, pool):
        self.pool, self.conns, self.closed, self.replies = pool, [], 0, 0
    def on_connection(self, conn):
        self.conns.append(conn)
    def on_message(self, conn, buf):
        self.pool.add_task(Task(self, buf.retrieve_all(), conn))
    def run2(self, msg, conn):
        reply = BIG if msg == b"big" else msg
        self.replies += len(reply)
        conn.send(reply)
    def on_close(self, conn):
        self.closed += 1

pool = ThreadPool(nthreads)
pool.start()
loop = EventLoop()
h = Handler(pool)
server = TcpServer(loop, ("127.0.0.1", 0), h)
server.start()
port = server.address[1]
print(port, flush=True)
try:
    loop.loop()
    how = "returned"
except KeyboardInterrupt:
    how = "KeyboardInterrupt"
except SystemExit:
    how = "SystemExit"
queued = sum(c.output_bytes for c in h.conns)
server.stop()                           # listener first, then every connection
try:
    socket.create_connection(("127.0.0.1", port), timeout=2).close()
    refused = False
except ConnectionRefusedError:
    refused = True
for _ in range(500):                    # the same loop, run again until all released
    if server.connection_count == 0:
        break
    loop.run_once(0.01)
joined = pool.stop(drain=True, timeout=10)
for _ in range(3):
    loop.run_once(0)
stats = loop.stats()
loop.close()
print(json.dumps({
    "how": how, "queued": queued, "refused": refused, "joined": joined,
    "threads": threading.active_count(), "connections": server.connection_count,
    "closed": h.closed, "replies": h.replies,
    "sent": sum(c.bytes_sent for c in h.conns),
    "dropped": sum(c.dropped_bytes for c in h.conns),
    "loop_dropped": stats["dropped_bytes"], "pending": stats["pending_functors"],
    "timers": stats["timers"], "loop_closed": loop.closed,
}), flush=True)
"""


@pytest.mark.parametrize("nthreads", POOL_SIZES, ids=POOL_IDS)
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signal_while_blocked_in_epoll_stops_gracefully(sig: str, nthreads: int) -> None:
    clients: list[socket.socket] = []
    with spawned(_GRACEFUL_CHILD, sig, str(nthreads)) as proc:
        try:
            assert proc.stdout is not None
            port = int(proc.stdout.readline())
            slow = small_rcvbuf_client(("127.0.0.1", port))  # never reads
            clients.append(slow)
            slow.sendall(b"big")
            idle = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
            clients.append(idle)
            idle.sendall(b"hello")
            assert recv_exact(idle, 5) == b"hello"
            wait_for(lambda: in_epoll_wait(proc.pid), TIMEOUT)  # idle, replies queued
            proc.send_signal(getattr(signal, sig))
            rc, out, err = finish(proc)
            assert recv_until_eof(idle) == b""
            got = len(recv_until_eof(slow))
        finally:
            for c in clients:
                c.close()
    assert rc == 0 and err == "", err
    report = json.loads(out.splitlines()[-1])
    assert report["how"] == ("KeyboardInterrupt" if sig == "SIGINT" else "SystemExit")
    assert report["queued"] > 0, "no reply was queued when the signal came"
    assert report["refused"] is True, "the listener was still open after stop()"
    assert report["joined"] is True and report["threads"] == 1
    assert report["connections"] == 0 and report["closed"] == 2
    assert report["pending"] == 0 and report["timers"] == 0 and report["loop_closed"]
    # Every reply byte was either written or dropped and counted.
    assert report["sent"] + report["dropped"] == report["replies"] == (8 << 20) + 5
    assert report["dropped"] == report["loop_dropped"] > 0
    assert got <= report["sent"] - 5


_CAUGHT_CHILD = r"""
import time
from cppnp import EventLoop

lp = EventLoop()

def cb():
    try:
        print("ready", flush=True)
        time.sleep(30)
    except KeyboardInterrupt:
        print("oups", flush=True)
    lp.run_after(0.01, lp.quit)

lp.run_after(0, cb)
lp.loop()
print("done", flush=True)
lp.run_after(0.05, lp.quit)             # no stale KeyboardInterrupt or stop is left
lp.loop()
print("again", lp.callback_errors, flush=True)
lp.close()
"""


def test_sigint_caught_inside_a_callback_lets_the_loop_continue() -> None:
    with spawned(_CAUGHT_CHILD) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        rc, out, err = finish(proc)
    assert rc == 0 and err == "", err
    assert out == "oups\ndone\nagain 0\n"


# -- E2: the loop runs in a non-main thread ---------------------------------------------------

_THREAD_CHILD = r"""
import socket, time
from handlers import Echo, serve_in_thread

lt, lp, server = serve_in_thread(Echo())
with socket.create_connection(server.address, timeout=5) as s:
    s.sendall(b"x")
    assert s.recv(1) == b"x"
try:
    print("ready", flush=True)
    while True:
        time.sleep(0.05)
except KeyboardInterrupt:
    lp.queue_in_loop(server.stop)
    lt.stop(timeout=10)
    print("stopped", lp.closed, lt._thread.is_alive(), flush=True)
"""


def test_sigint_reaches_the_main_thread_which_stops_the_loop_thread() -> None:
    with spawned(_THREAD_CHILD) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGINT)
        rc, out, err = finish(proc)
    assert rc == 0 and err == "", err
    assert out == "stopped True False\n"


# -- E3: EINTR storm under traffic ------------------------------------------------------------

_EINTR_CHILD = r"""
import signal, socket, threading, time
from cppnp import EventLoop, ICppnpUsr, TcpServer

handled = [0]
signal.signal(signal.SIGUSR1, lambda s, f: handled.__setitem__(0, handled[0] + 1))

from handlers import Echo

lp = EventLoop()
server = TcpServer(lp, ("127.0.0.1", 0), Echo())
server.start()
ticks = [0]
lp.run_every(0.01, lambda: ticks.__setitem__(0, ticks[0] + 1))
main = threading.main_thread().ident
stop = threading.Event()
result = {}

def killer():
    while not stop.is_set():
        signal.pthread_kill(main, signal.SIGUSR1)
        time.sleep(0.001)

def client():
    ok = 0
    try:
        with socket.create_connection(server.address, timeout=5) as s:
            deadline = time.monotonic() + 1.0
            i = 0
            while time.monotonic() < deadline:
                msg = b"%08d" % i
                s.sendall(msg)
                got = b""
                while len(got) < 8:
                    got += s.recv(8 - len(got))
                ok += got == msg
                i += 1
                if i % 50 == 0:
                    time.sleep(0.005)    # let the loop block in epoll_wait meanwhile
        result["ok"], result["sent"] = ok, i
    finally:
        stop.set()
        lp.queue_in_loop(lp.quit)

threads = [threading.Thread(target=killer), threading.Thread(target=client)]
for t in threads:
    t.start()
lp.run_after(20, lp.quit)
lp.loop()
for t in threads:
    t.join()
lp.close()
print(result["ok"] == result["sent"] > 0, handled[0] > 50, ticks[0] > 0, lp.callback_errors,
      flush=True)
"""


def test_eintr_storm_under_traffic() -> None:
    proc = run_child(_EINTR_CHILD, timeout=30)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout == "True True True 0\n"


# -- E4: SIGPIPE at SIG_DFL -------------------------------------------------------------------

_SIGPIPE_CHILD = r"""
import logging, signal, socket, sys, threading, time
from cppnp import EventLoop, ICppnpUsr, IRun2, Task, TcpServer, ThreadPool

signal.signal(signal.SIGPIPE, signal.SIG_DFL)      # as embedders and `| head` users do
faults = []

class Collect(logging.Handler):
    def emit(self, record):
        faults.append(record.getMessage())

logging.getLogger("cppnp").setLevel(logging.DEBUG)
logging.getLogger("cppnp").addHandler(Collect())
nthreads = int(sys.argv[1])
CHUNK = b"p" * 65536

class Pusher(ICppnpUsr, IRun2):
    def __init__(self, pool):
        self.pool, self.closed = pool, 0
    def on_message(self, conn, buf):
        buf.retrieve_all()
        self.pool.add_task(Task(self, None, conn))
    def run2(self, msg, conn):
        # The peer sent its FIN right after "go": the first send draws an RST, so the
        # socket (in CLOSE_WAIT) then fails with EPIPE -- SIGPIPE without MSG_NOSIGNAL.
        for _ in range(5):
            conn.send(CHUNK)
            time.sleep(0.01)
    def on_close(self, conn):
        self.closed += 1
        conn.loop.run_after(0.02, conn.loop.quit)

pool = ThreadPool(nthreads)
pool.start()
lp = EventLoop()
server = TcpServer(lp, ("127.0.0.1", 0), Pusher(pool))
server.start()

gone = threading.Event()

def client():
    s = socket.create_connection(server.address, timeout=5)
    s.sendall(b"go")
    s.close()                                       # a FIN: nothing unread
    time.sleep(0.02)
    gone.set()

lp.queue_in_loop(lambda: gone.wait(5))              # the server reads "go" only then
t = threading.Thread(target=client)
t.start()
lp.run_after(10, lp.quit)
lp.loop()
t.join()
pool.stop()
lp.close()
epipe = any("Broken pipe" in m for m in faults)     # a send really failed with EPIPE
print("alive", server.handler.closed, lp.dropped_sends > 0, epipe, flush=True)
"""


@pytest.mark.parametrize("nthreads", POOL_SIZES, ids=POOL_IDS)
def test_sigpipe_default_disposition_does_not_kill_the_process(nthreads: int) -> None:
    proc = run_child(_SIGPIPE_CHILD, str(nthreads))
    assert proc.returncode == 0, "rc %d (-13 is SIGPIPE): %s" % (proc.returncode, proc.stderr)
    assert proc.stderr == ""
    assert proc.stdout == "alive 1 True True\n"


# -- E5: graceful stop with 100 clients and tasks in flight -----------------------------------


class Gated(ICppnpUsr, IRun2):
    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool
        self.gate = threading.Event()
        self.closed = 0
        self.conns: list[TcpConnection] = []

    def on_connection(self, conn: TcpConnection) -> None:
        self.conns.append(conn)

    def on_message(self, conn: TcpConnection, buf: Buffer) -> None:
        self.pool.add_task(Task(self, buf.retrieve_all(), conn))

    def run2(self, msg: bytes, conn: TcpConnection) -> None:
        if msg == b"slow":
            self.gate.wait(TIMEOUT)
        conn.send(msg)

    def on_close(self, conn: TcpConnection) -> None:
        self.closed += 1


@pytest.mark.parametrize("nthreads", POOL_SIZES, ids=POOL_IDS)
def test_graceful_stop_with_100_clients_and_tasks_in_flight(
    serve: Serve, ledger: Any, nthreads: int
) -> None:
    pool = ledger.pool(nthreads)
    h = Gated(pool)
    st = ledger.server(serve(h))
    assert st.server is not None
    clients = [st.connect() for _ in range(100)]
    try:
        for c in clients:
            c.sendall(b"ping")
        for c in clients:
            assert recv_exact(c, 4) == b"ping"
        in_flight = 50 if nthreads else 0  # a blocked inline task would block
        for c in clients[:in_flight]:  # the loop thread itself
            c.sendall(b"slow")
        wait_for(lambda: sum(c.pending_tasks for c in h.conns) == in_flight, TIMEOUT)
        # Every worker holds a slow task (a loop wakes the second and later workers once
        # the queue stalls for 1 ms), so the tasks still queued stay queued: their
        # connections are held until the gate opens.
        wait_for(lambda: pool.running == min(nthreads, in_flight), TIMEOUT)
        call_in_loop(st.loop, st.server.stop)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(st.address, timeout=TIMEOUT).close()
        for c in clients[in_flight:]:
            assert recv_until_eof(c) == b""
        wait_for(lambda: st.connection_count() == in_flight, TIMEOUT)  # held by tasks
        assert all(not c.connected for c in h.conns)
        h.gate.set()
        wait_for(lambda: st.connection_count() == 0, TIMEOUT)
        for c in clients[:in_flight]:
            assert recv_until_eof(c) == b""  # the late replies were dropped
    finally:
        h.gate.set()
        for c in clients:
            c.close()
    assert h.closed == 100
    # The tasks already running finish and their replies are dropped and counted; the
    # ones still queued for the force-closed connections are discarded (pool.cancelled).
    assert pool.cancelled >= in_flight - nthreads
    assert sum(c.dropped_sends for c in h.conns) == in_flight - pool.cancelled
    assert st.stats()["dropped_sends"] == in_flight - pool.cancelled
    h.conns.clear()


# -- E6: fork ---------------------------------------------------------------------------------

_FORK_CHILD = r"""
import os, socket, subprocess, sys, threading, time, warnings
from cppnp import EventLoop, EventLoopThread, ICppnpUsr, TcpServer, ThreadPool

# Forking a multi-threaded process is the point of this test (3.12+ warns about it).
warnings.filterwarnings("ignore", "This process .* is multi-threaded", DeprecationWarning)

from handlers import Echo, serve_in_thread

def echo(address, msg=b"ping"):
    with socket.create_connection(address, timeout=5) as s:
        s.sendall(msg)
        return s.recv(len(msg)) == msg

def child_serves_one(wfd):
    # In the child: a new loop and server of its own, one request, then _exit.
    ok = 1
    try:
        lp = EventLoop()
        srv = TcpServer(lp, ("127.0.0.1", 0), Echo())
        srv.start()
        os.write(wfd, b"%d\n" % srv.address[1])
        for _ in range(500):
            lp.run_once(0.01)
            if srv.accepted and srv.connection_count == 0:
                break
        ok = 0 if srv.accepted == 1 else 3
        lp.close()
    except BaseException as exc:
        os.write(2, repr(exc).encode())
        ok = 2
    os._exit(ok)

lt, lp, server = serve_in_thread(Echo())
pool = ThreadPool(5)                   # 4 posters + 1 free worker
pool.start()
stop = threading.Event()
def poster():
    while not stop.is_set():
        lp.queue_in_loop(lambda: None)
for _ in range(4):
    pool.add_task(poster)

# (a) fork from the main thread while the loop thread and the posting workers run.
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(r)
    child_serves_one(w)
os.close(w)
port = int(os.read(r, 100).decode())
os.close(r)
assert echo(("127.0.0.1", port)), "child server"
assert os.waitpid(pid, 0)[1] == 0, "child failed"
assert echo(server.address), "parent server after fork"

# (b) fork from a worker thread.
res = {}
def forker():
    pid = os.fork()
    if pid == 0:
        try:
            lp2 = EventLoop()
            lp2.run_once(0)
            lp2.close()
            os._exit(0)
        except BaseException:
            os._exit(1)
    res["status"] = os.waitpid(pid, 0)[1]
pool.add_task(forker)
t0 = time.monotonic()
while "status" not in res and time.monotonic() - t0 < 10:
    time.sleep(0.01)
assert res.get("status") == 0, res

# (c) fork + exec in a tight loop while the workers post to the queue.
for _ in range(10):
    subprocess.run(["/bin/true"], check=True, timeout=10)
assert echo(server.address), "parent server after fork+exec"

stop.set()
pool.stop()
lp.queue_in_loop(server.stop)
lt.stop()
print("ok", flush=True)
"""


def test_fork_child_runs_its_own_loop_and_the_parent_is_unaffected() -> None:
    proc = run_child(_FORK_CHILD, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout == "ok\n"


_FORK_CLOSE_CHILD = r"""
import os, socket, threading
from cppnp import EventLoop, ICppnpUsr, TcpServer

from handlers import Echo

lp = EventLoop()                       # owned by the main thread, idle at fork time
server = TcpServer(lp, ("127.0.0.1", 0), Echo())
server.start()
lp.run_once(0)
pid = os.fork()
if pid == 0:
    # The child must not touch the parent's epoll instance (shared across fork): it
    # drops the inherited loop and makes its own.
    try:
        lp.close()
        lp2 = EventLoop()
        lp2.close()
        os._exit(0)
    except BaseException:
        os._exit(1)
status = os.waitpid(pid, 0)[1]
result = {}

def client():
    try:
        with socket.create_connection(server.address, timeout=5) as s:
            s.settimeout(1)
            s.sendall(b"ping")
            result["echo"] = s.recv(4)
    except OSError as exc:
        result["echo"] = repr(exc)
    lp.queue_in_loop(lp.quit)

t = threading.Thread(target=client)
t.start()
lp.run_after(10, lp.quit)
lp.loop()
t.join()
lp.close()
print(status, result["echo"], flush=True)
"""


def test_child_closing_the_inherited_loop_does_not_break_the_parent() -> None:
    """The epoll instance is shared by parent and child after fork: a child that closes
    its copy of the loop must not EPOLL_CTL_DEL the parent's registrations (libuv
    uv_loop_fork docs; uvloop #39)."""
    proc = run_child(_FORK_CLOSE_CHILD, timeout=30)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout == "0 b'ping'\n", "the parent's server stopped serving"
