"""
OAuth2 client credentials: clients, their scopes, and bearer tokens.

A client is one of three kinds:

- ``admin``: may do everything;
- ``pusher``: may push to (and read the pushes of) the agents listed in its scope;
- ``agent``: the credential of one agent, which may connect as that agent only;
- ``viewer``: the operators' console read-only: the fleet and the push journal, never a
  payload, no action;
- ``operator``: the console with its actions (retry, cancel, resend, reload config) and the
  payloads (each view audited).  Neither console role may push, nor read the FHIR API.

A fifth identity has no client credentials: a running Bot (``Bot/{id}``, role ``bot``), whose
token is minted by the relay for its run and carries only what its ``Bot`` resource grants
(L{bot_grants}): resource types it may read and write, agents it may push to.  Only an agent
credential may open an agent session (L{Principal.can_connect_as}) -- admin tokens neither.

Every token carries ``iat`` and ``exp``; a token that would live longer than the relay's
maximum lifetime (its C{token_lifetime}) is refused even when its signature is good, so a
leaked key cannot mint tokens that outlive a key rotation by more than that.

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
from collections import OrderedDict
from typing import Any, Callable, Iterable, Mapping

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
BOT = "bot"
VIEWER = "viewer"
OPERATOR = "operator"
ROLES = (ADMIN, PUSHER, AGENT, VIEWER, OPERATOR)
#: Roles that may sign in to the operators' console (L{medagent.relay.console}).
CONSOLE_ROLES = (ADMIN, OPERATOR, VIEWER)
#: Roles a token may carry: the client roles, and ``bot`` (minted for a Bot's run only).
TOKEN_ROLES = ROLES + (BOT,)
#: Seconds of clock skew tolerated on ``iat``/``exp``.
CLOCK_SKEW = 5

EXT_BOT_ACCESS = "urn:medagent:fhir:StructureDefinition:bot-access"
#: Resource types a Bot can never read or write, whatever its Bot resource says: other Bots
#: (their code and secrets), Subscriptions (their secrets), clients.
BOT_NEVER = frozenset({"Bot", "Subscription", "ClientApplication"})
#: ... and never write (the audit trail is the relay's).
BOT_NEVER_WRITE = BOT_NEVER | {"AuditEvent"}

DEFAULT_TOKEN_LIFETIME = 3600

#: why a live agent session is ended (L{Authority.session_problem})
CLIENT_REVOKED = "client revoked"
TOKEN_EXPIRED = "access token expired"

@attr.s(frozen=True, auto_attribs=True)
class Principal:
    """Who is calling, and what they may do."""

    client_id: str
    role: str
    #: pusher/bot: agents it may push to ("*": all); agent: its own id
    agents: frozenset[str] = frozenset()
    #: bot only: resource types it may read (write implies read)
    read: frozenset[str] = frozenset()
    #: bot only: resource types it may create, update and delete
    write: frozenset[str] = frozenset()
    #: when the token this principal came from expires (wall time); not part of its identity
    expires_at: float | None = attr.ib(default=None, eq=False)

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN

    def can_push(self, agent_id: str) -> bool:
        return self.role == ADMIN or (self.role in (PUSHER, BOT)
                                      and ("*" in self.agents or agent_id in self.agents))

    def can_act_as(self, agent_id: str) -> bool:
        return self.role == ADMIN or (self.role == AGENT and agent_id in self.agents)

    def can_connect_as(self, agent_id: str) -> bool:
        """Only the agent's own credential opens its session (admin tokens neither)."""
        return self.role == AGENT and agent_id in self.agents

    # -- the operators' console --------------------------------------------------------

    def may_use_console(self) -> bool:
        return self.role in CONSOLE_ROLES

    def may_operate(self) -> bool:
        """Console actions (retry, cancel, resend, reload config): operators and admins."""
        return self.role in (ADMIN, OPERATOR)

    def may_see_payloads(self) -> bool:
        """Message bodies and device replies (PHI): operators and admins, never viewers."""
        return self.role in (ADMIN, OPERATOR)

    def can_manage_push(self, agent_id: str) -> bool:
        """Retry, cancel or resend a push of C{agent_id}: who may push there, and operators."""
        return self.role == OPERATOR or self.can_push(agent_id)

    def require_manage_push(self, agent_id: str) -> None:
        if not self.can_manage_push(agent_id):
            raise forbidden(f"Client {self.client_id} may not manage pushes of "
                            f"Agent/{agent_id}")

    def may_read(self, resource_type: str) -> bool:
        """Bots: only the types their Bot resource grants (never Bot, Subscription...)."""
        if self.role == ADMIN:
            return True
        return self.role == BOT and resource_type not in BOT_NEVER and (
            resource_type in self.read or resource_type in self.write)

    def may_write(self, resource_type: str) -> bool:
        if self.role == ADMIN:
            return True
        return self.role == BOT and resource_type not in BOT_NEVER_WRITE and \
            resource_type in self.write

    def may_list_pushes(self, agent_id: str | None) -> bool:
        """Listing pushes: admins, and pushers for their agents; Bots never (they read their
        own pushes by id)."""
        if self.role == ADMIN:
            return True
        return self.role == PUSHER and bool(agent_id) and self.can_push(str(agent_id))

    def may_read_push(self, agent_id: str, requester: str | None) -> bool:
        """Admins read every push; pushers and Bots only their own, of agents in scope."""
        if self.role == ADMIN:
            return True
        return requester == self.client_id and self.can_push(agent_id)

    def require_admin(self) -> None:
        if not self.is_admin:
            raise forbidden("This operation needs an admin client")

    def require_read(self, resource_type: str) -> None:
        if not self.may_read(resource_type):
            raise forbidden(f"This client may not read {resource_type}")

    def require_write(self, resource_type: str) -> None:
        """Admins; Bots for the types their Bot resource lets them write."""
        if not self.may_write(resource_type):
            raise forbidden("This operation needs an admin client" if self.role != BOT
                            else f"{self.client_id} may not write {resource_type}")

    def require_push(self, agent_id: str) -> None:
        if not self.can_push(agent_id):
            raise forbidden(f"Client {self.client_id} may not push to Agent/{agent_id}")


