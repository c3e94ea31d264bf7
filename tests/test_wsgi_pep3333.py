"""PEP 3333 on the WSGI server: environ, start_response/exc_info, write(), close(),
wsgi.input, wsgi.file_wrapper, errors; real clients (http.client, requests, urllib3, curl)
and a Flask app."""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any, Callable
from wsgiref.validate import validator

import pytest
import requests
import urllib3

import wsgi_apps
from conftest import recv_until_eof, wait_for
from wsgi_support import MODE_IDS, MODES, Serve, exchange, get, one, read_response


class Recorder:
    """An app that keeps each request's environ (and what it read from wsgi.input)."""

    def __init__(self) -> None:
        self.environs: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        inp = environ["wsgi.input"]
        body = inp.read(-1)
        environ["test.body"] = body
        environ["test.thread"] = threading.current_thread().name
        with self.lock:
            self.environs.append(environ)
        data = hashlib.sha256(body).hexdigest().encode()
        start_response(
            "200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(data)))]
        )
        return [data]


@pytest.mark.parametrize("threads", MODES, ids=MODE_IDS)
def test_environ_is_pep3333(wsgi: Serve, threads: int) -> None:
    rec = Recorder()
    w = wsgi(validator(rec), threads=threads)
    r = requests.post(
        w.url + "/p%41th/x?a=1&b=%20",
        data=b"payload",
        headers={"X-Multi": "1", "Content-Type": "text/x"},
        timeout=10,
    )
    assert r.status_code == 200 and r.text == hashlib.sha256(b"payload").hexdigest()
    (env,) = rec.environs
    assert env["REQUEST_METHOD"] == "POST"
    assert env["SCRIPT_NAME"] == "" and env["PATH_INFO"] == "/pAth/x"
    assert env["QUERY_STRING"] == "a=1&b=%20"
    assert env["CONTENT_TYPE"] == "text/x" and env["CONTENT_LENGTH"] == "7"
    assert env["SERVER_NAME"] == "127.0.0.1" and env["SERVER_PORT"] == str(w.port)
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert env["REMOTE_ADDR"] == "127.0.0.1"
    assert env["HTTP_HOST"] == "127.0.0.1:%d" % w.port and env["HTTP_X_MULTI"] == "1"
    assert env["wsgi.version"] == (1, 0) and env["wsgi.url_scheme"] == "http"
    assert w.server is not None
    multithread = threads > 0 or w.server.io_threads > 0  # CPPNP_TEST_IO_THREADS
    assert env["wsgi.multithread"] is multithread and env["wsgi.multiprocess"] is False
    assert env["wsgi.run_once"] is False and env["wsgi.input_terminated"] is True
    errors = env["wsgi.errors"]
    assert getattr(errors, "errors", errors) is sys.stderr  # validator wraps it
    assert env["test.body"] == b"payload"
    for key, value in env.items():
        if not key.startswith(("wsgi.", "test.")):
            assert type(value) is str, key
    if threads:
        assert env["test.thread"].startswith("cppnp-wsgi")
    elif w.server.io_threads:
        assert env["test.thread"].startswith("wsgi-127.0.0.1:0-io")  # on its io loop
    else:
        assert env["test.thread"] == "wsgi-loop"


@pytest.mark.parametrize("threads", MODES, ids=MODE_IDS)
def test_wsgi_input_api_and_spooling(wsgi: Serve, threads: int) -> None:
    seen: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        inp = environ["wsgi.input"]
        seen["spooled"] = not isinstance(getattr(inp, "input", inp), io.BytesIO)  # validated
        first = inp.readline()
        limited = inp.readline(3)
        rest_of_line = inp.readline()
        some = inp.read(5)
        lines = inp.readlines()
        seen["parts"] = (first, limited, rest_of_line, some, lines, inp.read(10), inp.read(-1))
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "0")])
        return []

    body = b"line one\nabcdef\n12345" + b"".join(b"row %d\n" % i for i in range(20000))
    for threshold, spooled in ((1 << 20, False), (1000, True)):
        w = wsgi(validator(app), threads=threads, spool_threshold=threshold)
        r = requests.post(w.url, data=body, timeout=10)
        assert r.status_code == 200
        first, limited, rest, some, lines, after, after2 = seen["parts"]
        assert seen["spooled"] is spooled
        assert (first, limited, rest, some) == (b"line one\n", b"abc", b"def\n", b"12345")
        assert b"".join(lines) == body[len(b"line one\nabcdef\n12345") :]
        assert after == b"" and after2 == b""
        w.stop()


