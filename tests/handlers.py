"""Handlers shared by the tests, and by the child processes some tests start
(``faults_support.child_env()`` puts this folder on their ``PYTHONPATH``), and
``serve_in_thread``, the server-in-a-loop-thread set-up both use (this module does not
import pytest, so children can import it).

A test that needs a variant (work in the pool, a gate, a model to check against) keeps
its own handler and says why in its docstring.
"""

from __future__ import annotations

from typing import Any

from cppnp import Buffer, EventLoop, EventLoopThread, ICppnpUsr, TcpConnection, TcpServer


def serve_in_thread(
    handler: Any, thread_name: str = "test-loop", **kwargs: Any
) -> tuple[EventLoopThread, EventLoop, TcpServer]:
    """A started TcpServer(loop, ("127.0.0.1", 0), *handler*, **kwargs) on the loop of a
    started EventLoopThread: (thread, loop, server).  In-process tests use conftest's
    ``serve`` fixture (which stops it at teardown)."""
    box: list[TcpServer] = []

    def init(loop: EventLoop) -> None:
        server = TcpServer(loop, ("127.0.0.1", 0), handler, **kwargs)
        box.append(server)
        server.start()

    thread = EventLoopThread(init, name=thread_name)
    loop = thread.start()
    return thread, loop, box[0]


class Echo(ICppnpUsr):
    """Sends every byte back as it arrives, on the loop thread."""

    def on_message(self, conn: TcpConnection, buf: Buffer) -> None:
        conn.send(buf.retrieve_all())


class RecordingEcho(Echo):
    """Echo, recording what each connection did (counts taken in on_close).  Callbacks run
    on the loop thread only, so the lists need no lock."""

    def __init__(self) -> None:
        self.messages = 0
        self.opened: list[int] = []
        self.closed: list[tuple[int, int, int]] = []

    def on_connection(self, conn: TcpConnection) -> None:
        self.opened.append(conn.id)

    def on_message(self, conn: TcpConnection, buf: Buffer) -> None:
        self.messages += 1
        super().on_message(conn, buf)

    def on_close(self, conn: TcpConnection) -> None:
        self.closed.append((conn.id, conn.bytes_received, conn.bytes_sent))


class Keeper(ICppnpUsr):
    """Keeps every new connection in ``self.conns`` (appended on the loop thread)."""

    def __init__(self) -> None:
        self.conns: list[TcpConnection] = []

    def on_connection(self, conn: TcpConnection) -> None:
        self.conns.append(conn)
