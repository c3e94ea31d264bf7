"""HTTP/1.1 on the WSGI server over raw sockets: keep-alive, pipelining, bodies, 100-continue,
HEAD, target forms, Host rules, request smuggling shapes, limits and timeouts."""

from __future__ import annotations

import json
import random
import socket
import time
from typing import Any
from wsgiref.validate import validator

import pytest

import wsgi_apps
from conftest import recv_until_eof, wait_for
from wsgi_support import MODE_IDS, MODES, Serve, exchange, get, one, read_response

ECHO = validator(wsgi_apps.echo)
HELLO = validator(wsgi_apps.hello)


def _json(resp: Any) -> dict[str, Any]:
    assert resp.status == 200, resp
    return dict(json.loads(resp.body))


# -- keep-alive and close ------------------------------------------------------------------------


@pytest.mark.parametrize("threads", MODES, ids=MODE_IDS)
def test_keep_alive_then_connection_close(wsgi: Serve, threads: int) -> None:
    w = wsgi(HELLO, threads=threads)
    raw = get() + get() + get(extra="Connection: close\r\n")
    responses, closed = exchange(w.address, raw, count=3)
    assert [r.body for r in responses] == [b"Hello, World!"] * 3
    assert [r.header("Connection") for r in responses] == [None, None, "close"]
    assert responses[0].raw_head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert responses[0].header("Date") is not None
    assert closed


@pytest.mark.parametrize("threads", MODES, ids=MODE_IDS)
def test_http10_keep_alive_rules(wsgi: Serve, threads: int) -> None:
    w = wsgi(validator(wsgi_apps.dispatch), threads=threads)
    # 1.0 without keep-alive: answered, then closed.
    (r,), closed = exchange(w.address, b"GET /hello HTTP/1.0\r\n\r\n")
    assert r.status == 200 and r.body == b"Hello, World!" and closed
    assert r.header("Connection") == "close"
    # 1.0 with keep-alive and a known length: kept open, told so.
    raw = b"GET /hello HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" * 2
    (r1, r2), closed = exchange(w.address, raw, count=2)
    assert r1.header("Connection") == "keep-alive" and r2.body == b"Hello, World!"
    assert not closed
    # 1.0 keep-alive but no Content-Length: no chunked for 1.0, the close ends the body.
    raw = b"GET /stream?size=100000&chunk=3000 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
    (r,), closed = exchange(w.address, raw)
    assert r.header("Transfer-Encoding") is None and r.header("Connection") == "close"
    assert r.body == b"x" * 100000 and closed


@pytest.mark.parametrize("threads", MODES, ids=MODE_IDS)
def test_chunked_response_without_content_length(wsgi: Serve, threads: int) -> None:
    w = wsgi(validator(wsgi_apps.stream), threads=threads)
    raw = get("/?size=300000&chunk=7000") + get("/?size=0&chunk=10")
    (r1, r2), closed = exchange(w.address, raw, count=2)
    assert r1.chunked and r1.body == b"x" * 300000
    # An empty iterable: the length is known after all (Content-Length: 0).
    assert r2.header("Content-Length") == "0" and r2.body == b""
    assert not closed


def test_pipelined_requests_answered_in_order_from_8_workers(wsgi: Serve) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        # Later requests finish sooner: only the per-connection order keeps them in line.
        n = int(environ["PATH_INFO"][1:])
        time.sleep((40 - n) * 0.0005 + random.random() * 0.001)
        data = b"%d:%s" % (n, environ["wsgi.input"].read(-1))
        start_response(
            "200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(data)))]
        )
        return [data]

    w = wsgi(validator(app), threads=8, max_pipeline=64)
    for _ in range(3):
        raw = b""
        for i in range(40):
            if i % 3 == 0:
                body = b"body%d" % i
                raw += b"POST /%d HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (
                    i,
                    len(body),
                    body,
                )
            else:
                raw += get("/%d" % i)
        with socket.create_connection(w.address, timeout=10) as s:
            # Several writes, split at odd places, to exercise the parser's resumption.
            cuts = sorted(random.sample(range(1, len(raw)), 10))
            for a, b in zip([0, *cuts], [*cuts, len(raw)]):
                s.sendall(raw[a:b])
            f = s.makefile("rb")
            got = [read_response(f).body for _ in range(40)]
        want = [b"%d:%s" % (i, b"body%d" % i if i % 3 == 0 else b"") for i in range(40)]
        assert got == want


