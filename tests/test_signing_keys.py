"""
Token signing keys relay nodes share (issue 11): the L{Authority}'s key ring (``kid``),
the ring in PostgreSQL (L{PgSigningKeys}: first key, rotation with a publish delay,
retirement), and the ``medagent db keys|rotate-key|retire-key`` commands, on a real server.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from medagent.fhir import FHIRError
from medagent.relay.auth import FILE_KID, Authority, Principal
from medagent.storage.postgres import MIGRATIONS, PgDatabase, PgSigningKeys
from medagent.storage.postgres.keys import PUBLISH_DELAY
from tests import pgenv
from tests.test_cli_database import run


class _NoneRevoked:
    """A client registry with nobody revoked (all a token check reads of it)."""

    def revoked(self) -> Deferred[set[str]]:
        return succeed(set())


def _hand_made(header: dict[str, Any], claims: dict[str, Any], key: bytes) -> str:
    """A JWT built by hand (PyJWT refuses to make some of the headers an attacker sends)."""
    import base64
    import hashlib
    import hmac

    def part(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signed = part(json.dumps(header).encode()) + "." + part(json.dumps(claims).encode())
    return signed + "." + part(hmac.new(key, signed.encode(), hashlib.sha256).digest())


def _authority() -> Authority:
    return Authority(_NoneRevoked(), None, clock=time)  # type: ignore[arg-type]


def _principal() -> Principal:
    return Principal("c1", "pusher", frozenset(["a1"]))


class KeyRing(SynchronousTestCase):
    """The Authority signs with one key of its ring and accepts any key of it."""

    authority = staticmethod(_authority)

    def test_a_token_names_its_key_and_any_key_of_the_ring_verifies(self) -> None:
        a, b = self.authority(), self.authority()
        a.set_keys({"k1": b"1" * 32, "k2": b"2" * 32}, "k1")
        b.set_keys({"k1": b"1" * 32, "k2": b"2" * 32}, "k2")  # rotated already
        token = a.mint_token(_principal(), 60)
        self.assertEqual(jwt.get_unverified_header(token)["kid"], "k1")
        self.assertEqual(b.verify_token(token).client_id, "c1")

    def test_a_retired_or_unknown_key_verifies_nothing(self) -> None:
        a, b = self.authority(), self.authority()
        a.set_keys({"k1": b"1" * 32}, "k1")
        token = a.mint_token(_principal(), 60)
        b.set_keys({"k2": b"2" * 32}, "k2")  # k1 retired
        with self.assertRaises(FHIRError) as e:
            b.verify_token(token)
        self.assertEqual(e.exception.status, 401)

    def test_a_forged_kid_does_not_pick_another_key(self) -> None:
        """The attack: a token signed with a key the attacker has, naming a ring key."""
        b = self.authority()
        b.set_keys({"k1": b"1" * 32}, "k1")
        claims = {"iss": "medagent-relay", "sub": "evil", "role": "admin", "agents": [],
                  "iat": int(time.time()), "exp": int(time.time()) + 60}
        forged = jwt.encode(claims, b"attacker-key" * 3, algorithm="HS256",
                            headers={"kid": "k1"})
        with self.assertRaises(FHIRError) as e:
            b.verify_token(forged)
        self.assertEqual(e.exception.status, 401)
        unsigned = jwt.encode(claims, None, algorithm="none", headers={"kid": "k1"})
        with self.assertRaises(FHIRError):
            b.verify_token(unsigned)
        for kid in (["k1"], 7, None):  # signed with the ring's key, an odd kid: refused
            with self.assertRaises(FHIRError) as e:
                b.verify_token(_hand_made({"alg": "HS256", "typ": "JWT", "kid": kid}, claims,
                                          b"1" * 32))
            self.assertEqual(e.exception.status, 401)

    def test_a_token_without_kid_is_checked_against_token_key(self) -> None:
        old = self.authority()
        old.set_key(b"f" * 32)
        claims = {"iss": "medagent-relay", "sub": "c1", "client_id": "c1", "role": "pusher",
                  "agents": ["a1"], "iat": int(time.time()), "exp": int(time.time()) + 60}
        before_rings = jwt.encode(claims, b"f" * 32, algorithm="HS256")
        node = self.authority()
        node.set_keys({FILE_KID: b"f" * 32, "k2": b"2" * 32}, "k2")
        self.assertEqual(node.verify_token(before_rings).client_id, "c1")

    def test_a_remembered_signature_still_expires_and_a_new_ring_forgets_it(self) -> None:
        from medagent.relay import auth

        class Clock:
            now = time.time()

            def time(self) -> float:
                return self.now

        clock = Clock()
        a = Authority(_NoneRevoked(), None, clock=clock)  # type: ignore[arg-type]
        a.set_keys({"k1": b"1" * 32}, "k1")
        token = a.mint_token(_principal(), 60)
        self.assertEqual(a.verify_token(token).client_id, "c1")
        self.assertEqual(a.verify_token(token).client_id, "c1")  # (from the cache)
        clock.now += 60 + auth.CLOCK_SKEW + 1
        with self.assertRaises(FHIRError) as e:
            a.verify_token(token)
        self.assertIn("expired", e.exception.message)
        clock.now -= 60 + auth.CLOCK_SKEW + 1
        a.set_keys({"k2": b"2" * 32}, "k2")  # k1 retired
        with self.assertRaises(FHIRError):
            a.verify_token(token)
        a.verified_tokens = 3
        for _ in range(5):
            a.verify_token(a.mint_token(_principal(), 60))
        self.assertEqual(len(a._verified), 3)

    def test_no_ring_yet_is_503(self) -> None:
        with self.assertRaises(FHIRError) as e:
            self.authority().verify_token("x.y.z")
        self.assertEqual(e.exception.status, 503)


class _FakeRing:
    def __init__(self) -> None:
        self.ring: tuple[dict[str, bytes], str] | None = None
        self.reads = 0

    def load(self, first: Any = None) -> Deferred[tuple[dict[str, bytes], str]]:
        from twisted.internet.defer import fail

        self.reads += 1
        if self.ring is None:
            return fail(RuntimeError("database down"))
        return succeed(self.ring)


class KeyRingRefresh(SynchronousTestCase):
    """The relay node's reads of the shared ring: quick until the first, then slow."""

    def test_retried_every_second_until_read_then_every_minute(self) -> None:
        from twisted.internet.task import Clock

        from medagent.relay.service import KEY_REFRESH, _KeyRingRefresh

        clock, ring, authority = Clock(), _FakeRing(), _authority()
        refresh = _KeyRingRefresh(clock, authority, ring, "/nonexistent/token.key")
        refresh.startService()
        self.addCleanup(refresh.stopService)
        self.assertFalse(authority.ready)
        clock.advance(1)
        self.assertEqual(ring.reads, 2)
        ring.ring = ({"k1": b"1" * 32}, "k1")
        clock.advance(1)
        self.assertTrue(authority.ready)
        reads = ring.reads
        ring.ring = ({"k1": b"1" * 32, "k2": b"2" * 32}, "k2")  # rotated
        clock.advance(KEY_REFRESH - 1)
        self.assertEqual((ring.reads, authority._signing_kid), (reads, "k1"))
        clock.advance(1)
        self.assertEqual((ring.reads, authority._signing_kid), (reads + 1, "k2"))
        ring.ring = None  # the database goes away: the ring read before stays
        clock.advance(KEY_REFRESH)
        self.assertEqual(authority._signing_kid, "k2")


