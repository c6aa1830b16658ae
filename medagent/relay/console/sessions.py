"""
Console sign-in sessions: a random id in an HttpOnly cookie, a per-session CSRF token, idle
expiry on an injected clock, and a bound on how many are kept (the least recently used is
dropped first).

On one node sessions live in its memory (a restart signs everyone out).  Relay nodes that
share a PostgreSQL database also share the sessions (L{medagent.storage.interfaces.
ConsoleSessions}): a browser behind a round-robin balancer stays signed in whichever node
answers, and a sign-out or a client's revocation ends the session on every node within
L{RECHECK} seconds.  The database keeps the SHA-256 of a session's id, never the id.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import OrderedDict
from typing import Any, Callable

import attr
from twisted.logger import Logger

from medagent.relay.auth import Principal
from medagent.storage.interfaces import ConsoleSessions
from medagent.storage.records import SharedConsoleSession

log = Logger()

COOKIE = b"medagent_console"
DEFAULT_IDLE = 30 * 60.0
DEFAULT_MAX_SESSIONS = 1000
#: Seconds a node trusts what it remembers of a shared session before asking the database
#: again: how long a sign-out on another node may take to reach this one.
RECHECK = 5.0


def _key(session_id: str) -> bytes:
    """What the shared store keys a session by: the SHA-256 of its id."""
    return hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).digest()


@attr.s(auto_attribs=True)
class ConsoleSession:
    id: str
    principal: Principal
    csrf: str
    last_seen: float
    name: str | None = None
    #: when the shared store last confirmed this session (cluster only)
    checked: float = 0.0

    def csrf_ok(self, token: str | None) -> bool:
        """The form's token, compared in constant time."""
        return isinstance(token, str) and hmac.compare_digest(
            token.encode("utf-8", "surrogatepass"), self.csrf.encode())


class SessionStore:
    """
    This node's sessions, bounded, least recently used dropped first; with C{shared}, also
    the cluster's.  The synchronous calls see this node's memory only; L{open}, L{find} and
    L{close} are what requests use, and they go through C{shared} when there is one.
    """

    def __init__(self, clock: Any, *, idle: float = DEFAULT_IDLE,
                 max_sessions: int = DEFAULT_MAX_SESSIONS,
                 shared: ConsoleSessions | None = None, recheck: float = RECHECK) -> None:
        if idle <= 0 or max_sessions < 1:
            raise ValueError("idle expiry and the session bound must be positive")
        self.clock = clock
        self.idle = idle
        self.max_sessions = max_sessions
        self.shared = shared
        self.recheck = recheck
        self._sessions: OrderedDict[str, ConsoleSession] = OrderedDict()
        #: called with a session's id when the shared store says it ended on another node
        #: (the console ends its live streams)
        self.ended: list[Callable[[str], None]] = []

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, principal: Principal, name: str | None = None) -> ConsoleSession:
        session = ConsoleSession(id=secrets.token_urlsafe(32), principal=principal,
                                 csrf=secrets.token_urlsafe(32),
                                 last_seen=self.clock.seconds(), name=name)
        self._remember(session)
        return session

    def _remember(self, session: ConsoleSession) -> None:
        self._sessions[session.id] = session
        self._sessions.move_to_end(session.id)
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)

    async def open(self, principal: Principal, name: str | None = None) -> ConsoleSession:
        """A new session; on a cluster fires once every node can see it."""
        session = self.create(principal, name)
        if self.shared is not None:
            try:
                await self.shared.add(SharedConsoleSession(
                    id_hash=_key(session.id), client_id=principal.client_id,
                    role=principal.role, agents=principal.agents, name=name,
                    csrf=session.csrf))
            except BaseException:
                self.drop(session.id)
                raise
            session.checked = self.clock.seconds()
        return session

    async def find(self, session_id: str | None, authority: Any = None
                   ) -> ConsoleSession | None:
        """
        L{get}, and on a cluster the shared store's word: a session this node has not seen
        (signed in on another node) is found there; one this node knows is confirmed again
        once it is C{recheck} seconds old (it may have been ended on another node).
        """
        if self.shared is None or not session_id:
            return self.get(session_id, authority)
        now = self.clock.seconds()
        known = self._sessions.get(session_id)
        if known is not None and now - known.checked < self.recheck:
            return self.get(session_id, authority)
        row = await self.shared.use(_key(session_id), self.idle)
        if row is None or (authority is not None and authority.is_revoked(row.client_id)):
            self._sessions.pop(session_id, None)
            return None
        principal = Principal(row.client_id, row.role, row.agents)
        if known is None or known.principal != principal or known.csrf != row.csrf:
            known = ConsoleSession(id=session_id, principal=principal, csrf=row.csrf,
                                   last_seen=now, name=row.name)
        known.last_seen = known.checked = now
        self._remember(known)
        return known

    async def close(self, session_id: str) -> None:
        """End a session (sign-out): here, and on a cluster on every node."""
        self.drop(session_id)
        if self.shared is not None:
            await self.shared.drop(_key(session_id))

    def prune(self) -> Any:
        """Forget the shared sessions idle for too long (a no-op on one node)."""
        if self.shared is None:
            return None
        return self.shared.prune(self.idle).addErrback(
            lambda f: log.failure("Pruning the console's shared sessions failed", f))

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
        is not a use: the session still ends after C{idle} without a page or action).  On a
        cluster, once C{recheck} old, the shared store is asked too (L{_confirm}): a sign-out
        on another node ends this node's streams of the session when it answers."""
        session = self._sessions.get(session_id)
        if session is None:
            return False
        now = self.clock.seconds()
        if now - session.last_seen > self.idle or (
                authority is not None and authority.is_revoked(session.principal.client_id)):
            del self._sessions[session_id]
            return False
        if self.shared is not None and now - session.checked >= self.recheck:
            self._confirm(session, now)
        return True

    def _confirm(self, session: ConsoleSession, now: float) -> None:
        """Ask the shared store whether C{session} still holds (signed out on another node?);
        if not, forget it here and tell L{ended}.  Not a use of the session."""
        assert self.shared is not None
        session.checked = now

        def answered(live: bool) -> None:
            if live or self._sessions.get(session.id) is not session:
                return
            del self._sessions[session.id]
            for listener in list(self.ended):
                listener(session.id)

        self.shared.live(_key(session.id), self.idle).addCallbacks(
            answered, lambda f: log.failure("Checking a shared console session failed", f))

    def drop(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def drop_client(self, client_id: str) -> None:
        """A revoked client's sessions end at once (on a cluster, on every node)."""
        for sid in [s.id for s in self._sessions.values()
                    if s.principal.client_id == client_id]:
            del self._sessions[sid]
        if self.shared is not None:
            self.shared.drop_client(client_id).addErrback(
                lambda f: log.failure("Ending a revoked client's console sessions failed", f))
