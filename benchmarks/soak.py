"""Soak test: minutes of mixed load against a cppnp server, watching for lost replies
and for growth of the server's memory and descriptors.

The server runs in a child process (this script with ``--serve``): a TcpServer on one
EventLoop, a ThreadPool (default 4 workers), and a framed protocol whose request kinds
exercise every hand-off path::

    frame   = length:u32be | kind:u8 | arg:u8 | id:u64be | filler
    kind E  echo inline on the loop thread
    kind P  echo from a pool task (Task(handler, frame, conn): counted on the connection)
    kind F  fib(arg) in a pool task, then echo
    kind T  echo from a loop timer, arg milliseconds later (run_after)
    kind Q  echo, then conn.shutdown() (a server-initiated close)

and a ticker (run_every) that keeps adding one-shot timers and cancelling old ones, and
every so often a repeating timer that it cancels later (timer churn).

The client (this process) runs threads that each keep a set of connections (default
240 in all) and, until the time is up, pick one at random and either exchange a
pipelined batch of requests (checking every reply byte for byte, matched by id), or end
it -- cleanly, by half-close (all replies still owed), by close or reset with requests
outstanding (replies dropped by the server), or by asking the server to close -- and
open a new one.  Only 127.0.0.1 is used.

Every ``--sample`` seconds the server reports its RSS, open fds, threads, connections,
timers and counters.  Exit status 1 if a live or half-closed peer missed a reply or got
a wrong one, a callback or task raised, the server's RSS or non-connection fd count kept
growing (median of the last third of the samples after warm-up against the first
third), or its fds did not return to the baseline once every client had closed.

    python benchmarks/soak.py                 # 2 minutes
    python benchmarks/soak.py --seconds 30 --json soak.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from pathlib import Path
from typing import IO, Any

HOST = "127.0.0.1"
HEADER = struct.Struct("!IBBQ")  # length, kind, arg, id (length counts the rest)
KINDS = ("E", "P", "F", "T")
KIND_WEIGHTS = (4, 3, 1, 1)
FATES = ("clean", "half", "close", "reset", "server")
FATE_WEIGHTS = (4, 3, 2, 2, 1)
IO_TIMEOUT = 20.0


# ==== the server (child process) ===========================================================


def serve(args: argparse.Namespace) -> int:
    import cppnp
    from cppnp import EventLoopThread, ICppnpUsr, IRun2, Task, TcpServer, ThreadPool

    def fib(n: int) -> int:
        return n if n < 2 else fib(n - 1) + fib(n - 2)

    counts: Counter[str] = Counter()
    lock = threading.Lock()

    class Handler(ICppnpUsr, IRun2):
        def __init__(self, pool: ThreadPool) -> None:
            self.pool = pool
            self.loop: Any = None

        def on_connection(self, conn: Any) -> None:
            counts["connections"] += 1

        def on_message(self, conn: Any, buf: Any) -> None:
            while len(buf) >= 4:
                n = buf.peek_int32()
                if len(buf) < 4 + n:
                    return
                frame = buf.retrieve_as_bytes(4 + n)
                kind = chr(frame[4])
                counts["req_" + kind] += 1
                if kind == "E":
                    conn.send(frame)
                elif kind in "PF":
                    self.pool.add_task(Task(self, frame, conn))
                elif kind == "T":
                    self.loop.run_after(frame[5] / 1000.0, lambda f=frame: conn.send(f))
                elif kind == "Q":
                    conn.send(frame)
                    conn.shutdown()
                else:
                    counts["bad_frames"] += 1
                    conn.force_close()
                    return

        def run2(self, frame: bytes, conn: Any) -> None:
            if frame[4] == ord("F"):
                fib(frame[5])
            conn.send(frame)
            with lock:
                counts["pool_replies"] += 1

        def on_close(self, conn: Any) -> None:
            counts["closed"] += 1

    pool = ThreadPool(args.threads, name="soak-worker")
    pool.start()
    handler = Handler(pool)
    churn: dict[str, Any] = {"oneshots": deque(), "every": None, "ticks": 0}
    rng = random.Random(args.seed)
    box: dict[str, Any] = {}

    def tick() -> None:
        loop = box["loop"]
        churn["ticks"] += 1
        oneshots = churn["oneshots"]
        oneshots.append(loop.run_after(rng.uniform(0.01, 1.0), fired))
        while len(oneshots) > 50:
            loop.cancel_timer(oneshots.popleft())
            counts["timers_cancelled"] += 1
        if churn["ticks"] % 100 == 0:
            churn["every"] = loop.run_every(0.005, fired)
        elif churn["ticks"] % 100 == 20 and churn["every"] is not None:
            loop.cancel_timer(churn["every"])
            churn["every"] = None
            counts["timers_cancelled"] += 1

    def fired() -> None:
        counts["timers_fired"] += 1

    def init(loop: Any) -> None:
        box["loop"] = handler.loop = loop
        box["server"] = TcpServer(loop, (HOST, 0), handler, name="soak")
        box["server"].start()
        box["ticker"] = loop.run_every(0.01, tick)

    thread = EventLoopThread(init, name="soak-loop")
    loop = thread.start()
    server = box["server"]

    def in_loop(fn: Any) -> Any:
        done = threading.Event()
        out: dict[str, Any] = {}

        def run() -> None:
            try:
                out["v"] = fn()
            finally:
                done.set()

        loop.queue_in_loop(run)
        if not done.wait(IO_TIMEOUT):
            raise RuntimeError("the loop did not answer within %s s" % IO_TIMEOUT)
        return out["v"]

    def snapshot() -> dict[str, Any]:
        conns = in_loop(lambda: server.connection_count)
        stats = loop.stats()
        return {
            "t": time.monotonic(),
            "rss_kb": _rss_kb(),
            "fds": len(os.listdir("/proc/self/fd")),
            "threads": threading.active_count(),
            "connections": conns,
            "live_connection_objects": cppnp.live_connections(),
            "live_buffers": cppnp.live_buffers(),
            "timers": stats["timers"],
            "pending_functors": stats["pending_functors"],
            "callback_errors": stats["callback_errors"],
            "dropped_sends": stats["dropped_sends"],
            "dropped_bytes": stats["dropped_bytes"],
            "dropped_functors": stats["dropped_functors"],
            "iterations": stats["iterations"],
            "accepted": server.accepted,
            "accept_errors": server.accept_errors,
            "pool_completed": pool.completed,
            "pool_failed": pool.failed,
            "pool_discarded": pool.discarded,
            "pool_queued": pool.queued,
            "counts": dict(counts),
        }

    print("listening on %s:%d" % server.address, flush=True)
    code = 0
    try:
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "stats":
                print(json.dumps(snapshot()), flush=True)
            elif cmd == "quit":
                break
    finally:
        in_loop(server.stop)
        ok = pool.stop(drain=True, timeout=IO_TIMEOUT)
        thread.stop()
        if not ok:
            code = 3
    return code


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


# ==== the client ============================================================================


class Stats:
    """Client-side counters, shared by the client threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.c: Counter[str] = Counter()
        self.problems: list[str] = []

    def add(self, **kw: int) -> None:
        with self.lock:
            self.c.update(kw)

    def problem(self, what: str) -> None:
        with self.lock:
            self.c["problems"] += 1
            if len(self.problems) < 50:
                self.problems.append(what)


