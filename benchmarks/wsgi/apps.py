"""The benchmark apps: a plain WSGI hello, a Flask hello, an app that blocks 2 ms."""

from __future__ import annotations

import time
from typing import Any, Callable

from flask import Flask

_BODY = b"Hello, World!"
_HEADERS = [("Content-Type", "text/plain"), ("Content-Length", str(len(_BODY)))]


def hello(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("200 OK", _HEADERS)
    return [_BODY]


def block2ms(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    time.sleep(0.002)  # a blocking call (a database, an API): the GIL is released
    start_response("200 OK", _HEADERS)
    return [_BODY]


flask_app = Flask(__name__)


@flask_app.route("/")
def flask_hello() -> str:
    return "Hello, World!"
