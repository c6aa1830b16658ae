"""
Bulk retry: every failed or expired push matching a search, retried one by one through the
push service's own L{medagent.relay.push.PushService.retry} (the same checks, the same hub
path as a single retry), at most L{MAX_BULK_RETRY} per action, each retried push recorded as
an C{AuditEvent} (who, which push, from where; never the payload).

The console's "Retry all N failed matching this filter" and ``POST AgentPush/$retry`` (the
CLI's ``medagent pushes retry --all``) are its two callers; operators and admins only.
"""

from __future__ import annotations

from typing import Any, Mapping

import attr
from twisted.logger import Logger

from medagent.fhir import FHIRError, forbidden
from medagent.relay.audit import INTERACTION, REST, client_audit_event, push_entities
from medagent.relay.auth import Principal
from medagent.storage import journal as j

log = Logger()

#: The most pushes one bulk retry retries (the rest wait for the next action).
MAX_BULK_RETRY = 500
#: The states a bulk retry picks (what a single retry accepts).
RETRYABLE = (j.FAILED, j.EXPIRED)


@attr.s(auto_attribs=True, frozen=True)
class BulkRetry:
    """What a bulk retry did: C{matched} pushes matched (all of them, beyond the cap too),
    C{retried} their ids, C{skipped} (id, why) of those that could not be retried (moved on
    meanwhile, or not this principal's to manage)."""

    matched: int
    retried: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]
    limit: int

    @property
    def remaining(self) -> int:
        """Matched but not tried in this action (over the cap)."""
        return max(0, self.matched - len(self.retried) - len(self.skipped))

    def to_json(self) -> dict[str, Any]:
        return {"resourceType": "AgentPushRetry", "matched": self.matched,
                "retried": len(self.retried), "skipped": len(self.skipped),
                "remaining": self.remaining, "limit": self.limit,
                "pushes": [{"id": i, "result": "retried"} for i in self.retried]
                + [{"id": i, "result": "skipped", "reason": why} for i, why in self.skipped]}


def retry_states(params: Mapping[str, str]) -> tuple[str, ...]:
    """
    The states a bulk retry with these filters picks: the filter's own when it is failed or
    expired, both when it names none, none at all for any other state.
    """
    state = params.get("state")
    if not state:
        return RETRYABLE
    return (state,) if state in RETRYABLE else ()


async def count_retryable(journal: Any, params: Mapping[str, str]) -> int:
    """How many pushes a bulk retry with these filters would match (one count per state)."""
    total = 0
    for state in retry_states(params):
        _, n, _ = await journal.search_page({**params, "state": state}, count=0)
        total += n
    return total


async def retry_matching(pushes: Any, journal: Any, store: Any, principal: Principal,
                         params: Mapping[str, str], *, address: str, now: float,
                         via: str, limit: int = MAX_BULK_RETRY) -> BulkRetry:
    """
    Retry the failed/expired pushes matching C{params} (the journal's search filters), the
    newest C{limit} of them, oldest first (the order they were pushed in).  Each goes through
    C{pushes.retry}; one refused (409: it moved on; 403/404) is skipped, with its reason.
    Each retried push is audited (C{via}: where it was asked, for the audit text) before the
    next is tried.  Operators and admins only.
    """
    if not principal.may_operate():
        raise forbidden("Bulk retry needs an operator or admin client")
    if not 1 <= limit <= MAX_BULK_RETRY:
        raise ValueError(f"limit must be from 1 to {MAX_BULK_RETRY}")
    matched = 0
    found: list[j.Push] = []
    for state in retry_states(params):
        query = {**params, "state": state}
        page, n, _ = await journal.search_page(query, count=limit)
        matched += n
        found += page
    chosen = sorted(found, key=lambda p: p.seq or 0, reverse=True)[:limit]
    retried: list[str] = []
    skipped: list[tuple[str, str]] = []
    for push in sorted(chosen, key=lambda p: p.seq or 0):
        try:
            await pushes.retry(principal, push.id)
        except FHIRError as e:
            if e.status not in (403, 404, 409):
                raise
            skipped.append((push.id, e.message))
            continue
        retried.append(push.id)
        await store.create(retry_audit_event(principal, push, address, now, via))
    log.info("{client_id} retried {n} push(es) in bulk via {via} ({skipped} skipped, "
             "{matched} matched)", client_id=principal.client_id, n=len(retried), via=via,
             skipped=len(skipped), matched=matched)
    return BulkRetry(matched, tuple(retried), tuple(skipped), limit)


def retry_audit_event(principal: Principal, push: j.Push, address: str, now: float,
                      via: str) -> dict[str, Any]:
    """The AuditEvent of one push retried in bulk: who, which push, from where; no payload."""
    return client_audit_event(
        principal, address, now, type=REST,
        subtype={"system": INTERACTION, "code": "operation", "display": "operation"},
        action="E", description=f"Push retried in bulk ({via})", observer="medagent-relay",
        entity=push_entities(push))
