"""
FHIR ``ServiceRequest`` (+ ``Patient``, ``Specimen``) -> an ASTM E1394 order message
(H, P, O, [C], L) to push to an analyzer as ``x-application/astm``.  Pure code.

Field mapping (E1394 field numbers; protocols.md 2.7.2 and the example in 2.8):

* H-3 control id (``control_id``), H-5 ``sender``, H-10 ``receiver``, H-12 ``processing_id``,
  H-13 ``version``, H-14 now;
* P-3 practice patient ID (the MR identifier, else the first identifier, else ``Patient.id``),
  P-6 name ``family^given^middle^suffix^prefix`` (official name first), P-8 birth date,
  P-9 sex M/F/U;
* O-3 specimen ID (``Specimen.accessionIdentifier``, else its first identifier, else
  ``ServiceRequest.requisition``), O-5 tests as ``^^^CODE`` (repeated), O-6 priority
  (stat S, asap/urgent A, routine R), O-7 ``authoredOn``, O-8 ``Specimen.collection``,
  O-12 action code (``N``; ``C`` when the request is revoked or entered in error),
  O-16 specimen type, O-17 requester, O-26 report type ``O``;
* one C record per ``ServiceRequest.note``; L-3 ``N``.

Times keep the wall-clock digits written in the resource (analyzers have no time zones);
pass C{tz} to convert offset-carrying times to the analyzer's zone first.
"""

from __future__ import annotations

import re
from datetime import datetime, tzinfo
from typing import Any, Mapping, Sequence

from medagent.astm.codec import DEFAULT_DELIMITERS, Delimiters, encode_message


class OrderError(ValueError):
    """The resources do not hold what an ASTM order needs; the message says what is missing."""


_PRIORITY = {"stat": "S", "asap": "A", "urgent": "A", "routine": "R"}
_SEX = {"male": "M", "female": "F"}
_CANCELLED = ("revoked", "entered-in-error")
_FHIR_TIME = re.compile(
    r"^(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.\d+)?)?)?)?)?"
    r"(Z|[+-]\d{2}:\d{2})?$")


def astm_datetime(value: str | None, tz: tzinfo | None = None) -> str:
    """FHIR date/dateTime -> ``YYYY[MM[DD[HHMM[SS]]]]``; '' for nothing."""
    if not value:
        return ""
    m = _FHIR_TIME.match(value.strip())
    if not m:
        raise OrderError(f"not a FHIR date/time: {value!r}")
    if tz is not None and m.group(7) and m.group(4):
        dt = datetime.fromisoformat(value.strip().replace("Z", "+00:00")).astimezone(tz)
        return dt.strftime("%Y%m%d%H%M%S")
    digits = [g for g in m.groups()[:6] if g]
    if m.group(4) and not m.group(6):
        digits.append("00")
    return "".join(digits)


def _first(items: Any) -> Mapping[str, Any]:
    return items[0] if isinstance(items, list) and items and isinstance(items[0], dict) else {}


def _patient_id(patient: Mapping[str, Any]) -> str:
    identifiers = [i for i in patient.get("identifier") or [] if isinstance(i, dict)
                   and i.get("value")]
    for ident in identifiers:
        codes = [c.get("code") for c in (ident.get("type") or {}).get("coding") or []]
        if "MR" in codes:
            return str(ident["value"])
    if identifiers:
        return str(identifiers[0]["value"])
    return str(patient.get("id") or "")


def _patient_name(patient: Mapping[str, Any]) -> list[str]:
    names = [n for n in patient.get("name") or [] if isinstance(n, dict)]
    if not names:
        return []
    name = next((n for n in names if n.get("use") == "official"), names[0])
    given = list(name.get("given") or [])
    parts = [name.get("family") or "", given[0] if given else "",
             " ".join(given[1:]), _first_str(name.get("suffix")), _first_str(name.get("prefix"))]
    while parts and not parts[-1]:
        parts.pop()
    return parts


def _first_str(values: Any) -> str:
    return str(values[0]) if isinstance(values, list) and values else ""


def _specimen_id(service_request: Mapping[str, Any], specimen: Mapping[str, Any] | None) -> str:
    if specimen:
        acc = specimen.get("accessionIdentifier") or {}
        if acc.get("value"):
            return str(acc["value"])
        ident = _first([i for i in specimen.get("identifier") or [] if isinstance(i, dict)
                        and i.get("value")])
        if ident:
            return str(ident["value"])
    req = service_request.get("requisition") or {}
    if req.get("value"):
        return str(req["value"])
    raise OrderError("no specimen ID: give a Specimen with accessionIdentifier or identifier, "
                     "or a ServiceRequest.requisition")


