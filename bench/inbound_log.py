"""
What the inbound log costs the relay per message, beside what every inbound message already
costs it: the Bot run's C{AuditEvent} (a resource write to the same SQLite file).

In one process, on the relay's own SQLite database (a file, its worker thread, group
commits), interleaved in rounds of N each:

- ``audit``: N C{AuditEvent} creates, as the Bot runner writes one per run (the baseline);
- ``record``: N inbound records as L{ChannelRouter} writes them: the search fields read from
  the message (HL7 ORU with PID, ORC, OBR, OBX) and the row with its payload;
- ``record_metadata``: the same with ``--inbound-log off`` (no payload);
- ``fields``: the search fields alone (reactor-thread CPU per message), beside
  ``fields_before``: what a push's journaling read of an HL7 message before (MSH-10 and the
  order number);
- ``dicom_fields``: a push's DICOM search fields (Patient ID, Study and SOP Instance UID) of
  a 5 MB ``application/dicom`` body, beside ``dicom_request_json``: the C{json.loads} of that
  push's request body, which the relay pays for every such push anyway (the floor).

Each write is issued as the relay issues it (many in flight, group committed).  Last line: one
JSON object with messages/s and µs per message of each, medians over the rounds.

    python bench/inbound_log.py [--n 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from twisted.internet import defer, reactor  # noqa: E402

from bench.push_rtt import print_result  # noqa: E402
from medagent.hl7.message import control_id, order_number  # noqa: E402
from medagent.relay.fields import message_fields  # noqa: E402
from medagent.storage.inbound import InboundMessage  # noqa: E402
from medagent.storage.sqlite import RELAY_SCHEMA, Database, SQLiteJournal  # noqa: E402
from medagent.storage.sqlite.inbound import SQLiteInboundLog  # noqa: E402
from medagent.storage.sqlite.store import SQLiteStore  # noqa: E402

HL7 = "x-application/hl7-v2+er7"


def oru(i: int) -> str:
    return (f"MSH|^~\\&|DEV|LAB|LIS|HOSP|20240101120000||ORU^R01|IN{i:08d}|P|2.5.1\r"
            f"PID|1||{i}^^^MRN||DOE^J||19800101|F\rORC|RE|ORD{i}\rOBR|1|ORD{i}||GLU^Glucose\r"
            f"OBX|1|NM|GLU^Glucose||{i % 200}|mg/dL|70-110|N|||F\r")


def audit(i: int) -> dict:
    return {"resourceType": "AuditEvent", "type": {"code": "rest"}, "action": "E",
            "recorded": "2024-01-01T12:00:00Z", "outcome": "0",
            "outcomeDesc": "Bot run (channel): success in 12 ms",
            "agent": [{"who": {"reference": "Bot/b1"}, "requestor": False}],
            "source": {"observer": {"display": "medagent-relay bots"}},
            "entity": [{"what": {"reference": "Bot/b1"}},
                       {"what": {"reference": "Agent/a1"}}]}


def dicom_body(pixels: int) -> str:
    """A base64 Part 10 instance with C{pixels} bytes of pixel data."""
    import base64
    from io import BytesIO

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, "1.2.3.4.5"
    ds.PatientID, ds.StudyInstanceUID = "MRN1", "1.2.3.4"
    ds.Rows, ds.Columns, ds.BitsAllocated = pixels // 1024, 1024, 8
    ds.PixelData = b"\1" * pixels
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return base64.b64encode(out.getvalue()).decode()


def record(log: SQLiteInboundLog, i: int, keep: bool) -> InboundMessage:
    body = oru(i)
    f = message_fields(HL7, body)
    return InboundMessage(
        id=log.new_id(), agent_id="a1", channel="lab", received=time.time(),
        content_type=HL7, size=len(body), remote="10.0.0.5:4000",
        message_type=f["message_type"], control_id=f["control_id"],
        patient_id=f["patient_id"], accession=f["accession"], study_uid=f["study_uid"],
        sop_uid=f["sop_uid"], status=200, ack_code="AA", outcome="ok", bot="Bot/b1",
        duration_ms=12.0, body=body if keep else None)


async def timed(n: int, issue: object) -> tuple[float, float]:
    """(messages/s, CPU µs per message of this process) of N writes issued at once."""
    start, cpu = time.perf_counter(), time.process_time()
    await defer.gatherResults([issue(i) for i in range(n)])  # type: ignore[operator]
    took = time.perf_counter() - start
    return n / took, (time.process_time() - cpu) / n * 1e6


async def main(n: int, rounds: int) -> dict:
    folder = tempfile.mkdtemp(prefix="bench-inbound-log-")
    db = Database(reactor, os.path.join(folder, "relay.sqlite"), schema=RELAY_SCHEMA,
                  name="bench-db", migrations=[SQLiteJournal.migrate])
    db.start()
    store, log = SQLiteStore(db), SQLiteInboundLog(db)
    results: dict[str, list[tuple[float, float]]] = {
        "audit": [], "record": [], "record_metadata": []}
    fields_us: list[float] = []
    before_us: list[float] = []
    try:
        await timed(200, lambda i: store.create(audit(i)))  # warm-up
        for _ in range(rounds):
            results["audit"].append(await timed(n, lambda i: store.create(audit(i))))
            results["record"].append(await timed(n, lambda i: log.add(record(log, i, True))))
            results["record_metadata"].append(
                await timed(n, lambda i: log.add(record(log, i, False))))
            bodies = [oru(i) for i in range(n)]
            start = time.perf_counter()
            for body in bodies:
                message_fields(HL7, body)
            fields_us.append((time.perf_counter() - start) / n * 1e6)
            start = time.perf_counter()
            for body in bodies:
                control_id(body)
                order_number(body)
            before_us.append((time.perf_counter() - start) / n * 1e6)
    finally:
        db.stop()
    out: dict = {"n": n, "rounds": rounds}
    for name, values in results.items():
        out[f"{name}_per_s"] = round(statistics.median(v[0] for v in values), 1)
        out[f"{name}_cpu_us_per_msg"] = round(statistics.median(v[1] for v in values), 1)
    out["fields_us_per_msg"] = round(statistics.median(fields_us), 2)
    out["fields_before_us_per_msg"] = round(statistics.median(before_us), 2)
    body = dicom_body(5 * 1024 * 1024)
    request = json.dumps({"destination": "dicom://PACS@h:104", "contentType":
                          "application/dicom", "body": body})
    dicom_us, json_us = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        found = message_fields("application/dicom", body)
        dicom_us.append((time.perf_counter() - start) * 1e6)
        start = time.perf_counter()
        json.loads(request)
        json_us.append((time.perf_counter() - start) * 1e6)
    assert found["sop_uid"] == "1.2.3.4.5", found
    out["dicom_fields_us_5mb"] = round(statistics.median(dicom_us), 1)
    out["dicom_request_json_us_5mb"] = round(statistics.median(json_us), 1)
    out["baseline"] = "audit: the AuditEvent each Bot run of an inbound message already writes"
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print_result(main(args.n, args.rounds))
