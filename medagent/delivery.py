"""
The shared delivery vocabulary: what a sender answers (L{Reply}), how a delivery fails
(L{DeliveryError} and its phases), what that means for a waited caller (L{http_status}) and
whether the device may have the message (L{in_doubt}), and the L{Sender} protocol every
device protocol implements.

Protocol packages (L{medagent.hl7}, L{medagent.astm}, L{medagent.dicom}, L{medagent.tcp}) and
the agent both speak it, so it lives outside both: a protocol package imports this module,
never L{medagent.agent}.  No Twisted at run time (it names C{Deferred} in types only); content
types are in L{medagent.contenttypes}.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Protocol

import attr

from medagent.contenttypes import TEXT

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from medagent.destination import Destination


@attr.s(frozen=True, auto_attribs=True)
class Reply:
    """
    A device's answer.  C{delivered} is False for a negative application answer (HL7
    ``AE``/``AR``, DICOM failure status, ASTM refusal): the device got the message and said
    no, so it is not retried, but the caller still sees the answer.
    """

    body: str
    content_type: str = TEXT
    status_code: int = 200
    delivered: bool = True
    detail: str | None = None


class DeliveryError(Exception):
    """
    The message could not be delivered.  C{transient} failures (refused, reset, timeout) may
    be retried; others (bad message, unsupported scheme) may not.  C{phase} says where it
    broke (``connect``, ``send``, ``ack``...), for the 3 a.m. reader.  C{timed_out} marks "no
    answer in time" (HTTP 504), whatever the phase's wording.  A subclass sets C{not_written}
    when it knows that no byte of the message left the agent.

    C{reply}: the device answered but refused for now, having processed nothing (DICOM
    ``0xA7xx`` out of resources), so a retry is safe although bytes reached it.  The queue
    retries it at most C{max_attempts} times (and the destination's ``maxAttempts``); then
    C{reply} - the device's answer, C{delivered=False} - is the push's outcome.
    """

    #: True when no byte of the message can have been written (e.g. the connection was gone).
    not_written: bool = False
    reply: Reply | None = None
    max_attempts: int | None = None

    def __init__(self, reason: str, *, transient: bool = True, phase: str | None = None,
                 timed_out: bool = False, reply: Reply | None = None,
                 max_attempts: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.transient = transient
        self.phase = phase
        self.timed_out = timed_out
        self.reply = reply
        self.max_attempts = max_attempts

    def __str__(self) -> str:
        return self.reason


#: Phases in which the caller's request is wrong: HTTP 400, never retried, never in doubt.
REQUEST_PHASES = frozenset(["destination", "decode", "encode", "message"])

#: Failure phases in which nothing can have reached the device: safe to try again.
RETRY_SAFE_PHASES = frozenset(
    ["connect", "send", "establishment", "association", "queue", "network", "open"]
)

#: Phases in which the device answered that it did not take the message (DICOM C-STORE
#: "out of resources"): it has the bytes but not the message, so not in doubt, and another
#: try later is what the device asks for.
REFUSED_PHASES = frozenset(["store"])

#: Transient failures in these phases are retried by the queue.
RETRYABLE_PHASES = RETRY_SAFE_PHASES | REFUSED_PHASES

#: Phases in which the message cannot have been taken by the device.
NOT_WRITTEN_PHASES = REQUEST_PHASES | RETRY_SAFE_PHASES | REFUSED_PHASES

#: The human half of the in-doubt marker (the machine half is ``inDoubt: true``).
IN_DOUBT_PHRASE = "the device may or may not have received this message"

#: Key of C{options} under which the queue hands a sender its "first byte" hook: a callable
#: returning a Deferred that fires once the entry's in-flight mark is on disk.  A sender
#: that declares C{marks_first_write = True} calls it right before its first write of the
#: message and writes nothing if it fails.
BEFORE_WRITE = "_beforeWrite"


class NotWritten(DeliveryError):
    """Nothing of the message was written (e.g. its in-flight mark could not be recorded)."""

    not_written = True

    def __init__(self, reason: str, *, phase: str = "send") -> None:
        super().__init__(reason, transient=True, phase=phase)


def http_status(error: BaseException) -> int:
    """
    The one mapping from a delivery failure to the HTTP status a waited caller gets (the
    README's table): 400 the request is wrong, 504 no answer in time, 502 the device could
    not be reached or broke the link, 500 an internal error of the agent.
    """
    if not isinstance(error, DeliveryError):
        return 500
    if error.phase in REQUEST_PHASES:
        return 400
    if error.timed_out:
        return 504
    if error.phase not in RETRY_SAFE_PHASES:
        reason = error.reason.lower()
        if "timeout" in reason or "timed out" in reason:  # senders without the flag
            return 504
    if not error.transient and error.phase is None:
        return 400
    return 502


def in_doubt(error: BaseException, may_have_written: bool) -> bool:
    """
    Whether a failed delivery may have reached the device: only once its first byte may have
    been written (C{may_have_written}: the in-flight mark was taken), and only for a failure
    after that point (not a refused connect, a rejected association, a bad message).
    """
    if not may_have_written:
        return False
    if isinstance(error, DeliveryError):
        return not error.not_written and error.phase not in NOT_WRITTEN_PHASES
    return True


class Sender(Protocol):
    """
    Delivers messages to one kind of device link.  C{schemes}: the destination schemes it
    serves (declared with it in its package's registry, L{medagent.schemes}).
    """

    schemes: tuple[str, ...]

    def send(
        self, destination: Destination, content_type: str, body: str, options: Mapping[str, Any]
    ) -> Deferred[Reply]:
        """
        Deliver C{body}; fire with the device's L{Reply}, or fail with L{DeliveryError}.
        Must fire within its own timeouts.  Called with at most one message in flight per
        destination.  C{options} carries per-message settings such as ``returnAck``.
        """

    def ping(self, destination: Destination) -> Deferred[Reply]:
        """Check that the device answers (TCP connect, ENQ, C-ECHO...)."""

    def close(self) -> Deferred[None]:
        """Close idle and open connections; fail what is in flight."""
