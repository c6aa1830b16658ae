"""
A bounded in-memory buffer of recent log events, for ``$fetch-logs``.

Only the rendered operational text goes in: our log lines carry ids, sizes and states, never
payloads, so the buffer holds no patient data.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.logger import ILogObserver, LogLevel, formatEvent
from zope.interface import implementer


@implementer(ILogObserver)
class LogBuffer:
    def __init__(self, size: int = 1000, level: LogLevel = LogLevel.info) -> None:
        self._events: deque[dict[str, Any]] = deque(maxlen=size)
        self._level = level

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level", LogLevel.info)
        if level < self._level:
            return
        self._events.append(
            {
                "level": level.name.upper(),
                "msg": formatEvent(event),
                "timestamp": event.get("log_time"),
                "namespace": event.get("log_namespace"),
            }
        )

    def newest(self, limit: int) -> list[dict[str, Any]]:
        return list(reversed(self._events))[:limit]
