"""Buffer: muduo's Buffer_unittest cases, error cases, the read-only zero-copy buffer
protocol, growth while a view is exported, and a property test against a bytearray."""

from __future__ import annotations

import ctypes
import gc
import struct

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from cppnp import Buffer
from faults_support import run_forked

# -- helpers ------------------------------------------------------------------------------


class _PyBuffer(ctypes.Structure):
    """struct Py_buffer (part of the stable ABI since 3.11)."""

    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


def data_address(obj: object) -> int:
    """The address of the first byte *obj* exports through the buffer protocol."""
    get = ctypes.pythonapi["PyObject_GetBuffer"]
    get.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
    get.restype = ctypes.c_int
    release = ctypes.pythonapi["PyBuffer_Release"]
    release.argtypes = [ctypes.POINTER(_PyBuffer)]
    release.restype = None
    view = _PyBuffer()
    get(obj, ctypes.byref(view), 0)  # PyDLL: a Python error is raised by ctypes
    try:
        return int(view.buf or 0)
    finally:
        release(ctypes.byref(view))


def contents(buf: Buffer) -> bytes:
    with buf.peek() as view:
        return bytes(view)


def capacity(buf: Buffer) -> int:
    return buf.prependable_bytes() + buf.readable_bytes() + buf.writable_bytes()


def initial_prepend() -> int:
    """kCheapPrepend, as this build reports it (not hard-coded)."""
    b = Buffer(b"x")
    return b.prependable_bytes()


# -- muduo Buffer_unittest.cc ---------------------------------------------------------------


def test_append_retrieve() -> None:
    buf = Buffer()
    assert buf.readable_bytes() == 0
    assert len(buf) == 0 and not buf
    prep = initial_prepend()

    buf.append(b"x" * 200)
    cap = capacity(buf)
    assert buf.readable_bytes() == 200
    assert buf.prependable_bytes() == prep
    assert buf.writable_bytes() == cap - prep - 200

    s2 = buf.retrieve_as_bytes(50)
    assert s2 == b"x" * 50
    assert buf.readable_bytes() == 150
    assert buf.writable_bytes() == cap - prep - 200
    assert buf.prependable_bytes() == prep + 50

    buf.append(b"x" * 200)
    assert buf.readable_bytes() == 350
    assert buf.writable_bytes() == cap - prep - 400
    assert buf.prependable_bytes() == prep + 50

    s3 = buf.retrieve_all()
    assert s3 == b"x" * 350
    assert buf.readable_bytes() == 0
    assert buf.writable_bytes() == cap - prep
    assert buf.prependable_bytes() == prep
    assert buf.retrieve_all() == b""


def test_grow() -> None:
    buf = Buffer()
    prep = initial_prepend()
    buf.append(b"y" * 400)
    cap = capacity(buf)
    assert buf.readable_bytes() == 400
    buf.retrieve(50)
    assert buf.readable_bytes() == 350
    assert buf.prependable_bytes() == prep + 50

    big = cap * 2  # more than fits even after compaction: the storage must grow
    buf.append(b"z" * big)
    assert buf.readable_bytes() == 350 + big
    assert capacity(buf) > cap
    assert capacity(buf) >= prep + 350 + big
    assert contents(buf) == b"y" * 350 + b"z" * big

    grown = capacity(buf)
    assert buf.retrieve_all() == b"y" * 350 + b"z" * big
    assert buf.readable_bytes() == 0
    assert buf.prependable_bytes() == prep
    assert buf.writable_bytes() == grown - prep


def test_inside_grow() -> None:
    buf = Buffer()
    prep = initial_prepend()
    buf.append(b"y" * 800)
    cap = capacity(buf)
    assert cap - prep - 800 < 300, "test assumes the first block holds less than 1100 bytes"
    buf.retrieve(500)
    assert buf.readable_bytes() == 300
    assert buf.prependable_bytes() == prep + 500
    # 300 more do not fit after the writer, but do fit once the readable bytes move to
    # the front: muduo's makeSpace compacts in place instead of growing.
    buf.append(b"z" * 300)
    assert capacity(buf) == cap
    assert buf.readable_bytes() == 600
    assert buf.prependable_bytes() == prep
    assert buf.writable_bytes() == cap - prep - 600
    assert contents(buf) == b"y" * 300 + b"z" * 300


