"""EventLoop: thread ownership, loop()/quit()/close() state rules, cross-thread wakeups,
functors, the GIL while idle, errors in callbacks, KeyboardInterrupt, bad callbacks."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable

import pytest

from conftest import call_in_loop, cppnp_errors, in_thread, recv_exact, wait_for
from cppnp import EventLoop, EventLoopThread, ICppnpUsr, IRun0, Task, TcpServer
from faults_support import finish, run_child, spawned

# -- helpers ------------------------------------------------------------------------------


class LoopInThread:
    """A loop created and run in a plain thread, to watch loop() return."""

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.returned = threading.Event()
        self.loop: EventLoop | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name="plain-loop")
        self.thread.start()
        assert self.ready.wait(10)
        assert self.loop is not None
        wait_for(lambda: self.loop is not None and self.loop.running)

    def _main(self) -> None:
        lp = EventLoop()
        self.loop = lp
        try:
            self.ready.set()
            lp.loop()
            self.returned.set()
        except BaseException as exc:  # checked by the test
            self.error = exc
        finally:
            lp.close()

    def join(self, timeout: float = 10.0) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()


# -- ownership ----------------------------------------------------------------------------------


def test_one_loop_per_thread(loop: EventLoop) -> None:
    with pytest.raises(RuntimeError):
        EventLoop()
    assert not loop.closed
    # Another thread may have its own.
    other_id = in_thread(lambda: _make_and_close())
    assert other_id != loop.thread_id


def _make_and_close() -> int:
    lp = EventLoop()
    try:
        return int(lp.thread_id)
    finally:
        lp.close()


def test_new_loop_allowed_after_close() -> None:
    first = EventLoop()
    first.close()
    second = EventLoop()
    try:
        assert not second.closed
        with pytest.raises(RuntimeError):
            EventLoop()
    finally:
        second.close()


def test_loop_belongs_to_creating_thread(loop: EventLoop) -> None:
    assert loop.thread_id == threading.get_ident()
    assert loop.is_in_loop_thread()
    assert in_thread(loop.is_in_loop_thread) is False


def test_loop_from_another_thread_is_runtime_error(loop: EventLoop) -> None:
    with pytest.raises(RuntimeError):
        in_thread(loop.loop)
    with pytest.raises(RuntimeError):
        in_thread(lambda: loop.run_once(0))
    assert not loop.running and not loop.closed


def test_nested_loop_is_runtime_error(loop: EventLoop) -> None:
    errors: list[type[BaseException]] = []

    def nested() -> None:
        for call in (loop.loop, lambda: loop.run_once(0)):
            try:
                call()
            except RuntimeError as exc:
                errors.append(type(exc))
        loop.quit()

    loop.queue_in_loop(nested)
    loop.loop()
    assert errors == [RuntimeError, RuntimeError]
    assert loop.callback_errors == 0


def test_close_while_running_is_runtime_error(loop: EventLoop) -> None:
    errors: list[str] = []

    def try_close() -> None:
        try:
            loop.close()
        except RuntimeError:
            errors.append("loop thread")
        try:
            in_thread(loop.close)
        except RuntimeError:
            errors.append("other thread")
        loop.quit()

    loop.queue_in_loop(try_close)
    loop.loop()
    assert errors == ["loop thread", "other thread"]
    assert not loop.closed


def test_close_is_idempotent_and_closed_loop_refuses_work() -> None:
    lp = EventLoop()
    lp.close()
    lp.close()
    assert lp.closed
    with pytest.raises(RuntimeError):
        lp.loop()
    with pytest.raises(RuntimeError):
        lp.run_once(0)
    with pytest.raises(RuntimeError):
        lp.queue_in_loop(lambda: None)
    with pytest.raises(RuntimeError):
        in_thread(lambda: lp.run_in_loop(lambda: None))
    lp.quit()  # harmless
    in_thread(lp.quit)
    stats = lp.stats()
    assert stats["channels"] == 0 and stats["timers"] == 0 and stats["pending_functors"] == 0


def test_close_from_another_thread_when_not_running() -> None:
    lp = EventLoop()
    in_thread(lp.close)
    assert lp.closed
    lp2 = EventLoop()  # this thread may have a new one now
    lp2.close()


def test_context_manager_closes() -> None:
    with EventLoop() as lp:
        assert not lp.closed
    assert lp.closed


def test_close_drops_and_counts_pending_functors() -> None:
    lp = EventLoop()
    ran: list[int] = []
    for i in range(3):
        lp.queue_in_loop(lambda i=i: ran.append(i))
    assert lp.pending_functors == 3
    assert lp.stats()["pending_functors"] == 3
    lp.close()
    assert ran == []
    assert lp.stats()["dropped_functors"] == 3
    assert lp.pending_functors == 0


def test_stats_keys(loop: EventLoop) -> None:
    stats = loop.stats()
    for key in (
        "channels",
        "timers",
        "pending_functors",
        "callback_errors",
        "dropped_sends",
        "dropped_bytes",
        "dropped_functors",
        "iterations",
    ):
        assert isinstance(stats[key], int), key
    assert loop.callback_errors == stats["callback_errors"]
    assert loop.dropped_sends == stats["dropped_sends"]
    assert loop.dropped_bytes == stats["dropped_bytes"]


def test_loop_clock_is_monotonic_clock(loop: EventLoop) -> None:
    t1 = time.monotonic()
    t2 = loop.time()
    t3 = time.monotonic()
    assert t1 <= t2 <= t3


# -- quit -----------------------------------------------------------------------------------


def test_quit_from_another_thread_wakes_an_idle_loop() -> None:
    plain = LoopInThread()
    assert plain.loop is not None
    time.sleep(0.05)  # let it block in epoll_wait (no timers, no fds)
    assert plain.loop.timer_count == 0
    plain.loop.quit()
    assert plain.join(10), "quit() from another thread did not wake the loop"
    assert plain.returned.is_set()
    assert plain.error is None


def test_quit_before_loop_runs_one_iteration(loop: EventLoop) -> None:
    ran: list[str] = []
    loop.queue_in_loop(lambda: ran.append("functor"))
    loop.run_after(0, lambda: ran.append("timer"))
    before = loop.stats()["iterations"]
    loop.quit()
    loop.loop()  # must return, not block
    assert loop.stats()["iterations"] - before == 1
    assert ran == ["timer", "functor"]  # timers, then functors, in one iteration
    assert loop.timer_count == 0
    # The quit was consumed: a later quit from a functor is needed to stop again.
    loop.queue_in_loop(loop.quit)
    loop.loop()


def test_quit_from_a_callback_and_run_again(loop: EventLoop) -> None:
    ran: list[int] = []
    for run in range(3):
        loop.queue_in_loop(lambda run=run: ran.append(run))
        loop.queue_in_loop(loop.quit)
        loop.loop()
    assert ran == [0, 1, 2]


def test_run_once_returns(loop: EventLoop) -> None:
    before = loop.stats()["iterations"]
    loop.run_once(0)
    loop.run_once(timeout=0.001)
    assert loop.stats()["iterations"] - before == 2
    with pytest.raises(ValueError):
        loop.run_once(float("nan"))


# -- functors -----------------------------------------------------------------------------------


def test_queue_in_loop_from_another_thread_wakes_the_loop(loop_thread: EventLoop) -> None:
    ran = threading.Event()
    where: list[int] = []
    time.sleep(0.02)  # idle in epoll_wait with no timeout
    loop_thread.queue_in_loop(lambda: (where.append(threading.get_ident()), ran.set()))
    assert ran.wait(10), "queue_in_loop from another thread did not wake the loop"
    assert where == [loop_thread.thread_id]


def test_run_in_loop_runs_now_on_loop_thread_and_queues_elsewhere(loop_thread: EventLoop) -> None:
    order: list[str] = []

    def on_loop() -> None:
        loop_thread.run_in_loop(lambda: order.append("inline"))
        order.append("after")

    call_in_loop(loop_thread, on_loop)
    assert order == ["inline", "after"]
    done = threading.Event()
    loop_thread.run_in_loop(done.set)  # from this thread: queued
    assert done.wait(10)


def test_functor_kinds(loop_thread: EventLoop) -> None:
    got: list[str] = []
    done = threading.Event()

    class Job(IRun0):
        def run0(self) -> None:
            got.append("irun0")

    loop_thread.queue_in_loop(Job())
    loop_thread.queue_in_loop(Task(got.append, "task"))
    loop_thread.QueueLoop(lambda: got.append("alias"))
    loop_thread.queue_in_loop(done.set)
    assert done.wait(10)
    assert got == ["irun0", "task", "alias"]


def test_many_cross_thread_posts_all_run(loop_thread: EventLoop) -> None:
    counter = [0]
    per_thread = 3000
    barrier = threading.Barrier(3)

    def inc() -> None:
        counter[0] += 1  # loop thread only: no lock needed

    def poster() -> None:
        barrier.wait(10)
        for i in range(per_thread):
            loop_thread.queue_in_loop(inc)
            if i % 500 == 0:
                time.sleep(0.001)  # let the loop go idle in between

    threads = [threading.Thread(target=poster) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    wait_for(lambda: counter[0] == 3 * per_thread)
    assert call_in_loop(loop_thread, lambda: counter[0]) == 3 * per_thread


def test_order_of_functors_from_one_thread(loop_thread: EventLoop) -> None:
    seen: list[int] = []
    for i in range(2000):
        loop_thread.queue_in_loop(lambda i=i: seen.append(i))
    call_in_loop(loop_thread, lambda: None)
    assert seen == list(range(2000))


def test_functors_queued_from_a_functor_run(loop_thread: EventLoop) -> None:
    """A functor that queues another (from the loop thread itself) must not wait for an
    external wakeup: the idle loop has no timer that would wake it."""
    done = threading.Event()
    steps: list[int] = []

    def step(n: int) -> None:
        steps.append(n)
        if n < 1000:
            loop_thread.queue_in_loop(lambda: step(n + 1))
        else:
            done.set()

    loop_thread.queue_in_loop(lambda: step(1))
    assert done.wait(10), "a functor queued from a functor was lost (ran %d)" % len(steps)
    assert steps == list(range(1, 1001))


def test_bad_callbacks_are_type_errors(loop: EventLoop) -> None:
    for bad in (None, 5, "x", object(), b"f"):
        with pytest.raises(TypeError):
            loop.queue_in_loop(bad)
        with pytest.raises(TypeError):
            loop.run_in_loop(bad)
        with pytest.raises(TypeError):
            in_thread(lambda bad=bad: loop.queue_in_loop(bad))
    assert loop.pending_functors == 0


def test_bad_handlers_are_type_errors(loop: EventLoop) -> None:
    class NotCallable(ICppnpUsr):
        on_message = 5  # type: ignore[assignment]

    class CloseNotCallable(ICppnpUsr):
        on_close = "x"  # type: ignore[assignment]

    for handler in (NotCallable(), CloseNotCallable()):
        with pytest.raises(TypeError):
            TcpServer(loop, ("127.0.0.1", 0), handler)
    with pytest.raises(TypeError):
        TcpServer(loop, ("127.0.0.1", 0), None)


# -- the GIL while idle ---------------------------------------------------------------------

_GIL_CHILD = r"""
import threading, time
from cppnp import EventLoop

