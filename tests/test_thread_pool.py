"""ThreadPool: lifecycle, add_task from any thread, drain / discard on stop, bounded
queues, key ordering, failing tasks, Task forms, real concurrency.  The hand-off of
sends, write-complete callbacks and timers from workers to the loop thread is in
test_handoff.py.

Every behaviour is checked in single-thread mode (``ThreadPool(0)``) and pool mode
where it applies to both.  No timed assertions: counts, idents and orders only.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter, defaultdict
from typing import Any, Callable

import pytest

from conftest import capture, cppnp_errors, wait_for
from cppnp import IRun0, IRun2, QueueFull, Task, ThreadPool

TIMEOUT = 20.0


def block_workers(pool: ThreadPool, n: int) -> threading.Event:
    """Occupy *n* workers with tasks waiting on the returned gate (set it to free them)."""
    gate = threading.Event()
    for _ in range(n):
        pool.add_task(gate.wait, TIMEOUT)
    wait_for(lambda: pool.running == n and pool.queued == 0, TIMEOUT)
    return gate


def run_in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Start *fn* in a thread; the box gets its result (conftest.capture)."""
    box: dict[str, Any] = {}
    t = threading.Thread(target=capture, args=(fn, box), name="test-helper")
    t.start()
    return t, box


# -- lifecycle ----------------------------------------------------------------------------


def test_start_stop_lifecycle(nthreads: int) -> None:
    pool = ThreadPool(nthreads, name="tp")
    assert pool.threads == []
    pool.start()
    pool.Start()  # idempotent (and the seed's name)
    threads = pool.threads
    assert len(threads) == nthreads
    assert sorted(t.name for t in threads) == ["tp-%d" % i for i in range(nthreads)]
    assert all(t.is_alive() for t in threads)
    ran: list[int] = []
    for i in range(10):
        pool.add_task(ran.append, i)
    assert pool.stop() is True
    assert sorted(ran) == list(range(10))
    assert not any(t.is_alive() for t in threads)
    assert pool.stop() is True  # a second stop is harmless
    with pytest.raises(RuntimeError):
        pool.add_task(ran.append, 99)
    try:
        pool.start()  # a stopped pool does not restart ...
    except RuntimeError:
        pass  # ... (refusing loudly is fine too)
    assert not any(t.is_alive() for t in pool.threads)
    with pytest.raises(RuntimeError):
        pool.add_task(ran.append, 99)
    assert 99 not in ran
    assert (pool.queued, pool.running, pool.completed, pool.failed) == (0, 0, 10, 0)


def test_context_manager(nthreads: int) -> None:
    ran: list[int] = []
    lock = threading.Lock()

    def work(i: int) -> None:
        time.sleep(0.0005 * (i % 3))
        with lock:
            ran.append(i)

    with ThreadPool(nthreads) as pool:
        assert len(pool.threads) == nthreads
        for i in range(60):
            pool.add_task(work, i)
    # __exit__ stopped the pool, running everything queued (drain=True).
    assert sorted(ran) == list(range(60))
    assert not any(t.is_alive() for t in pool.threads)
    assert (pool.completed, pool.discarded, pool.queued, pool.running) == (60, 0, 0, 0)
    with pytest.raises(RuntimeError):
        pool.add_task(work, 1)


def test_single_thread_mode_runs_in_the_caller(make_pool: Any) -> None:
    pool = make_pool(0)
    assert pool.threads == []
    seen: list[tuple[int, int, int, int]] = []
    lock = threading.Lock()
    errors: list[str] = []

    def task(caller: int, mine: list[int]) -> None:
        mine.append(1)
        with lock:
            seen.append((caller, threading.get_ident(), pool.running, pool.queued))

    together = threading.Barrier(3, timeout=TIMEOUT)  # helpers alive at once: own idents

    def submit(helper: bool = True) -> None:
        me = threading.get_ident()
        mine: list[int] = []
        for i in range(5):
            pool.add_task(task, me, mine)
            if len(mine) != i + 1:
                errors.append("task had not run when add_task returned")
        if helper:
            together.wait()

    submit(helper=False)
    helpers = [threading.Thread(target=submit) for _ in range(3)]
    for t in helpers:
        t.start()
    for t in helpers:
        t.join(TIMEOUT)
    assert errors == []
    assert len(seen) == 20
    assert all(caller == ran_on for caller, ran_on, _, _ in seen)
    assert len({caller for caller, _, _, _ in seen}) == 4
    assert all(running >= 1 and queued == 0 for _, _, running, queued in seen)
    assert (pool.completed, pool.queued, pool.running) == (20, 0, 0)