class Conn:
    """One client connection: requests outstanding by id, replies parsed from the stream."""

    def __init__(self, address: tuple[str, int], rng: random.Random, ids: Any) -> None:
        self.sock = socket.create_connection(address, timeout=IO_TIMEOUT)
        self.rng = rng
        self.ids = ids
        self.pending: dict[int, bytes] = {}
        self.inbuf = bytearray()

    def request(self, kind: str) -> bytes:
        rng = self.rng
        rid = next(self.ids)
        size = rng.choice((0, 10, 100, 700, 2000)) if rng.random() < 0.97 else 65536
        arg = {"T": rng.randint(0, 50), "F": rng.randint(10, 18)}.get(kind, 0)
        body = HEADER.pack(HEADER.size - 4 + size, ord(kind), arg, rid)[4:] + bytes(
            (rid + k) % 251 for k in range(size)
        )
        frame = struct.pack("!I", len(body)) + body
        self.pending[rid] = frame
        return frame

    def send_batch(self, kinds: list[str]) -> int:
        data = b"".join(self.request(k) for k in kinds)
        cut = self.rng.randint(0, len(data))
        self.sock.sendall(data[:cut])
        self.sock.sendall(data[cut:])
        return len(kinds)

    def read_replies(self, until_eof: bool, stats: Stats, what: str) -> bool:
        """Read until every pending reply arrived (and, if *until_eof*, until EOF).
        Returns False (after recording a problem) if a reply is missing or wrong."""
        while self.pending or until_eof:
            try:
                chunk = self.sock.recv(262144)
            except (TimeoutError, socket.timeout):
                return self._missing(stats, what, "timed out")
            except ConnectionResetError:
                return self._missing(stats, what, "reset by the server")
            if not chunk:
                return self._missing(stats, what, "EOF") if self.pending else True
            self.inbuf += chunk
            while len(self.inbuf) >= HEADER.size:
                n = struct.unpack_from("!I", self.inbuf)[0]
                if len(self.inbuf) < 4 + n:
                    break
                frame = bytes(self.inbuf[: 4 + n])
                del self.inbuf[: 4 + n]
                rid = HEADER.unpack_from(frame)[3]
                want = self.pending.pop(rid, None)
                if want != frame:
                    stats.problem(
                        "%s: %s reply id %d"
                        % (what, "unexpected" if want is None else "corrupt", rid)
                    )
                    stats.add(bad_replies=1)
                    return False
                stats.add(replies=1)
        return True

    def _missing(self, stats: Stats, what: str, how: str) -> bool:
        stats.problem("%s peer: %s with %d replies missing" % (what, how, len(self.pending)))
        stats.add(**{"missing_" + what: max(len(self.pending), 1)})
        return False

    def reset(self) -> None:
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


