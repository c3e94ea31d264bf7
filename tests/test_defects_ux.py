"""Issue 8, a new user's first hour (items 14, 16 and 17): errors are visible by default,
the command line reports bad arguments in one line, and the README's claims hold (its code
runs as shown, its alias list exists, it depends on nothing outside the repository)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import cppnp
from cppnp import Buffer, EventLoop, EventLoopThread, Task, TcpConnection, ThreadPool
from faults_support import run_child, spawned, user_env

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TIMEOUT = 30.0


def run_python(code: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    return run_child(code, timeout=timeout, env=user_env())


def cli(
    *args: str,
    timeout: float = 15.0,
    exe: list[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the command line to completion; a command that keeps running fails the test."""
    cmd = (exe or [sys.executable, "-m", "cppnp"]) + list(args)
    try:
        return subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=user_env(), cwd="/"
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(
            "%s was accepted and kept running (stdout %r, stderr %r)"
            % (" ".join(args), exc.stdout, exc.stderr)
        )


def one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, "expected one line on stderr, got %d:\n%s" % (len(lines), err)
    return lines[0]


# -- 14: errors are visible when the application configured no logging -----------------------

ERRORS_CHILD = """
import socket, threading
%(prelude)s
from cppnp import EventLoop, ICppnpUsr, TcpServer, ThreadPool

class Boom(ICppnpUsr):
    def on_message(self, conn, buf):
        buf.retrieve_all()
        raise ValueError("boom in on_message")

def failing_task():
    raise KeyError("boom in a task")

with EventLoop() as loop, ThreadPool(1, name="w") as pool:
    server = TcpServer(loop, ("127.0.0.1", 0), Boom())
    server.start()
    pool.add_task(failing_task)
    client = socket.create_connection(server.address, timeout=10)
    client.sendall(b"x")
    deadline = loop.time() + 10

    def check():
        if (loop.callback_errors >= 1 and pool.failed >= 1) or loop.time() > deadline:
            loop.quit()

    loop.run_every(0.005, check)
    loop.loop()
    client.close()
    server.stop()
print("callback_errors=%%d failed=%%d" %% (loop.callback_errors, pool.failed))
"""


def test_d14_errors_print_a_traceback_when_no_logging_is_configured() -> None:
    proc = run_python(ERRORS_CHILD % {"prelude": ""})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "callback_errors=1 failed=1\n", proc.stdout + proc.stderr
    err = proc.stderr
    assert err.count("Traceback (most recent call last)") == 2, err
    assert "Exception in on_message of" in err and "ValueError: boom in on_message" in err, err
    assert "Exception in task" in err and "KeyError: 'boom in a task'" in err, err


def test_d14_configured_logging_gets_each_error_once() -> None:
    prelude = (
        "import logging, sys\n"
        "logging.basicConfig(stream=sys.stderr, format='LOGGED %(name)s %(message)s')"
    )
    proc = run_python(ERRORS_CHILD % {"prelude": prelude})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "callback_errors=1 failed=1\n", proc.stdout + proc.stderr
    err = proc.stderr
    assert err.count("Traceback (most recent call last)") == 2, err
    assert err.count("LOGGED cppnp Exception in") == 2, err
    assert err.count("ValueError: boom in on_message") == 1, err
    assert err.count("KeyError: 'boom in a task'") == 1, err


def test_d14_a_handler_on_the_cppnp_logger_alone_gets_each_error_once() -> None:
    prelude = (
        "import logging, sys\n"
        "h = logging.StreamHandler(sys.stderr)\n"
        "h.setFormatter(logging.Formatter('MINE %(message)s'))\n"
        "logging.getLogger('cppnp').addHandler(h)"
    )
    proc = run_python(ERRORS_CHILD % {"prelude": prelude})
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    assert err.count("Traceback (most recent call last)") == 2, err
    assert err.count("MINE Exception in") == 2, err


def test_d14_readme_says_where_errors_go() -> None:
    text = README.read_text()
    assert re.search(r"stderr.{0,200}no logging|no logging.{0,200}stderr", text, re.S), (
        "the README does not say that errors go to stderr when logging is not configured"
    )


# -- 16: the command line -----------------------------------------------------------------

