"""A Redis-protocol (RESP2) server on cppnp: ``python examples/resp_server.py --port 6380``.

Commands: PING, ECHO, SET (EX/PX/NX/XX/KEEPTTL), GET, DEL, EXISTS, INCR, DECR, INCRBY,
DECRBY, MGET, MSET, EXPIRE, PEXPIRE, TTL, PTTL, DBSIZE, FLUSHALL/FLUSHDB, CONFIG GET (an
empty answer), COMMAND (empty), SELECT 0, QUIT; inline commands (``PING\\r\\n`` typed into
telnet); redis-style error replies.  Values are strings (bytes); keys expire lazily on
access and actively (a sample every 100 ms), like redis.

How it uses cppnp: the loop thread parses each connection's input Buffer with the Buffer
helpers (``readline(b"\\r\\n")`` for the ``*N``/``$N`` headers, ``retrieve_as_bytes`` and
``read_uint16`` for the bulk strings), so no byte is copied twice and a command split over
any number of reads is resumed where it stopped (the parse state lives in
``conn.context``).  Every complete command of one read -- a pipeline -- is executed and
the replies go out in ONE ``conn.send`` per batch.  With ``--threads N`` the loop thread
still parses, and each batch runs on a ThreadPool keyed by the connection (replies stay in
order; the store is guarded by a lock).

Limits (protocol errors reply ``-ERR Protocol error: ...`` and close, like redis): a bulk
string of at most ``--max-bulk`` bytes (512 MiB, redis's proto-max-bulk-len), at most
``--max-multibulk`` arguments per command (1M), header and inline lines of at most 64 KiB.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from types import FrameType
from typing import Callable

from cppnp import Buffer, EventLoop, ICppnpUsr, TcpConnection, TcpServer, ThreadPool

MAX_BULK = 512 * 1024 * 1024
MAX_MULTIBULK = 1024 * 1024
MAX_INLINE = 64 * 1024
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1

OK = b"+OK\r\n"
PONG = b"+PONG\r\n"
NIL = b"$-1\r\n"
EMPTY_ARRAY = b"*0\r\n"
ERR_NOT_INT = b"-ERR value is not an integer or out of range\r\n"
ERR_SYNTAX = b"-ERR syntax error\r\n"
ZERO = b":0\r\n"
ONE = b":1\r\n"


def bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def integer(n: int) -> bytes:
    return b":%d\r\n" % n


def error(msg: str) -> bytes:
    return b"-ERR " + msg.encode("utf-8", "replace") + b"\r\n"


def _parse_int(arg: bytes) -> int | None:
    """A redis integer argument (int64, decimal, no spaces or '+'), or None."""
    if not arg or len(arg) > 20 or not (arg.isdigit() or (arg[0] == 45 and arg[1:].isdigit())):
        return None
    n = int(arg)
    if n < INT64_MIN or n > INT64_MAX:
        return None
    return n


class Store:
    """The keyspace and the commands: plain Python, shared by every connection.

    ``execute(argv)`` takes one command (a list of bytes, argv[0] the name) and returns
    its RESP reply.  Not thread-safe by itself: the cppnp server calls it on the loop
    thread, or (``--threads``) under ``self.lock``.
    """

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.expires: dict[bytes, float] = {}  # key -> deadline (monotonic seconds)
        self.lock = threading.Lock()
        c: dict[bytes, tuple[Callable[[list[bytes]], bytes], int]] = {}
        self._commands = c
        # name: (method, arity) -- redis arity: n exact, -n at least n (name included).
        for name, fn, arity in (
            (b"PING", self.ping, -1),
            (b"ECHO", self.echo, 2),
            (b"SET", self.set, -3),
            (b"GET", self.get, 2),
            (b"DEL", self.delete, -2),
            (b"EXISTS", self.exists, -2),
            (b"INCR", self.incr, 2),
            (b"DECR", self.decr, 2),
            (b"INCRBY", self.incrby, 3),
            (b"DECRBY", self.decrby, 3),
            (b"MGET", self.mget, -2),
            (b"MSET", self.mset, -3),
            (b"EXPIRE", self.expire, 3),
            (b"PEXPIRE", self.pexpire, 3),
            (b"TTL", self.ttl, 2),
            (b"PTTL", self.pttl, 2),
            (b"DBSIZE", self.dbsize, 1),
            (b"FLUSHALL", self.flushall, -1),
            (b"FLUSHDB", self.flushall, -1),
            (b"CONFIG", self.config, -2),
            (b"COMMAND", self.command, -1),
            (b"SELECT", self.select, 2),
        ):
            c[name] = (fn, arity)

    # -- dispatch ------------------------------------------------------------------------

    def execute(self, argv: list[bytes]) -> bytes:
        name = argv[0]
        entry = self._commands.get(name) or self._commands.get(name.upper())
        if entry is None:
            args = "".join("'%s' " % a[:128].decode("utf-8", "replace") for a in argv[1:])
            return error(
                "unknown command '%s', with args beginning with: %s"
                % (name[:128].decode("utf-8", "replace"), args)
            )
        fn, arity = entry
        n = len(argv)
        if (arity > 0 and n != arity) or n < -arity:
            return error(
                "wrong number of arguments for '%s' command"
                % name.decode("utf-8", "replace").lower()
            )
        return fn(argv)

    # -- keyspace helpers ----------------------------------------------------------------

    def _lookup(self, key: bytes) -> bytes | None:
        expires = self.expires
        if expires and key in expires and expires[key] <= time.monotonic():
            del expires[key]
            self.data.pop(key, None)
            return None
        return self.data.get(key)

    def _delete(self, key: bytes) -> bool:
        self.expires.pop(key, None)
        return self.data.pop(key, None) is not None

    def expire_cycle(self, sample: int = 200) -> int:
        """Remove up to *sample* expired keys (redis's active expiry, simplified)."""
        if not self.expires:
            return 0
        now = time.monotonic()
        dead = []
        for i, (key, when) in enumerate(self.expires.items()):
            if when <= now:
                dead.append(key)
            if i >= sample:
                break
        for key in dead:
            del self.expires[key]
            self.data.pop(key, None)
        return len(dead)

    def _purge_expired(self) -> None:
        now = time.monotonic()
        for key in [k for k, when in self.expires.items() if when <= now]:
            del self.expires[key]
            self.data.pop(key, None)

    # -- commands --------------------------------------------------------------------------

    def ping(self, argv: list[bytes]) -> bytes:
        if len(argv) == 1:
            return PONG
        if len(argv) == 2:
            return bulk(argv[1])
        return error("wrong number of arguments for 'ping' command")

    def echo(self, argv: list[bytes]) -> bytes:
        return bulk(argv[1])

    def get(self, argv: list[bytes]) -> bytes:
        value = self._lookup(argv[1]) if self.expires else self.data.get(argv[1])
        return NIL if value is None else b"$%d\r\n%s\r\n" % (len(value), value)

    def set(self, argv: list[bytes]) -> bytes:
        key = argv[1]
        if len(argv) == 3:  # the common case: SET key value
            self.data[key] = argv[2]
            if self.expires:
                self.expires.pop(key, None)
            return OK
        nx = xx = keepttl = False
        ttl: float | None = None
        i = 3
        while i < len(argv):
            opt = argv[i].upper()
            if opt == b"NX" and not xx:
                nx = True
            elif opt == b"XX" and not nx:
                xx = True
            elif opt == b"KEEPTTL" and ttl is None:
                keepttl = True
            elif opt in (b"EX", b"PX") and ttl is None and not keepttl and i + 1 < len(argv):
                n = _parse_int(argv[i + 1])
                if n is None:
                    return ERR_NOT_INT
                if n <= 0:
                    return error("invalid expire time in 'set' command")
                ttl = n if opt == b"EX" else n / 1000.0
                i += 1
            else:
                return ERR_SYNTAX
            i += 1
        exists = self._lookup(key) is not None
        if (nx and exists) or (xx and not exists):
            return NIL
        self.data[key] = argv[2]
        if ttl is not None:
            self.expires[key] = time.monotonic() + ttl
        elif not keepttl:
            self.expires.pop(key, None)
        return OK

    def delete(self, argv: list[bytes]) -> bytes:
        n = 0
        for key in argv[1:]:
            if self._lookup(key) is not None:
                self._delete(key)
                n += 1
        return integer(n)

    def exists(self, argv: list[bytes]) -> bytes:
        return integer(sum(1 for key in argv[1:] if self._lookup(key) is not None))

    def _incr(self, key: bytes, by: int) -> bytes:
        old = self._lookup(key)
        if old is None:
            value = 0
        else:
            value_or_none = _parse_int(old)
            if value_or_none is None:
                return ERR_NOT_INT
            value = value_or_none
        value += by
        if value < INT64_MIN or value > INT64_MAX:
            return error("increment or decrement would overflow")
        self.data[key] = b"%d" % value  # keeps its TTL, as in redis
        return b":%d\r\n" % value

    def incr(self, argv: list[bytes]) -> bytes:
        return self._incr(argv[1], 1)

    def decr(self, argv: list[bytes]) -> bytes:
        return self._incr(argv[1], -1)

    def incrby(self, argv: list[bytes]) -> bytes:
        by = _parse_int(argv[2])
        return ERR_NOT_INT if by is None else self._incr(argv[1], by)

    def decrby(self, argv: list[bytes]) -> bytes:
        by = _parse_int(argv[2])
        return ERR_NOT_INT if by is None or by == INT64_MIN else self._incr(argv[1], -by)

    def mget(self, argv: list[bytes]) -> bytes:
        out = [b"*%d\r\n" % (len(argv) - 1)]
        lookup = self._lookup if self.expires else self.data.get
        for key in argv[1:]:
            value = lookup(key)
            out.append(NIL if value is None else b"$%d\r\n%s\r\n" % (len(value), value))
        return b"".join(out)

    def mset(self, argv: list[bytes]) -> bytes:
        if len(argv) % 2 == 0:
            return error("wrong number of arguments for 'mset' command")
        data, expires = self.data, self.expires
        for i in range(1, len(argv), 2):
            data[argv[i]] = argv[i + 1]
            if expires:
                expires.pop(argv[i], None)
        return OK

    def _expire(self, argv: list[bytes], scale: float) -> bytes:
        n = _parse_int(argv[2])
        if n is None:
            return ERR_NOT_INT
        key = argv[1]
        if self._lookup(key) is None:
            return ZERO
        if n <= 0:
            self._delete(key)
        else:
            self.expires[key] = time.monotonic() + n * scale
        return ONE

    def expire(self, argv: list[bytes]) -> bytes:
        return self._expire(argv, 1.0)

    def pexpire(self, argv: list[bytes]) -> bytes:
        return self._expire(argv, 0.001)

    def _ttl_ms(self, key: bytes) -> int:
        if self._lookup(key) is None:
            return -2
        when = self.expires.get(key)
        if when is None:
            return -1
        return max(0, int((when - time.monotonic()) * 1000 + 0.5))

    def ttl(self, argv: list[bytes]) -> bytes:
        ms = self._ttl_ms(argv[1])
        return integer(ms if ms < 0 else (ms + 500) // 1000)

    def pttl(self, argv: list[bytes]) -> bytes:
        return integer(self._ttl_ms(argv[1]))

    def dbsize(self, argv: list[bytes]) -> bytes:
        if self.expires:
            self._purge_expired()
        return integer(len(self.data))

    def flushall(self, argv: list[bytes]) -> bytes:
        if len(argv) > 2 or (len(argv) == 2 and argv[1].upper() not in (b"ASYNC", b"SYNC")):
            return ERR_SYNTAX
        self.data.clear()
        self.expires.clear()
        return OK

    def config(self, argv: list[bytes]) -> bytes:
        sub = argv[1].upper()
        if sub == b"GET":
            if len(argv) < 3:
                return error("wrong number of arguments for 'config|get' command")
            return EMPTY_ARRAY  # no configuration to show
        return error(
            "unknown subcommand '%s'. Try CONFIG HELP." % argv[1][:128].decode("utf-8", "replace")
        )

    def command(self, argv: list[bytes]) -> bytes:
        return EMPTY_ARRAY

    def select(self, argv: list[bytes]) -> bytes:
        n = _parse_int(argv[1])
        if n is None:
            return ERR_NOT_INT
        return OK if n == 0 else error("DB index is out of range")


class _Parse:
    """Per-connection parse state, in ``conn.context``: a command resumes across reads."""

    __slots__ = ("argv", "bulk", "closing", "left")

    def __init__(self) -> None:
        self.argv: list[bytes] = []
        self.left = 0  # bulk strings still expected by the current *N command
        self.bulk = -1  # length of the bulk string whose $N header was read
        self.closing = False  # QUIT or a protocol error: ignore further input


class ProtocolError(Exception):
    pass


def parse_commands(
    st: _Parse,
    buf: Buffer,
    cmds: list[list[bytes]],
    max_bulk: int = MAX_BULK,
    max_multibulk: int = MAX_MULTIBULK,
) -> None:
    """Append every complete command in *buf* to *cmds*; a partial one stays in *st*/*buf*.

    Raises ProtocolError (message in redis's words) on malformed input or over a limit;
    *cmds* then holds the commands before the error.  Loop thread only (the Buffer belongs
    to the loop thread that passed it).
    """
    readline = buf.readline
    retrieve = buf.retrieve_as_bytes
    read_crlf = buf.read_uint16
    argv, left, n = st.argv, st.left, st.bulk  # locals in the loop, saved on exit
    try:
        while True:
            if n >= 0:  # waiting for a bulk string's bytes
                if len(buf) < n + 2:
                    return
                argv.append(retrieve(n))
                if read_crlf() != 0x0D0A:
                    raise ProtocolError("Protocol error: expected CRLF after bulk string")
                n = -1
                left -= 1
                if not left:
                    cmds.append(argv)
                    argv = []
                continue
            line = readline(b"\n")
            if line is None:
                if len(buf) > MAX_INLINE:
                    raise ProtocolError(
                        "Protocol error: too big inline request"
                        if not left
                        else "Protocol error: too big bulk count string"
                    )
                return
            if left:  # inside *N: expect $len
                if line[0] != 36:  # '$'
                    raise ProtocolError("Protocol error: expected '$', got '%s'" % chr(line[0]))
                try:
                    k = int(line[1:-2]) if line[-2] == 13 else -1
                except ValueError:
                    k = -1
                if k < 0 or k > max_bulk:
                    raise ProtocolError("Protocol error: invalid bulk length")
                n = k
                continue
            if line[0] == 42:  # '*': a multibulk command
                try:
                    k = int(line[1:-2]) if line[-2] == 13 else -2
                except ValueError:
                    k = -2
                if k < -1 or k > max_multibulk:
                    raise ProtocolError("Protocol error: invalid multibulk length")
                if k > 0:
                    left = k
                continue
            inline = line.split()  # an inline command (CRLF or LF)
            if inline:
                cmds.append(inline)
    finally:
        st.argv, st.left, st.bulk = argv, left, n


class RespServer(ICppnpUsr):
    """The cppnp handler: parse on the loop thread, execute, one send per batch."""

    def __init__(
        self,
        store: Store,
        pool: ThreadPool | None = None,
        *,
        max_bulk: int = MAX_BULK,
        max_multibulk: int = MAX_MULTIBULK,
    ) -> None:
        self.store = store
        self.pool = pool
        self.max_bulk = max_bulk
        self.max_multibulk = max_multibulk

    def on_connection(self, conn: TcpConnection) -> None:
        conn.context = _Parse()

    def on_message(self, conn: TcpConnection, buf: Buffer) -> None:
        st: _Parse = conn.context
        if st.closing:
            buf.retrieve_all()
            return
        failure = None
        cmds: list[list[bytes]] = []
        try:
            parse_commands(st, buf, cmds, self.max_bulk, self.max_multibulk)
        except ProtocolError as exc:
            st.argv = []
            failure = exc
            st.closing = True
            buf.retrieve_all()
        if self.pool is not None:
            if cmds or failure is not None:
                self.pool.add_task(self._run_locked, conn, cmds, failure, key=conn)
            return
        self._run(conn, cmds, failure)

    def _run_locked(
        self, conn: TcpConnection, cmds: list[list[bytes]], failure: ProtocolError | None
    ) -> None:
        with self.store.lock:
            self._run(conn, cmds, failure)

    def _run(
        self, conn: TcpConnection, cmds: list[list[bytes]], failure: ProtocolError | None
    ) -> None:
        execute = self.store.execute
        if len(cmds) == 1 and failure is None:  # no pipeline: no join
            argv = cmds[0]
            if len(argv[0]) == 4 and argv[0].upper() == b"QUIT":
                self._quit(conn, [OK])
            else:
                conn.send(execute(argv))
            return
        replies = []
        for argv in cmds:
            if len(argv[0]) == 4 and argv[0].upper() == b"QUIT":
                replies.append(OK)
                self._quit(conn, replies)
                return
            replies.append(execute(argv))
        if failure is not None:
            replies.append(b"-ERR " + str(failure).encode() + b"\r\n")
            self._quit(conn, replies)
            return
        if replies:
            conn.send(b"".join(replies))

    def _quit(self, conn: TcpConnection, replies: list[bytes]) -> None:
        context = conn.context
        if isinstance(context, _Parse):
            context.closing = True
        conn.send(b"".join(replies))
        conn.shutdown()  # after the replies; the client then closes


def serve(
    loop: EventLoop,
    host: str = "127.0.0.1",
    port: int = 6380,
    *,
    pool: ThreadPool | None = None,
    max_bulk: int = MAX_BULK,
    max_multibulk: int = MAX_MULTIBULK,
    reuse_port: bool = False,
) -> TcpServer:
    """Create and start the RESP server on *loop* (loop thread), with active expiry."""
    store = Store()
    handler = RespServer(store, pool, max_bulk=max_bulk, max_multibulk=max_multibulk)
    server = TcpServer(loop, (host, port), handler, name="resp", reuse_port=reuse_port)
    server.start()

    def expire_cycle() -> None:
        if pool is None:
            store.expire_cycle()
        else:
            with store.lock:
                store.expire_cycle()

    loop.run_every(0.1, expire_cycle)
    return server


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=6380)
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="run commands on a ThreadPool of N workers (0: on the loop thread)",
    )
    p.add_argument(
        "--max-bulk",
        type=int,
        default=MAX_BULK,
        help="largest bulk string accepted, bytes (default 512 MiB)",
    )
    p.add_argument(
        "--max-multibulk",
        type=int,
        default=MAX_MULTIBULK,
        help="most arguments per command (default 1M)",
    )
    args = p.parse_args(argv)

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    pool: ThreadPool | None = None
    if args.threads > 0:
        pool = ThreadPool(args.threads, name="resp-worker")
        pool.start()
    with EventLoop() as loop:
        server = serve(
            loop,
            args.host,
            args.port,
            pool=pool,
            max_bulk=args.max_bulk,
            max_multibulk=args.max_multibulk,
        )
        host, port = server.address
        print("listening on %s:%d" % (host, port), flush=True)
        try:
            loop.loop()
        except (KeyboardInterrupt, SystemExit):
            pass
        finally:
            server.stop()
            if pool is not None:
                pool.stop(drain=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
