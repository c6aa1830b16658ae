"""
DICOM associations as Twisted protocols (PS3.8 Upper Layer state machine), one per TCP
connection, with the ARTIM/ACSE, DIMSE and network timeouts on an injected clock.

The PDUs and DIMSE messages are pynetdicom's (L{medagent.dicom.pdu}, L{medagent.dicom.dimse});
this module only drives them: negotiation (pynetdicom's C{negotiate_as_requestor} /
C{negotiate_as_acceptor}), one outstanding DIMSE request at a time, release and abort.
pynetdicom's own threaded C{Association} is never used here.
"""

from __future__ import annotations

import itertools
import socket
from collections import deque
from typing import Any, Callable, Iterable, Mapping, Sequence

from pydicom.uid import UID
from pynetdicom.presentation import (
    PresentationContext,
    negotiate_as_acceptor,
    negotiate_as_requestor,
)
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from medagent._twisted import DelayedCall, maybe_transport, transport_of
from medagent.dicom import dimse, pdu
from medagent.net import no_delay

log = Logger()

_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)

#: Never fragment our own P-DATA above this, even when the peer says "unlimited" (0).
MAX_SEND_PDU = 1_048_576


class AssociationError(Exception):
    """Why an association could not do what was asked; C{transient} says if a retry may help."""

    transient = True
    phase = "association"

    def __init__(self, reason: str, *, transient: bool | None = None, phase: str | None = None):
        super().__init__(reason)
        self.reason = reason
        if transient is not None:
            self.transient = transient
        if phase is not None:
            self.phase = phase

    def __str__(self) -> str:
        return self.reason


class AssociationRejected(AssociationError):
    def __init__(self, result: int, source: int, reason: int) -> None:
        self.result, self.source, self.diagnostic = result, source, reason
        super().__init__(
            "association rejected: " + pdu.describe_rejection(result, source, reason),
            transient=(result == pdu.RESULT_TRANSIENT),
        )


class AssociationAborted(AssociationError):
    pass


class AssociationTimeout(AssociationError):
    pass


class ConnectionClosed(AssociationError):
    pass