class RingInPostgres(TestCase):
    """L{PgSigningKeys} on a real PostgreSQL, two nodes (two databases objects)."""

    def setUp(self) -> Deferred[None]:
        def ready(dsn: str) -> None:
            self.dsn = dsn

        return deferToThread(pgenv.fresh_database, "medagent_signing_keys").addCallback(ready)

    def keys(self) -> PgSigningKeys:
        db = PgDatabase(reactor, self.dsn, migrations=MIGRATIONS, size=2)
        self.addCleanup(db.stop)
        return PgSigningKeys(db)

    def age(self, kid: str, seconds: float) -> Deferred[None]:
        """Make key C{kid} older (the publish delay passes without waiting for it)."""
        import psycopg

        def go() -> None:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                conn.execute("UPDATE signing_keys SET created = created"
                             " - make_interval(secs => %s) WHERE kid = %s", (seconds, kid))

        return deferToThread(go)

    async def test_nodes_starting_at_once_make_one_first_key(self) -> None:
        nodes = [self.keys() for _ in range(4)]
        results = await DeferredList([n.load() for n in nodes], fireOnOneErrback=True)
        rings = [ring for _, ring in results]
        self.assertEqual(len({signing for _, signing in rings}), 1)
        self.assertEqual(len(rings[0][0]), 1)

    async def test_the_first_nodes_token_key_becomes_the_first_key(self) -> None:
        a, b = self.keys(), self.keys()
        keys, signing = await a.load((FILE_KID, b"f" * 32))
        self.assertEqual((signing, keys), (FILE_KID, {FILE_KID: b"f" * 32}))
        keys, signing = await b.load((FILE_KID, b"g" * 32))  # a later node's own file: not used
        self.assertEqual((signing, keys[FILE_KID]), (FILE_KID, b"f" * 32))

    async def test_a_rotated_key_signs_only_after_its_publish_delay(self) -> None:
        node = self.keys()
        _, first = await node.load()
        await self.age(first, 3 * PUBLISH_DELAY)  # it has signed for a while
        new = await node.rotate()
        keys, signing = await node.load()
        self.assertEqual(signing, first, "published, not yet signing")
        self.assertEqual(set(keys), {first, new}, "but already verifying")
        await self.age(new, PUBLISH_DELAY + 1)
        _, signing = await node.load()
        self.assertEqual(signing, new)
        listed = await node.list()
        self.assertEqual([(k["kid"], k["signing"], k["retired"]) for k in listed],
                         [(first, False, None), (new, True, None)])
        self.assertNotIn("secret", json.dumps(listed))

    async def test_retiring_withdraws_a_key_and_the_last_one_is_replaced(self) -> None:
        node = self.keys()
        _, first = await node.load()
        self.assertTrue(await node.retire(first))
        self.assertFalse(await node.retire(first), "once")
        keys, signing = await node.load()
        self.assertNotIn(first, keys)
        self.assertNotEqual(signing, first)

    async def test_a_token_from_one_node_is_valid_at_another(self) -> None:
        a, b = _authority(), _authority()
        ring_a, ring_b = self.keys(), self.keys()
        a.set_keys(*(await ring_a.load()))
        b.set_keys(*(await ring_b.load()))
        token = a.mint_token(_principal(), 60)
        self.assertEqual(b.verify_token(token).client_id, "c1")