def _tests(service_request: Mapping[str, Any], test_system: str | None) -> list[str]:
    codings = [c for c in (service_request.get("code") or {}).get("coding") or []
               if isinstance(c, dict) and c.get("code")]
    if test_system is not None:
        codings = [c for c in codings if c.get("system") == test_system]
    elif codings:
        codings = codings[:1]  # several codings of one concept are one test, not several
    if not codings:
        raise OrderError("no test code in ServiceRequest.code"
                         + (f" with system {test_system}" if test_system else ""))
    return [str(c["code"]) for c in codings]


def _specimen_type(specimen: Mapping[str, Any] | None) -> str:
    if not specimen:
        return ""
    stype = specimen.get("type") or {}
    if stype.get("text"):
        return str(stype["text"])
    return str(_first(stype.get("coding")).get("code") or "")


def service_request_to_astm(
    service_request: Mapping[str, Any],
    patient: Mapping[str, Any] | None = None,
    specimen: Mapping[str, Any] | None = None,
    *,
    sender: str = "MEDAGENT",
    receiver: str = "",
    processing_id: str = "P",
    version: str = "LIS2-A2",
    control_id: str = "",
    tests: Sequence[str] | None = None,
    test_system: str | None = None,
    test_component: int = 4,
    action_code: str = "N",
    specimen_type: str | None = None,
    now: datetime | None = None,
    tz: tzinfo | None = None,
    delimiters: Delimiters = DEFAULT_DELIMITERS,
) -> str:
    """
    Build the order message (records each ending in CR).  C{tests} overrides the test codes
    taken from ``ServiceRequest.code`` (the first coding, or every coding of C{test_system});
    C{test_component} is the component of the universal test ID that carries the code (4 =
    manufacturer's local code, ``^^^GLU``, what most analyzers read).
    """
    if not isinstance(service_request, Mapping) or \
            service_request.get("resourceType") != "ServiceRequest":
        raise OrderError("service_request must be a FHIR ServiceRequest (JSON object)")
    if patient is not None and patient.get("resourceType") not in (None, "Patient"):
        raise OrderError("patient must be a FHIR Patient")
    if specimen is not None and specimen.get("resourceType") not in (None, "Specimen"):
        raise OrderError("specimen must be a FHIR Specimen")
    if not 1 <= test_component <= 4:
        raise OrderError("test_component must be 1..4")
    codes = list(tests) if tests else _tests(service_request, test_system)
    universal = [[""] * (test_component - 1) + [code] for code in codes]
    stamp = (now or datetime.now()).strftime("%Y%m%d%H%M%S")

    header = ["H", delimiters.definition, control_id, None, sender, None, None, None, None,
              receiver, None, processing_id, version, stamp]
    p = patient or {}
    patient_rec = ["P", "1", _patient_id(p) if p else "", None, None,
                   _patient_name(p) if p else None, None,
                   astm_datetime(p.get("birthDate")) if p else None,
                   (_SEX.get(p.get("gender", ""), "U") if p.get("gender") else None) if p else None]
    status = service_request.get("status")
    collected = (specimen or {}).get("collection") or {}
    order: list[Any] = [None] * 26
    order[0] = "O"
    order[1] = "1"
    order[2] = _specimen_id(service_request, specimen)
    order[4] = universal if len(universal) > 1 else universal[0]
    order[5] = _PRIORITY.get(service_request.get("priority") or "routine", "R")
    order[6] = astm_datetime(service_request.get("authoredOn"), tz)
    order[7] = astm_datetime(collected.get("collectedDateTime")
                             or (collected.get("collectedPeriod") or {}).get("start"), tz)
    order[11] = "C" if status in _CANCELLED else action_code
    order[15] = specimen_type if specimen_type is not None else _specimen_type(specimen)
    order[16] = (service_request.get("requester") or {}).get("display")
    order[25] = "O"
    records: list[list[Any]] = [header, patient_rec, order]
    for n, note in enumerate([x for x in service_request.get("note") or []
                              if isinstance(x, dict) and x.get("text")], start=1):
        records.append(["C", str(n), "L", str(note["text"]).replace("\r", " ")
                        .replace("\n", " "), "G"])
    records.append(["L", "1", "N"])
    return encode_message(records, delimiters)
