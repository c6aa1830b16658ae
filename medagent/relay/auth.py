"""
OAuth2 client credentials: clients, their scopes, and bearer tokens.

A client is one of three kinds:

- ``admin``: may do everything;
- ``pusher``: may push to (and read the pushes of) the agents listed in its scope;
- ``agent``: the credential of one agent, which may connect as that agent only.

Secrets are 256-bit random strings shown once; we store only a salted SHA-256 of them, which
is enough for secrets of that entropy (no password-style stretching is needed) and keeps the
token endpoint cheap.  Tokens are HS256 JWTs signed with a key kept in the relay's data folder,
so checking one needs no database round trip.

Revocation is checked on every token validation against an in-memory set of revoked client
ids: read from the database at start and every few seconds after (revocations made by another
node or offline by the CLI), and updated at once by L{Authority.revoke_client} on this node.
Until the first read completes, tokens are answered 503 (never let through unchecked).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
import uuid
from typing import Any, Callable, Iterable

import attr
import jwt
from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger

from medagent.fhir import FHIRError, bad_request, forbidden, not_found, unauthorized
from medagent.storage.interfaces import ClientRegistry
from medagent.storage.records import StoredClient

log = Logger()

ADMIN = "admin"
PUSHER = "pusher"
AGENT = "agent"
ROLES = (ADMIN, PUSHER, AGENT)

DEFAULT_TOKEN_LIFETIME = 3600

#: why a live agent session is ended (L{Authority.session_problem})
CLIENT_REVOKED = "client revoked"
TOKEN_EXPIRED = "access token expired"

@attr.s(frozen=True, auto_attribs=True)
class Principal:
    """Who is calling, and what they may do."""

    client_id: str
    role: str
    agents: frozenset[str] = frozenset()
    #: when the token this principal came from expires (wall time); not part of its identity
    expires_at: float | None = attr.ib(default=None, eq=False)

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN

    def can_push(self, agent_id: str) -> bool:
        return self.role == ADMIN or (self.role == PUSHER and ("*" in self.agents or agent_id in self.agents))

    def can_act_as(self, agent_id: str) -> bool:
        return self.role == ADMIN or (self.role == AGENT and agent_id in self.agents)

    def require_admin(self) -> None:
        if not self.is_admin:
            raise forbidden("This operation needs an admin client")

    def require_push(self, agent_id: str) -> None:
        if not self.can_push(agent_id):
            raise forbidden(f"Client {self.client_id} may not push to Agent/{agent_id}")


def _hash(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode("utf-8")).digest()


def load_or_create_key(path: str) -> bytes:
    """The token signing key, created on first start (0600)."""
    try:
        with open(path, "rb") as f:
            key = f.read()
        if len(key) >= 32:
            return key
    except FileNotFoundError:
        pass
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key


class Authority:
    """Client registry and token issuer/verifier."""

    def __init__(
        self,
        clients: ClientRegistry,
        key: bytes,
        *,
        token_lifetime: int = DEFAULT_TOKEN_LIFETIME,
        issuer: str = "medagent-relay",
        clock: Any = time,
    ) -> None:
        self._clients = clients
        self._key = key
        self._lifetime = token_lifetime
        self._issuer = issuer
        self._clock = clock
        #: ids of revoked clients, as last read from the database plus every revocation made
        #: on this node (added before its database write); None until the first read.
        self._revoked: set[str] | None = None
        self._revoked_here: set[str] = set()
        self._loading: Deferred[Any] | None = None
        #: called with a client id as soon as that client is revoked (the hub closes its
        #: agent sockets); also for revocations that L{refresh_revocations} finds.
        self.revocation_listeners: list[Callable[[str], None]] = []

    # -- clients ---------------------------------------------------------------------

    @staticmethod
    def _new_client(
        role: str, agents: Iterable[str], name: str | None
    ) -> tuple[StoredClient, dict[str, Any]]:
        if role not in ROLES:
            raise bad_request(f"role must be one of {', '.join(ROLES)}")
        agents = sorted(set(agents))
        if role == AGENT and len(agents) != 1:
            raise bad_request("An agent client is the credential of exactly one agent")
        client_id = str(uuid.uuid4())
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        stored = StoredClient(client_id=client_id, salt=salt, secret_hash=_hash(salt, secret),
                              role=role, agents=tuple(agents), name=name, created=time.time())
        return stored, {
            "clientId": client_id,
            "clientSecret": secret,
            "role": role,
            "agents": agents,
            "name": name,
        }

    def create_client(
        self, role: str, agents: Iterable[str] = (), name: str | None = None
    ) -> Deferred[dict[str, Any]]:
        """Register a client; the result holds its secret, which is never shown again."""
        try:
            stored, shown = self._new_client(role, list(agents), name)
        except FHIRError as e:
            return fail(e)
        return self._clients.add(stored).addCallback(lambda _: shown)

    def create_client_sync(
        self, role: str, agents: Iterable[str] = (), name: str | None = None
    ) -> dict[str, Any]:
        """The same, for the CLI before any reactor runs."""
        stored, shown = self._new_client(role, list(agents), name)
        self._clients.add_sync(stored)
        return shown

    @staticmethod
    def client_json(client: StoredClient) -> dict[str, Any]:
        """A client as listed (never its secret hash)."""
        return {
            "clientId": client.client_id,
            "role": client.role,
            "agents": list(client.agents),
            "name": client.name,
            "revoked": client.revoked,
        }

    def list_clients(self) -> Deferred[list[dict[str, Any]]]:
        return self._clients.list().addCallback(
            lambda clients: [self.client_json(c) for c in clients])

    @staticmethod
    def _known(found: bool, client_id: str) -> None:
        if not found:
            raise not_found(f"No client {client_id}")

    def revoke_client(self, client_id: str) -> Deferred[None]:
        """
        Revoke a client for good.  From this call on, on this node, its tokens fail and its
        agent sockets are closed (listeners run before the database write); other nodes and
        a relay restarted later learn it from the database (L{refresh_revocations}).
        Fails with 404 (and revokes nothing) for an unknown client.
        """
        newly = not self.is_revoked(client_id)
        self._revoked_here.add(client_id)
        if self._revoked is not None:
            self._revoked.add(client_id)

        def unknown(f: Any) -> Any:
            if newly and isinstance(f.value, FHIRError) and f.value.status == 404:
                self._revoked_here.discard(client_id)
                if self._revoked is not None:
                    self._revoked.discard(client_id)
            return f

        d = self._clients.revoke(client_id).addCallback(self._known, client_id)
        d.addErrback(unknown)
        if newly:
            # an unknown id has no tokens and no sockets; notifying for it is harmless
            self._notify_revoked(client_id)
        return d

    def revoke_client_sync(self, client_id: str) -> None:
        """The same in the database only, for the CLI without a relay (no reactor runs)."""
        self._known(self._clients.revoke_sync(client_id), client_id)

    def _notify_revoked(self, client_id: str) -> None:
        for listener in list(self.revocation_listeners):
            try:
                listener(client_id)
            except Exception:
                log.failure("Revocation listener failed for client {client_id}",
                            client_id=client_id)

    def is_revoked(self, client_id: str) -> bool:
        return client_id in self._revoked_here or (
            self._revoked is not None and client_id in self._revoked)

    def refresh_revocations(self) -> Deferred[int]:
        """
        Re-read the revoked clients from the database (revocations made by another node or
        by C{medagent client revoke --data}); fires with how many were new.  Called at start
        and periodically by the relay service.
        """

        def loaded(revoked: set[str]) -> int:
            first = self._revoked is None
            new = revoked - (self._revoked or set())
            # a revocation of this node whose write is still on its way stays in the set
            self._revoked = (self._revoked or set()) | revoked | self._revoked_here
            if not first:
                for client_id in sorted(new):
                    log.info("Client {client_id} was revoked elsewhere", client_id=client_id)
                    self._notify_revoked(client_id)
            return len(new)

        return self._clients.revoked().addCallback(loaded)

    def _ensure_loaded(self) -> None:
        """Start reading the revoked set if nobody has; 503 until it is known."""
        if self._revoked is not None:
            return
        if self._loading is None:
            def forget(f: Any) -> None:
                self._loading = None
                log.failure("Reading revoked clients failed", f)

            self._loading = self.refresh_revocations()
            self._loading.addErrback(forget)
        if self._revoked is None:
            raise FHIRError(503, "The relay is starting; try again in a moment", "transient",
                            headers={"Retry-After": "1"})

    def session_problem(self, principal: Principal) -> str | None:
        """
        Why a live session authenticated as C{principal} must end now (L{CLIENT_REVOKED}, or
        L{TOKEN_EXPIRED}), or None.  For the hub's re-check on every heartbeat tick.
        """
        if self.is_revoked(principal.client_id):
            return CLIENT_REVOKED
        if principal.expires_at is not None and principal.expires_at + 5 < self._clock.time():
            return TOKEN_EXPIRED
        return None

    # -- tokens ----------------------------------------------------------------------

    def issue_token(self, client_id: str, client_secret: str) -> Deferred[dict[str, Any]]:
        """The OAuth2 token response for a client-credentials grant."""

        def check(client: StoredClient | None) -> Principal | None:
            if client is None or client.revoked or not hmac.compare_digest(
                client.secret_hash, _hash(client.salt, client_secret)
            ):
                return None
            return Principal(client.client_id, client.role, frozenset(client.agents))

        def issue(principal: Principal | None) -> dict[str, Any]:
            if principal is not None and self.is_revoked(principal.client_id):
                principal = None  # revoked on this node; its database write may be pending
            if principal is None:
                log.warn("Token refused for client {client_id}", client_id=client_id)
                raise FHIRError(401, "Invalid client credentials", "login")
            token = self.mint_token(principal, self._lifetime)
            return {
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": self._lifetime,
                "scope": principal.role,
            }

        return self._clients.lookup(client_id).addCallback(check).addCallback(issue)

    def mint_token(self, principal: Principal, lifetime: int) -> str:
        """
        A bearer token for an identity that has no client credentials (a Bot running as
        ``Bot/{id}``), valid for C{lifetime} seconds.  Never stored; checked like any other.
        """
        now = int(self._clock.time())
        claims = {
            "iss": self._issuer,
            "sub": principal.client_id,
            "client_id": principal.client_id,
            "aud": principal.client_id,
            "role": principal.role,
            "agents": sorted(principal.agents),
            "iat": now,
            "exp": now + int(lifetime),
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(claims, self._key, algorithm="HS256")

    def verify_token(self, token: str) -> Principal:
        """The caller behind a bearer token, or 401."""
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=["HS256"],
                # expiry is checked below against our (injectable) clock
                options={"verify_aud": False, "verify_exp": False, "verify_iat": False,
                         "require": ["exp", "sub", "role"]},
                issuer=self._issuer,
            )
        except jwt.InvalidTokenError:
            raise unauthorized("Invalid access token")
        if not isinstance(claims["exp"], (int, float)) or claims["exp"] + 5 < self._clock.time():
            raise unauthorized("Access token expired")
        if claims.get("role") not in ROLES:
            raise unauthorized("Invalid access token")
        self._ensure_loaded()
        if self.is_revoked(claims["sub"]):
            raise unauthorized("Access token revoked")
        return Principal(claims["sub"], claims["role"], frozenset(claims.get("agents") or ()),
                         expires_at=float(claims["exp"]))

    def authenticate(self, authorization: str | None) -> Principal:
        """Check an ``Authorization`` header (``Bearer <token>``)."""
        if not authorization:
            raise unauthorized("Missing Authorization header (Bearer token)")
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise unauthorized("Authorization must be a Bearer token")
        return self.verify_token(token.strip())
