"""
The Agent operations besides ``$push`` (``$status``, ``$bulk-status``, ``$reload-config``,
``$fetch-logs``, ``$stats``), on one agent or, at type level, on every agent a search finds
(Medplum's bulk form, what ``@medplum/cli agent status`` calls).
"""

from __future__ import annotations

import json
import time
from typing import Any, Mapping

from twisted.internet.defer import ensureDeferred, gatherResults

from medagent import wire
from medagent.fhir import FHIRError, bad_request, forbidden, not_found, operation_outcome
from medagent.relay.auth import Principal
from medagent.relay.http import pushes
from medagent.relay.http.context import Response, RouteContext, json_response

#: Agent operations besides ``$push``; each also works at type level with a search.
AGENT_OPERATIONS = ("$status", "$bulk-status", "$reload-config", "$fetch-logs", "$stats")
#: Query parameters of an operation itself, not of the Agent search of its bulk form.
OPERATION_PARAMS = ("limit",)
#: Medplum's limit for one bulk agent operation.
MAX_BULK_AGENTS = 100


async def operation(ctx: RouteContext) -> Response:
    """``Agent/$op`` and ``Agent/{id}/$op``; ``$push`` goes to L{pushes.push}."""
    op = ctx.params["op"]
    agent_id = ctx.params.get("id")
    query = ctx.query
    if op == "$push":
        return await pushes.push(ctx)
    if op not in AGENT_OPERATIONS:
        raise not_found(f"Unknown Agent operation {op}")
    identifiers = query.get("identifier") or []
    identifier = identifiers[-1] if identifiers else None
    # Type level: ``?identifier=`` alone names one agent (Medplum's getAgentForRequest);
    # any other search runs the operation on each match.
    by_identifier = bool(identifier) and set(query) <= {"identifier", *OPERATION_PARAMS}
    if agent_id is None and (op == "$bulk-status" or not by_identifier):
        return await bulk_operation(ctx, op)
    principal = ctx.principal
    agent = await ctx.api.pushes.resolve_agent(agent_id, identifier)
    agent_id = agent["id"]
    if not (principal.can_push(agent_id) or principal.can_act_as(agent_id)):
        raise forbidden(f"This client may not use Agent/{agent_id}")
    return json_response(await operation_result(ctx, op, agent_id))


async def no_such_path(ctx: RouteContext) -> Response:
    """An operation deeper than ``Agent/{id}/$op``."""
    raise not_found("No such Agent operation path")


async def bulk_operation(ctx: RouteContext, op: str) -> Response:
    """
    ``Agent/$op?<search>`` (what ``@medplum/cli agent status|reload-config`` calls): the
    operation on every matching agent this client may use, as Medplum answers it, a
    Bundle of ``Parameters{agent, result}`` where a failure is the result's
    OperationOutcome (the call itself succeeds).
    """
    principal: Principal = ctx.principal
    search = {k: v for k, v in ctx.query.items() if k not in OPERATION_PARAMS}
    count = (search.get("_count") or [str(MAX_BULK_AGENTS)])[-1]
    if not count.isdigit() or not 1 <= int(count) <= MAX_BULK_AGENTS:
        raise bad_request(f"_count must be between 1 and {MAX_BULK_AGENTS}")
    agents = await ctx.api.store.search("Agent", search)
    agents = [a for a in agents
              if principal.can_push(a["id"]) or principal.can_act_as(a["id"])]

    async def one(agent: dict[str, Any]) -> dict[str, Any]:
        try:
            result = await operation_result(ctx, op, agent["id"])
        except FHIRError as e:
            result = e.outcome()
        return {"resource": {"resourceType": "Parameters", "parameter": [
            {"name": "agent", "resource": agent},
            {"name": "result", "resource": result},
        ]}}

    entries = await gatherResults([ensureDeferred(one(a)) for a in agents],
                                  consumeErrors=True)
    return json_response({"resourceType": "Bundle", "type": "collection",
                          "entry": entries})


async def operation_result(ctx: RouteContext, op: str, agent_id: str) -> dict[str, Any]:
    """One agent's answer to C{op}: a Parameters or OperationOutcome, or L{FHIRError}."""
    hub, query = ctx.api.hub, ctx.query
    if op in ("$status", "$bulk-status"):
        return await status_parameters(ctx, agent_id)
    if op == "$reload-config":
        answer = await hub.request(agent_id, {"type": wire.RELOADCONFIG_REQUEST})
        raise_agent_error(answer)
        return operation_outcome("All OK", id="ok")
    if op == "$fetch-logs":
        limit = (query.get("limit") or ["20"])[-1]
        try:
            n = int(limit)
        except ValueError:
            raise bad_request("limit must be an integer")
        if not 1 <= n <= 1000:
            raise bad_request("limit must be between 1 and 1000")
        answer = await hub.request(agent_id, {"type": wire.LOGS_REQUEST, "limit": n})
        raise_agent_error(answer)
        logs = answer.get("logs") or []
        return {"resourceType": "Parameters", "parameter": [
            {"name": "logs", "valueString": "\n".join(json.dumps(line) for line in logs)}]}
    # $stats: the relay's own counts always; the agent's part when it gives one (Medplum's
    # agent before 2026 has no agent:stats and never answers it).
    relay_side = await ctx.api.journal.counts(agent_id)
    stats: dict[str, Any] = {"relay": relay_side, "agent": None}
    snapshot = await hub.snapshot_anywhere(agent_id)  # (from the node holding it)
    if snapshot is not None:
        relay_side["lanes"] = snapshot
    if snapshot is None:
        stats["agentUnavailable"] = f"Agent/{agent_id} is not connected"
    else:
        try:
            answer = await hub.request(agent_id, {"type": wire.STATS_REQUEST})
        except FHIRError as e:
            answer = {"type": wire.ERROR, "body": e.message}
        if answer.get("type") == wire.STATS_RESPONSE and isinstance(answer.get("stats"),
                                                                     dict):
            stats["agent"] = answer["stats"]
        else:
            reason = answer.get("body") if isinstance(answer.get("body"), str) else None
            stats["agentUnavailable"] = (reason or "The agent gave no stats")[:200]
    return {"resourceType": "Parameters", "parameter": [
        {"name": "stats", "valueString": json.dumps(stats)}]}


def raise_agent_error(answer: Mapping[str, Any]) -> None:
    if answer.get("type") == wire.ERROR or (answer.get("statusCode") or 200) >= 400:
        raise bad_request(str(answer.get("body") or "Agent reported an error"))


async def status_parameters(ctx: RouteContext, agent_id: str) -> dict[str, Any]:
    status = await ctx.api.hub.status_anywhere(agent_id)
    last = status.get("lastUpdated")
    params = [
        {"name": "status", "valueCode": status["status"]},
        {"name": "version", "valueString": status["version"]},
    ]
    if last:
        params.append({"name": "lastUpdated", "valueInstant": time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime(last))})
    return {"resourceType": "Parameters", "parameter": params}
