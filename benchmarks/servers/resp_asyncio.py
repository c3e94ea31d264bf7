"""The RESP server of examples/resp_server.py on asyncio (``--uvloop``: on uvloop).

Same command engine (``Store`` imported from the example: the keyspace, the commands and
the reply encoding are byte-for-byte the same code), same resumable parser algorithm
(``*N``/``$N`` headers by a search for LF, bulk strings by length), same limits, and the
same batching: every complete command of one ``data_received`` is executed and the
replies go out in one ``transport.write``.  Only the I/O layer differs, which is what
``make bench-resp`` compares.  The input is kept as ``bytes`` (the chunk itself when
nothing is pending, the idiomatic fast path on asyncio) and a partial bulk string is not
re-joined until all of it has arrived.

Prints ``listening on HOST:PORT`` (flushed) when ready; runs until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples"))

from resp_server import (
    MAX_BULK,
    MAX_INLINE,
    MAX_MULTIBULK,
    OK,
    Store,
)


class ProtocolError(Exception):
    pass


class RespProtocol(asyncio.Protocol):
    def __init__(self, store: Store, max_bulk: int, max_multibulk: int) -> None:
        self.store = store
        self.max_bulk = max_bulk
        self.max_multibulk = max_multibulk
        self.transport: asyncio.Transport | None = None
        self.pending: list[bytes] = []  # unparsed input, joined only when needed
        self.pending_len = 0
        self.argv: list[bytes] = []
        self.left = 0
        self.bulk = -1
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if self.pending:
            self.pending.append(data)
            self.pending_len += len(data)
            if self.bulk >= 0 and self.pending_len < self.bulk + 2:
                return  # a large value still arriving: no join
            data = b"".join(self.pending)
            self.pending = []
            self.pending_len = 0
        cmds: list[list[bytes]] = []
        failure = None
        try:
            pos = self.parse(data, cmds)
        except ProtocolError as exc:
            failure = exc
            pos = len(data)
        if pos < len(data):
            rest = data[pos:]
            self.pending = [rest]
            self.pending_len = len(rest)
        self.run(cmds, failure)

    def parse(self, data: bytes, cmds: list[list[bytes]]) -> int:
        pos = 0
        end = len(data)
        find = data.find
        while True:
            n = self.bulk
            if n >= 0:
                if end - pos < n + 2:
                    return pos
                arg = data[pos : pos + n]
                if data[pos + n : pos + n + 2] != b"\r\n":
                    raise ProtocolError("Protocol error: expected CRLF after bulk string")
                pos += n + 2
                self.bulk = -1
                self.argv.append(arg)
                self.left -= 1
                if self.left == 0:
                    cmds.append(self.argv)
                    self.argv = []
                continue
            e = find(b"\n", pos)
            if e < 0:
                if end - pos > MAX_INLINE:
                    raise ProtocolError("Protocol error: too big inline request")
                return pos
            line = data[pos : e + 1]
            pos = e + 1
            if self.left:
                if line[0] != 36:
                    raise ProtocolError("Protocol error: expected '$', got '%s'" % chr(line[0]))
                try:
                    k = int(line[1:-2]) if line[-2] == 13 else -1
                except ValueError:
                    k = -1
                if k < 0 or k > self.max_bulk:
                    raise ProtocolError("Protocol error: invalid bulk length")
                self.bulk = k
                continue
            if line[0] == 42:
                try:
                    k = int(line[1:-2]) if line[-2] == 13 else -2
                except ValueError:
                    k = -2
                if k < -1 or k > self.max_multibulk:
                    raise ProtocolError("Protocol error: invalid multibulk length")
                if k > 0:
                    self.left = k
                continue
            argv = line.split()
            if argv:
                cmds.append(argv)

    def run(self, cmds: list[list[bytes]], failure: ProtocolError | None) -> None:
        transport = self.transport
        assert transport is not None
        execute = self.store.execute
        if len(cmds) == 1 and failure is None:
            argv = cmds[0]
            if len(argv[0]) == 4 and argv[0].upper() == b"QUIT":
                self.quit([OK])
            else:
                transport.write(execute(argv))
            return
        replies = []
        for argv in cmds:
            if len(argv[0]) == 4 and argv[0].upper() == b"QUIT":
                replies.append(OK)
                self.quit(replies)
                return
            replies.append(execute(argv))
        if failure is not None:
            replies.append(b"-ERR " + str(failure).encode() + b"\r\n")
            self.quit(replies)
            return
        if replies:
            transport.write(b"".join(replies))

    def quit(self, replies: list[bytes]) -> None:
        assert self.transport is not None
        self.closing = True
        self.transport.write(b"".join(replies))
        self.transport.close()  # after the buffered replies are written


async def main_async(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    store = Store()
    server = await loop.create_server(
        lambda: RespProtocol(store, args.max_bulk, args.max_multibulk),
        args.host,
        args.port,
        reuse_address=True,
    )
    port = server.sockets[0].getsockname()[1]
    print("listening on %s:%d" % (args.host, port), flush=True)

    def expire_cycle() -> None:
        store.expire_cycle()
        loop.call_later(0.1, expire_cycle)

    loop.call_later(0.1, expire_cycle)
    stop = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set_result, None)
    await stop
    server.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1", choices=["127.0.0.1", "::1"])
    p.add_argument("--port", type=int, default=6381)
    p.add_argument("--uvloop", action="store_true", help="run on uvloop")
    p.add_argument("--max-bulk", type=int, default=MAX_BULK)
    p.add_argument("--max-multibulk", type=int, default=MAX_MULTIBULK)
    args = p.parse_args()
    if args.uvloop:
        import uvloop

        uvloop.run(main_async(args))
    else:
        asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
