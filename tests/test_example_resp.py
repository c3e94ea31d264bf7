"""examples/resp_server.py in a subprocess, driven by redis-py and by raw sockets.

Each server runs as ``python examples/resp_server.py --port 0`` (single-thread mode and
``--threads 2``) and must exit with code 0 and an empty stderr on SIGTERM.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from conftest import recv_exact, recv_until_eof, wait_for

EXAMPLE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "resp_server.py"
)


class RespProcess:
    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, EXAMPLE, "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        m = re.fullmatch(r"listening on ([\d.]+):(\d+)\n", line)
        if m is None:
            self.proc.kill()
            _, err = self.proc.communicate()
            pytest.fail("unexpected first line %r; stderr: %s" % (line, err))
        self.address = (m.group(1), int(m.group(2)))
        self.clients: list[redis.Redis] = []

    def client(self, **kwargs: Any) -> redis.Redis:
        # protocol=2: the example speaks RESP2 (redis-py 8 asks for RESP3 with HELLO).
        r = redis.Redis(
            host=self.address[0], port=self.address[1], socket_timeout=20, protocol=2, **kwargs
        )
        self.clients.append(r)
        return r

    def raw(self) -> socket.socket:
        return socket.create_connection(self.address, timeout=20)

    def finish(self) -> None:
        for r in self.clients:
            r.close()
        self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
            pytest.fail("resp_server did not exit on SIGTERM: %s" % err)
        assert self.proc.returncode == 0, err
        assert err == "", err


@pytest.fixture(params=[(), ("--threads", "2")], ids=["single", "pool2"])
def resp(request: pytest.FixtureRequest) -> Iterator[RespProcess]:
    server = RespProcess(*request.param)
    try:
        yield server
    finally:
        server.finish()


@pytest.fixture
def resp_small() -> Iterator[RespProcess]:
    """Small limits: bulk strings up to 1 KiB, at most 8 arguments."""
    server = RespProcess("--max-bulk", "1024", "--max-multibulk", "8")
    try:
        yield server
    finally:
        server.finish()


def test_strings_counters_and_keys(resp: RespProcess) -> None:
    r = resp.client()
    assert r.ping() is True
    assert r.echo("hé llo") == "hé llo".encode()
    assert r.set("k", "v") is True and r.get("k") == b"v"
    assert r.get("missing") is None
    assert r.set("k", "w", nx=True) is None and r.get("k") == b"v"
    assert r.set("new", "1", xx=True) is None and r.get("new") is None
    assert r.set("k", "w", xx=True) is True and r.get("k") == b"w"
    assert r.set("nx", "1", nx=True) is True
    assert r.set("bin", bytes(range(256))) and r.get("bin") == bytes(range(256))
    assert r.set("empty", b"") and r.get("empty") == b""
    assert r.exists("k", "nx", "missing", "k") == 3
    assert r.delete("k", "missing", "nx") == 2 and r.exists("k") == 0
    assert r.incr("n") == 1 and r.incr("n") == 2 and r.decr("n") == 1
    assert r.incrby("n", 41) == 42 and r.incrby("n", -50) == -8 and r.decr("fresh") == -1
    assert r.decrby("n", 2) == -10
    r.set("big", str(2**63 - 1))
    with pytest.raises(redis.ResponseError, match="overflow"):
        r.incr("big")
    assert r.mset({"a": "1", "b": "2", "c": "3"}) is True
    assert r.mget("a", "missing", "c") == [b"1", None, b"3"]
    assert r.dbsize() == 8  # bin empty n fresh big a b c
    assert r.flushall() is True and r.dbsize() == 0
    assert r.config_get("save") == {}
    assert r.execute_command("select", 0) is True


def test_error_replies_are_redis_style(resp: RespProcess) -> None:
    r = resp.client()
    with pytest.raises(redis.ResponseError) as info:
        r.execute_command("FOO", "bar", "baz")
    assert str(info.value) == "unknown command 'FOO', with args beginning with: 'bar' 'baz' "
    with pytest.raises(redis.ResponseError, match=r"^wrong number of arguments for 'get' command$"):
        r.execute_command("GET")
    with pytest.raises(
        redis.ResponseError, match=r"^wrong number of arguments for 'mset' command$"
    ):
        r.execute_command("MSET", "a", "1", "b")
    r.set("s", "abc")
    for cmd in (
        ("INCR", "s"),
        ("INCRBY", "n", "x"),
        ("INCRBY", "n", "1.5"),
        ("INCRBY", "n", "99999999999999999999"),
        ("EXPIRE", "s", "soon"),
        ("SET", "k", "v", "EX", "ten"),
    ):
        with pytest.raises(redis.ResponseError, match=r"^value is not an integer or out of range$"):
            r.execute_command(*cmd)
    with pytest.raises(redis.ResponseError, match=r"^syntax error$"):
        r.execute_command("SET", "k", "v", "NX", "XX")
    with pytest.raises(redis.ResponseError, match="invalid expire time"):
        r.execute_command("SET", "k", "v", "EX", "0")
    assert r.get("s") == b"abc"
    assert r.ping() is True  # the connection is still fine after every error


def test_expiry(resp: RespProcess) -> None:
    r = resp.client()
    assert r.set("ex", "1", ex=100) and 99 <= r.ttl("ex") <= 100
    assert r.set("px", "1", px=100_000) and 99_000 < r.pttl("px") <= 100_000
    assert r.ttl("missing") == -2
    r.set("plain", "1")
    assert r.ttl("plain") == -1
    assert r.expire("plain", 50) is True and 49 <= r.ttl("plain") <= 50
    assert r.expire("missing", 5) is False
    assert r.set("plain", "2") and r.ttl("plain") == -1  # SET clears the TTL
    r.set("kept", "1", ex=100)
    assert r.incr("cnt") == 1 and r.expire("cnt", 100)
    assert r.incr("cnt") == 2 and r.ttl("cnt") > 0  # INCR keeps it
    assert r.set("kept", "2", keepttl=True) and r.ttl("kept") > 0
    assert r.expire("ex", 0) is True and r.get("ex") is None  # <= 0 deletes
    # Short expiries: lazily on access and actively (DBSIZE drops without any access).
    # (The size is taken before the short keys exist: on a loaded machine some may already
    # have expired by the time a later DBSIZE is answered.)
    before = r.dbsize()
    for i in range(20):
        r.set("short%d" % i, "x", px=30)
    r.set("gone", "x", px=30)
    wait_for(lambda: r.get("gone") is None)
    wait_for(lambda: r.dbsize() == before)
    assert r.exists(*["short%d" % i for i in range(20)]) == 0


def test_pipelines(resp: RespProcess) -> None:
    r = resp.client()
    for size in (1, 16, 1000):
        pipe = r.pipeline(transaction=False)
        for i in range(size):
            pipe.set("p%d" % i, "v%d" % i)
            pipe.incr("ctr")
            pipe.get("p%d" % i)
        out = pipe.execute()
        assert out[0::3] == [True] * size
        assert out[2::3] == [b"v%d" % i for i in range(size)]
        assert out[1::3] == list(range(out[1], out[1] + size))
    # An error in the middle of a pipeline does not disturb the replies after it.
    pipe = r.pipeline(transaction=False)
    pipe.set("a", "1").execute_command("NOPE").get("a").incr("a")
    out = pipe.execute(raise_on_error=False)
    assert out[0] is True and isinstance(out[1], redis.ResponseError)
    assert out[2:] == [b"1", 2]


def test_concurrent_clients_pipelining(resp: RespProcess) -> None:
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            r = resp.client()
            for round_ in range(20):
                pipe = r.pipeline(transaction=False)
                for i in range(50):
                    pipe.set("c%d:%d" % (n, i), "%d" % round_)
                    pipe.incr("total")
                    pipe.get("c%d:%d" % (n, i))
                out = pipe.execute()
                assert out[2::3] == [b"%d" % round_] * 50
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert resp.client().get("total") == b"%d" % (8 * 20 * 50)


def test_inline_commands_and_quit(resp: RespProcess) -> None:
    with resp.raw() as s:
        s.sendall(b"PING\r\nSET  ik   iv\r\nGET ik\r\n\r\nECHO hi\r\nINCR ik\r\nget ik\n")
        expect = (
            b"+PONG\r\n+OK\r\n$2\r\niv\r\n$2\r\nhi\r\n"
            b"-ERR value is not an integer or out of range\r\n$2\r\niv\r\n"
        )
        assert recv_exact(s, len(expect)) == expect
        s.sendall(b"COMMAND\r\nCONFIG GET save\r\n")
        assert recv_exact(s, 8) == b"*0\r\n*0\r\n"
        s.sendall(b"QUIT\r\nPING\r\n")
        assert recv_until_eof(s) == b"+OK\r\n"  # nothing after QUIT is answered
    with resp.raw() as s:  # QUIT in a RESP pipeline
        s.sendall(b"*1\r\n$4\r\nPING\r\n*1\r\n$4\r\nquit\r\n*1\r\n$4\r\nPING\r\n")
        assert recv_until_eof(s) == b"+PONG\r\n+OK\r\n"


def test_command_split_at_every_byte_boundary(resp: RespProcess) -> None:
    cmds = (
        b"*3\r\n$3\r\nSET\r\n$5\r\nsplit\r\n$10\r\nab\r\ncd\r\nef\r\n"
        b"*2\r\n$3\r\nGET\r\n$5\r\nsplit\r\n"
        b"PING\r\n"
    )
    expect = b"+OK\r\n$10\r\nab\r\ncd\r\nef\r\n+PONG\r\n"
    with resp.raw() as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for cut in range(1, len(cmds)):
            s.sendall(cmds[:cut])
            time.sleep(0.002)  # usually a separate read; the result must not depend on it
            s.sendall(cmds[cut:])
            assert recv_exact(s, len(expect)) == expect, cut


@pytest.mark.parametrize(
    ("payload", "reply"),
    [
        (b"*2\r\n$3\r\nGET\r\n$2000\r\n", b"-ERR Protocol error: invalid bulk length\r\n"),
        (b"*2\r\n$3\r\nGET\r\n$-1\r\n", b"-ERR Protocol error: invalid bulk length\r\n"),
        (b"*2\r\n$3\r\nGET\r\n$x\r\n", b"-ERR Protocol error: invalid bulk length\r\n"),
        (b"*9\r\n", b"-ERR Protocol error: invalid multibulk length\r\n"),
        (b"*1x\r\n", b"-ERR Protocol error: invalid multibulk length\r\n"),
        (b"*1\r\n:3\r\n", b"-ERR Protocol error: expected '$', got ':'\r\n"),
        (b"*1\r\n$4\r\nPINGxx", b"-ERR Protocol error: expected CRLF after bulk string\r\n"),
        (b"x" * 70000, b"-ERR Protocol error: too big inline request\r\n"),
    ],
)
def test_protocol_errors_reply_and_close(
    resp_small: RespProcess, payload: bytes, reply: bytes
) -> None:
    with resp_small.raw() as s:
        s.sendall(b"PING\r\n" + payload)
        assert recv_until_eof(s) == b"+PONG\r\n" + reply
    r = resp_small.client()
    assert r.set("k", "x" * 1024) and r.get("k") == b"x" * 1024  # the limit itself is fine
    assert r.mset({"k%d" % i: "v" for i in range(3)}) is True  # 7 arguments


def test_large_value_in_many_reads(resp: RespProcess) -> None:
    value = os.urandom(8 << 20)
    r = resp.client()
    assert r.set("blob", value) is True
    assert r.get("blob") == value
    pipe = r.pipeline(transaction=False)
    pipe.set("b1", value[: 1 << 20]).get("blob").get("b1")
    assert pipe.execute() == [True, value, value[: 1 << 20]]
