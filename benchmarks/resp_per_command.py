"""The RESP example (examples/resp_server.py) with one ``conn.send`` per command instead
of one per pipelined batch: the naive handler write coalescing is for.  Same arguments as
the example.  Used by benchmarks/results/coalescing-2026-12-02.md."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import resp_server


def _run(self: Any, conn: Any, cmds: list[list[bytes]], failure: Any) -> None:
    execute = self.store.execute
    for argv in cmds:
        if len(argv[0]) == 4 and argv[0].upper() == b"QUIT":
            self._quit(conn, [resp_server.OK])
            return
        conn.send(execute(argv))  # one send per reply
    if failure is not None:
        self._quit(conn, [b"-ERR " + str(failure).encode() + b"\r\n"])


resp_server.RespServer._run = _run  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(resp_server.main())
