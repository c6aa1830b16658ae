"""
Modality Worklist on the agent: items pushed from the cloud are kept in SQLite (they survive
restarts) and served to modalities by a C-FIND SCP (Modality Worklist Information Model -
FIND); MPPS N-CREATE / N-SET on the same channel update the item and go up to the relay.

- L{WorklistChannel}: the SCP (C-ECHO, MWL C-FIND, MPPS N-CREATE/N-SET) and its store.
- L{WorklistSender}: the dispatch L{Sender} for ``worklist://<channel-name>`` pushes.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Iterable, Mapping

from pydicom.dataset import Dataset
from twisted.internet.defer import Deferred, fail, inlineCallbacks, maybeDeferred, succeed
from twisted.logger import Logger

from medagent.contenttypes import JSON
from medagent.delivery import DeliveryError, Reply
from medagent.destination import Destination
from medagent.dicom import dimse, mapping, matching, pdu
from medagent.dicom.association import AcceptorPolicy, DicomServerFactory
from medagent.dicom.instance import valid_uid
from medagent.dicom.scp import Forward, _ListeningService, echo_handler, supported_contexts
from medagent.storage.sqlite.database import Database
from medagent.storage.sqlite.worklist import SCHEMA, SQLiteWorklistStore

log = Logger()

DONE_STATUSES = {"COMPLETED", "DISCONTINUED"}
MPPS_TO_SPS = {"IN PROGRESS": "STARTED", "COMPLETED": "COMPLETED",
               "DISCONTINUED": "DISCONTINUED"}
WORKLIST_SYNTAXES = [dimse.ExplicitVRLittleEndian, dimse.ImplicitVRLittleEndian]


def _to_json(ds: Dataset) -> str:
    return json.dumps(ds.to_json_dict(bulk_data_threshold=1 << 30))


def _from_json(text: str) -> Dataset:
    return Dataset.from_json(text)


class WorklistChannel(_ListeningService):
    """
    Worklist and MPPS SCP named C{name}.  Items live in C{db_path} (SQLite, table
    ``dicom_worklist``) and in memory for matching.  Completed/discontinued items are not
    returned unless a query asks for that Scheduled Procedure Step Status.
    """

    kind = "worklist SCP"

    def __init__(
        self,
        forward: Forward,
        *,
        reactor: Any,
        name: str,
        ae_title: str,
        db_path: str,
        endpoint: str | None = None,
        allowed_calling: Iterable[str] | None = None,
        max_pdu: int = pdu.DEFAULT_MAX_PDU,
        acse_timeout: float = 30,
        network_timeout: float = 60,
        max_associations: int = 16,
        max_answers: int = 1000,
        database: Database | None = None,
    ) -> None:
        super().__init__()
        self._forward = forward
        self._reactor = reactor
        channel = name.lower()
        # Twisted's Service says ``name = None``, which mypy takes as the type None.
        self.name = channel  # type: ignore[assignment]
        self.ae_title = ae_title.strip()
        self.endpoint = endpoint
        self.max_answers = max_answers
        self.db = database or Database(reactor, db_path, schema=SCHEMA,
                                       name=f"medagent-worklist-{self.name}")
        self._own_db = database is None
        #: the rows (the SQL is in L{medagent.storage.sqlite.worklist})
        self.rows = SQLiteWorklistStore(self.db, channel)
        self.items: dict[tuple[str, str], Dataset] = {}
        self.mpps: dict[str, tuple[str, Dataset]] = {}
        self.loaded: Deferred | None = None
        contexts = supported_contexts(
            [dimse.MODALITY_WORKLIST_FIND, dimse.MPPS, dimse.VERIFICATION], WORKLIST_SYNTAXES)
        self.policy = AcceptorPolicy(
            ae_title=self.ae_title, contexts=contexts, allowed_calling=allowed_calling,
            handlers={0x0030: echo_handler, 0x0020: self._c_find, 0x0140: self._n_create,
                      0x0120: self._n_set})
        self._factory = DicomServerFactory(
            reactor, self.policy, max_associations=max_associations, max_pdu=max_pdu,
            acse_timeout=acse_timeout, network_timeout=network_timeout,
            max_message_bytes=16 * 1024 * 1024)

    # -- lifecycle -------------------------------------------------------------------------

    def load(self) -> Deferred:
        """Read the items and MPPS instances of this channel into memory (once)."""
        if self.loaded is not None:
            return self.loaded

        def fill(rows: tuple[list, list]) -> None:
            for accession, sps_id, text in rows[0]:
                self.items[(accession, sps_id)] = _from_json(text)
            for uid, status, text in rows[1]:
                self.mpps[uid] = (status, _from_json(text))
            log.info("DICOM worklist {name}: {n} items loaded", name=self.name,
                     n=len(self.items))

        self.loaded = self.rows.load().addCallback(fill)
        return self.loaded

    def startService(self) -> Deferred:
        service_started = super().startService()
        d = self.load()
        if service_started is not None:
            d.addCallback(lambda _: service_started)
        return d

    def stopService(self) -> Deferred:
        d = super().stopService()
        if self._own_db:
            def stop_db(result: object) -> object:
                self.db.stop()
                return result

            d.addBoth(stop_db)
        return d

    # -- items (the WorklistSender's side) -------------------------------------------------

    def put(self, ds: Dataset) -> Deferred[dict]:
        """Add or replace an item (keyed by Accession Number + SPS ID)."""
        accession, sps_id = mapping.item_keys(ds)
        if not accession and not sps_id:
            return fail(DeliveryError("a worklist item needs an Accession Number or a "
                                      "Scheduled Procedure Step ID", transient=False,
                                      phase="decode"))
        if not ds.get("ScheduledProcedureStepSequence"):
            return fail(DeliveryError("a worklist item needs a Scheduled Procedure Step "
                                      "Sequence (0040,0100)", transient=False,
                                      phase="decode"))
        if not mapping.sps_status(ds):
            mapping.set_sps_status(ds, "SCHEDULED")
        if not ds.get("StudyInstanceUID"):
            from pydicom.uid import generate_uid

            ds.StudyInstanceUID = generate_uid(entropy_srcs=["medagent-mwl",
                                                             str(ds.get("PatientID", "")),
                                                             accession, sps_id])
        text = _to_json(ds)
        status = mapping.sps_status(ds)

        def stored(existed: bool) -> dict:
            self.items[(accession, sps_id)] = ds
            log.info("DICOM worklist {name}: item {action}", name=self.name,
                     action="updated" if existed else "created")
            return {"action": "updated" if existed else "created", "channel": self.name,
                    "accessionNumber": accession, "scheduledProcedureStepID": sps_id,
                    "studyInstanceUID": str(ds.StudyInstanceUID), "status": status,
                    "items": len(self.items)}

        return self.load().addCallback(
            lambda _: self.rows.put_item(accession, sps_id, status, text, time.time())
        ).addCallback(stored)

    def cancel(self, key: str) -> Deferred[dict]:
        """Remove the items whose Accession Number or SPS ID is C{key}."""

        def deleted(count: int) -> dict:
            for k in [k for k in self.items if key in k]:
                del self.items[k]
            log.info("DICOM worklist {name}: cancel removed {n} items", name=self.name,
                     n=count)
            return {"action": "cancelled", "channel": self.name, "key": key,
                    "removed": count, "items": len(self.items)}

        return self.load().addCallback(lambda _: self.rows.remove_items(key)).addCallback(
            deleted)

    def _set_status(self, keys: list[tuple[str, str]], status: str) -> Deferred:
        updates = []
        for key in keys:
            ds = self.items.get(key)
            if ds is None:
                continue
            mapping.set_sps_status(ds, status)
            updates.append((key[0], key[1], status, _to_json(ds), time.time()))
        return self.rows.set_items(updates) if updates else succeed(None)

    # -- C-FIND ----------------------------------------------------------------------------

    def find(self, query: Dataset) -> list[Dataset]:
        """The projected identifiers of the items matching C{query}."""
        wants_status = _asks_status(query)
        out = []
        for ds in self.items.values():
            if not wants_status and mapping.sps_status(ds) in DONE_STATUSES:
                continue
            if matching.matches(query, ds):
                out.append(matching.project(query, ds))
                if len(out) >= self.max_answers:
                    break
        return out

    def _c_find(self, assoc: Any, message, cx) -> Deferred:
        syntax = str(cx.transfer_syntax[0])
        try:
            query = dimse.decode_dataset(message.data_set.getvalue(), syntax)
            list(query)  # force parsing now, inside the try
        except Exception:
            return succeed(dimse.c_find_rsp(message, 0xA900, error_comment="bad identifier"))

        def answer(_: Any) -> list:
            try:
                found = self.find(query)
            except Exception:
                log.failure("DICOM worklist {name}: matching failed", name=self.name)
                return [dimse.c_find_rsp(message, 0xC000, error_comment="unable to process")]
            log.info("DICOM worklist {name}: C-FIND from {calling}: {n} matches",
                     name=self.name, calling=assoc.calling_ae, n=len(found))
            responses = [dimse.c_find_rsp(message, dimse.PENDING,
                                          dimse.encode_dataset(ds, syntax)) for ds in found]
            responses.append(dimse.c_find_rsp(message, dimse.SUCCESS))
            return responses

        return self.load().addCallback(answer)

    # -- MPPS ------------------------------------------------------------------------------

    def _linked_items(self, mpps: Dataset) -> list[tuple[str, str]]:
        keys = []
        for step in mpps.get("ScheduledStepAttributesSequence") or []:
            accession = str(step.get("AccessionNumber", "") or "").strip()
            sps_id = str(step.get("ScheduledProcedureStepID", "") or "").strip()
            for key in self.items:
                if (sps_id and key[1] == sps_id and (not accession or key[0] == accession)) or (
                        not sps_id and accession and key[0] == accession):
                    keys.append(key)
        return keys

    def _n_create(self, assoc: Any, message, cx) -> Deferred:
        uid = str(message.command_set.get("AffectedSOPInstanceUID") or "")
        if not valid_uid(uid):
            return succeed(dimse.n_create_rsp(message, 0x0106, None,
                                              error_comment="missing SOP Instance UID"))
        try:
            ds = dimse.decode_dataset(message.data_set.getvalue(), str(cx.transfer_syntax[0]))
            status = str(ds.get("PerformedProcedureStepStatus", "") or "").strip()
        except Exception:
            return succeed(dimse.n_create_rsp(message, 0x0106, uid,
                                              error_comment="bad attribute list"))
        return self.load().addCallback(lambda _: self._create(assoc, message, uid, ds, status))

    def _create(self, assoc: Any, message, uid: str, ds: Dataset, status: str) -> Any:
        if uid in self.mpps:
            return dimse.n_create_rsp(message, 0x0111, uid, error_comment="duplicate")
        if status != "IN PROGRESS":
            return dimse.n_create_rsp(message, 0x0106, uid,
                                      error_comment="status must be IN PROGRESS")
        self.mpps[uid] = (status, ds)
        return self._mpps_changed(assoc, "N-CREATE", uid, ds, status).addCallback(
            lambda _: dimse.n_create_rsp(message, dimse.SUCCESS, uid))

    def _n_set(self, assoc: Any, message, cx) -> Deferred:
        uid = str(message.command_set.get("RequestedSOPInstanceUID") or "")
        try:
            mods = dimse.decode_dataset(message.data_set.getvalue(), str(cx.transfer_syntax[0]))
            list(mods)
        except Exception:
            return succeed(dimse.n_set_rsp(message, 0x0106,
                                           error_comment="bad modification list"))
        return self.load().addCallback(lambda _: self._set(assoc, message, uid, mods))

    def _set(self, assoc: Any, message, uid: str, mods: Dataset) -> Any:
        if uid not in self.mpps:
            return dimse.n_set_rsp(message, 0x0112, error_comment="no such MPPS instance")
        current, ds = self.mpps[uid]
        if current in DONE_STATUSES:
            return dimse.n_set_rsp(message, 0x0110,
                                   error_comment="MPPS may no longer be updated")
        new_status = str(mods.get("PerformedProcedureStepStatus", current) or current).strip()
        if new_status not in MPPS_TO_SPS:
            return dimse.n_set_rsp(message, 0x0106, error_comment="unknown PPS status")
        for elem in mods:
            ds[elem.tag] = elem
        self.mpps[uid] = (new_status, ds)
        return self._mpps_changed(assoc, "N-SET", uid, ds, new_status).addCallback(
            lambda _: dimse.n_set_rsp(message, dimse.SUCCESS))

    def _mpps_changed(self, assoc: Any, event: str, uid: str, ds: Dataset,
                      status: str) -> Deferred:
        """Persist the MPPS, move linked items on, then tell the relay (not awaited)."""
        text = _to_json(ds)
        keys = self._linked_items(ds)

        d = self.rows.put_mpps(uid, status, text, time.time())
        d.addCallback(lambda _: self._set_status(keys, MPPS_TO_SPS[status]))

        def notify(_: Any) -> None:
            body = json.dumps({
                "event": event,
                "channel": self.name,
                "sopInstanceUID": uid,
                "status": status,
                "association": {"callingAeTitle": assoc.calling_ae.strip(),
                                "calledAeTitle": assoc.called_ae.strip()},
                "mpps": json.loads(text),
                "worklistItems": [{"accessionNumber": k[0], "scheduledProcedureStepID": k[1],
                                   "status": MPPS_TO_SPS[status]} for k in keys],
            })
            log.info("DICOM worklist {name}: MPPS {event} {status}, {n} linked items",
                     name=self.name, event=event, status=status, n=len(keys))
            fd = maybeDeferred(self._forward, JSON, body,
                               f"dicom://{assoc.calling_ae.strip()}@{assoc.peer}")
            fd.addErrback(lambda f: log.failure("DICOM worklist {name}: MPPS forward failed",
                                                f, name=self.name))

        return d.addCallback(notify)


def _asks_status(query: Dataset) -> bool:
    for step in query.get("ScheduledProcedureStepSequence") or []:
        if str(step.get("ScheduledProcedureStepStatus", "") or "").strip():
            return True
    return False



class WorklistSender:
    """
    ``worklist://<channel-name>?modality=CT&station=CT01`` pushes: a DICOM JSON worklist
    item, a FHIR ServiceRequest / Bundle (mapped, see docs/dicom.md), or a cancel
    (``{"cancel": "<accession or SPS id>"}``, or a ServiceRequest that is revoked or
    entered-in-error).  The reply is JSON: action, keys, item status.
    """

    schemes = ("worklist",)

    def __init__(self, channels: Mapping[str, WorklistChannel] | Callable[[str], Any]) -> None:
        if callable(channels):
            self._lookup = channels
        else:
            table = {k.lower(): v for k, v in channels.items()}
            self._lookup = table.get

    def _channel(self, destination: Destination) -> WorklistChannel:
        name = (destination.host or "").lower()
        channel = self._lookup(name)
        if channel is None:
            raise DeliveryError(f"no worklist channel named {name!r} on this agent",
                                transient=False, phase="destination")
        return channel

    def send(self, destination: Destination, content_type: str, body: str,
             options: Mapping[str, Any] | None = None) -> Deferred[Reply]:
        return self._send(destination, content_type, body)

    @inlineCallbacks
    def _send(self, destination: Destination, content_type: str, body: str):
        channel = self._channel(destination)
        ct = content_type.split(";")[0].strip().lower()
        try:
            obj = json.loads(body)
        except ValueError as e:
            raise DeliveryError(f"worklist push body is not JSON ({e})", transient=False,
                                phase="decode")
        if isinstance(obj, dict) and set(obj) == {"cancel"}:
            result = yield channel.cancel(str(obj["cancel"]))
            return _reply(result)
        if ct == "application/dicom+json":
            try:
                ds = Dataset.from_json(obj)
            except Exception as e:
                raise DeliveryError(f"invalid DICOM JSON worklist item ({e})", transient=False,
                                    phase="decode")
            result = yield channel.put(ds)
            return _reply(result)
        if ct == "application/fhir+json" or (isinstance(obj, dict) and "resourceType" in obj):
            try:
                requests, resources = mapping.parse_fhir(obj)
            except mapping.MappingError as e:
                raise DeliveryError(str(e), transient=False, phase="decode")
            results = []
            for request in requests:
                if request.get("status") in mapping.CANCEL_STATUSES:
                    try:
                        key = mapping.accession_of(request)
                    except mapping.MappingError as e:
                        raise DeliveryError(str(e), transient=False, phase="decode")
                    results.append((yield channel.cancel(key)))
                    continue
                try:
                    ds = mapping.service_request_to_item(
                        request, resources,
                        default_modality=(destination.param("modality") or "").upper(),
                        default_station_ae=destination.param("station") or "")
                except mapping.MappingError as e:
                    raise DeliveryError(str(e), transient=False, phase="decode")
                results.append((yield channel.put(ds)))
            return _reply(results[0] if len(results) == 1 else {"results": results})
        raise DeliveryError(f"content type {content_type} cannot go to a worklist (use "
                            "application/dicom+json or application/fhir+json)",
                            transient=False, phase="decode")

    def ping(self, destination: Destination) -> Deferred[Reply]:
        try:
            channel = self._channel(destination)
        except DeliveryError as e:
            return fail(e)
        return channel.load().addCallback(lambda _: Reply(
            body=json.dumps({"channel": channel.name, "items": len(channel.items)}),
            content_type=JSON))

    def close(self) -> Deferred[None]:
        return succeed(None)


def _reply(result: dict) -> Reply:
    return Reply(body=json.dumps(result), content_type=JSON, delivered=True)
