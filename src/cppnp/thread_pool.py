"""ThreadPool: worker threads for the user's work (the seed's ThreadPool)."""

from _core.thread_pool import QueueFull, ThreadPool

__all__ = ["QueueFull", "ThreadPool"]
