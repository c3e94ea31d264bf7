"""cppnp.codec: LengthFieldCodec and LineCodec over real loopback sockets.

Frames split at every byte boundary (each part waits until the server has read it, so
every split really is a separate read), many frames per read, the max-size frame, over-
size/negative headers and garbage (protocol error: logged, counted, closed, bounded),
hypothesis streams against a pure-Python model, and worker sends through a ThreadPool.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ServerThread, recv_exact, recv_until_eof, wait_for
from cppnp import ICppnpUsr, Task, ThreadPool
from cppnp.codec import LengthFieldCodec, LineCodec


class Recorder:
    """on_frame records each frame per connection and, if *echo*, sends it back framed."""

    def __init__(self, echo: bool = True) -> None:
        self.codec: Any = None
        self.echo = echo
        self.frames: dict[int, list[bytes]] = {}
        self.events: list[tuple[str, int]] = []
        self.lock = threading.Lock()
        self.conns: dict[int, Any] = {}

    def on_connection(self, conn: Any) -> None:
        with self.lock:
            self.frames[conn.id] = []
            self.conns[conn.id] = conn
            self.events.append(("open", conn.id))

    def on_frame(self, conn: Any, frame: bytes) -> None:
        with self.lock:
            self.frames[conn.id].append(frame)
        if self.echo:
            self.codec.send(conn, frame)

    def on_close(self, conn: Any) -> None:
        with self.lock:
            self.events.append(("close", conn.id))
            self.conns.pop(conn.id, None)

    def only_conn(self) -> Any:
        wait_for(lambda: len(self.conns) == 1)
        with self.lock:
            return next(iter(self.conns.values()))


def lf_encode(payload: bytes, header: int = 4, order: str = "big") -> bytes:
    return len(payload).to_bytes(header, order) + payload  # type: ignore[arg-type]


def serve_codec(serve: Any, kind: str, **kwargs: Any) -> tuple[ServerThread, Recorder, Any]:
    rec = Recorder(echo=kwargs.pop("echo", True))
    codec = (LengthFieldCodec if kind == "length" else LineCodec)(rec, **kwargs)
    rec.codec = codec
    return serve(codec), rec, codec


def test_codec_handler_requires_on_frame_and_forwards_callbacks() -> None:
    with pytest.raises(TypeError, match="on_frame"):
        LengthFieldCodec(object())
    with pytest.raises(TypeError, match="on_frame"):
        LineCodec(ICppnpUsr())
    rec = Recorder()
    codec = LengthFieldCodec(rec)
    assert isinstance(codec, ICppnpUsr)
    assert codec.on_connection == rec.on_connection and codec.on_close == rec.on_close
    # Not defined by the handler: the core skips them (no call at all).
    assert getattr(codec.on_write_complete, "__cppnp_noop__", False)
    assert codec.handler is rec


def test_codec_option_validation() -> None:
    rec = Recorder()
    for bad in (
        {"header_bytes": 0},
        {"header_bytes": 9},
        {"byteorder": "network"},
        {"max_frame": -1},
    ):
        with pytest.raises(ValueError):
            LengthFieldCodec(rec, **bad)
    with pytest.raises(ValueError):
        LineCodec(rec, delimiter=b"")
    with pytest.raises(ValueError):
        LineCodec(rec, max_line=-1)
    # The header caps the limit: 2 bytes say at most 65535; 4 bytes stay below the sign.
    assert LengthFieldCodec(rec, header_bytes=2).max_frame == 65535
    assert LengthFieldCodec(rec, header_bytes=4, max_frame=1 << 40).max_frame == (1 << 31) - 1


def test_encode_frames_and_rejects_oversize() -> None:
    rec = Recorder()
    codec = LengthFieldCodec(rec, max_frame=10)
    assert codec.encode(b"hello") == b"\x00\x00\x00\x05hello"
    assert codec.encode("é") == b"\x00\x00\x00\x02\xc3\xa9"
    assert codec.encode(b"") == b"\x00\x00\x00\x00"
    assert LengthFieldCodec(rec, header_bytes=2, byteorder="little").encode(b"ab") == b"\x02\x00ab"
    assert LengthFieldCodec(rec, header_bytes=8).encode(memoryview(b"xyz")) == lf_encode(b"xyz", 8)
    with pytest.raises(ValueError, match="exceeds max_frame 10"):
        codec.encode(b"x" * 11)
    lines = LineCodec(rec, delimiter=b"\r\n", max_line=4)
    assert lines.encode(b"abcd") == b"abcd\r\n"
    with pytest.raises(ValueError, match="contains the delimiter"):
        lines.encode(b"a\r\nb")
    with pytest.raises(ValueError, match="exceeds max_line 4"):
        lines.encode(b"abcde")


STREAMS = {
    "length": (
        {"header_bytes": 4},
        [b"", b"a", b"hello world", bytes(range(256)), b"\x00\x00\x00\x05"],
    ),
    "length-le2": (
        {"header_bytes": 2, "byteorder": "little"},
        [b"xy", b"", b"\n\r\n", b"z" * 300],
    ),
    "line": ({"delimiter": b"\n"}, [b"", b"one", b"two words", b"\r"]),
    "line-crlf": ({"delimiter": b"\r\n"}, [b"a\rb", b"", b"\nc", b"end"]),
}


def encode_all(kind: str, opts: dict[str, Any], frames: list[bytes]) -> bytes:
    if kind.startswith("length"):
        return b"".join(
            lf_encode(f, opts["header_bytes"], opts.get("byteorder", "big")) for f in frames
        )
    return b"".join(f + opts["delimiter"] for f in frames)


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_frames_split_at_every_byte_boundary(serve: Any, name: str) -> None:
    opts, frames = STREAMS[name]
    kind = "length" if name.startswith("length") else "line"
    stream = encode_all(name, opts, frames)
    st_, rec, codec = serve_codec(serve, kind, **opts)
    for cut in range(len(stream) + 1):
        with st_.connect() as s:
            conn = rec.only_conn()
            s.sendall(stream[:cut])
            wait_for(lambda c=conn, n=cut: c.bytes_received == n)  # a read of its own
            s.sendall(stream[cut:])
            assert recv_exact(s, len(stream)) == stream, cut  # echoed, re-framed
            assert rec.frames[conn.id] == frames, cut
        wait_for(lambda: not rec.conns)
    assert codec.protocol_errors == 0
    assert codec.frames_received == len(frames) * (len(stream) + 1)


@pytest.mark.parametrize("kind", ["length", "line"])
def test_many_frames_in_one_read(serve: Any, kind: str) -> None:
    opts: dict[str, Any] = {} if kind == "length" else {"delimiter": b"\n"}
    frames = [b"frame-%06d" % i * (i % 7 + 1) for i in range(5000)]
    stream = encode_all(kind, {"header_bytes": 4, "delimiter": b"\n"}, frames)
    st_, rec, codec = serve_codec(serve, kind, **opts)
    with st_.connect() as s:
        conn = rec.only_conn()
        s.sendall(stream)
        assert recv_exact(s, len(stream)) == stream
        assert rec.frames[conn.id] == frames
    assert codec.frames_received == len(frames)


def test_max_size_frame_passes_and_one_byte_more_closes(
    serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    limit = 1 << 20
    st_, rec, codec = serve_codec(serve, "length", max_frame=limit)
    big = bytes(range(256)) * (limit // 256)
    with st_.connect() as s:
        s.sendall(lf_encode(big))
        assert recv_exact(s, limit + 4) == lf_encode(big)
    wait_for(lambda: not rec.conns)
    with caplog.at_level(logging.WARNING, logger="cppnp"), st_.connect() as s:
        conn = rec.only_conn()
        # Only the header of an over-limit frame: the server must not wait for (or buffer)
        # the payload; it closes as soon as it reads the header.
        s.sendall((limit + 1).to_bytes(4, "big") + b"x" * 100)
        assert recv_until_eof(s) == b""
        wait_for(lambda: not rec.conns)
    assert codec.protocol_errors == 1
    assert rec.frames[conn.id] == []
    msgs = [r.getMessage() for r in caplog.records if r.name == "cppnp"]
    assert len(msgs) == 1 and "exceeds max_frame %d" % limit in msgs[0], msgs


def test_negative_header_is_a_protocol_error_after_the_good_frames(
    serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    st_, rec, codec = serve_codec(serve, "length", echo=False)
    with caplog.at_level(logging.WARNING, logger="cppnp"), st_.connect() as s:
        conn = rec.only_conn()
        s.sendall(lf_encode(b"ok1") + lf_encode(b"ok2") + struct.pack(">i", -5) + b"ok3" * 50)
        assert recv_until_eof(s) == b""
        wait_for(lambda: not rec.conns)
    assert rec.frames[conn.id] == [b"ok1", b"ok2"]
    assert codec.protocol_errors == 1
    assert any("negative frame length" in r.getMessage() for r in caplog.records)


def test_line_longer_than_max_line_closes_without_buffering_it(
    serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    st_, rec, codec = serve_codec(serve, "line", max_line=1000, delimiter=b"\r\n")
    with caplog.at_level(logging.WARNING, logger="cppnp"):
        with st_.connect() as s:  # exactly max_line: fine
            s.sendall(b"y" * 1000 + b"\r\n")
            assert recv_exact(s, 1002) == b"y" * 1000 + b"\r\n"
        with st_.connect() as s:  # max_line + 1, then the delimiter
            s.sendall(b"a\r\n" + b"z" * 1001 + b"\r\n")
            assert recv_until_eof(s) == b"a\r\n"
        wait_for(lambda: not rec.conns)
        with st_.connect() as s:  # garbage with no delimiter at all
            conn = rec.only_conn()
            try:
                for _ in range(64):  # 4 MiB: far over the limit
                    s.sendall(b"\x00\xff" * 32768)
            except (BrokenPipeError, ConnectionResetError):
                pass
            assert recv_until_eof(s) == b""
        wait_for(lambda: not rec.conns)
    assert rec.frames[conn.id] == []
    assert codec.protocol_errors == 2
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2, [r.getMessage() for r in warnings]
    assert all("no delimiter within max_line 1000" in r.getMessage() for r in warnings)


def test_garbage_closes_only_that_connection(serve: Any) -> None:
    st_, _rec, codec = serve_codec(serve, "length", max_frame=4096)
    with st_.connect() as good, st_.connect() as bad:
        bad.sendall(b"\x7f\xff\xff\xffGARBAGE")
        assert recv_until_eof(bad) == b""
        good.sendall(lf_encode(b"still served"))
        assert recv_exact(good, 16) == lf_encode(b"still served")
    assert codec.protocol_errors == 1


@pytest.fixture
def cppnp_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog, cleared at teardown: the records' tracebacks reference connections."""
    caplog.set_level(logging.ERROR, logger="cppnp")
    yield caplog
    for when in ("setup", "call", "teardown"):
        for record in caplog.get_records(when):
            record.exc_info = None