class _AssociationBase(Protocol):
    """PDU framing, timers, abort and close handling shared by both roles."""

    role = "?"

    def __init__(
        self,
        clock: Any,
        *,
        max_pdu: int = pdu.DEFAULT_MAX_PDU,
        acse_timeout: float = 30.0,
        max_message_bytes: int = dimse.DEFAULT_MAX_MESSAGE,
    ) -> None:
        self.clock = clock
        self.max_pdu = max_pdu
        self.acse_timeout = acse_timeout
        self.decoder = pdu.PDUDecoder(pdu.MAX_ASSOCIATE_PDU)
        self.assembler = dimse.MessageAssembler(max_message_bytes)
        self.state = "idle"
        self.peer_max_pdu = 0
        self.accepted: dict[int, PresentationContext] = {}
        self.rejected: list[PresentationContext] = []
        self.calling_ae = ""
        self.called_ae = ""
        self.failure: AssociationError | None = None
        self.closed: Deferred[None] = Deferred()
        self._timer: DelayedCall | None = None
        self._timer_what = ""
        self.peer = "?"

    # -- plumbing ------------------------------------------------------------------------

    def connectionMade(self) -> None:
        peer = transport_of(self).getPeer()
        self.peer = f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"
        no_delay(self.transport)  # PDUs are request/response

    @property
    def send_max_pdu(self) -> int:
        if not self.peer_max_pdu:
            return MAX_SEND_PDU
        return min(self.peer_max_pdu, MAX_SEND_PDU)

    def _set_timer(self, seconds: float | None, what: str) -> None:
        self._cancel_timer()
        if seconds:
            self._timer_what = what
            self._timer = self.clock.callLater(seconds, self._timed_out)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        what = self._timer_what
        log.warn("DICOM {role} {peer}: {what} timed out in state {state}",
                 role=self.role, peer=self.peer, what=what, state=self.state)
        self._fail(AssociationTimeout(f"{what} timed out", phase=what))
        if self.state in ("established", "awaiting-ac", "awaiting-rq", "releasing"):
            # ARTIM / DIMSE / network timer expiry: A-ABORT and drop (PS3.8 9.2 AA-2 / AA-1).
            self._write_pdu(pdu.abort(pdu.ABORT_SOURCE_PROVIDER, pdu.REASON_NOT_SPECIFIED))
        self._drop()

    def _write_pdu(self, p) -> None:
        transport = maybe_transport(self)
        if transport is not None and self.state != "closed":
            transport.write(p.encode())

    def _drop(self) -> None:
        if self.state != "closed":
            self.state = "closing"
        self._cancel_timer()
        transport = maybe_transport(self)
        if transport is not None:
            transport.loseConnection()

    def _fail(self, error: AssociationError) -> None:
        """Remember the first reason things went wrong; subclasses fail their waiters."""
        if self.failure is None:
            self.failure = error

    def abort(self, reason: str = "aborted by us") -> None:
        """A-ABORT (service-user) and close; what is in flight fails."""
        if self.state in ("closed", "closing"):
            return
        self._fail(AssociationAborted(reason))
        self._write_pdu(pdu.abort(pdu.ABORT_SOURCE_USER))
        self._drop()

    def _provider_abort(self, reason_code: int, why: str) -> None:
        log.warn("DICOM {role} {peer}: protocol error ({why}); sending A-ABORT",
                 role=self.role, peer=self.peer, why=why)
        self._fail(AssociationAborted(f"protocol error: {why}", phase="protocol"))
        self._write_pdu(pdu.abort(pdu.ABORT_SOURCE_PROVIDER, reason_code))
        self._drop()

    def _quick_ack(self) -> None:
        """
        Linux: ACK at once.  Peers that leave Nagle on (dcmtk's default) write a PDU in two
        segments and wait for our ACK of the first; a delayed ACK costs 40 ms per response.
        """
        if _TCP_QUICKACK is None:
            return
        handle = getattr(self.transport, "getHandle", None)
        sock = handle() if handle is not None else None
        if sock is not None and hasattr(sock, "setsockopt"):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
            except OSError:
                pass

    def dataReceived(self, data: bytes) -> None:
        if self.state in ("closed", "closing"):
            return
        self._quick_ack()
        try:
            pdus = self.decoder.feed(data)
        except pdu.PDUError as e:
            self._provider_abort(e.reason, str(e))
            return
        for p in pdus:
            if self.state in ("closed", "closing"):
                return
            try:
                self._pdu_received(p)
            except pdu.PDUError as e:
                self._provider_abort(e.reason, str(e))
            except dimse.DimseError as e:
                self._provider_abort(pdu.REASON_INVALID_PARAMETER, str(e))

    def _pdu_received(self, p) -> None:
        kind = p.pdu_type
        if kind == 0x07:
            self._fail(AssociationAborted(pdu.describe_abort(p.source, p.reason_diagnostic)))
            log.info("DICOM {role} {peer}: peer sent A-ABORT (source {source}, reason {reason})",
                     role=self.role, peer=self.peer, source=p.source, reason=p.reason_diagnostic)
            self._drop()
        elif kind == 0x04:
            if self.state not in ("established", "releasing"):
                raise pdu.PDUError("P-DATA-TF outside an association", pdu.REASON_UNEXPECTED_PDU)
            for item in p.presentation_data_value_items:
                if item.presentation_context_id not in self.accepted:
                    raise pdu.PDUError(
                        f"P-DATA on presentation context {item.presentation_context_id} "
                        "that was not accepted", pdu.REASON_INVALID_PARAMETER)
            for message in self.assembler.feed(p):
                self._message_received(message)
        else:
            handler = getattr(self, "_on_" + pdu.PDU_NAMES[kind].replace("-", "_"), None)
            if handler is None:
                raise pdu.PDUError(f"unexpected {pdu.PDU_NAMES[kind]}", pdu.REASON_UNEXPECTED_PDU)
            handler(p)

    def _message_received(self, message) -> None:
        raise NotImplementedError

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        was = self.state
        self.state = "closed"
        self._cancel_timer()
        self._fail(ConnectionClosed(f"connection closed in state {was}", phase="network"))
        self._lost()
        self.closed.callback(None)

    def _lost(self) -> None:
        pass

    def context_for(self, context_id: int) -> PresentationContext | None:
        return self.accepted.get(context_id)

    def send_message(self, message, context_id: int) -> None:
        transport = maybe_transport(self)
        if transport is None or self.state not in ("established", "releasing"):
            return
        transport.write(dimse.message_bytes(message, context_id, self.send_max_pdu))