def test_pipelining_pauses_reading_past_max_pipeline(wsgi: Serve) -> None:
    w = wsgi(validator(wsgi_apps.slow), threads=2, max_pipeline=4)
    raw = b"".join(get("/%d?ms=5" % i) for i in range(30))
    responses, closed = exchange(w.address, raw, count=30)
    assert [r.body for r in responses] == [b"/%d" % i for i in range(30)]
    assert not closed


# -- request bodies ------------------------------------------------------------------------------


@pytest.mark.parametrize("threads", MODES, ids=MODE_IDS)
def test_content_length_and_chunked_request_bodies(wsgi: Serve, threads: int) -> None:
    w = wsgi(ECHO, threads=threads)
    r = one(
        w.address,
        b"POST /cl HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\n"
        b"Content-Type: text/plain\r\n\r\nhello world",
    )
    info = _json(r)
    assert info["body"] == "hello world" and info["CONTENT_LENGTH"] == "11"
    assert info["CONTENT_TYPE"] == "text/plain"
    raw = (
        b"POST /ch HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    info = _json(one(w.address, raw))
    assert info["body"] == "hello world" and info["CONTENT_LENGTH"] == "11"
    raw = b"POST /e HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    info = _json(one(w.address, raw))
    assert info["body"] == "" and info["CONTENT_LENGTH"] == "0"


@pytest.mark.parametrize("threads", MODES, ids=MODE_IDS)
def test_body_sent_byte_by_byte(wsgi: Serve, threads: int) -> None:
    w = wsgi(ECHO, threads=threads)
    raw = (
        b"POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n"
    )
    with socket.create_connection(w.address, timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(raw)):
            s.send(raw[i : i + 1])
        info = _json(read_response(s.makefile("rb")))
    assert info["body"] == "abcdefg"


@pytest.mark.parametrize("threads", MODES, ids=MODE_IDS)
def test_expect_100_continue(wsgi: Serve, threads: int) -> None:
    w = wsgi(ECHO, threads=threads, max_body_size=1000)
    with socket.create_connection(w.address, timeout=10) as s:
        s.sendall(
            b"PUT /x HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        f = s.makefile("rb")
        interim = read_response(f)
        assert interim.status == 100 and interim.raw_head == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(b"abcde")
        assert _json(read_response(f))["body"] == "abcde"
    # Too large: refused at once, without 100, and closed.
    (r,), closed = exchange(
        w.address,
        b"PUT /x HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n",
    )
    assert r.status == 413 and closed
    # An expectation we cannot meet.
    (r,), closed = exchange(
        w.address, b"PUT /x HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nExpect: teapot\r\n\r\nx"
    )
    assert r.status == 417 and closed


def test_100_continue_waits_for_the_responses_owed(wsgi: Serve) -> None:
    w = wsgi(validator(wsgi_apps.dispatch), threads=2)
    with socket.create_connection(w.address, timeout=10) as s:
        s.sendall(
            get("/slow?ms=300") + b"PUT /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3"
            b"\r\nExpect: 100-continue\r\n\r\n"
        )
        f = s.makefile("rb")
        first = read_response(f)
        assert first.status == 200 and first.body == b"/slow"
        assert read_response(f).status == 100
        s.sendall(b"xyz")
        assert _json(read_response(f))["body"] == "xyz"


# -- HEAD, target forms, Host --------------------------------------------------------------------


@pytest.mark.parametrize("threads", MODES, ids=MODE_IDS)
def test_head(wsgi: Serve, threads: int) -> None:
    w = wsgi(validator(wsgi_apps.dispatch), threads=threads)
    with socket.create_connection(w.address, timeout=10) as s:
        s.sendall(
            b"HEAD /hello HTTP/1.1\r\nHost: t\r\n\r\n"
            b"HEAD /stream?size=5000 HTTP/1.1\r\nHost: t\r\n\r\n" + get("/hello")
        )
        f = s.makefile("rb")
        r1 = read_response(f, head_request=True)
        r2 = read_response(f, head_request=True)
        r3 = read_response(f)
    assert r1.status == 200 and r1.header("Content-Length") == "13"
    assert r2.status == 200 and r2.header("Transfer-Encoding") is None
    # No body bytes were sent for the HEADs: the next response parses cleanly.
    assert r3.body == b"Hello, World!"


@pytest.mark.parametrize("threads", MODES, ids=MODE_IDS)
def test_target_forms_and_path_decoding(wsgi: Serve, threads: int) -> None:
    w = wsgi(ECHO, threads=threads)
    info = _json(
        one(
            w.address,
            b"GET http://example.com:8080/a%20b/c?x=1&y=%41 HTTP/1.1\r\nHost: other\r\n\r\n",
        )
    )
    assert info["PATH_INFO"] == "/a b/c" and info["QUERY_STRING"] == "x=1&y=%41"
    assert info["HTTP_HOST"] == "example.com:8080"
    assert info["REQUEST_URI"] == "http://example.com:8080/a%20b/c?x=1&y=%41"
    # PEP 3333: the URL-decoded path's bytes, decoded as latin-1 (here UTF-8 of "é/ü").
    info = _json(one(w.address, get("/%C3%A9%2F%C3%BC?q=%C3%A9#frag")))
    assert info["PATH_INFO"] == "/\xc3\xa9/\xc3\xbc"
    assert info["PATH_INFO"].encode("latin-1").decode("utf-8") == "/é/ü"
    assert info["QUERY_STRING"] == "q=%C3%A9"
    assert info["SCRIPT_NAME"] == "" and info["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert info["REMOTE_ADDR"] == "127.0.0.1" and int(info["REMOTE_PORT"]) > 0
    assert info["SERVER_PORT"] == str(w.port) and info["SERVER_NAME"] == "127.0.0.1"
    # The app runs on several threads with a pool or with io loops (CPPNP_TEST_IO_THREADS).
    assert w.server is not None
    assert info["multithread"] is (threads > 0 or w.server.io_threads > 0)


def test_script_name(wsgi: Serve) -> None:
    w = wsgi(ECHO, threads=1, script_name="/app")
    info = _json(one(w.address, get("/app/x/y")))
    assert info["SCRIPT_NAME"] == "/app" and info["PATH_INFO"] == "/x/y"
    info = _json(one(w.address, get("/other")))
    assert info["SCRIPT_NAME"] == "" and info["PATH_INFO"] == "/other"


@pytest.mark.parametrize("threads", MODES, ids=MODE_IDS)
def test_duplicate_headers_are_joined(wsgi: Serve, threads: int) -> None:
    w = wsgi(ECHO, threads=threads)
    info = _json(
        one(
            w.address,
            b"GET / HTTP/1.1\r\nHost: t\r\nX-A: 1\r\nx-a: 2\r\nX-A: 3\r\n"
            b"Cookie: a=1\r\nCookie: b=2\r\nX_Under: dropped\r\n"
            b"X-Latin: \xe9\r\n\r\n",
        )
    )
    assert info["HTTP_X_A"] == "1,2,3"
    assert info["HTTP_COOKIE"] == "a=1; b=2"
    assert "HTTP_X_UNDER" not in info
    assert info["HTTP_X_LATIN"] == "\xe9"
    assert "HTTP_CONTENT_LENGTH" not in info and "HTTP_CONTENT_TYPE" not in info


# -- the request corpus (RFC 9112 edge cases) ----------------------------------------------------

H = b"Host: t\r\n"
CORPUS: list[tuple[str, bytes, int, bool]] = [
    # id, raw request, expected status, connection closed afterwards
    ("plain", b"GET / HTTP/1.1\r\n" + H + b"\r\n", 200, False),
    ("leading-crlf", b"\r\n\r\nGET / HTTP/1.1\r\n" + H + b"\r\n", 200, False),
    ("http10-no-host", b"GET / HTTP/1.0\r\n\r\n", 200, True),
    ("missing-host", b"GET / HTTP/1.1\r\n\r\n", 400, True),
    ("two-hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, True),
    ("two-hosts-same", b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", 400, True),
    ("bad-host-slash", b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", 400, True),
    ("bad-host-at", b"GET / HTTP/1.1\r\nHost: u@a\r\n\r\n", 400, True),
    ("host-ipv6", b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n", 200, False),
    ("empty-host", b"GET / HTTP/1.1\r\nHost:\r\n\r\n", 200, False),
    ("absolute-form", b"GET http://a.b/x HTTP/1.1\r\n\r\n", 200, False),
    ("absolute-userinfo", b"GET http://u@a.b/x HTTP/1.1\r\n" + H + b"\r\n", 400, True),
    ("bad-scheme", b"GET ftp://a.b/x HTTP/1.1\r\n" + H + b"\r\n", 400, True),
    ("asterisk", b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n", 200, False),
    ("connect", b"CONNECT a.b:443 HTTP/1.1\r\nHost: a.b:443\r\n\r\n", 405, True),
    (
        "cl-and-te",
        b"POST / HTTP/1.1\r\n"
        + H
        + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        True,
    ),
    (
        "te-and-cl",
        b"POST / HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        400,
        True,
    ),
    (
        "dup-cl-same",
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1\r\nContent-Length: 1\r\n\r\nx",
        400,
        True,
    ),
    (
        "dup-cl-diff",
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nxy",
        400,
        True,
    ),
    ("cl-list", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1, 1\r\n\r\nx", 400, True),
    ("cl-negative", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n", 400, True),
    ("cl-plus", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +1\r\n\r\nx", 400, True),
    ("cl-hex", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0x1\r\n\r\nx", 400, True),
    (
        "cl-overflow",
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 99999999999999999999999\r\n\r\n",
        400,
        True,
    ),
    ("cl-too-big", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1001\r\n\r\n", 413, True),
    (
        "chunk-size-bad",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        400,
        True,
    ),
    (
        "chunk-size-neg",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n-1\r\nabc\r\n0\r\n\r\n",
        400,
        True,
    ),
    (
        "chunk-size-overflow",
        b"POST / HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\n\r\nfffffffffffffffffffff\r\nx\r\n0\r\n\r\n",
        400,
        True,
    ),
    (
        "chunk-size-space",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3 \r\nabc\r\n0\r\n\r\n",
        400,
        True,
    ),
    (
        "chunk-lf-only",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\nabc\n0\n\n",
        400,
        True,
    ),
    (
        "chunk-too-big",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n7d0\r\n" + b"x" * 2000,
        413,
        True,
    ),
    ("te-gzip", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n\r\nabc", 400, True),
    (
        "te-chunked-not-last",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
        400,
        True,
    ),
    (
        "te-twice",
        b"POST / HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        True,
    ),
    (
        "te-identity",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: identity\r\n\r\n0\r\n\r\n",
        400,
        True,
    ),
    (
        "te-gzip-chunked",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        501,
        True,
    ),
    ("te-in-http10", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, True),
    ("obs-fold", b"GET / HTTP/1.1\r\n" + H + b"X-A: b\r\n c\r\n\r\n", 400, True),
    ("space-before-colon", b"GET / HTTP/1.1\r\nHost : t\r\n\r\n", 400, True),
    ("lf-only-lines", b"GET / HTTP/1.1\nHost: t\n\n", 400, True),
    ("bare-cr", b"GET / HTTP/1.1\r\nHost: t\rX: y\r\n\r\n", 400, True),
    ("nul-in-value", b"GET / HTTP/1.1\r\n" + H + b"X: a\x00b\r\n\r\n", 400, True),
    ("empty-header-name", b"GET / HTTP/1.1\r\n: a\r\n" + H + b"\r\n", 400, True),
    ("space-in-target", b"GET /a b HTTP/1.1\r\n" + H + b"\r\n", 400, True),
    ("utf8-in-target", "GET /é HTTP/1.1\r\nHost: t\r\n\r\n".encode(), 400, True),
    ("relative-target", b"GET a/b HTTP/1.1\r\n" + H + b"\r\n", 400, True),
    ("lowercase-method", b"get / HTTP/1.1\r\n" + H + b"\r\n", 400, True),
    ("unknown-method", b"FOO / HTTP/1.1\r\n" + H + b"\r\n", 400, True),
    ("http2-version", b"GET / HTTP/2.0\r\n" + H + b"\r\n", 505, True),
    ("http12-version", b"GET / HTTP/1.2\r\n" + H + b"\r\n", 400, True),
    ("h2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, True),
    ("garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400, True),
    ("get-with-body", b"GET / HTTP/1.1\r\n" + H + b"Content-Length: 2\r\n\r\nab", 200, False),
    ("connection-close", b"GET / HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n", 200, True),
    (
        "connection-ka-close",
        b"GET / HTTP/1.1\r\n" + H + b"Connection: keep-alive, close\r\n\r\n",
        200,
        True,
    ),
    (
        "upgrade-ignored",
        b"GET / HTTP/1.1\r\n" + H + b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        200,
        True,
    ),
    ("long-target", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n" + H + b"\r\n", 414, True),
    (
        "many-headers",
        b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-%d: v\r\n" % i for i in range(101)) + b"\r\n",
        431,
        True,
    ),
    ("huge-header", b"GET / HTTP/1.1\r\n" + H + b"X-Big: " + b"v" * 40000 + b"\r\n\r\n", 431, True),
    ("huge-header-name", b"GET / HTTP/1.1\r\n" + H + b"X" * 40000 + b": v\r\n\r\n", 431, True),
    (
        "expect-unknown",
        b"POST / HTTP/1.1\r\n" + H + b"Expect: x\r\nContent-Length: 1\r\n\r\nx",
        417,
        True,
    ),
]


@pytest.mark.parametrize("raw,status,closed", [c[1:] for c in CORPUS], ids=[c[0] for c in CORPUS])
def test_request_corpus(wsgi: Serve, raw: bytes, status: int, closed: bool) -> None:
    w = wsgi(validator(wsgi_apps.hello), threads=1, max_body_size=1000)
    (r,), was_closed = exchange(w.address, raw)
    assert r.status == status, r
    assert was_closed == closed
    if status >= 400:
        assert r.header("Connection") == "close"
        assert r.body == b"%d %s\n" % (status, r.reason.encode())


def test_error_answered_after_the_responses_owed(wsgi: Serve) -> None:
    w = wsgi(validator(wsgi_apps.slow), threads=2)
    raw = get("/a?ms=100") + get("/b?ms=10") + b"BROKEN\r\n\r\n"
    (r1, r2, r3), closed = exchange(w.address, raw, count=3)
    assert (r1.body, r2.body, r3.status) == (b"/a", b"/b", 400)
    assert closed


def test_error_on_a_client_still_sending_reaches_it(wsgi: Serve) -> None:
    # 413 while the client keeps sending its body: we half-close and drain, so it reads
    # the answer instead of getting a reset.
    w = wsgi(HELLO, threads=1, max_body_size=1000)
    with socket.create_connection(w.address, timeout=10) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(10):
            s.sendall(b"1000\r\n" + b"y" * 0x1000 + b"\r\n")
        data = recv_until_eof(s)
    assert data.startswith(b"HTTP/1.1 413 Content Too Large\r\n")


# -- timeouts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("threads", MODES, ids=MODE_IDS)
def test_header_timeout_is_408_and_close(wsgi: Serve, threads: int) -> None:
    w = wsgi(HELLO, threads=threads, header_timeout=0.3)
    with socket.create_connection(w.address, timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHo")
        data = recv_until_eof(s)
    assert data.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert b"Connection: close\r\n" in data
    # Still in the method: the same.
    with socket.create_connection(w.address, timeout=10) as s:
        s.sendall(b"GE")
        assert recv_until_eof(s).startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    # A connection that never sends a byte is closed without a response.
    with socket.create_connection(w.address, timeout=10) as s:
        assert recv_until_eof(s) == b""
    wait_for(lambda: w.connection_count() == 0)


@pytest.mark.parametrize("threads", MODES, ids=MODE_IDS)
def test_keepalive_idle_timeout_closes_quietly(wsgi: Serve, threads: int) -> None:
    w = wsgi(HELLO, threads=threads, keepalive_timeout=0.3)
    with socket.create_connection(w.address, timeout=10) as s:
        s.sendall(get())
        f = s.makefile("rb")
        assert read_response(f).body == b"Hello, World!"
        t0 = time.monotonic()
        assert f.read() == b""  # EOF, and no 408 for an idle connection
        assert time.monotonic() - t0 < 8
    wait_for(lambda: w.connection_count() == 0)


@pytest.mark.parametrize("threads", MODES, ids=MODE_IDS)
def test_body_timeout_is_408(wsgi: Serve, threads: int) -> None:
    w = wsgi(ECHO, threads=threads, body_timeout=0.3)
    with socket.create_connection(w.address, timeout=10) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc")
        data = recv_until_eof(s)
    assert data.startswith(b"HTTP/1.1 408 Request Timeout\r\n")


def test_slow_headers_within_the_timeout_are_fine(wsgi: Serve) -> None:
    w = wsgi(HELLO, threads=1, header_timeout=5.0)
    with socket.create_connection(w.address, timeout=10) as s:
        for piece in (b"GET / HT", b"TP/1.1\r\n", b"Host: t\r", b"\n\r\n"):
            s.sendall(piece)
            time.sleep(0.05)
        assert read_response(s.makefile("rb")).body == b"Hello, World!"