box = {}
ready = threading.Event()

def main():
    lp = EventLoop()
    box["loop"] = lp
    ready.set()
    try:
        lp.loop()
    finally:
        lp.close()

t = threading.Thread(target=main)
t.start()
ready.wait(10)
lp = box["loop"]
while not lp.running:
    time.sleep(0.001)
time.sleep(0.05)
i0 = lp.stats()["iterations"]
counts = [0, 0]

def count(slot):
    n = 0
    while n < 300000:
        n += 1
    counts[slot] = n

other = threading.Thread(target=count, args=(1,))
other.start()
count(0)
other.join()
i1 = lp.stats()["iterations"]
lp.quit()
t.join(10)
print("counted", counts[0], counts[1], "loop_iterations", i1 - i0, "alive", t.is_alive())
"""


def test_gil_released_while_idle() -> None:
    """Two Python threads count to 300 000 while the loop waits in epoll_wait; the loop
    does not iterate meanwhile.  A loop that held the GIL while blocked would hang the
    child (a failure here, bounded by the subprocess timeout)."""
    proc = run_child(_GIL_CHILD, timeout=30)  # a hang: the idle loop held the GIL
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [
        "counted",
        "300000",
        "300000",
        "loop_iterations",
        "0",
        "alive",
        "False",
    ], proc.stdout


# -- errors in callbacks ----------------------------------------------------------------------


@pytest.fixture
def cppnp_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog, cleared at teardown: the records' tracebacks reference connections, which
    the leak check would otherwise count as leaked."""
    caplog.set_level(logging.ERROR, logger="cppnp")
    yield caplog
    for when in ("setup", "call", "teardown"):
        for record in caplog.get_records(when):
            record.exc_info = None