# -- requestor (SCU side) -------------------------------------------------------------------


class AssociationRequestor(_AssociationBase):
    """
    Opens an association on connect.  C{established} fires with this protocol once accepted,
    or fails with L{AssociationRejected} / L{AssociationAborted} / L{AssociationTimeout} /
    L{ConnectionClosed}.  Then L{request} sends one DIMSE request at a time.
    """

    role = "SCU"

    def __init__(
        self,
        clock: Any,
        *,
        calling_ae: str,
        called_ae: str,
        contexts: Iterable[tuple[str, Sequence[str]]],
        dimse_timeout: float = 60.0,
        **kw: Any,
    ) -> None:
        super().__init__(clock, **kw)
        self.calling_ae = calling_ae
        self.called_ae = called_ae
        self.requested = pdu.build_contexts(contexts)
        self.dimse_timeout = dimse_timeout
        self.established: Deferred[AssociationRequestor] = Deferred()
        self._ids = itertools.cycle(range(1, 65536))
        self._pending: tuple[int, Deferred, list, bool] | None = None
        self._release_waiter: Deferred | None = None
        self.requests_sent = 0

    def connectionMade(self) -> None:
        super().connectionMade()
        self.state = "awaiting-ac"
        self._write_pdu(pdu.associate_rq(self.calling_ae, self.called_ae, self.requested,
                                         self.max_pdu))
        self._set_timer(self.acse_timeout, "association")

    def _on_A_ASSOCIATE_AC(self, p) -> None:
        if self.state != "awaiting-ac":
            raise pdu.PDUError("unexpected A-ASSOCIATE-AC", pdu.REASON_UNEXPECTED_PDU)
        primitive = p.to_primitive()
        results = negotiate_as_requestor(
            self.requested, primitive.presentation_context_definition_results_list
        )
        # A negotiated context carries the id it was proposed with (never None here).
        self.accepted = {cx.context_id: cx for cx in results
                         if cx.result == 0 and cx.context_id is not None}
        self.rejected = [cx for cx in results if cx.result != 0]
        self.peer_max_pdu = primitive.maximum_length_received or 0
        self.decoder.max_length = self.max_pdu
        self.state = "established"
        self._cancel_timer()
        log.debug("DICOM SCU {peer}: association {calling}->{called} accepted, "
                  "{n} of {m} contexts, peer max PDU {max}", peer=self.peer,
                  calling=self.calling_ae, called=self.called_ae, n=len(self.accepted),
                  m=len(self.requested), max=self.peer_max_pdu)
        self.established.callback(self)

    def _on_A_ASSOCIATE_RJ(self, p) -> None:
        if self.state != "awaiting-ac":
            raise pdu.PDUError("unexpected A-ASSOCIATE-RJ", pdu.REASON_UNEXPECTED_PDU)
        self._fail(AssociationRejected(p.result, p.source, p.reason_diagnostic))
        log.info("DICOM SCU {peer}: association {calling}->{called} rejected "
                 "(result {result}, source {source}, reason {reason})", peer=self.peer,
                 calling=self.calling_ae, called=self.called_ae, result=p.result,
                 source=p.source, reason=p.reason_diagnostic)
        self._drop()

    def _on_A_RELEASE_RQ(self, p) -> None:
        if self.state not in ("established", "releasing"):
            raise pdu.PDUError("unexpected A-RELEASE-RQ", pdu.REASON_UNEXPECTED_PDU)
        # The acceptor releases (or a release collision): answer and close.
        self._fail(ConnectionClosed("peer released the association", phase="network"))
        self._write_pdu(pdu.release_rp())
        self._drop()

    def _on_A_RELEASE_RP(self, p) -> None:
        if self.state != "releasing":
            raise pdu.PDUError("unexpected A-RELEASE-RP", pdu.REASON_UNEXPECTED_PDU)
        self._drop()

    # -- DIMSE -----------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self._pending is not None

    @property
    def usable(self) -> bool:
        return self.state == "established" and self._pending is None

    def find_context(self, abstract_syntax: str, syntaxes: Sequence[str] = ()) -> (
            PresentationContext | None):
        """An accepted context for C{abstract_syntax}, preferring C{syntaxes} in order."""
        candidates = [cx for cx in self.accepted.values()
                      if cx.abstract_syntax == UID(abstract_syntax)]
        for ts in syntaxes:
            for cx in candidates:
                if cx.transfer_syntax[0] == UID(ts):
                    return cx
        return candidates[0] if candidates and not syntaxes else None

    def next_message_id(self) -> int:
        return next(self._ids)

    def request(self, message, context_id: int, *, multiple: bool = False,
                timeout: float | None = None) -> Deferred[list]:
        """
        Send C{message} on C{context_id}; fire with its responses (the final one last; with
        C{multiple}, pending C-FIND responses before it).  Fails with an AssociationError.
        """
        if self.state != "established":
            return fail(self.failure or ConnectionClosed("association is not established"))
        if self._pending is not None:
            return fail(AssociationError("a DIMSE request is already in flight",
                                         transient=False))
        d: Deferred[list] = Deferred()
        self._pending = (dimse.field(message, "MessageID"), d, [], multiple)
        self.requests_sent += 1
        self.send_message(message, context_id)
        self._set_timer(timeout or self.dimse_timeout, "DIMSE response")
        return d

    def _message_received(self, message) -> None:
        cs = message.command_set
        if not cs.CommandField & 0x8000:
            # We serve nothing on an association we requested.
            rsp = dimse.generic_failure_rsp(message, 0x0211)
            if rsp is not None:
                self.send_message(rsp, message.context_id)
            return
        if self._pending is None or cs.get("MessageIDBeingRespondedTo") != self._pending[0]:
            raise dimse.DimseError("response to a request we did not send")
        msg_id, d, responses, multiple = self._pending
        status = cs.get("Status", 0xFFFF)
        responses.append(message)
        if multiple and status in (dimse.PENDING, dimse.PENDING_WARNING):
            self._set_timer(self.dimse_timeout, "DIMSE response")
            return
        self._pending = None
        self._cancel_timer()
        d.callback(responses)

    def release(self) -> Deferred[None]:
        """A-RELEASE; fires when the connection is closed (an ARTIM timeout aborts)."""
        if self.state == "established" and self._pending is None:
            self.state = "releasing"
            self._write_pdu(pdu.release_rq())
            self._set_timer(self.acse_timeout, "release")
        elif self.state in ("awaiting-ac", "established"):
            self.abort("released while busy")
        d: Deferred[None] = Deferred()
        if self.state == "closed":
            d.callback(None)
        else:
            def fire(result: object) -> object:
                d.callback(None)
                return result

            self.closed.addBoth(fire)
        return d

    def _fail(self, error: AssociationError) -> None:
        super()._fail(error)
        if self.state in ("closing", "closed") or isinstance(error, (AssociationAborted,
                                                                       AssociationTimeout,
                                                                       AssociationRejected)):
            self._fail_waiters()

    def _fail_waiters(self) -> None:
        error = self.failure or ConnectionClosed("connection closed")
        if not self.established.called:
            self.established.errback(Failure(error))
        if self._pending is not None:
            _, d, _, _ = self._pending
            self._pending = None
            d.errback(Failure(error))

    def _lost(self) -> None:
        self._fail_waiters()



