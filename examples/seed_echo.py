"""The seed's EchoServer: on_message (loop thread) hands each message to a worker pool;
the worker sends it back through the loop.  One connection's tasks run in order.

Usage: python examples/seed_echo.py [PORT [THREADS]]
(default 9000 and 4 workers; THREADS 0: single-thread mode; Ctrl-C stops)
"""

import sys

from cppnp import Buffer, EventLoop, ICppnpUsr, IRun2, Task, TcpConnection, TcpServer, ThreadPool


class EchoServer(ICppnpUsr, IRun2):
    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool

    def on_message(self, conn: TcpConnection, buf: Buffer) -> None:  # loop thread
        # conn is the Task's param: the pool keys the task by it (in order per connection)
        # and the connection stays alive until the task has run.
        self.pool.add_task(Task(self, buf.retrieve_all(), conn))

    def run2(self, msg: bytes, conn: TcpConnection) -> None:  # a worker thread
        conn.send(msg)  # queued to the loop thread (the seed's Send -> QueueLoop)


def main(port: int, threads: int) -> None:
    with ThreadPool(threads) as pool, EventLoop() as loop:
        server = TcpServer(loop, ("127.0.0.1", port), EchoServer(pool), name="seed-echo")
        server.start()
        print("listening on %s:%d" % server.address, flush=True)
        try:
            loop.loop()  # until Ctrl-C
        except KeyboardInterrupt:
            server.stop()


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 9000
    main(port, int(sys.argv[2]) if len(sys.argv) > 2 else 4)
