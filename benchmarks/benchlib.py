"""Shared helpers for the cppnp benchmark scripts.

* ``SERVERS``: the table of echo servers (one line each) used by ``run.py`` and
  ``idle_memory.py``.
* ``build_c``: compile a C tool into ``benchmarks/.build`` with ``gcc -O2 -Wall -Werror``.
* ``ServerProcess``: start a server in its own session (optionally pinned with
  ``taskset``), wait for its ``listening on HOST:PORT`` line, stop it with SIGINT, then
  SIGTERM, then SIGKILL.  Every process started here is tracked and ``stop_all`` ends
  them, so a crash or Ctrl-C never leaves a server behind.
* ``/proc`` readers: CPU time (utime + stime of all threads) and VmRSS of a pid.
* ``machine_info``: CPU model, kernel, Python, uvloop and gcc versions.

Only loopback addresses are ever used.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.metadata
import json
import os
import platform
import selectors
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
BUILD_DIR = BENCH_DIR / ".build"
LOG_DIR = BUILD_DIR / "logs"
SERVERS_DIR = BENCH_DIR / "servers"
HOST = "127.0.0.1"
CFLAGS = ("-O2", "-Wall", "-Werror")


# ---- the server table -------------------------------------------------------------------


@dataclass(frozen=True)
class ServerSpec:
    """One echo server configuration.

    ``argv`` may use ``{python}`` (interpreter for Python servers), ``{build}`` (the
    C build dir) and ``{servers}`` (``benchmarks/servers``); the harness appends
    ``--host 127.0.0.1 --port 0``.  ``full_matrix=False`` limits the default matrix to
    64 B messages (thread-pool variants, to keep the default run near 10 minutes).
    ``build`` names a C source in ``servers/`` compiled before use.
    """

    name: str
    group: str
    argv: tuple[str, ...]
    full_matrix: bool = True
    fib: int = 0
    build: str | None = None


_PY = "{python}"
_AIO = (_PY, "{servers}/asyncio_echo.py")
_UV = (*_AIO, "--uvloop")
_CPPNP = (_PY, "-m", "cppnp", "echo")

_TABLE = (
    ServerSpec("c_echo", "c_echo", ("{build}/c_echo",), build="c_echo.c"),
    ServerSpec("cppnp", "cppnp", (*_CPPNP, "--threads", "0", "--fib", "0")),
    ServerSpec("cppnp_pool1", "cppnp_pool", (*_CPPNP, "--threads", "1", "--fib", "0"), False),
    ServerSpec("cppnp_pool2", "cppnp_pool", (*_CPPNP, "--threads", "2", "--fib", "0"), False),
    ServerSpec(
        "cppnp_pool1_fib20", "cppnp_pool", (*_CPPNP, "--threads", "1", "--fib", "20"), False, 20
    ),
    ServerSpec(
        "cppnp_pool2_fib20", "cppnp_pool", (*_CPPNP, "--threads", "2", "--fib", "20"), False, 20
    ),
    ServerSpec("asyncio", "asyncio", _AIO),
    ServerSpec("uvloop", "uvloop", _UV),
    ServerSpec("asyncio_exec1", "asyncio_exec", (*_AIO, "--executor", "1"), False),
    ServerSpec("asyncio_exec2", "asyncio_exec", (*_AIO, "--executor", "2"), False),
    ServerSpec(
        "asyncio_exec1_fib20", "asyncio_exec", (*_AIO, "--executor", "1", "--fib", "20"), False, 20
    ),
    ServerSpec(
        "asyncio_exec2_fib20", "asyncio_exec", (*_AIO, "--executor", "2", "--fib", "20"), False, 20
    ),
    ServerSpec("uvloop_exec1", "uvloop_exec", (*_UV, "--executor", "1"), False),
    ServerSpec("uvloop_exec2", "uvloop_exec", (*_UV, "--executor", "2"), False),
    ServerSpec(
        "uvloop_exec1_fib20", "uvloop_exec", (*_UV, "--executor", "1", "--fib", "20"), False, 20
    ),
    ServerSpec(
        "uvloop_exec2_fib20", "uvloop_exec", (*_UV, "--executor", "2", "--fib", "20"), False, 20
    ),
)
SERVERS: dict[str, ServerSpec] = {spec.name: spec for spec in _TABLE}


def server_argv(spec: ServerSpec, python: str = sys.executable) -> list[str]:
    """Expand the placeholders of *spec* and append ``--host 127.0.0.1 --port 0``."""
    subst = {"python": python, "build": str(BUILD_DIR), "servers": str(SERVERS_DIR)}
    return [part.format(**subst) for part in spec.argv] + ["--host", HOST, "--port", "0"]


# ---- building the C tools ---------------------------------------------------------------


class BuildError(RuntimeError):
    """gcc failed; the message holds its output."""


def build_c(source: Path, name: str | None = None) -> Path:
    """Compile *source* into ``BUILD_DIR/name`` unless the binary is newer than it."""
    out = BUILD_DIR / (name or source.stem)
    if out.exists() and out.stat().st_mtime >= source.stat().st_mtime:
        return out
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise BuildError("no gcc/cc on PATH")
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    proc = subprocess.run(
        [gcc, *CFLAGS, "-o", str(tmp), str(source)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        raise BuildError(f"{gcc} {' '.join(CFLAGS)} {source.name} failed:\n{proc.stderr}")
    tmp.replace(out)
    return out


# ---- CPU pinning ------------------------------------------------------------------------


def can_pin(cpus: Iterable[int]) -> bool:
    """True if ``taskset`` exists and every CPU in *cpus* is usable by this process."""
    if shutil.which("taskset") is None:
        return False
    allowed = os.sched_getaffinity(0)
    return all(cpu in allowed for cpu in cpus)


def pin_prefix(cpu: int | None) -> list[str]:
    """``["taskset", "-c", cpu]`` or nothing when *cpu* is None."""
    return [] if cpu is None else ["taskset", "-c", str(cpu)]


# ---- /proc ------------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def stat_fields(path: str) -> list[str]:
    """The fields of a ``/proc/.../stat`` file after the command name: ``[0]`` is the
    state (field 3), ``[1]`` the parent pid.  OSError if the process is gone."""
    with open(path, encoding="ascii", errors="replace") as f:
        stat = f.read()
    return stat[stat.rindex(")") + 2 :].split()


def stat_cpu_seconds(fields: list[str]) -> float:
    """utime + stime (fields 14 and 15) of :func:`stat_fields`, in seconds."""
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of *pid*'s whole thread group (``/proc/PID/stat``), in seconds."""
    return stat_cpu_seconds(stat_fields(f"/proc/{pid}/stat"))


