"""
What every resource store agrees on, whatever database holds it: the resource types the relay
keeps, the search parameters and the index rows they are found by, the checks a resource
passes before any store sees it, and L{search_one}.  The SQL lives in
L{medagent.storage.sqlite.store}; the contract is L{medagent.storage.interfaces.ResourceStore}.
"""

from __future__ import annotations

import re

from datetime import datetime, timezone
from typing import Any, Iterable, Mapping

from twisted.internet.defer import inlineCallbacks

from medagent.fhir import bad_request, not_found
from medagent.storage.interfaces import ResourceStore

#: Resource types this relay keeps.
RESOURCE_TYPES = frozenset(
    [
        "Agent",
        "Device",
        "Endpoint",
        "Bot",
        "Subscription",
        "ClientApplication",
        "ServiceRequest",
        "Patient",
        "Practitioner",
        "Specimen",
        "Organization",
        "Observation",
        "DiagnosticReport",
        "Binary",
        "AuditEvent",
        "ImagingStudy",
        "Task",
    ]
)

#: Search parameters we index, and where their values come from.
SEARCH_PARAMS = ("_id", "identifier", "name", "url", "status", "address", "subject", "code")

MAX_RESOURCE_BYTES = 16 * 1024 * 1024

_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


def now_iso(seconds: float | None = None) -> str:
    """An instant (now, or C{seconds} since the epoch) as FHIR text, UTC, milliseconds."""
    when = (datetime.now(timezone.utc) if seconds is None
            else datetime.fromtimestamp(seconds, timezone.utc))
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def index_values(resource: Mapping[str, Any]) -> list[tuple[str, str | None, str]]:
    """
    The (param, system, value) rows a resource is found by.  Strings are lower-cased for
    ``name``; tokens keep their case, as FHIR says.
    """
    rows: list[tuple[str, str | None, str]] = []
    for ident in _as_list(resource.get("identifier")):
        if isinstance(ident, Mapping) and isinstance(ident.get("value"), str):
            rows.append(("identifier", _str_or_none(ident.get("system")), ident["value"]))
    for name in _names(resource.get("name")):
        rows.append(("name", None, name.lower()))
    for key in ("url", "status", "address"):
        if isinstance(resource.get(key), str):
            rows.append((key, None, resource[key]))
    subject = resource.get("subject")
    if isinstance(subject, Mapping) and isinstance(subject.get("reference"), str):
        rows.append(("subject", None, subject["reference"]))
    code = resource.get("code")
    if isinstance(code, Mapping):
        for coding in _as_list(code.get("coding")):
            if isinstance(coding, Mapping) and isinstance(coding.get("code"), str):
                rows.append(("code", _str_or_none(coding.get("system")), coding["code"]))
    return rows


def _str_or_none(value: Any) -> str | None:
    """A system that is not a string cannot be searched for: index the value without it."""
    return value if isinstance(value, str) else None


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _names(value: Any) -> Iterable[str]:
    for item in _as_list(value):
        if isinstance(item, str):
            yield item
        elif isinstance(item, Mapping):
            if isinstance(item.get("text"), str):
                yield item["text"]
            if isinstance(item.get("family"), str):
                yield item["family"]
            for given in _as_list(item.get("given")):
                if isinstance(given, str):
                    yield given
            if isinstance(item.get("name"), str):  # Device.deviceName[].name
                yield item["name"]
    return


def check_resource(resource: Any, resource_type: str) -> None:
    if not isinstance(resource, dict):
        raise bad_request("Resource must be a JSON object")
    if resource.get("resourceType") != resource_type:
        raise bad_request(
            f"resourceType {resource.get('resourceType')!r} does not match {resource_type}"
        )
    if resource_type not in RESOURCE_TYPES:
        raise not_found(f"Unsupported resource type {resource_type}")
    # The store writes meta and id itself and indexes a few fields: a wrong shape there is the
    # caller's mistake (400), never a crash inside the write transaction (500).
    meta = resource.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise bad_request("meta must be a JSON object")
    for key in ("versionId", "lastUpdated"):
        if isinstance(meta, dict) and not isinstance(meta.get(key, ""), str):
            raise bad_request(f"meta.{key} must be a string")
    rid = resource.get("id")
    if rid is not None and not (isinstance(rid, str) and _FHIR_ID.fullmatch(rid)):
        raise bad_request("id must be 1-64 characters: letters, digits, '-' and '.'")


def int_param(name: str, value: str, low: int, high: int) -> int:
    """A search control parameter (C{_count}, C{_offset}) as an int in [low, high], or 400."""
    try:
        n = int(value)
    except ValueError:
        raise bad_request(f"{name} must be an integer")
    if not low <= n <= high:
        raise bad_request(f"{name} must be between {low} and {high}")
    return n


@inlineCallbacks
def search_one(store: ResourceStore, resource_type: str, params: Mapping[str, list[str]]):
    """The single match of a search; 404 when none, 400 when several."""
    found = yield store.search(resource_type, {**params, "_count": ["2"]})
    if not found:
        raise not_found(f"No {resource_type} matches the search")
    if len(found) > 1:
        raise bad_request(f"Search matches more than one {resource_type}")
    return found[0]
