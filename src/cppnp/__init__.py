"""cppnp: a muduo-style reactor networking library with a Cython epoll core.

One loop thread does all I/O (EventLoop); a ThreadPool runs the user's work; replies
come back to the loop through its pending functors.  Users implement an ICppnpUsr,
serve it with a TcpServer, and hand work to a ThreadPool as Tasks (IRun0 / IRun2).

Errors raised by callbacks and tasks are logged on the ``cppnp`` logger with their
traceback.  Until the application configures logging, they reach stderr through
logging's last-resort handler (as asyncio's do); once it does, they go where it says,
once.  cppnp adds no handler of its own.
"""

from _core.buffer import live_buffers
from _core.tcp_connection import live_connections
from cppnp._version import __version__
from cppnp.buffer import Buffer
from cppnp.event_loop import EventLoop, EventLoopThread
from cppnp.handler import ICppnpUsr
from cppnp.prefork import PreforkError, serve
from cppnp.task import IRun0, IRun2, Task
from cppnp.tcp_client import TcpClient
from cppnp.tcp_connection import TcpConnection
from cppnp.tcp_server import TcpServer
from cppnp.thread_pool import QueueFull, ThreadPool

__all__ = [
    "Buffer",
    "EventLoop",
    "EventLoopThread",
    "ICppnpUsr",
    "IRun0",
    "IRun2",
    "PreforkError",
    "QueueFull",
    "Task",
    "TcpClient",
    "TcpConnection",
    "TcpServer",
    "ThreadPool",
    "__version__",
    "live_buffers",
    "live_connections",
    "serve",
]
