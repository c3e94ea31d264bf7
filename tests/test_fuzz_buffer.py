"""Stateful fuzzing of Buffer against a bytearray model (RELIABILITY G2, G3, G4).

Deeper than test_buffer.py's property test: two buffers that feed each other (also a
buffer appended or prepended to itself), sizes chosen relative to the buffer's current
geometry (exactly at, one below and one above the writable space, the in-place
compaction threshold and the prependable space), views and slices of views held across
every kind of operation and checked against snapshots while the buffer is unchanged,
stale views passed back in as data, buffers dropped while views still point into them,
and the allocator exercised between steps so that heap corruption surfaces without ASan.

Each run happens in a forked child: a memory error kills the child, not the session, and
the test fails with the signal and the steps of the example that crashed (every step is
written to a log file before it runs).  Under scripts/sanitize.sh ASan reports the first
bad access instead.
"""

from __future__ import annotations

import functools
import os
import random
import struct
import tempfile
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from cppnp import Buffer
from faults_support import run_forked

CHEAP_PREPEND = Buffer(b"x").prependable_bytes()
MAX_READABLE = 1 << 20  # keep each buffer below 1 MiB (speed, not correctness)
MAX_HELD = 6


def logged(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Write ``name(args)`` to the step log before the rule runs (for crash reports)."""

    @functools.wraps(fn)
    def wrapper(self: BufferMachine, **kw: Any) -> Any:
        args = ", ".join("%s=%s" % (k, short(v)) for k, v in sorted(kw.items()))
        self.log("%s(%s)" % (fn.__name__, args))
        return fn(self, **kw)

    return wrapper


def short(v: Any) -> str:
    if isinstance(v, (bytes, bytearray)) and len(v) > 24:
        return "<%d bytes %r...>" % (len(v), bytes(v[:12]))
    return repr(v)


# -- the model ---------------------------------------------------------------------------------


class Slot:
    """One Buffer, its model and a generation bumped by every modification."""

    def __init__(self, buf: Buffer, model: bytes = b"") -> None:
        self.buf = buf
        self.model = bytearray(model)
        self.gen = 0


class Held:
    """A view exported by a buffer (maybe sliced), with what it showed at export."""

    def __init__(self, slot: Slot, base: memoryview, view: memoryview) -> None:
        self.slot = slot
        self.base = base  # memoryview(buf) or buf.peek()
        self.view = view  # base, or a slice of it
        self.gen = slot.gen
        self.snapshot = bytes(view)
        self.length = len(view)

    def fresh(self) -> bool:
        """True while the buffer has not been modified since the export."""
        return self.slot.gen == self.gen

    def release(self) -> None:
        if self.view is not self.base:
            self.view.release()
        self.base.release()


def payload(seed: int, n: int) -> bytes:
    """*n* bytes with some CR/LF in them (so that find_crlf/find_eol have work to do)."""
    data = bytearray(random.Random(seed).randbytes(n))
    for k in range(seed % 7, n, 97):
        data[k] = 10 if k % 2 else 13
    return bytes(data)


def capacity(buf: Buffer) -> int:
    return buf.prependable_bytes() + buf.readable_bytes() + buf.writable_bytes()


def contents(buf: Buffer) -> bytes:
    with memoryview(buf) as v:
        return bytes(v)


WHICH = st.integers(0, 1)
SMALL = st.integers(0, 64)
SIZES = st.one_of(
    st.integers(0, 300),
    st.sampled_from([1023, 1024, 1025, 2048, 4096, 65535, 65536, 65537, 200_000]),
)
DELTA = st.integers(-3, 3)
FRACTION = st.floats(0, 1)


class BufferMachine(RuleBasedStateMachine):
    step_log = ""  # set by the test before the machine runs

    def __init__(self) -> None:
        super().__init__()
        self.slots: list[Slot] = []
        self.held: list[Held] = []
        self.log_fd = os.open(self.step_log, os.O_WRONLY | os.O_APPEND)
        self.log("--- example")

    def log(self, line: str) -> None:
        os.write(self.log_fd, line.encode() + b"\n")

    # -- setup: buffers made in different ways -------------------------------------------

    @initialize(
        kinds=st.lists(
            st.sampled_from(["empty", "bytes", "str", "view", "other"]), min_size=2, max_size=2
        ),
        seed=st.integers(0, 2**16),
        n=SIZES,
    )
    @logged
    def make_buffers(self, kinds: list[str], seed: int, n: int) -> None:
        for kind in kinds:
            data = payload(seed, n)
            if kind == "empty":
                self.slots.append(Slot(Buffer()))
            elif kind == "bytes":
                self.slots.append(Slot(Buffer(data), data))
            elif kind == "str":
                text = data.decode("latin-1")
                self.slots.append(Slot(Buffer(text), text.encode("utf-8")))
            elif kind == "view":
                self.slots.append(Slot(Buffer(memoryview(bytearray(data))[1:]), data[1:]))
            else:
                src = Buffer(data)
                src.retrieve(len(data) // 3)
                self.slots.append(Slot(Buffer(src), data[len(data) // 3 :]))

    # -- growing ---------------------------------------------------------------------------

    def _append(self, slot: Slot, data: Any, expect: bytes | None = None) -> None:
        """Append *data*; *expect* is what it holds now (data may be a Buffer or view
        whose contents the append itself changes)."""
        expect = bytes(data) if expect is None else expect
        if len(slot.model) + len(expect) > MAX_READABLE:
            return
        slot.buf.append(data)
        slot.model += expect
        slot.gen += 1

    def _prepend(self, slot: Slot, data: Any, expect: bytes | None = None) -> None:
        expect = bytes(data) if expect is None else expect
        if len(slot.model) + len(expect) > MAX_READABLE:
            return
        slot.buf.prepend(data)
        slot.model[:0] = expect
        slot.gen += 1

    @rule(i=WHICH, seed=st.integers(0, 2**16), n=SIZES)
    @logged
    def append(self, i: int, seed: int, n: int) -> None:
        self._append(self.slots[i], payload(seed, n))

    @rule(i=WHICH, delta=DELTA, edge=st.sampled_from(["writable", "compact", "capacity"]))
    @logged
    def append_at_edge(self, i: int, delta: int, edge: str) -> None:
        """Append exactly around a growth boundary: the free space after the writer, the
        room an in-place compaction would make, or the whole block."""
        buf = self.slots[i].buf
        cap = capacity(buf)
        n = {
            "writable": buf.writable_bytes(),
            "compact": cap - CHEAP_PREPEND - buf.readable_bytes(),
            "capacity": cap,
        }[edge] + delta
        self._append(self.slots[i], b"e" * max(n, 0))

    @rule(i=WHICH, seed=st.integers(0, 2**16), n=st.one_of(SMALL, SIZES))
    @logged
    def prepend(self, i: int, seed: int, n: int) -> None:
        self._prepend(self.slots[i], payload(seed, n))

    @rule(i=WHICH, delta=DELTA, edge=st.sampled_from(["prependable", "cheap", "free"]))
    @logged
    def prepend_at_edge(self, i: int, delta: int, edge: str) -> None:
        """Prepend exactly around the room in front of the reader, the cheap-prepend size,
        or all the free space of the block."""
        buf = self.slots[i].buf
        n = {
            "prependable": buf.prependable_bytes(),
            "cheap": CHEAP_PREPEND,
            "free": buf.prependable_bytes() + buf.writable_bytes(),
        }[edge] + delta
        self._prepend(self.slots[i], b"p" * max(n, 0))

    @rule(i=WHICH, value=st.integers(-(2**31), 2**31 - 1), front=st.booleans())
    @logged
    def int32(self, i: int, value: int, front: bool) -> None:
        slot = self.slots[i]
        if front:
            slot.buf.prepend_int32(value)
            slot.model[:0] = struct.pack(">i", value)
        else:
            slot.buf.append_int32(value)
            slot.model += struct.pack(">i", value)
        slot.gen += 1

    @rule(i=WHICH, bad=st.sampled_from([2**31, -(2**31) - 1, 2**40]), front=st.booleans())
    @logged
    def int32_out_of_range(self, i: int, bad: int, front: bool) -> None:
        buf = self.slots[i].buf
        with pytest.raises(OverflowError):
            (buf.prepend_int32 if front else buf.append_int32)(bad)

    @rule(dst=WHICH, src=WHICH, front=st.booleans())
    @logged
    def feed_buffer(self, dst: int, src: int, front: bool) -> None:
        """Append or prepend a Buffer (through the buffer protocol), also to itself."""
        d, s = self.slots[dst], self.slots[src]
        (self._prepend if front else self._append)(d, s.buf, bytes(s.model))

    @precondition(lambda self: bool(self.held))
    @rule(dst=WHICH, k=st.integers(0, MAX_HELD - 1), front=st.booleans())
    @logged
    def feed_held_view(self, dst: int, k: int, front: bool) -> None:
        """Pass a held view back in as data: fresh or stale, of this buffer or the other.

        A stale view's bytes are defined only as "whatever its memory holds now"; append
        must copy exactly those (the memory may overlap the destination's free space)."""
        held = self.held[k % len(self.held)]
        now = bytes(held.view)
        if held.fresh():
            assert now == held.snapshot
        (self._prepend if front else self._append)(self.slots[dst], held.view, now)

    @precondition(lambda self: bool(self.held))
    @rule(k=st.integers(0, MAX_HELD - 1), fill=FRACTION, skip=FRACTION, front=st.booleans())
    @logged
    def recycle_under_view(self, k: int, fill: float, skip: float, front: bool) -> None:
        """Empty the buffer a held view points into, refill part of the same memory, and
        pass the (now stale) view back to that buffer: source and destination overlap."""
        held = self.held[k % len(self.held)]
        slot = held.slot
        if slot not in self.slots or held.length == 0:
            return
        slot.buf.retrieve_all()
        slot.model.clear()
        self._append(slot, payload(k, int(fill * 2 * held.length)))
        n = int(skip * len(slot.model))
        slot.buf.retrieve(n)
        del slot.model[:n]
        slot.gen += 1
        (self._prepend if front else self._append)(slot, held.view, bytes(held.view))

    # -- consuming -----------------------------------------------------------------------

    def _count(self, slot: Slot, frac: float, delta: int) -> int:
        return min(max(int(len(slot.model) * frac) + delta, 0), len(slot.model))

    @rule(i=WHICH, frac=FRACTION, delta=DELTA, as_bytes=st.booleans())
    @logged
    def retrieve(self, i: int, frac: float, delta: int, as_bytes: bool) -> None:
        slot = self.slots[i]
        n = self._count(slot, frac, delta)
        if as_bytes:
            assert slot.buf.retrieve_as_bytes(n) == bytes(slot.model[:n])
        else:
            slot.buf.retrieve(n)
        del slot.model[:n]
        slot.gen += 1

    @rule(i=WHICH, alias=st.booleans())
    @logged
    def retrieve_all(self, i: int, alias: bool) -> None:
        slot = self.slots[i]
        out = slot.buf.retrieveAll() if alias else slot.buf.retrieve_all()
        assert out == bytes(slot.model)
        slot.model.clear()
        slot.gen += 1

    @rule(
        i=WHICH,
        over=st.sampled_from([1, 2, 2**31, 2**62]),
        how=st.sampled_from(["retrieve", "retrieve_as_bytes", "negative"]),
    )
    @logged
    def retrieve_out_of_range(self, i: int, over: int, how: str) -> None:
        slot = self.slots[i]
        if how == "negative":
            with pytest.raises(ValueError):
                slot.buf.retrieve(-over)
        else:
            with pytest.raises((ValueError, OverflowError)):
                getattr(slot.buf, how)(len(slot.model) + over)

    @rule(i=WHICH)
    @logged
    def int32_read(self, i: int) -> None:
        slot = self.slots[i]
        if len(slot.model) >= 4:
            expect = struct.unpack(">i", bytes(slot.model[:4]))[0]
            assert slot.buf.peek_int32() == expect
            assert struct.unpack_from(">i", slot.buf, 0)[0] == expect
            assert slot.buf.read_int32() == expect
            del slot.model[:4]
            slot.gen += 1
        else:
            with pytest.raises(ValueError):
                slot.buf.peek_int32()
            with pytest.raises(ValueError):
                slot.buf.read_int32()

    # -- searching -------------------------------------------------------------------------

    @rule(i=WHICH, frac=FRACTION, delta=DELTA, alias=st.booleans())
    @logged
    def find(self, i: int, frac: float, delta: int, alias: bool) -> None:
        slot = self.slots[i]
        start = self._count(slot, frac, delta)
        crlf = slot.buf.findCRLF if alias else slot.buf.find_crlf
        eol = slot.buf.findEOL if alias else slot.buf.find_eol
        assert eol(start) == slot.model.find(b"\n", start)
        assert crlf(start) == slot.model.find(b"\r\n", start)
        assert slot.buf.find_crlf() == slot.model.find(b"\r\n")
        for bad in (-1, len(slot.model) + 1):
            with pytest.raises(ValueError):
                crlf(bad)
            with pytest.raises(ValueError):
                eol(bad)

    @rule(i=WHICH, frac=FRACTION)
    @logged
    def consume_lines(self, i: int, frac: float) -> None:
        """The line-protocol pattern: find_crlf, retrieve_as_bytes up to it, repeat."""
        slot = self.slots[i]
        budget = int(frac * 8)
        while budget:
            budget -= 1
            at = slot.buf.find_crlf()
            if at < 0:
                assert b"\r\n" not in slot.model
                return
            line = slot.buf.retrieve_as_bytes(at + 2)
            assert line == bytes(slot.model[: at + 2]) and line.endswith(b"\r\n")
            del slot.model[: at + 2]
            slot.gen += 1

    # -- storage -----------------------------------------------------------------------------

    @rule(i=WHICH, reserve=st.sampled_from([0, 1, 7, 100, 5000]))
    @logged
    def shrink(self, i: int, reserve: int) -> None:
        slot = self.slots[i]
        if any(h.slot is slot for h in self.held):
            with pytest.raises(BufferError):
                slot.buf.shrink(reserve)
        else:
            slot.buf.shrink(reserve)
            assert slot.buf.writable_bytes() == reserve
            slot.gen += 1

    @rule(i=WHICH, seed=st.integers(0, 2**16), n=SIZES)
    @logged
    def replace(self, i: int, seed: int, n: int) -> None:
        """Drop a buffer (its held views keep it alive) and start a new one."""
        data = payload(seed, n)
        self.slots[i] = Slot(Buffer(data), data)

    @rule(sizes=st.lists(st.sampled_from([1, 16, 1000, 1024, 4096, 70000]), max_size=12))
    @logged
    def churn_allocator(self, sizes: list[int]) -> None:
        """Allocate and free: glibc notices a clobbered chunk header here."""
        bufs = [Buffer(b"c" * n) for n in sizes]
        blocks = [bytearray(n) for n in sizes]
        assert [len(b) for b in bufs] == [len(b) for b in blocks]

    # -- views -----------------------------------------------------------------------------

    @precondition(lambda self: len(self.held) < MAX_HELD)
    @rule(i=WHICH, how=st.sampled_from(["peek", "memoryview", "slice"]), a=FRACTION, b=FRACTION)
    @logged
    def export(self, i: int, how: str, a: float, b: float) -> None:
        slot = self.slots[i]
        base = slot.buf.peek() if how == "peek" else memoryview(slot.buf)
        assert base.readonly and len(base) == len(slot.model)
        view = base
        if how == "slice":
            lo, hi = sorted((int(a * len(base)), int(b * len(base))))
            view = base[lo:hi]
        held = Held(slot, base, view)
        self.held.append(held)
        if view is base:
            assert held.snapshot == bytes(slot.model)
        else:
            assert held.snapshot == bytes(slot.model)[lo:hi]

    @precondition(lambda self: bool(self.held))
    @rule(k=st.integers(0, MAX_HELD - 1))
    @logged
    def release(self, k: int) -> None:
        held = self.held.pop(k % len(self.held))
        now = bytes(held.view)
        assert len(now) == held.length
        if held.fresh():
            assert now == held.snapshot
        held.release()

    @precondition(lambda self: bool(self.held))
    @rule(k=st.integers(0, MAX_HELD - 1))
    @logged
    def write_through_view_refused(self, k: int) -> None:
        held = self.held[k % len(self.held)]
        if held.length:
            with pytest.raises(TypeError):
                held.view[0] = 0
        with pytest.raises((TypeError, BufferError)):
            struct.pack_into("B", held.slot.buf, 0, 1)

    # -- checks after every step -----------------------------------------------------------

    @invariant()
    def matches_model(self) -> None:
        for slot in self.slots:
            buf = slot.buf
            assert len(buf) == buf.readable_bytes() == buf.readableBytes() == len(slot.model)
            assert bool(buf) == bool(slot.model)
            assert 0 <= buf.writable_bytes() < 2**40, "writer beyond the block"
            assert 0 <= buf.prependable_bytes() < 2**40, "reader index wrapped around"
            assert contents(buf) == bytes(slot.model)
            assert bytes(buf.peek()) == bytes(slot.model)

    @invariant()
    def views_readable(self) -> None:
        for held in self.held:
            now = bytes(held.view)
            assert len(now) == held.length
            if held.fresh():
                assert now == held.snapshot, "an unchanged buffer's view changed"

    def teardown(self) -> None:
        for held in self.held:
            held.release()
        for slot in self.slots:
            if len(slot.buf) == len(slot.model):
                slot.buf.shrink()  # no view left: must be allowed again
        os.close(self.log_fd)


def test_buffer_stateful_fuzz() -> None:
    def body(step_log: str) -> None:
        BufferMachine.step_log = step_log
        run_state_machine_as_test(
            BufferMachine,
            settings=settings(
                max_examples=int(os.environ.get("CPPNP_FUZZ_EXAMPLES", "250")),
                stateful_step_count=60,
                deadline=None,
                database=None,
                print_blob=True,
                suppress_health_check=[
                    HealthCheck.too_slow,
                    HealthCheck.data_too_large,
                    HealthCheck.filter_too_much,
                ],
            ),
        )

    fd, step_log = tempfile.mkstemp(prefix="cppnp-fuzz-buffer-", suffix=".log")
    os.close(fd)
    try:
        run_forked(lambda: body(step_log), timeout=90.0, step_log=step_log)
    finally:
        os.unlink(step_log)
