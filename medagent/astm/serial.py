"""
A serial line as a Twisted client endpoint, so that it is opened, lost and opened again the
way a TCP connection is: L{SerialClientEndpoint} under
C{twisted.application.internet.ClientService} (the inbound channel, which holds its port open
and reopens it when a USB adapter is pulled and plugged back in) or under
L{connect_with_backoff} (the sender, which opens a device when a message is to go there).

Both wait between attempts by one recipe, L{reopen_policy}: Twisted's C{backoffPolicy}, with
the jitter injectable so that tests know every delay.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from twisted.application.internet import backoffPolicy
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.python.failure import Failure
from zope.interface import implementer

from medagent._twisted import Clock, ClientEndpoint, DelayedCall, ProtocolFactory


def no_jitter() -> float:
    """Jitter of L{reopen_policy} by default: none (one device per line, no herd to spread)."""
    return 0.0


def reopen_policy(initial: float = 1.0, maximum: float = 30.0, *, factor: float = 2.0,
                  jitter: Callable[[], float] = no_jitter) -> Callable[[int], float]:
    """
    The delay before retry C{n} (1 for the first): C{initial}, then C{factor} times more
    each time, at most C{maximum}, plus C{jitter()}.

    This is C{backoffPolicy(initial, maximum, factor, jitter)}, asked one attempt earlier:
    C{ClientService} asks for attempt 1 before its first retry, and C{backoffPolicy} would
    answer C{initial * factor} to that.
    """
    policy = backoffPolicy(initialDelay=initial, maxDelay=maximum, factor=factor,
                           jitter=jitter)
    return lambda attempt: policy(max(attempt - 1, 0))


class SerialAddress:
    """The address a protocol built for a serial line is given: the device path."""

    def __init__(self, device: str) -> None:
        self.device = device

    def __repr__(self) -> str:
        return f"SerialAddress({self.device!r})"


@implementer(IStreamClientEndpoint)
class SerialClientEndpoint:
    """
    Opens a serial device (pyserial through C{twisted.internet.serialport.SerialPort}) with
    the protocol the factory builds.  Opening is synchronous, so C{connect} fires at once:
    with the protocol (already connected), or with the error pyserial gave (device missing,
    busy, no permission).  C{settings} are L{medagent.astm.settings.serial_settings}.
    C{portFactory}: anything called like C{SerialPort} (tests); by default Twisted's, imported
    on the first open so that pyserial is needed only where a serial line is used.
    """

    def __init__(self, reactor: Any, device: str, settings: Mapping[str, Any],
                 portFactory: Callable[..., Any] | None = None) -> None:
        self._reactor = reactor
        self._device = device
        self._settings = dict(settings)
        self._port_factory = portFactory

    def __repr__(self) -> str:
        return f"<SerialClientEndpoint {self._device}>"

    def connect(self, protocolFactory: ProtocolFactory) -> Deferred[Any]:
        """Open the device now; the Deferred has already fired when this returns."""
        try:
            if self._port_factory is None:
                from twisted.internet.serialport import SerialPort
                self._port_factory = SerialPort
            protocol = protocolFactory.buildProtocol(SerialAddress(self._device))
            if protocol is None:
                raise CancelledError("the factory built no protocol")
            self._port_factory(protocol, self._device, self._reactor, **self._settings)
        except Exception:  # SerialException, OSError: missing, busy, no permission
            return fail()
        return succeed(protocol)


def connect_with_backoff(clock: Clock, endpoint: ClientEndpoint,
                         factory: ProtocolFactory, *, attempts: int,
                         policy: Callable[[int], float]) -> Deferred[Any]:
    """
    Connect once, and after the C{n}th failure try again in C{policy(n)} seconds, for at
    most C{attempts} tries in all; fires with the protocol, or fails with the last
    attempt's failure.  Cancelling stops the attempt under way and any waiting.

    For whoever opens on demand and gives up (the sender fails the message and the agent's
    queue retries it later): C{ClientService} keeps reconnecting for ever and cannot be
    stopped from the callback that tells it failed.
    """
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    waiting: list[DelayedCall] = []
    current: list[Deferred] = []
    failures = 0
    cancelled = False

    def cancel(_: Deferred) -> None:
        nonlocal cancelled
        cancelled = True
        for call in waiting:
            if call.active():
                call.cancel()
        waiting.clear()
        for d in list(current):
            d.cancel()

    result: Deferred = Deferred(cancel)

    def attempt() -> None:
        waiting.clear()
        d = endpoint.connect(factory)
        current.append(d)
        d.addCallbacks(connected, failed)

    def connected(protocol: Any) -> None:
        current.clear()
        if not result.called:
            result.callback(protocol)

    def failed(f: Failure) -> None:
        nonlocal failures
        current.clear()
        if cancelled or result.called:
            return
        failures += 1
        if failures >= attempts:
            result.errback(f)
            return
        waiting.append(clock.callLater(policy(failures), attempt))

    attempt()
    return result
