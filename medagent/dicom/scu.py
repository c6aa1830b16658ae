"""
C-STORE / C-ECHO SCU for ``dicom://CALLED_AE@host:port?calling=OUR_AE`` destinations: the
agent's L{medagent.delivery.Sender} for DICOM.

Associations are L{AssociationRequestor} protocols on the agent's reactor.  One kept open
after a send is reused for the next instance to the same peer (same host, port and AE titles)
when it has a fitting presentation context, and released after C{idle_timeout} seconds idle.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Mapping

from pydicom.uid import ImplicitVRLittleEndian
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    fail,
    inlineCallbacks,
    succeed,
)
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.error import ConnectError, ConnectionLost, DNSLookupError
from twisted.internet.error import TimeoutError as TxTimeoutError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from medagent.contenttypes import JSON
from medagent.delivery import DeliveryError, Reply
from medagent.destination import Destination, DestinationError
from medagent.dicom import dimse, pdu
from medagent.dicom.association import (
    AssociationAborted,
    AssociationError,
    AssociationRequestor,
    ConnectionClosed,
)
from medagent.dicom.instance import Instance, InstanceError, from_body

log = Logger()

#: Bodies above this size are decoded / converted in the sender's thread pool.
INLINE_LIMIT = 256 * 1024
AE_CHARS = set(" !\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[]^_`"
               "abcdefghijklmnopqrstuvwxyz{|}~")


def check_ae_title(value: str | None, what: str) -> str:
    """AE titles: 1-16 characters of the default repertoire, no backslash or controls."""
    title = (value or "").strip()
    if not title or len(title) > 16 or not set(title) <= AE_CHARS:
        raise DeliveryError(f"invalid {what} AE title {value!r} (1-16 printable ASCII "
                            "characters, no backslash)", transient=False, phase="destination")
    return title


def _delivery_error(error: Any, phase: str) -> DeliveryError:
    if isinstance(error, DeliveryError):
        return error
    if isinstance(error, AssociationError):
        return DeliveryError(f"DICOM {error.reason}", transient=error.transient,
                             phase=error.phase or phase)
    if isinstance(error, (ConnectError, DNSLookupError, TxTimeoutError, ConnectionLost)):
        return DeliveryError(f"DICOM connect failed: {error}", transient=True, phase="connect")
    if isinstance(error, InstanceError):
        return DeliveryError(str(error), transient=False, phase="decode")
    if isinstance(error, CancelledError):
        return DeliveryError("DICOM sender closed", transient=True, phase=phase)
    return DeliveryError(f"DICOM {phase} failed: {error.__class__.__name__}: {error}",
                         transient=True, phase=phase)


def _result_name(result: int | None) -> str:
    """The A-ASSOCIATE-AC name of a presentation context result, for errors."""
    if result is None:
        return "None"
    return pdu.CONTEXT_RESULTS.get(result, str(result))


class _Peer:
    def __init__(self, destination: Destination, default_calling: str) -> None:
        if destination.port is None:
            raise DeliveryError("dicom:// destination needs a port", transient=False,
                                phase="destination")
        self.host = destination.host
        self.port = destination.port
        self.called = check_ae_title(destination.user, "called (user part of the URL)")
        self.calling = check_ae_title(destination.param("calling") or default_calling,
                                      "calling")
        self.key = (self.host, self.port, self.called, self.calling)

    def __str__(self) -> str:
        return f"{self.called}@{self.host}:{self.port}"


class DICOMSender:
    """
    Sends instances with C-STORE and pings with C-ECHO.  The reply body is JSON:
    ``{"status": "0x0000", "meaning": ..., "category": ..., "sopInstanceUID": ...}``.
    Warning statuses (0xB000, 0xB006, 0xB007...) are delivered with the warning in
    C{detail}; failure statuses are C{delivered=False}, except "out of resources"
    (0xA7xx): a transient L{DeliveryError} carrying that reply, so the queue tries again,
    C{refused_attempts} times in all, and then ends the push with the reply.
    """

    schemes = ("dicom",)

    def __init__(
        self,
        reactor: Any,
        *,
        ae_title: str = "MEDAGENT",
        connect_timeout: float = 10,
        acse_timeout: float = 30,
        dimse_timeout: float = 60,
        idle_timeout: float = 30,
        max_pdu: int = pdu.DEFAULT_MAX_PDU,
        refused_attempts: int = 4,
        endpoint_factory: Callable[[Any, str, int, float], Any] | None = None,
        run_blocking: Callable[..., Deferred] | None = None,
    ) -> None:
        self._reactor = reactor
        self.ae_title = check_ae_title(ae_title, "calling")
        self.connect_timeout = connect_timeout
        self.acse_timeout = acse_timeout
        self.dimse_timeout = dimse_timeout
        self.idle_timeout = idle_timeout
        self.max_pdu = max_pdu
        if not 1 <= refused_attempts <= 100:
            raise ValueError("refused_attempts must be 1..100")
        self.refused_attempts = refused_attempts
        self._endpoint_factory = endpoint_factory or (
            lambda reactor, host, port, timeout: HostnameEndpoint(reactor, host, port,
                                                                  timeout=timeout))
        self._run_blocking_override = run_blocking
        self._pool: ThreadPool | None = None
        self._idle: dict[tuple, list[AssociationRequestor]] = {}
        self._idle_timers: dict[AssociationRequestor, Any] = {}
        self._live: set[AssociationRequestor] = set()
        self._connecting: set[Deferred] = set()
        self._closed = False
        self.associations_opened = 0
        #: C-STORE responses received, by status category ("Success", "Warning", "Failure").
        self.stores: dict[str, int] = {}

    # -- Sender API ------------------------------------------------------------------------

    def send(self, destination: Destination, content_type: str, body: str,
             options: Mapping[str, Any] | None = None) -> Deferred[Reply]:
        d = self._send(destination, content_type, body)
        return d

    def ping(self, destination: Destination) -> Deferred[Reply]:
        return self._ping(destination)

    def close(self) -> Deferred[None]:
        self._closed = True
        for d in list(self._connecting):
            d.cancel()
        waits = []
        for assoc in list(self._live):
            timer = self._idle_timers.pop(assoc, None)
            if timer is not None and timer.active():
                timer.cancel()
            if assoc.usable:
                waits.append(assoc.release())
            else:
                assoc.abort("sender closing")
                waits.append(assoc.closed)
        self._idle.clear()
        d = DeferredList(waits, consumeErrors=True) if waits else succeed(None)

        def stop_pool(_: Any) -> None:
            if self._pool is not None:
                self._pool.stop()
                self._pool = None

        return d.addBoth(stop_pool)

    # -- blocking work ---------------------------------------------------------------------

    def _blocking(self, size: int, fn: Callable, *args: Any) -> Deferred:
        from twisted.internet.defer import maybeDeferred

        if self._run_blocking_override is not None:
            return self._run_blocking_override(fn, *args)
        if size <= INLINE_LIMIT:
            return maybeDeferred(fn, *args)
        from twisted.internet.threads import deferToThreadPool

        if self._pool is None:
            self._pool = ThreadPool(minthreads=0, maxthreads=2, name="medagent-dicom-scu")
            self._pool.start()
        return deferToThreadPool(self._reactor, self._pool, fn, *args)

    # -- associations ----------------------------------------------------------------------

    def _connect(self, peer: _Peer, contexts: list[tuple[str, list[str]]]) -> Deferred:
        if self._closed:
            return fail(DeliveryError("DICOM sender is closed", phase="connect"))
        proto = AssociationRequestor(
            self._reactor, calling_ae=peer.calling, called_ae=peer.called, contexts=contexts,
            max_pdu=self.max_pdu, acse_timeout=self.acse_timeout,
            dimse_timeout=self.dimse_timeout)
        endpoint = self._endpoint_factory(self._reactor, peer.host, peer.port,
                                          self.connect_timeout)
        connecting = connectProtocol(endpoint, proto)
        self._connecting.add(connecting)

        def connected(_: Any) -> Deferred:
            self._connecting.discard(connecting)
            self._live.add(proto)
            self.associations_opened += 1
            proto.closed.addBoth(lambda _: self._forget(peer.key, proto))
            return proto.established

        def not_connected(f: Failure) -> Failure:
            self._connecting.discard(connecting)
            return f

        connecting.addCallbacks(connected, not_connected)
        return connecting

    def _forget(self, key: tuple, proto: AssociationRequestor) -> None:
        self._live.discard(proto)
        self._unidle(key, proto)

    def _unidle(self, key: tuple, proto: AssociationRequestor) -> None:
        idle = self._idle.get(key)
        if idle and proto in idle:
            idle.remove(proto)
            if not idle:
                del self._idle[key]
        timer = self._idle_timers.pop(proto, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _take_idle(self, peer: _Peer, fits: Callable[[AssociationRequestor], bool]) -> (
            AssociationRequestor | None):
        idle = self._idle.get(peer.key, [])
        for assoc in list(idle):
            if assoc.usable and fits(assoc):
                idle.remove(assoc)
                timer = self._idle_timers.pop(assoc, None)
                if timer is not None and timer.active():
                    timer.cancel()
                return assoc
        # What is idle here cannot carry this instance: let it go rather than pile up.
        for assoc in list(idle):
            self._unidle(peer.key, assoc)
            assoc.release()
        return None

    def _park(self, peer: _Peer, assoc: AssociationRequestor) -> None:
        if not assoc.usable:
            return
        if self._closed or not self.idle_timeout:
            assoc.release()
            return
        self._idle.setdefault(peer.key, []).append(assoc)
        self._idle_timers[assoc] = self._reactor.callLater(
            self.idle_timeout, self._idle_expired, peer.key, assoc)

    def _idle_expired(self, key: tuple, assoc: AssociationRequestor) -> None:
        self._idle_timers.pop(assoc, None)
        self._unidle(key, assoc)
        log.debug("DICOM SCU {peer}: releasing idle association", peer=assoc.peer)
        assoc.release()

    # -- C-STORE ---------------------------------------------------------------------------

    @inlineCallbacks
    def _send(self, destination: Destination, content_type: str, body: str):
        try:
            peer = _Peer(destination, self.ae_title)
        except DestinationError as e:
            raise DeliveryError(str(e), transient=False, phase="destination")
        try:
            instance: Instance = yield self._blocking(len(body), from_body, content_type, body)
        except InstanceError as e:
            raise DeliveryError(str(e), transient=False, phase="decode")
        offered = instance.offered_syntaxes()
        started = time.monotonic()
        for attempt in (1, 2):
            assoc = self._take_idle(peer, lambda a: self._context(a, instance) is not None)
            reused = assoc is not None
            if assoc is None:
                contexts = [(instance.sop_class, syntaxes) for syntaxes in offered]
                try:
                    assoc = yield self._connect(peer, contexts)
                except Exception as e:
                    raise _delivery_error(e, "association")
            cx = self._context(assoc, instance)
            if cx is None:
                why = ", ".join(sorted({_result_name(c.result)
                                        for c in assoc.rejected})) or "not accepted"
                self._park(peer, assoc)
                if instance.not_convertible:
                    why += f"; not converted: {instance.not_convertible}"
                raise DeliveryError(
                    f"DICOM peer {peer} accepts no presentation context for SOP class "
                    f"{instance.sop_class} in transfer syntax {instance.transfer_syntax} "
                    f"({why})", transient=False, phase="association")
            syntax = str(cx.transfer_syntax[0])
            try:
                data = yield self._blocking(instance.size, instance.encoded_as, syntax)
            except Exception as e:
                self._park(peer, assoc)
                raise DeliveryError(f"cannot encode the instance for {syntax}: {e}",
                                    transient=False, phase="encode")
            message = dimse.c_store_rq(assoc.next_message_id(), instance.sop_class,
                                       instance.sop_instance, data)
            del data
            try:
                responses = yield assoc.request(message, cx.context_id)
            except (ConnectionClosed, AssociationAborted) as e:
                if reused and attempt == 1:
                    # A pooled association the peer had dropped: once more on a fresh one.
                    log.info("DICOM SCU {peer}: reused association failed ({why}); "
                             "retrying on a new one", peer=str(peer), why=str(e))
                    continue
                raise _delivery_error(e, "send")
            except Exception as e:
                raise _delivery_error(e, "send")
            self._park(peer, assoc)
            return self._store_reply(peer, instance, syntax, responses[-1], started)
        raise DeliveryError("DICOM send failed", phase="send")  # not reached

    @staticmethod
    def _context(assoc: AssociationRequestor, instance: Instance):
        cx = assoc.find_context(instance.sop_class, [instance.transfer_syntax])
        if cx is not None:
            return cx
        if instance.convertible:
            return assoc.find_context(instance.sop_class, [ts for ts in dimse.NATIVE_SYNTAXES
                                                           if ts != instance.transfer_syntax])
        return None

    def _store_reply(self, peer: _Peer, instance: Instance, syntax: str, response,
                     started: float) -> Reply:
        cs = response.command_set
        status = int(cs.get("Status", 0xFFFF))
        category, meaning = dimse.status_meaning(status, "storage")
        body = {
            "status": f"0x{status:04X}",
            "meaning": meaning,
            "category": category,
            "sopClassUID": instance.sop_class,
            "sopInstanceUID": instance.sop_instance,
            "transferSyntaxUID": syntax,
            "calledAeTitle": peer.called,
            "elapsedMs": round((time.monotonic() - started) * 1000, 1),
        }
        comment = cs.get("ErrorComment")
        if comment:
            body["errorComment"] = str(comment)
        offending = cs.get("OffendingElement")
        if offending:
            body["offendingElement"] = [f"{int(t):08X}" for t in (
                offending if isinstance(offending, (list, tuple)) or hasattr(
                    offending, "__iter__") else [offending])]
        # Counted, not logged: no line per instance on the hot path (twistd writes debug
        # lines too); a refusal is in the reply the queue records.
        self.stores[category] = self.stores.get(category, 0) + 1
        text = json.dumps(body)
        if category == "Success":
            return Reply(body=text, content_type=JSON, delivered=True)
        if category == "Warning":
            return Reply(body=text, content_type=JSON, delivered=True,
                         detail=f"C-STORE warning 0x{status:04X}: {meaning}")
        refused = Reply(body=text, content_type=JSON, delivered=False,
                        detail=f"C-STORE failed 0x{status:04X}: {meaning}")
        if 0xA700 <= status <= 0xA7FF and self.refused_attempts > 1:
            # Out of resources: the peer stored nothing, so another attempt is safe (and a
            # duplicate SOP Instance UID is idempotent at a PACS).  Bounded: Orthanc also
            # answers 0xA700 for an instance it will never take (required tags missing).
            raise DeliveryError(
                f"DICOM C-STORE refused by {peer}: 0x{status:04X} {meaning} (nothing stored; "
                f"tried up to {self.refused_attempts} times, then failed with this status)",
                transient=True, phase="store", reply=refused,
                max_attempts=self.refused_attempts)
        return refused

    # -- C-ECHO ----------------------------------------------------------------------------

    @inlineCallbacks
    def _ping(self, destination: Destination):
        try:
            peer = _Peer(destination, self.ae_title)
        except DestinationError as e:
            raise DeliveryError(str(e), transient=False, phase="destination")
        started = time.monotonic()
        try:
            assoc = yield self._connect(peer, [(dimse.VERIFICATION, [ImplicitVRLittleEndian])])
        except Exception as e:
            raise _delivery_error(e, "association")
        try:
            cx = assoc.find_context(dimse.VERIFICATION)
            if cx is None:
                assoc.release()
                raise DeliveryError(f"DICOM peer {peer} does not accept Verification "
                                    "(C-ECHO)", transient=False, phase="association")
            responses = yield assoc.request(dimse.c_echo_rq(assoc.next_message_id()),
                                            cx.context_id)
        except DeliveryError:
            raise
        except Exception as e:
            raise _delivery_error(e, "echo")
        yield assoc.release()
        status = int(responses[-1].command_set.get("Status", 0xFFFF))
        category, meaning = dimse.status_meaning(status, "verification")
        rtt = (time.monotonic() - started) * 1000
        body = json.dumps({"status": f"0x{status:04X}", "meaning": meaning,
                           "category": category, "calledAeTitle": peer.called,
                           "elapsedMs": round(rtt, 1)})
        return Reply(body=body, content_type=JSON, delivered=(category == "Success"),
                     detail=f"{rtt:.3f}")

