"""Buffer: the byte buffer passed to ``on_message`` (muduo's Buffer)."""

from _core.buffer import Buffer

__all__ = ["Buffer"]
