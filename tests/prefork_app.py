"""The server test_prefork.py runs under cppnp.serve() in a subprocess.

A line protocol on 127.0.0.1:
  ``pid``       -> ``pid <child pid>`` at once (loop thread);
  ``slow <id>`` -> ``ack <id> <pid>`` at once, then a pool task sleeps --work seconds and
                   sends ``done <id> <pid>``.
Prints ``ready <pid> <pid> ...`` (flushed) once every child listens; logs to stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from cppnp import Buffer, EventLoop, ICppnpUsr, TcpConnection, TcpServer, ThreadPool, serve
from cppnp.prefork import Supervisor


class LineServer(ICppnpUsr):
    def __init__(self, pool: ThreadPool, work: float) -> None:
        self.pool = pool
        self.work = work
        self.pid = os.getpid()

    def on_message(self, conn: TcpConnection, buf: Buffer) -> None:
        while True:
            eol = buf.find_eol()
            if eol < 0:
                return
            line = buf.retrieve_as_bytes(eol + 1).strip().decode()
            if line == "pid":
                conn.send("pid %d\n" % self.pid)
            elif line.startswith("slow "):
                ident = line.split()[1]
                conn.send("ack %s %d\n" % (ident, self.pid))
                self.pool.add_task(self.slow, ident, conn, key=conn)

    def slow(self, ident: str, conn: TcpConnection) -> None:
        time.sleep(self.work)
        conn.send("done %s %d\n" % (ident, self.pid))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--work", type=float, default=0.5)
    p.add_argument("--drain-timeout", type=float, default=20.0)
    p.add_argument("--no-reuse-port", action="store_true")
    p.add_argument(
        "--stop-when-ready", action="store_true", help="on_ready calls Supervisor.stop()"
    )
    args = p.parse_args()
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(process)d %(levelname)s %(message)s"
    )

    def make_server(loop: EventLoop) -> list[object]:
        pool = ThreadPool(args.threads, name="work")
        pool.start()
        server = TcpServer(
            loop,
            ("127.0.0.1", args.port),
            LineServer(pool, args.work),
            reuse_port=not args.no_reuse_port,
        )
        return [server, pool]

    def on_ready(sup: Supervisor) -> None:
        print("ready %s" % " ".join(str(pid) for pid in sup.pids), flush=True)
        if args.stop_when_ready:
            sup.stop()

    return serve(
        make_server, processes=args.processes, drain_timeout=args.drain_timeout, on_ready=on_ready
    )


if __name__ == "__main__":
    sys.exit(main())
