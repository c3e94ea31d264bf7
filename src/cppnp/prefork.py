"""Prefork supervisor: N processes serve one port (SO_REUSEPORT), each with its own loop.

``serve(make_server, processes=N)`` forks N children.  Each child creates a fresh
:class:`EventLoop`, calls ``make_server(loop)`` and serves what it returns on that loop (and
on whatever :class:`ThreadPool` *make_server* created) until it is told to stop.  Every child
binds the same address with ``SO_REUSEPORT``, so the kernel spreads new connections over
them: this is the multi-core path on every CPython, with or without the GIL.  The parent
only supervises:

- it logs each child's pid (logger ``cppnp.prefork``) and keeps them in
  :attr:`Supervisor.pids`; *on_ready* is called once every child listens;
- a child that dies after it was ready is restarted with exponential backoff (0.1 s,
  0.2 s, ... up to 10 s; back to 0.1 s once a child stayed up ``stable_after`` seconds);
- a child that fails to start (``make_server`` or ``start()`` raised, e.g. the address is
  in use) stops the whole service with :class:`PreforkError` -- no restart loop;
- SIGTERM or SIGINT (or :meth:`Supervisor.stop`) drains gracefully: every child stops
  accepting, finishes its in-flight requests, closes idle connections, force-closes what
  is left after *drain_timeout* seconds and exits 0; the parent SIGKILLs a child still
  alive *kill_timeout* seconds after that.  A second SIGTERM/SIGINT kills at once;
- children never outlive the parent: each sets ``PR_SET_PDEATHSIG`` (SIGTERM, so a
  child of a killed parent drains and exits), checks ``getppid()`` for the parent dying
  before that, and arms an alarm that ends it if its drain ever hangs.

The server protocol
-------------------
*make_server(loop)* runs in the child, on the loop thread, and returns one server or a
list of them (it may also put the ThreadPools it created in that list: they are stopped,
draining, after the servers).  A server is

- a :class:`TcpServer` created with ``reuse_port=True`` (checked after start(): a child
  whose listener does not have SO_REUSEPORT fails with a clear error), or
- any object with ``start()``, ``stop_accepting()``, ``stop()`` and ``connection_count``
  (see :class:`PreforkServer`), and optionally:

  ``drain(timeout: float) -> bool``
      Called on the loop thread after ``stop_accepting()``, then every 50 ms, until it
      returns True or the deadline passes (*timeout* is the seconds left until then).
      Each call should close the connections that have no request in progress
      (gracefully: FIN, not RST) and return True once no connection is left.  Without
      it, a :class:`TcpServer` is drained by the rule below and any other server is
      waited for until ``connection_count`` is 0.
  ``close()``
      Called once after the server stopped, before the loop closes: release what the
      server owns (stop its pool, close files).

  At the deadline the child calls ``stop()`` (force-close everything left).  All of these
  run on the loop thread.

A TcpServer drains like this: a connection is *in flight* while it has ThreadPool tasks
pending (``pending_tasks``), output not yet written (``output_bytes``) or unread input
(``input_bytes``, a partial request); any other connection is shut down (FIN after its
output) and force-closed at the next tick if the peer has not closed it by then.  A
request that crosses our FIN on the wire is lost, as with any keep-alive server; clients
retry such requests.  On Linux < 5.14 (or ``net.ipv4.tcp_migrate_req=0``) connections
waiting in a closing listener's accept queue are reset, not moved to a sibling.

Port 0 cannot be shared: each child would pick its own port (the parent checks that all
children report the same addresses).  Reserve a port in the parent with
:func:`reserve_port` and give that port to *make_server*.

Fork safety: call serve() from the main thread of a process that has no EventLoop,
ThreadPool or other threads yet (a thread holding a lock at fork() can deadlock the
child; a warning names any thread found).  Create loops and pools inside *make_server*.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Callable, Protocol, Union, runtime_checkable

from cppnp.event_loop import EventLoop
from cppnp.tcp_server import TcpServer
from cppnp.thread_pool import ThreadPool

__all__ = [
    "EXIT_BOOT_FAILED",
    "PreforkError",
    "PreforkServer",
    "Supervisor",
    "reserve_port",
    "serve",
]

log = logging.getLogger("cppnp.prefork")

#: Exit status of a child whose make_server() or start() raised (gunicorn uses 3 too),
#: and of ``cppnp echo --processes`` when the service could not start.
EXIT_BOOT_FAILED = 3
_EXIT_CRASHED = 1  # an exception escaped the child's loop
_EXIT_ORPHANED = 4  # the parent died before the child could arm PDEATHSIG

_PR_SET_PDEATHSIG = 1
_TICK = 0.05  # the child's timer: signal check-in and drain steps
_STOP_BYTE = b"\0"  # written to the wakeup pipe by Supervisor.stop()
_BOOT_CRASH_LIMIT = 5  # a slot whose child dies before ready this often: give up
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreforkError(RuntimeError):
    """The prefork service could not run: a child failed to start, or the children do not
    share one address.  The message holds the child's error."""


