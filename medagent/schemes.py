"""
The scheme registry: which destination schemes (outbound senders) and channel address
schemes (inbound listeners) exist, and who builds them.

Each protocol package declares its own in a ``registry`` module::

    SENDERS = {"mllp": mllp_sender, "mllps": mllp_sender}    # (reactor, SenderContext)
    CHANNELS = {"mllp": mllp_channel}                         # (reactor, ChannelContext)

and L{PACKAGES} lists the packages.  Adding a protocol is its package plus one line here.
The agent builds its senders and channels from it (L{build_senders}, L{channel_factory});
the relay uses L{sender_schemes} to check a push for an agent that announced no schemes of
its own (offline, or Medplum's agent).  A registry module imports its package's Twisted code
only inside the factories, so reading the registry stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Callable, Mapping, Tuple

import attr

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from medagent._twisted import ChildService
    from medagent.delivery import Sender
    from medagent.destination import Destination

#: The protocol packages; each has a ``registry`` module with C{SENDERS} and C{CHANNELS}.
PACKAGES = (
    "medagent.hl7",
    "medagent.astm",
    "medagent.dicom",
    "medagent.tcp",
)

#: (content type, body, remote) → Deferred: how a channel hands a message to the outbox.
Forward = Callable[[str, str, str], "Deferred[Any]"]


@attr.s(frozen=True, auto_attribs=True)
class SenderContext:
    """What a sender factory may need from the agent besides the reactor."""

    #: TLS client settings for ``mllps://`` (PEM paths; None: system trust, no client cert)
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    #: name → the running worklist channel of that name, or None
    worklist: Callable[[str], Any] = lambda name: None
    #: where messages a device sends on an outbound link go (ASTM contention)
    astm_inbound: Forward | None = None


@attr.s(frozen=True, auto_attribs=True)
class ChannelContext:
    """One channel to start: its settings and the agent's hooks it may use."""

    name: str
    #: the Endpoint address as configured, and parsed
    address: str
    destination: Destination
    #: the strports description to listen on (from host and port of the address)
    endpoint: str
    #: the agent's data folder, and the channel's name made safe for a file name
    data_dir: str
    safe_name: str
    #: hand a message to the outbox; fires once it is stored (MLLP's commit ACK)
    forward: Forward
    #: hand a message to the outbox; fires with the cloud's answer
    forward_and_wait: Forward
    #: a DICOM instance: its file is uploaded as a Binary first, then forwarded and waited
    forward_instance: Forward
    #: make a worklist channel findable by ``worklist://<name>`` pushes
    register_worklist: Callable[[Any], None]


SenderFactory = Callable[[Any, SenderContext], "Sender"]
#: returns the service to run and the application object behind it
ChannelFactory = Callable[[Any, ChannelContext], Tuple["ChildService", Any]]


def _registries() -> list[Any]:
    return [importlib.import_module(f"{package}.registry") for package in PACKAGES]


def sender_factories() -> dict[str, SenderFactory]:
    """Destination scheme → sender factory, over every package."""
    return _merged("SENDERS")


def channel_factories() -> dict[str, ChannelFactory]:
    """Channel address scheme → channel factory, over every package."""
    return _merged("CHANNELS")


def _merged(attribute: str) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for registry in _registries():
        for scheme, factory in getattr(registry, attribute, {}).items():
            if scheme in merged:
                raise ValueError(f"Scheme {scheme}:// is declared twice ({registry.__name__})")
            merged[scheme] = factory
    return merged


def sender_schemes() -> frozenset[str]:
    """Every destination scheme some package can deliver to."""
    return frozenset(sender_factories())


def channel_schemes() -> tuple[str, ...]:
    """Every channel address scheme, in declaration order."""
    return tuple(channel_factories())


def build_senders(reactor: Any, context: SenderContext,
                  factories: Mapping[str, SenderFactory] | None = None) -> dict[str, Sender]:
    """
    One sender per scheme.  A factory declared under several schemes (``mllp`` and
    ``mllps``) is called once, and its sender serves them all (one connection pool).
    """
    built: dict[Any, Sender] = {}
    senders: dict[str, Sender] = {}
    for scheme, factory in (factories if factories is not None
                            else sender_factories()).items():
        if factory not in built:
            built[factory] = factory(reactor, context)
        senders[scheme] = built[factory]
    return senders
