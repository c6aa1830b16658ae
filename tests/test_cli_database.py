"""
``medagent db upgrade|status`` and ``medagent init|client ... --database``: the relay's
schema and clients managed from the command line, on the SQLite file and on a real
PostgreSQL (L{tests.pgenv}'s throwaway cluster on loopback).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from medagent import cli
from medagent.relay.auth import Authority
from medagent.storage.postgres import MIGRATIONS, PgClientRegistry, PgDatabase
from tests import pgenv

WANTED = max(version for version, _ in MIGRATIONS)


def run(*argv: str) -> tuple[int, str, str]:
    """The command's exit code, stdout and stderr (in this process, blocking)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


class OnSQLite(TestCase):
    def setUp(self) -> None:
        self.data = os.path.join(tempfile.mkdtemp(prefix="medagent-cli-db-"), "relay")

    def test_status_of_a_missing_database_fails(self) -> None:
        code, out, err = run("db", "status", "--data", self.data)
        self.assertEqual(code, 1)
        self.assertEqual(json.loads(out)["exists"], False)
        self.assertIn("run medagent init", err)
        code, _, err = run("db", "upgrade", "--data", self.data)
        self.assertEqual(code, 2)
        self.assertFalse(os.path.exists(os.path.join(self.data, "relay.sqlite")))

    def test_upgrade_and_status_after_init(self) -> None:
        self.assertEqual(run("init", "--data", self.data)[0], 0)
        code, out, _ = run("db", "upgrade", "--data", self.data)
        self.assertEqual((code, json.loads(out)["current"]), (0, True))
        self.assertEqual(run("db", "status", "--data", self.data)[0], 0)


class OnPostgres(TestCase):
    timeout = 120

    def setUp(self) -> Deferred[None]:
        async def go() -> None:
            self.dsn = await deferToThread(pgenv.fresh_database, "medagent_cli_db")
        return ensureDeferred(go())

    def cli(self, *argv: str) -> Deferred[tuple[int, str, str]]:
        return deferToThread(run, *argv)

    def test_status_upgrade_status(self) -> Deferred[None]:
        async def go() -> None:
            code, out, _ = await self.cli("db", "status", "--database", self.dsn)
            self.assertEqual(code, 1, "a database never migrated is not current")
            self.assertEqual(json.loads(out), {"backend": "postgresql", "version": 0,
                                               "wanted": WANTED, "current": False})
            code, out, _ = await self.cli("db", "upgrade", "--database", self.dsn)
            self.assertEqual(code, 0)
            self.assertEqual(json.loads(out), {"backend": "postgresql", "before": 0,
                                               "after": WANTED, "wanted": WANTED})
            code, out, _ = await self.cli("db", "status", "--database", self.dsn)
            self.assertEqual((code, json.loads(out)["current"]), (0, True))
            # again: nothing to do, still current
            code, out, _ = await self.cli("db", "upgrade", "--database", self.dsn)
            self.assertEqual((code, json.loads(out)["before"]), (0, WANTED))

        return ensureDeferred(go())

    def test_clients_created_listed_revoked_in_postgres(self) -> Deferred[None]:
        async def go() -> None:
            code, out, _ = await self.cli("init", "--database", self.dsn)
            self.assertEqual(code, 0)
            admin = json.loads(out)
            code, out, _ = await self.cli("client", "create", "--database", self.dsn,
                                          "--role", "pusher", "--agent", "lab-1")
            self.assertEqual(code, 0)
            pusher = json.loads(out)
            code, out, _ = await self.cli("client", "list", "--database", self.dsn)
            listed = {c["clientId"]: c for c in json.loads(out)}
            self.assertEqual(set(listed), {admin["clientId"], pusher["clientId"]})
            self.assertNotIn(pusher["clientSecret"], out)

            # the relay's own authority, on the same database, accepts the new secret
            db = PgDatabase(reactor, self.dsn, migrations=MIGRATIONS)
            db.start()
            self.addCleanup(db.stop)
            authority = Authority(PgClientRegistry(db), b"k" * 32)
            await authority.refresh_revocations()
            token: Any = await authority.issue_token(pusher["clientId"],
                                                     pusher["clientSecret"])
            self.assertTrue(token["access_token"])

            code, out, _ = await self.cli("client", "revoke", pusher["clientId"],
                                          "--database", self.dsn)
            self.assertEqual((code, json.loads(out)["revoked"]), (0, True))
            code, out, _ = await self.cli("client", "list", "--database", self.dsn)
            self.assertTrue({c["clientId"]: c for c in json.loads(out)}
                            [pusher["clientId"]]["revoked"])

        return ensureDeferred(go())

    def test_a_url_with_a_password_is_refused_without_repeating_it(self) -> Deferred[None]:
        async def go() -> None:
            url = "postgresql://medagent:s3cr3t-pw@127.0.0.1:1/x"
            for argv in (("db", "status"), ("db", "upgrade"), ("client", "list"),
                         ("client", "create", "--role", "admin")):
                code, out, err = await self.cli(*argv, "--database", url)
                self.assertEqual(code, 2, argv)
                self.assertIn("must not carry a password", err)
                self.assertNotIn("s3cr3t-pw", out + err)

        return ensureDeferred(go())

    def test_an_unreachable_database_is_a_clear_error(self) -> Deferred[None]:
        async def go() -> None:
            from tests.procs import free_port

            url = f"postgresql://medagent@127.0.0.1:{free_port()}/nothing?connect_timeout=2"
            code, _, err = await self.cli("db", "status", "--database", url)
            self.assertEqual(code, 1)
            self.assertIn("cannot be used now", err)

        return ensureDeferred(go())
