from os import PathLike
from ssl import SSLContext
from typing import Any, final

from _core.event_loop import EventLoop
from _core.tcp_connection import TcpConnection

@final
class TcpClient:
    def __init__(
        self,
        loop: EventLoop,
        address: tuple[str, int] | str | bytes | PathLike[str] | PathLike[bytes],
        handler: Any,
        *,
        name: str | None = ...,
        retry: bool = ...,
        retry_initial: float = ...,
        retry_max: float = ...,
        connect_timeout: float | None = ...,
        ssl: SSLContext | None = ...,
        server_hostname: str | None = ...,
        tcp_nodelay: bool = ...,
        ssl_handshake_timeout: float | None = ...,
        idle_timeout: float | None = ...,
    ) -> None: ...
    @property
    def idle_timeout(self) -> float | None: ...
    @property
    def address(self) -> Any: ...
    @property
    def name(self) -> str: ...
    @property
    def loop(self) -> EventLoop: ...
    @property
    def handler(self) -> Any: ...
    @property
    def retry(self) -> bool: ...
    @property
    def connection(self) -> TcpConnection | None: ...
    @property
    def connected(self) -> bool: ...
    def stats(self) -> dict[str, int]: ...
    def connect(self) -> None: ...
    def disconnect(self) -> None: ...
    def stop(self) -> None: ...