def bot_grants(bot: Any) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """
    (read, write, push) of a Bot resource: its ``bot-access`` extension, e.g.::

        {"url": "urn:medagent:fhir:StructureDefinition:bot-access", "extension": [
            {"url": "read", "valueCode": "Patient"},
            {"url": "write", "valueCode": "Observation"},
            {"url": "push", "valueReference": {"reference": "Agent/<id>"}}]}

    Absent: nothing.  ``push`` takes an Agent reference, an id, or ``*`` (every agent).
    Types in L{BOT_NEVER} are dropped here as well as at every check.
    """
    read: set[str] = set()
    write: set[str] = set()
    push: set[str] = set()
    exts = bot.get("extension") if isinstance(bot, dict) else None
    for ext in exts if isinstance(exts, list) else []:
        if not isinstance(ext, dict) or ext.get("url") != EXT_BOT_ACCESS:
            continue
        for item in ext.get("extension") or []:
            if not isinstance(item, dict):
                continue
            kind = item.get("url")
            value = item.get("valueCode", item.get("valueString"))
            ref = item.get("valueReference")
            if isinstance(ref, dict) and isinstance(ref.get("reference"), str):
                value = ref["reference"]
            if not isinstance(value, str) or not value or len(value) > 128:
                continue
            if kind == "read" and value not in BOT_NEVER:
                read.add(value)
            elif kind == "write" and value not in BOT_NEVER_WRITE:
                write.add(value)
            elif kind == "push":
                push.add(value.removeprefix("Agent/"))
    return frozenset(read), frozenset(write), frozenset(push)


