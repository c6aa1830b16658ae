"""
L{Spec}: what one Subscription resource asks for (criteria, interactions, endpoint, secret,
max attempts, headers, end), checked once when it is written, with the reason it can never
fire when it cannot.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping

import attr

from medagent.relay.subscriptions.criteria import Criteria, CriteriaError, parse_criteria
from medagent.relay.webhooks import WebhookPolicy, header_problem

EXT_INTERACTION = "subscription-supported-interaction"
EXT_SECRET = "subscription-secret"
EXT_MAX_ATTEMPTS = "subscription-max-attempts"
EXT_FHIRPATH = "fhir-path-criteria-expression"
_MEDPLUM_EXT = re.compile(r"^https?://(?:www\.)?medplum\.com/fhir/StructureDefinition/(.+)$")

INTERACTIONS = ("create", "update", "delete")
DEFAULT_MAX_ATTEMPTS = 4
MAX_ATTEMPTS_CAP = 18


def _extensions(resource: Mapping[str, Any]) -> Iterable[tuple[str, Mapping[str, Any]]]:
    for ext in resource.get("extension") or []:
        if isinstance(ext, Mapping) and isinstance(ext.get("url"), str):
            m = _MEDPLUM_EXT.match(ext["url"])
            yield (m.group(1) if m else ext["url"]), ext


@attr.s(frozen=True, auto_attribs=True)
class Spec:
    """What we need from one Subscription resource, checked once when it is written."""

    id: str
    resource: Mapping[str, Any]
    active: bool
    criteria: Criteria | None
    interactions: frozenset[str]
    endpoint: str
    kind: str  # "bot" | "url" | ""
    secret: str | None
    max_attempts: int
    headers: tuple[tuple[str, str], ...]
    problem: str | None  # why it can never fire, if it cannot
    end: float | None = None  # Subscription.end: no notifications after it

    @property
    def usable(self) -> bool:
        return self.active and self.problem is None

    def live(self, now: float) -> bool:
        return self.usable and (self.end is None or now < self.end)


def subscription_spec(resource: Mapping[str, Any],
                      default_max_attempts: int = DEFAULT_MAX_ATTEMPTS,
                      policy: WebhookPolicy | None = None) -> Spec:
    """
    What a Subscription resource asks for, and why it can never fire if it cannot: an
    unusable Subscription is kept (and reported), never half-applied.
    """
    policy = policy or WebhookPolicy()
    problems: list[str] = []
    criteria: Criteria | None = None
    try:
        criteria = parse_criteria(resource.get("criteria"))
    except CriteriaError as e:
        problems.append(str(e))
    interactions: set[str] = set()
    secret = None
    max_attempts = default_max_attempts
    for name, ext in _extensions(resource):
        if name == EXT_INTERACTION:
            code = ext.get("valueCode")
            if code not in INTERACTIONS:
                problems.append(f"supported-interaction must be one of "
                                f"{', '.join(INTERACTIONS)}, not {code!r}")
            else:
                interactions.add(code)
        elif name == EXT_SECRET:
            if isinstance(ext.get("valueString"), str) and ext["valueString"]:
                secret = ext["valueString"]
        elif name == EXT_MAX_ATTEMPTS:
            value = ext.get("valueInteger")
            if isinstance(value, int) and not isinstance(value, bool):
                max_attempts = max(1, min(MAX_ATTEMPTS_CAP, value))
        elif name == EXT_FHIRPATH:
            # Firing without the filter could send orders the user meant to hold back.
            problems.append("fhir-path-criteria-expression is not supported by this relay")
    raw_channel = resource.get("channel")
    channel: Mapping[str, Any] = raw_channel if isinstance(raw_channel, Mapping) else {}
    raw_endpoint = channel.get("endpoint")
    endpoint: str = raw_endpoint if isinstance(raw_endpoint, str) else ""
    kind = ""
    if channel.get("type") != "rest-hook":
        problems.append(f"channel.type {channel.get('type')!r} is not supported "
                        "(only rest-hook)")
    elif re.fullmatch(r"Bot/[A-Za-z0-9\-.]{1,64}", endpoint):
        kind = "bot"
    elif re.match(r"https?://", endpoint, re.I):
        kind = "url"
        problem = policy.url_problem(endpoint)
        if problem:
            problems.append(problem)
    else:
        problems.append("channel.endpoint must be Bot/{id} or an https URL")
    end: float | None = None
    if resource.get("end") is not None:
        try:
            when = datetime.fromisoformat(str(resource["end"]).replace("Z", "+00:00"))
            if when.tzinfo is None:
                when = when.replace(tzinfo=timezone.utc)
            end = when.timestamp()
        except ValueError:
            problems.append(f"Subscription.end {resource['end']!r} is not a dateTime")
    headers = []
    for header in channel.get("header") or []:
        key, _, value = header.partition(":") if isinstance(header, str) else ("", "", "")
        key, value = key.strip(), value.strip()
        if not re.fullmatch(r"[A-Za-z0-9\-]{1,64}", key) or len(value) > 1024:
            problems.append("channel.header entries must be 'Name: value' (a token name, "
                            "at most 1024 characters of value)")
            continue
        problem = header_problem(key, value)
        if problem:
            problems.append(problem)
        else:
            headers.append((key, value))
    return Spec(
        id=str(resource.get("id")),
        resource=resource,
        active=resource.get("status") == "active",
        criteria=criteria,
        interactions=frozenset(interactions) or frozenset(INTERACTIONS),
        endpoint=endpoint,
        kind=kind,
        secret=secret,
        max_attempts=max_attempts,
        headers=tuple(headers),
        problem="; ".join(problems) or None,
        end=end,
    )