def _cppnp_errors(caplog: pytest.LogCaptureFixture, exc: type[BaseException]) -> list[Any]:
    return [
        r
        for r in cppnp_errors(caplog)
        if r.name == "cppnp" and r.exc_info is not None and r.exc_info[0] is exc
    ]


def test_exception_in_timer_is_logged_and_loop_continues(
    loop: EventLoop, cppnp_log: pytest.LogCaptureFixture
) -> None:
    ran: list[str] = []

    def bad() -> None:
        raise ZeroDivisionError("timer boom")

    loop.run_after(0, bad)
    loop.run_after(0, lambda: ran.append("next timer"))
    loop.run_after(0.01, lambda: (ran.append("later"), loop.quit()))
    loop.loop()
    assert ran == ["next timer", "later"]
    assert loop.timer_count == 0
    assert loop.callback_errors == 1
    assert len(_cppnp_errors(cppnp_log, ZeroDivisionError)) == 1


def test_exception_in_functor_is_logged_and_loop_continues(
    loop: EventLoop, cppnp_log: pytest.LogCaptureFixture
) -> None:
    ran: list[str] = []

    def bad() -> None:
        raise KeyError("functor boom")

    loop.queue_in_loop(bad)
    loop.queue_in_loop(lambda: ran.append("next"))
    loop.queue_in_loop(loop.quit)
    loop.loop()
    assert ran == ["next"]
    assert loop.stats()["callback_errors"] == 1
    assert len(_cppnp_errors(cppnp_log, KeyError)) == 1


