"""
The relay's routes: a twisted.web resource tree for the fixed paths (``healthz``,
``oauth2/token``, ``auth/me``, ``fhir/R4``, the short form ``Agent/...``) and, below
``fhir/R4``, one table of FHIR paths (L{ROUTES}), first match wins.

Every node renders through L{Endpoint}, the one place that turns a handler's L{Response} or
L{FHIRError} into bytes (so every error is an C{OperationOutcome}), answers a body over the
limit with 413, and cancels a handler whose caller went away (499, nothing written).

Path segments are percent-decoded one by one, and empty segments are skipped (``//``, a
trailing ``/``), as clients and proxies produce them.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Sequence
from urllib.parse import unquote

import attr
from twisted.internet.defer import CancelledError, ensureDeferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from medagent.fhir import FHIRError, not_found, operation_outcome
from medagent.relay.auth import Authority, Principal
from medagent.relay.http import agent_ops, fhir_rest, inbound, lanes, oauth, pushes
from medagent.relay.http.context import (
    DEFAULT_MAX_BODY,
    Response,
    RouteContext,
    json_response,
)
from medagent.relay.http.execute import execute_bot
from medagent.relay.hub import Hub
from medagent.relay.push import PushService
from medagent.storage.interfaces import PushJournal as Journal
from medagent.storage.resources import RESOURCE_TYPES
from medagent.storage.sqlite.database import DatabaseUnavailable

log = Logger()

Handler = Callable[[RouteContext], Awaitable[Response]]


# -- the FHIR route table -------------------------------------------------------------------

async def bot_execute(ctx: RouteContext) -> Response:
    """
    ``Bot/{id}/$execute`` and ``Bot/$execute?identifier=``: the ONE call site of the Bot
    ``$execute`` handler (re-point it here when that handler moves).
    """
    bots = ctx.api.bots
    if bots is None:
        raise not_found("Bots are not enabled on this relay")
    return await execute_bot(bots, ctx.request, ctx.principal, ctx.params.get("id"), ctx.query)


#: Any method (the handler checks it, with its own 405 text).
ANY = "*"


@attr.s(auto_attribs=True, frozen=True)
class Route:
    """
    C{method} and C{pattern} (segments below ``fhir/R4``) to a handler.  In a pattern,
    ``{type}`` is a resource type the relay keeps, ``{id}`` any one segment, ``{op}`` a
    segment starting with ``$`` and ``**`` any number of segments (also none); other
    segments are literal.
    """

    method: str
    pattern: str
    handler: Handler

    def match(self, method: str, rest: Sequence[str]) -> dict[str, str] | None:
        if self.method not in (ANY, method):
            return None
        return _match(self.pattern.split("/"), list(rest), {})


def _match(pattern: list[str], rest: list[str], found: dict[str, str]
           ) -> dict[str, str] | None:
    if not pattern:
        return found if not rest else None
    head, tail = pattern[0], pattern[1:]
    if head == "**":
        for skip in range(len(rest) + 1):
            got = _match(tail, rest[skip:], found)
            if got is not None:
                return got
        return None
    if not rest:
        return None
    segment = rest[0]
    if head == "{type}":
        ok = segment in RESOURCE_TYPES
    elif head == "{op}":
        ok = segment.startswith("$")
    elif head == "{id}":
        ok = True
    else:
        ok = segment == head
    if not ok:
        return None
    if head.startswith("{"):
        found = {**found, head[1:-1]: segment}
    return _match(tail, rest[1:], found)


#: Every path below ``fhir/R4`` (and the short form ``Agent/...``), first match wins.  The
#: caller is authenticated before the table is consulted (401 before any 404 or 405).
ROUTES: tuple[Route, ...] = (
    Route(ANY, "Agent/{op}", agent_ops.operation),
    Route("POST", "Agent/{id}/$pause-lane", lanes.pause),
    Route("POST", "Agent/{id}/$resume-lane", lanes.resume),
    Route("GET", "Agent/{id}/$lanes", lanes.paused),
    Route(ANY, "Agent/{id}/{op}", agent_ops.operation),
    Route(ANY, "Agent/**/{op}", agent_ops.no_such_path),
    Route("GET", "AgentPush", pushes.list_pushes),
    Route(ANY, "AgentPush", fhir_rest.not_supported),
    Route("POST", "AgentPush/$retry", pushes.retry_matching),
    Route("GET", "AgentPush/{id}", pushes.read_push),
    Route("POST", "AgentPush/{id}/$retry", pushes.retry),
    Route("POST", "AgentPush/{id}/$cancel", pushes.cancel),
    Route("POST", "AgentPush/{id}/$resend", pushes.resend),
    Route(ANY, "AgentPush/{id}/**", pushes.not_supported),
    Route("GET", "AgentInbound", inbound.list_inbound),
    Route("GET", "AgentInbound/{id}", inbound.read_inbound),
    Route(ANY, "Bot/$execute", bot_execute),
    Route(ANY, "Bot/{id}/$execute", bot_execute),
    Route(ANY, "ClientApplication/$credentials", oauth.credentials),
    Route(ANY, "ClientApplication/{id}/$revoke", oauth.revoke),
    Route("GET", "{type}", fhir_rest.search),
    Route("POST", "{type}", fhir_rest.create),
    Route("GET", "{type}/{id}", fhir_rest.read),
    Route("PUT", "{type}/{id}", fhir_rest.update),
    Route("DELETE", "{type}/{id}", fhir_rest.delete),
    Route(ANY, "{type}/**", fhir_rest.not_supported),
    Route(ANY, "**", fhir_rest.unsupported_type),
)


def find_route(method: str, rest: Sequence[str],
               routes: Sequence[Route] = ROUTES) -> tuple[Handler, dict[str, str]]:
    """The first route for C{method} on C{rest} and what its pattern captured."""
    for route in routes:
        params = route.match(method, rest)
        if params is not None:
            return route.handler, params
    raise not_found(f"No route for {'/'.join(rest)}")  # the table ends with a catch-all


# -- the resource tree ----------------------------------------------------------------------

def _decode(segment: bytes) -> str:
    return unquote(segment.decode("utf-8", "replace"))


def _segments(raw: Sequence[bytes] | None) -> list[str]:
    return [_decode(s) for s in (raw or []) if s]


def _no_route(request: Request) -> FHIRError:
    segments = _segments((request.prepath or []) + (request.postpath or []))
    return not_found(f"No route for {'/'.join(segments) or '/'}")


class Endpoint(Resource):
    """
    A node of the tree: C{child} picks the next one by decoded segment (an empty segment
    stays here), C{handle} answers a request that ends here.  By default neither exists,
    which is a 404 ("No route for ...").
    """

    api: Api

    def __init__(self, api: Api) -> None:
        super().__init__()
        self.api = api

    def getChildWithDefault(self, path: bytes, request: Request) -> Resource:  # noqa: N802
        name = _decode(path)
        if not name:
            return self
        found = self.child(name)
        return found if found is not None else _NoRoute(self.api)

    def child(self, name: str) -> Resource | None:
        return None

    async def handle(self, ctx: RouteContext) -> Response:
        raise _no_route(ctx.request)

    # -- plumbing: one place writes every answer ------------------------------------------

    def render(self, request: Request) -> Any:
        d = ensureDeferred(self._respond(request))
        finished = [False]

        def client_gone(_: Any) -> None:
            if not finished[0]:
                d.cancel()

        request.notifyFinish().addErrback(client_gone)

        def write(response: Response) -> None:
            finished[0] = True
            if request._disconnected:
                return
            request.setResponseCode(response.status)
            request.setHeader(b"Content-Type", response.content_type.encode())
            for k, v in response.headers.items():
                request.setHeader(k.encode(), v.encode())
            request.setHeader(b"Content-Length", str(len(response.body)).encode())
            request.write(response.body)
            request.finish()

        d.addCallback(write)
        d.addErrback(lambda f: None if f.check(Exception) is None else log.failure(
            "Writing response failed", f))
        return NOT_DONE_YET

    async def _respond(self, request: Request) -> Response:
        try:
            if getattr(request, "too_large", False):
                limit = getattr(request, "body_limit", None) or DEFAULT_MAX_BODY
                site = request.channel.site  # type: ignore[attr-defined]  # see LimitedRequest
                if limit < getattr(site, "max_body", limit):
                    # refused for want of a valid token: say so (401), so a client refreshes
                    # its token and sends again, as it would have after reading the body
                    self.api.principal(request)
                raise FHIRError(413, f"Request body too large (limit {limit} bytes)",
                                "too-costly")
            args: dict[bytes, list[bytes]] = request.args or {}
            query = {
                k.decode("utf-8", "replace"): [v.decode("utf-8", "replace") for v in vs]
                for k, vs in args.items()
            }
            ctx = RouteContext(self.api, request, request.method.decode("ascii"),
                               _segments(request.postpath), query)
            return await self.handle(ctx)
        except CancelledError:
            # the caller went away (e.g. a waited push); the push itself goes on
            return Response(499, b"", "text/plain")
        except FHIRError as e:
            return json_response(e.outcome(), e.status, **e.headers)
        except DatabaseUnavailable as e:
            # the one place a database outage becomes HTTP: transient, nothing said about
            # the database itself (its name, URL or driver text stay in the log)
            log.warn("Database unavailable for {method} {path}: {error}",
                     method=request.method.decode("ascii", "replace"),
                     path=request.path.decode("ascii", "replace"), error=str(e))
            return json_response(
                operation_outcome("The database is unavailable; try again in a moment",
                                  code="transient", severity="error"),
                503, **{"Retry-After": str(RETRY_AFTER)})
        except Exception:
            log.failure("Unhandled error for {method} {path}",
                        method=request.method.decode("ascii", "replace"),
                        path=request.path.decode("ascii", "replace"))
            return json_response(
                operation_outcome("Internal server error", code="exception", severity="error"),
                500,
            )


class _NoRoute(Endpoint):
    """Any path the tree does not know (the rest of it is not looked at)."""

    isLeaf = True


class _Fixed(Endpoint):
    """A fixed path segment with fixed children (``oauth2``, ``fhir``...)."""

    def __init__(self, api: Api, children: dict[str, Resource]) -> None:
        super().__init__(api)
        self.routes = children

    def child(self, name: str) -> Resource | None:
        return self.routes.get(name)


class _Leaf(Endpoint):
    """A fixed path answered by one handler, for C{methods} (None: any); else a 404."""

    def __init__(self, api: Api, handler: Handler, methods: frozenset[str] | None) -> None:
        super().__init__(api)
        self.handler = handler
        self.methods = methods

    async def handle(self, ctx: RouteContext) -> Response:
        if self.methods is not None and ctx.method not in self.methods:
            raise _no_route(ctx.request)
        return await self.handler(ctx)


class FhirResources(Endpoint):
    """
    ``fhir/R4/...`` (and ``Agent/...``, whose C{lead} is ``Agent``): authenticates the
    caller, then answers by L{ROUTES}.
    """

    isLeaf = True

    def __init__(self, api: Api, lead: Sequence[str] = (),
                 routes: Sequence[Route] = ROUTES) -> None:
        super().__init__(api)
        self.lead = list(lead)
        self.table = tuple(routes)

    async def handle(self, ctx: RouteContext) -> Response:
        ctx.rest = self.lead + ctx.rest
        if not ctx.rest:
            raise not_found("No resource type given")
        ctx.caller = self.api.principal(ctx.request)
        handler, ctx.params = find_route(ctx.method, ctx.rest, self.table)
        return await handler(ctx)


async def health(ctx: RouteContext) -> Response:
    """``/healthz`` (any method, no token): up, and how many agents are connected."""
    return json_response({"status": "ok", "agentsConnected": len(ctx.api.hub.sessions)})


#: Seconds a client (or load balancer) is told to wait after a 503 for want of a database.
RETRY_AFTER = 5
#: Seconds ``/readyz`` waits for the database's answer.
READY_TIMEOUT = 2.0


async def ready(ctx: RouteContext) -> Response:
    """
    ``/readyz`` (any method, no token), for a load balancer: 200 when a trivial round trip
    through the storage's own pool succeeds within L{READY_TIMEOUT} and its schema is the
    current one, and the token signing keys are loaded; else 503 saying which (never the
    database's name or URL).
    """
    api = ctx.api
    if not api.authority.ready:  # (a cluster node reads its signing keys at start)
        return json_response(operation_outcome(
            "The relay is starting: its token signing keys are not loaded yet",
            code="transient", severity="error"), 503, **{"Retry-After": "1"})
    db = api.database if api.database is not None else getattr(api.journal, "database", None)
    if db is None or not hasattr(db, "ping"):
        return json_response({"status": "ready"})
    try:
        clock = api.clock
        if clock is None:  # an Api built without a push service clock (tools, tests)
            from twisted.internet import reactor as clock
        await db.ping(clock, READY_TIMEOUT)
    except DatabaseUnavailable as e:
        log.warn("Not ready: {error}", error=str(e))
        what = ("The database schema is not current" if e.schema
                else "The database is unreachable")
        return json_response(operation_outcome(what, code="transient", severity="error"),
                             503, **{"Retry-After": str(RETRY_AFTER)})
    return json_response({"status": "ready"})


class Api(Endpoint):
    """
    The root of every HTTP route except the websocket, and what the handlers use of the
    relay (C{RouteContext.api}): authority, store, journal, hub, push service.
    """

    #: the L{medagent.relay.bots.BotRunner} behind ``Bot/{id}/$execute`` (set by the service)
    bots: Any = None
    #: the L{medagent.relay.limits.LoginThrottle} of ``/oauth2/token`` (set by the service)
    login_throttle: Any = None
    #: the database ``/readyz`` pings (default: the journal's, L{ready})
    database: Any = None
    #: the L{medagent.relay.lanes.LaneControl} behind ``$pause-lane`` (set by the service)
    lanes: Any = None
    #: the inbound log behind ``AgentInbound`` (L{medagent.relay.http.inbound}; the service)
    inbound: Any = None

    def __init__(
        self,
        authority: Authority,
        store: Any,
        journal: Journal,
        hub: Hub,
        pushes: PushService,
        *,
        base_url: str | None = None,
    ) -> None:
        super().__init__(self)
        self.authority = authority
        self.store = store
        self.journal = journal
        self.hub = hub
        self.pushes = pushes
        self.base_url = base_url
        #: the clock of every timeout here (the push service's)
        self.clock: Any = getattr(pushes, "clock", None)
        self.routes: dict[str, Resource] = {
            "healthz": _Leaf(self, health, None),
            "readyz": _Leaf(self, ready, None),
            "oauth2": _Fixed(self, {"token": _Leaf(self, oauth.token, frozenset({"POST"}))}),
            "auth": _Fixed(self, {"me": _Leaf(self, oauth.me, frozenset({"GET"}))}),
            "fhir": _Fixed(self, {"R4": FhirResources(self)}),
            "Agent": FhirResources(self, lead=("Agent",)),  # short form: /Agent/{id}/$push
        }

    def child(self, name: str) -> Resource | None:
        return self.routes.get(name)

    def principal(self, request: Request) -> Principal:
        """The caller of C{request} by its bearer token, or 401."""
        header = request.getHeader(b"authorization")
        return self.authority.authenticate(header.decode("latin-1") if header else None)