def test_shrink() -> None:
    buf = Buffer()
    prep = initial_prepend()
    buf.append(b"y" * 2000)
    buf.retrieve(1500)
    assert buf.readable_bytes() == 500
    assert buf.prependable_bytes() == prep + 1500

    buf.shrink(0)
    assert buf.readable_bytes() == 500
    assert buf.prependable_bytes() == prep
    assert buf.writable_bytes() == 0
    assert contents(buf) == b"y" * 500

    buf.shrink(100)
    assert buf.writable_bytes() == 100
    assert buf.retrieve_all() == b"y" * 500

    buf.shrink()  # empty, no reserve: storage given back
    assert buf.readable_bytes() == 0
    buf.append(b"again")  # and the buffer is still usable
    assert buf.retrieve_all() == b"again"
    with pytest.raises(ValueError):
        buf.shrink(-1)


def test_prepend() -> None:
    buf = Buffer()
    prep = initial_prepend()
    buf.append(b"y" * 200)
    writable = buf.writable_bytes()
    assert buf.prependable_bytes() == prep

    buf.prepend(struct.pack(">i", 0))
    assert buf.readable_bytes() == 204
    assert buf.writable_bytes() == writable
    assert buf.prependable_bytes() == prep - 4
    assert contents(buf) == b"\0\0\0\0" + b"y" * 200


def test_prepend_more_than_prependable_moves_data() -> None:
    buf = Buffer(b"payload")
    header = b"H" * (initial_prepend() * 4)
    buf.prepend(header)
    assert contents(buf) == header + b"payload"
    buf.prepend(b"")
    assert contents(buf) == header + b"payload"


@pytest.mark.parametrize("slack", range(0, 16))
def test_prepend_near_full_block_keeps_bounds(slack: int) -> None:
    """Prepend past the cheap-prepend area when the block has only a little room left.

    The readable bytes are moved up by the prepend size; the writer must stay inside the
    block (writable_bytes() never wraps around) and the data must be intact.
    """

    def body() -> None:
        buf = Buffer(b"a")
        cap = capacity(buf)
        buf.append(b"b" * (buf.writable_bytes() - slack))
        assert buf.writable_bytes() == slack
        buf.prepend(b"1234")  # fits in the prependable area
        buf.prepend(b"ABCDEFGH")  # does not: the readable bytes must move
        expect = b"ABCDEFGH" + b"1234" + b"a" + b"b" * (cap - initial_prepend() - 1 - slack)
        assert contents(buf) == expect
        assert buf.writable_bytes() < 2**40, "writer beyond the end of the block"
        assert capacity(buf) >= initial_prepend() + len(expect)
        buf.append(b"tail")
        assert contents(buf) == expect + b"tail"
        del buf
        gc.collect()
        # Touch the allocator: corruption next to the block shows up here under glibc.
        assert [len(Buffer(b"q" * 2000)) for _ in range(200)] == [2000] * 200

    run_forked(body)


@pytest.mark.parametrize("slack", [0, 1, 3, 8])
def test_append_after_prepend_on_full_block(slack: int) -> None:
    """A prepend leaves the reader inside the cheap-prepend area; a following append that
    needs room must not compute the free space from a wrapped-around reader index."""

    def body() -> None:
        buf = Buffer(b"a")
        buf.append(b"b" * (buf.writable_bytes() - slack))
        before = contents(buf)
        buf.prepend(b"hdr:")
        buf.append(b"z" * 16)
        assert contents(buf) == b"hdr:" + before + b"z" * 16
        assert buf.writable_bytes() < 2**40, "writer beyond the end of the block"
        del buf
        gc.collect()
        assert [len(Buffer(b"q" * 2000)) for _ in range(200)] == [2000] * 200

    run_forked(body)


def test_read_int() -> None:
    buf = Buffer()
    buf.append(b"HTTP")
    assert buf.readable_bytes() == 4
    assert buf.peek_int32() == int.from_bytes(b"HTTP", "big")
    assert buf.readable_bytes() == 4
    assert buf.read_int32() == int.from_bytes(b"HTTP", "big")
    assert buf.readable_bytes() == 0

    for value in (-1, -3, 0, 1, 2**31 - 1, -(2**31), 0x01020304):
        buf.append_int32(value)
        assert contents(buf) == struct.pack(">i", value)
        assert buf.read_int32() == value
        assert len(buf) == 0

    buf.append(b"body")
    buf.prepend_int32(4)
    assert contents(buf) == b"\0\0\0\x04body"
    assert buf.read_int32() == 4
    assert buf.retrieve_all() == b"body"