class KeyCommands(TestCase):
    """``medagent db keys|rotate-key|retire-key`` against a real PostgreSQL."""

    timeout = 60

    def setUp(self) -> Deferred[None]:
        def ready(dsn: str) -> None:
            self.dsn = dsn

        return deferToThread(pgenv.fresh_database, "medagent_cli_keys").addCallback(ready)

    def cli(self, *argv: str) -> Deferred[tuple[int, str, str]]:
        return deferToThread(run, *argv)

    async def test_rotate_list_retire(self) -> None:
        code, out, _ = await self.cli("db", "rotate-key", "--database", self.dsn)
        self.assertEqual(code, 0)
        new = json.loads(out)["kid"]
        code, out, _ = await self.cli("db", "keys", "--database", self.dsn)
        listed: list[dict[str, Any]] = json.loads(out)
        self.assertEqual((code, [k["kid"] for k in listed]), (0, [new]))
        code, out, _ = await self.cli("db", "retire-key", new, "--database", self.dsn)
        self.assertEqual(code, 0)
        self.assertEqual(json.loads(out)["retired"], new)
        self.assertNotEqual(json.loads(out)["signing"], new, "a new key took its place")
        code, _, err = await self.cli("db", "retire-key", new, "--database", self.dsn)
        self.assertEqual(code, 1)
        self.assertIn("no key", err)

    async def test_keys_need_a_database(self) -> None:
        code, _, err = await self.cli("db", "keys", "--data", "/nonexistent")
        self.assertEqual(code, 2)
        self.assertIn("--database", err)
