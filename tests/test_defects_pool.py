"""Regression tests for the worker-pool defects of issue 8 (items 2, 3, 4, 5, 6, 8, 10, 11,
15, 19) and the pool part of issue 9 (thread contracts in docstrings).

Each ``test_dNN_*`` is named after the item of issue 8 it covers and failed on the code
before the fix.  Crashes and deadlocks of the old code are provoked in a child process, so
they fail the test instead of the session.  The races (items 3, 4, 5, 19) are meant to be
run on a free-threaded 3.13t with ``PYTHON_GIL=0`` as well, and repeated.
"""

from __future__ import annotations

import inspect
import os
import socket
import subprocess
import textwrap
import threading
import time
from typing import Any

import pytest

import faults_support
from conftest import call_in_loop, recv_exact, rst_close, wait_for
from cppnp import (
    EventLoop,
    EventLoopThread,
    ICppnpUsr,
    IRun2,
    Task,
    TcpConnection,
    TcpServer,
    ThreadPool,
)

TIMEOUT = 20.0
# Iterations of the race loops: about 10% of them lost a task on the old code (3.13t).
RACE_ITERATIONS = int(os.environ.get("CPPNP_RACE_ITERATIONS", "150"))


def run_child(code: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """*code* (dedented) in a fresh interpreter; a hang (deadlock?) fails after *timeout*."""
    return faults_support.run_child(textwrap.dedent(code), timeout=timeout)


def assert_child_ok(proc: subprocess.CompletedProcess[str], expected_stdout: str) -> None:
    assert proc.returncode == 0, "child exit %d\nstdout: %s\nstderr: %s" % (
        proc.returncode,
        proc.stdout[-2000:],
        proc.stderr[-3000:],
    )
    assert proc.stderr == ""
    assert proc.stdout == expected_stdout


class Keeper(ICppnpUsr, IRun2):
    """Keeps its connections; records what run2 saw; echoes unless told otherwise."""

    def __init__(self, pool: ThreadPool | None = None) -> None:
        self.pool = pool
        self.lock = threading.Lock()
        self.conns: list[TcpConnection] = []
        self.ran: list[bytes] = []
        self.closed = 0

    def on_connection(self, conn: TcpConnection) -> None:
        with self.lock:
            self.conns.append(conn)

    def run2(self, msg: bytes, conn: TcpConnection) -> None:
        with self.lock:
            self.ran.append(msg)
        conn.send(msg)

    def on_close(self, conn: TcpConnection) -> None:
        with self.lock:
            self.closed += 1


def server_conn(h: Keeper, index: int = 0) -> TcpConnection:
    wait_for(lambda: len(h.conns) > index, TIMEOUT)
    return h.conns[index]


# -- 2: re-initialising a started or used ThreadPool ------------------------------------------


def test_d02_reinit_of_a_started_or_used_pool_raises() -> None:
    """``__init__`` again on a started pool shrank ``_per_worker`` under running workers:
    heap-buffer-overflow in ``_run_job``.  Now any second ``__init__`` raises."""
    proc = run_child("""
        from cppnp import ThreadPool
        p = ThreadPool(8)
        p.start()
        try:
            p.__init__(0)
        except RuntimeError:
            print("started: RuntimeError")
        else:
            print("started: re-initialised")
        ran = []
        for i in range(5000):
            p.add_task(ran.append, i)
        assert p.stop(timeout=60)
        print("ran", len(ran), sum(p.stats()["per_worker"].values()), p.num_threads)
        q = ThreadPool(0)                     # used: a task ran in the caller
        q.add_task(ran.append, -1)
        try:
            q.__init__(4)
        except RuntimeError:
            print("used: RuntimeError")
        fresh = ThreadPool(2)                 # never started: also refused (one __init__)
        try:
            fresh.__init__(3)
        except RuntimeError:
            print("fresh: RuntimeError", fresh.num_threads)
        late = ThreadPool.__new__(ThreadPool)
        late.__init__(3)                      # the first __init__ of a bare object is fine
        print("late", late.num_threads)
        """)
    assert_child_ok(
        proc,
        "started: RuntimeError\nran 5000 5000 8\nused: RuntimeError\n"
        "fresh: RuntimeError 2\nlate 3\n",
    )


# -- 3: add_task racing stop() ----------------------------------------------------------------


def race_add_task_with_stop(
    h: Keeper, conn: TcpConnection, kind: str, drain: bool
) -> tuple[int, ...]:
    """One add_task racing one stop(); returns (ran, raised, discarded, queued,
    conn.pending_tasks, strands) for the raced task."""
    pool = ThreadPool(2, name="race")
    pool.start()
    gate = threading.Event()
    gate_ran: list[int] = []
    ran: list[int] = []
    raised: list[int] = []
    barrier = threading.Barrier(2, timeout=TIMEOUT)

    def gate_task() -> None:
        gate_ran.append(1)
        gate.wait(TIMEOUT)

    def adder() -> None:
        barrier.wait()
        try:
            if kind == "conn":
                pool.add_task(Task(h, b"", conn))
            else:
                pool.add_task(ran.append, 1, key="k" if kind == "strand" else None)
        except RuntimeError:
            raised.append(1)

    if kind == "strand":  # a strand with a task queued or running:
        pool.add_task(gate_task, key="k")  # the raced task joins its backlog
    t = threading.Thread(target=adder, name="adder")
    t.start()
    barrier.wait()
    if kind == "strand":
        gate.set()
    assert pool.stop(drain=drain, timeout=TIMEOUT)
    t.join(TIMEOUT)
    if kind == "conn":
        with h.lock:
            ran = [1] * len(h.ran)
            h.ran.clear()
    discarded = pool.discarded
    if kind == "strand":
        discarded -= 1 - len(gate_ran)  # the gate task may be discarded too
    return (
        len(ran),
        len(raised),
        discarded,
        pool.queued,
        conn.pending_tasks,
        pool.stats()["strands"],
    )


@pytest.mark.parametrize("drain", [True, False], ids=["drain", "discard"])
@pytest.mark.parametrize("kind", ["plain", "strand", "conn"])
def test_d03_add_task_racing_stop_never_loses_a_task(serve: Any, drain: bool, kind: str) -> None:
    """Either the task runs, or add_task raises, or it is counted as discarded (and its
    connection's count released): the old pool lost ~10% of them on 3.13t."""
    h = Keeper()
    st = serve(h)
    client = st.connect()
    conn = server_conn(h)
    bad: list[tuple[int, ...]] = []
    for i in range(RACE_ITERATIONS):
        outcome = race_add_task_with_stop(h, conn, kind, drain)
        if sorted(outcome[:3]) != [0, 0, 1] or outcome[3:] != (0, 0, 0):
            bad.append((i, *outcome))
    client.close()
    wait_for(lambda: h.closed == 1, TIMEOUT)
    h.conns.clear()
    assert bad == [], "(iteration, ran, raised, discarded, queued, pending_tasks, strands)"


class SlowHashKey:
    """A key whose first __hash__ waits until the test says go (stop() has returned)."""

    def __init__(self) -> None:
        self.hashing = threading.Event()
        self.go = threading.Event()

    def __hash__(self) -> int:
        if not self.hashing.is_set():
            self.hashing.set()
            self.go.wait(TIMEOUT)
        return 1234


@pytest.mark.parametrize("drain", [True, False], ids=["drain", "discard"])
@pytest.mark.parametrize("nthreads", [0, 2], ids=["single", "pool2"])
def test_d03_add_task_overtaken_by_stop_raises_and_releases_the_connection(
    serve: Any, drain: bool, nthreads: int
) -> None:
    """The deterministic form of the race: add_task is inside the key's __hash__ (user
    code) while stop() runs to the end.  The old pool had already checked ``_stopping``
    and counted the task: it went into a closed queue nobody reads (``queued`` stayed 1,
    the connection's ``pending_tasks`` 1, on_close never ran)."""
    h = Keeper()
    st = serve(h)
    client = st.connect()
    conn = server_conn(h)
    pool = ThreadPool(nthreads)
    pool.start()
    key = SlowHashKey()
    box: dict[str, Any] = {}

    def adder() -> None:
        try:
            pool.add_task(Task(h, b"late", conn), key=key)
        except RuntimeError as exc:
            box["raised"] = exc

    t = threading.Thread(target=adder, name="adder")
    t.start()
    assert key.hashing.wait(TIMEOUT)
    assert pool.stop(drain=drain, timeout=TIMEOUT)
    key.go.set()
    t.join(TIMEOUT)
    assert "raised" in box
    assert (pool.queued, pool.completed, pool.discarded, conn.pending_tasks) == (0, 0, 0, 0)
    assert h.ran == []
    client.close()
    wait_for(lambda: h.closed == 1, TIMEOUT)  # the connection is released
    h.conns.clear()


# -- 4: fields shared between threads rest on atomics or the core lock -------------------------


def test_d04_counters_stay_exact_under_concurrent_callers() -> None:
    """ThreadPool(0) runs each task in its caller: four threads bump the same per-worker
    slot at once (a plain ``+=`` lost counts with the GIL off)."""
    pool = ThreadPool(0)
    per_thread = 20000
    barrier = threading.Barrier(4, timeout=TIMEOUT)

    def noop() -> None:
        pass

    def caller() -> None:
        barrier.wait()
        for _ in range(per_thread):
            pool.add_task(noop)

    threads = [threading.Thread(target=caller) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    stats = pool.stats()
    assert (stats["completed"], stats["per_worker"]["caller"]) == (4 * per_thread, 4 * per_thread)
    assert (stats["queued"], stats["running"], stats["strands"]) == (0, 0, 0)
    pool.stop()


def books_round(drain: bool) -> None:
    pool = ThreadPool(3, name="books")
    added = [0]
    refused = [0]
    lock = threading.Lock()
    done: list[int] = []
    barrier = threading.Barrier(5, timeout=TIMEOUT)

    def adder(n: int) -> None:
        barrier.wait()
        for j in range(200):
            try:
                pool.add_task(done.append, j, key=None if j % 2 else ("k", n, j % 4))
            except RuntimeError:
                with lock:
                    refused[0] += 1
            else:
                with lock:
                    added[0] += 1

    def starter() -> None:
        barrier.wait()
        try:
            pool.start()
        except RuntimeError:
            pass  # stop() came first: refused
        pool.stats()

    threads = [threading.Thread(target=adder, args=(n,)) for n in range(3)]
    threads.append(threading.Thread(target=starter))
    for t in threads:
        t.start()
    barrier.wait()
    assert pool.stop(drain=drain, timeout=TIMEOUT)
    for t in threads:
        t.join(TIMEOUT)
    assert added[0] + refused[0] == 600
    assert pool.completed + pool.discarded == added[0] == len(done) + pool.discarded
    assert (pool.queued, pool.running, pool.stats()["strands"]) == (0, 0, 0)


def test_d04_start_stop_add_task_from_many_threads_keep_the_books() -> None:
    """start(), stop(), add_task() and stats() from several threads at once: every task
    is run, refused or discarded, and the counters add up."""
    for round_ in range(20):
        books_round(drain=bool(round_ % 2))


def test_d04_stop_racing_start_never_joins_an_unstarted_thread() -> None:
    """start() appended its workers to the pool's list under the lock but started them
    after releasing it: a concurrent stop() could join a thread not started yet
    (RuntimeError "cannot join thread before it is started", 40 of 300 on 3.13t)."""
    errors: list[str] = []
    for i in range(300):
        pool = ThreadPool(8, name="startstop")
        barrier = threading.Barrier(2, timeout=TIMEOUT)

        def starter(pool: ThreadPool = pool, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            try:
                pool.start()
            except RuntimeError:
                pass  # stop() came first: refused

        t = threading.Thread(target=starter)
        t.start()
        barrier.wait()
        spin_until = time.perf_counter() + (i % 20) * 1e-5  # vary who comes first
        while time.perf_counter() < spin_until:
            pass
        try:
            assert pool.stop(timeout=TIMEOUT)
        except RuntimeError as exc:
            errors.append(str(exc))
        t.join(TIMEOUT)
        for w in pool.threads:
            w.join(TIMEOUT)
    assert errors == []


# -- 5: user code re-entering add_task while the pool holds its lock ----------------------------

REENTRY_CHILD = """
    import gc, sys, threading
    from cppnp import ThreadPool
    NTHREADS, WHAT = {nthreads}, "{what}"
    pool = ThreadPool(NTHREADS)
    pool.start()
    lock = threading.RLock()     # a finalizer may run (and add a task) inside note()
    ran = []

    def note(x):
        with lock:
            ran.append(x)

    class Key:
        # Equal by name; its __hash__ / __eq__ add a task of their own (once) if asked to.
        def __init__(self, name, on_hash=False, on_eq=False):
            self.name, self.on_hash, self.on_eq = name, on_hash, on_eq

        def __hash__(self):
            if self.on_hash:
                self.on_hash = False
                pool.add_task(note, "hash", key=("inner", "hash"))
            return hash(self.name)

        def __eq__(self, other):
            if self.on_eq:
                self.on_eq = False
                pool.add_task(note, "eq", key=("inner", "eq"))
            return isinstance(other, Key) and other.name == self.name

    class Bomb:
        # Garbage in a cycle whose finalizer adds a keyed task (run by any GC pass).
        def __init__(self, i):
            self.i, self.me = i, self

        def __del__(self):
            pool.add_task(note, "del", key=("del", self.i))

    def in_thread(fn):
        t = threading.Thread(target=fn)
        t.start()
        return t

    expected = 0
    if WHAT == "hash":      # the key's __hash__ re-enters
        pool.add_task(note, "outer", key=Key("a", on_hash=True)); expected += 2
    elif WHAT == "eq":      # the stored key's __eq__ re-enters, while its strand is active
        gate, started = threading.Event(), threading.Event()

        def blocker():
            started.set()
            gate.wait(60)

        first = Key("b", on_eq=True)
        runner = None
        if NTHREADS:
            pool.add_task(blocker, key=first)
        else:   # single-thread mode: the strand is active while another caller runs it
            runner = in_thread(lambda: pool.add_task(blocker, key=first))
        started.wait(60)
        pool.add_task(note, "second", key=Key("b")); expected += 2
        gate.set()
        if runner is not None:
            runner.join(60)
    else:                   # a finalizer re-enters during an allocation (3.11 runs the GC there)
        gc.set_threshold(1, 1, 1)
        for i in range(3000):
            Bomb(i)
            pool.add_task(note, i, key=("k", i % 7)); expected += 1
        gc.set_threshold(700, 10, 10)
        gc.collect()
    assert pool.stop(timeout=60)
    dels = ran.count("del")
    print(len(ran) - dels == expected, dels > 0, pool.queued, pool.stats()["strands"])
    print(sorted(x for x in ran if isinstance(x, str) and x != "del"))
"""


@pytest.mark.parametrize("what", ["hash", "eq", "del"])
@pytest.mark.parametrize("nthreads", [0, 2], ids=["single", "pool2"])
def test_d05_key_hash_eq_and_finalizers_may_reenter_add_task(nthreads: int, what: str) -> None:
    """A key's ``__hash__``/``__eq__`` or a finalizer run by the GC calls add_task: the old
    pool held its non-reentrant mutex around them and deadlocked."""
    proc = run_child(REENTRY_CHILD.format(nthreads=nthreads, what=what), timeout=60)
    expected = {
        "hash": "True False 0 0\n['hash', 'outer']\n",
        "eq": "True False 0 0\n['eq', 'second']\n",
        "del": "True True 0 0\n[]\n",
    }[what]
    assert_child_ok(proc, expected)


# -- 6: KeyboardInterrupt from an inline task must not wedge its strand ------------------------


class Interrupting(Keeper):
    def on_message(self, conn: TcpConnection, buf: Any) -> None:
        while (i := buf.find_eol()) >= 0:
            assert self.pool is not None
            self.pool.add_task(Task(self, buf.retrieve_as_bytes(i + 1), conn))

    def run2(self, msg: bytes, conn: TcpConnection) -> None:
        if msg == b"interrupt\n":
            raise KeyboardInterrupt
        super().run2(msg, conn)


def test_d06_interrupt_in_an_inline_task_then_resume_keeps_serving_the_connection() -> None:
    pool = ThreadPool(0)
    h = Interrupting(pool)
    box: dict[str, Any] = {"interrupts": 0}
    ready = threading.Event()

    def main() -> None:
        loop = EventLoop()
        server = TcpServer(loop, ("127.0.0.1", 0), h)
        server.start()
        box["loop"], box["address"] = loop, server.address
        ready.set()
        try:
            for _ in range(5):  # resume after each Ctrl-C
                try:
                    loop.loop()
                    break
                except KeyboardInterrupt:
                    box["interrupts"] += 1
        finally:
            server.stop()
            loop.close()

    thread = threading.Thread(target=main, name="loop-6")
    thread.start()
    assert ready.wait(TIMEOUT)
    try:
        with socket.create_connection(box["address"], timeout=TIMEOUT) as s:
            s.sendall(b"one\n")
            assert recv_exact(s, 4) == b"one\n"
            s.sendall(b"interrupt\n")
            wait_for(lambda: box["interrupts"] == 1, TIMEOUT)
            s.sendall(b"two\n")  # the same connection, after the resume
            assert recv_exact(s, 4) == b"two\n"
            conn = h.conns[0]
            # The inline task's reply is written before the task returns (and its count
            # drops): wait for the loop thread to finish it.
            wait_for(lambda: conn.pending_tasks == 0 and pool.stats()["strands"] == 0, TIMEOUT)
        wait_for(lambda: h.closed == 1, TIMEOUT)
    finally:
        box["loop"].quit()
        thread.join(TIMEOUT)
    assert box["interrupts"] == 1 and h.ran == [b"one\n", b"two\n"]
    assert (pool.completed, pool.failed, pool.queued) == (3, 1, 0)
    h.conns.clear()


# -- 8: an unhashable key must not leak the connection -----------------------------------------


@pytest.mark.parametrize("nthreads", [0, 4], ids=["single", "pool4"])
def test_d08_unhashable_key_raises_before_counting(serve: Any, nthreads: int) -> None:
    pool = ThreadPool(nthreads)
    pool.start()
    h = Keeper(pool)
    st = serve(h)
    s = st.connect()
    conn = server_conn(h)
    msg = b"m"
    with pytest.raises(TypeError):
        pool.add_task(Task(h, msg, conn), key=[msg])
    with pytest.raises(TypeError):
        pool.add_task(h.run2, msg, conn, key={})
    assert (conn.pending_tasks, pool.queued, pool.running, pool.stats()["strands"]) == (0, 0, 0, 0)
    pool.add_task(Task(h, b"ok", conn))  # the connection still works
    assert recv_exact(s, 2) == b"ok"
    s.close()
    wait_for(lambda: h.closed == 1, TIMEOUT)  # ... and is released
    assert pool.stop(timeout=TIMEOUT)
    assert (pool.queued, pool.completed, pool.failed) == (0, 1, 0)
    h.conns.clear()


# -- 10: no head-of-line blocking behind a slow task --------------------------------------------


def test_d10_idle_workers_take_tasks_queued_behind_a_slow_one() -> None:
    """One slow task (blocked on a gate) and 15 fast ones, all queued by the loop thread
    before any worker wakes: the fast ones all finish while the slow one still blocks
    (the old queue handed a worker a batch of 4 and it ran them one after the other)."""
    pool = ThreadPool(4, name="hol")
    pool.start()
    gate = threading.Event()
    fast_done: list[int] = []
    lock = threading.Lock()

    def fast(i: int) -> None:
        with lock:
            fast_done.append(i)

    with EventLoopThread() as loop:

        def queue_all() -> None:  # on the loop thread: one deferred wakeup
            pool.add_task(gate.wait, 3 * TIMEOUT)  # outlasts wait_for below
            for i in range(15):
                pool.add_task(fast, i)

        try:
            for _ in range(3):  # a few rounds, each from idle workers
                gate.clear()
                fast_done.clear()
                wait_for(lambda: pool.running == 0 and pool.queued == 0, TIMEOUT)
                call_in_loop(loop, queue_all)
                wait_for(lambda: len(fast_done) == 15, TIMEOUT)
                # The worker that took the slow task may still be waiting for the GIL
                # (it counts as queued until it starts): wait for it to be running.
                wait_for(lambda: pool.running == 1, TIMEOUT)
                assert not gate.is_set() and len(fast_done) == 15
                gate.set()
        finally:
            gate.set()
            assert pool.stop(timeout=TIMEOUT)
    assert (pool.completed, pool.failed) == (48, 0)


# -- 11: deep Task(Task(...)) chains ---------------------------------------------------------------


def test_d11_dropping_a_million_deep_task_chain_does_not_crash() -> None:
    proc = run_child("""
        from cppnp import Task
        t = Task(lambda: "inner")
        for _ in range(1000000):
            t = Task(t)
        print(t.do_task(), t() == "inner")
        del t
        print("dropped")
        """)
    assert_child_ok(proc, "inner True\ndropped\n")


# -- 15: a callable plus a connection is ordered by that connection -----------------------------


class LineReplier(Keeper):
    """Each line becomes ``pool.add_task(self.reply, line, conn)`` -- no key given."""

    def __init__(self, pool: ThreadPool, key: Any = None) -> None:
        super().__init__(pool)
        self.key = key
        self.active = 0
        self.overlapped = 0
        self.first_started = threading.Event()
        self.second_started = threading.Event()

    def on_message(self, conn: TcpConnection, buf: Any) -> None:
        assert self.pool is not None
        while (i := buf.find_eol()) >= 0:
            if self.key is None:
                self.pool.add_task(self.reply, buf.retrieve_as_bytes(i + 1), conn)
            else:
                self.pool.add_task(self.reply, buf.retrieve_as_bytes(i + 1), conn, key=self.key)

    def reply(self, line: bytes, conn: TcpConnection) -> None:
        with self.lock:
            self.active += 1
            if self.active > 1:
                self.overlapped += 1
        if line == b"first\n":
            self.first_started.set()
            # Give a second task of this connection the chance to start meanwhile (it
            # must not, unless the user opted out of ordering with key=False).
            self.second_started.wait(0.5 if self.key is None else TIMEOUT)
        elif line == b"second\n":
            self.second_started.set()
        else:
            n = int(line.split(b" ")[1])
            if n % 7 == 0:
                threading.Event().wait(0.001)  # an uneven amount of work
        conn.send(line)
        with self.lock:
            self.active -= 1


def test_d15_callable_with_a_connection_argument_keeps_reply_order(serve: Any) -> None:
    pool = ThreadPool(4)
    pool.start()
    h = LineReplier(pool)
    st = serve(h)
    with st.connect() as s:
        s.sendall(b"first\nsecond\n")
        assert recv_exact(s, 13) == b"first\nsecond\n"
        conn = server_conn(h)
        lines = [b"line %d\n" % n for n in range(300)]
        s.sendall(b"".join(lines))
        assert recv_exact(s, sum(map(len, lines))) == b"".join(lines)
        assert h.overlapped == 0
        assert conn.pending_tasks == 0
    wait_for(lambda: h.closed == 1, TIMEOUT)
    assert pool.stop(timeout=TIMEOUT)
    h.conns.clear()


def test_d15_key_false_opts_out_of_ordering_but_still_counts(serve: Any) -> None:
    pool = ThreadPool(4)
    pool.start()
    h = LineReplier(pool, key=False)
    st = serve(h)
    with st.connect() as s:
        s.sendall(b"first\n")
        assert h.first_started.wait(TIMEOUT)
        conn = server_conn(h)
        assert conn.pending_tasks == 1  # counted on the connection
        s.sendall(b"second\n")  # runs beside the first one
        assert recv_exact(s, 13) == b"second\nfirst\n"
        assert h.overlapped == 1
    wait_for(lambda: h.closed == 1, TIMEOUT)
    assert pool.stop(timeout=TIMEOUT)
    assert pool.stats()["strands"] == 0
    h.conns.clear()


# -- 19: queued work of a reset or force-closed connection is discarded ------------------------


class Storm(Keeper):
    """Each message becomes the seed's ``Task(self, msg, conn)``; b"block" waits on the
    gate; messages starting with b"keep" are added with ``run_if_closed=True``."""

    def __init__(self, pool: ThreadPool, gate: threading.Event) -> None:
        super().__init__(pool)
        self.gate = gate

    def on_message(self, conn: TcpConnection, buf: Any) -> None:
        assert self.pool is not None
        data = buf.retrieve_all()
        if data.startswith(b"keep"):
            self.pool.add_task(Task(self, data, conn), run_if_closed=True)
        else:
            self.pool.add_task(Task(self, data, conn))

    def run2(self, msg: bytes, conn: TcpConnection) -> None:
        if msg == b"block":
            self.gate.wait(TIMEOUT)
        super().run2(msg, conn)


def block_all_workers(st: Any, pool: ThreadPool, n: int) -> list[socket.socket]:
    """n clients each send b"block": every worker waits on the gate."""
    blockers = []
    for _ in range(n):
        b = st.connect()
        b.sendall(b"block")
        blockers.append(b)
    wait_for(lambda: pool.running == n, TIMEOUT)
    return blockers


@pytest.mark.parametrize("nthreads", [1, 3], ids=["pool1", "pool3"])
def test_d19_work_of_reset_or_force_closed_connections_is_discarded(
    serve: Any, nthreads: int
) -> None:
    """While every worker is blocked, 12 clients send a request and reset, one connection
    is force-closed by the server and one peer half-closes (FIN).  Once the workers are
    free, only the blockers and the half-closed peer's request run; the other 13 tasks are
    discarded before they run, counted, and their connections released."""
    gate = threading.Event()
    pool = ThreadPool(nthreads)
    pool.start()
    h = Storm(pool, gate)
    st = serve(h)
    try:
        blockers = block_all_workers(st, pool, nthreads)
        resets = [st.connect() for _ in range(12)]
        fin = st.connect()
        forced = st.connect()
        for s in resets:
            s.sendall(b"reset-me")
        fin.sendall(b"fin-me")
        forced.sendall(b"forced")
        total = nthreads + 14
        wait_for(lambda: pool.queued == 14 and len(h.conns) == total, TIMEOUT)
        by_port = {c.peer_address[1]: c for c in h.conns}
        dead = [by_port[s.getsockname()[1]] for s in [*resets, forced]]
        fin_conn = by_port[fin.getsockname()[1]]
        fin.shutdown(socket.SHUT_WR)
        for s in resets:
            rst_close(s)
        dead[-1].force_close()
        wait_for(lambda: not any(c.connected for c in dead) and fin_conn.peer_closed, TIMEOUT)
        assert pool.queued == 14
        gate.set()
        for b in blockers:
            assert recv_exact(b, 5) == b"block"
            b.close()
        assert recv_exact(fin, 6) == b"fin-me"  # the half-closed peer got its reply
        assert fin.recv(1) == b""
        fin.close()
        forced.close()
        wait_for(lambda: h.closed == total, TIMEOUT)
    finally:
        gate.set()
        assert pool.stop(timeout=TIMEOUT)
    assert sorted(h.ran) == sorted([b"block"] * nthreads + [b"fin-me"])
    assert (pool.discarded, pool.cancelled, pool.completed) == (13, 13, nthreads + 1)
    assert pool.stats()["cancelled"] == 13
    assert all(c.pending_tasks == 0 for c in h.conns)
    h.conns.clear()


def test_d19_run_if_closed_opts_in(serve: Any) -> None:
    """A task added with run_if_closed=True runs although its peer reset first."""
    gate = threading.Event()
    pool = ThreadPool(1)
    pool.start()
    h = Storm(pool, gate)
    st = serve(h)
    try:
        blockers = block_all_workers(st, pool, 1)
        keep = st.connect()
        keep.sendall(b"keep-me")
        wait_for(lambda: pool.queued == 1, TIMEOUT)
        keep_conn = h.conns[-1]
        rst_close(keep)
        wait_for(lambda: not keep_conn.connected, TIMEOUT)
        gate.set()
        assert recv_exact(blockers[0], 5) == b"block"
        blockers[0].close()
        wait_for(lambda: h.closed == 2, TIMEOUT)
    finally:
        gate.set()
        assert pool.stop(timeout=TIMEOUT)
    assert sorted(h.ran) == [b"block", b"keep-me"]
    assert (pool.discarded, pool.cancelled, pool.completed) == (0, 0, 2)
    assert keep_conn.dropped_sends == 1  # its reply had nowhere to go
    h.conns.clear()


# -- issue 9 (pool part): every public method and property states its thread contract ----------


@pytest.mark.parametrize("cls", [Task, ThreadPool], ids=["Task", "ThreadPool"])
def test_issue9_pool_docstrings_end_with_the_thread_contract(cls: type) -> None:
    missing = []
    for name, member in vars(cls).items():
        if name.startswith("_") or name[0].isupper():  # private, or a seed alias
            continue
        doc = inspect.getdoc(member) or ""
        last = doc.strip().splitlines()[-1].strip() if doc.strip() else ""
        if not (
            last.endswith("Thread-safe.") or last.endswith("Loop thread only.")
        ) or last not in ("Thread-safe.", "Loop thread only."):
            missing.append(name)
    assert missing == []
