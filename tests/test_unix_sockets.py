"""Unix domain sockets for TcpServer and TcpClient (issue 10 item 2): stale and live
socket files, a non-socket file, the abstract namespace, unix_mode, unlink on stop,
io_threads; real AF_UNIX sockets."""

from __future__ import annotations

import os
import socket
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from conftest import call_in_loop, wait_for
from cppnp import Buffer, EventLoop, EventLoopThread, ICppnpUsr, TcpClient, TcpConnection, TcpServer
from handlers import Echo


def start_server(loop: EventLoop, address: Any, **kw: Any) -> TcpServer:
    def make() -> TcpServer:
        srv = TcpServer(loop, address, Echo(), **kw)
        srv.start()
        return srv

    return call_in_loop(loop, make)


def stop_server(loop: EventLoop, srv: TcpServer) -> None:
    call_in_loop(loop, srv.stop)
    wait_for(lambda: not srv.accepting)


def echo_once(address: Any, payload: bytes = b"ping over unix") -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(address)
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


@pytest.fixture(params=[0, 2], ids=["io0", "io2"])
def io(request: pytest.FixtureRequest) -> int:
    return int(request.param)


def test_echo_on_path_and_unlink_on_stop(loop_thread: EventLoop, tmp_path: Path, io: int) -> None:
    path = str(tmp_path / "echo.sock")
    srv = start_server(loop_thread, path, io_threads=io)
    assert srv.address == path and srv.name == "TcpServer-unix:" + path
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    for _ in range(3):
        assert echo_once(path) == b"ping over unix"
    stop_server(loop_thread, srv)
    wait_for(lambda: not os.path.exists(path))


def test_pathlike_and_bytes_address(loop_thread: EventLoop, tmp_path: Path) -> None:
    p = tmp_path / "pl.sock"
    srv = start_server(loop_thread, p)
    assert echo_once(str(p)) == b"ping over unix"
    stop_server(loop_thread, srv)
    b = os.fsencode(str(tmp_path / "b.sock"))
    srv = start_server(loop_thread, b)
    assert echo_once(b) == b"ping over unix"
    stop_server(loop_thread, srv)
    wait_for(lambda: not os.path.exists(b))


def test_stale_file_is_replaced(loop_thread: EventLoop, tmp_path: Path) -> None:
    """A socket file whose listener is gone (a dead process's): removed, then bound."""
    path = str(tmp_path / "stale.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.listen(1)
    dead.close()  # the file stays; a connect is refused
    assert os.path.exists(path)
    srv = start_server(loop_thread, path)
    assert echo_once(path) == b"ping over unix"
    stop_server(loop_thread, srv)


def test_live_file_is_refused(loop_thread: EventLoop, tmp_path: Path) -> None:
    path = str(tmp_path / "live.sock")
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(path)
    live.listen(1)
    try:
        with pytest.raises(OSError, match="live server"):
            start_server(loop_thread, path)
        assert os.path.exists(path)  # not removed
    finally:
        live.close()
        os.unlink(path)


def test_non_socket_file_is_refused(loop_thread: EventLoop, tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="not a socket"):
        start_server(loop_thread, str(path))
    assert path.read_bytes() == b"keep me"


def test_unix_mode(loop_thread: EventLoop, tmp_path: Path) -> None:
    path = str(tmp_path / "mode.sock")
    srv = start_server(loop_thread, path, unix_mode=0o600)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    stop_server(loop_thread, srv)
    srv = start_server(loop_thread, path, unix_mode=0o666)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666
    stop_server(loop_thread, srv)
    with pytest.raises(ValueError):
        TcpServer(loop_thread, ("127.0.0.1", 0), Echo(), unix_mode=0o600)


def test_abstract_namespace(loop_thread: EventLoop, io: int) -> None:
    name = "\0cppnp-test-%d-%d" % (os.getpid(), io)
    srv = start_server(loop_thread, name, io_threads=io)
    assert echo_once(name) == b"ping over unix"
    stop_server(loop_thread, srv)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        with pytest.raises(ConnectionRefusedError):
            s.connect(name)


class Collect(ICppnpUsr):
    def __init__(self) -> None:
        self.data = bytearray()
        self.lock = threading.Lock()
        self.peers: list[Any] = []
        self.names: list[str] = []
        self.errors: list[BaseException] = []

    def on_connection(self, conn: TcpConnection) -> None:
        self.peers.append(conn.peer_address)
        self.names.append(conn.name)

    def on_message(self, conn: TcpConnection, buf: Buffer) -> None:
        with self.lock:
            self.data += buf.retrieve_all()

    def on_connect_error(self, client: Any, exc: BaseException) -> None:
        self.errors.append(exc)

    def received(self) -> bytes:
        with self.lock:
            return bytes(self.data)


def test_tcp_client_over_unix(loop_thread: EventLoop, tmp_path: Path, io: int) -> None:
    path = str(tmp_path / "cli.sock")
    srv = start_server(loop_thread, path, io_threads=io)
    h = Collect()
    client = call_in_loop(loop_thread, lambda: TcpClient(loop_thread, path, h))
    client.connect()
    wait_for(lambda: client.connected)
    assert h.peers == [path] and h.names[0].startswith("TcpClient-unix:" + path)
    payload = os.urandom(300_000)
    client.connection.send(payload)  # type: ignore[union-attr]
    wait_for(lambda: h.received() == payload)
    client.stop()
    wait_for(lambda: client.connection is None)
    stop_server(loop_thread, srv)


def test_tcp_client_unix_refused_and_abstract(loop_thread: EventLoop, tmp_path: Path) -> None:
    h = Collect()
    missing = str(tmp_path / "missing.sock")
    client = call_in_loop(loop_thread, lambda: TcpClient(loop_thread, missing, h, retry=False))
    client.connect()
    wait_for(lambda: len(h.errors) == 1)
    assert isinstance(h.errors[0], FileNotFoundError)
    name = b"\0cppnp-cli-%d" % os.getpid()
    srv = start_server(loop_thread, name)
    h2 = Collect()
    client2 = call_in_loop(loop_thread, lambda: TcpClient(loop_thread, name, h2))
    client2.connect()
    wait_for(lambda: client2.connected)
    assert h2.peers == [name]
    client2.stop()
    wait_for(lambda: client2.connection is None)
    stop_server(loop_thread, srv)


def test_accepted_peer_address_is_unnamed(tmp_path: Path) -> None:
    path = str(tmp_path / "peer.sock")
    h = Collect()
    lt = EventLoopThread(name="unix-peer")
    lp = lt.start()
    try:

        def make() -> TcpServer:
            srv = TcpServer(lp, path, h)
            srv.start()
            return srv

        srv = call_in_loop(lp, make)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(path)
            wait_for(lambda: len(h.peers) == 1)
        assert h.peers == [""] and "-unix#" in h.names[0]
        call_in_loop(lp, srv.stop)
    finally:
        lt.stop()
