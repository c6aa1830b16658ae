"""
What the console and the CLI search a message by, read from its content: one definition for
pushes (L{medagent.relay.push}) and inbound messages (L{medagent.relay.channels}).

HL7 v2: MSH-9 (type), MSH-10 (control id), PID-3 (patient id, first component) and the
order / accession number (L{medagent.hl7.message.order_number}).  DICOM (a base64 Part 10
file, DICOM JSON, or the JSON document an agent's storage channel forwards): Patient ID,
Study and SOP Instance UID, from the header only (L{medagent.dicom.instance.search_uids}).
Nothing here raises for bad content: an unreadable field is None.
"""

from __future__ import annotations

import json
from typing import Any

from medagent.contenttypes import HL7_V2, JSON
from medagent.hl7 import message as hl7msg

#: The search fields, in the order records list them.
NAMES = ("message_type", "control_id", "patient_id", "accession", "study_uid", "sop_uid")


def _bounded(value: Any) -> str | None:
    text = str(value).strip() if value is not None else ""
    return text[:100] or None


def hl7_fields(body: str) -> dict[str, str | None]:
    """The HL7 v2 search fields of C{body} (leading whitespace ignored)."""
    text = body.lstrip()
    try:
        control: str | None = hl7msg.control_id(text)
    except hl7msg.HL7Error:
        control = None
    try:
        kind: str | None = hl7msg.message_type(text)
    except hl7msg.HL7Error:
        kind = None
    return {"message_type": _bounded(kind), "control_id": _bounded(control),
            "patient_id": hl7msg.patient_id(text), "accession": hl7msg.order_number(text),
            "study_uid": None, "sop_uid": None}


def dicom_fields(content_type: str, body: str) -> dict[str, str | None]:
    """
    The DICOM search fields of a push body (``application/dicom``, ``application/dicom+json``)
    or of a storage channel's forwarded document (``application/json`` with ``dataset`` and
    ``instance``, L{medagent.dicom.scp.StorageChannel}); all None for anything else.
    """
    from medagent.dicom.instance import search_uids, uids_from_json

    out: dict[str, str | None] = dict.fromkeys(NAMES)
    ct = content_type.split(";")[0].strip().lower()
    if ct == JSON:
        try:
            doc = json.loads(body)
        except ValueError:
            return out
        if not isinstance(doc, dict) or not isinstance(doc.get("instance"), dict):
            return out
        found = uids_from_json(doc.get("dataset"))
        found["sop_uid"] = found["sop_uid"] or _bounded(doc["instance"].get("sopInstanceUID"))
    else:
        found = search_uids(content_type, body)
    out.update(found)
    return out


def message_fields(content_type: str, body: str) -> dict[str, str | None]:
    """Every search field of a message (L{NAMES}), None where it has none."""
    ct = content_type.split(";")[0].strip().lower()
    if ct == HL7_V2:
        return hl7_fields(body)
    if ct in ("application/dicom", "application/dicom+json", JSON):
        return dicom_fields(content_type, body)
    return dict.fromkeys(NAMES)