def client_thread(
    address: tuple[str, int],
    nconns: int,
    seed: int,
    deadline: float,
    stats: Stats,
    ids: Any,
    stop: threading.Event,
) -> None:
    rng = random.Random(seed)
    conns: list[Conn] = []

    def kinds(n: int, timers: bool = True) -> list[str]:
        pick = rng.choices(KINDS, KIND_WEIGHTS, k=n)
        return pick if timers else [k if k != "T" else "P" for k in pick]

    def open_one() -> None:
        conns.append(Conn(address, rng, ids))
        stats.add(opened=1)

    def end(c: Conn) -> None:
        conns.remove(c)
        fate = rng.choices(FATES, FATE_WEIGHTS)[0]
        stats.add(**{"fate_" + fate: 1})
        try:
            if fate == "clean":
                c.sock.close()
            elif fate == "half":
                # No timer requests: the server releases a half-closed connection once its
                # pool tasks are done; a timer reply due later is legitimately dropped.
                stats.add(requests=c.send_batch(kinds(rng.randint(1, 8), timers=False)))
                c.sock.shutdown(socket.SHUT_WR)
                c.read_replies(True, stats, "half_closed")
                c.sock.close()
            elif fate in ("close", "reset"):
                n = c.send_batch(kinds(rng.randint(1, 8)))
                stats.add(requests=n, abandoned=n)
                c.sock.close() if fate == "close" else c.reset()
            else:
                stats.add(requests=c.send_batch(["Q"]))
                c.read_replies(True, stats, "server_closed")
                c.sock.close()
        except OSError as exc:
            stats.problem("ending (%s): %r" % (fate, exc))
            c.sock.close()

    try:
        while time.monotonic() < deadline and not stop.is_set():
            if len(conns) < nconns:
                open_one()
                continue
            c = rng.choice(conns)
            if rng.random() < 0.12:
                end(c)
                continue
            try:
                stats.add(requests=c.send_batch(kinds(rng.randint(1, 8))))
                if not c.read_replies(False, stats, "live"):
                    conns.remove(c)
                    c.sock.close()
                else:
                    stats.add(exchanges=1)
            except OSError as exc:
                stats.problem("exchange on a live connection: %r" % (exc,))
                stats.add(missing_live=len(c.pending))
                conns.remove(c)
                c.sock.close()
            if rng.random() < 0.02:
                time.sleep(rng.uniform(0, 0.01))
    except OSError as exc:
        stats.problem("client thread: %r" % (exc,))
    finally:
        for c in conns:  # the end: every remaining connection closes cleanly
            c.sock.close()


# ==== the run ================================================================================


