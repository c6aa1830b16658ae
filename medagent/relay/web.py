"""
The relay's HTTP API on twisted.web: OAuth2 token endpoint, FHIR REST for the resources we
keep, the Agent operations (``$push``, ``$status``...), push status, and the ``/ws/agent``
websocket under the same L{Site}.

Handlers are coroutines that return a L{Response} or raise L{FHIRError}; one place turns both
into bytes on the wire, so every error is an C{OperationOutcome}.
"""

from __future__ import annotations

import json
import time
from typing import Any, Awaitable, Callable, Mapping, Protocol, cast
from urllib.parse import parse_qs, unquote, urlencode

import attr
from twisted.internet.defer import CancelledError, ensureDeferred, gatherResults
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from medagent import wire
from medagent.contenttypes import FHIR_JSON, JSON_TYPES
from medagent.fhir import (
    FHIRError,
    bad_request,
    forbidden,
    not_found,
    operation_outcome,
)
from medagent.relay import access
from medagent.jsonsafe import JSONInputError
from medagent.jsonsafe import loads as json_loads
from medagent.relay.auth import AGENT, BOT, Authority, Principal
from medagent.relay.hub import Hub
from medagent.relay.push import PushResult, PushService
from medagent.storage import journal as j
from medagent.storage.interfaces import PushJournal as Journal
from medagent.storage.journal import Push
from medagent.storage.resources import RESOURCE_TYPES

log = Logger()

DEFAULT_MAX_BODY = 32 * 1024 * 1024
#: A client-credentials request is a few hundred bytes; it is read unauthenticated.
MAX_TOKEN_BODY = 16 * 1024

#: Agent operations besides ``$push``; each also works at type level with a search.
AGENT_OPERATIONS = ("$status", "$bulk-status", "$reload-config", "$fetch-logs", "$stats")
#: Query parameters of an operation itself, not of the Agent search of its bulk form.
OPERATION_PARAMS = ("limit",)
#: Medplum's limit for one bulk agent operation.
MAX_BULK_AGENTS = 100


@attr.s(auto_attribs=True)
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = FHIR_JSON
    headers: dict[str, str] = attr.ib(factory=dict)


def json_response(obj: Any, status: int = 200, **headers: str) -> Response:
    return Response(status, json.dumps(obj, separators=(",", ":")).encode(), FHIR_JSON,
                    dict(headers))


def stamp_author(resource: dict[str, Any], principal: Principal) -> None:
    """
    C{meta.author} is who wrote this version, set by the relay, never taken from the body:
    Subscriptions use it so that a Bot's own writes never trigger that Bot again (a loop).
    """
    who = principal.client_id
    meta = resource.get("meta", {})
    if not isinstance(meta, dict):
        return  # malformed: the store refuses it with a 400
    resource["meta"] = {**meta, "author": {"reference": who if who.startswith("Bot/")
                                           else f"ClientApplication/{who}"}}


#: Body a request may send without a valid bearer token (a token request is far smaller):
#: strangers cannot make the relay store megabytes per connection.
PRE_AUTH_MAX_BODY = 64 * 1024


def _read_body(request: Request, size: int = -1) -> bytes:
    """A request's body (up to C{size} bytes); Twisted sets C{content} before processing,
    so a request without one has an empty body."""
    content = request.content
    return b"" if content is None else content.read(size)


class LimitedRequest(Request):
    """
    A request that stops buffering a body larger than its limit (answered 413): the site's
    C{max_body}, or L{PRE_AUTH_MAX_BODY} unless the headers carry a valid bearer token
    (checked with the site's C{authenticate}, a signature check without I/O).
    """

    too_large = False
    body_limit: int | None = None

    def _limit(self) -> int:
        if self.body_limit is None:
            # Site.buildProtocol sets channel.site; Twisted does not declare the attribute
            site = self.channel.site  # type: ignore[attr-defined]
            limit = getattr(site, "max_body", DEFAULT_MAX_BODY)
            check = getattr(site, "authenticate", None)
            if check is not None and limit > PRE_AUTH_MAX_BODY:
                header = self.getHeader(b"authorization")
                try:
                    check(header.decode("latin-1") if header else None)
                except Exception:
                    limit = PRE_AUTH_MAX_BODY
            self.body_limit = limit
        return self.body_limit

    def gotLength(self, length: int | None) -> None:
        limit = self._limit()
        if length is not None and length > limit:
            self.too_large = True
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.too_large:
            return
        content = self.content  # set by gotLength, before any chunk
        if content is not None and content.tell() + len(data) > self._limit():
            self.too_large = True
            content.seek(0)
            content.truncate()
            return
        super().handleContentChunk(data)