@pytest.mark.parametrize("threads", MODES, ids=MODE_IDS)
def test_input_iteration_and_chunked_upload_spooled(wsgi: Serve, threads: int) -> None:
    got: list[bytes] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        got[:] = list(environ["wsgi.input"])
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]

    w = wsgi(validator(app), threads=threads, spool_threshold=4096)
    body = [b"%05d\n" % i for i in range(5000)]
    # A generator body: requests sends it chunked.
    r = requests.post(w.url, data=iter(body), timeout=10)
    assert r.status_code == 200 and got == body


@pytest.mark.parametrize("threads", MODES, ids=MODE_IDS)
def test_start_response_exc_info_before_headers_replaces_the_status(
    wsgi: Serve, threads: int
) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        try:
            raise ValueError("late failure")
        except ValueError:
            start_response(
                "503 Service Unavailable",
                [("Content-Type", "text/plain"), ("Retry-After", "1")],
                sys.exc_info(),
            )
        return [b"try later"]

    w = wsgi(validator(app), threads=threads)
    r = one(w.address, get())
    assert r.status == 503 and r.body == b"try later" and r.header("Retry-After") == "1"


@pytest.mark.parametrize("threads", MODES, ids=MODE_IDS)
def test_start_response_exc_info_after_headers_reraises_and_closes(
    wsgi: Serve, threads: int, caplog: pytest.LogCaptureFixture
) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"partial")
        try:
            raise KeyError("after the headers")
        except KeyError:
            start_response(
                "500 Internal Server Error", [("Content-Type", "text/plain")], sys.exc_info()
            )
        yield b"never"

    w = wsgi(validator(app), threads=threads)
    with caplog.at_level(logging.ERROR, logger="cppnp.wsgi"):
        with socket.create_connection(w.address, timeout=10) as s:
            s.sendall(get())
            data = recv_until_eof(s)
    # The status went out as 200 with the first chunk; then the connection was closed
    # without the chunked terminator, so the client knows the body is incomplete.
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert data.endswith(b"7\r\npartial\r\n")
    assert "after the headers" in caplog.text


@pytest.mark.parametrize("threads", MODES, ids=MODE_IDS)
def test_write_callable_and_iterable_mixed(wsgi: Serve, threads: int) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"one ")
        write(b"")
        write(b"two ")
        return [b"three"]

    w = wsgi(validator(app), threads=threads)
    (r1, r2), closed = exchange(w.address, get() + get(version="1.0"), count=2)
    assert r1.chunked and r1.body == b"one two three"
    assert r2.header("Transfer-Encoding") is None and r2.body == b"one two three"
    assert closed


class Closing:
    """An iterable with close(); fails at *fail_at* if given."""

    def __init__(self, log: list[str], chunks: list[bytes], fail_at: int = -1) -> None:
        self.log = log
        self.chunks = chunks
        self.fail_at = fail_at

    def __iter__(self) -> Iterator[bytes]:
        for i, c in enumerate(self.chunks):
            if i == self.fail_at:
                raise RuntimeError("iteration failed")
            yield c

    def close(self) -> None:
        self.log.append("closed")


