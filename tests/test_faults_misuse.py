"""Fault suite, checklist section G (bad input and API misuse) plus E7 (reentrancy) and A8
(send after close): loop-thread-only calls from other threads, a second loop and nested
runs from inside a callback, sends to closed connections, and objects used in invalid
states (created with ``__new__``, never initialised) -- always a Python exception, never
a crash.  G1 argument types, G3 and G4 (Buffer) are covered elsewhere (tests/README.md).
"""

from __future__ import annotations

import json
from typing import Any, Callable

import pytest

from conftest import ServerThread, call_in_loop, wait_for
from cppnp import Buffer, EventLoop, ICppnpUsr, IRun2, Task, TcpConnection, ThreadPool
from faults_support import (
    POOL_IDS,
    POOL_SIZES,
    TIMEOUT,
    recv_exact,
    run_child,
)

Serve = Callable[..., ServerThread]


class Keeper(ICppnpUsr):
    def __init__(self) -> None:
        self.conns: list[TcpConnection] = []
        self.closed = 0
        self.reentry: dict[str, str] = {}

    def on_connection(self, conn: TcpConnection) -> None:
        self.conns.append(conn)

    def on_message(self, conn: TcpConnection, buf: Buffer) -> None:
        data = buf.retrieve_all()
        if data == b"reenter":
            self._reenter(conn)
        conn.send(data)

    def _reenter(self, conn: TcpConnection) -> None:
        loop = conn.loop
        attempts: dict[str, Callable[[], Any]] = {
            "EventLoop()": EventLoop,
            "loop.loop()": loop.loop,
            "loop.run_once()": lambda: loop.run_once(0),
            "loop.close()": loop.close,
        }
        for name, call in attempts.items():
            try:
                call()
                self.reentry[name] = "no error"
            except RuntimeError:
                self.reentry[name] = "RuntimeError"
            except BaseException as exc:  # reported by the test
                self.reentry[name] = repr(exc)

    def on_close(self, conn: TcpConnection) -> None:
        self.closed += 1


# -- loop-thread-only calls from another thread -----------------------------------------------

# Documented "loop thread only" (README: such methods raise RuntimeError elsewhere).
# loop() and run_once() are checked in test_event_loop.py.
OTHER_THREAD_CALLS: dict[str, Callable[[ServerThread, Keeper], Any]] = {
    "TcpServer.connections": lambda st, h: st.server.connections(),  # type: ignore
    "TcpConnection.input_buffer": lambda st, h: h.conns[0].input_buffer,
}


@pytest.mark.parametrize("call", list(OTHER_THREAD_CALLS))
def test_loop_thread_only_call_from_another_thread_raises(
    serve: Serve, ledger: Any, call: str
) -> None:
    h = Keeper()
    st = ledger.server(serve(h))
    try:
        with st.connect() as s:
            wait_for(lambda: h.conns, TIMEOUT)
            call_in_loop(st.loop, lambda: OTHER_THREAD_CALLS[call](st, h))  # fine here
            with pytest.raises(RuntimeError):
                OTHER_THREAD_CALLS[call](st, h)
            s.sendall(b"ok")
            assert recv_exact(s, 2) == b"ok"
    finally:
        h.conns.clear()


# -- E7: reentrancy from inside a callback ----------------------------------------------------


def test_second_loop_nested_run_and_close_inside_a_callback_raise(
    serve: Serve, ledger: Any
) -> None:
    h = Keeper()
    st = ledger.server(serve(h))
    with st.connect() as s:
        s.sendall(b"reenter")
        assert recv_exact(s, 7) == b"reenter"  # the loop carried on
        s.sendall(b"again")
        assert recv_exact(s, 5) == b"again"
    assert h.reentry == {
        "EventLoop()": "RuntimeError",
        "loop.loop()": "RuntimeError",
        "loop.run_once()": "RuntimeError",
        "loop.close()": "RuntimeError",
    }
    assert not st.loop.closed and st.stats()["callback_errors"] == 0
    h.conns.clear()


# -- A8: sends after close are dropped and counted, never raised ------------------------------


class Replier(Keeper, IRun2):
    def __init__(self, pool: ThreadPool) -> None:
        super().__init__()
        self.pool = pool
        self.errors: list[BaseException] = []

    def run2(self, data: bytes, conn: TcpConnection) -> None:
        for _ in range(10):
            try:
                conn.send(data)
            except BaseException as exc:  # send() must never raise here
                self.errors.append(exc)


@pytest.mark.parametrize("nthreads", POOL_SIZES, ids=POOL_IDS)
def test_send_after_close_is_dropped_and_counted(serve: Serve, ledger: Any, nthreads: int) -> None:
    pool = ledger.pool(nthreads)
    h = Replier(pool)
    st = ledger.server(serve(h))
    with st.connect() as s:
        s.sendall(b"x")
        assert recv_exact(s, 1) == b"x"
    wait_for(lambda: h.closed == 1, TIMEOUT)
    conn = h.conns[0]
    before = st.stats()
    for _ in range(10):
        conn.send(b"late")  # this thread
    call_in_loop(st.loop, lambda: [conn.send(b"late") for _ in range(10)])
    pool.add_task(Task(h, b"late", conn))  # a worker, or inline here
    wait_for(lambda: call_in_loop(st.loop, lambda: conn.dropped_sends) == 30, TIMEOUT)
    after = st.stats()
    assert h.errors == []
    assert after["dropped_sends"] - before["dropped_sends"] == 30
    assert after["dropped_bytes"] - before["dropped_bytes"] == 30 * 4
    assert conn.output_bytes == 0 and conn.bytes_sent == 1
    assert conn.pending_tasks == 0
    assert ledger.records() == []  # counted, not logged per write
    h.conns.clear()