def cpu_ticks(cpu: int) -> tuple[int, int, int]:
    """(busy, steal, total) jiffies of one CPU from ``/proc/stat``.

    busy is user + nice + system (irq/softirq time is left out: loopback packet
    processing lands there and is not charged to any process); total counts every
    column.
    """
    with open("/proc/stat", encoding="ascii") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                v = [int(x) for x in line.split()[1:9]]
                user, nice, system, idle, iowait, irq, softirq, steal = v
                busy = user + nice + system
                return busy, steal, busy + idle + iowait + irq + softirq + steal
    raise RuntimeError(f"cpu{cpu} not in /proc/stat")


def proc_rss_bytes(pid: int) -> int:
    """VmRSS of *pid* in bytes."""
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def proc_fd_count(pid: int) -> int:
    """Number of open file descriptors of *pid*."""
    return len(os.listdir(f"/proc/{pid}/fd"))


# ---- process tracking -------------------------------------------------------------------

_LIVE: set[subprocess.Popen[Any]] = set()
_LIVE_LOCK = threading.Lock()


def track(proc: subprocess.Popen[Any]) -> None:
    """Remember *proc* (started with ``start_new_session=True``) for ``stop_all``."""
    with _LIVE_LOCK:
        _LIVE.add(proc)


def terminate(proc: subprocess.Popen[Any], grace: float = 3.0) -> int | None:
    """Stop *proc*'s process group: SIGINT, then SIGTERM, then SIGKILL. Returns its rc."""
    try:
        for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
            if proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)  # own session: the group id is the pid
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(wait)
        return proc.poll()
    finally:
        with _LIVE_LOCK:
            _LIVE.discard(proc)


