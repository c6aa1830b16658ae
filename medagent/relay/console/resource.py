"""
The console's HTTP side: sign-in, sessions, CSRF and Origin checks, and one handler per page
and action.  Pages are rendered by L{medagent.relay.console.html}; data come from the relay's
own parts (authority, store, journal, hub, push service), never new SQL.

Every POST is refused with 403 unless it carries the session's CSRF token, and unless its
C{Origin} (when the browser sends one) is this relay.  Viewers get no action and no
payload; each payload view by an operator or admin is an C{AuditEvent} (without the payload).
"""

from __future__ import annotations

import calendar
import time
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs, quote, urlsplit

from twisted.internet.defer import CancelledError, ensureDeferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from medagent import wire
from medagent.fhir import FHIRError
from medagent.relay import bulk
from medagent.relay.auth import Principal
from medagent.relay.http.agent_ops import raise_agent_error
from medagent.relay.http.context import client_host, read_body
from medagent.relay.console import html
from medagent.relay.console import inbound as inbound_html
from medagent.relay.console.events import push_event, sse_frame
from medagent.relay.console.sessions import COOKIE, ConsoleSession
from medagent.contenttypes import PING
from medagent.storage import journal as j
from medagent.storage.resources import now_iso

log = Logger()

PREFIX = html.PREFIX
#: A form body, at most (a sign-in or an action: a few hundred bytes).
MAX_FORM = 8 * 1024
PAGE_SIZE = 50
#: how long a ping from the agent page waits for the device, in milliseconds
PING_TIMEOUT_MS = 10_000
MAX_AGENTS = 1000
SECURITY_HEADERS = {
    b"Content-Security-Policy": b"default-src 'none'; script-src 'self'; style-src 'self'; "
                                b"img-src 'self'; connect-src 'self'; form-action 'self'; "
                                b"frame-ancestors 'none'; base-uri 'none'",
    b"X-Content-Type-Options": b"nosniff",
    b"X-Frame-Options": b"DENY",
    # (not no-referrer: browsers then send "Origin: null" with our own forms)
    b"Referrer-Policy": b"same-origin",
    b"Cache-Control": b"no-store",
}
#: what a redirect after an action may say (by code, never text from the request)
FLASH = {"reloaded": "The agent reloaded its configuration.",
         "retried": "The message is queued again.",
         "cancelled": "The message was cancelled.",
         "resent": "Sent again as this new message.",
         "pinged": "Ping sent; its outcome is below.",
         "paused": "Lane paused: its pushes wait on the relay, in order.",
         "resumed": "Lane resumed: its waiting pushes go out in order.",
         "signedout": "Signed out."}


