"""
Which devices this agent will connect to, whoever asks.

The relay decides who may push; the agent decides where it may connect.  Without a limit, a
pusher (or a compromised relay) can aim the agent at any host:port of the hospital network and
use its answers ("connected", "refused") as a port scanner.  The site sets the limit in the
agent's own configuration (``allowDestinations`` in agent.properties, ``--allow-destinations``
on the command line), a comma-separated list of patterns:

=============================  ==========================================================
``lab-analyzer.local:2575``    that host and port, any scheme
``mllp://10.1.2.3:2575``       that scheme, host and port
``10.1.2.0/24:2575``           any address of the network, that port
``10.1.2.0/24:*``              any port
``*.lab.local:*``              host names ending in ``.lab.local``
``serial:/dev/ttyUSB0``        a serial device path (``astm+serial``)
``worklist:*``                 the agent's own worklist channels
=============================  ==========================================================

Names are compared as written (no DNS lookup: a lookup answer is the network's, not the
site's).  With no list every destination is allowed, as in Medplum's agent; the agent says so
once at startup.  A refused destination is the caller's error (HTTP 400 at the relay), and
nothing is sent.
"""

from __future__ import annotations

import fnmatch
import ipaddress
from typing import Iterable

import attr

from medagent.destination import Destination


class PolicyError(ValueError):
    """An allowDestinations entry that cannot be read."""


@attr.s(frozen=True, auto_attribs=True)
class _Rule:
    scheme: str | None
    host: str
    port: str  # a number, or "*"

    def matches(self, destination: Destination) -> bool:
        scheme = destination.scheme
        if self.scheme == "serial":
            return scheme.endswith("+serial") and fnmatch.fnmatchcase(destination.path,
                                                                      self.host)
        if self.scheme == "worklist":
            return scheme == "worklist" and fnmatch.fnmatchcase(destination.host, self.host)
        if self.scheme is not None and self.scheme != scheme:
            return False
        if scheme.endswith("+serial") or scheme == "worklist":
            return False
        if self.port != "*" and str(destination.port) != self.port:
            return False
        host = destination.host.lower().rstrip(".")
        if "/" in self.host:
            try:
                return ipaddress.ip_address(host) in ipaddress.ip_network(self.host,
                                                                          strict=False)
            except ValueError:
                return False
        return fnmatch.fnmatchcase(host, self.host)


def _rule(text: str) -> _Rule:
    entry = text.strip()
    scheme = None
    if "://" in entry:
        scheme, _, entry = entry.partition("://")
        scheme = scheme.lower()
    elif entry.startswith(("serial:", "worklist:")):
        scheme, _, entry = entry.partition(":")
        if not entry:
            raise PolicyError(f"allowDestinations entry {text!r} has nothing after {scheme}:")
        return _Rule(scheme, entry, "*")
    host, sep, port = entry.rpartition(":")
    if not sep or not host:
        raise PolicyError(f"allowDestinations entry {text!r} must be host:port (port or *)")
    if port != "*" and not (port.isdigit() and 0 < int(port) < 65536):
        raise PolicyError(f"allowDestinations entry {text!r} has a bad port")
    host = host.strip("[]").lower().rstrip(".")
    if "/" in host:
        try:
            ipaddress.ip_network(host, strict=False)
        except ValueError:
            raise PolicyError(f"allowDestinations entry {text!r} has a bad network")
    return _Rule(scheme, host, port)


class DestinationPolicy:
    """The site's allowlist; L{allows} is asked before every send and ping."""

    def __init__(self, entries: Iterable[str] | None = None) -> None:
        items = [e for e in (entries or ()) if e and e.strip()]
        self.rules = tuple(_rule(e) for e in items)
        self.open = not self.rules

    @classmethod
    def from_setting(cls, value: str | None) -> "DestinationPolicy":
        return cls((value or "").split(","))

    def allows(self, destination: Destination) -> bool:
        return self.open or any(rule.matches(destination) for rule in self.rules)

    def refusal(self, destination: Destination) -> str:
        """The reason given to the caller: names the device, never the list."""
        where = (destination.path if destination.scheme.endswith("+serial")
                 else f"{destination.host}:{destination.port}")
        return (f"This agent is not allowed to connect to {destination.scheme}://{where} "
                "(not in its allowDestinations)")