def test_exception_in_every_handler_callback_is_logged_and_serving_continues(
    serve: Callable[..., Any], cppnp_log: pytest.LogCaptureFixture
) -> None:
    closed: list[str] = []

    class Faulty(ICppnpUsr):
        def on_connection(self, conn: Any) -> None:
            conn.set_high_water_mark(1)
            raise ValueError("on_connection")

        def on_message(self, conn: Any, buf: Any) -> None:
            data = buf.retrieve_all()
            if data == b"boom":
                raise ZeroDivisionError("on_message")
            conn.send(data)

        def on_write_complete(self, conn: Any) -> None:
            raise LookupError("on_write_complete")

        def on_high_water_mark(self, conn: Any, queued: int) -> None:
            raise OverflowError("on_high_water_mark")

        def on_close(self, conn: Any) -> None:
            closed.append(conn.name)
            raise RuntimeError("on_close")

    st = serve(Faulty())
    with st.connect() as s:
        s.sendall(b"boom")
        wait_for(lambda: _cppnp_errors(cppnp_log, ZeroDivisionError))
        s.sendall(b"ok")
        assert recv_exact(s, 2) == b"ok"
        wait_for(lambda: _cppnp_errors(cppnp_log, LookupError))
    wait_for(lambda: closed)
    wait_for(lambda: _cppnp_errors(cppnp_log, RuntimeError))
    wait_for(lambda: st.connection_count() == 0)
    assert len(_cppnp_errors(cppnp_log, ValueError)) == 1
    # A second client is served as usual.
    with st.connect() as s:
        s.sendall(b"again")
        assert recv_exact(s, 5) == b"again"
    wait_for(lambda: len(closed) == 2)  # all errors are logged during the test
    wait_for(lambda: st.connection_count() == 0)
    assert len(_cppnp_errors(cppnp_log, ValueError)) == 2
    assert len(_cppnp_errors(cppnp_log, RuntimeError)) == 2
    assert len(_cppnp_errors(cppnp_log, ZeroDivisionError)) == 1
    assert st.stats()["callback_errors"] >= 7