#: Seconds a client has to send a request's headers and body, however it trickles them.
DEFAULT_REQUEST_TIMEOUT = 60.0
#: Seconds a keep-alive connection may sit idle between requests (Twisted's default is 12 h;
#: above the 240 s for which Twisted's client pool keeps connections, so clients close first).
DEFAULT_IDLE_TIMEOUT = 300.0


class _Transport(Protocol):
    """What the channel uses of its C{ITransport} (zope interfaces are not callable types to
    mypy without the mypy-zope plugin)."""

    def getPeer(self) -> object: ...  # noqa: N802 (Twisted name)

    def write(self, data: bytes) -> None: ...

    def loseConnection(self) -> None: ...  # noqa: N802


class DeadlineChannel(HTTPChannel):
    """
    An HTTP channel with a total deadline per request: the idle timeout alone is reset by
    every byte, so one byte per 20 s holds a connection forever.  The deadline starts with a
    request's first byte (or the connection) and ends when its body is complete; then the
    handler may take as long as it needs (a waited push).  Too slow: 408 and close.
    """

    _deadline: Any = None
    #: set by Site.buildProtocol (Twisted does not declare it on HTTPChannel)
    site: Site

    def connectionMade(self) -> None:
        super().connectionMade()
        self._arm()

    def _arm(self) -> None:
        if self._deadline is None and not self._handlingRequest:
            timeout = getattr(self.site, "request_timeout", DEFAULT_REQUEST_TIMEOUT)
            self._deadline = self.callLater(timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def dataReceived(self, data: bytes) -> None:
        self._arm()
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        self._disarm()
        super().allContentReceived()
        # keep-alive: the next request's clock starts with its first byte (dataReceived);
        # a connection idle between requests is closed by the site's idle timeout

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._disarm()
        super().connectionLost(reason)

    def _too_slow(self) -> None:
        self._deadline = None
        if self.transport is None or self._handlingRequest:
            return
        transport = cast(_Transport, self.transport)
        log.info("Closing HTTP connection from {peer}: request not complete within "
                 "{timeout}s", peer=str(transport.getPeer()),
                 timeout=getattr(self.site, "request_timeout", DEFAULT_REQUEST_TIMEOUT))
        transport.write(b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n"
                        b"Content-Length: 0\r\n\r\n")
        transport.loseConnection()


class RelaySite(Site):
    requestFactory = LimitedRequest
    # Twisted types HTTPFactory.protocol as its HTTP/1-or-2 wrapper factory; a plain
    # HTTPChannel subclass is what buildProtocol has always accepted
    protocol = DeadlineChannel  # type: ignore[assignment]

    def __init__(self, resource: Resource, *, max_body: int = DEFAULT_MAX_BODY,
                 request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
                 authenticate: Callable[[str | None], Any] | None = None, **kw: Any):
        kw.setdefault("timeout", DEFAULT_IDLE_TIMEOUT)
        # the token endpoint reads its own form; nothing else wants a POST body in args
        kw.setdefault("parsePOSTFormSubmission", False)
        super().__init__(resource, **kw)
        self.max_body = max_body
        self.request_timeout = request_timeout
        #: checks an Authorization header (raises if invalid); None: no pre-auth body limit
        self.authenticate = authenticate

    def log(self, request: http.Request) -> None:
        # Access log without query strings (they may carry identifiers); debug level.
        log.debug(
            "{method} {path} {code}",
            method=request.method.decode("ascii", "replace"),
            path=request.path.decode("ascii", "replace"),
            code=request.code,
        )


Handler = Callable[..., Awaitable[Response]]


def _client_host(request: Request) -> str:
    """The address a request came from (the proxy's, behind a reverse proxy)."""
    addr = request.getClientAddress()
    return str(getattr(addr, "host", addr))


class Api(Resource):
    """Every HTTP route except the websocket."""

    isLeaf = True
    #: the L{medagent.relay.bots.BotRunner} behind ``Bot/{id}/$execute`` (set by the service)
    bots: Any = None
    #: the L{medagent.relay.limits.LoginThrottle} of ``/oauth2/token`` (set by the service)
    login_throttle: Any = None

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
        super().__init__()
        self.authority = authority
        self.store = store
        self.journal = journal
        self.hub = hub
        self.pushes = pushes
        self.base_url = base_url

    # -- plumbing -------------------------------------------------------------------------

    def render(self, request: Request) -> Any:
        d = ensureDeferred(self._handle(request))
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

    async def _handle(self, request: Request) -> Response:
        try:
            if getattr(request, "too_large", False):
                limit = getattr(request, "body_limit", None) or DEFAULT_MAX_BODY
                site = request.channel.site  # type: ignore[attr-defined]  # see LimitedRequest
                if limit < getattr(site, "max_body", limit):
                    # refused for want of a valid token: say so (401), so a client refreshes
                    # its token and sends again, as it would have after reading the body
                    self._principal(request)
                raise FHIRError(413, f"Request body too large (limit {limit} bytes)",
                                "too-costly")
            return await self._route(request)
        except CancelledError:
            # the caller went away (e.g. a waited push); the push itself goes on
            return Response(499, b"", "text/plain")
        except FHIRError as e:
            return json_response(e.outcome(), e.status, **e.headers)
        except Exception:
            log.failure("Unhandled error for {method} {path}",
                        method=request.method.decode("ascii", "replace"),
                        path=request.path.decode("ascii", "replace"))
            return json_response(
                operation_outcome("Internal server error", code="exception", severity="error"),
                500,
            )

    def _principal(self, request: Request) -> Principal:
        header = request.getHeader(b"authorization")
        return self.authority.authenticate(header.decode("latin-1") if header else None)

    @staticmethod
    def _json_body(request: Request) -> Any:
        ctype = (request.getHeader(b"content-type") or b"").decode("latin-1").split(";")[0]
        ctype = ctype.strip().lower()
        if ctype not in JSON_TYPES:
            raise FHIRError(
                415,
                f"Content-Type must be application/fhir+json or application/json, not "
                f"{ctype or 'missing'}",
                "invalid",
            )
        raw = _read_body(request)
        try:
            return json_loads(raw)
        except JSONInputError as e:
            raise bad_request(f"Invalid JSON body: {e.msg}")

    def _base(self, request: Request) -> str:
        if self.base_url:
            return self.base_url.rstrip("/")
        host = (request.getHeader(b"host") or b"localhost").decode("latin-1")
        scheme = "https" if request.isSecure() else "http"
        return f"{scheme}://{host}"

    def _status_url(self, request: Request, push: Push) -> str:
        return f"{self._base(request)}/fhir/R4/AgentPush/{push.id}"

    # -- routing -------------------------------------------------------------------------

    async def _route(self, request: Request) -> Response:
        raw_segments = [s for s in (request.prepath or []) + (request.postpath or []) if s]
        segments = [unquote(s.decode("utf-8", "replace")) for s in raw_segments]
        method = request.method.decode("ascii")
        args: dict[bytes, list[bytes]] = request.args or {}
        query = {
            k.decode("utf-8", "replace"): [v.decode("utf-8", "replace") for v in vs]
            for k, vs in args.items()
        }
        if segments == ["healthz"]:
            return json_response({"status": "ok", "agentsConnected": len(self.hub.sessions)})
        if segments == ["oauth2", "token"] and method == "POST":
            return await self._token(request)
        if segments == ["auth", "me"] and method == "GET":
            return self._me(request)
        if segments[:2] == ["fhir", "R4"]:
            rest = segments[2:]
        elif segments[:1] == ["Agent"]:
            rest = segments  # short form: /Agent/{id}/$push
        else:
            raise not_found(f"No route for {'/'.join(segments) or '/'}")
        if not rest:
            raise not_found("No resource type given")
        principal = self._principal(request)
        resource_type = rest[0]
        if resource_type == "Agent" and len(rest) >= 2 and rest[-1].startswith("$"):
            return await self._agent_operation(request, principal, method, rest, query)
        if resource_type == "AgentPush":
            return await self._push_status(request, principal, method, rest, query)
        if resource_type == "Bot" and rest[-1] == "$execute" and len(rest) in (2, 3):
            if self.bots is None:
                raise not_found("Bots are not enabled on this relay")
            # imported here: http_execute builds this module's Response
            from medagent.relay.http_execute import execute_bot
            return await execute_bot(self.bots, request, principal,
                                     rest[1] if len(rest) == 3 else None, query)
        if resource_type == "ClientApplication" and len(rest) == 3 and rest[2] == "$revoke":
            return await self._revoke(principal, method, rest[1])
        if resource_type not in RESOURCE_TYPES:
            raise not_found(f"Unsupported resource type {resource_type}")
        return await self._rest(request, principal, method, rest, query)

    # -- oauth2 ---------------------------------------------------------------------------

    async def _token(self, request: Request) -> Response:
        import base64

        ctype = (request.getHeader(b"content-type") or b"").decode("latin-1").lower()
        raw = _read_body(request, MAX_TOKEN_BODY + 1)
        if len(raw) > MAX_TOKEN_BODY:
            raise FHIRError(413, f"Token request too large (limit {MAX_TOKEN_BODY} bytes)",
                            "too-costly")
        text = raw.decode("utf-8", "replace")
        if "json" in ctype:
            try:
                doc = json_loads(text)
            except JSONInputError as e:
                raise bad_request(f"Invalid JSON body: {e.msg}")
            if not isinstance(doc, dict):
                raise bad_request("Invalid JSON body: not an object")
            form = {k: v for k, v in doc.items() if isinstance(v, str)}
        else:
            try:
                form = {k: v[-1] for k, v in parse_qs(text, max_num_fields=20).items()}
            except ValueError:
                raise bad_request("Invalid form body: too many fields")
        client_id, client_secret = form.get("client_id"), form.get("client_secret")
        auth = (request.getHeader(b"authorization") or b"").decode("latin-1")
        if auth.lower().startswith("basic "):
            try:
                user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
                client_id, client_secret = client_id or user, client_secret or password
            except ValueError:
                raise bad_request("Invalid Basic authorization header")
        if form.get("grant_type") != "client_credentials":
            return json_response({"error": "unsupported_grant_type",
                                  "error_description": "Only client_credentials is supported"},
                                 400)
        if not client_id or not client_secret:
            return json_response({"error": "invalid_request",
                                  "error_description": "client_id and client_secret are required"},
                                 400)
        address = _client_host(request)
        if self.login_throttle is not None:
            self.login_throttle.check(client_id, address)  # 429 while locked out
        try:
            token = await self.authority.issue_token(client_id, client_secret)
        except FHIRError:
            if self.login_throttle is not None:
                self.login_throttle.failed(client_id, address)
            return json_response({"error": "invalid_client",
                                  "error_description": "Invalid client credentials"}, 401)
        if self.login_throttle is not None:
            self.login_throttle.succeeded(client_id)
        resp = json_response(token)
        resp.content_type = "application/json"
        resp.headers["Cache-Control"] = "no-store"
        return resp

    def _me(self, request: Request) -> Response:
        principal = self._principal(request)
        profile = {"resourceType": "ClientApplication", "id": principal.client_id}
        return json_response(
            {
                "profile": profile,
                "project": {"resourceType": "Project", "id": "medagent"},
                "membership": {
                    "resourceType": "ProjectMembership",
                    "id": principal.client_id,
                    "profile": {"reference": f"ClientApplication/{principal.client_id}"},
                },
            }
        )

    async def _revoke(self, principal: Principal, method: str, client_id: str) -> Response:
        """
        ``POST ClientApplication/{id}/$revoke`` (admin): the client's tokens fail from now on
        and its agent connections are closed before this answers.
        """
        if method != "POST":
            raise FHIRError(405, "$revoke needs POST", "not-supported")
        principal.require_admin()
        await self.authority.revoke_client(client_id)
        log.info("Client {client_id} revoked by {by}", client_id=client_id,
                 by=principal.client_id)
        return json_response(operation_outcome(f"Client {client_id} revoked", id="ok"))

    # -- FHIR REST ------------------------------------------------------------------------

    async def _check_read(self, principal: Principal, resource_type: str, id: str | None
                          ) -> frozenset[str] | None:
        """
        The ids of C{resource_type} the caller may read (None: all), or 403 for a type its
        role never reads; with an C{id} outside its scope, the same 404 as a missing one.
        The scopes are in L{medagent.relay.access}; a Bot reads what its Bot resource grants.
        """
        if principal.role == BOT:
            principal.require_read(resource_type)
            return None
        if id is not None:
            await access.check_visible(principal, resource_type, id, self.store)
            return None
        return await access.visible_ids(principal, resource_type, self.store)

    async def _rest(
        self,
        request: Request,
        principal: Principal,
        method: str,
        rest: list[str],
        query: Mapping[str, list[str]],
    ) -> Response:
        resource_type = rest[0]
        if len(rest) == 1 and method == "GET":
            ids = await self._check_read(principal, resource_type, None)
            if ids is None:
                found = await self.store.search(resource_type, query)
            else:  # narrowed in the query itself, so _count/_offset page the caller's own
                found = await self.store.search(resource_type, access.scoped_search(query, ids))
                found = [r for r in found if r.get("id") in ids]
            return json_response(self._bundle(request, found))
        if len(rest) == 1 and method == "POST":
            if not (resource_type == "Binary" and principal.role == AGENT):
                principal.require_write(resource_type)  # agents upload Binary (DICOM received)
            resource = self._json_body(request)
            if isinstance(resource, dict):
                resource.pop("id", None)
            self._check_type(resource, resource_type)
            stamp_author(resource, principal)
            created = await self.store.create(resource)
            return json_response(
                created, 201,
                Location=f"{self._base(request)}/fhir/R4/{resource_type}/{created['id']}"
                f"/_history/{created['meta']['versionId']}",
                ETag=f'W/"{created["meta"]["versionId"]}"',
            )
        if len(rest) == 2:
            id = rest[1]
            if method == "GET":
                await self._check_read(principal, resource_type, id)
                resource = await self.store.read(resource_type, id)
                if resource_type == "Agent" and principal.role == AGENT:
                    self.hub.agent_config_read(id)  # Medplum's agent: now it takes pushes
                return json_response(resource, ETag=f'W/"{resource["meta"]["versionId"]}"')
            if method == "PUT":
                principal.require_write(resource_type)
                resource = self._json_body(request)
                self._check_type(resource, resource_type)
                if resource.get("id") not in (None, id):
                    raise bad_request("Resource id does not match the URL")
                resource["id"] = id
                stamp_author(resource, principal)
                if_match = request.getHeader(b"if-match")
                try:
                    await self.store.read(resource_type, id)
                    existed = True
                except FHIRError:
                    existed = False
                updated = await self.store.update(
                    resource, if_match.decode("latin-1") if if_match else None
                )
                return json_response(updated, 200 if existed else 201,
                                     ETag=f'W/"{updated["meta"]["versionId"]}"')
            if method == "DELETE":
                principal.require_write(resource_type)
                await self.store.delete(resource_type, id)
                return json_response(operation_outcome("Deleted", id="ok"))
        raise FHIRError(405, f"{method} not supported on {'/'.join(rest)}", "not-supported")

    @staticmethod
    def _check_type(resource: Any, resource_type: str) -> None:
        if not isinstance(resource, dict):
            raise bad_request("Resource must be a JSON object")
        if resource.get("resourceType") != resource_type:
            raise bad_request(
                f"resourceType {resource.get('resourceType')!r} does not match {resource_type}"
            )

    def _bundle(self, request: Request, resources: list[dict[str, Any]]) -> dict[str, Any]:
        base = self._base(request)
        return {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(resources),
            "entry": [
                {"fullUrl": f"{base}/fhir/R4/{r['resourceType']}/{r['id']}", "resource": r}
                for r in resources
            ],
        }

    # -- Agent operations -----------------------------------------------------------------

    async def _agent_operation(
        self,
        request: Request,
        principal: Principal,
        method: str,
        rest: list[str],
        query: Mapping[str, list[str]],
    ) -> Response:
        op = rest[-1]
        agent_id = rest[1] if len(rest) == 3 else None
        if len(rest) not in (2, 3):
            raise not_found("No such Agent operation path")
        identifiers = query.get("identifier") or []
        identifier = identifiers[-1] if identifiers else None
        if op == "$push":
            if method != "POST":
                raise FHIRError(405, "$push needs POST", "not-supported")
            payload = self._json_body(request)
            key = request.getHeader(b"idempotency-key")
            result = await self.pushes.push(
                principal,
                (agent_id, identifier),
                payload,
                key.decode("utf-8", "replace") if key else None,
            )
            return self._push_response(request, result)
        if op not in AGENT_OPERATIONS:
            raise not_found(f"Unknown Agent operation {op}")
        # Type level: ``?identifier=`` alone names one agent (Medplum's getAgentForRequest);
        # any other search runs the operation on each match.
        by_identifier = bool(identifier) and set(query) <= {"identifier", *OPERATION_PARAMS}
        if agent_id is None and (op == "$bulk-status" or not by_identifier):
            return await self._bulk_operation(principal, op, query)
        agent = await self.pushes.resolve_agent(agent_id, identifier)
        agent_id = agent["id"]
        if not (principal.can_push(agent_id) or principal.can_act_as(agent_id)):
            raise forbidden(f"This client may not use Agent/{agent_id}")
        return json_response(await self._operation_result(op, agent_id, query))

    async def _bulk_operation(
        self, principal: Principal, op: str, query: Mapping[str, list[str]]
    ) -> Response:
        """
        ``Agent/$op?<search>`` (what ``@medplum/cli agent status|reload-config`` calls): the
        operation on every matching agent this client may use, as Medplum answers it, a
        Bundle of ``Parameters{agent, result}`` where a failure is the result's
        OperationOutcome (the call itself succeeds).
        """
        search = {k: v for k, v in query.items() if k not in OPERATION_PARAMS}
        count = (search.get("_count") or [str(MAX_BULK_AGENTS)])[-1]
        if not count.isdigit() or not 1 <= int(count) <= MAX_BULK_AGENTS:
            raise bad_request(f"_count must be between 1 and {MAX_BULK_AGENTS}")
        agents = await self.store.search("Agent", search)
        agents = [a for a in agents
                  if principal.can_push(a["id"]) or principal.can_act_as(a["id"])]

        async def one(agent: dict[str, Any]) -> dict[str, Any]:
            try:
                result = await self._operation_result(op, agent["id"], query)
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

    async def _operation_result(
        self, op: str, agent_id: str, query: Mapping[str, list[str]]
    ) -> dict[str, Any]:
        """One agent's answer to C{op}: a Parameters or OperationOutcome, or L{FHIRError}."""
        if op in ("$status", "$bulk-status"):
            return self._status_parameters(agent_id)
        if op == "$reload-config":
            answer = await self.hub.request(agent_id, {"type": wire.RELOADCONFIG_REQUEST})
            self._raise_agent_error(answer)
            return operation_outcome("All OK", id="ok")
        if op == "$fetch-logs":
            limit = (query.get("limit") or ["20"])[-1]
            try:
                n = int(limit)
            except ValueError:
                raise bad_request("limit must be an integer")
            if not 1 <= n <= 1000:
                raise bad_request("limit must be between 1 and 1000")
            answer = await self.hub.request(agent_id, {"type": wire.LOGS_REQUEST, "limit": n})
            self._raise_agent_error(answer)
            logs = answer.get("logs") or []
            return {"resourceType": "Parameters", "parameter": [
                {"name": "logs", "valueString": "\n".join(json.dumps(line) for line in logs)}]}
        # $stats: the relay's own counts always; the agent's part when it gives one (Medplum's
        # agent before 2026 has no agent:stats and never answers it).
        relay_side = await self.journal.counts(agent_id)
        stats: dict[str, Any] = {"relay": relay_side, "agent": None}
        if self.hub.snapshot(agent_id) is not None:
            relay_side["lanes"] = self.hub.snapshot(agent_id)
        if not self.hub.is_connected(agent_id):
            stats["agentUnavailable"] = f"Agent/{agent_id} is not connected"
        else:
            try:
                answer = await self.hub.request(agent_id, {"type": wire.STATS_REQUEST})
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

    @staticmethod
    def _raise_agent_error(answer: Mapping[str, Any]) -> None:
        if answer.get("type") == wire.ERROR or (answer.get("statusCode") or 200) >= 400:
            raise bad_request(str(answer.get("body") or "Agent reported an error"))

    def _status_parameters(self, agent_id: str) -> dict[str, Any]:
        status = self.hub.status(agent_id)
        last = status.get("lastUpdated")
        params = [
            {"name": "status", "valueCode": status["status"]},
            {"name": "version", "valueString": status["version"]},
        ]
        if last:
            params.append({"name": "lastUpdated", "valueInstant": time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime(last))})
        return {"resourceType": "Parameters", "parameter": params}

    def _push_response(self, request: Request, result: PushResult) -> Response:
        push = result.push
        location = self._status_url(request, push)
        headers = {"Content-Location": location, "X-Medagent-Push-Id": push.id}
        if result.duplicate:
            headers["X-Medagent-Duplicate"] = "true"
        if not result.waited:
            outcome = operation_outcome(
                f"Push {push.id} accepted ({push.state})" + (
                    "; repeat of an earlier push, not sent again" if result.duplicate else ""),
                id="accepted",
                diagnostics=location,
            )
            return json_response(outcome, 202, **headers)
        if result.timed_out:
            why = f" (last error: {push.last_error})" if push.last_error else ""
            outcome = operation_outcome(
                f"No answer from the device within the wait timeout{why}; push {push.id} is "
                f"{push.state}. Its outcome will be at {location}",
                code="timeout",
                severity="error",
                diagnostics=location,
            )
            return json_response(outcome, 504, **headers)
        if result.retrying:
            outcome = operation_outcome(
                f"The device could not be reached ({push.last_error or 'link failed'}); push "
                f"{push.id} stays {push.state} and is retried. Its outcome will be at "
                f"{location}",
                code="transient",
                severity="error",
                diagnostics=location,
            )
            return json_response(outcome, 502, **headers)
        if (push.reply_status is not None and push.reply_status < 400
                and push.reply_body is not None):
            return Response(push.reply_status, push.reply_body.encode("utf-8"),
                            push.reply_content_type or "text/plain", headers)
        status = push.reply_status if push.reply_status and push.reply_status >= 400 else 502
        text = push.last_error or push.reply_body or f"Push {push.state}"
        code = {504: "timeout", 400: "invalid"}.get(status, "transient")
        return json_response(
            operation_outcome(text, code=code, severity="error", diagnostics=location),
            status, **headers,
        )

    # -- push status ----------------------------------------------------------------------

    def _push_page(
        self,
        request: Request,
        query: Mapping[str, list[str]],
        found: list[Push],
        total: int,
        next_before: int | None,
    ) -> dict[str, Any]:
        """A searchset page of pushes, with the true C{total} and a C{next} link (cursor)."""
        def url(cursor: int | None) -> str:
            keep = [(k, v) for k, vs in query.items() if k != "_cursor" for v in vs]
            if cursor is not None:
                keep.append(("_cursor", str(cursor)))
            qs = urlencode(keep)
            return f"{self._base(request)}/fhir/R4/AgentPush" + (f"?{qs}" if qs else "")

        links = [{"relation": "self", "url": url(_int_or_none(query, "_cursor"))}]
        if next_before is not None:
            links.append({"relation": "next", "url": url(next_before)})
        return {
            "resourceType": "Bundle", "type": "searchset", "total": total, "link": links,
            "entry": [{"fullUrl": self._status_url(request, p), "resource": _push_doc(p)}
                      for p in found],
        }

    async def _push_status(
        self,
        request: Request,
        principal: Principal,
        method: str,
        rest: list[str],
        query: Mapping[str, list[str]],
    ) -> Response:
        if len(rest) == 1 and method == "GET":
            params = {k: v[-1] for k, v in query.items()}
            agent = params.get("agent", "").removeprefix("Agent/")
            params.pop("requester", None)  # not a filter callers choose
            if agent:
                params["agent"] = agent
                if not principal.may_list_pushes(agent):
                    raise forbidden(f"This client may not read pushes of Agent/{agent}")
            else:
                principal.require_admin()
            if not principal.is_admin:
                params["requester"] = principal.client_id  # a pusher lists its own pushes
            if params.get("state") and params["state"] not in j.STATES:
                raise bad_request(f"state must be one of {', '.join(j.STATES)}")
            count = _int_param(params, "_count", DEFAULT_PAGE, 0, MAX_PAGE)
            cursor = _int_param(params, "_cursor", None, 1, 2**63 - 1)
            found, total, next_before = await self.journal.search_page(
                params, count=count, before_seq=cursor)
            return json_response(self._push_page(request, query, found, total, next_before))
        if len(rest) >= 2:
            push = await self.journal.get(rest[1])
            if not principal.may_read_push(push.agent_id, push.requester):
                # another client's push looks exactly like a missing one
                raise not_found(f"No push {push.id}")
            if len(rest) == 2 and method == "GET":
                return json_response(_push_doc(self.hub.live_push(push)))
            if len(rest) == 3 and method == "POST" and rest[2] == "$retry":
                push = await self.pushes.retry(principal, push.id)
                return json_response(push.to_json())
            if len(rest) == 3 and method == "POST" and rest[2] == "$cancel":
                push = await self.pushes.cancel(principal, push.id)
                return json_response(push.to_json())
        raise FHIRError(405, f"{method} not supported on {'/'.join(rest)}", "not-supported")