BAD_USAGE = [
    (("echo", "--port", "70000"), "--port"),
    (("echo", "--port", "-1"), "--port"),
    (("echo", "--port", "http"), "--port"),
    (("daytime", "--port", "65536"), "--port"),
    (("echo", "--threads", "-3"), "--threads"),
    (("echo", "--fib", "-5"), "--fib"),
    (("demo", "--threads", "-1"), "--threads"),
    (("demo", "--threads", "many"), "--threads"),
    (("demo", "--conns", "0"), "--conns"),
    (("demo", "--sizes", "1,x"), "--sizes"),
    (("demo", "--duration", "-1"), "--duration"),
    (("echo", "--no-such-option"), "--no-such-option"),
    (("no-such-command",), "no-such-command"),
    ((), "command"),
]


@pytest.mark.parametrize(
    "args, names", BAD_USAGE, ids=[" ".join(a) or "none" for a, _ in BAD_USAGE]
)
def test_d16_bad_argument_is_one_line_and_exit_2(args: tuple[str, ...], names: str) -> None:
    proc = cli(*args)
    line = one_line(proc.stderr)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert names in line, line
    assert proc.stdout == "", proc.stdout


def test_d16_port_in_use_is_one_line_naming_the_address_and_exit_1() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = cli("echo", "--port", str(port))
    line = one_line(proc.stderr)
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "127.0.0.1:%d" % port in line and "in use" in line, line


def test_d16_unresolvable_host_is_one_line_naming_the_host_and_exit_1() -> None:
    proc = cli("discard", "--host", "no-such-host.invalid", "--port", "0")
    line = one_line(proc.stderr)
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "no-such-host.invalid" in line, line


