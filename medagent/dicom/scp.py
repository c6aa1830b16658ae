"""
Inbound DICOM: the storage channel, a C-STORE SCP (and C-ECHO) that keeps each instance on
the agent's disk and forwards its metadata to the relay.

Order of custody: a small instance is appended to the channel's write-ahead journal and
flushed (L{medagent.dicom.journal}) *before* the C-STORE response says success; once the
response is on its way it becomes its Part 10 file (and a ``.pending`` note holding the
forward body), fsynced, folder fsynced, and its journal record is retired; then the forward
to the relay starts.  A large instance (over C{journal_max_bytes}) skips the journal: its
file and note are written and fsynced - the file, then the folder for its name and the note -
before the success.  Instances arriving together share the flushes (L{GroupCommit}).  The
note is removed when the relay has it.  An instance whose association died before we could
answer is not kept (the modality will send it again); journal records and notes left by a
crash are written out and forwarded again on the next start.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable

from pydicom.uid import UID
from pynetdicom import ALL_TRANSFER_SYNTAXES
from pynetdicom.presentation import AllStoragePresentationContexts, PresentationContext
from twisted.application import service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from medagent.dicom import dimse, pdu
from medagent.dicom.association import (
    AcceptorPolicy,
    AssociationAcceptor,
    DicomServerFactory,
    HandlerResult,
)
from medagent.dicom.instance import (
    atomic_write,
    dataset_json,
    file_meta_bytes,
    fsync_dir,
    fsync_file,
    quick_uids,
    read_header,
    SpareFiles,
    valid_uid,
    write_note,
)
from medagent.dicom.journal import DEFAULT_MAX_RECORD, InstanceJournal, encode_record

log = Logger()

#: Preference order when a requestor offers several: uncompressed first, then the rest.
STORAGE_TRANSFER_SYNTAXES = [
    dimse.ExplicitVRLittleEndian,
    dimse.ImplicitVRLittleEndian,
    dimse.DeflatedExplicitVRLittleEndian,
    dimse.ExplicitVRBigEndian,
] + [UID(ts) for ts in ALL_TRANSFER_SYNTAXES if UID(ts) not in dimse.NATIVE_SYNTAXES]

Forward = Callable[[str, str, str], Deferred]

#: journaled instances written out to their files together (or after C{write_out_delay})
WRITE_OUT_BATCH = 64


def supported_contexts(abstract_syntaxes: Iterable[str], syntaxes: list) -> list:
    contexts = []
    for abstract in abstract_syntaxes:
        cx = PresentationContext()
        cx.abstract_syntax = UID(abstract)
        cx.transfer_syntax = list(syntaxes)
        contexts.append(cx)
    return contexts


def default_storage_classes() -> list[str]:
    return [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]


def echo_handler(assoc: AssociationAcceptor, message, cx) -> Any:
    return dimse.c_echo_rsp(message, dimse.SUCCESS)


class ThreadRunner:
    """An owned, bounded thread pool for blocking file work (never the reactor thread)."""

    def __init__(self, reactor: Any, name: str, max_threads: int = 4) -> None:
        self._reactor = reactor
        self._name = name
        self._max = max_threads
        self._pool: ThreadPool | None = None
        self._stopped = False

    def start(self) -> None:
        """Take work again after a C{stop} (a restarted service)."""
        self._stopped = False

    def __call__(self, fn: Callable, *args: Any) -> Deferred:
        from twisted.internet.threads import deferToThreadPool

        if self._stopped:
            from twisted.internet.defer import fail

            return fail(RuntimeError(f"{self._name}: stopped"))
        if self._pool is None:
            self._pool = ThreadPool(minthreads=0, maxthreads=self._max, name=self._name)
            self._pool.start()
        return deferToThreadPool(self._reactor, self._pool, fn, *args)

    def stop(self) -> None:
        """Stop the threads; later calls fail (a late one must not start a pool no one stops)."""
        self._stopped = True
        if self._pool is not None:
            self._pool.stop()
            self._pool = None


class GroupCommit:
    """
    Instances that arrive while a write is under way are written together: one call of
    C{work} in the thread pool for the whole group, which fsyncs each file and then the
    folder once, so several associations storing at once share the folder's fsync.  Each
    submitter's Deferred fires with its own outcome only after the group's fsyncs: a success
    response is never sent before its instance (and its directory entry) is durable.
    """

    def __init__(self, run: Callable[..., Deferred], work: Callable[[list], list],
                 max_group: int = 64) -> None:
        self._run = run
        self._work = work
        self.max_group = max_group
        self._waiting: list[tuple[Any, Deferred]] = []
        self._writing = False
        self.groups = 0

    def submit(self, job: Any) -> Deferred:
        d: Deferred = Deferred()
        self._waiting.append((job, d))
        self._next()
        return d

    def _next(self) -> None:
        if self._writing or not self._waiting:
            return
        group = self._waiting[: self.max_group]
        del self._waiting[: self.max_group]
        self._writing = True
        self.groups += 1
        d = self._run(self._work, [job for job, _ in group])

        def written(outcomes: list) -> None:
            self._writing = False
            for (_, waiter), outcome in zip(group, outcomes):
                waiter.callback(outcome)
            self._next()

        def failed(f: Any) -> None:
            self._writing = False
            for _, waiter in group:
                waiter.errback(f)
            self._next()

        d.addCallbacks(written, failed)


class _ListeningService(service.Service):
    """Shared start/stop: listen on C{endpoint} if given, abort live associations on stop."""

    endpoint: str | None
    _factory: DicomServerFactory
    _reactor: Any
    kind: str
    ae_title: str

    def __init__(self) -> None:
        self._port = None

    def factory(self) -> DicomServerFactory:
        """The server factory, for a caller that listens itself (e.g. C{strports.service})."""
        return self._factory

    def listen(self, endpoint: str) -> Deferred:
        d = serverFromString(self._reactor, endpoint).listen(self._factory)

        def listening(port: Any) -> Any:
            self._port = port
            log.info("DICOM {kind} {ae} listening on {address}", kind=self.kind,
                     ae=self.ae_title, address=str(port.getHost()))
            return port

        return d.addCallback(listening)

    def startService(self) -> Deferred | None:
        service.Service.startService(self)
        if self.endpoint:
            return self.listen(self.endpoint)
        return None

    def stopService(self) -> Deferred:
        service.Service.stopService(self)
        self._factory.abort_all()
        d = maybeDeferred(self._port.stopListening) if self._port is not None else succeed(None)
        self._port = None
        return d


class StorageChannel(_ListeningService):
    """
    C-STORE SCP for the configured SOP classes (default: all storage classes) and C-ECHO.
    Each instance goes to C{storage_dir}/<SOP Instance UID>.dcm, then C{forward} gets an
    ``application/json`` body::

        {"association": {"callingAeTitle", "calledAeTitle"},
         "dataset": <DICOM JSON without pixel data>,
         "instance": {"path", "size", "sopInstanceUID", "sopClassUID", "transferSyntaxUID"}}
    """

    kind = "storage SCP"

    def __init__(
        self,
        forward: Forward,
        *,
        reactor: Any,
        ae_title: str,
        storage_dir: str,
        endpoint: str | None = None,
        allowed_calling: Iterable[str] | None = None,
        sop_classes: Iterable[str] | None = None,
        transfer_syntaxes: Iterable[str] | None = None,
        max_pdu: int = pdu.DEFAULT_MAX_PDU,
        acse_timeout: float = 30,
        network_timeout: float = 60,
        max_associations: int = 16,
        max_instance_bytes: int = 512 * 1024 * 1024,
        fsync: bool = True,
        run_blocking: Callable[..., Deferred] | None = None,
        journal_max_bytes: int = DEFAULT_MAX_RECORD,
        write_out_delay: float = 0.05,
    ) -> None:
        super().__init__()
        self._forward = forward
        self._reactor = reactor
        self.ae_title = ae_title.strip()
        self.storage_dir = os.path.abspath(storage_dir)
        self.endpoint = endpoint
        self.fsync = fsync
        self._runner = ThreadRunner(reactor, "medagent-dicom-store")
        self._run = run_blocking or self._runner
        classes = list(sop_classes) if sop_classes is not None else default_storage_classes()
        syntaxes = [UID(s) for s in (transfer_syntaxes or STORAGE_TRANSFER_SYNTAXES)]
        contexts = supported_contexts(classes, syntaxes) + supported_contexts(
            [dimse.VERIFICATION], [dimse.ImplicitVRLittleEndian, dimse.ExplicitVRLittleEndian])
        self.policy = AcceptorPolicy(
            ae_title=self.ae_title,
            contexts=contexts,
            handlers={0x0030: echo_handler, 0x0001: self._c_store},
            allowed_calling=allowed_calling,
        )
        self._factory = DicomServerFactory(
            reactor, self.policy, max_associations=max_associations, max_pdu=max_pdu,
            acse_timeout=acse_timeout, network_timeout=network_timeout,
            max_message_bytes=max_instance_bytes)
        self.forwards: dict[str, Deferred] = {}
        self.stored = 0
        self._commit = GroupCommit(self._run, self._store_group)
        #: batches of answered instances written out from the journal to their own files
        self.write_out_groups = 0
        self._write_out_later: list = []
        self._writing_out: set[Deferred] = set()
        self._write_out_call: Any = None
        #: seconds an answered instance may wait in the journal to be written out in a batch
        self.write_out_delay = write_out_delay
        self.journal = (InstanceJournal(self.storage_dir, max_record=journal_max_bytes)
                        if fsync and journal_max_bytes > 0 else None)
        self.spares = SpareFiles(self.storage_dir)
        self._refilling = False

    # -- service ---------------------------------------------------------------------------

    def startService(self) -> Deferred | None:
        self._runner.start()
        os.makedirs(self.storage_dir, exist_ok=True)
        d = super().startService()
        self.recover().addCallback(lambda _: self._refill())
        return d

    def _refill(self) -> None:
        """Make spare files (L{SpareFiles}) and the next journal segment, one refill at a time."""
        journal = self.journal
        if self._refilling or not self.running or (
                self.spares.ready >= self.spares.keep
                and (journal is None or not journal.needs_spare)):
            return
        self._refilling = True

        def refill() -> None:
            self.spares.refill()
            if journal is not None:
                journal.prepare()

        def done(result: Any) -> None:
            self._refilling = False
            if isinstance(result, Failure):
                log.failure("DICOM storage: cannot make spare files", result)

        self._run(refill).addBoth(done)

    def stopService(self) -> Deferred:
        self._flush_write_outs()
        d = super().stopService()
        writing = list(self._writing_out)
        if writing:
            # answered instances still going to their files: let them finish
            d.addBoth(lambda r: DeferredList(writing).addCallback(lambda _: r))

        def remove_spares(r: Any) -> Deferred:
            def remove() -> None:
                self.spares.remove_leftovers()
                if self.journal is not None:
                    self.journal.close()

            return self._run(remove).addBoth(lambda _: r)

        def stop_pool(r: Any) -> Any:
            self._runner.stop()
            return r

        return d.addBoth(remove_spares).addBoth(stop_pool)

    def recover(self) -> Deferred:
        """Forward again what a previous run stored but did not see the relay take."""

        def scan() -> list[tuple[str, str, str]]:
            self.spares.remove_leftovers()
            self._replay_journal()
            found = []
            for name in sorted(os.listdir(self.storage_dir)):
                if name.endswith(".pending") and not name.startswith("."):
                    path = os.path.join(self.storage_dir, name)
                    try:
                        with open(path, encoding="utf-8") as f:
                            note = json.load(f)
                        found.append((path, note["body"], note["remote"]))
                    except (OSError, ValueError, KeyError):
                        try:
                            found.append((path, *self._rebuild_note(path)))
                        except Exception:
                            log.warn("DICOM storage: pending note {name} without a readable "
                                     "instance", name=name)
            return found

        def resend(found: list) -> None:
            for note, body, remote in found:
                if note not in self.forwards:
                    log.info("DICOM storage: forwarding {note} again after restart",
                             note=os.path.basename(note))
                    self._start_forward(note, body, remote)

        return self._run(scan).addCallback(resend)

    # -- C-STORE ---------------------------------------------------------------------------

    def _c_store(self, assoc: AssociationAcceptor, message, cx) -> Any:
        cs = message.command_set
        sop_class = str(cs.get("AffectedSOPClassUID") or "")
        sop_instance = str(cs.get("AffectedSOPInstanceUID") or "")
        if UID(sop_class) != cx.abstract_syntax:
            return dimse.c_store_rsp(message, 0x0122, "SOP class not on this context")
        if not valid_uid(sop_instance):
            return dimse.c_store_rsp(message, 0xC000, "invalid Affected SOP Instance UID")
        data = message.data_set.getvalue() if message.data_set is not None else b""
        message.data_set = None
        if not data:
            return dimse.c_store_rsp(message, 0xC000, "no data set")
        syntax = str(cx.transfer_syntax[0])
        association = {"callingAeTitle": assoc.calling_ae.strip(),
                       "calledAeTitle": assoc.called_ae.strip()}
        remote = f"dicom://{assoc.calling_ae.strip()}@{assoc.peer}"
        d = self._commit.submit((sop_class, sop_instance, syntax, data, association, remote))

        def stored(outcome: tuple | Exception) -> Any:
            if isinstance(outcome, Exception):
                return failed(Failure(outcome))
            status, comment, path, note, body, fresh, journaled = outcome
            if status != dimse.SUCCESS:
                log.warn("DICOM storage: refused an instance from {calling}: 0x{status:04X} "
                         "{comment}", calling=association["callingAeTitle"], status=status,
                         comment=comment)
                return dimse.c_store_rsp(message, status, comment)
            self.stored += 1
            self._refill()
            if journaled is not None:
                return HandlerResult(
                    [dimse.c_store_rsp(message, dimse.SUCCESS)],
                    sent=lambda: self._written_out(journaled),
                    unsent=lambda: self._unacknowledged(journaled),
                )
            return HandlerResult(
                [dimse.c_store_rsp(message, dimse.SUCCESS)],
                sent=lambda: self._start_forward(note, body, remote),
                unsent=lambda: self._discard(path if fresh else None, note),
            )

        def failed(f: Any) -> Any:
            log.failure("DICOM storage: cannot store an instance", f)
            return dimse.c_store_rsp(message, 0xA700, "cannot write the instance")

        return d.addCallbacks(stored, failed)

    def _store_group(self, jobs: list[tuple]) -> list:
        """
        Store a group of instances (L{GroupCommit}): each file written and fsynced, then the
        folder fsynced once for all of them.  An instance that cannot be stored gets its own
        refusal (or exception, answered 0xA700); a failing folder fsync fails the group.
        Runs in the channel's thread pool.
        """
        outcomes: list = []
        records: list[tuple[int, bytes]] = []
        for job in jobs:
            try:
                if self.journal is not None and self.journal.fits(len(job[3])):
                    outcome, record = self._journal_entry(*job)
                    if record is not None:
                        records.append((len(outcomes), record))
                    outcomes.append(outcome)
                else:
                    outcomes.append(self._store_blocking(*job))
            except Exception as e:
                outcomes.append(e)
        if records and self.journal is not None:
            try:
                refs = self.journal.append([record for _, record in records])
            except Exception as e:
                for i, _ in records:
                    outcomes[i] = e
            else:
                for (i, _), ref in zip(records, refs):
                    outcomes[i][6]["ref"] = ref
        if self.fsync and any(not isinstance(o, Exception) and o[0] == dimse.SUCCESS
                              and o[6] is None for o in outcomes):
            fsync_dir(self.storage_dir)
        return outcomes

    def _journal_entry(self, sop_class: str, sop_instance: str, syntax: str, data: bytes,
                       association: dict, remote: str) -> tuple[tuple, bytes | None]:
        """
        Check a small instance (its UIDs read from the bytes; pydicom only when that is not
        enough) and encode its journal record; the refusal and no record if it is wrong.
        """
        uids = quick_uids(data, syntax)
        if uids is None:
            try:
                ds = read_header(data, syntax)
            except Exception as e:
                return (0xC000, f"cannot parse data set ({e.__class__.__name__})", None, None,
                        None, False, None), None
            uids = (ds.get("SOPClassUID"), ds.get("SOPInstanceUID"))
        if uids[0] not in (None, sop_class):
            return (0xA900, "SOP Class UID differs from the request", None, None, None, False,
                    None), None
        if uids[1] not in (None, sop_instance):
            return (0xA900, "SOP Instance UID differs from the request", None, None, None,
                    False, None), None
        path = os.path.join(self.storage_dir, sop_instance + ".dcm")
        head = {"class": sop_class, "instance": sop_instance, "syntax": syntax,
                "association": association, "remote": remote}
        item = dict(head, data=data, path=path, fresh=not os.path.exists(path), ref=None)
        return ((dimse.SUCCESS, None, path, path + ".pending", None, item["fresh"], item),
                encode_record(head, data))

    def _write_out_one(self, item: dict, fsync: bool = True) -> tuple[str, str, str]:
        """
        A journaled instance as its own Part 10 file and note; blocking.  Without C{fsync}
        the caller fsyncs the file (L{_write_out_group}: all files written first, then each
        fsynced, so one journal commit covers the group); the caller fsyncs the folder
        before the record is retired, which is what makes any of it matter.
        """
        sop_class, sop_instance, syntax = item["class"], item["instance"], item["syntax"]
        data, path = item["data"], item["path"]
        meta = file_meta_bytes(sop_class, sop_instance, syntax)
        try:
            ds = read_header(data, syntax)
            dataset: Any = dataset_json(ds)
        except Exception as e:
            # accepted already (the bytes are kept): the cloud gets the instance without
            # its attributes, and the log says why
            log.warn("DICOM storage: instance {uid} stored but not readable as a data set "
                     "({error})", uid=sop_instance, error=e.__class__.__name__)
            dataset = None
        body = json.dumps({
            "association": item["association"],
            "dataset": dataset,
            "instance": {"path": path, "size": len(meta) + len(data),
                         "sopInstanceUID": sop_instance, "sopClassUID": sop_class,
                         "transferSyntaxUID": syntax},
        })
        note = path + ".pending"
        atomic_write(path, [meta, data], fsync=fsync, fsync_folder=False,
                     tmp=self.spares.take())
        write_note(note, json.dumps({"body": body, "remote": item["remote"]}).encode(),
                   tmp=self.spares.take())
        return note, body, item["remote"]

    def _write_out_group(self, items: list[dict]) -> list:
        """
        Journaled instances to their files, one folder fsync for the group, then their
        records retired.  One that cannot be written stays in the journal (its exception is
        its outcome): it is written out again on the next start.  Runs in the thread pool.
        """
        outcomes: list = []
        for item in items:
            try:
                outcomes.append(self._write_out_one(item, fsync=False))
            except Exception as e:
                outcomes.append(e)
        for i, item in enumerate(items):
            if not isinstance(outcomes[i], Exception):
                try:
                    fsync_file(item["path"])
                except Exception as e:
                    outcomes[i] = e
        done = [item["ref"] for item, o in zip(items, outcomes) if not isinstance(o, Exception)]
        if done and self.journal is not None:
            fsync_dir(self.storage_dir)
            self.journal.retire(done)
        return outcomes

    def _written_out(self, item: dict) -> None:
        """The success is on its way: the instance becomes its file, then it is forwarded."""

        # Written out in batches, a little later: their fsyncs would otherwise share the
        # disk with the journal flush of the next instance, which a modality is waiting for.
        self._write_out_later.append(item)
        if len(self._write_out_later) >= WRITE_OUT_BATCH:
            self._flush_write_outs()
        elif self._write_out_call is None:
            self._write_out_call = self._reactor.callLater(self.write_out_delay,
                                                           self._flush_write_outs)

    def _flush_write_outs(self) -> None:
        if self._write_out_call is not None and self._write_out_call.active():
            self._write_out_call.cancel()
        self._write_out_call = None
        batch, self._write_out_later = self._write_out_later, []
        if not batch:
            return
        self.write_out_groups += 1

        def written(outcomes: list) -> None:
            for item, outcome in zip(batch, outcomes):
                if isinstance(outcome, Exception):
                    log.failure("DICOM storage: cannot write out instance {uid}; it stays in "
                                "the journal for the next start", Failure(outcome),
                                uid=item["instance"])
                else:
                    self._start_forward(*outcome)

        d = self._run(self._write_out_group, batch)
        self._writing_out.add(d)

        def untrack(result: Any) -> Any:
            self._writing_out.discard(d)
            return result

        d.addBoth(untrack)
        d.addCallbacks(written, lambda f: log.failure(
            "DICOM storage: cannot write out instances; they stay in the journal", f))

    def _unacknowledged(self, item: dict) -> None:
        """The association was gone before our success: the journaled copy is not kept."""
        log.info("DICOM storage: association lost before the response; discarding instance")
        journal = self.journal
        if journal is not None:
            self._run(journal.retire, [item["ref"]])

    def _replay_journal(self) -> None:
        """
        Start-up (blocking): instances a previous run answered from the journal but had not
        yet written out become their files and notes, then the segments go.
        """
        journal = self.journal or InstanceJournal(self.storage_dir)
        segments = journal.recover()
        if not segments:
            return
        written = 0
        for _, records in segments:
            for head, data in records:
                uid = head.get("instance")
                if not (isinstance(uid, str) and valid_uid(uid)
                        and isinstance(head.get("class"), str)
                        and isinstance(head.get("syntax"), str)):
                    log.warn("DICOM storage: a journal record without valid UIDs; skipped")
                    continue
                path = os.path.join(self.storage_dir, uid + ".dcm")
                self._write_out_one(dict(head, data=data, path=path))
                written += 1
        fsync_dir(self.storage_dir)
        journal.forget([path for path, _ in segments])
        log.info("DICOM storage: wrote out {n} journaled instance(s) after a restart",
                 n=written)

    def _store_blocking(self, sop_class: str, sop_instance: str, syntax: str, data: bytes,
                        association: dict, remote: str) -> tuple:
        """
        Parse, check, write + fsync the file; write the note (its existence made durable by
        the folder fsync in L{_store_group}; its content can be rebuilt from the file).
        """
        try:
            ds = read_header(data, syntax)
        except Exception as e:
            return (0xC000, f"cannot parse data set ({e.__class__.__name__})", None, None, None,
                    False, None)
        if ds.get("SOPClassUID") not in (None, sop_class):
            return (0xA900, "SOP Class UID differs from the request", None, None, None, False,
                    None)
        if ds.get("SOPInstanceUID") not in (None, sop_instance):
            return (0xA900, "SOP Instance UID differs from the request", None, None, None,
                    False, None)
        path = os.path.join(self.storage_dir, sop_instance + ".dcm")
        note = path + ".pending"
        meta = file_meta_bytes(sop_class, sop_instance, syntax)
        try:
            body = self._forward_body(ds, association, path, len(meta) + len(data),
                                      sop_instance, sop_class, syntax)
        except Exception as e:
            return (0xC000, f"cannot convert to JSON ({e.__class__.__name__})", None, None,
                    None, False, None)
        fresh = not os.path.exists(path)
        atomic_write(path, [meta, data], fsync=self.fsync, fsync_folder=False,
                     tmp=self.spares.take())
        write_note(note, json.dumps({"body": body, "remote": remote}).encode(),
                   tmp=self.spares.take())
        return (dimse.SUCCESS, None, path, note, body, fresh, None)

    @staticmethod
    def _forward_body(ds: Any, association: dict, path: str, size: int, sop_instance: str,
                      sop_class: str, syntax: str) -> str:
        return json.dumps({
            "association": association,
            "dataset": dataset_json(ds),
            "instance": {"path": path, "size": size, "sopInstanceUID": sop_instance,
                         "sopClassUID": sop_class, "transferSyntaxUID": syntax},
        })

    def _rebuild_note(self, note: str) -> tuple[str, str]:
        """A note whose content was lost in a crash: rebuild the body from the file."""
        from pydicom import dcmread

        path = note[: -len(".pending")]
        ds = dcmread(path, stop_before_pixels=True)
        meta = ds.file_meta
        # pydicom types file_meta as FileMetaDataset, but None is how one drops it.
        ds.file_meta = None  # type: ignore[assignment]
        body = self._forward_body(
            ds, {"callingAeTitle": None, "calledAeTitle": self.ae_title}, path,
            os.path.getsize(path), str(meta.MediaStorageSOPInstanceUID),
            str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
        return body, "dicom://recovered"

    def _discard(self, path: str | None, note: str) -> None:
        """
        The association was gone before our success response: keep nothing new (an earlier,
        acknowledged copy of the same instance stays).
        """
        log.info("DICOM storage: association lost before the response; discarding instance")

        def remove() -> None:
            for p in (note, path):
                if p is None:
                    continue
                try:
                    os.unlink(p)
                except OSError:
                    pass

        self._run(remove)

    def _start_forward(self, note: str, body: str, remote: str) -> None:
        d = maybeDeferred(self._forward, "application/json", body, remote)
        self.forwards[note] = d

        def done(result: Any) -> Any:
            self.forwards.pop(note, None)

            def remove() -> None:
                try:
                    os.unlink(note)
                except OSError:
                    pass

            return self._run(remove).addErrback(lambda f: log.info(
                "DICOM storage: note {note} not removed ({error}); forwarded again on the "
                "next start", note=os.path.basename(note), error=f.getErrorMessage()))

        def failed(f: Any) -> None:
            self.forwards.pop(note, None)
            log.failure("DICOM storage: forward to the relay failed; kept for the next start",
                        f)

        d.addCallbacks(done, failed)