@pytest.mark.parametrize("threads", MODES, ids=MODE_IDS)
def test_close_is_always_called(wsgi: Serve, threads: int) -> None:
    log: list[str] = []
    mode: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Any) -> Closing:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return Closing(log, [b"a" * 1000] * mode["n"], mode.get("fail", -1))

    w = wsgi(validator(app), threads=threads, send_buffer=4096, send_timeout=2.0)
    mode.update(n=3)
    assert one(w.address, get()).body == b"a" * 3000
    wait_for(lambda: log == ["closed"])
    mode.update(fail=2)  # raises after two chunks went out
    with socket.create_connection(w.address, timeout=10) as s:
        s.sendall(get())
        data = recv_until_eof(s)
    assert data.startswith(b"HTTP/1.1 200 OK") and not data.endswith(b"0\r\n\r\n")
    wait_for(lambda: log == ["closed"] * 2)
    mode.update(fail=-1)
    assert one(w.address, b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\n", head_request=True).status == 200
    wait_for(lambda: log == ["closed"] * 3)
    # The client vanishes in the middle of a long response.
    mode.update(n=20000)
    with socket.create_connection(w.address, timeout=10) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(get())
        s.recv(100)
    wait_for(lambda: log == ["closed"] * 4)
    wait_for(lambda: w.connection_count() == 0)


@pytest.mark.parametrize("threads", MODES, ids=MODE_IDS)
def test_app_exception_is_500_logged_not_sent(
    wsgi: Serve, threads: int, caplog: pytest.LogCaptureFixture
) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ["PATH_INFO"] == "/boom":
            raise RuntimeError("secret detail")
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]

    w = wsgi(app, threads=threads)
    with caplog.at_level(logging.ERROR, logger="cppnp.wsgi"):
        (r1, r2), closed = exchange(w.address, get("/boom") + get("/"), count=2)
    assert r1.status == 500 and b"secret" not in r1.raw_head + r1.body
    assert r1.body == b"500 Internal Server Error\n"
    assert r2.status == 200 and not closed  # nothing was sent: keep-alive survives
    assert "secret detail" in caplog.text and "Traceback" in caplog.text


@pytest.mark.parametrize("threads", MODES, ids=MODE_IDS)
def test_bad_responses_are_500(wsgi: Serve, threads: int, caplog: pytest.LogCaptureFixture) -> None:
    cases: dict[str, Callable[[Any], Any]] = {
        "/str-body": lambda sr: (sr("200 OK", []), ["text"])[1],
        "/crlf": lambda sr: (sr("200 OK", [("X-A", "a\r\nX-Evil: 1")]), [b""])[1],
        "/lf": lambda sr: (sr("200 OK", [("X-A", "a\nb")]), [b""])[1],
        "/non-latin1": lambda sr: (sr("200 OK", [("X-A", "\u20ac")]), [b""])[1],
        "/no-start": lambda sr: [b"x"],
        "/bad-status": lambda sr: (sr("OK", []), [b""])[1],
        "/twice": lambda sr: (sr("200 OK", []), sr("200 OK", []), [b""])[2],
        "/bad-cl": lambda sr: (sr("200 OK", [("Content-Length", "-3")]), [b""])[1],
    }

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        return cases[environ["PATH_INFO"]](start_response)

    w = wsgi(app, threads=threads)
    with caplog.at_level(logging.ERROR, logger="cppnp.wsgi"):
        for path in [*cases, *cases]:  # twice: a bad head is never remembered as good
            r = one(w.address, get(path))
            assert r.status == 500, path
            assert r.header("X-Evil") is None


@pytest.mark.parametrize("threads", MODES, ids=MODE_IDS)
def test_hop_by_hop_headers_from_the_app_are_dropped(wsgi: Serve, threads: int) -> None:
    """PEP 3333: the server owns the hop-by-hop headers; Connection: close from the app is
    honoured.  Each head is sent several times (the server caches heads by content)."""
    heads: dict[str, list[tuple[str, str]]] = {
        "/close": [("Content-Type", "text/plain"), ("Connection", "close")],
        "/te": [("Transfer-Encoding", "chunked"), ("Keep-Alive", "timeout=99")],
        "/cl": [("Content-Length", "2"), ("X-A", "1")],
        "/cl-te": [("content-length", "2"), ("Upgrade", "h2c"), ("TE", "trailers")],
    }

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", list(heads.get(environ["PATH_INFO"], heads["/cl"])))
        return [b"ok"]

    w = wsgi(app, threads=threads)
    for _ in range(3):
        (r,), closed = exchange(w.address, get("/close"))
        assert (r.status, r.body, r.header("Connection"), closed) == (200, b"ok", "close", True)
        assert r.header("Content-Length") == "2"
        for path in ("/te", "/cl", "/cl-te"):
            (r,), closed = exchange(w.address, get(path))
            assert (r.status, r.body, closed) == (200, b"ok", False), path
            names = {k.lower() for k, _ in r.headers}
            assert names.isdisjoint({"transfer-encoding", "keep-alive", "upgrade", "te"}), names
            assert r.header("Content-Length") == "2" and r.header("Connection") is None
        raw = get("/cl", version="1.0", extra="Connection: keep-alive\r\n")
        (r,), _ = exchange(w.address, raw, probe=False)
        assert r.header("Connection") == "keep-alive" and r.body == b"ok"


