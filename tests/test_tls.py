"""TLS (issue 10 item 3): ssl= on TcpServer and TcpClient, against Python's ssl sockets
and the openssl binary; certificate checks, handshake timeout, close_notify, 10 MB each
way, sends from worker threads, io_threads=2.  Certificates are made by trustme (or, where
it cannot be installed, e.g. on 3.13t, by the openssl binary)."""

from __future__ import annotations

import importlib
import shutil
import signal
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import call_in_loop, wait_for
from cppnp import Buffer, EventLoop, ICppnpUsr, TcpClient, TcpConnection, TcpServer
from handlers import Echo

try:
    trustme: Any = importlib.import_module("trustme")
except ImportError:  # e.g. free-threaded 3.13t, where cryptography has no wheel
    trustme = None

# The openssl binary is required (make test and make test-ft install it if missing): the
# interop tests run it, and it makes the certificates where trustme cannot be installed.
_openssl = shutil.which("openssl")
if _openssl is None:
    raise RuntimeError("test_tls.py needs the openssl binary (apt-get install openssl)")
OPENSSL: str = _openssl


class _Pem:
    def __init__(self, path: Path) -> None:
        self.path = path

    def write_to_path(self, path: str) -> None:
        shutil.copyfile(self.path, path)


class _OpensslCert:
    def __init__(self, cert: Path, key: Path) -> None:
        self.cert_chain_pems = [_Pem(cert)]
        self.private_key_pem = _Pem(key)

    def configure_cert(self, ctx: ssl.SSLContext) -> None:
        ctx.load_cert_chain(str(self.cert_chain_pems[0].path), str(self.private_key_pem.path))


class _OpensslCA:
    """trustme.CA's few methods used here, made with the openssl binary (where trustme
    cannot be installed)."""

    def __init__(self) -> None:
        import tempfile

        self.dir = Path(tempfile.mkdtemp(prefix="cppnp-ca-"))
        self.cert_pem = _Pem(self.dir / "ca.pem")
        self._run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                  "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
                  "-subj", "/CN=cppnp test CA", "-addext",
                  "basicConstraints=critical,CA:TRUE", "-addext",
                  "keyUsage=critical,keyCertSign,cRLSign", "-addext",
                  "subjectKeyIdentifier=hash")  # fmt: skip

    def _run(self, *args: str) -> None:
        subprocess.run([OPENSSL, *args], cwd=self.dir, check=True, capture_output=True)

    def configure_trust(self, ctx: ssl.SSLContext) -> None:
        ctx.load_verify_locations(cafile=str(self.cert_pem.path))

    def issue_cert(self, *names: str) -> _OpensslCert:
        sans = ",".join(("IP:" if n[0].isdigit() else "DNS:") + n for n in names)
        (self.dir / "ext.cnf").write_text(
            "subjectAltName=%s\nbasicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth,clientAuth\nsubjectKeyIdentifier=hash\n"
            "authorityKeyIdentifier=keyid\n" % sans
        )
        self._run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                  "-nodes", "-keyout", "leaf.key", "-out", "leaf.csr", "-subj",
                  "/CN=%s" % names[0])  # fmt: skip
        self._run("x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                  "-CAcreateserial", "-out", "leaf.pem", "-days", "2",
                  "-extfile", "ext.cnf")  # fmt: skip
        return _OpensslCert(self.dir / "leaf.pem", self.dir / "leaf.key")


def new_ca() -> Any:
    return trustme.CA() if trustme is not None else _OpensslCA()


BIG = 10 << 20


@pytest.fixture(scope="module")
def ca() -> Any:
    return new_ca()


@pytest.fixture(scope="module")
def cert(ca: Any) -> Any:
    return ca.issue_cert("localhost", "127.0.0.1")


def server_ctx(cert: Any) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    return ctx


