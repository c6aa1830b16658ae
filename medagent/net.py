"""Small socket settings shared by the relay's and the agent's websocket adapters."""

from __future__ import annotations

from typing import Any


def no_delay(transport: Any) -> None:
    """Small frames both ways: without TCP_NODELAY, Nagle + delayed ACK add ~40 ms."""
    try:
        transport.setTcpNoDelay(True)
    except (AttributeError, OSError):
        pass