class ServerProc:
    def __init__(self, args: argparse.Namespace) -> None:
        argv = [
            args.python,
            str(Path(__file__).resolve()),
            "--serve",
            "--threads",
            str(args.threads),
            "--seed",
            str(args.seed),
        ]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin: IO[str] = self.proc.stdin
        self.stdout: IO[str] = self.proc.stdout
        line = self.stdout.readline()
        if not line.startswith("listening on "):
            self.kill()
            raise RuntimeError("server did not start: %r" % line)
        host, port = line.split()[-1].rsplit(":", 1)
        self.address = (host, int(port))

    def sample(self) -> dict[str, Any]:
        self.stdin.write("stats\n")
        self.stdin.flush()
        line = self.stdout.readline()
        if not line:
            raise RuntimeError("server died (exit status %s)" % self.proc.poll())
        return dict(json.loads(line))

    def quit(self, timeout: float = 30.0) -> int:
        with contextlib.suppress(OSError):
            self.stdin.write("quit\n")
            self.stdin.close()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def median_of(samples: list[dict[str, Any]], key: Any) -> float:
    return float(statistics.median(key(s) for s in samples))


def growth_checks(
    samples: list[dict[str, Any]], args: argparse.Namespace, warmup_until: float
) -> tuple[dict[str, Any], list[str]]:
    steady = [s for s in samples if s["t"] >= warmup_until]
    report: dict[str, Any] = {"steady_samples": len(steady)}
    failures: list[str] = []
    if len(steady) < 6:
        failures.append(
            "only %d samples after warm-up: run longer (--seconds) or sample "
            "more often (--sample)" % len(steady)
        )
        return report, failures
    third = len(steady) // 3
    first, last = steady[:third], steady[-third:]
    metrics = {
        "rss_kb": lambda s: s["rss_kb"],
        "fds_minus_connections": lambda s: s["fds"] - s["connections"],
        "threads": lambda s: s["threads"],
        "buffers_per_connection_object": lambda s: (
            s["live_buffers"] - 2 * s["live_connection_objects"]
        ),
    }
    for name, key in metrics.items():
        a, b = median_of(first, key), median_of(last, key)
        report[name] = {"first_third_median": a, "last_third_median": b}
    rss = report["rss_kb"]
    limit = rss["first_third_median"] * (1 + args.rss_tolerance) + args.rss_slack_mb * 1024
    rss["limit"] = limit
    if rss["last_third_median"] > limit:
        failures.append(
            "server RSS kept growing: median %.1f MiB -> %.1f MiB (limit %.1f)"
            % (rss["first_third_median"] / 1024, rss["last_third_median"] / 1024, limit / 1024)
        )
    for name, slack in (
        ("fds_minus_connections", 2),
        ("threads", 0),
        ("buffers_per_connection_object", 8),
    ):
        m = report[name]
        if m["last_third_median"] > m["first_third_median"] + slack:
            failures.append(
                "server %s kept growing: median %g -> %g"
                % (name, m["first_third_median"], m["last_third_median"])
            )
    return report, failures


