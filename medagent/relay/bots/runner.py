"""
L{BotRunner}: resolve a Bot, give it a short-lived token for its own identity (``Bot/{id}``,
role ``bot``, carrying only what the Bot resource grants), run it on the worker pool, and
record every run as an C{AuditEvent} (bot, trigger, outcome, duration, sizes, the
exception's type and line -- never the input, the result, the output or an exception's
text).  Subscriptions, ``$execute`` (L{medagent.relay.http.execute}) and agent channels run
bots through it.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Callable, Mapping, Sequence

import attr
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from medagent._twisted import shielded
from medagent.fhir import FHIRError
from medagent.relay.auth import BOT, Principal, bot_grants
from medagent.relay.bots.audit import audit_event, fhir_reference
from medagent.relay.bots.outcomes import ERROR, HTTP_STATUS, INVALID, NOT_FOUND, STOPPED, SUCCESS
from medagent.relay.bots.resource import BotCodeError, bot_code, bot_secrets, bot_time_limit
from medagent.relay.bots.workers import WorkerPool

log = Logger()

DEFAULT_TIME_LIMIT = 10.0
MAX_TIME_LIMIT = 300.0
#: Output (the tail of it) shown to the admin whose ``$execute`` run failed.
AUDIT_LOG_CHARS = 4000


@attr.s(auto_attribs=True)
class BotRun:
    """The outcome of one run."""

    bot_id: str | None
    outcome: str
    result: str | None = None
    result_type: str = "none"
    #: what went wrong, without payload: relay texts, or the exception type and line
    error: str | None = None
    #: the bot's output (print, logging, traceback): for the admin who ran $execute only
    logs: str = ""
    duration: float = 0.0
    audit_id: str | None = None
    #: the exception's own text (may quote the input): for the admin who ran $execute only
    detail: str | None = None
    error_type: str | None = None
    error_line: int | None = None
    input_bytes: int = 0
    result_bytes: int = 0

    @property
    def ok(self) -> bool:
        return self.outcome == SUCCESS

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.outcome, 500)

    def error_text(self) -> str:
        ref = f"Bot/{self.bot_id}" if self.bot_id else "Bot"
        return f"{ref} failed ({self.outcome}): {self.error or 'no detail'}"


def _late_failure(failure: Failure) -> None:
    log.failure("Bot run failed after its caller left", failure)


class BotRunner:
    """Resolve, run and audit bots (subscriptions, $execute and agent channels use this)."""

    def __init__(
        self,
        reactor: Any,
        store: Any,
        authority: Any,
        pool: WorkerPool,
        *,
        base_url: str | None,
        default_time_limit: float = DEFAULT_TIME_LIMIT,
        max_time_limit: float = MAX_TIME_LIMIT,
        token_lifetime: int = 600,
        audit: bool = True,
        insecure_loopback: bool = False,
    ) -> None:
        self.reactor = reactor
        self.store = store
        self.authority = authority
        self.pool = pool
        self.base_url = base_url
        self.default_time_limit = default_time_limit
        self.max_time_limit = max_time_limit
        self.token_lifetime = token_lifetime
        self.audit = audit
        self.insecure_loopback = insecure_loopback
        self.stopped = False
        self._tokens: dict[tuple[str, str], tuple[str, float]] = {}
        self._codes: dict[tuple[str, str], str] = {}
        #: called with each finished BotRun (for the demo and tests); must not raise
        self.observers: list[Callable[[BotRun, str], None]] = []

    def stop(self) -> None:
        """From now on nothing is written (the database is about to close)."""
        self.stopped = True

    def _token(self, bot: Mapping[str, Any], time_limit: float) -> str:
        """
        The Bot's token for one run: its own identity (``Bot/{id}``, role ``bot``) and only
        what its Bot resource grants (L{bot_grants}) -- never admin.  Cached per Bot
        version, so a change of grants applies from the next run.
        """
        now = time.time()
        bot_id = str(bot.get("id"))
        key = (bot_id, str((bot.get("meta") or {}).get("versionId")))
        cached = self._tokens.get(key)
        if cached is not None and cached[1] - now > time_limit + 60:
            return cached[0]
        read, write, push = bot_grants(dict(bot))
        lifetime = max(self.token_lifetime, int(time_limit) + 120)  # capped by mint_token
        token = self.authority.mint_token(Principal(f"Bot/{bot_id}", BOT, push, read, write),
                                          lifetime)
        if len(self._tokens) > 1024:
            self._tokens.clear()
        self._tokens[key] = (token, now + min(lifetime, self.authority.max_lifetime))
        return token

    async def _code(self, bot: Mapping[str, Any]) -> str:
        key = (str(bot.get("id")), str((bot.get("meta") or {}).get("versionId")))
        code = self._codes.get(key)
        if code is None:
            code = await bot_code(self.store, bot)
            if len(self._codes) > 256:
                self._codes.clear()
            self._codes[key] = code
        return code

    def execute(
        self,
        bot: str | Mapping[str, Any],
        input: Any,
        content_type: str,
        *,
        trigger: str,
        requester: Any = None,
        headers: Mapping[str, str] | None = None,
        entities: Sequence[Any] = (),
        attempt: int | None = None,
        event_extra: Mapping[str, Any] | None = None,
    ) -> Deferred[BotRun]:
        """
        Run a Bot (a resource, or its id) with C{input}; fires with a L{BotRun} whatever
        happens (errbacks only on a bug).  The run is audited before the Deferred fires.
        """
        return shielded(ensureDeferred(self._execute(
            bot, input, content_type, trigger, requester, dict(headers or {}), entities,
            attempt, dict(event_extra or {}))), _late_failure)

    async def _execute(self, bot: Any, input: Any, content_type: str, trigger: str,
                       requester: Any, headers: dict[str, str], entities: Sequence[Any],
                       attempt: int | None, event_extra: dict[str, Any]) -> BotRun:
        started = time.time()
        bot_id = bot if isinstance(bot, str) else (bot.get("id") if isinstance(bot, Mapping)
                                                   else None)
        resource: Mapping[str, Any] | None = bot if isinstance(bot, Mapping) else None
        run: BotRun
        try:
            if resource is None:
                try:
                    resource = await self.store.read("Bot", str(bot_id))
                except FHIRError:
                    raise _Refused(NOT_FOUND, f"Bot/{bot_id} not found")
            try:
                code = await self._code(resource)
            except BotCodeError as e:
                raise _Refused(INVALID, str(e))
            time_limit = bot_time_limit(resource, self.default_time_limit, self.max_time_limit)
            bot_ref = f"Bot/{bot_id}"
            socket_for = getattr(self.pool, "api_socket_for_bots", None)
            api = socket_for() if socket_for is not None else None
            event = {
                "bot": {"reference": bot_ref, **({"display": resource["name"]}
                                                 if isinstance(resource.get("name"), str)
                                                 else {})},
                "input": input,
                "contentType": content_type,
                "secrets": bot_secrets(resource),
                "requester": fhir_reference(requester),
                "headers": headers,
                "traceId": uuid.uuid4().hex,
                **event_extra,
            }
            request = {
                "botRef": bot_ref,
                "code": code,
                "event": event,
                # the relay's API socket: the only way out of the sandbox
                "apiSocket": api,
                "baseUrl": "http://medagent-relay" if api else self.base_url,
                "accessToken": self._token(resource, time_limit),
                "timeLimit": time_limit,
                "insecureLoopback": self.insecure_loopback,
            }
            reply = await self.pool.submit(request, time_limit)
            outcome = SUCCESS if reply.get("ok") else str(reply.get("outcome") or ERROR)
            result = reply.get("result") if reply.get("ok") else None
            line = reply.get("errorLine")
            run = BotRun(
                bot_id=bot_id,
                outcome=outcome,
                result=result,
                result_type=str(reply.get("resultType") or "none"),
                error=None if reply.get("error") is None else str(reply["error"])[:500],
                logs=str(reply.get("logs") or ""),
                detail=reply.get("errorText") if isinstance(reply.get("errorText"), str)
                else None,
                error_type=str(reply["errorType"])[:100] if reply.get("errorType") else None,
                error_line=line if isinstance(line, int) and not isinstance(line, bool)
                else None,
                input_bytes=_size(input),
                result_bytes=len(result.encode("utf-8")) if isinstance(result, str) else 0,
            )
        except _Refused as e:
            run = BotRun(bot_id=bot_id, outcome=e.outcome, error=e.message)
        ended = time.time()
        run.duration = ended - started
        (log.debug if run.ok else log.warn)(
            "Bot/{bot_id} {trigger} run: {outcome} in {ms:.1f} ms", bot_id=bot_id,
            trigger=trigger, outcome=run.outcome, ms=run.duration * 1000)
        if self.audit and not self.stopped and run.outcome != STOPPED:
            summary = (f"Bot run ({trigger}): {run.outcome}" if run.ok
                       else f"Bot run ({trigger}): {run.outcome}: {run.error or ''}")
            extra: list[dict[str, Any]] = [
                {"url": "inputBytes", "valueInteger": run.input_bytes},
                {"url": "resultBytes", "valueInteger": run.result_bytes}]
            if run.error_type:
                extra.append({"url": "errorType", "valueCode": run.error_type})
            if run.error_line is not None:
                extra.append({"url": "errorLine", "valueInteger": run.error_line})
            event_resource = audit_event(
                trigger=trigger, outcome=run.outcome, started=started, ended=ended,
                summary=summary, logs=run.logs, bot=resource,
                bot_ref=f"Bot/{bot_id}" if bot_id else None, requester=requester,
                entities=entities, attempt=attempt, extra=extra)
            try:
                stored = await self.store.create(event_resource)
                run.audit_id = stored["id"]
            except Exception:
                log.failure("Could not record the AuditEvent of a Bot/{bot_id} run",
                            bot_id=bot_id)
        for observer in list(self.observers):
            try:
                observer(run, trigger)
            except Exception:
                log.failure("Bot run observer failed")
        return run


def _size(value: Any) -> int:
    """Bytes of a bot's input (text, or its compact JSON)."""
    if isinstance(value, str):
        return len(value.encode("utf-8"))
    try:
        return len(json.dumps(value, separators=(",", ":")).encode("utf-8"))
    except (TypeError, ValueError):
        return 0


class _Refused(Exception):
    def __init__(self, outcome: str, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.message = message
