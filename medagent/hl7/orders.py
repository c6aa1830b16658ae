"""
FHIR R4 ServiceRequest -> HL7 v2 order message (``ORM^O01`` or ``OML^O21``), per
protocols.md section 5: the inverse of the HL7 "V2 to FHIR" segment maps.

Pure functions over FHIR JSON (dicts), no I/O.  Referenced resources (Patient, Encounter,
Practitioner, Specimen) are passed in or found in ``ServiceRequest.contained``.  Every text
value is escaped with the message's separators.  The control id is derived from the
ServiceRequest's id, version and order control, so building the same order twice gives the
same MSH-10 and the relay's idempotency (MSH-10) recognises a repeat.

What the receiver's codes and identifiers should be is its decision: map them (LOINC to a
local test code, FHIR identifier systems to assigning authorities) before calling this.
"""

from __future__ import annotations

import base64
import hashlib
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, Sequence

import attr

from medagent.hl7.message import Separators, escape, hl7_timestamp

Resource = Mapping[str, Any]

SEPARATORS = Separators()

# Coding system URI -> HL7 table 0396 coding system abbreviation.
CODE_SYSTEMS = {
    "http://loinc.org": "LN",
    "http://snomed.info/sct": "SCT",
    "http://www.ama-assn.org/go/cpt": "C4",
    "http://hl7.org/fhir/sid/icd-10": "I10",
    "http://hl7.org/fhir/sid/icd-10-cm": "I10",
    "http://hl7.org/fhir/sid/icd-9-cm": "I9CDX",
    "http://www.nlm.nih.gov/research/umls/rxnorm": "RXNORM",
    "http://unitsofmeasure.org": "UCUM",
}

# Identifier systems with a well-known v2 assigning authority (HD: namespace&OID&ISO).
AUTHORITIES = {
    "http://hl7.org/fhir/sid/us-npi": "NPI&2.16.840.1.113883.4.6&ISO",
    "http://hl7.org/fhir/sid/us-ssn": "SSA&2.16.840.1.113883.4.1&ISO",
}

GENDER = {"male": "M", "female": "F", "other": "O", "unknown": "U"}

# v3 ActCode encounter class -> PV1-2 patient class (table 0004).
PATIENT_CLASS = {
    "AMB": "O",
    "IMP": "I",
    "EMER": "E",
    "PRENC": "P",
    "ACUTE": "I",
    "NONAC": "I",
    "OBSENC": "O",
    "SS": "O",
    "VR": "O",
    "HH": "O",
}

# FHIR request priority -> v2 priority (TQ-6 / TQ1-9 table 0485); urgent has no v2 code and
# goes as ASAP by policy.
PRIORITY = {
    "routine": ("R", "Routine"),
    "urgent": ("A", "ASAP"),
    "asap": ("A", "ASAP"),
    "stat": ("S", "Stat"),
}

# ServiceRequest.category (SNOMED CT) -> OBR-24 diagnostic service section (table 0074).
SERVICE_SECTION = {
    "108252007": "LAB",  # Laboratory procedure
    "363679005": "RAD",  # Imaging
    "387713003": "SUR",  # Surgical procedure
    "409063005": "OTH",  # Counselling
}

ORDER_CONTROLS = ("NW", "XO", "CA", "DC", "HD", "RL")


class OrderError(ValueError):
    """The ServiceRequest cannot be turned into an order message; the text says why."""


@attr.s(frozen=True, auto_attribs=True)
class OrderHeader:
    """MSH settings for the destination (who we are, who it is, what it speaks)."""

    sending_application: str = "MEDAGENT"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    version: str = "2.5.1"
    processing_id: str = "P"
    accept_ack: str = ""  # MSH-15: empty = original mode
    application_ack: str = ""  # MSH-16
    charset: str = "UNICODE UTF-8"  # MSH-18


def order_control(current: Resource, previous: Resource | None = None, *,
                  work_started: bool = False) -> str:
    """
    ORC-1 for sending C{current}, given the version the receiver last got (protocols.md 5.4):
    NW for a new order, XO for a change, CA/DC for a cancel (DC once work has started),
    HD/RL for hold/release.
    """
    status = current.get("status", "active")
    before = previous.get("status") if previous else None
    if status in ("revoked", "entered-in-error"):
        if previous is None:
            raise OrderError("A cancelled ServiceRequest that was never sent has nothing to cancel")
        return "DC" if work_started else "CA"
    if status == "completed":
        raise OrderError("ServiceRequest is completed: there is nothing to order")
    if previous is None:
        return "NW"
    if status == "on-hold" and before != "on-hold":
        return "HD"
    if status in ("active", "draft") and before == "on-hold":
        return "RL"
    return "XO"


