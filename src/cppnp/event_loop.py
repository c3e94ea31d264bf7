"""EventLoop (the reactor, one per thread) and EventLoopThread (a loop in its own thread)."""

from __future__ import annotations

import threading
from typing import Any, Callable

from _core.event_loop import EventLoop

__all__ = ["EventLoop", "EventLoopThread"]


class EventLoopThread:
    """Run an EventLoop in a thread of its own (muduo's EventLoopThread).

    ``start()`` creates the loop inside the new thread, runs *init(loop)* there (create
    servers in it), and returns the loop once it is ready; ``.result`` then holds what
    *init* returned (None before, or without *init*).  ``stop()`` quits the loop, joins
    the thread and closes the loop.  Usable as a context manager (``with`` gives the loop)::

        lt = EventLoopThread(lambda loop: make_server(loop))
        with lt as loop:
            server = lt.result
    """

    def __init__(
        self,
        init: Callable[[EventLoop], Any] | None = None,
        *,
        name: str = "cppnp-loop",
    ) -> None:
        self._init = init
        self._name = name
        self._ready = threading.Event()
        self._loop: EventLoop | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.result: Any = None

    @property
    def loop(self) -> EventLoop:
        """The loop; RuntimeError before start().

        Thread-safe.
        """
        if self._loop is None:
            raise RuntimeError("EventLoopThread not started")
        return self._loop

    def start(self, timeout: float = 10.0) -> EventLoop:
        """Start the thread and return its loop once *init* has run (then see ``.result``).

        Call once: a second call raises RuntimeError.  If *init* raises, the thread ends
        and start() raises RuntimeError from that exception.

        Thread-safe.
        """
        with self._start_lock:
            if self._thread is not None:
                raise RuntimeError("EventLoopThread already started")
            self._thread = threading.Thread(target=self._main, name=self._name, daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("EventLoopThread did not start within %s s" % timeout)
        if self._error is not None:
            self._thread.join()
            raise RuntimeError("EventLoopThread init failed") from self._error
        return self.loop

    def _main(self) -> None:
        loop = EventLoop()
        try:
            self._loop = loop
            try:
                if self._init is not None:
                    self.result = self._init(loop)
            except BaseException as exc:
                self._error = exc
                return
            finally:
                self._ready.set()
            loop.loop()
        finally:
            loop.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Quit the loop and join the thread (the loop is closed in its thread).

        Does nothing before start(); call it from another thread than the loop's own.

        Thread-safe.
        """
        if self._thread is None:
            return
        if self._loop is not None:
            self._loop.quit()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("EventLoopThread did not stop within %s s" % timeout)

    def __enter__(self) -> EventLoop:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
