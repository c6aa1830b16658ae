"""
FHIR ServiceRequest (+ Patient) -> Modality Worklist item, and the worklist item keys.

The mapping is documented in ``docs/dicom.md``.  Pure: JSON in, pydicom Dataset out.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

DCM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
MODALITIES = {
    "AR", "AU", "BDUS", "BI", "BMD", "CR", "CT", "DG", "DOC", "DX", "ECG", "EPS", "ES", "GM",
    "HC", "HD", "IO", "IVOCT", "IVUS", "KER", "LS", "MG", "MR", "NM", "OAM", "OCT", "OP",
    "OPM", "OPT", "OPV", "OSS", "OT", "PR", "PT", "PX", "RF", "RG", "RTIMAGE", "SM", "SR",
    "US", "XA", "XC",
}
SCHEME_DESIGNATORS = {
    "http://loinc.org": "LN",
    "http://snomed.info/sct": "SCT",
    DCM_SYSTEM: "DCM",
    "http://www.radlex.org": "RADLEX",
    "http://www.ama-assn.org/go/cpt": "C4",
}
PRIORITIES = {"routine": "ROUTINE", "urgent": "HIGH", "asap": "HIGH", "stat": "STAT"}
SEX = {"male": "M", "female": "F", "other": "O"}
CANCEL_STATUSES = {"revoked", "entered-in-error", "completed"}


class MappingError(ValueError):
    """A FHIR body we cannot turn into a worklist item; the message says what is missing."""


def item_keys(ds: Dataset) -> tuple[str, str]:
    """(Accession Number, Scheduled Procedure Step ID) of a worklist item."""
    accession = str(ds.get("AccessionNumber", "") or "").strip()
    sps_id = ""
    sps = ds.get("ScheduledProcedureStepSequence")
    if sps:
        sps_id = str(sps[0].get("ScheduledProcedureStepID", "") or "").strip()
    return accession, sps_id


def sps_status(ds: Dataset) -> str:
    sps = ds.get("ScheduledProcedureStepSequence")
    if sps:
        return str(sps[0].get("ScheduledProcedureStepStatus", "") or "").strip()
    return ""


def set_sps_status(ds: Dataset, status: str) -> None:
    for step in ds.get("ScheduledProcedureStepSequence") or []:
        step.ScheduledProcedureStepStatus = status


def _codings(concept: Mapping[str, Any] | None) -> list[Mapping[str, Any]]:
    if not isinstance(concept, Mapping):
        return []
    return [c for c in concept.get("coding") or [] if isinstance(c, Mapping)]


def _sh(value: Any, limit: int = 16) -> str:
    text = re.sub(r"[\\\r\n\t]", " ", str(value or "")).strip()
    return text[:limit]


def _lo(value: Any) -> str:
    return _sh(value, 64)


def _date_time(value: str | None) -> tuple[str, str]:
    """FHIR date/dateTime -> (DA, TM), kept in the time zone it was written in."""
    if not value:
        return "", ""
    m = re.match(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?(?:T(\d{2}):(\d{2})(?::(\d{2}))?)?", value)
    if not m:
        raise MappingError(f"not a FHIR date/dateTime: {value!r}")
    y, mo, d, hh, mm, ss = m.groups()
    date = y + (mo or "01") + (d or "01")
    time = (hh + mm + (ss or "00")) if hh else ""
    return date, time


def _person_name(names: Any) -> str:
    if not isinstance(names, list) or not names:
        return ""
    name = names[0] if isinstance(names[0], Mapping) else {}
    family = str(name.get("family") or "")
    given = [str(g) for g in name.get("given") or []]
    prefix = " ".join(str(p) for p in name.get("prefix") or [])
    suffix = " ".join(str(s) for s in name.get("suffix") or [])
    parts = [family, given[0] if given else "", " ".join(given[1:]), prefix, suffix]
    while parts and not parts[-1]:
        parts.pop()
    pn = "^".join(p.replace("^", " ").replace("\\", " ") for p in parts)
    if not pn and name.get("text"):
        pn = str(name["text"]).replace("\\", " ")
    return pn[:64 * 5]


def _identifier(resource: Mapping[str, Any], type_code: str | None = None,
                system_hint: str | None = None) -> Mapping[str, Any] | None:
    for ident in resource.get("identifier") or []:
        if not isinstance(ident, Mapping) or not ident.get("value"):
            continue
        if type_code and any(c.get("code") == type_code for c in _codings(ident.get("type"))):
            return ident
        if system_hint and system_hint in str(ident.get("system") or "").lower():
            return ident
    return None


def _resolve(reference: str | None, resources: list[Mapping[str, Any]],
             container: Mapping[str, Any]) -> Mapping[str, Any] | None:
    if not reference:
        return None
    if reference.startswith("#"):
        for res in container.get("contained") or []:
            if isinstance(res, Mapping) and res.get("id") == reference[1:]:
                return res
        return None
    for res in resources:
        rid = f"{res.get('resourceType')}/{res.get('id')}"
        if reference == rid or reference == res.get("_fullUrl") or reference.endswith("/" + rid):
            return res
    return None


def _collect(body: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    if body.get("resourceType") == "Bundle":
        out: list[Mapping[str, Any]] = []
        for entry in body.get("entry") or []:
            res = entry.get("resource") if isinstance(entry, Mapping) else None
            if isinstance(res, Mapping):
                res = dict(res)
                if entry.get("fullUrl"):
                    res["_fullUrl"] = entry["fullUrl"]
                out.append(res)
        return out
    return [body]


def _modality(request: Mapping[str, Any]) -> str:
    concepts = [request.get("code")] + list(request.get("category") or []) + list(
        request.get("orderDetail") or []) + [request.get("performerType")]
    for concept in concepts:
        for c in _codings(concept):
            code = str(c.get("code") or "").upper()
            if code in MODALITIES and (c.get("system") in (DCM_SYSTEM, None)):
                return code
    return ""


def parse_fhir(body: str | Mapping[str, Any]) -> tuple[list, list]:
    """(the ServiceRequests, all resources) of a ServiceRequest or a Bundle."""
    try:
        obj = json.loads(body) if isinstance(body, str) else body
    except ValueError as e:
        raise MappingError(f"the FHIR body is not JSON ({e})")
    if not isinstance(obj, Mapping) or obj.get("resourceType") not in ("Bundle",
                                                                        "ServiceRequest"):
        raise MappingError("expected a FHIR ServiceRequest or a Bundle holding one")
    resources = _collect(obj)
    requests = [r for r in resources if r.get("resourceType") == "ServiceRequest"]
    if not requests:
        raise MappingError("the Bundle holds no ServiceRequest")
    return requests, resources


def accession_of(request: Mapping[str, Any]) -> str:
    ident = _identifier(request, "ACSN", "accession")
    if ident is None and isinstance(request.get("requisition"), Mapping):
        ident = request["requisition"]
    if ident is None or not ident.get("value"):
        ident = _identifier(request, "PLAC", "placer")
    if ident is None and request.get("id"):
        return _sh(request["id"])
    if ident is None:
        raise MappingError("the ServiceRequest has no accession number (identifier with type "
                           "ACSN), requisition, placer identifier or id")
    return _sh(ident["value"])


def service_request_to_item(
    request: Mapping[str, Any],
    resources: list[Mapping[str, Any]],
    *,
    default_modality: str = "",
    default_station_ae: str = "",
) -> Dataset:
    """One worklist item for C{request} (see docs/dicom.md for the field mapping)."""
    patient = _resolve((request.get("subject") or {}).get("reference"), resources, request)
    if patient is None or patient.get("resourceType") != "Patient":
        raise MappingError("the ServiceRequest's subject Patient is not in the body "
                           "(contain it, or send a Bundle with it)")
    accession = accession_of(request)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    # Patient
    ds.PatientName = _person_name(patient.get("name"))
    pid = _identifier(patient, "MR") or next(
        (i for i in patient.get("identifier") or [] if isinstance(i, Mapping) and i.get("value")),
        None)
    if pid is None:
        raise MappingError("the Patient has no identifier (Patient ID)")
    ds.PatientID = _lo(pid["value"])
    if pid.get("system"):
        ds.IssuerOfPatientID = _lo(pid["system"])
    ds.PatientBirthDate = _date_time(patient.get("birthDate"))[0]
    ds.PatientSex = SEX.get(str(patient.get("gender") or ""), "")
    # Imaging service request
    ds.AccessionNumber = accession
    requester = (request.get("requester") or {}).get("display") or ""
    ds.ReferringPhysicianName = _person_name([{"text": requester}]) if requester else ""
    ds.RequestingPhysician = ds.ReferringPhysicianName
    placer = _identifier(request, "PLAC", "placer")
    filler = _identifier(request, "FILL", "filler")
    if placer:
        ds.PlacerOrderNumberImagingServiceRequest = _lo(placer["value"])
    if filler:
        ds.FillerOrderNumberImagingServiceRequest = _lo(filler["value"])
    # Requested procedure
    code = request.get("code") or {}
    codings = [c for c in _codings(code) if c.get("system") != DCM_SYSTEM] or _codings(code)
    description = code.get("text") or (codings[0].get("display") if codings else "") or ""
    ds.RequestedProcedureID = accession
    ds.RequestedProcedureDescription = _lo(description)
    if codings:
        c = codings[0]
        item = Dataset()
        item.CodeValue = _sh(c.get("code"))
        item.CodingSchemeDesignator = SCHEME_DESIGNATORS.get(str(c.get("system") or ""),
                                                             "99LOCAL")
        item.CodeMeaning = _lo(c.get("display") or description)
        ds.RequestedProcedureCodeSequence = Sequence([item])
    ds.RequestedProcedurePriority = PRIORITIES.get(str(request.get("priority") or ""),
                                                   "ROUTINE")
    study_uid = _identifier(request, None, "urn:dicom:uid")
    if study_uid:
        ds.StudyInstanceUID = str(study_uid["value"]).replace("urn:oid:", "")
    else:
        # Stable across updates of the same order, so images, MPPS and SR agree.
        ds.StudyInstanceUID = generate_uid(entropy_srcs=["medagent-mwl", ds.PatientID,
                                                         accession])
    # Scheduled procedure step
    step = Dataset()
    step.Modality = _modality(request) or default_modality
    step.ScheduledStationAETitle = default_station_ae
    when = request.get("occurrenceDateTime") or (request.get("occurrencePeriod") or {}).get(
        "start") or request.get("authoredOn")
    step.ScheduledProcedureStepStartDate, step.ScheduledProcedureStepStartTime = _date_time(
        when)
    step.ScheduledPerformingPhysicianName = ""
    step.ScheduledProcedureStepDescription = _lo(description)
    step.ScheduledProcedureStepID = accession
    step.ScheduledProcedureStepStatus = "SCHEDULED"
    if codings:
        step.ScheduledProtocolCodeSequence = Sequence([ds.RequestedProcedureCodeSequence[0]])
    ds.ScheduledProcedureStepSequence = Sequence([step])
    note = " ".join(str(n.get("text")) for n in request.get("note") or []
                    if isinstance(n, Mapping) and n.get("text"))
    if note:
        step.CommentsOnTheScheduledProcedureStep = note[:10240]
    return ds