#: Page size of the push list: default and upper bound of ``_count``.
DEFAULT_PAGE = 100
MAX_PAGE = 1000


def _int_param(params: Mapping[str, str], name: str, default: Any, low: int, high: int) -> Any:
    """A whole-number query parameter within [low, high], or a 400 saying so."""
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 19) or not low <= int(raw) <= high:
        raise bad_request(f"{name} must be a whole number from {low} to {high}")
    return int(raw)


def _int_or_none(query: Mapping[str, list[str]], name: str) -> int | None:
    values = query.get(name)
    raw = values[-1] if values else ""
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 19 else None


def _push_doc(push: Push) -> dict[str, Any]:
    """A push's status document; a row too damaged to show still lists (by id and state)."""
    try:
        return push.to_json()
    except Exception:
        log.failure("Push {push_id} could not be shown; listed by id only", push_id=push.id)
        return {"resourceType": "AgentPush", "id": push.id, "state": push.state}


class Root(Resource):
    """``/ws/agent`` is the websocket; everything else goes to the L{Api}."""

    def __init__(self, api: Api, websocket: Resource) -> None:
        super().__init__()
        self.api = api
        ws = Resource()
        # Resource is @implementer(IResource), which mypy cannot see without mypy-zope
        ws.putChild(b"agent", cast(IResource, websocket))
        self.putChild(b"ws", cast(IResource, ws))

    def getChild(self, path: bytes, request: Request) -> Resource:
        # Site.getResourceFor sets both paths before traversal
        if request.postpath is not None and request.prepath is not None:
            request.postpath.insert(0, path)
            request.prepath.pop()
        return self.api
