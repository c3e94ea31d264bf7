"""Handlers shared by the tests, and by the child processes some tests start
(``faults_support.child_env()`` puts this folder on their ``PYTHONPATH``).

A test that needs a variant (work in the pool, a gate, a model to check against) keeps
its own handler and says why in its docstring.
"""

from __future__ import annotations

from cppnp import Buffer, ICppnpUsr, TcpConnection


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
