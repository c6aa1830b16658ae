"""
Console sign-in sessions: a random id in an HttpOnly cookie, a per-session CSRF token, idle
expiry on an injected clock, and a bound on how many are kept (the least recently used is
dropped first).

Sessions live in this relay node's memory: in a cluster, a browser keeps to the node it
signed in on (or signs in again on another); a restart signs everyone out.
"""

from __future__ import annotations

import hmac
import secrets
from collections import OrderedDict
from typing import Any

import attr

from medagent.relay.auth import Principal

COOKIE = b"medagent_console"
DEFAULT_IDLE = 30 * 60.0
DEFAULT_MAX_SESSIONS = 1000


@attr.s(auto_attribs=True)
class ConsoleSession:
    id: str
    principal: Principal
    csrf: str
    last_seen: float
    name: str | None = None

    def csrf_ok(self, token: str | None) -> bool:
        """The form's token, compared in constant time."""
        return isinstance(token, str) and hmac.compare_digest(
            token.encode("utf-8", "surrogatepass"), self.csrf.encode())


class SessionStore:
    def __init__(self, clock: Any, *, idle: float = DEFAULT_IDLE,
                 max_sessions: int = DEFAULT_MAX_SESSIONS) -> None:
        if idle <= 0 or max_sessions < 1:
            raise ValueError("idle expiry and the session bound must be positive")
        self.clock = clock
        self.idle = idle
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[str, ConsoleSession] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, principal: Principal, name: str | None = None) -> ConsoleSession:
        session = ConsoleSession(id=secrets.token_urlsafe(32), principal=principal,
                                 csrf=secrets.token_urlsafe(32),
                                 last_seen=self.clock.seconds(), name=name)
        self._sessions[session.id] = session
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)
        return session

    def get(self, session_id: str | None, authority: Any = None) -> ConsoleSession | None:
        """
        The live session of a cookie's id (and mark it used now), or None: unknown, idle for
        longer than C{idle} (then forgotten), or its client revoked since (C{authority}).
        """
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        now = self.clock.seconds()
        if now - session.last_seen > self.idle or (
                authority is not None and authority.is_revoked(session.principal.client_id)):
            del self._sessions[session_id]
            return None
        session.last_seen = now
        self._sessions.move_to_end(session_id)
        return session

    def alive(self, session_id: str, authority: Any = None) -> bool:
        """Whether the session is still live, without counting this as a use (a live stream
        is not a use: the session still ends after C{idle} without a page or action)."""
        session = self._sessions.get(session_id)
        if session is None:
            return False
        if self.clock.seconds() - session.last_seen > self.idle or (
                authority is not None and authority.is_revoked(session.principal.client_id)):
            del self._sessions[session_id]
            return False
        return True

    def drop(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def drop_client(self, client_id: str) -> None:
        """A revoked client's sessions end at once."""
        for sid in [s.id for s in self._sessions.values()
                    if s.principal.client_id == client_id]:
            del self._sessions[sid]
