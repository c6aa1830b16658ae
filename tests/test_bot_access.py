"""
What a token may do, tested as attacks: a forged long-lived token, an admin or Bot token that
opens an agent session, and the grants a Bot's token carries (L{medagent.relay.auth}).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import jwt
from twisted.trial.unittest import SynchronousTestCase

from medagent import wire
from medagent.fhir import FHIRError
from medagent.relay.auth import (BOT, EXT_BOT_ACCESS, Authority, Principal, bot_grants)
from medagent.relay.hub import Hub
from medagent.storage.sqlite.clients import SQLiteClientRegistry
from medagent.storage.sqlite.journal import SQLiteJournal as Journal
from medagent.storage.sqlite.store import SQLiteStore
from tests.fakes import InlineReactor, inline_database
from tests.test_hub import FakeConnection, _Wall

KEY = b"k" * 32


def forged(claims: dict[str, Any]) -> str:
    """A token signed with the relay's own key (as a Bot that read token.key would)."""
    return jwt.encode({"iss": "medagent-relay", "sub": "attacker", "role": "admin",
                       "agents": [], "jti": uuid.uuid4().hex, **claims}, KEY,
                      algorithm="HS256")


class TokenLifetimeTests(SynchronousTestCase):
    def setUp(self) -> None:
        registry = SQLiteClientRegistry(inline_database(self, SQLiteClientRegistry.schema()))
        self.auth = Authority(registry, KEY, token_lifetime=3600)

    def refused(self, token: str) -> str:
        e = self.assertRaises(FHIRError, self.auth.verify_token, token)
        self.assertEqual(e.status, 401)
        return e.message

    def test_forged_long_lived_token_is_refused(self) -> None:
        now = int(time.time())
        self.assertIn("lifetime", self.refused(forged({"iat": now, "exp": now + 10 * 365 * 86400})))
        # iat backdated so exp - iat looks fine is no way round it: exp is bounded from now too
        self.refused(forged({"iat": now + 9 * 365 * 86400, "exp": now + 9 * 365 * 86400 + 60}))
        self.refused(forged({"exp": now + 60}))  # no iat
        self.refused(forged({"iat": now}))  # no exp
        self.refused(forged({"iat": "now", "exp": now + 60}))
        # within the bound it is a token like any other
        self.assertEqual(self.auth.verify_token(forged({"iat": now, "exp": now + 3600})).role,
                         "admin")

    def test_minted_tokens_never_exceed_the_bound(self) -> None:
        token = self.auth.mint_token(Principal("Bot/1", BOT), 10 * 86400)
        claims = jwt.decode(token, KEY, algorithms=["HS256"], options={"verify_aud": False})
        self.assertEqual(claims["exp"] - claims["iat"], 3600)
        self.assertEqual(self.auth.verify_token(token).client_id, "Bot/1")


class BotGrantTests(SynchronousTestCase):
    def test_grants_and_what_is_never_granted(self) -> None:
        bot = {"resourceType": "Bot", "extension": [{"url": EXT_BOT_ACCESS, "extension": [
            {"url": "read", "valueCode": "Patient"},
            {"url": "write", "valueCode": "Observation"},
            {"url": "read", "valueCode": "Bot"},
            {"url": "write", "valueCode": "Subscription"},
            {"url": "write", "valueCode": "AuditEvent"},
            {"url": "push", "valueReference": {"reference": "Agent/a1"}},
            {"url": "push", "valueString": "a2"}]}]}
        read, write, push = bot_grants(bot)
        self.assertEqual((read, write, push), ({"Patient"}, {"Observation"}, {"a1", "a2"}))
        p = Principal("Bot/1", BOT, push, read, write)
        self.assertTrue(p.may_read("Patient") and p.may_read("Observation"))
        self.assertTrue(p.may_write("Observation"))
        self.assertFalse(p.may_write("Patient") or p.may_read("ServiceRequest"))
        self.assertFalse(p.may_read("Bot") or p.may_write("Subscription"))
        self.assertTrue(p.can_push("a1") and not p.can_push("a3"))
        self.assertFalse(p.can_act_as("a1") or p.can_connect_as("a1") or p.is_admin)
        self.assertFalse(p.may_list_pushes("a1"))
        self.assertTrue(p.may_read_push("a1", "Bot/1"))
        self.assertFalse(p.may_read_push("a1", "ClientApplication/x"))
        # a Bot with no bot-access extension gets nothing
        nothing = Principal("Bot/2", BOT, *[bot_grants({"resourceType": "Bot"})[i]
                                            for i in (2, 0, 1)])
        self.assertFalse(nothing.may_read("Patient") or nothing.can_push("a1"))
        # even a token claiming Bot or Subscription grants cannot use them
        claimed = Principal("Bot/3", BOT, frozenset(), frozenset({"Bot"}),
                            frozenset({"Subscription", "Bot"}))
        self.assertFalse(claimed.may_read("Bot") or claimed.may_write("Subscription"))


class AgentSessionTests(SynchronousTestCase):
    """Only an agent's own credential opens its session; admin and Bot tokens are refused
    (agent:error, then the socket is closed) and receive none of its queued pushes."""

    def setUp(self) -> None:
        self.clock = InlineReactor()
        self.clock.advance(time.time())
        db = inline_database(
            self, SQLiteStore.schema() + SQLiteClientRegistry.schema() + Journal.schema(),
            self.clock)
        self.store = SQLiteStore(db)
        self.auth = Authority(SQLiteClientRegistry(db), KEY, clock=_Wall(self.clock))
        self.hub = Hub(self.clock, self.auth, self.store, Journal(db, clock=self.clock),
                       heartbeat_interval=10)
        self.addCleanup(self.hub.close)
        self.agent = self.successResultOf(self.store.create(
            {"resourceType": "Agent", "name": "lab", "status": "active"}))

    def connect(self, token: str) -> FakeConnection:
        conn = FakeConnection()
        session = self.hub.connection_made(conn)
        self.hub.frame_received(session, wire.encode(
            {"type": wire.CONNECT_REQUEST, "accessToken": token, "agentId": self.agent["id"]}))
        return conn

    def token(self, role: str, agents: list[str]) -> str:
        client = self.successResultOf(self.auth.create_client(role, agents))
        return self.successResultOf(self.auth.issue_token(
            client["clientId"], client["clientSecret"]))["access_token"]

    def test_admin_and_bot_tokens_cannot_open_an_agent_session(self) -> None:
        bot_token = self.auth.mint_token(
            Principal("Bot/b", BOT, frozenset({"*"}), frozenset(), frozenset()), 60)
        for token in (self.token("admin", []), self.token("pusher", [self.agent["id"]]),
                      bot_token):
            conn = self.connect(token)
            self.assertEqual([m["type"] for m in conn.sent], [wire.ERROR])
            self.assertIn("cannot act as", conn.sent[0]["body"])
            self.assertIsNotNone(conn.closed)
            self.assertFalse(self.hub.is_connected(self.agent["id"]))
        conn = self.connect(self.token("agent", [self.agent["id"]]))
        self.assertEqual(conn.sent[0]["type"], wire.CONNECT_RESPONSE)
        self.assertTrue(self.hub.is_connected(self.agent["id"]))
