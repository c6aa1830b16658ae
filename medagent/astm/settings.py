"""
What a destination URL asks of an ASTM link, as plain values: the E1381 timers and counts
(L{LinkConfig}), how our messages are cut into frames (L{Framing}) and the serial line's
settings.  Pure: no Twisted, no I/O, so that a bad URL is refused (L{DestinationError})
before anything is opened, by the sender and the channel alike.
"""

from __future__ import annotations

from typing import Any

import attr

from medagent.astm import codec
from medagent.astm.link import LinkConfig
from medagent.destination import Destination, DestinationError

SCHEME_TCP = "astm"
SCHEME_SERIAL = "astm+serial"
SCHEMES = (SCHEME_TCP, SCHEME_SERIAL)

#: Destination URL parameter -> (LinkConfig field, kind).  Timers are in seconds.
#: ``frameAttempts`` is E1381's sends of one frame; ``maxAttempts`` is not here: on every
#: scheme it is the agent queue's delivery attempts of the whole message.
_LINK_PARAMS = {
    "role": ("role", str),
    "enqTimeout": ("enq_timeout", float),
    "busyDelay": ("busy_delay", float),
    "maxEnqAttempts": ("max_enq_attempts", int),
    "contentionWait": ("contention_wait", float),
    "contentionRetry": ("contention_retry", float),
    "maxContentions": ("max_contentions", int),
    "ackTimeout": ("ack_timeout", float),
    "frameAttempts": ("max_attempts", int),
    "receiveTimeout": ("receive_timeout", float),
    "honourInterrupt": ("honour_interrupt", bool),
    "interruptHoldoff": ("interrupt_holdoff", float),
    "maxInterrupts": ("max_interrupts", int),
    "encoding": ("encoding", str),
}

_PARITIES = {"N": "N", "E": "E", "O": "O", "M": "M", "S": "S", "NONE": "N", "EVEN": "E",
             "ODD": "O", "MARK": "M", "SPACE": "S"}


@attr.s(frozen=True, auto_attribs=True)
class Framing:
    """
    How our messages are cut into frames for one device.  Separate from L{LinkConfig}
    because it shapes what we build, not how the link state machine behaves: the link
    only ever sees finished frames.
    """

    encoding: str = "latin-1"
    packed: bool = False
    max_text: int = codec.MAX_FRAME_TEXT


def link_settings(destination: Destination, base: LinkConfig) -> tuple[LinkConfig, Framing]:
    """
    The link and framing settings a destination URL asks for (``?ackTimeout=5&packed=1``);
    L{DestinationError} for values that make no sense.
    """
    changes: dict[str, Any] = {}
    for param, (name, kind) in _LINK_PARAMS.items():
        if destination.param(param) in (None, ""):
            continue
        if kind is float:
            value: Any = destination.float_param(param, 0.0)
            if value <= 0:
                raise DestinationError(f"{param} must be positive")
        elif kind is int:
            value = destination.int_param(param, 0)
            if value < 1:
                raise DestinationError(f"{param} must be at least 1")
        elif kind is bool:
            value = destination.bool_param(param, False)
        else:
            value = destination.param(param)
        changes[name] = value
    if "role" in changes and changes["role"] not in ("computer", "instrument"):
        raise DestinationError("role must be computer or instrument")
    try:
        config = attr.evolve(base, **changes)
    except (TypeError, ValueError) as e:
        raise DestinationError(f"bad ASTM link setting: {e}")
    encoding = config.encoding
    try:
        "".encode(encoding)
    except LookupError:
        raise DestinationError(f"unknown encoding {encoding!r}")
    max_text = destination.int_param("maxFrameText", codec.MAX_FRAME_TEXT)
    if max_text < 1:
        raise DestinationError("maxFrameText must be at least 1")
    return config, Framing(encoding, destination.bool_param("packed", False), max_text)


def serial_settings(destination: Destination) -> dict[str, Any]:
    """
    pyserial settings from ``?baudrate=9600&bytesize=8&parity=N&stopbits=1&rtscts=0&xonxoff=0``
    (keyword arguments of C{twisted.internet.serialport.SerialPort}).
    """
    baudrate = destination.int_param("baudrate", 9600)
    if baudrate < 50 or baudrate > 4_000_000:
        raise DestinationError("baudrate out of range")
    bytesize = destination.int_param("bytesize", 8)
    if bytesize not in (5, 6, 7, 8):
        raise DestinationError("bytesize must be 5, 6, 7 or 8")
    parity = _PARITIES.get((destination.param("parity") or "N").upper())
    if parity is None:
        raise DestinationError("parity must be N, E, O, M or S")
    stopbits = destination.float_param("stopbits", 1)
    if stopbits not in (1, 1.5, 2):
        raise DestinationError("stopbits must be 1, 1.5 or 2")
    return {
        "baudrate": baudrate,
        "bytesize": bytesize,
        "parity": parity,
        "stopbits": int(stopbits) if stopbits != 1.5 else 1.5,
        "rtscts": int(destination.bool_param("rtscts", False)),
        "xonxoff": int(destination.bool_param("xonxoff", False)),
    }


def target(destination: Destination) -> str:
    """The device as logs and error texts name it: the serial path, or host:port."""
    if destination.scheme == SCHEME_SERIAL:
        return destination.path
    return f"{destination.host}:{destination.port}"