def _hash(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode("utf-8", "surrogatepass")).digest()


#: compared against when a client id is unknown (the same work as for a known one)
_DUMMY_SALT = secrets.token_bytes(16)
_DUMMY_HASH = _hash(_DUMMY_SALT, secrets.token_urlsafe(32))


#: tokens whose signature check L{Authority} remembers, at most: an agent sends its token on
#: every heartbeat and reconnect, and a fleet of ten thousand would otherwise cost the relay a
#: signature check per heartbeat
VERIFIED_TOKENS = 16_384

#: the ``kid`` of the data folder's C{token.key} (one node; imported into a cluster's ring)
FILE_KID = "token.key"


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
        key: bytes | None,
        *,
        token_lifetime: int = DEFAULT_TOKEN_LIFETIME,
        issuer: str = "medagent-relay",
        clock: Any = time,
    ) -> None:
        self._clients = clients
        self._key = key
        self._keys: dict[str, bytes] = {FILE_KID: key} if key is not None else {}
        self._signing_kid = FILE_KID
        #: token text → claims, for tokens whose signature checked out (L{_signed_claims})
        self._verified: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.verified_tokens = VERIFIED_TOKENS
        self._lifetime = token_lifetime
        #: no token living longer than this is accepted, whoever signed it
        self.max_lifetime = max(1, int(token_lifetime))
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

    def set_key(self, key: bytes) -> None:
        """The signing key, given at start (reading or creating it is I/O: not in a
        constructor); until then tokens are answered 503.  One node: the data folder's
        C{token.key}."""
        self.set_keys({FILE_KID: key}, FILE_KID)

    def set_keys(self, keys: Mapping[str, bytes], signing: str) -> None:
        """
        The key ring (relay nodes sharing a database: L{medagent.storage.postgres.keys}):
        tokens are signed with C{keys[signing]} and name it in their ``kid`` header; a token
        is accepted if signed by any key of the ring (a rotated-out key stays until it is
        retired, so the tokens it signed live out their time).  A token without ``kid``
        (issued before key rings) is checked against the C{token.key} one.
        """
        if signing not in keys:
            raise ValueError("the signing key must be in the ring")
        self._keys = dict(keys)
        self._signing_kid = signing
        self._key = keys[signing]
        self._verified.clear()  # a retired key verifies nothing more

    @property
    def ready(self) -> bool:
        """It has its signing keys (until then tokens are answered 503)."""
        return self._key is not None

    def _signing_key(self) -> bytes:
        if self._key is None:
            raise FHIRError(503, "The relay is starting; try again in a moment", "transient",
                            headers={"Retry-After": "1"})
        return self._key

    def _key_of(self, token: str) -> bytes:
        """The key that must have signed C{token} (by its ``kid``), or 401."""
        self._signing_key()  # 503 while there is no ring yet
        try:
            kid = jwt.get_unverified_header(token).get("kid", FILE_KID)
        except jwt.InvalidTokenError:
            raise unauthorized("Invalid access token")
        key = self._keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise unauthorized("Invalid access token")
        return key

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

    def check_credentials(self, client_id: str, client_secret: str
                          ) -> Deferred[Principal | None]:
        """
        The client behind an id and secret, or None (unknown, revoked, or a wrong secret).
        The secret is hashed and compared in constant time even for an unknown id, so the
        answer's timing does not tell which ids exist.  The token endpoint and the console's
        login both sign in through here.
        """

        def check(client: StoredClient | None) -> Principal | None:
            salt, expected = (client.salt, client.secret_hash) if client is not None else (
                _DUMMY_SALT, _DUMMY_HASH)
            good = hmac.compare_digest(expected, _hash(salt, client_secret))
            if client is None or client.revoked or not good or \
                    self.is_revoked(client.client_id):
                # (revoked on this node: its database write may still be pending)
                return None
            return Principal(client.client_id, client.role, frozenset(client.agents))

        return self._clients.lookup(client_id).addCallback(check)

    def issue_token(self, client_id: str, client_secret: str) -> Deferred[dict[str, Any]]:
        """The OAuth2 token response for a client-credentials grant."""

        def issue(principal: Principal | None) -> dict[str, Any]:
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

        return self.check_credentials(client_id, client_secret).addCallback(issue)

    def mint_token(self, principal: Principal, lifetime: int) -> str:
        """
        A bearer token for an identity that has no client credentials (a Bot running as
        ``Bot/{id}``), valid for C{lifetime} seconds (at most the relay's maximum).  Never
        stored; checked like any other.
        """
        now = int(self._clock.time())
        lifetime = min(int(lifetime), self.max_lifetime)
        claims: dict[str, Any] = {
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
        if principal.role == BOT:
            claims["read"] = sorted(principal.read)
            claims["write"] = sorted(principal.write)
        return jwt.encode(claims, self._signing_key(), algorithm="HS256",
                          headers={"kid": self._signing_kid})

    def _signed_claims(self, token: str) -> dict[str, Any]:
        """
        The claims of a token whose signature (by a key of the ring) and issuer check out,
        or 401.  Kept for L{VERIFIED_TOKENS} tokens, by their exact text: decoding is most of
        a request's cost (PyJWT checks every character in Python), and a client sends the
        same token for its whole life.  What changes with time (expiry, revocation) is
        checked by L{verify_token} at every call; a new key ring empties the cache.
        """
        claims = self._verified.get(token)
        if claims is not None:
            self._verified.move_to_end(token)
            return claims
        try:
            claims = jwt.decode(
                token,
                self._key_of(token),
                algorithms=["HS256"],
                # expiry is checked below against our (injectable) clock
                options={"verify_aud": False, "verify_exp": False, "verify_iat": False,
                         "require": ["exp", "iat", "sub", "role"]},
                issuer=self._issuer,
            )
        except jwt.InvalidTokenError:
            raise unauthorized("Invalid access token")
        self._verified[token] = claims
        while len(self._verified) > self.verified_tokens:
            self._verified.popitem(last=False)
        return claims

    def verify_token(self, token: str) -> Principal:
        """The caller behind a bearer token, or 401."""
        claims = self._signed_claims(token)
        now = self._clock.time()
        exp, iat = claims["exp"], claims["iat"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (exp, iat)):
            raise unauthorized("Invalid access token")
        if exp + CLOCK_SKEW < now:
            raise unauthorized("Access token expired")
        # Bounded by the relay, not by whoever signed it: a key that leaked cannot mint a
        # token that outlives the relay's maximum lifetime.
        if iat > now + CLOCK_SKEW or exp - iat > self.max_lifetime + CLOCK_SKEW or \
                exp > now + self.max_lifetime + CLOCK_SKEW:
            raise unauthorized("Access token lifetime exceeds the relay's maximum")
        role = claims.get("role")
        if role not in TOKEN_ROLES:
            raise unauthorized("Invalid access token")

        def names(key: str) -> frozenset[str]:
            value = claims.get(key) or ()
            return frozenset(v for v in value if isinstance(v, str)) \
                if isinstance(value, list) else frozenset()

        self._ensure_loaded()
        if self.is_revoked(claims["sub"]):
            raise unauthorized("Access token revoked")
        if role == BOT:
            return Principal(claims["sub"], BOT, names("agents"), names("read"), names("write"),
                             expires_at=float(exp))
        return Principal(claims["sub"], role, names("agents"), expires_at=float(exp))

    def authenticate(self, authorization: str | None) -> Principal:
        """Check an ``Authorization`` header (``Bearer <token>``)."""
        if not authorization:
            raise unauthorized("Missing Authorization header (Bearer token)")
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise unauthorized("Authorization must be a Bearer token")
        return self.verify_token(token.strip())
