"""WSGI apps used by the WSGI server tests (in process and in child processes)."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable
from urllib.parse import parse_qs

Start = Callable[..., Any]


def hello(environ: dict[str, Any], start_response: Start) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "13")])
    return [b"Hello, World!"]


app = hello


def echo(environ: dict[str, Any], start_response: Start) -> list[bytes]:
    """Reply with the environ's CGI keys and the body, as JSON."""
    body = environ["wsgi.input"].read(-1) if environ["REQUEST_METHOD"] != "GET" else b""
    info = {k: v for k, v in environ.items() if isinstance(v, str)}
    info["body"] = body.decode("latin-1")
    info["multithread"] = environ["wsgi.multithread"]
    data = json.dumps(info).encode()
    start_response(
        "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    )
    return [data]


def _query(environ: dict[str, Any], name: str, default: int) -> int:
    return int(parse_qs(environ.get("QUERY_STRING", "")).get(name, [default])[0])


def stream(environ: dict[str, Any], start_response: Start) -> Iterator[bytes]:
    """?size=N&chunk=M: N bytes in chunks of M, no Content-Length (chunked in 1.1)."""
    size = _query(environ, "size", 1 << 20)
    chunk = _query(environ, "chunk", 1 << 16)
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    block = b"x" * chunk
    left = size
    while left > 0:
        n = min(left, chunk)
        yield block if n == chunk else block[:n]
        left -= n


def big(environ: dict[str, Any], start_response: Start) -> Iterator[bytes]:
    """?mb=N: N MiB with a Content-Length, one 1 MiB block at a time."""
    mib = _query(environ, "mb", 1024)
    start_response(
        "200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(mib << 20))]
    )
    block = b"\xab" * (1 << 20)
    for _ in range(mib):
        yield block


def slow(environ: dict[str, Any], start_response: Start) -> list[bytes]:
    """?ms=N: sleep N ms (blocking) then answer with the path."""
    time.sleep(_query(environ, "ms", 200) / 1000.0)
    data = environ["PATH_INFO"].encode("latin-1")
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(data)))])
    return [data]


def pid(environ: dict[str, Any], start_response: Start) -> list[bytes]:
    data = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(data)))])
    return [data]


def procinfo(environ: dict[str, Any], start_response: Start) -> list[bytes]:
    """JSON: this process's pid, the thread that runs the app, wsgi.multiprocess and
    wsgi.multithread."""
    data = json.dumps(
        {
            "pid": os.getpid(),
            "thread": threading.current_thread().name,
            "multiprocess": environ["wsgi.multiprocess"],
            "multithread": environ["wsgi.multithread"],
        }
    ).encode()
    start_response(
        "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    )
    return [data]


def inflight(environ: dict[str, Any], start_response: Start) -> list[bytes]:
    """/inflight/NAME?ms=N: create NAME in $WSGI_MARK_DIR (the request is in the app), sleep
    N ms, answer with NAME and the pid."""
    name = environ["PATH_INFO"].rsplit("/", 1)[-1]
    with open(os.path.join(os.environ["WSGI_MARK_DIR"], name), "w"):
        pass
    time.sleep(_query(environ, "ms", 500) / 1000.0)
    data = ("%s %d" % (name, os.getpid())).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(data)))])
    return [data]


def dispatch(environ: dict[str, Any], start_response: Start) -> Any:
    """Route by the first path segment to the apps above (for child-process tests)."""
    first = environ["PATH_INFO"].split("/")[1] if environ["PATH_INFO"] != "/" else "hello"
    target = {
        "hello": hello,
        "echo": echo,
        "stream": stream,
        "big": big,
        "slow": slow,
        "pid": pid,
        "procinfo": procinfo,
        "inflight": inflight,
    }.get(first, hello)
    return target(environ, start_response)


try:
    from flask import Flask, request

    flask_app = Flask(__name__)

    @flask_app.route("/")
    def flask_hello() -> str:
        return "Hello, World!"

    @flask_app.route("/json", methods=["POST"])
    def flask_json() -> Any:
        data = request.get_json()
        return {"got": data, "len": request.content_length}

    @flask_app.route("/form", methods=["POST"])
    def flask_form() -> Any:
        return {"a": request.form.get("a"), "files": sorted(request.files)}

    @flask_app.route("/boom")
    def flask_boom() -> str:
        raise RuntimeError("boom")
except ImportError:  # pragma: no cover - Flask is a test dependency
    flask_app = None  # type: ignore[assignment]
