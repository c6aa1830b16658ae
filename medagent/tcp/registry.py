"""The raw byte-stream scheme: ``tcp://host:port?startChar=&endChar=`` destinations."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medagent.schemes import SenderContext


def tcp_sender(reactor: Any, context: SenderContext) -> Any:
    from medagent.tcp.sender import TCPSender

    return TCPSender(reactor)


SENDERS = {"tcp": tcp_sender}
CHANNELS: dict[str, Any] = {}