# -- G2: objects in invalid states (never initialised, or closed) -----------------------------

INVALID_STATE_CASES: dict[str, str] = {
    # A TcpConnection is made by a TcpServer only; __new__ gives one with no loop.
    "conn.send": "TcpConnection.__new__(TcpConnection).send(b'x')",
    "conn.force_close": "TcpConnection.__new__(TcpConnection).force_close()",
    "conn.shutdown": "TcpConnection.__new__(TcpConnection).shutdown()",
    "conn.stop_reading": "TcpConnection.__new__(TcpConnection).stop_reading()",
    "conn.start_reading": "TcpConnection.__new__(TcpConnection).start_reading()",
    "conn.set_tcp_no_delay": "TcpConnection.__new__(TcpConnection).set_tcp_no_delay(True)",
    "conn.set_keep_alive": "TcpConnection.__new__(TcpConnection).set_keep_alive(True)",
    "conn.attributes": "c = TcpConnection.__new__(TcpConnection); "
    "repr(c), c.name, c.peer_address, c.local_address, c.fileno, "
    "c.connected, c.closed, c.output_bytes, c.input_bytes",
    "server.start": "TcpServer.__new__(TcpServer).start()",
    "server.stop": "TcpServer.__new__(TcpServer).stop()",
    "server.attributes": "s = TcpServer.__new__(TcpServer); repr(s), s.address, "
    "s.connection_count, s.connections()",
    "server.on_uninitialised_loop": "TcpServer(EventLoop.__new__(EventLoop), "
    "('127.0.0.1', 0), ICppnpUsr()).start()",
    "loop.queue_in_loop": "EventLoop.__new__(EventLoop).queue_in_loop(print)",
    "loop.run_in_loop": "EventLoop.__new__(EventLoop).run_in_loop(print)",
    "loop.run_after": "EventLoop.__new__(EventLoop).run_after(1, print)",
    "loop.run_every": "EventLoop.__new__(EventLoop).run_every(1, print)",
    "loop.cancel_timer": "EventLoop.__new__(EventLoop).cancel_timer(1)",
    "loop.quit": "EventLoop.__new__(EventLoop).quit()",
    "loop.close": "EventLoop.__new__(EventLoop).close()",
    "loop.loop": "EventLoop.__new__(EventLoop).loop()",
    "loop.run_once": "EventLoop.__new__(EventLoop).run_once(0)",
    "loop.attributes": "lp = EventLoop.__new__(EventLoop); repr(lp), lp.stats(), "
    "lp.pending_functors, lp.timer_count, lp.is_in_loop_thread()",
    "pool.add_task": "ThreadPool.__new__(ThreadPool).add_task(print)",
    "pool.start_stop": "p = ThreadPool.__new__(ThreadPool); p.start(); p.stop()",
    "pool.attributes": "p = ThreadPool.__new__(ThreadPool); repr(p), p.stats(), p.queued",
    "task.do_task": "Task.__new__(Task).do_task()",
    "buffer.ops": "b = Buffer.__new__(Buffer); b.append(b'abc'); b.peek(); b.retrieve(1); "
    "b.retrieve_all(); b.shrink(); b.find_eol()",
    "closed_loop.server_start": "lp = EventLoop(); lp.close(); "
    "TcpServer(lp, ('127.0.0.1', 0), ICppnpUsr()).start()",
    "closed_loop.run_after": "lp = EventLoop(); lp.close(); lp.run_after(0, print)",
    "stopped_pool.add_task": "p = ThreadPool(2); p.start(); p.stop(); p.add_task(print)",
}

_HARNESS = r"""
import json, os, sys
from cppnp import Buffer, EventLoop, ICppnpUsr, Task, TcpConnection, TcpServer, ThreadPool

cases = json.loads(sys.stdin.read())
results = {}
for name, code in cases.items():
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            exec(code)
            out = "ok"
        except BaseException as exc:
            out = "exception " + type(exc).__name__
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    got = b""
    while True:
        chunk = os.read(r, 1000)
        if not chunk:
            break
        got += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        results[name] = "killed by signal %d" % os.WTERMSIG(status)
    else:
        results[name] = got.decode() or "exit %d" % os.WEXITSTATUS(status)
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def invalid_state_results() -> dict[str, str]:
    """Run every case once, each in a forked child of one fresh interpreter."""
    proc = run_child(_HARNESS, input=json.dumps(INVALID_STATE_CASES), timeout=60)
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


@pytest.mark.parametrize("case", list(INVALID_STATE_CASES))
def test_object_in_an_invalid_state_raises_instead_of_crashing(
    invalid_state_results: dict[str, str], case: str
) -> None:
    outcome = invalid_state_results[case]
    assert outcome.startswith(("ok", "exception")), "%s: %s (code: %s)" % (
        case,
        outcome,
        INVALID_STATE_CASES[case],
    )


def test_harness_reports_a_crash_as_a_crash() -> None:
    """The invalid-state harness itself can tell a crash from an exception."""
    proc = run_child(
        _HARNESS.replace(
            "cases = json.loads(sys.stdin.read())",
            "cases = {'crash': 'import ctypes; ctypes.string_at(0)', 'raise': 'raise ValueError'}",
        )
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    # Under ASan (make sanitize) the sanitizer's SEGV handler reports the crash and may end
    # the child with exit status 1 instead of a signal: either way it is not "ok" and not
    # "exception", which is what the invalid-state cases assert.
    assert got["crash"].startswith(("killed by signal", "exit ")), got["crash"]
    assert not got["crash"].startswith(("ok", "exception"))
    assert got["raise"] == "exception ValueError"