def control_id_for(service_request: Resource, control: str) -> str:
    """
    A 20-character MSH-10 derived from the ServiceRequest's id, version and order control:
    the same order sent again gets the same control id (dedup), a new version a new one.
    """
    meta = service_request.get("meta") or {}
    seed = "|".join([str(service_request.get("id", "")), str(meta.get("versionId", "")),
                     control, str(meta.get("lastUpdated", ""))])
    digest = hashlib.sha256(seed.encode("utf-8")).digest()
    return base64.b32encode(digest).decode("ascii")[:20]


def order_message(
    service_request: Resource,
    *,
    patient: Resource | None = None,
    encounter: Resource | None = None,
    requester: Resource | None = None,
    specimens: Sequence[Resource] = (),
    header: OrderHeader = OrderHeader(),
    structure: str = "ORM",
    control: str | None = None,
    previous: Resource | None = None,
    control_id: str | None = None,
    now: datetime | None = None,
) -> str:
    """
    The ``ORM^O01`` (default) or ``OML^O21`` message for C{service_request}, as text with
    ``\\r`` segment ends.  C{control} (ORC-1) defaults to L{order_control} against
    C{previous}.  Missing references are looked up in ``contained``.
    """
    if service_request.get("resourceType") not in (None, "ServiceRequest"):
        raise OrderError(f"Expected a ServiceRequest, got {service_request.get('resourceType')}")
    structure = structure.upper()
    if structure not in ("ORM", "OML"):
        raise OrderError("structure must be ORM or OML")
    version = _version(header.version)
    if structure == "OML" and version < (2, 4):
        raise OrderError("OML^O21 needs HL7 v2.4 or later")
    control = control or order_control(service_request, previous)
    if control not in ORDER_CONTROLS:
        raise OrderError(f"Unknown order control {control!r}")

    if not service_request.get("code"):
        raise OrderError("ServiceRequest.code (what to do) is required for OBR-4")
    patient = patient or _resolve(service_request, service_request.get("subject"), "Patient")
    if patient is None:
        raise OrderError("ServiceRequest.subject (a Patient) is required for an order")
    if patient.get("resourceType") not in (None, "Patient"):
        raise OrderError("ServiceRequest.subject must be a Patient")
    encounter = encounter or _resolve(service_request, service_request.get("encounter"),
                                      "Encounter")
    requester = requester or _resolve(service_request, service_request.get("requester"),
                                      "Practitioner")
    if not specimens:
        specimens = [s for s in (_resolve(service_request, ref, "Specimen")
                                 for ref in service_request.get("specimen") or []) if s]

    f = SEPARATORS.field
    segments = [
        _msh(header, structure, version, control_id
             or control_id_for(service_request, control), now),
        _pid(patient),
        _pv1(encounter),
    ]
    placer = _order_number(service_request, "PLAC", header.sending_application)
    filler = _order_number(service_request, "FILL", "")
    timing = _timing(service_request)
    priority = _priority(service_request)
    orderer = _xcn(requester) if requester else ""
    orc = _fields(
        "ORC",
        {
            1: control,
            2: placer,
            3: filler,
            4: _requisition(service_request),
            5: "HD" if control == "HD" else "",
            7: _tq(timing[0], priority) if structure == "ORM" else "",
            9: _dtm(service_request.get("authoredOn")),
            12: orderer,
            16: _cwe(service_request.get("statusReason")) if control in ("CA", "DC") else "",
        },
    )
    segments.append(orc)
    if structure == "OML":
        segments.append(_fields("TQ1", {
            1: "1",
            7: _dtm(timing[0]),
            8: _dtm(timing[1]),
            9: f"{priority[0]}^{priority[1]}^HL70485" if priority else "",
            11: _esc(service_request.get("patientInstruction")),
        }))
    collected = _collected(specimens)
    obr = _fields(
        "OBR",
        {
            1: "1",
            2: placer,
            3: filler,
            4: _cwe(service_request.get("code")),
            7: _dtm(collected) if collected else "",
            11: ("O" if collected else "L") if structure == "OML" else "",
            16: orderer,
            24: _service_section(service_request),
            27: _tq(timing[0], priority) if structure == "ORM" else "",
            29: _parent(service_request),
            31: SEPARATORS.repetition.join(
                _cwe(c) for c in service_request.get("reasonCode") or []),
        },
    )
    segments.append(obr)
    notes = [n.get("text") for n in service_request.get("note") or [] if n.get("text")]
    if structure == "ORM" and service_request.get("patientInstruction"):
        notes.append(service_request["patientInstruction"])
    for i, text in enumerate(notes, 1):
        segments.append(f.join(["NTE", str(i), "P", _esc(text)]))
    if structure == "OML":
        for i, specimen in enumerate(specimens, 1):
            segments.append(_spm(i, specimen, header.sending_application))
    return "\r".join(segments) + "\r"