# -- acceptor (SCP side) --------------------------------------------------------------------


class HandlerResult:
    """
    What a service handler returns: the response messages to send (final one last), and
    optional callbacks told whether they reached the transport (C{sent}) or the association
    was gone first (C{unsent}) - so a C-STORE can drop an instance it never acknowledged.
    """

    def __init__(self, responses: list, *, sent: Callable[[], None] | None = None,
                 unsent: Callable[[], None] | None = None) -> None:
        self.responses = responses
        self.sent = sent
        self.unsent = unsent


class AcceptorPolicy:
    """
    Who may associate and what we accept: our AE title, the calling AE titles we know
    (None = anyone), the presentation contexts we support and the handlers per DIMSE command.
    """

    def __init__(
        self,
        *,
        ae_title: str,
        contexts: list[PresentationContext],
        handlers: Mapping[int, Callable[..., Any]],
        allowed_calling: Iterable[str] | None = None,
        check_called: bool = True,
    ) -> None:
        self.ae_title = ae_title.strip()
        self.contexts = contexts
        self.handlers = dict(handlers)
        self.allowed_calling = (
            None if allowed_calling is None else {a.strip() for a in allowed_calling}
        )
        self.check_called = check_called
        #: what we answered to requests seen before (the contexts above are fixed)
        self.answers = pdu.AssociateAnswers()

    def check(self, calling: str, called: str) -> tuple[int, int, int] | None:
        """(result, source, reason) to reject with, or None to go on."""
        if self.check_called and called.strip() != self.ae_title:
            return (pdu.RESULT_PERMANENT, pdu.SOURCE_USER, pdu.DIAG_CALLED_AE_NOT_RECOGNISED)
        if self.allowed_calling is not None and calling.strip() not in self.allowed_calling:
            return (pdu.RESULT_PERMANENT, pdu.SOURCE_USER, pdu.DIAG_CALLING_AE_NOT_RECOGNISED)
        return None