def test_int32_out_of_range_leaves_buffer_unchanged() -> None:
    buf = Buffer(b"keep")
    for bad in (2**31, -(2**31) - 1, 2**64):
        with pytest.raises(OverflowError):
            buf.append_int32(bad)
        with pytest.raises(OverflowError):
            buf.prepend_int32(bad)
    assert contents(buf) == b"keep"


def test_find_eol() -> None:
    buf = Buffer()
    assert buf.find_eol() == -1
    assert buf.find_crlf() == -1
    buf.append(b"x" * 100000)
    assert buf.find_eol() == -1
    assert buf.find_eol(90000) == -1
    assert buf.find_crlf() == -1
    buf.append(b"\n")
    assert buf.find_eol() == 100000
    assert buf.find_eol(100000) == 100000
    assert buf.find_eol(100001) == -1  # start == readable is allowed


def test_find_crlf_and_eol_offsets() -> None:
    buf = Buffer(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    first = buf.find_crlf()
    assert first == 14
    second = buf.find_crlf(first + 2)
    assert second == 23
    assert buf.find_crlf(second + 2) == 25
    assert buf.find_crlf(26) == -1
    assert buf.find_eol() == 15
    assert buf.find_eol(16) == 24
    # Offsets are relative to the readable bytes, also after a retrieve.
    buf.retrieve(first + 2)
    assert buf.find_crlf() == second - (first + 2)
    # A lone \r at the end is not a CRLF; a lone \n is an EOL.
    lone = Buffer(b"abc\r")
    assert lone.find_crlf() == -1
    assert Buffer(b"abc\n").find_crlf() == -1
    assert Buffer(b"abc\n").find_eol() == 3


@pytest.mark.parametrize("method", ["find_eol", "find_crlf"])
def test_find_start_out_of_range(method: str) -> None:
    buf = Buffer(b"ab\r\n")
    fn = getattr(buf, method)
    with pytest.raises(ValueError):
        fn(-1)
    with pytest.raises(ValueError):
        fn(5)
    assert fn(4) == -1


# -- errors ----------------------------------------------------------------------------------


def test_retrieve_errors_leave_buffer_unchanged() -> None:
    buf = Buffer(b"abc")
    with pytest.raises(ValueError):
        buf.retrieve(4)
    with pytest.raises(ValueError):
        buf.retrieve(-1)
    with pytest.raises(ValueError):
        buf.retrieve_as_bytes(4)
    with pytest.raises(ValueError):
        buf.retrieve_as_bytes(-1)
    assert contents(buf) == b"abc"
    buf.retrieve(0)
    assert buf.retrieve_as_bytes(0) == b""
    buf.retrieve(3)
    assert len(buf) == 0
    with pytest.raises(ValueError):
        buf.retrieve(1)


def test_int32_with_fewer_than_four_bytes() -> None:
    for n in range(4):
        buf = Buffer(b"\x01" * n)
        with pytest.raises(ValueError):
            buf.peek_int32()
        with pytest.raises(ValueError):
            buf.read_int32()
        assert contents(buf) == b"\x01" * n


def test_append_types() -> None:
    buf = Buffer()
    buf.append(b"b")
    buf.append(bytearray(b"ba"))
    buf.append(memoryview(b"xmvx")[1:3])
    buf.append("é✓")  # str is UTF-8 encoded
    buf.append(b"")
    assert contents(buf) == b"bbamv" + "é✓".encode()
    for bad in (None, 123, 1.5, [1, 2], object()):
        with pytest.raises(TypeError):
            buf.append(bad)
        with pytest.raises(TypeError):
            buf.prepend(bad)
    with pytest.raises((TypeError, BufferError)):
        buf.append(memoryview(b"abcdef")[::2])  # not contiguous
    assert contents(buf) == b"bbamv" + "é✓".encode()
    assert contents(Buffer("ü")) == "ü".encode()


def test_append_does_not_mutate_source() -> None:
    src = bytearray(b"0123456789")
    buf = Buffer()
    buf.append(src)
    buf.prepend(src)
    assert src == bytearray(b"0123456789")
    src[0] = ord("X")
    assert contents(buf) == b"0123456789" * 2


# -- buffer protocol ---------------------------------------------------------------------------


def test_views_are_read_only() -> None:
    buf = Buffer(b"hello")
    view = memoryview(buf)
    assert view.readonly
    assert bytes(view) == b"hello"
    with pytest.raises(TypeError):
        view[0] = ord("j")
    with pytest.raises((TypeError, BufferError)):
        struct.pack_into("B", buf, 0, 1)  # asks for a writable buffer
    peek = buf.peek()
    assert isinstance(peek, memoryview)
    assert peek.readonly
    with pytest.raises(TypeError):
        peek[0:1] = b"j"
    view.release()
    peek.release()
    assert contents(buf) == b"hello"


def test_peek_is_zero_copy() -> None:
    buf = Buffer(b"0123456789")
    base = data_address(buf)
    assert base != 0
    with buf.peek() as view:
        assert data_address(view) == base  # the same memory, not a copy
        assert bytes(view) == b"0123456789"
    buf.retrieve(3)
    assert data_address(buf) == base + 3  # the view starts at the reader index
    assert contents(buf) == b"3456789"


def test_empty_buffer_views() -> None:
    buf = Buffer()
    with memoryview(buf) as view:
        assert len(view) == 0
        assert bytes(view) == b""
    with buf.peek() as view:
        assert bytes(view) == b""
    buf.append(b"x")
    buf.retrieve_all()
    with buf.peek() as view:
        assert len(view) == 0


def test_view_length_is_fixed_at_export() -> None:
    buf = Buffer(b"abc")
    with buf.peek() as view:
        buf.append(b"def")  # fits in place: no grow
        assert len(view) == 3
        assert contents(buf) == b"abcdef"
    assert contents(buf) == b"abcdef"


@pytest.mark.parametrize("op", ["append", "prepend", "append_after_retrieve"])
def test_grow_while_view_exported_is_memory_safe(op: str) -> None:
    """Growing the storage under a live view must not free the memory the view points
    into; the view's *contents* may be stale, reading it must be safe."""

    def body() -> None:
        buf = Buffer(b"a" * 1000)
        views = []
        expect = bytearray(b"a" * 1000)
        for i in range(12):
            views.append(buf.peek())
            chunk = bytes([65 + i]) * (2000 * (i + 1))
            if op == "append":
                buf.append(chunk)
                expect += chunk
            elif op == "prepend":
                buf.prepend(chunk)
                expect[:0] = chunk
            else:
                buf.retrieve(len(buf) // 2)
                del expect[: len(expect) // 2]
                buf.append(chunk)
                expect += chunk
            assert contents(buf) == bytes(expect)
            for v in views:  # old views: stale but readable
                assert len(bytes(v)) == len(v)
            with pytest.raises(BufferError):
                buf.shrink()
        for v in views:
            v.release()
        buf.shrink(0)  # no view left: allowed again
        assert contents(buf) == bytes(expect)

    run_forked(body)


def test_shrink_with_view_raises_and_keeps_data() -> None:
    buf = Buffer(b"xyz")
    view = memoryview(buf)
    with pytest.raises(BufferError):
        buf.shrink()
    with pytest.raises(BufferError):
        buf.shrink(10)
    assert bytes(view) == b"xyz"
    view.release()
    buf.shrink(10)
    assert buf.writable_bytes() == 10


def test_retrieve_all_while_view_exported() -> None:
    buf = Buffer(b"first")
    with buf.peek() as view:
        assert buf.retrieve_all() == b"first"
        buf.append(b"second-and-longer" * 200)
        bytes(view)
        assert contents(buf) == b"second-and-longer" * 200


def test_repr_and_len() -> None:
    buf = Buffer(b"12345")
    assert len(buf) == 5
    assert buf
    assert "5" in repr(buf)


# -- property test against a bytearray model ----------------------------------------------------


class BufferModel(RuleBasedStateMachine):
    """Random append/retrieve/prepend/find/int32/shrink, with views held across them."""

    def __init__(self) -> None:
        super().__init__()
        self.buf = Buffer()
        self.model = bytearray()
        self.views: list[memoryview] = []

    @rule(data=st.binary(max_size=3000))
    def append(self, data: bytes) -> None:
        self.buf.append(data)
        self.model += data

    @rule(text=st.text(max_size=40))
    def append_str(self, text: str) -> None:
        self.buf.append(text)
        self.model += text.encode("utf-8")

    @rule(data=st.binary(max_size=40) | st.sampled_from([b"\r\n", b"\n", b"\r"]))
    def append_small(self, data: bytes) -> None:
        self.buf.append(data)
        self.model += data

    @rule(slack=st.integers(0, 12))
    def fill_to_edge(self, slack: int) -> None:
        """Fill the block up to *slack* free bytes: the edge cases of grow and prepend."""
        n = max(self.buf.writable_bytes() - slack, 0)
        if n < 1 << 20:
            self.buf.append(b"f" * n)
            self.model += b"f" * n

    @rule(data=st.binary(max_size=64))
    def prepend(self, data: bytes) -> None:
        self.buf.prepend(data)
        self.model[:0] = data

    @rule(value=st.integers(-(2**31), 2**31 - 1), front=st.booleans())
    def int32(self, value: int, front: bool) -> None:
        packed = struct.pack(">i", value)
        if front:
            self.buf.prepend_int32(value)
            self.model[:0] = packed
        else:
            self.buf.append_int32(value)
            self.model += packed

    @rule(data=st.data())
    def retrieve(self, data: st.DataObject) -> None:
        n = data.draw(st.integers(0, len(self.model)))
        self.buf.retrieve(n)
        del self.model[:n]

    @rule(data=st.data())
    def retrieve_as_bytes(self, data: st.DataObject) -> None:
        n = data.draw(st.integers(0, len(self.model)))
        assert self.buf.retrieve_as_bytes(n) == bytes(self.model[:n])
        del self.model[:n]

    @rule()
    def retrieve_all(self) -> None:
        assert self.buf.retrieve_all() == bytes(self.model)
        self.model.clear()

    @rule(extra=st.integers(1, 10))
    def retrieve_too_much(self, extra: int) -> None:
        with pytest.raises(ValueError):
            self.buf.retrieve(len(self.model) + extra)

    @rule()
    def read_int32(self) -> None:
        if len(self.model) >= 4:
            expect = struct.unpack(">i", bytes(self.model[:4]))[0]
            assert self.buf.peek_int32() == expect
            assert self.buf.read_int32() == expect
            del self.model[:4]
        else:
            with pytest.raises(ValueError):
                self.buf.read_int32()

    @rule(data=st.data())
    def find(self, data: st.DataObject) -> None:
        start = data.draw(st.integers(0, len(self.model)))
        assert self.buf.find_eol(start) == self.model.find(b"\n", start)
        assert self.buf.find_crlf(start) == self.model.find(b"\r\n", start)

    @rule(reserve=st.integers(0, 2000))
    def shrink(self, reserve: int) -> None:
        if self.views:
            with pytest.raises(BufferError):
                self.buf.shrink(reserve)
        else:
            self.buf.shrink(reserve)
            assert self.buf.writable_bytes() == reserve

    @precondition(lambda self: len(self.views) < 4)
    @rule()
    def hold_view(self) -> None:
        self.views.append(self.buf.peek())

    @precondition(lambda self: bool(self.views))
    @rule()
    def release_view(self) -> None:
        view = self.views.pop(0)
        assert len(bytes(view)) == len(view)  # stale contents are fine; reading is safe
        view.release()

    @invariant()
    def matches_model(self) -> None:
        assert contents(self.buf) == bytes(self.model)
        assert self.buf.readable_bytes() == len(self.model) == len(self.buf)
        assert bool(self.buf) == bool(self.model)
        writable = self.buf.writable_bytes()
        assert 0 <= writable < 2**40, "writer index beyond the block"

    def teardown(self) -> None:
        for view in self.views:
            view.release()


def test_buffer_matches_bytearray_model() -> None:
    def body() -> None:
        run_state_machine_as_test(
            BufferModel,
            settings=settings(
                max_examples=150,
                stateful_step_count=40,
                deadline=None,
                database=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )

    run_forked(body, timeout=120)