def client_ctx(ca: Any | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    if ca is not None:
        ca.configure_trust(ctx)
    return ctx


@pytest.fixture(params=[0, 2], ids=["io0", "io2"])
def io(request: pytest.FixtureRequest) -> int:
    return int(request.param)


class Recorder(Echo):
    """Echo that records, on the loop thread, what each connection's TLS looked like."""

    def __init__(self) -> None:
        self.opened: list[tuple[Any, Any, Any]] = []
        self.closed = 0

    def on_connection(self, conn: TcpConnection) -> None:
        obj = conn.ssl_object
        self.opened.append(
            (obj is not None and obj.version(), obj and obj.selected_alpn_protocol(), obj)
        )

    def on_close(self, conn: TcpConnection) -> None:
        self.closed += 1


def start_server(loop: EventLoop, handler: Any, **kw: Any) -> TcpServer:
    def make() -> TcpServer:
        srv = TcpServer(loop, ("127.0.0.1", 0), handler, **kw)
        srv.start()
        return srv

    return call_in_loop(loop, make)


@pytest.fixture
def servers(loop_thread: EventLoop) -> Iterator[Any]:
    made: list[TcpServer] = []

    def make(handler: Any, **kw: Any) -> TcpServer:
        srv = start_server(loop_thread, handler, **kw)
        made.append(srv)
        return srv

    yield make
    for srv in made:
        call_in_loop(loop_thread, srv.stop)
        wait_for(lambda srv=srv: srv.connection_count == 0 and not srv.io_loops)


def tls_connect(address: Any, ca: Any, **kw: Any) -> ssl.SSLSocket:
    ctx = client_ctx(ca)
    if "alpn" in kw:
        ctx.set_alpn_protocols(kw.pop("alpn"))
    raw = socket.create_connection(address, timeout=10)
    return ctx.wrap_socket(raw, server_hostname="localhost", **kw)


def recv_n(s: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = s.recv(min(1 << 20, n - len(out)))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def test_echo_with_python_ssl_client_alpn_and_ssl_object(
    servers: Any, ca: Any, cert: Any, io: int
) -> None:
    rec = Recorder()
    ctx = server_ctx(cert)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    srv = servers(rec, ssl=ctx, io_threads=io)
    if hasattr(ssl, "OP_NO_RENEGOTIATION"):
        assert ctx.options & ssl.OP_NO_RENEGOTIATION  # renegotiation refused
    for i in range(3):
        with tls_connect(srv.address, ca, alpn=["http/1.1"]) as s:
            payload = b"hello tls %d" % i
            s.sendall(payload)
            assert recv_n(s, len(payload)) == payload
            assert s.selected_alpn_protocol() == "http/1.1"
    wait_for(lambda: rec.closed == 3)
    assert [o[:2] for o in rec.opened] == [(s_version(), "http/1.1")] * 3
    assert srv.stats()["tls_errors"] == 0


def s_version() -> str:
    """The TLS version a default client and server agree on here."""
    return "TLSv1.3" if ssl.HAS_TLSv1_3 else "TLSv1.2"


def test_plain_connection_has_no_ssl_object(servers: Any) -> None:
    rec = Recorder()
    srv = servers(rec)
    with socket.create_connection(srv.address, timeout=10) as s:
        s.sendall(b"x")
        assert recv_n(s, 1) == b"x"
    wait_for(lambda: rec.closed == 1)
    assert rec.opened[0][2] is None
    assert srv.stats()["tls_errors"] == 0 and srv.stats()["handshake_timeouts"] == 0


def test_ten_megabytes_each_way_byte_exact(servers: Any, ca: Any, cert: Any, io: int) -> None:
    srv = servers(Echo(), ssl=server_ctx(cert), io_threads=io)
    data = bytes(range(256)) * (BIG // 256)
    # One thread drives the client's TLS socket (an SSLSocket must not be read and written
    # from two threads at once: on 3.13t that raced inside the ssl module), with a window
    # of 4 x 64 KiB in flight so the server's reads, writes and buffering overlap.
    step, window = 1 << 16, 4
    chunks = [data[i : i + step] for i in range(0, len(data), step)]
    got = bytearray()
    with tls_connect(srv.address, ca) as s:
        s.settimeout(30)
        for i, chunk in enumerate(chunks):
            s.sendall(chunk)
            if i >= window - 1:
                got += recv_n(s, len(chunks[i - window + 1]))
        got += recv_n(s, len(data) - len(got))
    assert got == data


class Client(ICppnpUsr):
    def __init__(self) -> None:
        self.opened: list[TcpConnection] = []
        self.closed: list[TcpConnection] = []
        self.errors: list[BaseException] = []
        self.data = bytearray()
        self.lock = threading.Lock()
        self.peer_cert: Any = None

    def on_connection(self, conn: TcpConnection) -> None:
        self.opened.append(conn)
        self.peer_cert = conn.ssl_object.getpeercert()

    def on_message(self, conn: TcpConnection, buf: Buffer) -> None:
        with self.lock:
            self.data += buf.retrieve_all()

    def on_close(self, conn: TcpConnection) -> None:
        self.closed.append(conn)

    def on_connect_error(self, client: Any, exc: BaseException) -> None:
        self.errors.append(exc)


def make_client(loop: EventLoop, address: Any, handler: Any, **kw: Any) -> TcpClient:
    def make() -> TcpClient:
        c = TcpClient(loop, address, handler, **kw)
        c.connect()
        return c

    return call_in_loop(loop, make)


def stop_client(loop: EventLoop, client: TcpClient) -> None:
    call_in_loop(loop, client.stop)
    wait_for(lambda: client.connection is None)


def python_tls_server(cert: Any, serve: Any) -> tuple[Any, threading.Thread, socket.socket]:
    """A one-connection Python ssl server: serve(ssl_socket) runs in a thread."""
    ctx = server_ctx(cert)
    lst = socket.create_server(("127.0.0.1", 0))
    lst.settimeout(10)

    def run() -> None:
        conn, _ = lst.accept()
        conn.settimeout(10)
        try:
            with ctx.wrap_socket(conn, server_side=True) as s:
                serve(s)
        except (OSError, ssl.SSLError):
            pass

    t = threading.Thread(target=run)
    t.start()
    return lst.getsockname(), t, lst


def test_client_to_python_ssl_server_with_hostname_check(
    loop_thread: EventLoop, ca: Any, cert: Any
) -> None:
    def serve(s: ssl.SSLSocket) -> None:
        s.sendall(b"greeting\n")
        got = recv_n(s, 4)
        s.sendall(got.upper())

    address, t, lst = python_tls_server(cert, serve)
    rec = Client()
    client = make_client(
        loop_thread, address, rec, ssl=client_ctx(ca), server_hostname="localhost", retry=False
    )
    try:
        wait_for(lambda: len(rec.data) >= 9)
        rec.opened[0].send(b"ping")
        wait_for(lambda: bytes(rec.data) == b"greeting\nPING")
        assert rec.peer_cert and any(
            ("DNS", "localhost") == san for san in rec.peer_cert["subjectAltName"]
        )
        t.join(10)
        wait_for(lambda: len(rec.closed) == 1)
    finally:
        stop_client(loop_thread, client)
        lst.close()
    assert not rec.errors
    assert client.stats()["tls_errors"] == 0


@pytest.mark.parametrize("case", ["wrong-hostname", "untrusted-ca"])
def test_client_rejects_bad_certificate(
    loop_thread: EventLoop, ca: Any, cert: Any, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    address, t, lst = python_tls_server(cert, lambda s: recv_n(s, 1))
    rec = Client()
    if case == "wrong-hostname":
        kw: dict[str, Any] = {"ssl": client_ctx(ca), "server_hostname": "wrong.example"}
    else:
        kw = {"ssl": client_ctx(new_ca())}  # another CA: the chain does not verify
    client = make_client(loop_thread, address, rec, retry=True, retry_initial=0.05, **kw)
    try:
        wait_for(lambda: rec.errors)
        t.join(10)
        wait_for(lambda: client.connection is None)
    finally:
        stop_client(loop_thread, client)
        lst.close()
    assert isinstance(rec.errors[0], ssl.SSLCertVerificationError)
    assert len(rec.errors) == 1  # a certificate error is not retried
    assert not rec.opened and not rec.closed
    assert client.stats()["tls_errors"] == 1
    assert any("TLS handshake failed" in r.getMessage() for r in caplog.records)


def test_server_counts_untrusting_client_and_keeps_serving(
    servers: Any, ca: Any, cert: Any, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder()
    srv = servers(rec, ssl=server_ctx(cert))
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_connect(srv.address, new_ca())  # the client rejects our certificate
    wait_for(lambda: srv.stats()["tls_errors"] == 1)
    with socket.create_connection(srv.address, timeout=10) as s:  # not TLS at all
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert s.recv(100) is not None
    wait_for(lambda: srv.stats()["tls_errors"] == 2)
    with tls_connect(srv.address, ca) as s:  # the server still serves
        s.sendall(b"ok")
        assert recv_n(s, 2) == b"ok"
    wait_for(lambda: srv.connection_count == 0)
    assert rec.closed == 1 and len(rec.opened) == 1  # failed handshakes: no callbacks
    assert any("TLS handshake failed" in r.getMessage() for r in caplog.records)


def test_stalled_handshake_is_closed_at_the_timeout(servers: Any, cert: Any, io: int) -> None:
    rec = Recorder()
    srv = servers(rec, ssl=server_ctx(cert), ssl_handshake_timeout=0.2, io_threads=io)
    with socket.create_connection(srv.address, timeout=10) as s:
        s.sendall(b"\x16\x03\x01")  # the start of a ClientHello, then nothing
        assert s.recv(100) == b""  # closed by the server
    wait_for(lambda: srv.stats()["handshake_timeouts"] == 1)
    wait_for(lambda: srv.connection_count == 0)
    assert not rec.opened and rec.closed == 0


def test_client_handshake_timeout_reported(loop_thread: EventLoop, ca: Any) -> None:
    lst = socket.create_server(("127.0.0.1", 0))  # accepts, never answers the hello
    rec = Client()
    client = make_client(
        loop_thread,
        lst.getsockname(),
        rec,
        ssl=client_ctx(ca),
        server_hostname="localhost",
        retry=False,
        ssl_handshake_timeout=0.2,
    )
    try:
        wait_for(lambda: rec.errors)
        assert isinstance(rec.errors[0], TimeoutError)
        assert client.stats()["handshake_timeouts"] == 1
    finally:
        stop_client(loop_thread, client)
        lst.close()


class ShutdownOnBye(ICppnpUsr):
    def on_message(self, conn: TcpConnection, buf: Buffer) -> None:
        if buf.retrieve_all().endswith(b"bye"):
            conn.send(b"ok")
            conn.shutdown()
            conn.send(b"dropped")  # after shutdown(): dropped and counted


def test_shutdown_sends_close_notify_before_fin(servers: Any, ca: Any, cert: Any) -> None:
    srv = servers(ShutdownOnBye(), ssl=server_ctx(cert))
    # suppress_ragged_eofs=False: a FIN without close_notify would raise SSLEOFError.
    with tls_connect(srv.address, ca, suppress_ragged_eofs=False) as s:
        s.sendall(b"bye")
        assert recv_n(s, 2) == b"ok"
        assert s.recv(10) == b""  # close_notify: a clean TLS EOF
        raw = s.unwrap()  # our close_notify; then the server closes
        assert raw.recv(10) == b""
        raw.close()
    wait_for(lambda: srv.connection_count == 0)


def test_peer_close_notify_is_eof_and_answered(servers: Any, ca: Any, cert: Any) -> None:
    rec = Recorder()
    srv = servers(rec, ssl=server_ctx(cert))
    with tls_connect(srv.address, ca, suppress_ragged_eofs=False) as s:
        s.sendall(b"half")
        assert recv_n(s, 4) == b"half"
        raw = s.unwrap()  # succeeds only if the server answers with its close_notify
        assert raw.recv(10) == b""
        raw.close()
    wait_for(lambda: rec.closed == 1)


class WorkerSender(ICppnpUsr):
    """on_connection starts worker threads that each send numbered lines."""

    def __init__(self, nthreads: int, count: int) -> None:
        self.nthreads = nthreads
        self.count = count
        self.threads: list[threading.Thread] = []

    def on_connection(self, conn: TcpConnection) -> None:
        def work(k: int) -> None:
            for i in range(self.count):
                conn.send(b"%d:%06d\n" % (k, i))

        for k in range(self.nthreads):
            t = threading.Thread(target=work, args=(k,))
            t.start()
            self.threads.append(t)


def test_sends_from_worker_threads_encrypted_in_order(
    servers: Any, ca: Any, cert: Any, io: int
) -> None:
    handler = WorkerSender(4, 2000)
    srv = servers(handler, ssl=server_ctx(cert), io_threads=io)
    line = len(b"0:000000\n")
    with tls_connect(srv.address, ca) as s:
        s.settimeout(30)
        got = recv_n(s, 4 * 2000 * line)
    for t in handler.threads:
        t.join(10)
    seen: dict[int, list[int]] = {k: [] for k in range(4)}
    for ln in got.splitlines():
        k, i = ln.split(b":")
        seen[int(k)].append(int(i))
    assert all(seen[k] == list(range(2000)) for k in range(4))
    wait_for(lambda: srv.connection_count == 0)


def test_tcpclient_to_tcpserver_both_tls(
    loop_thread: EventLoop, servers: Any, ca: Any, cert: Any
) -> None:
    srv = servers(Echo(), ssl=server_ctx(cert), io_threads=2)
    rec = Client()
    client = make_client(
        loop_thread, ("localhost", srv.address[1]), rec, ssl=client_ctx(ca), retry=False
    )
    try:
        wait_for(lambda: rec.opened)
        payload = b"z" * 100_000
        rec.opened[0].send(payload)
        wait_for(lambda: len(rec.data) == len(payload))
        assert bytes(rec.data) == payload
    finally:
        stop_client(loop_thread, client)


def test_arguments_are_checked(loop: EventLoop, cert: Any) -> None:
    with pytest.raises(TypeError):
        TcpServer(loop, ("127.0.0.1", 0), Echo(), ssl=object())
    with pytest.raises(ValueError):
        TcpServer(loop, ("127.0.0.1", 0), Echo(), ssl=server_ctx(cert), ssl_handshake_timeout=0)
    with pytest.raises(ValueError):
        TcpServer(loop, ("127.0.0.1", 0), Echo(), ssl_handshake_timeout=5)
    with pytest.raises(ValueError):
        TcpClient(loop, ("127.0.0.1", 1), Echo(), server_hostname="x")
    with pytest.raises(TypeError):
        TcpClient(loop, ("127.0.0.1", 1), Echo(), ssl=client_ctx(None), server_hostname=b"x")
    with pytest.raises(ValueError, match="server_hostname"):  # a Unix path has no host name
        TcpClient(loop, "/tmp/cppnp-no-such.sock", Echo(), ssl=client_ctx(None))


# -- the openssl binary ----------------------------------------------------------------


def read_until(stream: Any, token: bytes, limit: int = 1 << 16) -> bytes:
    out = b""
    while token not in out and len(out) < limit:
        chunk = stream.read1(4096)
        if not chunk:
            break
        out += chunk
    return out


def test_openssl_s_client_against_server(servers: Any, ca: Any, tmp_path: Path, cert: Any) -> None:
    srv = servers(Echo(), ssl=server_ctx(cert))
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    proc = subprocess.Popen(
        [OPENSSL, "s_client", "-connect", "127.0.0.1:%d" % srv.address[1],
         "-servername", "localhost", "-CAfile", str(ca_file), "-verify_return_error",
         "-quiet", "-no_ign_eof"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"hello openssl\n")
        proc.stdin.flush()
        assert b"hello openssl\n" in read_until(proc.stdout, b"hello openssl\n")
        proc.stdin.close()
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()
    wait_for(lambda: srv.connection_count == 0)


def test_client_against_openssl_s_server(
    loop_thread: EventLoop, ca: Any, cert: Any, tmp_path: Path
) -> None:
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [OPENSSL, "s_server", "-accept", "127.0.0.1:%d" % port, "-cert", str(cert_file),
         "-key", str(key_file), "-naccept", "2", "-quiet"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    rec = Client()
    client = None
    try:
        assert proc.stdin is not None and proc.stdout is not None
        # The probe is the first of the two connections s_server accepts.
        wait_for(lambda: _port_open(port) or proc.poll() is not None)
        client = make_client(loop_thread, ("127.0.0.1", port), rec, ssl=client_ctx(ca),
                             server_hostname="localhost", retry=False)  # fmt: skip
        wait_for(lambda: rec.opened or rec.errors)
        assert not rec.errors
        rec.opened[0].send(b"ping from cppnp\n")
        assert b"ping from cppnp\n" in read_until(proc.stdout, b"ping from cppnp\n")
        proc.stdin.write(b"pong from openssl\n")
        proc.stdin.flush()
        wait_for(lambda: b"pong from openssl\n" in bytes(rec.data))
    finally:
        if client is not None:
            stop_client(loop_thread, client)
        proc.kill()
        proc.wait()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f is not None:
                f.close()


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def test_example_tls_echo(ca: Any, cert: Any, tmp_path: Path) -> None:
    """examples/tls_echo.py: its server with trustme-made files, a Python ssl client and
    the example's own TcpClient mode against it."""
    from faults_support import finish, reap, run_python, spawn_python, user_env

    example = str(Path(__file__).resolve().parents[1] / "examples" / "tls_echo.py")
    cert_file, key_file, ca_file = (tmp_path / n for n in ("cert.pem", "key.pem", "ca.pem"))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    proc = spawn_python(example, "0", "--certfile", str(cert_file), "--keyfile", str(key_file),
                        env=user_env())  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on 127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])
        with tls_connect(("127.0.0.1", port), ca) as s:
            s.sendall(b"hello example")
            assert recv_n(s, 13) == b"hello example"
        done = run_python(example, str(port), "--connect", "--cafile", str(ca_file),
                          env=user_env())  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "echo: hello over TLS" in done.stdout
        assert "connected with TLSv1." in done.stdout
        rc, _out, err = finish(proc, 20.0, sig=signal.SIGINT)
    finally:
        reap(proc)
    assert (rc, err) == (0, "")
