"""The units of work: IRun0 / IRun2 (subclass them) and Task (the seed's Task)."""

from _core.task import IRun0, IRun2, Task

__all__ = ["IRun0", "IRun2", "Task"]