@pytest.mark.parametrize("threads", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("kind", ["sendfile", "no-sendfile", "bytesio", "offset", "short-cl"])
def test_file_wrapper(wsgi: Serve, tmp_path: Any, threads: int, kind: str) -> None:
    data = os.urandom(3 << 20) + b"end"
    path = tmp_path / "blob"
    path.write_bytes(data)
    opened: list[Any] = []

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        headers = [("Content-Type", "application/octet-stream")]
        f: Any = io.BytesIO(data) if kind == "bytesio" else open(path, "rb")
        if kind == "offset":
            f.read(1000)  # buffered: the file position is further on
        if kind == "short-cl":
            headers.append(("Content-Length", "5000"))
        opened.append(f)
        start_response("200 OK", headers)
        return environ["wsgi.file_wrapper"](f, 65536)

    # Not under wsgiref's validator: it wraps the iterable, which hides the file_wrapper.
    w = wsgi(app, threads=threads, sendfile=kind != "no-sendfile")
    with socket.create_connection(w.address, timeout=10) as s:
        s.sendall(get() + get())
        f = s.makefile("rb")
        r1 = read_response(f)
        r2 = read_response(f)
    want = data[1000:] if kind == "offset" else data[:5000] if kind == "short-cl" else data
    assert r1.body == want and r2.body == want
    if kind in ("sendfile", "offset", "short-cl"):
        assert r1.header("Content-Length") == str(len(want))
    else:
        assert r1.chunked  # iterated block by block, length unknown
    wait_for(lambda: len(opened) == 2 and all(f.closed for f in opened))


@pytest.mark.parametrize("threads", MODES, ids=MODE_IDS)
def test_sendfile_to_a_slow_reader(wsgi: Serve, tmp_path: Any, threads: int) -> None:
    data = os.urandom(8 << 20)
    path = tmp_path / "blob"
    path.write_bytes(data)

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return environ["wsgi.file_wrapper"](open(path, "rb"))

    w = wsgi(app, threads=threads)
    with socket.create_connection(w.address, timeout=10) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        s.sendall(get() + get())
        f = s.makefile("rb", buffering=0)
        r1 = read_response(io.BufferedReader(f, 8192))  # type: ignore[arg-type]
        assert hashlib.sha256(r1.body).digest() == hashlib.sha256(data).digest()


# -- real clients and a real framework -----------------------------------------------------------


@pytest.mark.parametrize("threads", MODES, ids=MODE_IDS)
def test_flask_app_with_requests(
    wsgi: Serve, threads: int, caplog: pytest.LogCaptureFixture
) -> None:
    # wsgiref's validator insists on wsgi.input.read(size) with a size, while Werkzeug reads
    # a terminated input with read(): bodies go to the bare app, the rest is validated.
    checked = wsgi(validator(wsgi_apps.flask_app), threads=threads)
    w = wsgi(wsgi_apps.flask_app, threads=threads)
    with requests.Session() as session:
        for _ in range(3):
            r = session.get(checked.url + "/", timeout=10)
            assert r.status_code == 200 and r.text == "Hello, World!"
        assert session.get(checked.url + "/missing", timeout=10).status_code == 404
        r = session.post(w.url + "/json", json={"k": [1, 2, "é"]}, timeout=10)
        assert r.json() == {
            "got": {"k": [1, 2, "é"]},
            "len": int(r.request.headers["Content-Length"]),
        }
        r = session.post(
            w.url + "/form",
            data={"a": "b c"},
            files={"up": ("f.bin", os.urandom(300000))},
            timeout=10,
        )
        assert r.json() == {"a": "b c", "files": ["up"]}
        with caplog.at_level(logging.ERROR):
            r = session.get(checked.url + "/boom", timeout=10)
        assert r.status_code == 500 and "boom" not in r.text
    # Flask logged the exception with its live traceback, whose frames (with threads=0 the
    # loop thread's own) reference the connection; pytest keeps the records until the
    # end of the test item.
    caplog.clear()


def test_urllib3_pool_reuses_connections(wsgi: Serve) -> None:
    w = wsgi(validator(wsgi_apps.echo), threads=4)
    pool = urllib3.HTTPConnectionPool("127.0.0.1", w.port, maxsize=2, block=True)
    try:
        ports = set()
        for i in range(30):
            r = pool.request("POST", "/u%d" % i, body=b"x" * i)
            info = json.loads(r.data)
            assert info["PATH_INFO"] == "/u%d" % i and info["body"] == "x" * i
            ports.add(info["REMOTE_PORT"])
        assert len(ports) == 1  # one keep-alive connection served all 30
        r = pool.request("GET", "/", preload_content=False)
        r.release_conn()
    finally:
        pool.close()


@pytest.mark.parametrize("threads", MODES, ids=MODE_IDS)
def test_http_client(wsgi: Serve, threads: int) -> None:
    w = wsgi(validator(wsgi_apps.dispatch), threads=threads)
    c = http.client.HTTPConnection("127.0.0.1", w.port, timeout=10)
    try:
        c.request("GET", "/stream?size=100000&chunk=999")
        r = c.getresponse()
        assert r.status == 200 and r.getheader("Transfer-Encoding") == "chunked"
        assert r.read() == b"x" * 100000
        c.request("POST", "/echo", body=b"abc", headers={"Content-Type": "a/b"})
        info = json.loads(c.getresponse().read())
        assert info["body"] == "abc" and info["CONTENT_TYPE"] == "a/b"
        c.request("HEAD", "/hello")
        r = c.getresponse()
        assert r.getheader("Content-Length") == "13" and r.read() == b""
    finally:
        c.close()


CURL = shutil.which("curl")


@pytest.mark.parametrize("threads", MODES, ids=MODE_IDS)
def test_curl(wsgi: Serve, threads: int, tmp_path: Any) -> None:
    assert CURL is not None, "curl is installed on the project's machines"
    w = wsgi(validator(wsgi_apps.dispatch), threads=threads)
    # curl is the client, not under test: without the sanitizer runtimes that
    # scripts/sanitize.sh preloads into every process (curl hangs under them).
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    out = subprocess.run(
        [CURL, "-sS", "--http1.1", w.url + "/hello", w.url + "/hello"],
        capture_output=True,
        timeout=30,
        check=True,
        env=env,
    )
    assert out.stdout == b"Hello, World!" * 2
    upload = tmp_path / "up"
    upload.write_bytes(b"q" * 200000)
    # -T - : a chunked upload, with Expect: 100-continue.
    with open(upload, "rb") as f:
        out = subprocess.run(
            [CURL, "-sS", "-H", "Expect: 100-continue", "-T", "-", w.url + "/echo"],
            stdin=f,
            capture_output=True,
            timeout=30,
            check=True,
            env=env,
        )
    info = json.loads(out.stdout)
    assert info["body"] == "q" * 200000 and info["HTTP_TRANSFER_ENCODING"] == "chunked"
    out = subprocess.run(
        [CURL, "-sS", "-I", w.url + "/hello"], capture_output=True, timeout=30, check=True, env=env
    )
    assert out.stdout.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Content-Length: 13\r\n" in out.stdout


def test_serve_from_python_with_sigterm() -> None:
    # serve() in a child: SIGTERM stops it gracefully with exit code 0.
    code = (
        "import wsgi_apps, cppnp.wsgi, sys\n"
        "cppnp.wsgi.serve(wsgi_apps.hello, '127.0.0.1', 0, threads=2, "
        "ready=lambda s: print(s.address[1], flush=True))\n"
        "print('bye', flush=True)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        r = one(("127.0.0.1", port), get())
        assert r.body == b"Hello, World!"
        proc.terminate()
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert out == b"bye\n"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize("threads", MODES, ids=MODE_IDS)
def test_access_log(wsgi: Serve, threads: int, caplog: pytest.LogCaptureFixture) -> None:
    w = wsgi(validator(wsgi_apps.dispatch), threads=threads, access_log=True)
    with caplog.at_level(logging.INFO, logger="cppnp.wsgi.access"):
        exchange(
            w.address,
            get("/hello?x=1", extra="User-Agent: tester\r\n")
            + b"HEAD /stream HTTP/1.1\r\nHost: t\r\n\r\n",
            count=1,
            probe=False,
        )
        wait_for(lambda: len([r for r in caplog.records if r.name == "cppnp.wsgi.access"]) >= 1)
    (line, *_) = [r.getMessage() for r in caplog.records if r.name == "cppnp.wsgi.access"]
    assert line.startswith("127.0.0.1 - - [")
    assert '"GET /hello?x=1 HTTP/1.1" 200 ' in line and '"tester"' in line