def test_base_exception_in_functor_propagates_and_keeps_the_rest(loop: EventLoop) -> None:
    ran: list[str] = []

    def stop() -> None:
        raise SystemExit(3)

    loop.queue_in_loop(lambda: ran.append("before"))
    loop.queue_in_loop(stop)
    loop.queue_in_loop(lambda: ran.append("after"))
    with pytest.raises(SystemExit):
        loop.loop()
    assert not loop.running
    assert ran == ["before"]
    loop.queue_in_loop(loop.quit)
    loop.loop()  # usable again; the queued functor was kept
    assert ran == ["before", "after"]


def test_base_exception_in_timer_propagates_and_keeps_the_rest(loop: EventLoop) -> None:
    ran: list[str] = []
    when = loop.time()

    def stop() -> None:
        raise KeyboardInterrupt

    loop.run_at(when, lambda: ran.append("before"))
    loop.run_at(when, stop)
    loop.run_at(when, lambda: ran.append("after"))
    with pytest.raises(KeyboardInterrupt):
        loop.loop()
    assert ran == ["before"]
    loop.run_after(0.01, loop.quit)
    loop.loop()
    assert ran == ["before", "after"]
    assert loop.timer_count == 0


# -- KeyboardInterrupt ---------------------------------------------------------------------------

_SIGINT_CHILD = r"""
import sys, time
from cppnp import EventLoop

mode = sys.argv[1]
lp = EventLoop()

def ready():
    print("ready", flush=True)
    if mode == "callback":
        time.sleep(30)

lp.run_after(0, ready)
try:
    lp.loop()
except KeyboardInterrupt:
    print("KeyboardInterrupt", flush=True)
else:
    print("loop returned normally", flush=True)
print("running", lp.running, "closed", lp.closed, flush=True)
ran = []
lp.queue_in_loop(lambda: ran.append(1))
lp.run_after(0, lp.quit)
lp.loop()
print("second run", ran, flush=True)
lp.close()
print("closed", lp.closed, flush=True)
"""


@pytest.mark.parametrize("mode", ["idle", "callback"])
def test_keyboard_interrupt_leaves_loop(mode: str) -> None:
    """SIGINT while the main thread's loop waits in epoll (idle) or runs a Python
    callback: KeyboardInterrupt comes out of loop(), which can then run again and close."""
    with spawned(_SIGINT_CHILD, mode) as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "ready", line
        time.sleep(0.1)  # let it block in epoll_wait / sleep (either way it must work)
        proc.send_signal(signal.SIGINT)
        rc, out, err = finish(proc)
    assert rc == 0, err
    assert out.splitlines() == [
        "KeyboardInterrupt",
        "running False closed False",
        "second run [1]",
        "closed True",
    ], (out, err)
    assert "Traceback" not in err, err


# -- EventLoopThread --------------------------------------------------------------------------


def test_event_loop_thread_runs_init_in_loop_thread() -> None:
    seen: dict[str, Any] = {}

    def init(lp: EventLoop) -> str:
        seen["ident"] = threading.get_ident()
        seen["in_loop"] = lp.is_in_loop_thread()
        return "result"

    lt = EventLoopThread(init, name="init-check")
    lp = lt.start()
    try:
        assert seen["ident"] == lp.thread_id != threading.get_ident()
        assert seen["in_loop"] is True
        assert lt.result == "result"
        assert lt.loop is lp
        wait_for(lambda: lp.running)
        with pytest.raises(RuntimeError):
            lt.start()
    finally:
        lt.stop()
    assert lp.closed
    lt.stop()  # twice: fine


def test_event_loop_thread_init_error() -> None:
    def init(lp: EventLoop) -> None:
        raise ValueError("bad init")

    lt = EventLoopThread(init)
    with pytest.raises(RuntimeError) as info:
        lt.start()
    assert isinstance(info.value.__cause__, ValueError)
    wait_for(lambda: lt.loop.closed)


def test_event_loop_thread_context_manager() -> None:
    with EventLoopThread() as lp:
        done = threading.Event()
        lp.queue_in_loop(done.set)
        assert done.wait(10)
    assert lp.closed
    with pytest.raises(RuntimeError):
        _ = EventLoopThread().loop