@runtime_checkable
class PreforkServer(Protocol):
    """What a child serves (besides a TcpServer): see the module docstring.

    Optional members: ``drain(timeout: float) -> bool`` and ``close()``.
    """

    def start(self) -> None:
        """Bind and listen (raise if the address cannot be bound).

        Loop thread only.
        """

    def stop_accepting(self) -> None:
        """Close the listener(s); keep open connections.

        Loop thread only.
        """

    def stop(self) -> None:
        """Close the listener(s) and force-close every connection.

        Loop thread only.
        """

    @property
    def connection_count(self) -> int:
        """Open connections.

        Loop thread only.
        """


ServerLike = Union[TcpServer, PreforkServer, ThreadPool]
MakeServer = Callable[[EventLoop], Union[ServerLike, Sequence[ServerLike]]]


def reserve_port(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """Bind (do not listen) a SO_REUSEPORT socket on (host, port) and return it.

    With port 0 the kernel picks a free port (``sock.getsockname()[1]``).  While the caller
    keeps the socket open, the port stays reserved for this user's SO_REUSEPORT sockets,
    so prefork children (and their restarts) can all bind it; the socket itself never
    receives connections.  Close it after serve() returns.

    Thread-safe.
    """
    info = socket.getaddrinfo(
        host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
    )[0]
    sock = socket.socket(info[0], info[1], info[2])
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(info[4])
    except BaseException:
        sock.close()
        raise
    return sock


def serve(
    make_server: MakeServer,
    *,
    processes: int | None = None,
    drain_timeout: float = 30.0,
    kill_timeout: float = 5.0,
    on_ready: Callable[[Supervisor], Any] | None = None,
    backoff: float = 0.1,
    max_backoff: float = 10.0,
    stable_after: float = 10.0,
) -> int:
    """Run *make_server* in *processes* children (default: the CPUs this process may use)
    and supervise them until SIGTERM/SIGINT; see the module docstring.

    Returns 0 when every child stopped cleanly after the stop request, 1 when one had to
    be killed or exited with an error.  Raises PreforkError when a child fails to start,
    RuntimeError when not called from the main thread.

    Main thread only.
    """
    return Supervisor(
        make_server,
        processes=processes,
        drain_timeout=drain_timeout,
        kill_timeout=kill_timeout,
        on_ready=on_ready,
        backoff=backoff,
        max_backoff=max_backoff,
        stable_after=stable_after,
    ).run()


@dataclass
class _Child:
    slot: int
    pid: int
    status_fd: int
    started: float
    ready: bool = False
    inbox: bytearray = field(default_factory=bytearray)


@dataclass
class _Slot:
    crashes: int = 0  # consecutive crashes of short-lived children
    boot_crashes: int = 0  # consecutive deaths before ready
    restart_at: float | None = None
    ever_ready: bool = False


def _noop_handler(signum: int, frame: FrameType | None) -> None:
    """Python-level handler: the wakeup fd carries the signal number to the main loop."""


def _describe(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        try:
            return "killed by %s" % signal.Signals(-code).name
        except ValueError:
            return "killed by signal %d" % -code
    return "exited with status %d" % code


class Supervisor:
    """The parent side of :func:`serve`: forks, watches and stops the children.

    ``run()`` does the work (main thread only); ``pids``, ``address``, ``restarts`` and
    ``stop()`` may be used from *on_ready* or from another thread.
    """

    def __init__(
        self,
        make_server: MakeServer,
        *,
        processes: int | None = None,
        drain_timeout: float = 30.0,
        kill_timeout: float = 5.0,
        on_ready: Callable[[Supervisor], Any] | None = None,
        backoff: float = 0.1,
        max_backoff: float = 10.0,
        stable_after: float = 10.0,
    ) -> None:
        """Check the options; nothing is forked before run().

        Thread-safe.
        """
        if not callable(make_server):
            raise TypeError("make_server must be a callable taking the child's EventLoop")
        if processes is None:
            processes = len(os.sched_getaffinity(0))
        if not isinstance(processes, int) or isinstance(processes, bool):
            raise TypeError("processes must be an int, got %r" % type(processes).__name__)
        if processes < 1:
            raise ValueError("processes must be >= 1, got %d" % processes)
        for name, value in (
            ("drain_timeout", drain_timeout),
            ("kill_timeout", kill_timeout),
            ("backoff", backoff),
            ("max_backoff", max_backoff),
            ("stable_after", stable_after),
        ):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError("%s must be a number >= 0, got %r" % (name, value))
        self._make_server = make_server
        self.processes = processes
        self.drain_timeout = float(drain_timeout)
        self.kill_timeout = float(kill_timeout)
        self._on_ready = on_ready
        self._backoff = float(backoff)
        self._max_backoff = float(max_backoff)
        self._stable_after = float(stable_after)
        self._lock = threading.RLock()  # reentrant: stop() may run in a signal handler
        self._children: dict[int, _Child] = {}  # pid -> child
        self._by_fd: dict[int, _Child] = {}  # status pipe -> child
        self._slots = [_Slot() for _ in range(processes)]
        self._address: list[Any] | None = None
        self._restarts = 0
        self._wake_r = -1
        self._wake_w = -1
        self._stopping = False
        self._kill_at: float | None = None
        self._killed = False
        self._fatal: PreforkError | None = None
        self._exit_code = 0
        self._announced = False
        self._ran = False
        self._set_pdeathsig: Callable[[int], None] | None = None
        self._stop_early = False

    # -- for the caller ------------------------------------------------------------------

    @property
    def pids(self) -> list[int]:
        """Pids of the live children, by slot (0 for a slot waiting for a restart).

        Thread-safe.
        """
        with self._lock:
            out = [0] * self.processes
            for child in self._children.values():
                out[child.slot] = child.pid
            return out

    @property
    def address(self) -> list[Any] | None:
        """The addresses the children listen on (one per server that has ``address``),
        once the first child is ready.

        Thread-safe.
        """
        return self._address

    @property
    def restarts(self) -> int:
        """How many children were restarted after dying.

        Thread-safe.
        """
        return self._restarts

    def stop(self) -> None:
        """Ask run() to drain and stop, as SIGTERM does (also usable in a signal handler).

        Thread-safe.
        """
        with self._lock:  # run() closes the pipe under the lock: no write to a reused fd
            if self._wake_w < 0 and not self._ran:
                self._stop_early = True  # run() stops as soon as it has started
            elif self._wake_w >= 0:
                try:
                    os.write(self._wake_w, _STOP_BYTE)
                except OSError:
                    pass  # the pipe is full: a wakeup is already waiting

    # -- the parent ----------------------------------------------------------------------

    def run(self) -> int:
        """Fork the children and supervise them until stopped; see :func:`serve`.

        Main thread only.
        """
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("prefork serve() must run in the main thread (signals)")
        others = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
        if others:
            log.warning(
                "prefork: forking while other threads run (%s); a thread holding a "
                "lock at fork() can deadlock a child: create loops, pools and "
                "threads in make_server",
                ", ".join(others),
            )
        self._set_pdeathsig = _load_prctl()
        with self._lock:  # stop() sees either _ran False or the pipe
            if self._ran:
                raise RuntimeError("a Supervisor runs once")
            self._ran = True
            self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        old_handlers: dict[int, Any] = {}
        old_wakeup = -1
        try:
            # The wakeup fd first: a signal caught from now on reaches the loop below.
            old_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
            for sig in (*_STOP_SIGNALS, signal.SIGCHLD):
                old_handlers[sig] = signal.signal(sig, _noop_handler)
            if self._stop_early:
                self.stop()
            self._supervise()
        finally:
            self._kill_all()
            signal.set_wakeup_fd(old_wakeup)
            for signum, handler in old_handlers.items():
                signal.signal(signum, handler)
            with self._lock:
                for fd in (self._wake_r, self._wake_w):
                    os.close(fd)
                self._wake_r = self._wake_w = -1
        if self._fatal is not None:
            raise self._fatal
        return self._exit_code

    def _supervise(self) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        for index in range(self.processes):
            self._spawn(index, poller)
            if self._stopping:
                break
        while self._children or (not self._stopping and self._pending_restarts()):
            now = time.monotonic()
            timeout = 1.0
            for slot in self._slots:
                if slot.restart_at is not None:
                    timeout = min(timeout, slot.restart_at - now)
            if self._kill_at is not None:
                timeout = min(timeout, self._kill_at - now)
            for fd, _ in poller.poll(max(0, int(timeout * 1000) + 1)):
                if fd == self._wake_r:
                    self._read_wakeups()
                else:
                    child = self._by_fd.get(fd)
                    if child is not None:
                        self._read_status(child, poller)
            self._reap(poller)
            now = time.monotonic()
            if self._kill_at is not None and now >= self._kill_at and not self._killed:
                self._killed = True
                for child in list(self._children.values()):
                    log.warning(
                        "prefork: child %d (pid %d) still running: SIGKILL", child.slot, child.pid
                    )
                    self._exit_code = 1
                    self._signal(child.pid, signal.SIGKILL)
            if not self._stopping:
                for index, slot in enumerate(self._slots):
                    if slot.restart_at is not None and now >= slot.restart_at:
                        slot.restart_at = None
                        self._restarts += 1
                        self._spawn(index, poller)
                        if self._stopping:
                            break

    def _pending_restarts(self) -> bool:
        return any(slot.restart_at is not None for slot in self._slots)

    def _spawn(self, slot: int, poller: select.poll) -> None:
        status_r, status_w = os.pipe()
        parent = os.getpid()
        # No signal may run the parent's handlers (or write the parent's wakeup pipe) in
        # the child before the child has replaced them.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, (*_STOP_SIGNALS, signal.SIGCHLD))
        try:
            pid = os.fork()
            if pid == 0:  # pragma: no cover (child)
                os.close(status_r)
                self._child_main(slot, status_w, parent, old_mask)  # never returns
        except BaseException:
            os.close(status_r)
            os.close(status_w)
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            raise
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        os.close(status_w)
        os.set_blocking(status_r, False)
        child = _Child(slot, pid, status_r, time.monotonic())
        with self._lock:
            self._children[pid] = child
        self._by_fd[status_r] = child
        poller.register(status_r, select.POLLIN)
        log.info("prefork: child %d started (pid %d)", slot, pid)

    def _read_wakeups(self) -> None:
        try:
            data = os.read(self._wake_r, 512)
        except BlockingIOError:
            return
        for byte in data:
            if byte in _STOP_SIGNALS or byte == _STOP_BYTE[0]:
                why = signal.Signals(byte).name if byte else "stop()"
                self._begin_stop(why, escalate=bool(byte))

    def _begin_stop(self, why: str, escalate: bool = False) -> None:
        if not self._stopping:
            self._stopping = True
            self._kill_at = time.monotonic() + self.drain_timeout + self.kill_timeout
            for slot in self._slots:
                slot.restart_at = None
            if self._fatal is None:
                log.info(
                    "prefork: %s: draining %d children (deadline %.1f s)",
                    why,
                    len(self._children),
                    self.drain_timeout,
                )
            for child in list(self._children.values()):
                self._signal(child.pid, signal.SIGTERM)
        elif escalate and not self._killed:
            log.warning("prefork: %s again: killing the children now", why)
            self._kill_at = time.monotonic()

    def _signal(self, pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass  # already dead, not yet reaped

    def _read_status(self, child: _Child, poller: select.poll) -> None:
        try:
            data = os.read(child.status_fd, 65536)
        except BlockingIOError:
            return
        if not data:
            self._close_status(child, poller)
            return
        child.inbox += data
        while b"\n" in child.inbox:
            line, _, rest = bytes(child.inbox).partition(b"\n")
            child.inbox = bytearray(rest)
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            self._on_status(child, msg)

    def _close_status(self, child: _Child, poller: select.poll | None) -> None:
        if child.status_fd >= 0:
            if poller is not None:
                poller.unregister(child.status_fd)
            self._by_fd.pop(child.status_fd, None)
            os.close(child.status_fd)
            child.status_fd = -1

    def _on_status(self, child: _Child, msg: dict[str, Any]) -> None:
        slot = self._slots[child.slot]
        if "error" in msg:
            self._fail(
                "child %d (pid %d) failed to start: %s" % (child.slot, child.pid, msg["error"])
            )
            return
        if "ready" not in msg:
            return
        child.ready = True
        slot.ever_ready = True
        slot.boot_crashes = 0
        addresses = msg["ready"]
        if self._address is None:
            self._address = addresses
        elif addresses != self._address:
            self._fail(
                "children listen on different addresses (%s, then %s): with port 0 "
                "each child picks its own port; pass a fixed port, or reserve one "
                "with cppnp.prefork.reserve_port()" % (self._address, addresses)
            )
            return
        log.info(
            "prefork: child %d ready (pid %d) on %s",
            child.slot,
            child.pid,
            ", ".join("%s:%s" % tuple(a[:2]) for a in addresses) or "?",
        )
        if not self._announced and not self._stopping and all(s.ever_ready for s in self._slots):
            self._announced = True
            log.info(
                "prefork: %d children ready: pids %s",
                self.processes,
                " ".join(str(p) for p in self.pids),
            )
            if self._on_ready is not None:
                self._on_ready(self)

    def _fail(self, message: str) -> None:
        if self._fatal is None:
            log.error("prefork: %s; stopping (not restarting)", message)
            self._fatal = PreforkError(message)
        self._begin_stop("start failure")

    def _reap(self, poller: select.poll) -> None:
        for pid in list(self._children):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done == 0:
                continue
            with self._lock:
                child = self._children.pop(pid)
            if child.status_fd >= 0:
                # The last status line may still be in the pipe: read it before judging.
                self._read_status(child, poller)
                self._close_status(child, poller)
            self._on_exit(child, status)

    def _on_exit(self, child: _Child, status: int) -> None:
        how = _describe(status)
        code = os.waitstatus_to_exitcode(status)
        uptime = time.monotonic() - child.started
        if self._stopping:
            expected = code == 0 or (self._fatal is not None and code == EXIT_BOOT_FAILED)
            level = logging.INFO if expected else logging.WARNING
            log.log(level, "prefork: child %d (pid %d) %s", child.slot, child.pid, how)
            if code != 0 and not (self._fatal is not None and code == EXIT_BOOT_FAILED):
                self._exit_code = 1
            return
        slot = self._slots[child.slot]
        if code == EXIT_BOOT_FAILED and not child.ready:
            self._fail(
                "child %d (pid %d) failed to start (%s; see its log)" % (child.slot, child.pid, how)
            )
            return
        if not child.ready:
            slot.boot_crashes += 1
            if slot.boot_crashes >= _BOOT_CRASH_LIMIT:
                self._fail(
                    "child %d died before it was ready %d times in a row (last: "
                    "pid %d %s)" % (child.slot, slot.boot_crashes, child.pid, how)
                )
                return
        slot.crashes = 1 if uptime >= self._stable_after else slot.crashes + 1
        delay = min(self._max_backoff, self._backoff * 2 ** (slot.crashes - 1))
        slot.restart_at = time.monotonic() + delay
        log.warning(
            "prefork: child %d (pid %d) %s after %.1f s; restarting in %.1f s",
            child.slot,
            child.pid,
            how,
            uptime,
            delay,
        )

    def _kill_all(self) -> None:
        """Never leave a child behind, whatever happened in the parent."""
        if not self._children:
            return
        for child in self._children.values():
            self._signal(child.pid, signal.SIGKILL)
        for pid in list(self._children):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            with self._lock:
                child = self._children.pop(pid)
            self._close_status(child, None)
        self._exit_code = 1

    # -- the child -----------------------------------------------------------------------

    def _child_main(
        self, slot: int, status_w: int, parent: int, mask: set[int | signal.Signals]
    ) -> None:
        """Run one child; never returns (os._exit: no parent atexit handlers, no
        pytest/finally blocks of the caller run twice)."""
        code = _EXIT_CRASHED
        try:
            signal.set_wakeup_fd(-1)
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
            for other in self._children.values():
                if other.status_fd >= 0:
                    os.close(other.status_fd)
            self._children.clear()
            self._by_fd.clear()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            assert self._set_pdeathsig is not None
            code = _ChildRuntime(
                self._make_server,
                slot,
                status_w,
                parent,
                self.drain_timeout,
                self.kill_timeout,
                mask,
                self._set_pdeathsig,
            ).run()
        except BaseException:
            try:
                log.exception("prefork: child %d crashed", slot)
            except BaseException:
                pass
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
                logging.shutdown()
            except BaseException:
                pass
            os._exit(code)


def _load_prctl() -> Callable[[int], None]:
    """Return set_pdeathsig(sig), loaded in the parent: no dlopen() after fork()."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def set_pdeathsig(sig: int) -> None:
        if libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, "prctl(PR_SET_PDEATHSIG): " + os.strerror(err))

    return set_pdeathsig


class _ChildRuntime:
    """One child's life: boot, serve, drain, exit status."""

    def __init__(
        self,
        make_server: MakeServer,
        slot: int,
        status_w: int,
        parent: int,
        drain_timeout: float,
        kill_timeout: float,
        mask: set[int | signal.Signals],
        set_pdeathsig: Callable[[int], None],
    ) -> None:
        self.set_pdeathsig = set_pdeathsig
        self.make_server = make_server
        self.slot = slot
        self.status_w = status_w
        self.parent = parent
        self.drain_timeout = drain_timeout
        self.kill_timeout = kill_timeout
        self.mask = mask
        self.stop_requested = False
        self.draining = False
        self.deadline = 0.0
        self.servers: list[Any] = []
        self.pools: list[ThreadPool] = []
        self.shut: set[int] = set()
        self.loop: EventLoop | None = None
        self.forced = 0
        self.drained = False
        self.finished = False

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # No work here: a flag the loop's timer reads, and an alarm that ends this
        # process if the drain ever hangs (default SIGALRM action: terminate).
        if not self.stop_requested:
            self.stop_requested = True
            signal.alarm(int(self.drain_timeout + self.kill_timeout) + 1)

    def _report(self, msg: dict[str, Any]) -> None:
        data = (json.dumps(msg) + "\n").encode()
        try:
            while data:
                data = data[os.write(self.status_w, data) :]
        except OSError:
            pass  # the parent is gone; PDEATHSIG handles the rest

    def run(self) -> int:
        for sig in _STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        self.set_pdeathsig(signal.SIGTERM)
        signal.pthread_sigmask(signal.SIG_SETMASK, self.mask)
        if os.getppid() != self.parent:
            return _EXIT_ORPHANED  # the parent died before PDEATHSIG was armed
        try:
            loop = self.loop = EventLoop()
        except BaseException as exc:
            self._report({"error": "EventLoop(): %s" % _why(exc)})
            raise
        try:
            return self._serve(loop)
        finally:
            loop.close()

    def _boot(self, loop: EventLoop) -> None:
        made = self.make_server(loop)
        items = list(made) if isinstance(made, (list, tuple)) else [made]
        for item in items:
            if isinstance(item, ThreadPool):
                self.pools.append(item)
            elif isinstance(item, TcpServer) or isinstance(item, PreforkServer):
                self.servers.append(item)
            else:
                raise TypeError(
                    "make_server returned %r: expected a TcpServer, an object "
                    "with start(), stop_accepting(), stop() and "
                    "connection_count, or a list of them" % (item,)
                )
        if not self.servers:
            raise TypeError("make_server returned no server")
        for server in self.servers:
            server.start()
            _check_reuse_port(server)

    def _serve(self, loop: EventLoop) -> int:
        try:
            self._boot(loop)
        except BaseException as exc:
            # A bind error needs no traceback; a bug in make_server does.
            log.error(
                "prefork: child %d (pid %d): make_server/start failed: %s",
                self.slot,
                os.getpid(),
                _why(exc),
                exc_info=not isinstance(exc, OSError),
            )
            self._report({"error": _why(exc)})
            self._teardown(graceful=False)
            return EXIT_BOOT_FAILED
        addresses = [list(s.address) for s in self.servers if hasattr(s, "address")]
        self._report({"ready": addresses})
        tick = loop.run_every(_TICK, self._tick)
        code = 0
        try:
            if not self.stop_requested:
                loop.loop()
            if not self.draining:
                # Stopped before or without a signal (the app called loop.quit()).
                self._begin_drain()
                loop.loop()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            self.finished = True
            loop.cancel_timer(tick)
            self._teardown(graceful=self.drained)
        if self.forced:
            log.warning(
                "prefork: child %d (pid %d): drain deadline: %d connection(s) force-closed",
                self.slot,
                os.getpid(),
                self.forced,
            )
        return code

    def _tick(self) -> None:
        if self.finished:
            return
        if self.stop_requested and not self.draining:
            self._begin_drain()
        if self.draining:
            self._drain_step()

    def _begin_drain(self) -> None:
        self.draining = True
        self.deadline = time.monotonic() + self.drain_timeout
        for server in self.servers:
            server.stop_accepting()
        self._drain_step()

    def _drain_step(self) -> None:
        assert self.loop is not None
        left = self.deadline - time.monotonic()
        done = True
        for server in self.servers:
            drain = getattr(server, "drain", None)
            if callable(drain):
                finished = bool(drain(max(0.0, left)))
            elif isinstance(server, TcpServer):
                finished = self._drain_tcp(server)
            else:
                finished = server.connection_count == 0
            done = done and finished
        if done:
            self.drained = self.finished = True
            self.loop.quit()
        elif left <= 0:
            self.finished = True
            for server in self.servers:
                self.forced += server.connection_count
                server.stop()
            self.loop.quit()

    def _drain_tcp(self, server: TcpServer) -> bool:
        for conn in server.connections():
            if conn.pending_tasks or conn.output_bytes or conn.input_bytes:
                continue  # a request in flight
            if conn.id in self.shut:
                conn.force_close()  # FIN sent a tick ago; the peer did not close
            else:
                self.shut.add(conn.id)
                conn.shutdown()
        return server.connection_count == 0

    def _teardown(self, graceful: bool) -> None:
        for server in self.servers:
            try:
                server.stop()
            except Exception:
                log.exception("prefork: %r.stop() failed", server)
            close = getattr(server, "close", None)
            if callable(close):
                try:
                    close()
                except Exception:
                    log.exception("prefork: %r.close() failed", server)
        for pool in self.pools:
            # After a forced stop the tasks left only produce replies that are dropped:
            # do not wait for them (os._exit ends their threads).
            pool.stop(drain=graceful, timeout=self.kill_timeout / 2 if graceful else 0.1)
        if self.loop is not None and not self.loop.closed:
            # Let force-closes and released connections run their callbacks.
            for _ in range(3):
                self.loop.run_once(0)


def _why(exc: BaseException) -> str:
    text = "%s: %s" % (type(exc).__name__, exc)
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        text += (
            " (every child binds the address with SO_REUSEPORT: is another process "
            "using the port, or was the server created without reuse_port=True?)"
        )
    return text


def _check_reuse_port(server: Any) -> None:
    """Raise if *server*'s listener cannot be shared: a SO_REUSEPORT probe socket cannot
    bind beside a listener that lacks SO_REUSEPORT."""
    address = getattr(server, "address", None)
    if not (isinstance(address, tuple) and len(address) >= 2):
        return
    host, port = address[0], address[1]
    info = socket.getaddrinfo(
        host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
    )[0]
    with socket.socket(info[0], info[1], info[2]) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            probe.bind(info[4])
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            raise PreforkError(
                "%r on %s:%d does not listen with SO_REUSEPORT: prefork children share the "
                "port, create it with TcpServer(..., reuse_port=True)" % (server, host, port)
            ) from None
