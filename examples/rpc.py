"""Length-prefixed JSON RPC: a server whose methods run on a worker pool, and a TcpClient
that calls it.  Each frame is a 4-byte big-endian length and a JSON object:
request ``{"id": 1, "method": "add", "params": [2, 3]}``, reply ``{"id": 1, "result": 5}``
(or ``"error"``).  One connection's calls run in order (the pool keys tasks by it).

Usage: python examples/rpc.py serve PORT [THREADS]   (PORT 0 picks one; Ctrl-C stops)
       python examples/rpc.py call PORT N            (N calls, prints the results)
"""

from __future__ import annotations

import json
import sys
from typing import Any, Callable

from cppnp import EventLoop, IRun2, Task, TcpClient, TcpConnection, TcpServer, ThreadPool
from cppnp.codec import LengthFieldCodec

METHODS: dict[str, Callable[..., Any]] = {
    "add": lambda a, b: a + b,
    "mul": lambda a, b: a * b,
    "upper": lambda s: s.upper(),
}


class RpcServer(IRun2):
    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool
        self.codec = LengthFieldCodec(self)

    def on_frame(self, conn: TcpConnection, frame: bytes) -> None:  # loop thread
        self.pool.add_task(Task(self, frame, conn))

    def run2(self, frame: bytes, conn: TcpConnection) -> None:  # a worker thread
        try:
            req = json.loads(frame)
            reply: dict[str, Any] = {"id": req["id"]}
            reply["result"] = METHODS[req["method"]](*req["params"])
        except Exception as exc:  # a bad request gets an error reply, not a crash
            reply = {"id": _id(frame), "error": str(exc)}
        self.codec.send(conn, json.dumps(reply).encode())


def _id(frame: bytes) -> Any:
    try:
        return json.loads(frame).get("id")
    except Exception:
        return None


class RpcClient:
    """Sends *calls* once connected, collects the replies, then disconnects (loop thread)."""

    def __init__(self, loop: EventLoop, calls: list[tuple[str, list[Any]]]) -> None:
        self.loop = loop
        self.calls = calls
        self.results: dict[int, Any] = {}
        self.codec = LengthFieldCodec(self)
        self.failed: BaseException | None = None
        self.client: TcpClient | None = None

    def on_connection(self, conn: TcpConnection) -> None:
        for i, (method, params) in enumerate(self.calls):
            request = {"id": i, "method": method, "params": params}
            self.codec.send(conn, json.dumps(request).encode())

    def on_frame(self, conn: TcpConnection, frame: bytes) -> None:
        reply = json.loads(frame)
        self.results[reply["id"]] = reply.get("result", reply.get("error"))
        if len(self.results) == len(self.calls) and self.client is not None:
            self.client.disconnect()

    def on_close(self, conn: TcpConnection) -> None:
        self.loop.quit()

    def on_connect_error(self, client: Any, exc: BaseException) -> None:
        self.failed = exc
        self.loop.quit()


def serve(port: int, threads: int) -> None:
    with ThreadPool(threads) as pool, EventLoop() as loop:
        handler = RpcServer(pool)
        server = TcpServer(loop, ("127.0.0.1", port), handler.codec, name="rpc")
        server.start()
        print("listening on %s:%d" % server.address, flush=True)
        try:
            loop.loop()  # until Ctrl-C
        except KeyboardInterrupt:
            server.stop()


def call(port: int, n: int) -> int:
    calls: list[tuple[str, list[Any]]] = []
    for i in range(n):
        calls.append(("add", [i, i]) if i % 2 == 0 else ("upper", ["call %d" % i]))
    with EventLoop() as loop:
        rpc = RpcClient(loop, calls)
        rpc.client = TcpClient(loop, ("127.0.0.1", port), rpc.codec, retry=False)
        rpc.client.connect()
        loop.loop()  # until the replies are in and the connection closed
        rpc.client.stop()
    if rpc.failed is not None:
        print("cannot connect: %s" % rpc.failed, file=sys.stderr)
        return 1
    for i in range(n):
        print("%d %s%r -> %r" % (i, calls[i][0], tuple(calls[i][1]), rpc.results.get(i)))
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "serve":
        serve(int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 4)
    elif len(sys.argv) == 4 and sys.argv[1] == "call":
        sys.exit(call(int(sys.argv[2]), int(sys.argv[3])))
    else:
        sys.exit(__doc__)
