"""WSGI server settings: one dataclass, shared by WsgiServer, serve() and the CLI."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["HELP", "Config"]

MAX_IO_THREADS = 1024  # TcpServer's limit (src/_core/includes/consts.pxd)


@dataclass
class Config:
    """Limits, timeouts and switches of a WsgiServer (every field has a CLI flag)."""

    threads: int = 4
    io_threads: int = 0
    backlog: int = 2048
    reuse_port: bool = False
    access_log: bool = False
    script_name: str = ""
    url_scheme: str = "http"
    max_request_line: int = 8190
    max_header_size: int = 32768
    max_headers: int = 100
    max_body_size: int = 1 << 30
    spool_threshold: int = 1 << 20
    header_timeout: float = 10.0
    keepalive_timeout: float = 5.0
    body_timeout: float = 30.0
    send_timeout: float = 30.0
    graceful_timeout: float = 30.0
    send_buffer: int = 1 << 20
    max_pipeline: int = 32
    sendfile: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("threads", "io_threads", "max_headers") and (
                not isinstance(value, int) or value < 0
            ):
                raise ValueError("%s must be an int >= 0, got %r" % (f.name, value))
            if f.name == "io_threads" and value > MAX_IO_THREADS:
                raise ValueError("io_threads must be at most %d, got %r" % (MAX_IO_THREADS, value))
            if f.name.startswith(("max_", "spool", "send_buffer", "backlog")) and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1
            ):
                raise ValueError("%s must be an int >= 1, got %r" % (f.name, value))
            if f.name.endswith("_timeout") and (
                not isinstance(value, (int, float)) or not value > 0
            ):
                raise ValueError("%s must be a number > 0, got %r" % (f.name, value))
        if self.script_name and (
            not self.script_name.startswith("/") or self.script_name.endswith("/")
        ):
            raise ValueError(
                "script_name must start with '/' and not end with it, got %r" % (self.script_name,)
            )

    def min_timeout(self) -> float:
        """The shortest of the timeouts (the sweep runs a few times per it).  Thread-safe."""
        return min(
            self.header_timeout, self.keepalive_timeout, self.body_timeout, self.send_timeout
        )


# Help text for each flag (the CLI adds the default).
HELP: dict[str, str] = {
    "threads": "worker threads that run the app; 0 runs it on the loop thread "
    "(for apps that never block)",
    "io_threads": "io loop threads that do the sockets and HTTP parsing, each connection on "
    "one of them; 0 does all I/O on the accepting loop's thread",
    "backlog": "listen() backlog",
    "reuse_port": "set SO_REUSEPORT on the listener",
    "access_log": "log one line per request on the 'cppnp.wsgi.access' logger (stderr)",
    "script_name": "SCRIPT_NAME: the URL prefix the app is mounted at (stripped from PATH_INFO)",
    "url_scheme": "wsgi.url_scheme (set 'https' behind a TLS-terminating proxy)",
    "max_request_line": "longest request target in bytes (414 beyond)",
    "max_header_size": "most bytes of request line + headers (431 beyond)",
    "max_headers": "most header fields in a request (431 beyond)",
    "max_body_size": "largest request body in bytes (413 beyond)",
    "spool_threshold": "request bodies larger than this are spooled to a temporary file",
    "header_timeout": "seconds to receive a request's line and headers (408 and close)",
    "keepalive_timeout": "seconds an idle keep-alive connection is kept",
    "body_timeout": "seconds without request-body bytes before the connection is dropped (408)",
    "send_timeout": "seconds a client may stop reading the response before it is dropped",
    "graceful_timeout": "on SIGTERM, seconds to finish in-flight requests before "
    "closing what is left",
    "send_buffer": "bytes of response queued for one connection before a streaming app "
    "waits (the high-water mark)",
    "max_pipeline": "pipelined requests parsed ahead of the one being answered before "
    "reading pauses",
    "sendfile": "serve wsgi.file_wrapper files with os.sendfile from the loop thread",
}
