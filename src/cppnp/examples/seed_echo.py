"""The seed's EchoServer: on_message hands each message to the pool; a worker computes
fib(n), logs it with its thread id, and sends the message back through the loop."""

from __future__ import annotations

import logging
import threading

from cppnp import Buffer, ICppnpUsr, IRun2, Task, TcpConnection, ThreadPool

log = logging.getLogger("cppnp.examples.echo")


def fib(n: int) -> int:
    """Deliberately slow recursive Fibonacci: the seed's stand-in for CPU work."""
    return n if n < 2 else fib(n - 1) + fib(n - 2)


class EchoServer(ICppnpUsr, IRun2):
    """EchoServer::OnMessage (loop thread) and EchoServer::run2 (a worker)."""

    def __init__(self, pool: ThreadPool, fib_n: int = 30) -> None:
        self.pool = pool
        self.fib_n = fib_n

    def on_message(self, conn: TcpConnection, buf: Buffer) -> None:
        msg = buf.retrieve_all()
        # The connection is the Task's param: the pool counts the task on it (the
        # connection outlives it) and runs one connection's tasks in order.
        self.pool.add_task(Task(self, msg, conn))

    def run2(self, msg: bytes, param: TcpConnection) -> None:
        if self.fib_n > 0:
            result = fib(self.fib_n)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("fib(%d) = %d on thread %d", self.fib_n, result,
                          threading.get_ident())
        param.send(msg)   # queued to the loop thread (the seed's Send -> QueueLoop)