# -- segments


def _msh(header: OrderHeader, structure: str, version: tuple[int, ...], control_id: str,
         now: datetime | None) -> str:
    if structure == "OML":
        msg_type = "OML^O21^OML_O21"
    elif version >= (2, 3, 1):
        msg_type = "ORM^O01^ORM_O01"
    else:
        msg_type = "ORM^O01"
    return _fields("MSH", {
        2: SEPARATORS.encoding_characters,
        3: _esc(header.sending_application),
        4: _esc(header.sending_facility),
        5: _esc(header.receiving_application),
        6: _esc(header.receiving_facility),
        7: hl7_timestamp(now or datetime.now(timezone.utc)),
        9: msg_type,
        10: control_id,
        11: header.processing_id,
        12: header.version,
        15: header.accept_ack,
        16: header.application_ack,
        18: header.charset,
    }, msh=True)


def _pid(patient: Resource) -> str:
    identifiers = sorted(patient.get("identifier") or [],
                         key=lambda i: 0 if _identifier_type(i) == "MR" else 1)
    return _fields("PID", {
        1: "1",
        3: SEPARATORS.repetition.join(_cx(i) for i in identifiers if i.get("value")),
        5: _xpn(_pick_name(patient.get("name") or [])),
        7: _date(patient.get("birthDate")),
        8: GENDER.get(patient.get("gender", ""), ""),
        11: _xad((patient.get("address") or [None])[0]),
        13: _xtn(patient.get("telecom") or [], ("home", "mobile", None)),
        14: _xtn(patient.get("telecom") or [], ("work",)),
        29: _dtm(patient.get("deceasedDateTime")),
        30: "Y" if patient.get("deceasedBoolean") or patient.get("deceasedDateTime") else "",
    })


def _pv1(encounter: Resource | None) -> str:
    if not encounter:
        # Many receivers require a PV1; without an encounter the class is unknown.
        return "PV1|1|U"
    cls = encounter.get("class") or {}
    visit = next((i for i in encounter.get("identifier") or []
                  if _identifier_type(i) == "VN"), None)
    visit = visit or next(iter(encounter.get("identifier") or []), None)
    period = encounter.get("period") or {}
    return _fields("PV1", {
        1: "1",
        2: PATIENT_CLASS.get(cls.get("code", ""), "U"),
        19: _cx(visit) if visit else "",
        44: _dtm(period.get("start")),
        45: _dtm(period.get("end")),
    })


def _spm(n: int, specimen: Resource, namespace: str) -> str:
    sid = next((i.get("value") for i in specimen.get("identifier") or [] if i.get("value")),
               specimen.get("id", ""))
    accession = (specimen.get("accessionIdentifier") or {}).get("value", "")
    s = SEPARATORS.subcomponent
    eip = f"{_esc(sid)}{s}{_esc(namespace)}" if sid else ""
    if accession:
        eip += f"{SEPARATORS.component}{_esc(accession)}"
    return _fields("SPM", {
        1: str(n),
        2: eip,
        4: _cwe(specimen.get("type")),
        17: _dtm(_collected([specimen])),
    })


# -- data types