def test_on_frame_exception_is_counted_and_later_frames_still_arrive(
    serve: Any, cppnp_log: pytest.LogCaptureFixture
) -> None:
    class Flaky(Recorder):
        def on_frame(self, conn: Any, frame: bytes) -> None:
            if frame == b"boom":
                raise RuntimeError("boom")
            super().on_frame(conn, frame)

    rec = Flaky()
    codec = LineCodec(rec)
    rec.codec = codec
    st_ = serve(codec)
    with st_.connect() as s:
        s.sendall(b"a\nboom\nb\n")
        assert recv_exact(s, 4) == b"a\nb\n"
    assert st_.stats()["callback_errors"] == 1
    errors = [r for r in cppnp_log.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "on_frame of" in errors[0].getMessage()


class PoolReplier:
    """Each frame fans out to 8 pool tasks; every task sends 20 framed replies."""

    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool
        self.codec: Any = None

    def on_frame(self, conn: Any, frame: bytes) -> None:
        for t in range(8):
            self.pool.add_task(Task(self.reply, conn, frame, t))

    def reply(self, conn: Any, frame: bytes, t: int) -> None:
        for i in range(20):
            body = b"%s:%d:%d:" % (frame, t, i)
            self.codec.send(conn, body + bytes([t]) * (1000 * (i % 5) + t))


@pytest.mark.parametrize("kind", ["length", "line"])
def test_worker_sends_through_a_pool_keep_frames_intact(serve: Any, kind: str) -> None:
    pool = ThreadPool(4)
    pool.start()
    try:
        handler = PoolReplier(pool)
        codec: Any = LengthFieldCodec(handler) if kind == "length" else LineCodec(handler)
        handler.codec = codec
        st_ = serve(codec)
        requests = [b"req%d" % i for i in range(10)]
        expected = {
            b"%s:%d:%d:" % (r, t, i) + bytes([t]) * (1000 * (i % 5) + t)
            for r in requests
            for t in range(8)
            for i in range(20)
        }
        size = sum(len(codec.encode(e)) for e in expected)
        with st_.connect() as s:
            s.sendall(b"".join(codec.encode(r) for r in requests))
            data = recv_exact(s, size)
        got: list[bytes] = []
        pos = 0
        while pos < len(data):
            if kind == "length":
                n = int.from_bytes(data[pos : pos + 4], "big")
                got.append(data[pos + 4 : pos + 4 + n])
                pos += 4 + n
            else:
                end = data.index(b"\n", pos)
                got.append(data[pos:end])
                pos = end + 1
        assert len(got) == len(expected) and set(got) == expected
        # Per task, its 20 frames arrive in the order it sent them.
        for r in requests:
            for t in range(8):
                seq = [g for g in got if g.startswith(b"%s:%d:" % (r, t))]
                assert [int(g.split(b":")[2]) for g in seq] == list(range(20))
    finally:
        pool.stop()


# -- hypothesis: random streams and splits against a pure-Python model ---------------------


def model_length(stream: bytes, limit: int) -> tuple[list[bytes], bool]:
    frames: list[bytes] = []
    pos = 0
    while len(stream) - pos >= 4:
        n = int.from_bytes(stream[pos : pos + 4], "big")
        if n > limit:
            return frames, True
        if len(stream) - pos - 4 < n:
            break
        frames.append(stream[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return frames, False


def model_lines(stream: bytes, delim: bytes, limit: int) -> tuple[list[bytes], bool]:
    frames: list[bytes] = []
    pos = 0
    while True:
        end = stream.find(delim, pos)
        if end < 0 or end - pos > limit:
            return frames, len(stream) - pos >= limit + len(delim)
        frames.append(stream[pos:end])
        pos = end + len(delim)


_frame = st.binary(max_size=60).map(lambda b: ("frame", b))  # crosses both limits
# Exactly at and around the limits (48 for frames, 24 for lines).
_boundary = st.sampled_from([23, 24, 25, 47, 48, 49]).map(lambda n: ("frame", b"x" * n))
_raw = st.binary(min_size=1, max_size=8).map(lambda b: ("raw", b))
# one_of picks a branch uniformly: raw bytes (which usually desynchronise the stream) in
# 1 piece of 5, so most examples also reach the limits with intact framing.
pieces = st.one_of(_frame, _boundary, _frame, _boundary, _raw)


@pytest.mark.parametrize("kind", ["length", "line"])
def test_stream_matches_the_model(serve: Any, kind: str) -> None:
    """Random frames and raw bytes, cut at random points, against model_length/lines.

    One server per kind for all the examples (started here, so the leak check applies).
    """
    if kind == "length":
        st_, rec, codec = serve_codec(serve, "length", echo=False, max_frame=48)
    else:
        st_, rec, codec = serve_codec(serve, "line", echo=False, max_line=24, delimiter=b"\r\n")

    @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(parts=st.lists(pieces, max_size=12), cuts=st.lists(st.integers(0, 400), max_size=4))
    def check(parts: list[tuple[str, bytes]], cuts: list[int]) -> None:
        stream_matches_the_model(st_, rec, codec, kind, parts, cuts)

    check()


def stream_matches_the_model(
    st_: ServerThread,
    rec: Recorder,
    codec: Any,
    kind: str,
    parts: list[tuple[str, bytes]],
    cuts: list[int],
) -> None:
    if kind == "length":
        stream = b"".join(lf_encode(b) if k == "frame" else b for k, b in parts)
        frames, error = model_length(stream, 48)
    else:
        stream = b"".join(b + b"\r\n" if k == "frame" else b for k, b in parts)
        frames, error = model_lines(stream, b"\r\n", 24)
    errors_before = codec.protocol_errors
    with socket.create_connection(st_.address, timeout=10) as s:
        conn = wait_for(lambda: [c for c in list(rec.conns.values())])[0]
        points = sorted({c for c in cuts if c < len(stream)} | {0, len(stream)})
        sent = 0
        for a, b in zip(points, points[1:]):
            try:
                s.sendall(stream[a:b])
            except (BrokenPipeError, ConnectionResetError):
                break
            sent = b
            if error and conn.closed:
                break
            wait_for(lambda n=sent: conn.bytes_received == n or conn.closed)
        if error:
            assert recv_until_eof(s) == b""
        else:
            wait_for(lambda: len(rec.frames[conn.id]) == len(frames))
    wait_for(lambda: not rec.conns)
    assert rec.frames[conn.id] == frames
    assert codec.protocol_errors - errors_before == int(error)
