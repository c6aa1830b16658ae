"""
C-FIND attribute matching (PS3.4 C.2.2.2) for the worklist: single value, universal, wildcard,
range, UID list and sequence matching, and the projection of a match onto the requested keys.

Pure: pydicom datasets in, pydicom datasets out.
"""

from __future__ import annotations

import re
from functools import lru_cache

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

SPECIFIC_CHARACTER_SET = 0x00080005
_RANGE_VRS = {"DA", "TM", "DT"}
_NO_WILDCARD_VRS = {"DA", "TM", "DT", "UI", "SQ", "OB", "OW", "UN", "US", "SS", "UL", "SL",
                    "FL", "FD", "IS", "DS", "AT"}


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or value.__class__.__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _empty(elem) -> bool:
    if elem is None:
        return True
    if elem.VR == "SQ":
        return len(elem.value or []) == 0
    return _text(elem.value) == ""


@lru_cache(maxsize=512)
def _wildcard(pattern: str, fold: bool) -> re.Pattern:
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile(regex + r"\Z", re.IGNORECASE | re.DOTALL if fold else re.DOTALL)


def _time_key(value: str) -> str:
    value = value.replace(":", "")
    whole, _, frac = value.partition(".")
    return whole.ljust(6, "0") + "." + frac.ljust(6, "0")


def _in_range(query: str, value: str, vr: str) -> bool:
    low, _, high = query.partition("-")
    norm = _time_key if vr == "TM" else (lambda s: s)
    v = norm(value)
    if low and v < norm(low):
        return False
    if high:
        h = norm(high)
        if vr == "DA" and len(high) == 8:
            return v <= h
        if vr == "TM":
            return v <= h
        return v[: len(high)] <= h
    return True


def match_value(query_elem, item_elem) -> bool:
    """One non-sequence key against the item's element (None if the item lacks it)."""
    if _empty(query_elem):
        return True  # universal matching
    vr = query_elem.VR
    q = _text(query_elem.value)
    if item_elem is None or _empty(item_elem):
        return False
    v = _text(item_elem.value)
    if vr in _RANGE_VRS and "-" in q:
        return _in_range(q, v, vr)
    if vr == "UI" and "\\" in q:
        return v in q.split("\\")
    fold = vr == "PN"
    if vr not in _NO_WILDCARD_VRS and ("*" in q or "?" in q):
        values = v.split("\\") if "\\" in v else [v]
        return any(_wildcard(q, fold).match(x) for x in values)
    if fold:
        return q.upper() == v.upper()
    if vr in ("DA", "TM", "DT"):
        return _time_key(q) == _time_key(v) if vr == "TM" else q == v
    return q == v or q in v.split("\\")


def matches(query: Dataset, item: Dataset) -> bool:
    """True if C{item} matches every matching key in C{query}."""
    for q in query:
        if q.tag == SPECIFIC_CHARACTER_SET or q.tag.group in (0x0000, 0x0002):
            continue
        it = item.get(q.tag)
        if q.VR == "SQ":
            if not q.value or all(len(sub) == 0 for sub in q.value):
                continue
            sub_query = q.value[0]
            if it is None or it.VR != "SQ" or not it.value:
                if _all_universal(sub_query):
                    continue
                return False
            if not any(matches(sub_query, sub) for sub in it.value):
                return False
        elif not match_value(q, it):
            return False
    return True


def _all_universal(query: Dataset) -> bool:
    for q in query:
        if q.VR == "SQ":
            if q.value and not all(_all_universal(s) for s in q.value):
                return False
        elif not _empty(q):
            return False
    return True


def project(query: Dataset, item: Dataset) -> Dataset:
    """The response identifier: exactly the requested keys, with the item's values."""
    out = Dataset()
    if SPECIFIC_CHARACTER_SET in item:
        out.SpecificCharacterSet = item.SpecificCharacterSet
    for q in query:
        if q.tag == SPECIFIC_CHARACTER_SET or q.tag.group in (0x0000, 0x0002):
            continue
        it = item.get(q.tag)
        if q.VR == "SQ":
            sub_query = q.value[0] if q.value else None
            items = []
            if it is not None and it.VR == "SQ":
                for sub in it.value:
                    if sub_query is None:
                        items.append(sub)
                    elif matches(sub_query, sub):
                        items.append(project(sub_query, sub) if len(sub_query) else sub)
            out.add_new(q.tag, "SQ", Sequence(items))
        elif it is None:
            out.add_new(q.tag, q.VR, None)
        else:
            out.add_new(it.tag, it.VR, it.value)
    return out