class AssociationAcceptor(_AssociationBase):
    """
    Answers one association: checks AE titles, negotiates contexts, then hands each DIMSE
    request to the policy's handler for its command field and sends what the handler returns,
    one request at a time (no asynchronous operations window).
    """

    role = "SCP"

    def __init__(
        self,
        clock: Any,
        policy: AcceptorPolicy,
        *,
        network_timeout: float | None = 60.0,
        find_batch: int = 64,
        **kw: Any,
    ) -> None:
        super().__init__(clock, **kw)
        self.policy = policy
        self.decoder.answers = policy.answers
        self.network_timeout = network_timeout
        self.find_batch = find_batch
        self._queue: deque = deque()
        self._busy = False
        self._cancel_ids: set[int] = set()
        self._release_requested = False
        self.factory: DicomServerFactory | None = None
        self.requests_handled = 0

    def connectionMade(self) -> None:
        super().connectionMade()
        self.state = "awaiting-rq"
        self._set_timer(self.acse_timeout, "association request")
        if self.factory is not None and not self.factory.admit(self):
            self.state = "rejecting"

    def _on_A_ASSOCIATE_RQ(self, p) -> None:
        if self.state == "rejecting":
            self._reject(pdu.RESULT_TRANSIENT, pdu.SOURCE_PRESENTATION,
                         pdu.DIAG_LOCAL_LIMIT_EXCEEDED)
            return
        if self.state != "awaiting-rq":
            raise pdu.PDUError("unexpected A-ASSOCIATE-RQ", pdu.REASON_UNEXPECTED_PDU)
        if isinstance(p, pdu.KnownRequest) and p.answer[0] == self.max_pdu:
            self._accept_known(p)
            return
        primitive = p.to_primitive()
        self.calling_ae = primitive.calling_ae_title
        self.called_ae = primitive.called_ae_title
        if not p.protocol_version & 0x01:
            self._reject(pdu.RESULT_PERMANENT, pdu.SOURCE_ACSE,
                         pdu.DIAG_PROTOCOL_VERSION_NOT_SUPPORTED)
            return
        if primitive.application_context_name != pdu.APPLICATION_CONTEXT_NAME:
            self._reject(pdu.RESULT_PERMANENT, pdu.SOURCE_USER,
                         pdu.DIAG_APP_CONTEXT_NOT_SUPPORTED)
            return
        rejection = self.policy.check(self.calling_ae, self.called_ae)
        if rejection:
            self._reject(*rejection)
            return
        roles = {}
        for item in primitive.user_information:
            if item.__class__.__name__ == "SCP_SCU_RoleSelectionNegotiation":
                roles[item.sop_class_uid] = (item.scu_role, item.scp_role)
        results, role_items = negotiate_as_acceptor(
            primitive.presentation_context_definition_list, self.policy.contexts, roles
        )
        # A negotiated context carries the id it was proposed with (never None here).
        self.accepted = {cx.context_id: cx for cx in results
                         if cx.result == 0 and cx.context_id is not None}
        self.rejected = [cx for cx in results if cx.result != 0]
        self.peer_max_pdu = primitive.maximum_length_received or 0
        ac = pdu.associate_ac(primitive, results, self.max_pdu, role_items).encode()
        raw = getattr(p, "medagent_raw", None)
        if (raw is not None and pdu.ae_titles(raw) == (self.calling_ae, self.called_ae)
                and ac[10:42] == raw[10:42]):
            self.policy.answers.remember(raw, (self.max_pdu, self.accepted, self.rejected,
                                               self.peer_max_pdu, ac, len(results)))
        self._write_raw(ac)
        self._established(len(results))

    def _accept_known(self, p: "pdu.KnownRequest") -> None:
        """A request answered before (L{pdu.AssociateAnswers}): only the AE titles differ."""
        self.calling_ae, self.called_ae = p.calling_ae, p.called_ae
        rejection = self.policy.check(self.calling_ae, self.called_ae)
        if rejection:
            self._reject(*rejection)
            return
        _, accepted, rejected, peer_max_pdu, ac, proposed = p.answer
        self.accepted = dict(accepted)
        self.rejected = list(rejected)
        self.peer_max_pdu = peer_max_pdu
        # the answer echoes the request's AE title fields (PS3.8 9.3.3)
        self._write_raw(ac[:10] + p.raw[10:42] + ac[42:])
        self._established(proposed)

    def _write_raw(self, data: bytes) -> None:
        transport = maybe_transport(self)
        if transport is not None and self.state != "closed":
            transport.write(data)

    def _established(self, proposed: int) -> None:
        results_count = proposed
        self.decoder.max_length = self.max_pdu
        self.state = "established"
        self._set_timer(self.network_timeout, "network")
        log.info("DICOM SCP {peer}: association {calling}->{called} accepted with "
                 "{n} of {m} contexts", peer=self.peer, calling=self.calling_ae,
                 called=self.called_ae, n=len(self.accepted), m=results_count)

    def _reject(self, result: int, source: int, reason: int) -> None:
        log.info("DICOM SCP {peer}: rejecting association {calling}->{called}: {why}",
                 peer=self.peer, calling=self.calling_ae, called=self.called_ae,
                 why=pdu.describe_rejection(result, source, reason))
        self._write_pdu(pdu.associate_rj(result, source, reason))
        self._fail(AssociationRejected(result, source, reason))
        self._drop()

    def _on_A_RELEASE_RQ(self, p) -> None:
        if self.state != "established":
            raise pdu.PDUError("unexpected A-RELEASE-RQ", pdu.REASON_UNEXPECTED_PDU)
        if self.assembler.in_progress:
            raise pdu.PDUError("A-RELEASE-RQ in the middle of a message",
                               pdu.REASON_UNEXPECTED_PDU)
        self._release_requested = True
        self._maybe_release()

    def _maybe_release(self) -> None:
        if self._release_requested and not self._busy and not self._queue:
            self.state = "releasing"
            self._write_pdu(pdu.release_rp())
            self._drop()

    def dataReceived(self, data: bytes) -> None:
        if self.state == "established":
            self._set_timer(self.network_timeout, "network")
        super().dataReceived(data)

    def _message_received(self, message) -> None:
        cs = message.command_set
        if cs.CommandField == 0x0FFF:  # C-CANCEL: applies to the request in progress
            self._cancel_ids.add(cs.MessageIDBeingRespondedTo)
            return
        if cs.CommandField & 0x8000:
            raise dimse.DimseError("unexpected DIMSE response on an SCP association")
        self._queue.append(message)
        self._pump()

    def _pump(self) -> None:
        while not self._busy and self._queue and self.state == "established":
            message = self._queue.popleft()
            self._busy = True
            self.requests_handled += 1
            cx = self.accepted[message.context_id]
            handler = self.policy.handlers.get(message.command_set.CommandField)
            if handler is None:
                d = maybeDeferred(lambda: dimse.generic_failure_rsp(message, 0x0211))
            else:
                d = maybeDeferred(handler, self, message, cx)
            d.addCallbacks(self._handled, self._handler_failed, callbackArgs=(message,),
                           errbackArgs=(message,))
        self._maybe_release()

    def _handler_failed(self, f: Failure, message) -> None:
        log.failure("DICOM SCP {peer}: handler for {command} failed", f, peer=self.peer,
                    command=dimse.command_name(message))
        code = {0x0001: 0xC211, 0x0020: 0xC311}.get(message.command_set.CommandField, 0x0110)
        self._handled(dimse.generic_failure_rsp(message, code), message)

    def _handled(self, result, message) -> None:
        if not isinstance(result, HandlerResult):
            result = HandlerResult([] if result is None else
                                   (result if isinstance(result, list) else [result]))
        if self.state != "established":
            self._busy = False
            if result.unsent:
                result.unsent()
            return
        pending = [r for r in result.responses
                   if dimse.field(r, "Status") in (dimse.PENDING, dimse.PENDING_WARNING)]
        if pending:
            self._stream(message, pending, result)
            return
        for response in result.responses:
            self.send_message(response, message.context_id)
        self._done(message, result)

    def _stream(self, message, responses: list, result: HandlerResult) -> None:
        """Send pending C-FIND responses in batches, giving C-CANCEL a chance in between."""
        if self._find_stopped(message, result):
            return
        batch, rest = responses[: self.find_batch], responses[self.find_batch:]
        for response in batch:
            self.send_message(response, message.context_id)
        if rest:
            self.clock.callLater(0, self._stream, message, rest, result)
            return
        finals = [r for r in result.responses
                  if dimse.field(r, "Status") not in (dimse.PENDING, dimse.PENDING_WARNING)]

        def final() -> None:
            if self._find_stopped(message, result):
                return
            for r in finals:
                self.send_message(r, message.context_id)
            self._done(message, result)

        self.clock.callLater(0, final)

    def _find_stopped(self, message, result: HandlerResult) -> bool:
        """
        Between batches: the association went away (the rest is unsent), or the peer sent
        C-CANCEL (answered with a Cancel status, and the find is done).
        """
        if self.state != "established":
            self._busy = False
            if result.unsent:
                result.unsent()
            return True
        msg_id = message.command_set.MessageID
        if msg_id in self._cancel_ids:
            self._cancel_ids.discard(msg_id)
            self.send_message(dimse.c_find_rsp(message, dimse.CANCEL), message.context_id)
            self._done(message, HandlerResult([], sent=result.sent))
            return True
        return False

    def _done(self, message, result: HandlerResult) -> None:
        self._busy = False
        self._cancel_ids.discard(message.command_set.MessageID)
        if result.sent:
            result.sent()
        self._pump()

    def _lost(self) -> None:
        self._queue.clear()
        if self.factory is not None:
            self.factory.gone(self)


