"""TcpConnection: one accepted connection (created by TcpServer, never by users)."""

from _core.tcp_connection import TcpConnection

__all__ = ["TcpConnection"]
