"""
``Subscription.criteria`` (``Type?param=a,b&other=c``) and whether a resource satisfies it,
with the semantics of the store's search.  Pure: no Twisted, safe on any thread.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence
from urllib.parse import parse_qsl

import attr

from medagent.storage.resources import SEARCH_PARAMS, index_values

# -- criteria ------------------------------------------------------------------------------


class CriteriaError(ValueError):
    """A Subscription.criteria we cannot evaluate; the text says why."""


@attr.s(frozen=True, auto_attribs=True)
class Criteria:
    """``Type?param=a,b&other=c``: AND across parameters, OR across comma values."""

    resource_type: str
    params: tuple[tuple[str, str, tuple[str, ...]], ...] = ()


def parse_criteria(text: Any) -> Criteria:
    """Parse ``ServiceRequest`` or ``ServiceRequest?status=active`` (the store's params)."""
    if not isinstance(text, str) or not text.strip():
        raise CriteriaError("Subscription.criteria is required")
    text = text.strip()
    resource_type, _, query = text.partition("?")
    if not re.fullmatch(r"[A-Z][A-Za-z]{1,63}", resource_type):
        raise CriteriaError(f"Subscription.criteria must start with a resource type, not "
                            f"{resource_type!r}")
    params = []
    for raw_name, value in parse_qsl(query, keep_blank_values=True):
        name, _, modifier = raw_name.partition(":")
        if name.startswith("_") and name != "_id":
            continue  # _count, _sort...: meaningless for one resource
        if name not in SEARCH_PARAMS:
            raise CriteriaError(f"Unsupported search parameter {name!r} in criteria "
                                f"(supported: {', '.join(SEARCH_PARAMS)})")
        if modifier and not (name == "name" and modifier in ("exact", "contains")):
            raise CriteriaError(f"Unsupported modifier {raw_name!r} in criteria")
        params.append((name, modifier, tuple(value.split(","))))
    return Criteria(resource_type, tuple(params))


def _value_matches(name: str, modifier: str, wanted: str,
                   rows: Sequence[tuple[str, str | None, str]], resource_id: Any) -> bool:
    if name == "_id":
        return resource_id == wanted
    if name in ("identifier", "code"):
        if "|" in wanted:
            system, _, token = wanted.partition("|")
            return any(p == name and v == token and (s == system if system else s is None)
                       for p, s, v in rows)
        return any(p == name and v == wanted for p, s, v in rows)
    if name == "name":
        wanted = wanted.lower()
        if modifier == "exact":
            return any(p == name and v == wanted for p, _, v in rows)
        if modifier == "contains":
            return any(p == name and wanted in v for p, _, v in rows)
        return any(p == name and v.startswith(wanted) for p, _, v in rows)
    return any(p == name and v == wanted for p, _, v in rows)


def matches(criteria: Criteria, resource: Mapping[str, Any]) -> bool:
    """Does C{resource} satisfy C{criteria} (same semantics as the store's search)?"""
    if resource.get("resourceType") != criteria.resource_type:
        return False
    if not criteria.params:
        return True
    rows = index_values(resource)
    return all(
        any(_value_matches(name, modifier, alt, rows, resource.get("id")) for alt in alts)
        for name, modifier, alts in criteria.params
    )
