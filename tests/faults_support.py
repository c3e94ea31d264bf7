"""Helpers shared by the fault suite (tests/test_faults_*.py).

``Ledger`` is the per-test accounting check that complements conftest's ``no_leaks``
(fds, threads, live connections and Buffers): at the end of a test every watched server
has no connection left, every watched loop has no timer and no pending functor, every
watched pool has nothing queued or running (and is stopped and joined), and the
``cppnp`` logger recorded nothing at WARNING or above that the test did not declare.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from typing import Any, Callable

import pytest

from conftest import (  # noqa: F401  (re-exported for the fault tests)
    POOL_IDS,
    POOL_SIZES,
    TIMEOUT,
    ServerThread,
    call_in_loop,
    recv_exact,
    recv_until_eof,
    rst_close,
    wait_for,
)
from cppnp import EventLoop, ThreadPool

# -- sockets ------------------------------------------------------------------------------


def small_rcvbuf_client(address: Any, size: int = 4096) -> socket.socket:
    """A client whose receive window stays small (set before connect: no autotuning)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    s.settimeout(TIMEOUT)
    s.connect(address)
    return s


def park_loop(loop: EventLoop) -> Any:
    """Block *loop* inside a functor until the returned release() is called."""
    import threading

    parked, go = threading.Event(), threading.Event()

    def park() -> None:
        parked.set()
        go.wait(TIMEOUT)

    loop.queue_in_loop(park)
    assert parked.wait(TIMEOUT), "the loop did not reach the parking functor"

    def release() -> None:
        go.set()

    return release


def iterations_while_idle(st: ServerThread, seconds: float = 0.3) -> int:
    """Loop iterations during *seconds* of nothing to do (stats() does not wake it)."""
    call_in_loop(st.loop, lambda: None)
    call_in_loop(st.loop, lambda: None)
    before = int(st.loop.stats()["iterations"])
    time.sleep(seconds)
    return int(st.loop.stats()["iterations"]) - before


# -- subprocesses -------------------------------------------------------------------------


TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def child_env() -> dict[str, str]:
    """The environment of a child interpreter: unbuffered, faulthandler on, and this
    folder on PYTHONPATH (children import the shared handlers from handlers.py)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS_DIR, env.get("PYTHONPATH")) if p)
    env.pop("PYTHONWARNINGS", None)
    return env


def default_sigint() -> None:
    """preexec_fn: a child of a background job inherits SIGINT ignored; Python then
    installs no KeyboardInterrupt handler.  Give the child the default disposition."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def user_env() -> dict[str, str]:
    """What a user's shell has: the installed cppnp only (no PYTHONPATH, so neither the
    source tree nor the test helpers), no PYTHONWARNINGS, unbuffered output."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)
    env.pop("PYTHONWARNINGS", None)
    return env


def spawn_python(
    *argv: str, env: dict[str, str] | None = None, stdin: bool = False
) -> subprocess.Popen[str]:
    """``python *argv`` in a fresh interpreter: text pipes for stdout/stderr (and stdin if
    asked), the default SIGINT disposition, cwd ``/``, *env* (default child_env())."""
    return subprocess.Popen(
        [sys.executable, *argv],
        stdin=subprocess.PIPE if stdin else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env() if env is None else env,
        cwd="/",
        preexec_fn=default_sigint,
    )


def reap(proc: subprocess.Popen[str]) -> None:
    """Kill and reap *proc* if it is still running."""
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@contextlib.contextmanager
def spawned(
    code: str, *args: str, env: dict[str, str] | None = None, stdin: bool = False
) -> Iterator[subprocess.Popen[str]]:
    """spawn_python("-c", *code*, *args); killed and reaped if the block leaves it running."""
    proc = spawn_python("-c", code, *args, env=env, stdin=stdin)
    try:
        yield proc
    finally:
        reap(proc)


def finish(
    proc: subprocess.Popen[str], timeout: float = 20.0, sig: int | None = None
) -> tuple[int, str, str]:
    """Send *sig* (if given), then wait for *proc*: (exit code, stdout, stderr); fail (with
    its output) if it does not exit within *timeout* seconds."""
    if sig is not None:
        proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        after = "" if sig is None else " after signal %d" % sig
        pytest.fail("child hung%s: stdout=%r stderr=%r" % (after, out, err))
    return proc.returncode, out, err


def run_python(
    *argv: str,
    timeout: float = 30.0,
    env: dict[str, str] | None = None,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """``python *argv`` in a fresh interpreter, to completion (text output captured, cwd
    ``/``, *env* default child_env(), *input* on its stdin); fail (with its output) if it
    runs past *timeout* seconds."""
    try:
        return subprocess.run(
            [sys.executable, *argv],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=child_env() if env is None else env,
            cwd="/",
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail("child hung: stdout=%r stderr=%r" % (exc.stdout, exc.stderr))


def run_child(
    code: str,
    *args: str,
    timeout: float = 30.0,
    env: dict[str, str] | None = None,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """run_python("-c", *code*, *args): *code* in a fresh interpreter."""
    return run_python("-c", code, *args, timeout=timeout, env=env, input=input)


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of process *pid* (all its threads), in seconds."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


# -- forked children ------------------------------------------------------------------------


def run_forked(
    fn: Callable[[], None], timeout: float = 60.0, step_log: str | None = None, stall: float = 20.0
) -> None:
    """Run *fn* in a forked child, so that a memory error in the core fails the test (with
    the child's traceback, or the signal that killed it) instead of killing the session.
    Only for code that starts no threads (the Buffer tests).

    The child is killed after *timeout* seconds.  With *step_log* (a file the child appends
    to at every step) it is also killed when it logs nothing for *stall* seconds (after
    heap corruption, glibc malloc can hang on a garbage lock instead of aborting), and a
    failure shows the last example logged there.  The child is never left behind.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            os.close(r)
            try:
                fn()
                code, msg = 0, b""
            except BaseException:
                msg = traceback.format_exc().encode()[-30000:]
            os.write(w, msg)
        finally:
            os._exit(code)
    os.close(w)

    def steps() -> str:
        if step_log is None:
            return ""
        return "; steps of the last example:\n" + last_example(step_log)

    out = b""
    reaped = False
    try:
        start = last_step = time.monotonic()
        logged = 0
        while True:
            ready, _, _ = select.select([r], [], [], 1.0)
            now = time.monotonic()
            if ready:
                chunk = os.read(r, 65536)
                if not chunk:
                    break
                out += chunk
                continue
            if step_log is not None:
                size = os.stat(step_log).st_size
                if size != logged:
                    logged, last_step = size, now
            stalled = step_log is not None and now - last_step > stall
            if stalled or now - start > timeout:
                why = (
                    "logged no step for %.0f s (a hang: heap corruption?)" % stall
                    if stalled
                    else "did not finish within %.0f s" % timeout
                )
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                reaped = True
                pytest.fail("forked child %s%s" % (why, steps()), pytrace=False)
        _, status = os.waitpid(pid, 0)
        reaped = True
        if os.WIFSIGNALED(status):
            pytest.fail(
                "forked child killed by signal %d (memory corruption?)%s\n%s"
                % (os.WTERMSIG(status), steps(), out.decode(errors="replace")),
                pytrace=False,
            )
        if os.WEXITSTATUS(status) != 0:
            pytest.fail(
                "forked child failed (exit %d):\n%s%s"
                % (os.WEXITSTATUS(status), out.decode(errors="replace"), "" if out else steps()),
                pytrace=False,
            )
    finally:
        if not reaped:  # e.g. pytest-timeout interrupted us: no orphan
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        os.close(r)


def last_example(step_log: str) -> str:
    """The steps of the last example in a fuzz step log."""
    with open(step_log, "rb") as f:
        text = f.read().decode(errors="replace")
    return text[text.rfind("--- example") :][-20000:]


# -- accounting -----------------------------------------------------------------------------


class Ledger:
    """What a test must leave behind: nothing.  See the module docstring."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self.caplog = caplog
        caplog.set_level(logging.WARNING, logger="cppnp")
        self.servers: list[ServerThread] = []
        self.loops: list[EventLoop] = []
        self.pools: list[ThreadPool] = []
        self.expected: list[tuple[str, int | None]] = []

    # -- registration --
    def server(self, st: ServerThread) -> ServerThread:
        self.servers.append(st)
        return st

    def loop(self, loop: EventLoop) -> EventLoop:
        self.loops.append(loop)
        return loop

    def pool(self, n: int, **kw: Any) -> ThreadPool:
        """A started ThreadPool, stopped and joined by the final check."""
        p = ThreadPool(n, **kw)
        p.start()
        self.pools.append(p)
        return p

    def expect(self, pattern: str, count: int | None = None) -> None:
        """Declare log records matching *pattern* (regex on the message and the exception
        type name) as expected; *count*: exactly that many (None: any number)."""
        self.expected.append((pattern, count))

    # -- the check --
    def records(self) -> list[logging.LogRecord]:
        every = [r for when in ("setup", "call", "teardown") for r in self.caplog.get_records(when)]  # type: ignore[arg-type]
        return [r for r in every if r.name.startswith("cppnp") and r.levelno >= logging.WARNING]

    @staticmethod
    def _text(r: logging.LogRecord) -> str:
        if r.exc_info and r.exc_info[0]:
            return "%s %s: %s" % (r.getMessage(), r.exc_info[0].__name__, r.exc_info[1])
        return r.getMessage()

    def matching(self, pattern: str) -> list[logging.LogRecord]:
        return [r for r in self.records() if re.search(pattern, self._text(r))]

    def check(self) -> None:
        for st in self.servers:
            loop = st.loop
            if loop.closed:
                assert st.server is not None and st.server.connection_count == 0
                assert loop.pending_functors == 0, "functors left on a closed loop"
                continue
            wait_for(lambda st=st: st.connection_count() == 0, TIMEOUT)
            wait_for(
                lambda loop=loop: (
                    call_in_loop(loop, lambda: (loop.timer_count, loop.pending_functors)) == (0, 0)
                ),
                TIMEOUT,
            )
        for loop in self.loops:
            if not loop.closed and not loop.running:
                assert loop.timer_count == 0, "timers left behind"
                assert loop.pending_functors == 0, "functors left behind"
        for p in self.pools:
            wait_for(lambda p=p: p.queued == 0 and p.running == 0, TIMEOUT)
            assert p.stop(drain=False, timeout=TIMEOUT), "pool workers did not exit"
            assert (p.queued, p.running) == (0, 0)
        unexpected = []
        for r in self.records():
            if not any(re.search(pat, self._text(r)) for pat, _ in self.expected):
                unexpected.append(self._text(r))
        assert unexpected == [], "unexpected cppnp log records: %r" % unexpected[:5]
        for pat, count in self.expected:
            if count is not None:
                got = len(self.matching(pat))
                assert got == count, "%d log records match %r, expected %d" % (got, pat, count)

    def forget_records(self) -> None:
        """Drop tracebacks: they reference frames holding connections (leak check)."""
        for when in ("setup", "call", "teardown"):
            for r in self.caplog.get_records(when):  # type: ignore[arg-type]
                r.msg, r.args = r.getMessage(), None  # args may hold a Task
                r.exc_info = None


def ledger_fixture(caplog: pytest.LogCaptureFixture) -> Any:
    """Body of each test file's ``ledger`` fixture (a generator)."""
    led = Ledger(caplog)
    try:
        yield led
        led.check()
    finally:
        for p in led.pools:
            p.stop(drain=False, timeout=TIMEOUT)
        led.forget_records()