class Refused(Exception):
    """Answer with this status and text (an error page)."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


class ConsoleResource(Resource):
    """``/console/...``: a leaf; L{render} dispatches on the path below it."""

    isLeaf = True

    def __init__(self, console: Any) -> None:
        super().__init__()
        self.console = console

    def render(self, request: Request) -> Any:
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        path = [p.decode("utf-8", "replace") for p in (request.postpath or []) if p]
        method = request.method.decode("ascii", "replace")
        if method == "GET" and path == ["events"]:
            return self._events(request)
        d = ensureDeferred(self._respond(request, method, path))
        done = [False]

        def gone(_: Any) -> None:
            if not done[0]:
                d.cancel()

        request.notifyFinish().addErrback(gone)

        def write(result: tuple[int, bytes, str, dict[str, str]]) -> None:
            done[0] = True
            if request._disconnected:
                return
            status, body, ctype, headers = result
            request.setResponseCode(status)
            request.setHeader(b"Content-Type", ctype.encode())
            for k, v in headers.items():
                request.setHeader(k.encode(), v.encode())
            request.setHeader(b"Content-Length", str(len(body)).encode())
            request.write(body)
            request.finish()

        d.addCallback(write)
        d.addErrback(lambda f: None if f.check(CancelledError) else log.failure(
            "Console response failed", f))
        return NOT_DONE_YET

    # -- plumbing ---------------------------------------------------------------------

    def _session(self, request: Request) -> ConsoleSession | None:
        """The session this node remembers for the cookie (for an error page's layout)."""
        raw = request.getCookie(COOKIE)
        return self.console.sessions.get(raw.decode("ascii", "replace") if raw else None,
                                         self.console.authority)

    async def _find_session(self, request: Request) -> ConsoleSession | None:
        """The cookie's live session, asked of the shared store on a cluster."""
        raw = request.getCookie(COOKIE)
        return await self.console.sessions.find(
            raw.decode("ascii", "replace") if raw else None, self.console.authority)

    def _events(self, request: Request) -> Any:
        def opened(session: ConsoleSession | None) -> None:
            if request._disconnected:
                return
            if session is None:
                request.setResponseCode(401)
                request.finish()
                return
            self._open_stream(request, session)

        def failed(f: Any) -> None:
            log.failure("Console: the live stream's session check failed", f)
            if not request._disconnected:
                request.setResponseCode(503)
                request.finish()

        ensureDeferred(self._find_session(request)).addCallbacks(opened, failed)
        return NOT_DONE_YET

    def _open_stream(self, request: Request, session: ConsoleSession) -> None:
        stream = self.console.broker.open(request, key=session.id)
        if stream is None:
            request.setResponseCode(503)
            request.setHeader(b"Retry-After", b"10")
            request.write(b"too many live connections\n")
            request.finish()
            return
        # what may have changed between the page and its stream (asked on every (re)connect):
        # the agents this node holds now, and a message page's push
        stream.send(sse_frame("sessions", self.console.sessions_now()))
        push_id = self._query(request).get("push")
        if push_id:
            def now(push: j.Push) -> None:
                stream.send(sse_frame("push", push_event(self.console.hub.live_push(push))))

            # current(): after every write issued before it, so a transition announced
            # before this stream opened (its write perhaps not committed yet) is seen
            self.console.journal.current(push_id).addCallbacks(now, lambda f: None)

    def _origin_ok(self, request: Request) -> bool:
        origin = request.getHeader(b"origin")
        if origin is None:
            return True  # no Origin (older browsers, same-origin GET-made forms): CSRF token
        ours = self.console.own_origin(request)
        return origin.decode("latin-1").rstrip("/").lower() == ours.lower()

    @staticmethod
    def _form(request: Request) -> dict[str, str]:
        raw = read_body(request, MAX_FORM + 1)
        if len(raw) > MAX_FORM:
            raise Refused(413, "Form too large")
        try:
            parsed = parse_qs(raw.decode("utf-8"), keep_blank_values=True,
                              max_num_fields=20)
        except (UnicodeDecodeError, ValueError):
            raise Refused(400, "Unreadable form")
        return {k: v[-1] for k, v in parsed.items()}

    def _form_of(self, request: Request) -> dict[str, str]:
        """The form again, for an action (L{_route} read it for its CSRF check)."""
        if request.content is not None:
            request.content.seek(0)
        return self._form(request)

    @staticmethod
    def _query(request: Request) -> dict[str, str]:
        args: dict[bytes, list[bytes]] = request.args or {}
        return {k.decode("utf-8", "replace"): v[-1].decode("utf-8", "replace")[:200]
                for k, v in args.items() if v}

    async def _respond(self, request: Request, method: str, path: list[str]
                       ) -> tuple[int, bytes, str, dict[str, str]]:
        try:
            return await self._route(request, method, path)
        except Refused as e:
            session = self._session(request)
            return e.status, html.error_page(e.status, e.text, **self._layout(session)), \
                "text/html; charset=utf-8", {}
        except FHIRError as e:
            session = self._session(request)
            return e.status, html.error_page(e.status, e.message, **self._layout(session)), \
                "text/html; charset=utf-8", {}
        except CancelledError:
            raise
        except Exception:
            # (the text of an unexpected error may quote anything: it goes to the log only)
            log.failure("Console request failed: {method} {path}", method=method,
                        path="/".join(path[:1]))
            return 500, html.error_page(500, "Something went wrong; see the relay's log"), \
                "text/html; charset=utf-8", {}

    def _layout(self, session: ConsoleSession | None) -> dict[str, Any]:
        if session is None:
            return {}
        return {"who": session.principal, "csrf": session.csrf,
                "alerts": len(self.console.alerts.active) if self.console.alerts else 0}

    async def _route(self, request: Request, method: str, path: list[str]
                     ) -> tuple[int, bytes, str, dict[str, str]]:
        if path and path[0] == "static" and method == "GET":
            return self._static(path[1:])
        if path == ["login"]:
            if method == "POST":
                return await self._login(request)
            if await self._find_session(request) is not None:
                return _redirect("/fleet")
            return 200, html.login_page(), _HTML, {}
        session = await self._find_session(request)
        if method == "POST":
            if session is None:
                raise Refused(403, "Sign in first")
            form = self._form(request)
            if not self._origin_ok(request):
                log.warn("Console: POST from another origin refused ({client_id})",
                         client_id=session.principal.client_id)
                raise Refused(403, "Refused: this form came from another site")
            if not session.csrf_ok(form.get("csrf")):
                log.warn("Console: POST without a valid CSRF token refused ({client_id})",
                         client_id=session.principal.client_id)
                raise Refused(403, "Refused: the form's security token is missing or wrong; "
                                   "reload the page and try again")
            return await self._action(request, session, path)
        if method != "GET":
            raise Refused(405, "Method not allowed")
        if session is None:
            return _redirect("/login")
        return await self._page(request, session, path)

    def _static(self, rest: list[str]) -> tuple[int, bytes, str, dict[str, str]]:
        if rest == ["console.css"]:
            return 200, html.CONSOLE_CSS.encode(), "text/css; charset=utf-8", {}
        if rest == ["console.js"]:
            return 200, html.CONSOLE_JS.encode(), "text/javascript; charset=utf-8", {}
        raise Refused(404, "No such file")

    # -- sign-in ----------------------------------------------------------------------

    async def _login(self, request: Request) -> tuple[int, bytes, str, dict[str, str]]:
        form = self._form(request)
        client_id = form.get("client_id", "").strip()[:200]
        secret = form.get("client_secret", "")[:500]
        address = client_host(request)
        if not self._origin_ok(request):
            raise Refused(403, "Refused: this form came from another site")
        throttle = self.console.throttle
        try:
            throttle.check(client_id or None, address)
        except FHIRError as e:
            return 429, html.login_page(e.message, client_id), _HTML, \
                dict(e.headers or {})
        principal: Principal | None = None
        if client_id and secret:
            principal = await self.console.authority.check_credentials(client_id, secret)
        if principal is None or not principal.may_use_console():
            throttle.failed(client_id or None, address)
            log.warn("Console sign-in refused for client {client_id} from {address}",
                     client_id=client_id, address=address)
            why = ("Unknown client or wrong secret" if principal is None
                   else "This client may not use the console (roles: admin, operator, viewer)")
            return 401, html.login_page(why, client_id), _HTML, {}
        throttle.succeeded(client_id)
        old = request.getCookie(COOKIE)
        if old:  # a new sign-in never keeps the id the browser had (no session fixation)
            await self.console.sessions.close(old.decode("ascii", "replace"))
        session = await self.console.sessions.open(principal)
        log.info("Console: {client_id} ({role}) signed in from {address}",
                 client_id=principal.client_id, role=principal.role, address=address)
        secure = self.console.secure_cookies(request)
        request.addCookie(COOKIE, session.id.encode(), path=PREFIX.encode(), httpOnly=True,
                          secure=secure, sameSite="strict")
        return _redirect("/fleet")

    # -- pages ------------------------------------------------------------------------

    async def _page(self, request: Request, session: ConsoleSession, path: list[str]
                    ) -> tuple[int, bytes, str, dict[str, str]]:
        c = self.console
        query = self._query(request)
        layout = self._layout(session)
        layout["flash"] = FLASH.get(query.get("done", ""))
        if path in ([], ["fleet"]):
            rows = await c.fleet_rows()
            return 200, html.fleet_page(rows, c.now(), **layout), _HTML, {}
        if len(path) == 2 and path[0] == "agent":
            agent = await c.store.read("Agent", path[1])
            rows = await c.fleet_rows([agent])
            if rows[0]["connected"] and rows[0].get("node") != c.hub.node_id:
                # held by another node: its version as that node sees it (one call)
                try:
                    status = await c.hub.status_anywhere(agent["id"])
                    rows[0]["version"] = status.get("version")
                except FHIRError:
                    pass
            lanes = await c.journal.lane_summaries(agent["id"])
            details = await c.lane_details(agent["id"], rows[0]["connected"])
            ping = await self._ping_shown(agent["id"], query.get("ping", ""))
            trends = await self._agent_trends(agent["id"])
            channels = ""
            if getattr(c, "inbound", None) is not None:  # the inbound log's view of it
                channels = inbound_html.channels_section(
                    agent["id"], await c.inbound.channel_summaries(
                        agent["id"], c.now() - inbound_html.CHANNEL_WINDOW), c.now(),
                    [str(ch.get("name")) for ch in agent.get("channel") or []
                     if isinstance(ch, dict) and ch.get("name")])
            return 200, html.agent_page(rows[0], lanes, c.now(),
                                        can_act=session.principal.may_operate(),
                                        details=details, ping=ping,
                                        trends=trends, channels=channels, **layout), _HTML, {}
        if path == ["messages"]:
            filters, params, cursor = _search(query)
            if params.get("patient_id") and not session.principal.may_see_payloads():
                raise Refused(403, "Your role may not search by patient id")
            found, total, next_cursor = await c.journal.search_page(
                params, count=PAGE_SIZE, before_seq=cursor)
            live = not any(filters.values()) and cursor is None
            bulk = await self._bulk_link(session, filters, params)
            return 200, html.messages_page(found, filters, total, next_cursor, live=live,
                                           bulk=bulk, **layout), _HTML, {}
        if path == ["messages", "retry"]:
            return await self._bulk_confirm(session, query, layout)
        if path == ["trends"]:
            return await self._trends(layout)
        if len(path) == 2 and path[0] == "message":
            return await self._message(request, session, path[1], query, layout)
        if path == ["alerts"]:
            alerts = c.alerts
            if alerts is None:
                raise Refused(404, "Alerts are off on this relay")
            return 200, html.alerts_page(list(alerts.active.values()), list(alerts.history),
                                         alerts.offline_after, monitor=alerts,
                                         **layout), _HTML, {}
        if path and path[0] == "inbound" and len(path) <= 2:
            return await self._inbound(request, session, path[1:], query, layout)
        raise Refused(404, "No such page")

    async def _inbound(self, request: Request, session: ConsoleSession, rest: list[str],
                       query: dict[str, str], layout: dict[str, Any]
                       ) -> tuple[int, bytes, str, dict[str, str]]:
        """The inbound list (``/inbound``) and a message's page (``/inbound/{id}``)."""
        c = self.console
        principal = session.principal
        log_ = getattr(c, "inbound", None)
        if log_ is None:
            raise Refused(404, "The inbound log is off on this relay")
        phi = principal.may_see_payloads()
        if not rest:
            filters, params, cursor = inbound_html.search(query, may_see_phi=phi)
            found, total, next_cursor = await log_.search_page(
                params, count=PAGE_SIZE, before_seq=cursor)
            live = not any(filters.values()) and cursor is None
            return 200, inbound_html.inbound_page(found, filters, total, next_cursor,
                                                  show_phi=phi, live=live, **layout), \
                _HTML, {}
        message = await log_.get(rest[0])
        show = query.get("payload") == "1"
        if show:
            if not phi:
                log.warn("Console: {client_id} ({role}) may not see payloads (inbound {id})",
                         client_id=principal.client_id, role=principal.role, id=message.id)
                raise Refused(403, "Your role may not see message payloads")
            if message.body is not None:  # recorded before it is shown; no record, no payload
                await c.store.create(inbound_html.inbound_audit_event(
                    principal, message, client_host(request), c.now(), "console"))
                log.info("Console: {client_id} viewed the payload of inbound message {id}",
                         client_id=principal.client_id, id=message.id)
        return 200, inbound_html.inbound_detail_page(
            message, can_see_payload=phi, payload_shown=show, **layout), _HTML, {}

    async def _ping_shown(self, agent_id: str, push_id: str) -> j.Push | None:
        """The ping a lane's button just sent (a push of this agent with the ping type)."""
        if not push_id or len(push_id) > 100:
            return None
        try:
            push = self.console.hub.live_push(await self.console.journal.get(push_id))
        except FHIRError:
            return None
        if push.agent_id != agent_id or push.content_type != PING:
            return None
        return push

    async def _lane_action(self, request: Request, principal: Principal, agent_id: str,
                           action: str, form: dict[str, str]
                           ) -> tuple[int, bytes, str, dict[str, str]]:
        """Ping, pause or resume one lane of the agent page (operators and admins)."""
        c = self.console
        agent = await c.store.read("Agent", agent_id)
        where = f"/agent/{quote(agent['id'], safe='')}"
        lane = form.get("lane", "")
        if not lane or len(lane) > 1000:
            raise Refused(400, "Which lane? (the form has no destination)")
        if action == "ping":
            # only a device this agent already delivers to: the console is no port scanner
            known = {s["remote"] for s in await c.journal.lane_summaries(agent["id"])}
            if lane not in known:
                raise Refused(400, "Ping only a destination listed on this page")
            if c.lanes is not None and html.lane_of(lane) in {
                    p["lane"] for p in await c.lanes.paused(agent["id"])}:
                raise Refused(409, "This lane is paused: a ping would wait with its pushes; "
                                   "resume it first")
            result = await c.pushes.push(principal, (agent["id"], None), {
                "destination": lane, "contentType": PING, "body": "PING",
                "waitForResponse": True, "waitTimeout": PING_TIMEOUT_MS},
                ping_by_operator=True)
            log.info("Console: {client_id} pinged {lane} of Agent/{agent_id}",
                     client_id=principal.client_id, lane=html.lane_of(lane),
                     agent_id=agent["id"])
            return _redirect(f"{where}?done=pinged&ping={quote(result.push.id, safe='')}")
        if c.lanes is None:
            raise Refused(404, "Lane pauses are not available on this relay")
        method = c.lanes.pause if action == "pause" else c.lanes.resume
        await method(principal, agent["id"], lane, client_host(request))
        return _redirect(f"{where}?done={'paused' if action == 'pause' else 'resumed'}")

    async def _message(self, request: Request, session: ConsoleSession, push_id: str,
                       query: dict[str, str], layout: dict[str, Any]
                       ) -> tuple[int, bytes, str, dict[str, str]]:
        c = self.console
        principal = session.principal
        push = c.hub.live_push(await c.journal.get(push_id))
        show = query.get("payload") == "1"
        if show:
            if not principal.may_see_payloads():
                log.warn("Console: {client_id} ({role}) may not see payloads (push {push_id})",
                         client_id=principal.client_id, role=principal.role, push_id=push.id)
                raise Refused(403, "Your role may not see message payloads")
            # recorded before it is shown; no record, no payload
            await c.audit_payload_view(principal, push, client_host(request))
        resends = await c.journal.search({"resent_from": push.id}, limit=20)
        return 200, html.message_page(
            push, resends=resends, can_act=principal.may_operate(),
            can_see_payload=principal.may_see_payloads(), payload_shown=show,
            **layout), _HTML, {}

    # -- actions ----------------------------------------------------------------------

    async def _action(self, request: Request, session: ConsoleSession, path: list[str]
                      ) -> tuple[int, bytes, str, dict[str, str]]:
        c = self.console
        principal = session.principal
        if path == ["logout"]:
            await c.sessions.close(session.id)
            c.broker.close_key(session.id)
            request.addCookie(COOKIE, b"", path=PREFIX.encode(), httpOnly=True,
                              secure=c.secure_cookies(request), sameSite="strict",
                              max_age="0")
            return _redirect("/login")
        if not principal.may_operate():
            log.warn("Console: {client_id} ({role}) may not act ({path})",
                     client_id=principal.client_id, role=principal.role, path="/".join(path))
            raise Refused(403, "Your role may look but not act")
        actions: dict[str, Callable[[Principal, str], Awaitable[j.Push]]] = {
            "retry": c.pushes.retry, "cancel": c.pushes.cancel, "resend": c.pushes.resend}
        if len(path) == 3 and path[0] == "message" and path[2] in actions:
            done = await actions[path[2]](principal, path[1])
            log.info("Console: {client_id} did {action} on push {push_id}",
                     client_id=principal.client_id, action=path[2], push_id=path[1])
            flash = {"retry": "retried", "cancel": "cancelled", "resend": "resent"}[path[2]]
            return _redirect(f"/message/{quote(done.id, safe='')}?done={flash}")
        if len(path) == 3 and path[0] == "agent" and path[2] in ("ping", "pause", "resume"):
            return await self._lane_action(request, principal, path[1], path[2],
                                           self._form_of(request))
        if len(path) == 3 and path[0] == "agent" and path[2] == "reload":
            agent = await c.store.read("Agent", path[1])
            answer = await c.hub.request(agent["id"], {"type": wire.RELOADCONFIG_REQUEST})
            raise_agent_error(answer)
            log.info("Console: {client_id} reloaded the config of Agent/{agent_id}",
                     client_id=principal.client_id, agent_id=agent["id"])
            return _redirect(f"/agent/{quote(agent['id'], safe='')}?done=reloaded")
        if path == ["messages", "retry"]:
            return await self._bulk_retry(request, session)
        raise Refused(404, "No such action")

    # -- trends -----------------------------------------------------------------------

    async def _agent_trends(self, agent_id: str) -> str:
        c = self.console
        start, found = await c.trends(agent_id)
        trend = found.get(agent_id) or j.empty_trend(start, TREND_WIDTH, TREND_BUCKETS)
        return html.agent_trends(trend, c.now())

    async def _trends(self, layout: dict[str, Any]) -> tuple[int, bytes, str, dict[str, str]]:
        """The fleet's trends: one journal read for every agent, the busiest drawn."""
        c = self.console
        start, found = await c.trends()
        agents = {a["id"]: a for a in
                  await c.store.search("Agent", {"_count": [str(MAX_AGENTS)]})}
        total = j.trend_total(found.values(), start, TREND_WIDTH, TREND_BUCKETS)

        def busy(item: tuple[str, j.Trend]) -> tuple[int, int, str]:
            agent_id, t = item
            return (-(sum(t.created) + sum(t.failed) + max(t.depth)), -sum(t.failed), agent_id)

        ranked = sorted(found.items(), key=busy)
        drawn = [(agents.get(agent_id, {"id": agent_id}), t)
                 for agent_id, t in ranked[:TREND_AGENTS]]
        quiet = len([a for a in agents if a not in found])
        return 200, html.trends_page(total, drawn, c.now(), quiet=quiet,
                                     left_out=max(0, len(ranked) - TREND_AGENTS),
                                     **layout), _HTML, {}

    # -- bulk retry ---------------------------------------------------------------------

    async def _bulk_link(self, session: ConsoleSession, filters: dict[str, str],
                         params: dict[str, str]) -> str:
        """Operators only: the "Retry all N failed matching this filter" link."""
        if not session.principal.may_operate() or not bulk.retry_states(params):
            return ""
        return html.bulk_retry_link(_bulk_filters(filters),
                                    await bulk.count_retryable(self.console.journal, params))

    async def _bulk_confirm(self, session: ConsoleSession, query: dict[str, str],
                            layout: dict[str, Any]) -> tuple[int, bytes, str, dict[str, str]]:
        principal = session.principal
        if not principal.may_operate():
            log.warn("Console: {client_id} ({role}) may not retry in bulk",
                     client_id=principal.client_id, role=principal.role)
            raise Refused(403, "Your role may look but not act")
        filters, params, _ = _search(query)
        count = (await bulk.count_retryable(self.console.journal, params)
                 if bulk.retry_states(params) else 0)
        return 200, html.bulk_retry_confirm_page(_bulk_filters(filters), count,
                                                 bulk.MAX_BULK_RETRY, **layout), _HTML, {}

    async def _bulk_retry(self, request: Request, session: ConsoleSession
                          ) -> tuple[int, bytes, str, dict[str, str]]:
        """POST (CSRF and Origin checked, operators only): retry the filter's failed
        pushes, through the push service, each audited; a page with the counts."""
        c = self.console
        filters, params, _ = _search(self._query(request))
        if not bulk.retry_states(params):
            raise Refused(400, "Only failed or expired messages can be retried")
        done = await bulk.retry_matching(c.pushes, c.journal, c.store, session.principal,
                                         params, address=client_host(request), now=c.now(),
                                         via="console", limit=bulk.MAX_BULK_RETRY)
        layout = self._layout(session)
        return 200, html.bulk_retry_result_page(_bulk_filters(filters), done, **layout), \
            _HTML, {}


#: the trends: this many buckets of this many seconds (the last 24 hours, hour by hour)
TREND_BUCKETS = 24
TREND_WIDTH = 3600.0
#: the trends page draws this many agents (the busiest); each agent's page has its own
TREND_AGENTS = 50


def _bulk_filters(filters: dict[str, str]) -> dict[str, str]:
    """The search filters a bulk retry carries (the page cursor is not one)."""
    return {k: v for k, v in filters.items() if v}


_HTML = "text/html; charset=utf-8"


def _redirect(where: str) -> tuple[int, bytes, str, dict[str, str]]:
    return 303, b"", _HTML, {"Location": PREFIX + where}


def _instant(text: str, name: str) -> float | None:
    """A ``datetime-local`` value (``YYYY-MM-DDTHH:MM[:SS]``), read as UTC."""
    if not text:
        return None
    for fmt in ("%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S"):
        try:
            return float(calendar.timegm(time.strptime(text, fmt)))
        except ValueError:
            continue
    raise Refused(400, f"{name} must be a date and time (YYYY-MM-DDTHH:MM, UTC)")


def _search(query: dict[str, str]) -> tuple[dict[str, str], dict[str, str], int | None]:
    """The messages page's filters as shown, as journal parameters, and the page cursor."""
    names = ("control_id", "accession", "state", "agent", "destination", "remote",
             "since", "until", "patient_id", "study_uid", "sop_uid")
    filters = {k: query.get(k, "").strip() for k in names}
    params = {k: v for k, v in filters.items() if v and k not in ("since", "until")}
    if params.get("state") and params["state"] not in j.STATES:
        raise Refused(400, f"state must be one of {', '.join(j.STATES)}")
    params.pop("agent", None)
    if filters["agent"]:
        params["agent"] = filters["agent"].removeprefix("Agent/")
    for name in ("since", "until"):
        value = _instant(filters[name], name)
        if value is not None:
            params[name] = repr(value)
    raw = query.get("cursor", "")
    cursor = None
    if raw:
        if not (raw.isascii() and raw.isdigit() and len(raw) <= 19):
            raise Refused(400, "cursor must be a whole number")
        cursor = int(raw)
    return filters, params, cursor


def own_origin(base_url: str | None, request: Request) -> str:
    """This relay's origin as the browser sees it (C{--base-url}, else the Host header)."""
    if base_url:
        parts = urlsplit(base_url)
        return f"{parts.scheme}://{parts.netloc}"
    host = request.getHeader(b"host")
    scheme = "https" if request.isSecure() else "http"
    return f"{scheme}://{host.decode('latin-1') if host else 'localhost'}"


def audit_event(principal: Principal, push: j.Push, address: str, now: float
                ) -> dict[str, Any]:
    """The AuditEvent of one payload view: who, which push, from where; never the payload."""
    return {
        "resourceType": "AuditEvent",
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
                 "code": "rest", "display": "RESTful Operation"},
        "subtype": [{"system": "http://hl7.org/fhir/restful-interaction", "code": "read",
                     "display": "read"}],
        "action": "R",
        "recorded": now_iso(now),
        "outcome": "0",
        "outcomeDesc": "Push payload viewed in the operators' console",
        "agent": [{"who": {"reference": f"ClientApplication/{principal.client_id}"},
                   "type": {"text": principal.role}, "requestor": True,
                   "network": {"address": address[:100], "type": "2"}}],
        "source": {"observer": {"display": "medagent-relay console"}},
        "entity": [{"what": {"identifier": {"system": "urn:medagent:push", "value": push.id}},
                    "type": {"code": "AgentPush"}},
                   {"what": {"reference": f"Agent/{push.agent_id}"}}],
    }