def run(args: argparse.Namespace) -> int:
    stats = Stats()
    server = ServerProc(args)
    samples: list[dict[str, Any]] = []
    stop = threading.Event()
    failures: list[str] = []
    try:
        baseline = server.sample()
        samples.append(baseline)
        t0 = time.monotonic()
        deadline = t0 + args.seconds
        warmup_until = baseline["t"] + min(args.warmup, args.seconds / 4)
        per_thread = max(1, args.conns // args.client_threads)
        counter = iter(range(1, 1 << 62))
        lock = threading.Lock()

        class Ids:
            def __next__(self) -> int:
                with lock:
                    return next(counter)

            def __iter__(self) -> Ids:
                return self

        ids = Ids()
        threads = [
            threading.Thread(
                target=client_thread,
                name="soak-client-%d" % i,
                args=(server.address, per_thread, args.seed * 1000 + i, deadline, stats, ids, stop),
                daemon=True,
            )
            for i in range(args.client_threads)
        ]
        for t in threads:
            t.start()
        next_sample = time.monotonic() + args.sample
        while any(t.is_alive() for t in threads):
            time.sleep(min(0.2, max(0.0, next_sample - time.monotonic())))
            if time.monotonic() >= next_sample:
                s = server.sample()
                samples.append(s)
                next_sample += args.sample
                if not args.quiet:
                    print(
                        "[%5.1fs] rss %6.1f MiB  fds %4d  conns %4d  timers %3d  replies %8d"
                        "  problems %d"
                        % (
                            s["t"] - baseline["t"],
                            s["rss_kb"] / 1024,
                            s["fds"],
                            s["connections"],
                            s["timers"],
                            stats.c["replies"],
                            stats.c["problems"],
                        ),
                        flush=True,
                    )
            if time.monotonic() > deadline + 4 * IO_TIMEOUT:
                failures.append("client threads did not finish")
                stop.set()
                break
        # Every client has closed: the server must get back to its baseline.
        end_wait = time.monotonic() + IO_TIMEOUT
        final = server.sample()
        while (
            final["connections"] or final["fds"] > baseline["fds"] or final["pool_queued"]
        ) and time.monotonic() < end_wait:
            time.sleep(0.1)
            final = server.sample()
        samples.append(final)
    except BaseException:
        stop.set()
        server.kill()
        raise
    code = server.quit()
    if code != 0:
        failures.append("server exited with status %d" % code)

    c = stats.c
    growth, growth_failures = growth_checks(samples[1:-1], args, warmup_until)
    failures += growth_failures
    if c["missing_live"] or c["missing_half_closed"] or c["missing_server_closed"]:
        failures.append(
            "replies lost to peers that were owed them: live %d, half-closed %d,"
            " server-closed %d"
            % (c["missing_live"], c["missing_half_closed"], c["missing_server_closed"])
        )
    if c["bad_replies"]:
        failures.append("%d corrupt or unexpected replies" % c["bad_replies"])
    if stats.problems and not failures:
        failures.append("client problems: %s" % stats.problems[:5])
    if final["callback_errors"]:
        failures.append("%d callback errors in the server" % final["callback_errors"])
    if final["pool_failed"]:
        failures.append("%d pool tasks raised" % final["pool_failed"])
    if final["connections"]:
        failures.append("%d connections still open at the end" % final["connections"])
    if final["fds"] > baseline["fds"]:
        failures.append(
            "server fds not back to baseline: %d -> %d" % (baseline["fds"], final["fds"])
        )
    if final["live_connection_objects"] > baseline["live_connection_objects"]:
        failures.append(
            "TcpConnection objects alive at the end: %d" % final["live_connection_objects"]
        )

    elapsed = final["t"] - baseline["t"]
    steady = [s for s in samples[1:-1] if s["t"] >= warmup_until]
    summary = {
        "seconds": args.seconds,
        "elapsed": round(elapsed, 1),
        "client": {
            "connections_opened": c["opened"],
            "requests": c["requests"],
            "replies": c["replies"],
            "exchanges": c["exchanges"],
            "replies_per_second": round(c["replies"] / max(elapsed, 1e-9)),
            "abandoned_requests": c["abandoned"],
            "fates": {f: c["fate_" + f] for f in FATES},
            "missing_replies": {
                "live": c["missing_live"],
                "half_closed": c["missing_half_closed"],
                "server_closed": c["missing_server_closed"],
            },
            "bad_replies": c["bad_replies"],
            "problems": stats.problems,
        },
        "server": {
            "accepted": final["accepted"],
            "accept_errors": final["accept_errors"],
            "dropped_sends": final["dropped_sends"],
            "dropped_bytes": final["dropped_bytes"],
            "dropped_functors": final["dropped_functors"],
            "callback_errors": final["callback_errors"],
            "pool_completed": final["pool_completed"],
            "pool_failed": final["pool_failed"],
            "pool_discarded": final["pool_discarded"],
            "loop_iterations": final["iterations"],
            "counts": final["counts"],
        },
        "resources": {
            "baseline": {k: baseline[k] for k in ("rss_kb", "fds", "threads", "timers")},
            "end": {k: final[k] for k in ("rss_kb", "fds", "threads", "timers", "connections")},
            "max_connections": max(s["connections"] for s in samples),
            "max_fds": max(s["fds"] for s in samples),
            "max_timers": max(s["timers"] for s in samples),
            "rss_kb_steady_first_last": [steady[0]["rss_kb"], steady[-1]["rss_kb"]]
            if steady
            else None,
            "growth": growth,
        },
        "samples": [
            {
                k: s[k]
                for k in ("t", "rss_kb", "fds", "threads", "connections", "timers", "dropped_sends")
            }
            for s in samples
        ],
        "failures": failures,
        "ok": not failures,
    }
    print_summary(summary)
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2) + "\n")
    return 1 if failures else 0


