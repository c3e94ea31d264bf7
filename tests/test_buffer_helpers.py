"""Buffer protocol helpers in C: find, readline, fixed-width integers (peek and read)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cppnp import Buffer

NAMED = [
    # name, struct format (None: no struct code), width
    ("int8", ">b", 1),
    ("uint8", ">B", 1),
    ("int16", ">h", 2),
    ("int16_le", "<h", 2),
    ("uint16", ">H", 2),
    ("uint16_le", "<H", 2),
    ("int32", ">i", 4),
    ("int32_le", "<i", 4),
    ("uint32", ">I", 4),
    ("uint32_le", "<I", 4),
    ("int64", ">q", 8),
    ("int64_le", "<q", 8),
    ("uint64", ">Q", 8),
    ("uint64_le", "<Q", 8),
]


def test_find_matches_bytes_find() -> None:
    data = b"GET / HTTP/1.1\r\nHost: x\r\n\r\nbody\r\n"
    buf = Buffer(data)
    for sub in (b"\r\n", b"\r\n\r\n", b"Host", b"body\r\n", b"nope", b"G", data, data + b"x"):
        for start in range(len(data) + 1):
            assert buf.find(sub, start) == data.find(sub, start), (sub, start)
    assert buf.find(b"") == 0 and buf.find(b"", 5) == 5
    assert buf.find(bytearray(b"Host")) == data.find(b"Host")
    assert buf.find(memoryview(b"xbodyx")[1:5]) == data.find(b"body")
    assert buf.readable_bytes() == len(data)  # nothing consumed


def test_find_after_retrieve_counts_from_the_reader() -> None:
    buf = Buffer(b"abcabc")
    buf.retrieve(1)
    assert buf.find(b"abc") == 2
    assert Buffer().find(b"a") == -1


@pytest.mark.parametrize("start", [-1, 7])
def test_find_start_out_of_range(start: int) -> None:
    buf = Buffer(b"abcdef")
    with pytest.raises(ValueError, match="find: start"):
        buf.find(b"a", start)
    with pytest.raises(TypeError):
        buf.find("a")  # type: ignore[arg-type]


def test_readline_returns_lines_with_delimiter_and_none_when_partial() -> None:
    buf = Buffer(b"one\ntwo\r\nthr")
    assert buf.readline() == b"one\n"
    assert buf.readline() == b"two\r\n"
    assert buf.readline() is None
    assert buf.retrieve_all() == b"thr"  # the partial line was left in place
    assert buf.readline() is None

    buf = Buffer(b"a\r\nb\nc\r\n")
    assert buf.readline(b"\r\n") == b"a\r\n"
    assert buf.readline(b"\r\n") == b"b\nc\r\n"
    assert buf.readline(b"\r\n") is None
    buf.append(b"x|y||z|")
    assert buf.readline(b"||") == b"x|y||"
    assert buf.readline(b"|") == b"z|"
    assert len(buf) == 0


def test_readline_rejects_empty_delimiter() -> None:
    buf = Buffer(b"abc\n")
    with pytest.raises(ValueError, match="readline"):
        buf.readline(b"")
    assert buf.readline() == b"abc\n"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=12), max_size=8), st.sampled_from([b"\n", b"\r\n", b"ab"]))
def test_readline_and_find_match_a_model(chunks: list[bytes], delim: bytes) -> None:
    buf = Buffer()
    model = bytearray()
    for chunk in chunks:
        buf.append(chunk)
        model += chunk
        assert buf.find(delim) == bytes(model).find(delim)
        while True:
            i = bytes(model).find(delim)
            line = buf.readline(delim)
            if i < 0:
                assert line is None
                break
            assert line == bytes(model[: i + len(delim)])
            del model[: i + len(delim)]
        assert buf.peek() == model


@pytest.mark.parametrize(("name", "fmt", "width"), NAMED)
def test_named_int_helpers_match_struct(name: str, fmt: str, width: int) -> None:
    samples = [
        bytes(range(1, 9)),
        b"\xff" * 8,
        b"\x80" + b"\x00" * 7,
        b"\x7f" + b"\xff" * 7,
        b"\x00" * 7 + b"\x80",
        bytes(range(0xF8, 0x100)),
    ]
    for raw in samples:
        buf = Buffer(raw + b"tail")
        expected = struct.unpack(fmt, raw[:width])[0]
        assert getattr(buf, "peek_" + name)() == expected
        assert len(buf) == 12  # peek does not consume
        assert getattr(buf, "read_" + name)() == expected
        assert len(buf) == 12 - width
        assert buf.peek() == (raw + b"tail")[width:]


@pytest.mark.parametrize(("name", "fmt", "width"), NAMED)
def test_named_int_helpers_too_few_bytes(name: str, fmt: str, width: int) -> None:
    buf = Buffer(b"\x01" * (width - 1))
    for op in ("peek_", "read_"):
        with pytest.raises(ValueError, match=r"^%s\(\) needs %d readable" % (op + name, width)):
            getattr(buf, op + name)()
        assert len(buf) == width - 1  # nothing consumed


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=20),
    st.integers(1, 8),
    st.sampled_from(["big", "little"]),
    st.booleans(),
    st.integers(0, 20),
)
def test_peek_int_and_read_int_match_int_from_bytes(
    data: bytes, width: int, order: str, signed: bool, offset: int
) -> None:
    buf = Buffer(data)
    if offset + width <= len(data):
        expected = int.from_bytes(data[offset : offset + width], order, signed=signed)  # type: ignore[arg-type]
        assert buf.peek_int(width, order, signed, offset) == expected  # type: ignore[arg-type]
        assert buf.peek_int(width, byteorder=order, signed=signed, offset=offset) == expected  # type: ignore[arg-type]
    else:
        with pytest.raises(ValueError, match=r"peek_int\(\) needs"):
            buf.peek_int(width, order, signed, offset)  # type: ignore[arg-type]
    assert buf.peek() == data
    if width <= len(data):
        expected = int.from_bytes(data[:width], order, signed=signed)  # type: ignore[arg-type]
        assert buf.read_int(width, order, signed) == expected  # type: ignore[arg-type]
        assert buf.peek() == data[width:]
    else:
        with pytest.raises(ValueError, match=r"read_int\(\) needs"):
            buf.read_int(width, order, signed)  # type: ignore[arg-type]
        assert buf.peek() == data


def test_int_defaults_are_big_endian_signed() -> None:
    buf = Buffer(b"\xff\xfe\x00\x01")
    assert buf.peek_int(2) == -2
    assert buf.peek_int(2, signed=False) == 0xFFFE
    assert buf.peek_int(2, "little") == -257
    assert buf.peek_int(2, offset=2) == 1
    assert buf.read_int(4) == -131071


@pytest.mark.parametrize("width", [0, 9, -1])
def test_int_bad_width(width: int) -> None:
    buf = Buffer(b"\x00" * 16)
    with pytest.raises(ValueError, match=r"peek_int: width must be 1\.\.8"):
        buf.peek_int(width)
    with pytest.raises(ValueError, match=r"read_int: width must be 1\.\.8"):
        buf.read_int(width)
    assert len(buf) == 16


def test_int_bad_byteorder_and_offset() -> None:
    buf = Buffer(b"\x00" * 16)
    with pytest.raises(ValueError, match="byteorder must be 'big' or 'little'"):
        buf.peek_int(2, "network")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"peek_int\(\) needs 2 readable bytes at offset -1"):
        buf.peek_int(2, offset=-1)
    with pytest.raises(ValueError, match=r"peek_int\(\) needs 2 readable bytes at offset 15"):
        buf.peek_int(2, offset=15)
    assert len(buf) == 16
