"""
Log output formats of both services: ``--log-format text`` (twistd's usual lines) or
``--log-format json`` (one JSON object a line, the event's fields as twisted.logger has them:
``log_format``, ``log_level``, ``log_namespace``, ``log_time`` and the event's own keys).

The payload rule (why a denylist and where): events carry ids, types, sizes and peers, never
payloads (ARCHITECTURE.md "Security"), and code review keeps it so.  The JSON observer adds
a second line of defence for the one place where a whole event is written out field by field:
it drops every key in L{PAYLOAD_KEYS} (the names this code base uses for message contents)
and lists the dropped names in ``log_omitted``, so an event that carries a body by mistake
shows that it did, without the body.  Text output renders only the fields the format string
names, and those are ids, types, sizes and peers.
"""

from __future__ import annotations

from typing import IO, Any, Mapping

from twisted.application.service import MultiService
from twisted.logger import (
    ILogObserver,
    LogEvent,
    jsonFileLogObserver,
    textFileLogObserver,
)
from zope.interface import implementer

FORMATS = ("text", "json")

#: event keys whose value may be a message, a reply or a resource: never written as JSON
PAYLOAD_KEYS = frozenset({
    "body", "payload", "data", "content", "reply", "reply_body", "answer", "input", "result",
    "resource", "record", "records", "frame", "frames", "raw", "hl7", "astm", "dicom",
    "dataset", "message_body", "text", "bytes",
})


def redact(event: Mapping[str, Any]) -> LogEvent:
    """A copy of C{event} without its L{PAYLOAD_KEYS}; their names in ``log_omitted``."""
    dropped = sorted(k for k in event if k in PAYLOAD_KEYS)
    if not dropped:
        return dict(event)
    out = {k: v for k, v in event.items() if k not in PAYLOAD_KEYS}
    out["log_omitted"] = dropped
    return out


@implementer(ILogObserver)
class _RedactingJSONObserver:
    def __init__(self, stream: IO[str]) -> None:
        self._json = jsonFileLogObserver(stream, recordSeparator="")

    def __call__(self, event: LogEvent) -> None:
        self._json(redact(event))


def log_observer(format: str, stream: IO[str]) -> ILogObserver:
    """The observer writing C{format} ("text" or "json") to C{stream}."""
    if format == "text":
        observer: Any = textFileLogObserver(stream)
        return observer
    if format == "json":
        json_observer: Any = _RedactingJSONObserver(stream)  # provides ILogObserver
        return json_observer
    raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {format!r}")


class _ObserverForApplication(MultiService):
    """
    Hands its observer to the twistd application it is added to: twistd starts logging after
    makeService, with the application's C{ILogObserver} component when it has one.
    """

    def __init__(self, observer: ILogObserver) -> None:
        super().__init__()
        self.observer = observer

    def setServiceParent(self, parent: Any) -> None:  # noqa: N802 (Twisted name)
        set_component = getattr(parent, "setComponent", None)
        if set_component is not None:
            set_component(ILogObserver, self.observer)
        super().setServiceParent(parent)


def with_log_format(root: Any, format: str, stream: IO[str]) -> Any:
    """
    C{root} (an IService), made to log in C{format} when twistd runs it (``makeService``
    returns this).  "text" leaves twistd's own logging (``--logfile``, ``--syslog``) alone;
    "json" writes to C{stream} (the process's stdout: run with ``-n`` under systemd or a
    container runtime).
    """
    if format == "text":
        return root
    wrapper = _ObserverForApplication(log_observer(format, stream))
    root.setServiceParent(wrapper)
    return wrapper