@pytest.mark.parametrize(
    "cmd, expected",
    [
        ("echo", ["default: 127.0.0.1", "default: 9000", "worker threads", "default: 0"]),
        ("demo", ["default: 4", "seconds", "bytes", "default: 18"]),
        ("daytime", ["default: 127.0.0.1", "default: 9000"]),
    ],
)
def test_d16_help_shows_defaults_and_units(cmd: str, expected: list[str]) -> None:
    proc = cli(cmd, "--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())  # argparse wraps lines
    for item in expected:
        assert item in text, "%r missing from %s --help:\n%s" % (item, cmd, proc.stdout)


def test_d16_console_script_names_itself_cppnp() -> None:
    script = Path(sys.executable).parent / "cppnp"
    assert script.exists(), "the cppnp console script is not installed next to %s" % (
        sys.executable
    )
    proc = cli("--help", exe=[str(script)])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: cppnp "), proc.stdout
    proc = cli("echo", "--port", "70000", exe=[str(script)])
    assert one_line(proc.stderr).startswith("cppnp echo: "), proc.stderr
    proc = cli("--help")
    assert proc.stdout.startswith("usage: python -m cppnp "), proc.stdout


def test_d16_addresses_print_ipv6_in_brackets() -> None:
    from cppnp.cli.common import format_address

    assert format_address(("::1", 9000, 0, 0)) == "[::1]:9000"
    assert format_address(("fe80::1%lo", 80, 0, 1)) == "[fe80::1%lo]:80"
    assert format_address(("127.0.0.1", 9000)) == "127.0.0.1:9000"


def test_d16_demo_output_has_no_unexplained_thread_name() -> None:
    proc = cli(
        "demo", "--threads", "2", "--conns", "2", "--messages", "5", "--fib", "3", timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "thread MainThread" not in proc.stdout, proc.stdout
    proc = cli("timers")
    assert proc.returncode == 0, proc.stderr
    assert not re.search(r"^main thread MainThread$", proc.stdout, re.M), proc.stdout


# -- 17: the README ------------------------------------------------------------------------------


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def connect_when_listening(proc: subprocess.Popen[str], port: int) -> socket.socket | None:
    """Connect once the child listens on *port* (None if it exits first or 10 s pass)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=10)
        except ConnectionRefusedError:
            time.sleep(0.01)
    return None


def test_d17_readme_lists_python3_dev() -> None:
    text = README.read_text()
    assert "python3-dev" in text, "the prerequisites do not name python3-dev (Python.h)"


def test_d17_nothing_outside_the_repository() -> None:
    for path in [
        README,
        ROOT / "Makefile",
        ROOT / ".ci" / "run",
        *sorted((ROOT / "scripts").iterdir()),
        *sorted((ROOT / "tools").iterdir()),
    ]:
        text = path.read_text()
        # (the folder name is spelled in two parts so that this check does not match itself)
        outside = ("../" + "shared", "/work/")
        assert not any(o in text for o in outside), "%s refers outside the repo" % (
            path.relative_to(ROOT)
        )
    tool = ROOT / "tools" / "free-threaded-python.sh"
    assert os.access(tool, os.X_OK), tool
    assert "tools/free-threaded-python.sh" in (ROOT / "Makefile").read_text()


def test_d17_readme_snippets_run_as_shown() -> None:
    blocks = readme_python_blocks()
    servers = [b for b in blocks if "loop.loop()" in b]
    assert len(servers) >= 2, "expected the echo and the seed EchoServer snippets"
    for code in blocks:
        if "loop.loop()" not in code:
            proc = run_python(code)
            assert proc.returncode == 0, "snippet failed:\n%s\n%s" % (code, proc.stderr)
            continue
        assert "9000" in code, code
        port = free_port()
        with spawned(code.replace("9000", str(port)), env=user_env()) as proc:
            sock = connect_when_listening(proc, port)
            assert sock is not None, "snippet never listened:\n%s\n%s" % (
                code,
                proc.communicate(timeout=10),
            )
            with sock:
                for msg in (b"hello\n", b"x" * 70_000):
                    sock.sendall(msg)
                    got = bytearray()
                    while len(got) < len(msg):
                        chunk = sock.recv(1 << 16)
                        assert chunk, "connection closed"
                        got += chunk
                    assert bytes(got) == msg
            proc.send_signal(signal.SIGINT)  # "until loop.quit() or Ctrl-C"
            _, err = proc.communicate(timeout=TIMEOUT)
            assert "KeyboardInterrupt" in err or proc.returncode == 0, err


PUBLIC = [
    cppnp.EventLoop,
    cppnp.EventLoopThread,
    cppnp.ICppnpUsr,
    cppnp.IRun0,
    cppnp.IRun2,
    Task,
    TcpConnection,
    cppnp.TcpServer,
    ThreadPool,
    Buffer,
]


def actual_aliases() -> dict[str, str]:
    """{alias: 'Class.snake_name'} for every camelCase attribute that is a snake_case one."""
    found = {}
    for cls in PUBLIC:
        for name in dir(cls):
            if name.startswith("_") or name.islower() or name.isupper():
                continue
            obj = getattr(cls, name)
            twins = [
                n
                for n in dir(cls)
                if n != name and n.islower() and not n.startswith("_") and getattr(cls, n) is obj
            ]
            if twins and not isinstance(obj, type):
                found[name] = "%s.%s" % (cls.__name__, twins[0])
    return found


def test_d17_readme_alias_list_names_exactly_the_aliases() -> None:
    text = README.read_text()
    m = re.search(r"camelCase names are aliases[^:]*:(.*?)(?:\n- |\n\n)", text, re.S)
    assert m, "alias paragraph not found"
    assert "…" not in m.group(1) and "..." not in m.group(1), m.group(1)
    # "`Class`: `alias`, `alias`; `Class`: ..." (a bare list of names is not enough: say
    # whose alias each one is)
    groups = re.findall(r"`(\w+)`:((?:\s*`\w+`,?)+)", m.group(1))
    assert groups, m.group(1)
    listed = {}
    for cls_name, names in groups:
        for alias in re.findall(r"`(\w+)`", names):
            listed[alias] = cls_name
    actual = actual_aliases()
    wrong = {a: c for a, c in listed.items() if actual.get(a, "").split(".")[0] != c}
    assert not wrong, "the README lists aliases that do not exist there: %s" % wrong
    unlisted = sorted(set(actual) - set(listed))
    assert not unlisted, "aliases missing from the README: %s" % unlisted


def test_d17_api_tour_says_find_returns_minus_one() -> None:
    assert Buffer(b"no newline").find_eol() == -1
    assert Buffer(b"line\n").find_crlf() == -1
    text = README.read_text()
    assert re.search(r"find_crlf\(\)`?[^.]*find_eol\(\)`?[^.]*-1", text), (
        "the API tour does not say that find_crlf()/find_eol() return -1"
    )


def test_d17_event_loop_thread_result_is_what_init_returned() -> None:
    def init(loop: EventLoop) -> object:
        return ("made in", loop.is_in_loop_thread())

    with EventLoopThread(init) as loop:
        assert isinstance(loop, EventLoop)
    lt = EventLoopThread(init)
    assert lt.result is None
    lt.start()
    try:
        assert lt.result == ("made in", True)
    finally:
        lt.stop()
    assert EventLoopThread.__doc__ is not None and ".result" in EventLoopThread.__doc__
    assert re.search(r"EventLoopThread\(init\).{0,300}`\.result`", README.read_text(), re.S)
