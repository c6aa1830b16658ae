"""
The relay's HTTP server on twisted.web: the L{Site} with its request limits (body size before
and after authentication, a deadline per request) and the root resource that puts the
``/ws/agent`` websocket next to the API.

The API itself, its route table and handlers, is the package L{medagent.relay.http}; this
module keeps the names the rest of the relay imports (L{Api}, L{Response}, L{json_response},
L{stamp_author}, the defaults).
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, cast

from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from medagent.relay.http.context import DEFAULT_MAX_BODY, Response, json_response, stamp_author
from medagent.relay.http.oauth import MAX_TOKEN_BODY
from medagent.relay.http.router import Api

__all__ = [
    "Api", "RelaySite", "Root", "LimitedRequest", "DeadlineChannel", "DEFAULT_MAX_BODY",
    "DEFAULT_REQUEST_TIMEOUT", "DEFAULT_IDLE_TIMEOUT", "PRE_AUTH_MAX_BODY", "MAX_TOKEN_BODY",
    "Response", "json_response", "stamp_author",
]

log = Logger()

#: Body a request may send without a valid bearer token (a token request is far smaller):
#: strangers cannot make the relay store megabytes per connection.
PRE_AUTH_MAX_BODY = 64 * 1024


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
                 authenticate: Callable[[str | None], Any] | None = None,
                 access_log: bool = False, **kw: Any):
        kw.setdefault("timeout", DEFAULT_IDLE_TIMEOUT)
        # the token endpoint reads its own form; nothing else wants a POST body in args
        kw.setdefault("parsePOSTFormSubmission", False)
        super().__init__(resource, **kw)
        self.max_body = max_body
        self.request_timeout = request_timeout
        #: checks an Authorization header (raises if invalid); None: no pre-auth body limit
        self.authenticate = authenticate
        self.access_log = access_log

    def log(self, request: http.Request) -> None:
        # Access log without query strings (they may carry identifiers), debug level; only
        # with --access-log (twistd writes debug events too, one per request adds up)
        if not self.access_log:
            return
        log.debug(
            "{method} {path} {code}",
            method=request.method.decode("ascii", "replace"),
            path=request.path.decode("ascii", "replace"),
            code=request.code,
        )


class Root(Resource):
    """``/ws/agent`` is the websocket; every other path is looked up in the L{Api}'s tree."""

    def __init__(self, api: Api, websocket: Resource) -> None:
        super().__init__()
        self.api = api
        ws = Resource()
        # Resource is @implementer(IResource), which mypy cannot see without mypy-zope
        ws.putChild(b"agent", cast(IResource, websocket))
        self.putChild(b"ws", cast(IResource, ws))

    def getChild(self, path: bytes, request: Request) -> Resource:  # noqa: N802
        return self.api.getChildWithDefault(path, request)