def test_pool_mode_runs_on_workers(make_pool: Any) -> None:
    pool = make_pool(3)
    idents: list[int] = []
    lock = threading.Lock()

    def task() -> None:
        with lock:
            idents.append(threading.get_ident())

    for _ in range(90):
        pool.add_task(task)
    wait_for(lambda: pool.completed == 90, TIMEOUT)
    workers = {t.ident for t in pool.threads}
    assert set(idents) <= workers
    assert threading.get_ident() not in idents
    assert all(t.is_alive() for t in pool.threads)


def test_add_task_from_many_threads(make_pool: Any, nthreads: int) -> None:
    pool = make_pool(nthreads)
    got: list[tuple[int, int]] = []
    lock = threading.Lock()

    def task(i: int, j: int) -> None:
        with lock:
            got.append((i, j))
        if j == 99:
            pool.add_task(task, i, 100)  # from a worker (or its caller)

    def submitter(i: int) -> None:
        for j in range(100):
            pool.add_task(task, i, j)

    threads = [threading.Thread(target=submitter, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    wait_for(lambda: pool.completed == 606, TIMEOUT)
    assert sorted(got) == [(i, j) for i in range(6) for j in range(101)]
    wait_for(lambda: pool.running == 0, TIMEOUT)
    stats = pool.stats()
    assert (stats["queued"], stats["running"], stats["failed"]) == (0, 0, 0)
    assert sum(stats["per_worker"].values()) == 606
    if nthreads:
        assert set(stats["per_worker"]) == {t.name for t in pool.threads}


# -- stop(drain=...) -----------------------------------------------------------------------


def test_stop_drain_runs_everything_queued(make_pool: Any, nthreads: int) -> None:
    pool = make_pool(nthreads)
    ran: list[str] = []
    lock = threading.Lock()

    def task(tag: str) -> None:
        with lock:
            ran.append(tag)

    gate = block_workers(pool, nthreads) if nthreads else None
    for i in range(10):
        pool.add_task(task, "free-%d" % i)
        pool.add_task(task, "keyed-%d" % i, key="k")
    if nthreads:
        assert (pool.running, pool.queued) == (nthreads, 20)
        assert ran == []
    else:
        assert len(ran) == 20 and pool.queued == 0  # ran at once
    stopper, box = run_in_thread(lambda: pool.stop(drain=True, timeout=TIMEOUT))
    if gate is not None:
        gate.set()
    stopper.join(TIMEOUT)
    assert box == {"value": True}
    assert sorted(ran) == sorted(
        ["free-%d" % i for i in range(10)] + ["keyed-%d" % i for i in range(10)]
    )
    assert [t for t in ran if t.startswith("keyed")] == ["keyed-%d" % i for i in range(10)]
    assert pool.discarded == 0
    assert pool.completed == 20 + nthreads
    assert (pool.queued, pool.running) == (0, 0)


def test_stop_drain_before_start_runs_everything(make_pool: Any) -> None:
    """Tasks added to a pool that was never started run in stop(drain=True) --
    including a keyed backlog (tasks 2.. of a key wait behind task 1)."""
    pool = make_pool(2, start=False)
    ran: list[tuple[str, int]] = []
    for i in range(3):
        pool.add_task(ran.append, ("free", i))
        pool.add_task(ran.append, ("keyed", i), key="k")
    assert pool.queued == 6
    assert pool.stop(drain=True, timeout=TIMEOUT) is True
    assert sorted(ran) == sorted([("free", i) for i in range(3)] + [("keyed", i) for i in range(3)])
    assert [x for x in ran if x[0] == "keyed"] == [("keyed", i) for i in range(3)]
    assert (pool.completed, pool.discarded, pool.queued) == (6, 0, 0)


def test_stop_no_drain_discards_queued(make_pool: Any, nthreads: int) -> None:
    pool = make_pool(nthreads)
    ran: list[str] = []
    finished = []

    def blocker(gate: threading.Event) -> None:
        gate.wait(TIMEOUT)
        finished.append(threading.get_ident())

    gate = threading.Event()
    if nthreads:
        for _ in range(nthreads):
            pool.add_task(blocker, gate)
        wait_for(lambda: pool.running == nthreads and pool.queued == 0, TIMEOUT)
    for i in range(10):
        pool.add_task(ran.append, "free-%d" % i)
        pool.add_task(ran.append, "keyed-%d" % i, key="k")
    expected_discarded = 20 if nthreads else 0
    stopper, box = run_in_thread(lambda: pool.stop(drain=False, timeout=TIMEOUT))
    # stop() discards the backlog before it joins the (still busy) workers.
    wait_for(lambda: pool.discarded == expected_discarded, TIMEOUT)
    if nthreads:
        assert ran == []
        assert pool.running == nthreads
    gate.set()
    stopper.join(TIMEOUT)
    assert box == {"value": True}
    assert len(finished) == nthreads  # running tasks were let finish
    assert pool.discarded == expected_discarded
    if nthreads:
        assert ran == []
    else:
        assert len(ran) == 20
    assert pool.completed == nthreads + (0 if nthreads else 20)
    assert (pool.queued, pool.running) == (0, 0), "counters after stop(drain=False)"


def test_stop_timeout_while_a_task_blocks(make_pool: Any) -> None:
    pool = make_pool(1)
    gate = block_workers(pool, 1)
    assert pool.stop(timeout=0.05) is False  # the worker is still busy
    gate.set()
    assert pool.stop(timeout=TIMEOUT) is True
    assert pool.completed == 1


def test_stop_from_a_worker_raises(make_pool: Any) -> None:
    pool = make_pool(2)
    box: dict[str, BaseException] = {}

    def task() -> None:
        try:
            pool.stop()
        except RuntimeError as exc:
            box["error"] = exc

    pool.add_task(task)
    wait_for(lambda: pool.completed == 1, TIMEOUT)
    assert isinstance(box.get("error"), RuntimeError)
    ran: list[int] = []
    pool.add_task(ran.append, 1)  # the pool still works
    wait_for(lambda: ran == [1], TIMEOUT)


# -- bounded queue -------------------------------------------------------------------------


def test_max_queue_raises_queue_full_never_blocks(make_pool: Any) -> None:
    pool = make_pool(2, max_queue=3)
    gate = block_workers(pool, 2)
    ran: list[int] = []
    pool.add_task(ran.append, 0)
    pool.add_task(ran.append, 1, key="k")
    pool.add_task(ran.append, 2, key="k")  # a strand backlog counts as queued
    assert pool.queued == 3

    def overflow() -> list[str]:
        outcomes = []
        for key in (None, "k", "other"):
            try:
                pool.add_task(ran.append, 99, key=key)
                outcomes.append("accepted")
            except QueueFull as exc:
                assert isinstance(exc, RuntimeError)
                outcomes.append("full")
        return outcomes

    t, box = run_in_thread(overflow)
    t.join(TIMEOUT)
    assert not t.is_alive(), "add_task blocked on a full queue"
    assert box == {"value": ["full", "full", "full"]}
    assert pool.queued == 3
    gate.set()
    wait_for(lambda: sorted(ran) == [0, 1, 2], TIMEOUT)
    wait_for(lambda: pool.queued == 0 and pool.running == 0, TIMEOUT)
    pool.add_task(ran.append, 3)  # room again
    wait_for(lambda: 3 in ran, TIMEOUT)
    assert 99 not in ran


def test_max_queue_single_thread_mode_never_full(make_pool: Any) -> None:
    pool = make_pool(0, max_queue=1)
    ran: list[int] = []
    for i in range(10):
        pool.add_task(ran.append, i)  # runs at once: nothing queues
    assert ran == list(range(10))


# -- key ordering and parallelism ------------------------------------------------------------


class StrandProbe:
    """Records, per key, the order tasks ran in and the most running at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active: Counter[Any] = Counter()
        self.max_active: Counter[Any] = Counter()
        self.order: dict[Any, list[Any]] = defaultdict(list)

    def task(self, key: Any, tag: Any, pause: float) -> None:
        with self.lock:
            self.active[key] += 1
            self.max_active[key] = max(self.max_active[key], self.active[key])
            self.order[key].append(tag)
        if pause:
            time.sleep(pause)
        with self.lock:
            self.active[key] -= 1


def test_same_key_runs_one_at_a_time_in_order(make_pool: Any, nthreads: int) -> None:
    pool = make_pool(nthreads)
    probe = StrandProbe()
    rng = random.Random(1234)
    keys = ["a", "b", ("tuple", 1), 7]
    plan = [k for k in keys for _ in range(40)]
    rng.shuffle(plan)
    seq: Counter[Any] = Counter()
    for key in plan:
        pause = rng.choice([0, 0, 0.0005, 0.001]) if nthreads else 0
        pool.add_task(probe.task, key, seq[key], pause, key=key)
        seq[key] += 1
    wait_for(lambda: pool.completed == len(plan), TIMEOUT)
    for key in keys:
        assert probe.order[key] == list(range(40)), key
        assert probe.max_active[key] == 1, key
    assert pool.stats()["strands"] == 0


def test_same_key_from_concurrent_submitters_never_overlaps(make_pool: Any, nthreads: int) -> None:
    """Tasks sharing a key run one at a time in order -- also when several threads
    submit them, and in single-thread mode (where each runs in its own caller)."""
    pool = make_pool(nthreads)
    probe = StrandProbe()

    def submitter(i: int) -> None:
        for j in range(15):
            pool.add_task(probe.task, "shared", (i, j), 0.001, key="shared")

    threads = [threading.Thread(target=submitter, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    wait_for(lambda: pool.completed == 60, TIMEOUT)
    assert probe.max_active["shared"] == 1, "tasks sharing a key overlapped"
    for i in range(4):  # each submitter's order is kept
        mine = [tag for tag in probe.order["shared"] if tag[0] == i]
        assert mine == [(i, j) for j in range(15)]


def test_different_keys_run_in_parallel(make_pool: Any, nthreads: int) -> None:
    """Four tasks with different keys meet at a barrier: only possible if they run at
    the same time (pool mode: on four workers; single-thread mode: in four callers)."""
    pool = make_pool(nthreads)
    barrier = threading.Barrier(4, timeout=TIMEOUT)
    passed: list[int] = []

    def task(i: int) -> None:
        barrier.wait()
        passed.append(i)

    if nthreads:
        for i in range(4):
            pool.add_task(task, i, key="key-%d" % i)
    else:
        callers = [
            threading.Thread(target=pool.add_task, args=(task, i), kwargs={"key": "key-%d" % i})
            for i in range(4)
        ]
        for t in callers:
            t.start()
        for t in callers:
            t.join(TIMEOUT)
    wait_for(lambda: pool.completed == 4, TIMEOUT)
    assert sorted(passed) == [0, 1, 2, 3]
    assert pool.failed == 0
    assert pool.peak_running >= 4


@pytest.mark.parametrize("n", [2, 4])
def test_workers_run_concurrently_when_the_gil_is_released(make_pool: Any, n: int) -> None:
    pool = make_pool(n)
    lock = threading.Lock()
    active = [0, 0]  # now, peak

    def sleeper() -> None:
        with lock:
            active[0] += 1
            active[1] = max(active[1], active[0])
        time.sleep(0.02)  # releases the GIL
        with lock:
            active[0] -= 1

    for _ in range(4 * n):
        pool.add_task(sleeper)
    wait_for(lambda: pool.completed == 4 * n, TIMEOUT)
    assert active[1] >= 2
    assert pool.peak_running >= 2
    # Event waits release the GIL too: n tasks meet, so n ran at once.
    meet = threading.Barrier(n, timeout=TIMEOUT)
    for _ in range(n):
        pool.add_task(meet.wait)
    wait_for(lambda: pool.completed == 5 * n, TIMEOUT)
    assert pool.failed == 0
    assert pool.peak_running >= n


# -- failing tasks ------------------------------------------------------------------------


def test_raising_task_is_logged_counted_and_worker_lives_on(
    make_pool: Any, nthreads: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="cppnp")
    pool = make_pool(nthreads)

    def boom() -> None:
        raise ValueError("boom-7f3a")

    pool.add_task(boom)  # never raises into the caller
    pool.add_task(Task(IRun0()))  # run0 not overridden
    wait_for(lambda: pool.failed == 2, TIMEOUT)
    errors = cppnp_errors(caplog)
    assert len(errors) == 2
    kinds = sorted(r.exc_info[0].__name__ for r in errors if r.exc_info)
    assert kinds == ["NotImplementedError", "ValueError"]
    assert any(
        "boom-7f3a" in r.exc_text or "boom-7f3a" in str(r.exc_info[1]) for r in errors if r.exc_info
    )
    # Every worker survives and keeps taking work.
    ran: list[int] = []
    lock = threading.Lock()

    def ok(i: int) -> None:
        with lock:
            ran.append(i)

    for i in range(10 * max(1, nthreads)):
        pool.add_task(ok, i)
    wait_for(lambda: len(ran) == 10 * max(1, nthreads), TIMEOUT)
    assert all(t.is_alive() for t in pool.threads)
    assert pool.failed == 2
    assert pool.completed == 2 + 10 * max(1, nthreads)


# -- Task forms -----------------------------------------------------------------------------


class Recorder(IRun0, IRun2):
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def run0(self) -> str:
        self.calls.append(("run0",))
        return "r0"

    def run2(self, msg: Any, param: Any) -> str:
        self.calls.append(("run2", msg, param))
        return "r2"


class OnlyRun0(IRun0):
    def __init__(self, sink: list[Any]) -> None:
        self.sink = sink

    def run0(self) -> None:
        self.sink.append("irun0")


class OnlyRun2(IRun2):
    def __init__(self, sink: list[Any]) -> None:
        self.sink = sink

    def run2(self, msg: Any, param: Any) -> None:
        self.sink.append(("irun2", msg, param))


def test_task_forms_do_task() -> None:
    sink: list[Any] = []
    assert Task(OnlyRun0(sink)).do_task() is None
    assert sink == ["irun0"]
    param = object()
    t2 = Task(OnlyRun2(sink), b"msg", param)
    t2.DoTask()
    assert sink[-1] == ("irun2", b"msg", param)
    assert t2.param is param and t2.args == (b"msg", param)
    tc = Task(lambda a, b: a * b, 6, 7)
    assert tc.do_task() == 42 and tc.DoTask() == 42 and tc() == 42
    assert tc.param is None
    assert Task(tc).do_task() == 42  # a Task wrapping a Task


def test_task_forms_in_the_pool(make_pool: Any, nthreads: int) -> None:
    pool = make_pool(nthreads)
    sink: list[Any] = []
    lock = threading.Lock()

    def add(*item: Any) -> None:
        with lock:
            sink.append(item)

    param = object()
    pool.add_task(Task(OnlyRun0(sink)))
    pool.add_task(Task(OnlyRun2(sink), "m", param))
    pool.add_task(Task(add, "task-callable", 1))
    pool.add_task(OnlyRun0(sink))  # a bare IRun0
    pool.add_task(add, "bare-callable", 2)
    pool.AddTask(add, "seed-alias", 3)  # the seed's spelling
    wait_for(lambda: pool.completed == 6, TIMEOUT)
    assert sorted(map(repr, sink)) == sorted(
        map(
            repr,
            [
                "irun0",
                ("irun2", "m", param),
                ("task-callable", 1),
                "irun0",
                ("bare-callable", 2),
                ("seed-alias", 3),
            ],
        )
    )
    assert pool.failed == 0


def test_bad_tasks_raise_type_error(make_pool: Any, nthreads: int) -> None:
    pool = make_pool(nthreads)
    with pytest.raises(TypeError):
        pool.add_task(42)
    with pytest.raises(TypeError):
        pool.add_task(None)
    with pytest.raises(TypeError):
        pool.add_task(Task(int), 1)  # a Task takes no extra args
    with pytest.raises(TypeError):
        Task(42)
    with pytest.raises(TypeError):
        Task(None)
    with pytest.raises(TypeError):
        Task(Recorder(), b"only-one")  # IRun2 needs msg and param
    with pytest.raises(TypeError):
        Task(OnlyRun0([]), 1)  # IRun0 takes nothing
    with pytest.raises(TypeError):
        Task(OnlyRun2([]), 1, 2, 3)
    assert (pool.queued, pool.running, pool.completed, pool.failed) == (0, 0, 0, 0)