def print_summary(s: dict[str, Any]) -> None:
    c, srv, res = s["client"], s["server"], s["resources"]
    print()
    print(
        "soak: %.0f s, %d connections opened, %d requests, %d replies (%d/s)"
        % (
            s["elapsed"],
            c["connections_opened"],
            c["requests"],
            c["replies"],
            c["replies_per_second"],
        )
    )
    print("  connection ends: " + ", ".join("%s %d" % kv for kv in c["fates"].items()))
    print(
        "  replies missing: live %(live)d, half-closed %(half_closed)d, "
        "server-closed %(server_closed)d; corrupt/unexpected %(bad)d"
        % dict(c["missing_replies"], bad=c["bad_replies"])
    )
    print(
        "  server drops: sends %d (%d bytes) to closed/reset peers (%d requests were "
        "abandoned by clients), functors %d"
        % (
            srv["dropped_sends"],
            srv["dropped_bytes"],
            c["abandoned_requests"],
            srv["dropped_functors"],
        )
    )
    print(
        "  server errors: callbacks %d, pool tasks failed %d, discarded %d, accept "
        "errors %d"
        % (srv["callback_errors"], srv["pool_failed"], srv["pool_discarded"], srv["accept_errors"])
    )
    counts = srv["counts"]
    print(
        "  timers: fired %d, cancelled %d; requests by kind: %s"
        % (
            counts.get("timers_fired", 0),
            counts.get("timers_cancelled", 0),
            ", ".join(
                "%s %d" % (k[4:], v) for k, v in sorted(counts.items()) if k.startswith("req_")
            ),
        )
    )
    b, e = res["baseline"], res["end"]
    print(
        "  server RSS: %.1f MiB at start, %.1f MiB at end; fds %d -> %d (max %d); "
        "threads %d -> %d; max connections %d; max timers %d"
        % (
            b["rss_kb"] / 1024,
            e["rss_kb"] / 1024,
            b["fds"],
            e["fds"],
            res["max_fds"],
            b["threads"],
            e["threads"],
            res["max_connections"],
            res["max_timers"],
        )
    )
    g = res["growth"]
    if "rss_kb" in g:
        print(
            "  steady state (first third -> last third, medians): RSS %.1f -> %.1f MiB, "
            "fds-conns %g -> %g"
            % (
                g["rss_kb"]["first_third_median"] / 1024,
                g["rss_kb"]["last_third_median"] / 1024,
                g["fds_minus_connections"]["first_third_median"],
                g["fds_minus_connections"]["last_third_median"],
            )
        )
    if s["failures"]:
        print("FAILED:")
        for f in s["failures"]:
            print("  - " + f)
    else:
        print("OK")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=120.0, help="load duration (default 120)")
    p.add_argument("--conns", type=int, default=240, help="client connections (default 240)")
    p.add_argument("--client-threads", type=int, default=12)
    p.add_argument("--threads", type=int, default=4, help="server ThreadPool size (default 4)")
    p.add_argument("--sample", type=float, default=2.0, help="seconds between samples")
    p.add_argument(
        "--warmup",
        type=float,
        default=10.0,
        help="seconds excluded from the growth check (at most a quarter of the run)",
    )
    p.add_argument(
        "--rss-tolerance",
        type=float,
        default=0.10,
        help="allowed relative RSS growth, first to last third (default 0.10)",
    )
    p.add_argument(
        "--rss-slack-mb",
        type=float,
        default=4.0,
        help="allowed absolute RSS growth on top of that (default 4 MiB)",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", help="write the summary (and samples) to this file")
    p.add_argument("--python", default=sys.executable, help="interpreter for the server")
    p.add_argument("--quiet", action="store_true", help="no per-sample lines")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.conns > 300:
        p.error("--conns is capped at 300")
    if args.conns < args.client_threads:
        p.error("--conns must be >= --client-threads")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        return serve(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
