"""
JSON from outside, parsed with a bound on nesting depth: one helper for every decode boundary
(REST bodies, ``/oauth2/token``, websocket frames).

``json.loads`` alone turns ``[[[[...`` into a C{RecursionError} (a 500, a dropped websocket),
and a document that parses at depth 900 still breaks whatever recursive code touches it next.
So the depth is bounded by a fixed number, independent of the interpreter's recursion limit
and of how deep the caller's stack happens to be.  No I/O.
"""

from __future__ import annotations

import json
from typing import Any

#: Deepest nesting of arrays/objects accepted.  FHIR resources (even nested Questionnaire
#: items inside a Bundle) stay far below; Medplum's agent messages are 2-3 deep.
MAX_JSON_DEPTH = 100


class JSONInputError(ValueError):
    """Not acceptable JSON; C{msg} is a short reason that never quotes the input."""

    def __init__(self, msg: str) -> None:
        super().__init__(msg)
        self.msg = msg


def depth_exceeds(value: Any, max_depth: int = MAX_JSON_DEPTH) -> bool:
    """
    True when arrays/objects in the parsed C{value} nest deeper than C{max_depth}.  Iterative
    (no recursion of its own) and stops at the first container that is too deep.
    """
    if type(value) is not list and type(value) is not dict:
        return False
    stack: list[tuple[Any, int]] = [(value, 1)]
    pop, push = stack.pop, stack.append
    while stack:
        container, depth = pop()
        if depth > max_depth:
            return True
        for child in (container.values() if type(container) is dict else container):
            if type(child) is list or type(child) is dict:
                push((child, depth + 1))
    return False


def _no_constant(name: str) -> Any:
    # Python's json reads NaN/Infinity, which are not JSON; downstream float checks
    # (``x <= 0``) then silently pass a NaN
    raise JSONInputError(f"{name} is not a JSON number")


def loads(data: bytes | str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """
    C{json.loads} with a depth bound.  Raises L{JSONInputError} (a C{ValueError}) for invalid
    UTF-8, invalid JSON and too deep nesting; nothing else escapes.
    """
    if isinstance(data, (bytes, bytearray)):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as e:
            raise JSONInputError(f"not valid UTF-8 (byte {e.start})")
    try:
        value = json.loads(data, parse_constant=_no_constant)
    except RecursionError:
        raise JSONInputError(f"nested deeper than {max_depth} levels")
    except ValueError as e:
        msg = getattr(e, "msg", None) or "invalid JSON"
        pos = getattr(e, "pos", None)
        raise JSONInputError(f"{msg} (char {pos})" if pos is not None else msg)
    # cheap: a document with few brackets cannot be deep
    if data.count("[") + data.count("{") > max_depth and depth_exceeds(value, max_depth):
        raise JSONInputError(f"nested deeper than {max_depth} levels")
    return value