def stop_all() -> None:
    """Stop every process started through this module that is still running."""
    with _LIVE_LOCK:
        procs = list(_LIVE)
    for proc in procs:
        terminate(proc, grace=2.0)


atexit.register(stop_all)


def read_lines(
    proc: subprocess.Popen[bytes], deadline: float, on_line: Callable[[str], bool]
) -> bool:
    """Feed *proc*'s stdout lines to *on_line* until it returns True, EOF or *deadline*.

    Returns True if *on_line* asked to stop.
    """
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if not sel.select(min(left, 0.5)):
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                if buf and on_line(buf.decode(errors="replace")):
                    return True
                return False
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if on_line(line.decode(errors="replace")):
                    return True


def run_loadgen(
    loadgen: Path,
    port: int,
    *,
    conns: int,
    size: int,
    duration: float,
    warmup: float,
    client_cpu: int | None,
    on_window: Callable[[str, int], None],
) -> tuple[dict[str, Any], int | None, str]:
    """Run the ping-pong load generator against ``HOST:port``.

    *on_window(edge, loadgen_pid)* is called at ``"window-start"`` and ``"window-end"``
    (where the callers sample CPU).  Returns the load generator's JSON result (``{}`` if it
    printed none; ``unparsed_output`` if it was not JSON), its exit code and its stderr.
    """
    argv = [
        *pin_prefix(client_cpu),
        str(loadgen),
        "--host",
        HOST,
        "--port",
        str(port),
        "--conns",
        str(conns),
        "--size",
        str(size),
        "--duration",
        str(duration),
        "--warmup",
        str(warmup),
        "--mode",
        "pingpong",
    ]
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    track(proc)
    result: dict[str, Any] = {}

    def on_line(line: str) -> bool:
        if line.startswith("# window-"):
            on_window(line[2:], proc.pid)
        elif line.startswith("{"):
            try:
                result.update(json.loads(line))
            except ValueError:
                result["unparsed_output"] = line[:500]
            return True
        return False

    deadline = time.monotonic() + warmup + duration + 20
    try:
        read_lines(proc, deadline, on_line)
        proc.wait(max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        rc = terminate(proc, grace=1.0)
    assert proc.stderr is not None
    return result, rc, proc.stderr.read().decode(errors="replace").strip()


def print_result(out: dict[str, Any], measure: Callable[[], dict[str, Any]]) -> int:
    """The micro-benchmark scripts' side of :func:`run_json_script`.

    SIGTERM exits with 143; *measure()*'s result is merged into *out*, which is printed as
    one JSON line.  An exception is reported in ``out["error"]`` (its first and last line)
    instead of a traceback, so the runner can still parse the line.  Returns the exit
    status: 1 if *out* has an ``error``, else 0.
    """
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        out.update(measure())
    except Exception as exc:  # report, don't crash the runner's JSON parsing
        lines = str(exc).strip().splitlines() or [""]
        why = lines[0] + (f" ... {lines[-1].strip()}" if len(lines) > 1 else "")
        out["error"] = f"{type(exc).__name__}: {why}"
    finally:
        stop_all()
    print(json.dumps(out), flush=True)
    return 1 if "error" in out else 0


# ---- servers ----------------------------------------------------------------------------


class ServerStartError(RuntimeError):
    """The server exited or stayed silent before printing ``listening on``."""


class ServerProcess:
    """A benchmark server subprocess in its own session; use as a context manager."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        cpu: int | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = [*pin_prefix(cpu), *argv]
        self.env = env
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = LOG_DIR / f"{name}.log"
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        """Process id (the same as the server's: taskset execs)."""
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 20.0) -> int:
        """Start the server and wait for ``listening on HOST:PORT``; return the port."""
        self._log = open(self.log_path, "wb")  # closed in stop()
        self._log.write(f"$ {' '.join(self.argv)}\n".encode())
        self._log.flush()
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=self._log,
                env=self.env,
                start_new_session=True,
            )
        except OSError as exc:
            raise ServerStartError(f"cannot exec {self.argv[0]}: {exc}") from exc
        track(self.proc)
        proc = self.proc
        log = self._log

        def on_line(line: str) -> bool:
            log.write(line.encode() + b"\n")
            if line.startswith("listening on "):
                self.port = int(line.rsplit(":", 1)[1])
                return True
            return False

        if not read_lines(proc, time.monotonic() + timeout, on_line):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(1.0)  # EOF on stdout can come just before the exit status
            rc = proc.poll()
            self.stop()
            why = f"exited with status {rc}" if rc is not None else f"silent for {timeout:.0f} s"
            raise ServerStartError(f"{self.name} {why}; log tail:\n{self.log_tail()}")
        # Keep draining stdout so a chatty server can never block on a full pipe.
        threading.Thread(target=self._drain, daemon=True).start()
        return self.port

    def _drain(self) -> None:
        proc, log = self.proc, self._log
        if proc is None or proc.stdout is None or log is None:
            return
        with contextlib.suppress(OSError, ValueError):
            for line in proc.stdout:
                log.write(line)

    def alive(self) -> bool:
        """True while the server process runs."""
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        """SIGINT, then SIGTERM, then SIGKILL; returns the exit status."""
        rc = None
        if self.proc is not None:
            rc = terminate(self.proc)
        if self._log is not None:
            with contextlib.suppress(OSError, ValueError):
                self._log.close()
        return rc

    def log_tail(self, lines: int = 15) -> str:
        """The last *lines* lines of the server's log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- running JSON-printing scripts ------------------------------------------------------


def run_json_script(argv: Sequence[str], timeout: float, cpu: int | None = None) -> dict[str, Any]:
    """Run a script that prints one JSON line; return it (or ``{"error": ...}``)."""
    proc = subprocess.Popen(
        [*pin_prefix(cpu), *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    track(proc)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        terminate(proc, grace=1.0)
        return {"error": f"timed out after {timeout:.0f} s"}
    finally:
        terminate(proc, grace=1.0)
    result: dict[str, Any] | None = None
    for line in reversed(out.decode(errors="replace").splitlines()):
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                result = json.loads(line)
                break
    if result is None:
        tail = "\n".join(err.decode(errors="replace").splitlines()[-8:])
        return {"error": f"exit status {proc.returncode}, no JSON output", "stderr": tail}
    if proc.returncode != 0 and "error" not in result:
        result["error"] = f"exit status {proc.returncode}"
    return result


# ---- machine description ----------------------------------------------------------------


def _first_line(argv: Sequence[str]) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0] if out.returncode == 0 and lines else None


def package_version(name: str, python: str = sys.executable) -> str | None:
    """Version of distribution *name* as seen by interpreter *python*, or None."""
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None
    code = f"import importlib.metadata as m; print(m.version({name!r}))"
    return _first_line([python, "-c", code])


def machine_info(python: str = sys.executable) -> dict[str, Any]:
    """Describe the machine and toolchain the numbers were measured on."""
    cpu_model = platform.processor() or None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    os_name = None
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    governor = None
    with contextlib.suppress(OSError):
        governor = Path("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor").read_text()
        governor = governor.strip()
    cppnp = _first_line(
        [python, "-c", "import cppnp; print(getattr(cppnp, '__version__', 'unknown'))"]
    )
    return {
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpus_allowed": sorted(os.sched_getaffinity(0)),
        "cpu_governor": governor,
        "kernel": platform.release(),
        "os": os_name,
        "python": platform.python_version(),
        "python_impl": platform.python_implementation(),
        "python_executable": python,
        "uvloop": package_version("uvloop", python),
        "cppnp": cppnp,
        "gcc": _first_line(["gcc", "--version"]),
        "git_commit": _first_line(["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"]),
        "taskset": shutil.which("taskset") is not None,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }
