"""wsgi.input: the request body, fully received before the app runs.

Small bodies live in memory (io.BytesIO); bodies above the spool threshold go to an
anonymous temporary file.  Either supports read(n), readline(n), readlines(hint) and
iteration, and reads past the end return b"" (``wsgi.input_terminated`` is True).
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Iterator
from typing import IO, Any

__all__ = ["EMPTY_INPUT", "BodyCollector", "EmptyInput"]


class EmptyInput:
    """The wsgi.input of a request without a body (stateless, so one object serves all)."""

    __slots__ = ()

    def read(self, size: int | None = -1) -> bytes:
        """Always b"".  Thread-safe."""
        return b""

    def readline(self, size: int | None = -1) -> bytes:
        """Always b"".  Thread-safe."""
        return b""

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        """Always [].  Thread-safe."""
        return []

    def __iter__(self) -> Iterator[bytes]:
        return iter(())

    def close(self) -> None:
        """Nothing to close.  Thread-safe."""


EMPTY_INPUT = EmptyInput()


class BodyCollector:
    """Collects body chunks on the loop thread; spools to a temp file past *threshold*."""

    __slots__ = ("_chunks", "_file", "size", "threshold")

    def __init__(self, threshold: int) -> None:
        self._chunks: list[bytes] = []
        self._file: IO[bytes] | None = None
        self.size = 0
        self.threshold = threshold

    def add(self, data: bytes) -> None:
        """Append body bytes (spooling past the threshold).  Loop thread only."""
        self.size += len(data)
        if self._file is not None:
            self._file.write(data)
            return
        self._chunks.append(data)
        if self.size > self.threshold:
            f = tempfile.TemporaryFile(prefix="cppnp-body-")
            try:
                f.write(b"".join(self._chunks))
            except BaseException:
                f.close()
                raise
            self._file = f
            self._chunks = []

    @property
    def spooled(self) -> bool:
        """Whether the body went to a temporary file.  Loop thread only."""
        return self._file is not None

    def stream(self) -> Any:
        """The wsgi.input for the collected body (positioned at its start).
        Loop thread only."""
        if self._file is not None:
            self._file.flush()
            self._file.seek(0)
            return self._file
        if not self._chunks:
            return EMPTY_INPUT
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks = []
        return io.BytesIO(data)

    def discard(self) -> None:
        """Drop what was collected.  Loop thread only."""
        self._chunks = []
        if self._file is not None:
            self._file.close()
            self._file = None
