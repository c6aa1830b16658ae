"""
What every route handler gets (L{RouteContext}) and gives back (L{Response}), and the request
helpers they share: reading a JSON body, the relay's base URL.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Mapping

import attr
from twisted.web.server import Request

from medagent.contenttypes import FHIR_JSON, JSON_TYPES
from medagent.fhir import FHIRError, bad_request
from medagent.jsonsafe import JSONInputError
from medagent.jsonsafe import loads as json_loads
from medagent.relay.auth import Principal
from medagent.storage.journal import Push

if TYPE_CHECKING:
    from medagent.relay.http.router import Api

DEFAULT_MAX_BODY = 32 * 1024 * 1024


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


def read_body(request: Request, size: int = -1) -> bytes:
    """A request's body (up to C{size} bytes); Twisted sets C{content} before processing,
    so a request without one has an empty body."""
    content = request.content
    return b"" if content is None else content.read(size)


def client_host(request: Request) -> str:
    """The address a request came from (the proxy's, behind a reverse proxy)."""
    addr = request.getClientAddress()
    return str(getattr(addr, "host", addr))


@attr.s(auto_attribs=True)
class RouteContext:
    """
    One request as a handler sees it: the relay's parts (C{api}), the request, its method,
    the path below ``fhir/R4`` as decoded segments (C{rest}), the decoded query, the names a
    route pattern captured (C{params}: ``type``, ``id``, ``op``) and, on routes that need a
    token, the caller.
    """

    api: Api
    request: Request
    method: str
    rest: list[str]
    query: Mapping[str, list[str]]
    params: dict[str, str] = attr.ib(factory=dict)
    caller: Principal | None = None

    @property
    def principal(self) -> Principal:
        """The authenticated caller (routes below ``fhir/R4`` always have one)."""
        if self.caller is None:
            raise RuntimeError("this route runs without authentication")
        return self.caller

    def header(self, name: bytes) -> str | None:
        value = self.request.getHeader(name)
        return None if value is None else value.decode("latin-1")

    def json_body(self) -> Any:
        """The body as JSON, or 415 (not a JSON content type) or 400 (not JSON)."""
        ctype = (self.header(b"content-type") or "").split(";")[0].strip().lower()
        if ctype not in JSON_TYPES:
            raise FHIRError(
                415,
                f"Content-Type must be application/fhir+json or application/json, not "
                f"{ctype or 'missing'}",
                "invalid",
            )
        raw = read_body(self.request)
        try:
            return json_loads(raw)
        except JSONInputError as e:
            raise bad_request(f"Invalid JSON body: {e.msg}")

    def base(self) -> str:
        """The relay's URL as callers reach it (C{--base-url}, else from the Host header)."""
        if self.api.base_url:
            return self.api.base_url.rstrip("/")
        host = (self.header(b"host") or "localhost")
        scheme = "https" if self.request.isSecure() else "http"
        return f"{scheme}://{host}"

    def status_url(self, push: Push) -> str:
        return f"{self.base()}/fhir/R4/AgentPush/{push.id}"