class DicomServerFactory(ServerFactory):
    noisy = False

    """
    Builds an L{AssociationAcceptor} per connection with one policy and one set of timeouts;
    keeps the live ones (to abort them on stop) and bounds how many there are.
    """

    def __init__(
        self,
        clock: Any,
        policy: AcceptorPolicy,
        *,
        max_associations: int = 16,
        **protocol_kw: Any,
    ) -> None:
        self.clock = clock
        self.policy = policy
        self.max_associations = max_associations
        self.protocol_kw = protocol_kw
        self.live: set[AssociationAcceptor] = set()

    # Twisted types Factory.buildProtocol's result as a protocol whose ``factory`` is always a
    # Factory; ours is None until this method sets it (the base Protocol types it as Any).
    def buildProtocol(self, addr: Any) -> AssociationAcceptor:  # type: ignore[override]
        p = AssociationAcceptor(self.clock, self.policy, **self.protocol_kw)
        p.factory = self
        return p

    def admit(self, p: AssociationAcceptor) -> bool:
        if len(self.live) >= self.max_associations:
            return False
        self.live.add(p)
        return True

    def gone(self, p: AssociationAcceptor) -> None:
        self.live.discard(p)

    def abort_all(self) -> None:
        for p in list(self.live):
            p.abort("server stopping")