def _fields(name: str, values: Mapping[int, str], msh: bool = False) -> str:
    """A segment from {field number: already-escaped value}, trailing empties dropped."""
    last = max((n for n, v in values.items() if v), default=0)
    f = SEPARATORS.field
    if msh:
        parts = [values.get(n, "") for n in range(2, last + 1)]
        return "MSH" + f + f.join(parts)
    parts = [values.get(n, "") for n in range(1, last + 1)]
    return f.join([name] + parts)


def _esc(value: Any) -> str:
    return escape(str(value), SEPARATORS) if value not in (None, "") else ""


def _join(parts: Iterable[str], sep: str) -> str:
    out = list(parts)
    while out and not out[-1]:
        out.pop()
    return sep.join(out)


def _version(v: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in v.split("."))
    except ValueError:
        raise OrderError(f"Unknown HL7 version {v!r}")


def _date(value: str | None) -> str:
    if not value:
        return ""
    return value.replace("-", "")[:8]


def _dtm(value: str | None) -> str:
    """FHIR date/dateTime/instant -> HL7 DTM (seconds, with the offset when there is one)."""
    if not value:
        return ""
    if len(value) <= 10:
        return _date(value)
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise OrderError(f"Not a FHIR dateTime: {value!r}")
    if parsed.tzinfo is None:
        return parsed.strftime("%Y%m%d%H%M%S")
    return parsed.strftime("%Y%m%d%H%M%S%z")


def _coding(concept: Resource | None) -> Resource | None:
    if not concept:
        return None
    codings = concept.get("coding") or []
    return codings[0] if codings else None


def _cwe(concept: Resource | None) -> str:
    """CodeableConcept -> CWE ``code^text^system`` (first coding; text only if no coding)."""
    if not concept:
        return ""
    c = SEPARATORS.component
    coding = _coding(concept)
    if coding is None:
        return f"{c}{_esc(concept.get('text'))}" if concept.get("text") else ""
    system = coding.get("system", "")
    abbreviation = CODE_SYSTEMS.get(system, "L" if system else "")
    text = coding.get("display") or concept.get("text")
    return _join([_esc(coding.get("code")), _esc(text), abbreviation], c)


def _identifier_type(identifier: Resource) -> str:
    coding = _coding(identifier.get("type"))
    return (coding or {}).get("code", "")


def _authority(identifier: Resource) -> str:
    system = identifier.get("system", "")
    if system in AUTHORITIES:
        return AUTHORITIES[system]
    assigner = (identifier.get("assigner") or {}).get("display")
    if assigner:
        return _esc(assigner)
    s = SEPARATORS.subcomponent
    if system.startswith("urn:oid:"):
        return f"{s}{_esc(system[8:])}{s}ISO"
    if system:
        return f"{s}{_esc(system)}{s}URI"
    return ""


def _cx(identifier: Resource) -> str:
    c = SEPARATORS.component
    return _join([_esc(identifier.get("value")), "", "", _authority(identifier),
                  _esc(_identifier_type(identifier))], c)


def _pick_name(names: Sequence[Resource]) -> Resource | None:
    for use in ("official", "usual", None):
        for n in names:
            if use is None or n.get("use") == use:
                return n
    return None


def _xpn(name: Resource | None) -> str:
    if not name:
        return ""
    given = name.get("given") or []
    c = SEPARATORS.component
    return _join([
        _esc(name.get("family")),
        _esc(given[0] if given else ""),
        _esc(" ".join(given[1:])),
        _esc(" ".join(name.get("suffix") or [])),
        _esc(" ".join(name.get("prefix") or [])),
        "",
        "L" if name.get("use") in (None, "official", "usual") else "",
    ], c)


def _xad(address: Resource | None) -> str:
    if not address:
        return ""
    lines = address.get("line") or []
    return _join([
        _esc(lines[0] if lines else ""),
        _esc(" ".join(lines[1:])),
        _esc(address.get("city")),
        _esc(address.get("state")),
        _esc(address.get("postalCode")),
        _esc(address.get("country")),
    ], SEPARATORS.component)


