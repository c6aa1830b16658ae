"""
What the agent does with a pushed message: check the site's destination policy, find the
sender for the destination's scheme, and hand the message over (or ping the device).

Ordering is not kept here: the L{medagent.agent.queue.DurableQueue} owns the lanes (one
message in flight per device) and calls L{Dispatcher.dispatch} for the head of a lane.
Senders (MLLP, ASTM, DICOM, raw TCP) implement L{medagent.delivery.Sender}; they never see
the websocket.  The delivery vocabulary itself lives in L{medagent.delivery}.
"""

from __future__ import annotations

from typing import Any, Mapping

from twisted.internet.defer import Deferred, DeferredList, fail, maybeDeferred, succeed

from medagent.agent.allow import DestinationPolicy
from medagent.contenttypes import PING
from medagent.delivery import DeliveryError, Reply, Sender
from medagent.destination import Destination, DestinationError, lane_key, parse_destination


#: How many destination URLs a dispatcher remembers the parse of (then it starts again).
PARSED_URLS = 1024


class Dispatcher:
    """Scheme → sender lookup, the destination policy check, and ping."""

    def __init__(self, senders: Mapping[str, Sender],
                 policy: DestinationPolicy | None = None) -> None:
        self._senders = dict(senders)
        #: where this agent may connect (the site's allowlist; open unless configured)
        self.policy = policy if policy is not None else DestinationPolicy()
        #: remote URL -> its parse (or why it does not parse): a lane asks several times per
        #: message (its lane, whether the sender marks, whether it is ready, the dispatch)
        self._parsed: dict[str, Destination | DestinationError] = {}

    def add_sender(self, scheme: str, sender: Sender) -> None:
        self._senders[scheme] = sender

    def schemes(self) -> list[str]:
        return sorted(self._senders)

    def marks_first_write(self, remote: str, content_type: str) -> bool:
        """
        Whether the sender for C{remote} calls the L{medagent.delivery.BEFORE_WRITE} hook
        before it writes.  Pings never write a message, so they count as marking (and never
        take the mark).  A destination we cannot resolve fails before any write, so it
        counts too.
        """
        if content_type == PING:
            return True
        try:
            _, sender = self.resolve(remote)
        except DeliveryError:
            return True
        return bool(getattr(sender, "marks_first_write", False))

    def ready_to_write(self, remote: str) -> bool:
        """Whether the sender for C{remote} has an idle connection to its device right now."""
        try:
            destination, sender = self.resolve(remote)
        except DeliveryError:
            return False
        ready = getattr(sender, "ready_to_write", None)
        return bool(ready(destination)) if ready is not None else False

    def resolve(self, remote: str) -> tuple[Destination, Sender]:
        """Parse C{remote} and find its sender; L{DeliveryError} (permanent) if we cannot."""
        destination = self.parse(remote)
        if isinstance(destination, DestinationError):
            raise DeliveryError(str(destination), transient=False, phase="destination")
        if not self.policy.allows(destination):
            raise DeliveryError(self.policy.refusal(destination), transient=False,
                                phase="destination")
        sender = self._senders.get(destination.scheme)
        if sender is None:
            raise DeliveryError(
                f"Unsupported destination scheme {destination.scheme}:// "
                f"(this agent supports: {', '.join(self.schemes())})",
                transient=False,
                phase="destination",
            )
        return destination, sender

    def parse(self, remote: str) -> Destination | DestinationError:
        """C{remote} parsed (a frozen L{Destination}), or its error; remembered per URL."""
        parsed = self._parsed.get(remote)
        if parsed is None:
            try:
                parsed = parse_destination(remote, needs_port=False)
            except DestinationError as e:
                parsed = e
            if len(self._parsed) >= PARSED_URLS:
                self._parsed.clear()  # bounded: URLs come from the relay
            self._parsed[remote] = parsed
        return parsed

    def lane_key(self, remote: str) -> str:
        """L{medagent.destination.lane_key} (remembered there)."""
        return lane_key(remote)

    def dispatch(
        self, remote: str, content_type: str, body: str, options: Mapping[str, Any] | None = None
    ) -> Deferred[Reply]:
        """
        Deliver one message (the caller keeps one in flight per device); fires with the
        L{Reply}.  A ping asks whether the device is there now.
        """
        if content_type == PING and "://" not in remote:
            # Medplum's form (a bare host, for the OS ping): we probe a device's own port.
            return fail(DeliveryError(
                f"Ping of bare host {remote[:100]!r}: this agent pings a device by its "
                f"destination URL with a port, e.g. mllp://{remote[:100]}:2575",
                transient=False, phase="destination"))
        try:
            destination, sender = self.resolve(remote)
        except DeliveryError as e:
            return fail(e)
        if content_type == PING:
            return maybeDeferred(sender.ping, destination)
        return maybeDeferred(sender.send, destination, content_type, body, options or {})

    def close(self) -> Deferred[None]:
        ds = [maybeDeferred(s.close) for s in set(self._senders.values())]
        if not ds:
            return succeed(None)
        return DeferredList(ds, consumeErrors=True).addCallback(lambda _: None)
