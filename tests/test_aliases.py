"""Seed/muduo-compatible aliases are the very same objects as the snake_case names."""

from __future__ import annotations

import pytest

from cppnp import Buffer, EventLoop, ICppnpUsr, Task, TcpConnection, ThreadPool

ALIASES = [
    (EventLoop, "QueueLoop", "queue_in_loop"),
    (EventLoop, "runAt", "run_at"),
    (EventLoop, "runAfter", "run_after"),
    (EventLoop, "runEvery", "run_every"),
    (EventLoop, "cancelTimer", "cancel_timer"),
    (EventLoop, "isInMainThread", "is_in_loop_thread"),
    (TcpConnection, "Send", "send"),
    (TcpConnection, "forceClose", "force_close"),
    (TcpConnection, "setTcpNoDelay", "set_tcp_no_delay"),
    (Buffer, "readableBytes", "readable_bytes"),
    (Buffer, "retrieveAll", "retrieve_all"),
    (Buffer, "findCRLF", "find_crlf"),
    (Buffer, "findEOL", "find_eol"),
    (ThreadPool, "Start", "start"),
    (ThreadPool, "AddTask", "add_task"),
    (Task, "DoTask", "do_task"),
    (ICppnpUsr, "OnMessage", "on_message"),
    (ICppnpUsr, "OnWriteComplete", "on_write_complete"),
]


@pytest.mark.parametrize(
    "cls, alias, name", ALIASES, ids=["%s.%s" % (c.__name__, a) for c, a, _ in ALIASES]
)
def test_alias_is_the_snake_case_object(cls: type, alias: str, name: str) -> None:
    assert getattr(cls, alias) is getattr(cls, name)


def test_aliases_behave_like_the_originals() -> None:
    buf = Buffer(b"line\r\nrest\n")
    assert buf.readableBytes() == buf.readable_bytes() == 11
    assert buf.findCRLF() == buf.find_crlf() == 4
    assert buf.findEOL() == buf.find_eol() == 5
    assert buf.retrieveAll() == b"line\r\nrest\n"
    ran: list[int] = []
    assert Task(ran.append, 1).DoTask() is None
    assert ran == [1]
    with EventLoop() as lp:
        assert lp.isInMainThread() is True
        tid = lp.runAfter(100, lambda: None)
        lp.cancelTimer(tid)
        assert lp.timer_count == 0
        lp.QueueLoop(lambda: ran.append(2))
        lp.runAt(lp.time(), lambda: ran.append(3))
        lp.cancelTimer(lp.runEvery(100, lambda: None))
        lp.run_once(0)
    assert ran == [1, 3, 2]