def _xtn(telecom: Sequence[Resource], uses: tuple[str | None, ...]) -> str:
    out = []
    for t in telecom:
        if t.get("use") not in uses or not t.get("value"):
            continue
        system = t.get("system", "phone")
        use_code = "WPN" if t.get("use") == "work" else ("ORN" if t.get("use") == "mobile"
                                                         else "PRN")
        if system == "email":
            out.append(_join(["", "NET", "Internet", _esc(t["value"])], SEPARATORS.component))
        elif system in ("phone", "sms"):
            kind = "CP" if t.get("use") == "mobile" or system == "sms" else "PH"
            out.append(_join([_esc(t["value"]), use_code, kind], SEPARATORS.component))
    return SEPARATORS.repetition.join(out)


def _xcn(practitioner: Resource) -> str:
    """Practitioner -> XCN ``id^family^given^^^^^^authority``."""
    if practitioner.get("resourceType") == "PractitionerRole":
        practitioner = practitioner.get("practitioner") or {}
    identifiers = practitioner.get("identifier") or []
    identifier = next((i for i in identifiers if i.get("system") in AUTHORITIES), None)
    identifier = identifier or next(iter(identifiers), None)
    name = _pick_name(practitioner.get("name") or [])
    given = (name or {}).get("given") or []
    c = SEPARATORS.component
    if not name and practitioner.get("display"):  # a Reference with only a display
        return f"{c}{_esc(practitioner['display'])}"
    return _join([
        _esc((identifier or {}).get("value")),
        _esc((name or {}).get("family")),
        _esc(given[0] if given else ""),
        _esc(" ".join(given[1:])),
        "", "", "", "",
        _authority(identifier) if identifier else "",
    ], c)


def _order_number(sr: Resource, type_code: str, namespace: str) -> str:
    """EI ``id^namespace`` from the identifier of type PLAC/FILL (placer falls back to id)."""
    c = SEPARATORS.component
    for identifier in sr.get("identifier") or []:
        if _identifier_type(identifier) == type_code and identifier.get("value"):
            ns = (identifier.get("assigner") or {}).get("display") or namespace
            return _join([_esc(identifier["value"]), _esc(ns)], c)
    if type_code == "PLAC" and sr.get("id"):
        return _join([_esc(sr["id"]), _esc(namespace)], c)
    return ""


def _requisition(sr: Resource) -> str:
    req = sr.get("requisition") or {}
    if not req.get("value"):
        return ""
    ns = (req.get("assigner") or {}).get("display", "")
    return _join([_esc(req["value"]), _esc(ns)], SEPARATORS.component)


def _timing(sr: Resource) -> tuple[str | None, str | None]:
    if sr.get("occurrenceDateTime"):
        return sr["occurrenceDateTime"], None
    period = sr.get("occurrencePeriod") or {}
    return period.get("start"), period.get("end")


def _priority(sr: Resource) -> tuple[str, str] | None:
    return PRIORITY.get(sr.get("priority", ""))


def _tq(start: str | None, priority: tuple[str, str] | None) -> str:
    """v2.3-2.4 quantity/timing: ``^^^start^^priority`` (ORC-7, OBR-27)."""
    if not start and not priority:
        return ""
    return _join(["", "", "", _dtm(start), "", priority[0] if priority else ""],
                 SEPARATORS.component)


def _service_section(sr: Resource) -> str:
    for concept in sr.get("category") or []:
        for coding in concept.get("coding") or []:
            if coding.get("code") in SERVICE_SECTION:
                return SERVICE_SECTION[coding["code"]]
    return ""


def _parent(sr: Resource) -> str:
    for ref in sr.get("basedOn") or []:
        reference = ref.get("reference", "")
        if reference.startswith("ServiceRequest/"):
            return _esc(reference.split("/", 1)[1])
    return ""


def _collected(specimens: Sequence[Resource]) -> str | None:
    for s in specimens:
        collection = s.get("collection") or {}
        value = collection.get("collectedDateTime") or (
            collection.get("collectedPeriod") or {}).get("start")
        if value:
            return value
    return None


def _resolve(sr: Resource, reference: Resource | None, resource_type: str) -> Resource | None:
    """A referenced resource from ``contained`` (``#id``), or None."""
    if not reference:
        return None
    ref = reference.get("reference", "")
    if ref.startswith("#"):
        for r in sr.get("contained") or []:
            if r.get("id") == ref[1:]:
                return r
        raise OrderError(f"Contained resource {ref} not found")
    if resource_type == "Practitioner" and reference.get("display"):
        return {"display": reference["display"]}
    return None
