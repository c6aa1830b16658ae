"""
``POST /fhir/R4/Bot/{id}/$execute`` (and ``Bot/$execute?identifier=``): run a Bot by hand.

The web layer's part of running a bot: read the twisted.web request (method, content type,
body, headers), answer with the run's result or an OperationOutcome.  The run itself is
L{medagent.relay.bots.BotRunner.execute}'s, which knows nothing of HTTP.
"""

from __future__ import annotations

from typing import Any, Mapping

from twisted.web.server import Request

from medagent.contenttypes import JSON_TYPES
from medagent.fhir import FHIRError, bad_request, not_found, operation_outcome
from medagent.jsonsafe import loads as json_loads
from medagent.relay.auth import Principal
from medagent.relay.bots import (
    AUDIT_LOG_CHARS,
    BUSY,
    CRASH,
    DISABLED,
    NOT_FOUND,
    STOPPED,
    TIMEOUT,
    BotRunner,
    answer_type,
)
from medagent.relay.http.context import Response, json_response
from medagent.storage.resources import search_one


async def execute_bot(runner: BotRunner, request: Request, principal: Principal,
                      bot_id: str | None, query: Mapping[str, list[str]]) -> Response:
    """
    The ``$execute`` operation: the request body is the input, the answer the result.
    C{bot_id} is the id in the path, or None for ``Bot/$execute``, which names the Bot by
    C{query}'s last ``identifier``.  Admins only.
    """
    if request.method != b"POST":
        raise FHIRError(405, "$execute needs POST", "not-supported")
    principal.require_admin()
    if bot_id is not None:
        try:
            bot = await runner.store.read("Bot", bot_id)
        except FHIRError:
            raise not_found(f"Bot/{bot_id} not found")
    else:
        identifiers = query.get("identifier") or []
        identifier = identifiers[-1] if identifiers else None
        if not identifier:
            raise bad_request("Bot/$execute needs a Bot id or ?identifier=")
        bot = await search_one(runner.store, "Bot", {"identifier": [identifier]})
    ctype = (request.getHeader(b"content-type") or b"").decode("latin-1").strip()
    ctype = ctype or "text/plain"
    raw = request.content.read() if request.content is not None else b""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request("$execute input must be UTF-8 text (or JSON)")
    if ctype.split(";")[0].strip().lower() in JSON_TYPES:
        try:
            value: Any = json_loads(text) if text.strip() else {}
        except ValueError as e:
            raise bad_request(f"Invalid JSON body: {e}")
    else:
        value = text
    headers = {}
    for name, values in request.requestHeaders.getAllRawHeaders():
        key = name.decode("latin-1")
        if key.lower() in ("authorization", "cookie", "proxy-authorization"):
            continue
        headers[key] = values[-1].decode("latin-1")[:1024]
        if len(headers) >= 64:
            break
    run = await runner.execute(bot, value, ctype, trigger="execute",
                               requester=principal.client_id if "/" in principal.client_id
                               else f"ClientApplication/{principal.client_id}",
                               headers=headers)
    extra = {"X-Medagent-AuditEvent": run.audit_id} if run.audit_id else {}
    if run.ok:
        body = (run.result or "").encode("utf-8")
        return Response(200, body, answer_type(ctype, run.result_type), extra)
    # The caller is an admin who ran the bot by hand: the exception's text and the
    # output are shown to them here, and nowhere else (never in the AuditEvent).
    shown = "\n".join(x for x in (run.detail, run.logs[-AUDIT_LOG_CHARS:]) if x)
    outcome = operation_outcome(
        run.error_text(),
        code={TIMEOUT: "timeout", BUSY: "transient", NOT_FOUND: "not-found",
              CRASH: "exception", STOPPED: "transient",
              DISABLED: "transient"}.get(run.outcome, "processing"),
        severity="error",
        diagnostics=shown or None,
    )
    return json_response(outcome, run.http_status, **extra)
