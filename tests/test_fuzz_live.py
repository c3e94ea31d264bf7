"""Stateful fuzzing of a live server (RELIABILITY G2 against real sockets, A1/A2/A7/A10,
C (hand-off), D (timers)).

A hypothesis state machine drives one server (echo through a ThreadPool(4), or inline in
single-thread mode) with a random sequence of: connects, sends of random sizes split at
random points, partial reads, client half-close / close / reset, server-side shutdown,
force_close and stop/start_reading, one-shot and repeating timers (added from the loop
thread and from other threads, cancelled from both), pool tasks with and without strand
keys, and functors queued to the loop.  The server splits each message into random
chunks, one pool task per chunk, so a connection's replies are reordered unless the
strand rule holds.

The model says what must arrive: on a connection the server neither shut down nor
closed, the client reads back exactly what it sent; after a server shutdown or
force_close, a prefix of it, then EOF (and after a shutdown: exactly the bytes the
server counted as sent).  At the end of every example: each connection was released
once, after its last task; bytes_sent + dropped_bytes equals what its tasks sent; every
uncancelled one-shot timer fired once, every self-cancelling timer exactly its count,
no cancelled timer fired after its cancel was processed, and no timer is left; pool
tasks with the same key ran in order; loop functors ran in FIFO order; no callback or
task raised.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import socket
import struct
import threading
import time
from collections import Counter
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from conftest import ServerThread, call_in_loop, wait_for
from cppnp import ICppnpUsr, IRun2, Task, TcpConnection, ThreadPool

TIMEOUT = 15.0
MAX_PEERS = 5
MAX_SENT = 768 * 1024  # per connection
PAUSED_LIMIT = 48 * 1024  # what a client may send while the server does not read


def payload(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


class ChunkingEcho(ICppnpUsr, IRun2):
    """Echo; each message is cut into random chunks, one pool task per chunk (not
    handlers.Echo: the fuzz model needs the per-connection counts and the pool)."""

    def __init__(self, pool: ThreadPool, seed: int) -> None:
        self.pool = pool
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.by_port: dict[int, TcpConnection] = {}
        self.opened: Counter[int] = Counter()
        self.closes: Counter[int] = Counter()
        self.added: Counter[int] = Counter()
        self.ended: Counter[int] = Counter()
        self.reply_bytes: Counter[int] = Counter()
        self.close_info: dict[int, dict[str, int]] = {}
        self.order_errors: list[str] = []

    def on_connection(self, conn: TcpConnection) -> None:
        with self.lock:
            self.opened[conn.id] += 1
            self.by_port[conn.peer_address[1]] = conn

    def on_message(self, conn: TcpConnection, buf: Any) -> None:
        while buf:
            n = min(len(buf), self.rng.choice([1, 5, 100, 4096, len(buf), len(buf)]))
            chunk = buf.retrieve_as_bytes(n)
            with self.lock:
                self.added[conn.id] += 1
            self.pool.add_task(Task(self, chunk, conn))

    def run2(self, chunk: bytes, conn: TcpConnection) -> None:
        if self.pool.num_threads and chunk[0] % 16 == 0:
            time.sleep(0.0005)  # let other workers overtake, if they can
        conn.send(chunk)
        with self.lock:
            self.reply_bytes[conn.id] += len(chunk)
            self.ended[conn.id] += 1

    def on_close(self, conn: TcpConnection) -> None:
        with self.lock:
            self.closes[conn.id] += 1
            self.close_info[conn.id] = {
                "pending": conn.pending_tasks,
                "unfinished": self.added[conn.id] - self.ended[conn.id],
                "bytes_sent": conn.bytes_sent,
                "dropped_bytes": conn.dropped_bytes,
                "reply_bytes": self.reply_bytes[conn.id],
            }


class Peer:
    """One client socket and what it is owed."""

    def __init__(self, sock: socket.socket, conn: TcpConnection) -> None:
        self.sock = sock
        self.conn = conn
        self.sent = bytearray()
        self.got = bytearray()
        self.paused_sent = 0
        self.paused = False
        self.half = False  # client sent FIN
        self.drained = False  # ... and read until the server's EOF
        self.server = "open"  # or "shut" (server shutdown()) or "killed" (force_close)

    def recv_exactly(self, n: int) -> None:
        while n > 0:
            chunk = self.sock.recv(min(n, 1 << 20))
            assert chunk, "EOF with %d bytes still owed" % n
            self.got += chunk
            n -= len(chunk)

    def recv_to_eof(self, reset_ok: bool) -> None:
        try:
            while chunk := self.sock.recv(1 << 20):
                self.got += chunk
        except ConnectionResetError:
            assert reset_ok, "reset while the server owed us an orderly close"

    def check_prefix(self) -> None:
        assert len(self.got) <= len(self.sent), "more bytes back than sent"
        if self.got != self.sent[: len(self.got)]:
            at = next(i for i, (a, b) in enumerate(zip(self.got, self.sent)) if a != b)
            raise AssertionError(
                "echo differs from what was sent at byte %d of %d" % (at, len(self.got))
            )


# Operations, weighted by repetition.
PEER_OPS = (
    ["send"] * 8
    + ["recv"] * 5
    + [
        "half_close",
        "drain",
        "close",
        "reset",
        "pause",
        "resume",
        "server_shutdown",
        "server_force_close",
    ]
)
BACKGROUND_OPS = ["timer_once"] * 2 + ["timer_every", "timer_cancel", "pool_tasks", "functors"]
OPS = ["connect"] * 2 + PEER_OPS + BACKGROUND_OPS


class LiveMachine(RuleBasedStateMachine):
    threads = 4  # set by the test

    def __init__(self) -> None:
        super().__init__()
        self.pool = ThreadPool(self.threads, name="fuzz-worker")
        self.pool.start()
        self.h = ChunkingEcho(self.pool, seed=1)
        self.st = ServerThread(self.h)
        self.loop = self.st.loop
        self.peers: list[Peer] = []
        self.finished: list[Peer] = []
        # timers
        self.tlock = threading.Lock()
        self.fired: Counter[int] = Counter()
        self.once: dict[int, bool] = {}  # id -> cancelled
        self.every: dict[int, int] = {}  # id -> fires it must reach, then cancels
        self.frozen: dict[int, int] = {}  # cancelled id -> fires at cancel time
        # pool tasks and functors
        self.task_log: list[tuple[Any, int]] = []
        self.tasks_added: Counter[Any] = Counter()
        self.functor_log: list[int] = []
        self.functors = 0

    # -- helpers ---------------------------------------------------------------------------

    def retire(self, p: Peer) -> None:
        self.peers.remove(p)
        self.finished.append(p)

    def barrier(self) -> None:
        """Everything queued to the loop before now has run."""
        call_in_loop(self.loop, lambda: None, TIMEOUT)

    def call(self, fn: Callable[[], Any], from_loop: bool) -> Any:
        return call_in_loop(self.loop, fn, TIMEOUT) if from_loop else fn()

    # -- one rule, so that hypothesis's swarm testing cannot switch whole groups off -----

    @initialize(n=st.integers(1, 3))
    def first_connections(self, n: int) -> None:
        for _ in range(n):
            self.connect()

    @rule(op=st.sampled_from(OPS), k=st.integers(0, MAX_PEERS - 1), data=st.data())
    def step(self, op: str, k: int, data: st.DataObject) -> None:
        if op == "connect":
            if len(self.peers) < MAX_PEERS:
                self.connect()
        elif op in PEER_OPS:
            if self.peers:
                getattr(self, "do_" + op)(self.peers[k % len(self.peers)], data)
        else:
            getattr(self, "do_" + op)(data)

    def connect(self) -> None:
        s = self.st.connect(timeout=TIMEOUT)
        port = s.getsockname()[1]
        conn = wait_for(lambda: self.h.by_port.get(port), TIMEOUT)
        self.peers.append(Peer(s, conn))

    # -- client actions --------------------------------------------------------------------

    def do_send(self, p: Peer, data: st.DataObject) -> None:
        n = data.draw(
            st.one_of(st.integers(1, 3000), st.sampled_from([65536, 65537, 200_000])), label="size"
        )
        if p.half or p.server == "killed" or len(p.sent) + n > MAX_SENT:
            return
        if p.paused:
            if p.paused_sent + n > PAUSED_LIMIT:
                return
            p.paused_sent += n
        msg = payload(data.draw(st.integers(0, 2**16), label="seed"), n)
        cuts = data.draw(st.lists(st.integers(0, n), max_size=4), label="cuts")
        edges = sorted({0, n, *cuts})
        for a, b in zip(edges, edges[1:]):
            p.sock.sendall(msg[a:b])
        p.sent += msg

    def do_recv(self, p: Peer, data: st.DataObject) -> None:
        """Read part of what is owed (only when the server must echo all of it)."""
        if p.paused or p.server != "open":
            return
        owed = len(p.sent) - len(p.got)
        p.recv_exactly(data.draw(st.integers(0, owed), label="nbytes"))
        p.check_prefix()

    def do_half_close(self, p: Peer, data: st.DataObject) -> None:
        if p.half:
            return
        if p.paused:
            self.do_resume(p, data)
        self._shut_wr(p)
        if data.draw(st.booleans(), label="drain now"):
            self.do_drain(p, data)

    def _shut_wr(self, p: Peer) -> None:
        with contextlib.suppress(OSError) if p.server == "killed" else contextlib.nullcontext():
            p.sock.shutdown(socket.SHUT_WR)
        p.half = True

    def do_drain(self, p: Peer, data: st.DataObject | None = None) -> None:
        """After our FIN: read to EOF and check the whole exchange; retire the peer."""
        if not p.half:
            return
        p.recv_to_eof(reset_ok=p.server == "killed")
        p.check_prefix()
        if p.server == "open":
            assert len(p.got) == len(p.sent), "half-closed peer got %d of %d echoed bytes" % (
                len(p.got),
                len(p.sent),
            )
        p.drained = True
        p.sock.close()
        self.retire(p)

    def do_close(self, p: Peer, data: st.DataObject, reset: bool = False) -> None:
        if reset:
            p.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        p.sock.close()
        if p.server == "open":
            p.server = "gone"
        self.retire(p)

    def do_reset(self, p: Peer, data: st.DataObject) -> None:
        self.do_close(p, data, reset=True)

    # -- server-side actions on a connection -----------------------------------------------

    def do_pause(self, p: Peer, data: st.DataObject) -> None:
        if p.paused or p.half:
            return
        self.call(p.conn.stop_reading, data.draw(st.booleans(), label="from loop"))
        p.paused = True
        p.paused_sent = 0

    def do_resume(self, p: Peer, data: st.DataObject | None = None) -> None:
        if p.paused:
            p.conn.start_reading()
            p.paused = False

    def do_server_shutdown(self, p: Peer, data: st.DataObject) -> None:
        if p.server == "open":
            self.call(p.conn.shutdown, data.draw(st.booleans(), label="from loop"))
            p.server = "shut"
            self.do_resume(p)

    def do_server_force_close(self, p: Peer, data: st.DataObject) -> None:
        if p.server == "open":
            self.call(p.conn.force_close, data.draw(st.booleans(), label="from loop"))
            p.server = "killed"
            self.do_resume(p)

    # -- timers, pool tasks, functors ------------------------------------------------------

    def _on_fire(self, box: dict[str, int]) -> None:
        with self.tlock:
            self.fired[box["id"]] += 1

    def do_timer_once(self, data: st.DataObject) -> None:
        delay = data.draw(st.sampled_from([0.0, 0.0005, 0.003, 0.02]), label="delay")
        box: dict[str, int] = {}

        def add() -> int:
            box["id"] = self.loop.run_after(delay, lambda: self._on_fire(box))
            return box["id"]

        if data.draw(st.booleans(), label="from loop"):
            tid = call_in_loop(self.loop, add, TIMEOUT)
        else:
            with self.tlock:  # the callback reads box["id"] under the same lock
                tid = add()
        self.once[tid] = False

    def do_timer_every(self, data: st.DataObject) -> None:
        """A repeating timer that cancels itself (on the loop thread) after *count* fires."""
        interval = data.draw(st.sampled_from([0.001, 0.004]), label="interval")
        count = data.draw(st.integers(1, 4), label="count")
        box: dict[str, int] = {}

        def fire() -> None:
            self._on_fire(box)
            if self.fired[box["id"]] == count:
                self.loop.cancel_timer(box["id"])

        def add() -> int:
            box["id"] = self.loop.run_every(interval, fire)
            return box["id"]

        self.every[call_in_loop(self.loop, add, TIMEOUT)] = count

    def do_timer_cancel(self, data: st.DataObject) -> None:
        live = sorted([t for t, c in self.once.items() if not c] + list(self.every))
        if not live:
            return
        tid = data.draw(st.sampled_from(live), label="timer")
        if data.draw(st.booleans(), label="from loop"):
            call_in_loop(self.loop, lambda: self.loop.cancel_timer(tid), TIMEOUT)
        else:
            self.loop.cancel_timer(tid)
            self.barrier()  # the queued cancel has now run
        with self.tlock:
            self.frozen[tid] = self.fired[tid]
        if tid in self.once:
            self.once[tid] = True
        else:
            del self.every[tid]

    def do_pool_tasks(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from([None, "a", "b"]), label="key")

        def task(key: Any, i: int) -> None:
            with self.tlock:
                self.task_log.append((key, i))

        for _ in range(data.draw(st.integers(1, 20), label="tasks")):
            self.tasks_added[key] += 1
            self.pool.add_task(task, key, self.tasks_added[key], key=key)

    def do_functors(self, data: st.DataObject) -> None:
        for _ in range(data.draw(st.integers(1, 20), label="functors")):
            self.functors += 1
            self.loop.queue_in_loop(functools.partial(self.functor_log.append, self.functors))

    # -- always -----------------------------------------------------------------------------

    @invariant()
    def no_errors_so_far(self) -> None:
        assert self.loop.callback_errors == 0
        assert self.pool.failed == 0

    # -- the end of an example -----------------------------------------------------------

    def teardown(self) -> None:
        try:
            self.finish()
        finally:
            for p in self.peers + self.finished:
                p.sock.close()
            self.st.stop()
            self.pool.stop(drain=False, timeout=TIMEOUT)
            # Drop every reference to connection objects (the leak check counts them).
            self.peers.clear()
            self.finished.clear()
            self.h.by_port.clear()

    def finish(self) -> None:
        # A FIN is seen only once the server reads again (a reset is seen while paused):
        # resume the connections of clients that closed while the server was paused.
        for p in self.finished:
            self.do_resume(p)
        # Every open client half-closes and reads to EOF (resuming paused connections).
        for p in list(self.peers):
            if not p.half:
                self.do_resume(p)
                self._shut_wr(p)
            self.do_drain(p)
        wait_for(lambda: self.st.connection_count() == 0, TIMEOUT)
        h = self.h
        with h.lock:
            assert set(h.opened.values()) <= {1}
            assert set(h.closes) == set(h.opened), "a connection was never released"
            assert set(h.closes.values()) == {1} or not h.closes, "released twice"
            for cid, info in h.close_info.items():
                assert info["pending"] == 0, ("released with tasks in flight", cid, info)
                assert info["bytes_sent"] + info["dropped_bytes"] == info["reply_bytes"], (
                    cid,
                    info,
                )
            # Every task ran, or was discarded before it ran because its connection had
            # been reset or force-closed (counted in pool.cancelled).
            assert sum(i["unfinished"] for i in h.close_info.values()) == self.pool.cancelled
        for p in self.finished:
            info = h.close_info[p.conn.id]
            if p.server == "open":  # half-closed at the end: all of its work ran
                assert info["unfinished"] == 0, ("discarded work of a live peer", info)
                assert info["dropped_bytes"] == 0, ("dropped a reply to a live peer", info)
            if p.server in ("open", "shut") and p.drained:
                # We read to EOF: everything the server sent arrived, nothing else.
                assert len(p.got) == info["bytes_sent"], (len(p.got), info)
        # Timers: wait for the ones that must fire, then nothing may be left.
        with self.tlock:
            must = dict.fromkeys((t for t, c in self.once.items() if not c), 1)
            must.update(self.every)
        wait_for(lambda: all(self.fired[t] >= n for t, n in must.items()), TIMEOUT)
        wait_for(lambda: self.loop.timer_count == 0, TIMEOUT)
        self.barrier()
        with self.tlock:
            for tid, n in must.items():
                assert self.fired[tid] == n, "timer fired %d times, want %d" % (self.fired[tid], n)
            for tid, n in self.frozen.items():
                assert self.fired[tid] == n, "timer %d fired after its cancel ran" % tid
                assert n <= 1 or tid not in self.once
        # Pool tasks: all ran; one key's tasks in the order they were added.
        wait_for(lambda: len(self.task_log) == sum(self.tasks_added.values()), TIMEOUT)
        with self.tlock:
            for key, n in self.tasks_added.items():
                seq = [i for k, i in self.task_log if k == key]
                assert sorted(seq) == list(range(1, n + 1))
                if key is not None:
                    assert seq == sorted(seq), "strand %r ran out of order: %s" % (key, seq)
        self.barrier()
        assert self.functor_log == list(range(1, self.functors + 1))
        assert self.loop.callback_errors == 0
        assert self.pool.failed == 0


@pytest.mark.parametrize("threads", [4, 0], ids=["pool4", "single"])
def test_live_server_stateful_fuzz(threads: int, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="cppnp")
    machine = type("LiveMachine%d" % threads, (LiveMachine,), {"threads": threads})
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=int(os.environ.get("CPPNP_FUZZ_EXAMPLES", "100")),
            stateful_step_count=40,
            deadline=None,
            database=None,
            print_blob=True,
            # No shrinking: each attempt replays real sockets and a failing one waits for a
            # timeout; the unshrunk steps are printed and are short enough to read.
            phases=[Phase.explicit, Phase.reuse, Phase.generate],
            suppress_health_check=list(HealthCheck),
        ),
    )
    errors = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("cppnp") and r.levelno >= logging.ERROR
    ]
    assert errors == []
