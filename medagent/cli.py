"""
The ``medagent`` command.

    medagent init [--data DIR|--database URL]       create the relay's database and an admin client
    medagent db upgrade|status [--data DIR|--database URL]
                                                    apply / check the database schema migrations
    medagent db keys|rotate-key|retire-key KID --database URL
                                                    a cluster's shared token signing keys
    medagent client create --role R [--agent ID]    create credentials (admin, pusher, agent,
                                                    viewer, operator: the console)
    medagent client list                            list clients (never their secrets)
    medagent client revoke CLIENT_ID                revoke a client: its tokens and sockets stop
                                                    (client commands: through the relay's API,
                                                    or on the database with --data/--database)
    medagent push AGENT DESTINATION [BODY|--file F|--file FOLDER]
                                                    push a message (or each file of a folder)
    medagent agents | status AGENT [--lanes]        agents and their connection status
    medagent pushes list|show|retry|cancel          the push journal
    medagent pushes retry --all [--agent ID] [--state S] ...
                                                    retry every failed push matching filters
    medagent tail [--agent ID] [--state S]          follow pushes as they come and change state
    medagent inbound list [filters] | tail --inbound
                                                    the inbound log (device → agent → Bot)
    medagent ping AGENT DESTINATION                 ping a device through an agent
    medagent lane pause|resume AGENT DESTINATION    hold / release a device lane's pushes
    medagent lane list AGENT                        an agent's paused lanes
    medagent reload-config AGENT | logs AGENT       agent operations
    medagent demo                                   run relay + agent + a simulated lab instrument

Credentials are printed once, as JSON, and stored hashed.  Commands that call the relay take
its URL and credentials from flags, a profile or the environment (L{medagent.cli_config});
exit codes: 0 ok, 1 the relay or device said no, 2 a usage or configuration error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Awaitable, Callable, Protocol, Sequence, cast

from medagent.contenttypes import HL7_V2
from medagent.relay.auth import ROLES
from medagent.relay.service import DEFAULT_DATA


class ReactorLoop(Protocol):
    """The part of the global reactor a command's composition root drives.

    ``twisted.internet.reactor`` is typed as zope interfaces, which mypy cannot call through
    without the mypy-zope plugin; the commands cast it to this structural type instead.
    """

    running: bool

    def run(self) -> None: ...

    def stop(self) -> None: ...

    def callWhenRunning(self, f: Callable[..., object], *args: object,
                        **kwargs: object) -> object: ...


def _authority(data_dir: str, database: str | None = None):
    """
    The relay's client registry behind an authority: the SQLite file in C{data_dir}, or the
    shared PostgreSQL database at C{database} (migrated first; no token key is needed to
    create, list or revoke clients).
    """
    if database:
        from medagent.relay.auth import Authority

        storage = _pg_storage(database)
        storage.db.migrate_sync()
        return Authority(storage.registry, None)
    from medagent.relay.service import open_authority, open_database

    db = open_database(None, data_dir)
    os.makedirs(data_dir, exist_ok=True)
    return open_authority(db, data_dir)


def _pg_storage(database: str) -> Any:
    """
    The relay's PostgreSQL storage set for a tool (nothing connects until a C{*_sync} call);
    the URL rules of L{medagent.storage.open_storage} hold (no password in it, TLS off this
    machine), and a refusal is a L{_Refused} that never repeats the URL.
    """
    from medagent.storage import open_storage

    try:
        return open_storage(database, "", None)
    except ValueError as e:
        raise _Refused(str(e)) from None


class _Refused(Exception):
    """A database URL the relay's rules refuse (L{medagent.storage.open_storage})."""


def _database_errors(command: Callable[[argparse.Namespace], int]
                     ) -> Callable[[argparse.Namespace], int]:
    """
    A command that opens the relay database: a refused URL is a usage error (exit 2), a
    database that cannot be reached exit 1, each a one-line message without the URL.
    """
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except _Refused as e:
            print(f"medagent: {e}", file=sys.stderr)
            return 2
        except Exception as e:
            if type(e).__module__.startswith("psycopg"):
                print(f"medagent: the PostgreSQL database cannot be used now "
                      f"({type(e).__name__}); is it running, and may this user connect?",
                      file=sys.stderr)
                return 1
            raise

    run.__doc__ = command.__doc__
    return run


@_database_errors
def cmd_db(args: argparse.Namespace) -> int:
    """
    C{db upgrade}: apply the schema migrations this build has and the database lacks (a relay
    also does on start; this is for upgrading before the nodes restart).  C{db status}: the
    version the database is at and the one this build wants; exit 1 when they differ.
    """
    if args.database:
        storage = _pg_storage(args.database)
        db = storage.db
        before = db.schema_version_sync()
        wanted = db.wanted_version
        if args.db_command == "upgrade":
            after = db.migrate_sync()
            print(json.dumps({"backend": "postgresql", "before": before, "after": after,
                              "wanted": wanted}))
            return 0
        print(json.dumps({"backend": "postgresql", "version": before, "wanted": wanted,
                          "current": before >= wanted}))
        if before > wanted:
            print("medagent: the database was migrated by a newer medagent; upgrade this one",
                  file=sys.stderr)
        return 0 if before == wanted else 1
    from medagent.relay.service import open_database

    path = os.path.join(args.data, "relay.sqlite")
    exists = os.path.exists(path)
    if args.db_command == "status":
        print(json.dumps({"backend": "sqlite", "exists": exists, "current": exists}))
        if not exists:
            print(f"medagent: no relay database in {args.data} (run medagent init)",
                  file=sys.stderr)
        return 0 if exists else 1
    if not exists:
        print(f"medagent: no relay database in {args.data} (run medagent init)",
              file=sys.stderr)
        return 2
    db = open_database(None, args.data)  # opening the file applies the schema and upgrades
    try:
        db.run_sync(lambda conn: None)
    finally:
        db.stop()
    print(json.dumps({"backend": "sqlite", "current": True}))
    return 0


@_database_errors
def cmd_keys(args: argparse.Namespace) -> int:
    """
    C{db keys}: the token signing keys relay nodes on one PostgreSQL database share (kid,
    created, retired, which signs; never a secret).  C{db rotate-key}: publish a new key;
    it signs once every node has read it, and older keys keep verifying until retired.
    C{db retire-key KID}: withdraw a key (a leaked one): its tokens fail at every node
    within a minute.  One relay on SQLite has one key, its data folder's C{token.key}.
    """
    from medagent.storage.postgres import keys

    if not args.database:
        print("medagent: signing keys are shared through PostgreSQL (--database); one relay "
              "on SQLite has token.key in its data folder", file=sys.stderr)
        return 2
    db = _pg_storage(args.database).db  # (run_sync applies missing migrations first)
    if args.db_command == "keys":
        print(json.dumps(db.run_sync(keys.list_keys)))
        return 0
    if args.db_command == "rotate-key":
        print(json.dumps({"kid": db.run_sync(keys.rotate_key),
                          "signsAfterSeconds": keys.PUBLISH_DELAY}))
        return 0
    if not db.run_sync(keys.retire_key, args.kid):
        print(f"medagent: no key {args.kid!r} that is not retired", file=sys.stderr)
        return 1
    _, signing = db.run_sync(keys.load_ring)  # (a new key if that was the last one)
    print(json.dumps({"retired": args.kid, "signing": signing}))
    return 0


@_database_errors
def cmd_init(args: argparse.Namespace) -> int:
    authority = _authority(args.data, args.database)
    client = authority.create_client_sync("admin", name=args.name or "admin")
    if args.database:
        print(json.dumps(client, indent=2))
        print("# Clients are in the PostgreSQL database. Start each relay node with:\n"
              "#   twistd -n medagent-relay --database <the same URL> --data <its own folder>",
              file=sys.stderr)
        return 0
    print(json.dumps({**client, "dataDir": os.path.abspath(args.data)}, indent=2))
    print(
        f"# Relay data is in {os.path.abspath(args.data)}. Start the relay with:\n"
        f"#   twistd -n medagent-relay --data {args.data}",
        file=sys.stderr,
    )
    return 0


def _offline(args: argparse.Namespace) -> bool:
    """A client command on the database itself (C{--data}, C{--database} or their
    environment variables), not through a running relay's API."""
    return bool(args.database or args.data is not None or os.environ.get("MEDAGENT_DATA"))


def _data_dir(args: argparse.Namespace) -> str:
    return str(args.data or os.environ.get("MEDAGENT_DATA") or DEFAULT_DATA)


def _through_relay(args: argparse.Namespace, what: str,
                   action: Callable[[Any], Awaitable[None]]) -> int:
    creds = _credentials(args)
    if creds is None:
        return 2
    return _with_client(creds.relay, creds.client_id or "", creds.client_secret or "", what,
                        action)


@_database_errors
def cmd_client_create(args: argparse.Namespace) -> int:
    """
    Through the relay's API (admin credentials: C{ClientApplication/$credentials}); with
    C{--data} or C{--database}, in the database itself (no relay needed: before the first
    start, or on a cluster's PostgreSQL).
    """
    from medagent.fhir import FHIRError

    if not _offline(args):
        async def create(client: Any) -> None:
            made = await client.request_json(
                "POST", "/fhir/R4/ClientApplication/$credentials",
                json_body={"role": args.role, "agents": args.agent or [], "name": args.name})
            print(json.dumps(made, indent=2))

        return _through_relay(args, "client create", create)
    authority = _authority(_data_dir(args), args.database)
    try:
        client = authority.create_client_sync(args.role, args.agent or [], args.name)
    except FHIRError as e:
        print(f"medagent: {e.message}", file=sys.stderr)
        return 2
    print(json.dumps(client, indent=2))
    return 0


@_database_errors
def cmd_client_list(args: argparse.Namespace) -> int:
    """The clients (never a secret): through the relay's API, or with C{--data} or
    C{--database} from the database itself."""
    from medagent.relay.auth import Authority
    from medagent.relay.service import open_database
    from medagent.storage.sqlite import SQLiteClientRegistry

    if not _offline(args):
        async def listed(client: Any) -> None:
            found = await client.request_json("GET", "/fhir/R4/ClientApplication/$credentials")
            print(json.dumps(found["clients"], indent=2))

        return _through_relay(args, "client list", listed)
    args.data = _data_dir(args)
    if args.database:
        registry = _pg_storage(args.database).registry
        print(json.dumps([Authority.client_json(c) for c in registry.list_sync()], indent=2))
        return 0
    path = os.path.join(args.data, "relay.sqlite")
    if not os.path.exists(path):
        print(f"medagent: no relay database in {args.data} (run medagent init)", file=sys.stderr)
        return 2
    db = open_database(None, args.data)
    try:
        rows = [Authority.client_json(c) for c in SQLiteClientRegistry(db).list_sync()]
    finally:
        db.stop()
    print(json.dumps(rows, indent=2))
    return 0


@_database_errors
def cmd_client_revoke(args: argparse.Namespace) -> int:
    """
    Through the relay's API by default (admin credentials): the relay refuses the client's
    tokens and closes its agent sockets before it answers.  With C{--data} (SQLite) or
    C{--database} (PostgreSQL), in the database only, for a relay that is not running (a
    running one applies it within seconds).
    """
    from medagent.fhir import FHIRError

    if _offline(args):
        args.data = _data_dir(args)
        if not args.database and not os.path.exists(os.path.join(args.data, "relay.sqlite")):
            print(f"medagent: no relay database in {args.data} (run medagent init)",
                  file=sys.stderr)
            return 2
        try:
            _authority(args.data or "", args.database).revoke_client_sync(args.target)
        except FHIRError as e:
            print(f"medagent: {e.message}", file=sys.stderr)
            return 2
        print(json.dumps({"clientId": args.target, "revoked": True}, indent=2))
        print("# Written to the database; every running relay node applies it within a few"
              " seconds.", file=sys.stderr)
        return 0
    from urllib.parse import quote

    async def revoke(client: Any) -> None:
        await client.request_json(
            "POST", f"/fhir/R4/ClientApplication/{quote(args.target, safe='')}/$revoke")
        print(json.dumps({"clientId": args.target, "revoked": True}, indent=2))

    return _through_relay(args, "revoke", revoke)


def _credentials(args: argparse.Namespace) -> Any:
    """The command's L{cli_config.Credentials}, or None after saying why (exit code 2)."""
    from medagent.cli_config import ConfigError, require, resolve

    try:
        return require(resolve(args))
    except ConfigError as e:
        print(f"medagent: {e}", file=sys.stderr)
        return None


def _with_client(relay: str, client_id: str, client_secret: str, what: str,
                 action: Callable[[Any], Awaitable[None]]) -> int:
    """
    Run C{action(client)} against the relay on the global reactor (this command is the
    composition root) and return the exit code: 0, or 1 with C{what} failed and the reason.
    """
    from twisted.internet import reactor as _reactor
    from twisted.internet.defer import ensureDeferred

    from medagent.client import MedagentClient

    reactor = cast(ReactorLoop, _reactor)
    result: dict[str, Any] = {"rc": 0}

    async def go() -> None:
        client = MedagentClient(reactor, relay, client_id, client_secret)
        try:
            await action(client)
        except Exception as e:  # RelayError included: the relay's reason, for the operator
            print(f"medagent: {what} failed: {e}", file=sys.stderr)
            result["rc"] = 1
        finally:
            await client.close()

    def stop(_: object) -> None:
        reactor.stop()

    reactor.callWhenRunning(lambda: ensureDeferred(go()).addBoth(stop))
    reactor.run()
    return int(result["rc"])


def _run(args: argparse.Namespace, what: str, action: Callable[[Any], Awaitable[None]]) -> int:
    """L{_with_client} with the command's credentials; 2 when they are missing or bad."""
    creds = _credentials(args)
    if creds is None:
        return 2
    return _with_client(creds.relay, creds.client_id, creds.client_secret, what, action)


def _ops(name: str) -> Callable[[argparse.Namespace], int]:
    """The L{cli_ops} command C{name}, run on the relay of its arguments."""
    def command(args: argparse.Namespace) -> int:
        from medagent import cli_ops

        return int(getattr(cli_ops, name)(args, _run))

    return command


def cmd_push(args: argparse.Namespace) -> int:
    if args.file and args.file != "-" and os.path.isdir(args.file):
        if args.body is not None or args.no_wait or args.idempotency_key:
            print("medagent: a folder is pushed file by file, waited: no BODY, --no-wait "
                  "or --idempotency-key with it", file=sys.stderr)
            return 2
        return _ops("cmd_push_folder")(args)
    creds = _credentials(args)
    if creds is None:
        return 2
    if args.file and args.file != "-":
        try:
            with open(args.file, encoding="utf-8") as f:
                body = f.read()
        except (OSError, UnicodeDecodeError) as e:
            print(f"medagent: cannot read {args.file}: {type(e).__name__}", file=sys.stderr)
            return 2
    elif args.body is not None:
        body = args.body
    else:
        body = sys.stdin.read()

    rejected: list[str] = []

    async def push(client: Any) -> None:
        from medagent.cli_ops import hl7_ack_code

        reply = await client.push_to_agent(
            args.agent,
            args.destination,
            body,
            args.content_type,
            not args.no_wait,
            wait_timeout=args.timeout,
            idempotency_key=args.idempotency_key,
        )
        if isinstance(reply, str):
            print(reply.replace("\r", "\n").rstrip("\n"))
        else:
            print(json.dumps(reply, indent=2))
        code = hl7_ack_code(reply)
        if code is not None and code not in ("AA", "CA"):
            rejected.append(code)

    rc = _with_client(creds.relay, creds.client_id, creds.client_secret, "push", push)
    if rc == 0 and rejected:
        print(f"medagent: the device answered {rejected[0]}", file=sys.stderr)
        return 1
    return rc


def cmd_demo(args: argparse.Namespace) -> int:
    from medagent.demo import run_demo

    return run_demo(args)


def add_bulk_retry_flags(p: argparse.ArgumentParser) -> None:
    """``pushes retry ID`` or ``pushes retry --all [filters]`` (POST AgentPush/$retry)."""
    p.description = ("retry a failed push, or with --all every failed or expired push "
                     "matching the filters (at most --limit, 500 per call; operator or admin)")
    p.add_argument("id", nargs="?", default=None, help="AgentPush id (or --all)")
    p.add_argument("--all", action="store_true",
                   help="every failed/expired push matching the filters below")
    p.add_argument("--agent", default=None, help="only this Agent id's pushes")
    p.add_argument("--state", default=None, choices=("failed", "expired"),
                   help="only failed or only expired pushes (default: both)")
    p.add_argument("--destination", default=None, help="only pushes to this destination")
    p.add_argument("--control-id", default=None, help="only HL7 pushes with this MSH-10")
    p.add_argument("--accession", default=None, help="only HL7 pushes with this order number")
    p.add_argument("--since", type=float, default=None, help="created at or after (epoch s)")
    p.add_argument("--until", type=float, default=None, help="created before (epoch s)")
    p.add_argument("--limit", type=int, default=500, help="retry at most this many (1-500)")


def build_parser() -> argparse.ArgumentParser:
    from medagent.cli_config import add_connection_flags

    parser = argparse.ArgumentParser(prog="medagent", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    database_help = ("the relay nodes' shared PostgreSQL database, postgresql://user@host:port/db"
                     " (no password in it: ~/.pgpass or PGPASSFILE); default: the SQLite file"
                     " in --data, or $MEDAGENT_DATABASE")

    def database_flag(q: argparse.ArgumentParser) -> None:
        q.add_argument("--database", default=os.environ.get("MEDAGENT_DATABASE") or None,
                       help=database_help)

    p = sub.add_parser("init", help="create the relay database and an admin client")
    p.add_argument("--data", default=os.environ.get("MEDAGENT_DATA", DEFAULT_DATA))
    database_flag(p)
    p.add_argument("--name", default=None)
    p.set_defaults(func=cmd_init)

    db = sub.add_parser("db", help="the relay database's schema").add_subparsers(
        dest="db_command", required=True)
    for name, help in (("upgrade", "apply the schema migrations the database lacks"),
                       ("status", "the schema version, and whether it is current (exit 1 if"
                        " not)")):
        p = db.add_parser(name, help=help, description=help)
        p.add_argument("--data", default=os.environ.get("MEDAGENT_DATA", DEFAULT_DATA))
        database_flag(p)
        p.set_defaults(func=cmd_db)
    for name, help in (("keys", "the token signing keys relay nodes share (no secrets)"),
                       ("rotate-key", "publish a new signing key (signs once every node has"
                        " read it)"),
                       ("retire-key", "withdraw a signing key: its tokens fail everywhere")):
        p = db.add_parser(name, help=help, description=help)
        database_flag(p)
        if name == "retire-key":
            p.add_argument("kid", help="the key's id (from medagent db keys)")
        p.set_defaults(func=cmd_keys)

    client = sub.add_parser("client", help="manage OAuth2 clients").add_subparsers(
        dest="client_command", required=True)
    p = client.add_parser("create", help="create a client and print its credentials (through "
                          "the relay, or with --data/--database in the database)")
    add_connection_flags(p)
    p.add_argument("--data", default=None,
                   help="write to this relay data folder instead of calling the relay")
    database_flag(p)
    p.add_argument("--role", choices=list(ROLES), required=True,
                   help="viewer/operator: the operators' console (/console), read-only or with "
                   "actions and payloads")
    p.add_argument("--agent", action="append",
                   help="agent id this client may push to (pusher) or is (agent); '*' = all")
    p.add_argument("--name", default=None)
    p.set_defaults(func=cmd_client_create)
    p = client.add_parser("list", help="list clients (through the relay, or with "
                          "--data/--database from the database)")
    add_connection_flags(p)
    p.add_argument("--data", default=None,
                   help="read this relay data folder instead of calling the relay")
    database_flag(p)
    p.set_defaults(func=cmd_client_list)
    p = client.add_parser("revoke", help="revoke a client (through the relay, or with --data)")
    p.add_argument("target", metavar="CLIENT_ID", help="the clientId to revoke")
    add_connection_flags(p)
    p.add_argument("--data", default=None,
                   help="write to this relay data folder instead of calling the relay")
    database_flag(p)
    p.set_defaults(func=cmd_client_revoke)

    def relay_command(parent: Any, name: str, func: str, help: str) -> argparse.ArgumentParser:
        q = parent.add_parser(name, help=help, description=help)
        add_connection_flags(q)
        q.add_argument("--json", action="store_true", help="JSON on stdout instead of a table")
        q.set_defaults(func=_ops(func))
        return q

    relay_command(sub, "agents", "cmd_agents", "list agents with their connection status")
    p = relay_command(sub, "status", "cmd_status", "one agent's connection status and version")
    p.add_argument("agent", help="Agent id")
    p.add_argument("--lanes", action="store_true",
                   help="also its device lanes (from $stats): waiting, paused, last ACK and "
                        "code, ACK latency p50/p99, recent errors")
    lane = sub.add_parser("lane", help="pause or resume a device lane of an agent (operator "
                                       "or admin)").add_subparsers(dest="lane_command",
                                                                   required=True)
    for name, verb in (("pause", "pause a lane: its pushes wait on the relay, in order"),
                       ("resume", "resume a lane: its waiting pushes go out in order")):
        p = relay_command(lane, name, "cmd_lane", verb)
        p.add_argument("agent", help="Agent id")
        p.add_argument("destination", help="the device: a destination URL or Device/{id}")
    p = relay_command(lane, "list", "cmd_lane_list", "an agent's paused lanes")
    p.add_argument("agent", help="Agent id")
    pushes = sub.add_parser("pushes", help="list, show, retry or cancel pushes").add_subparsers(
        dest="pushes_command", required=True)
    p = relay_command(pushes, "list", "cmd_pushes_list", "pushes, newest first")
    p.add_argument("--agent", default=None, help="only this Agent id's pushes")
    p.add_argument("--state", default=None,
                   help="only pushes in this state (queued, sent, delivered, failed, ...)")
    p.add_argument("--count", type=int, default=20, help="at most this many (default 20); "
                   "the relay's next links are followed until there are")
    p.add_argument("--page-size", type=int, default=100, help="pushes per request (1-100)")
    p.add_argument("--destination", default=None, help="only pushes to this destination")
    p.add_argument("--control-id", default=None, help="only HL7 pushes with this MSH-10")
    p.add_argument("--accession", default=None, help="only HL7 pushes with this order number")
    p.add_argument("--since", type=float, default=None, help="created at or after (epoch s)")
    p.add_argument("--until", type=float, default=None, help="created before (epoch s)")
    p.add_argument("--patient", dest="patient_id", default=None,
                   help="only pushes for this patient id (HL7 PID-3, DICOM Patient ID)")
    p.add_argument("--study-uid", default=None, help="only DICOM pushes of this study")
    p.add_argument("--sop-uid", default=None, help="only the DICOM push of this instance")
    inbound = sub.add_parser("inbound", help="the inbound log: messages devices sent through "
                             "agents' channels").add_subparsers(dest="inbound_command",
                                                                required=True)
    p = relay_command(inbound, "list", "cmd_inbound_list",
                      "inbound messages, newest first (never payloads)")
    p.add_argument("--agent", default=None, help="only this Agent id's messages")
    p.add_argument("--channel", default=None, help="only this channel's messages")
    p.add_argument("--control-id", default=None, help="only HL7 messages with this MSH-10")
    p.add_argument("--patient", dest="patient_id", default=None,
                   help="only messages for this patient id (HL7 PID-3, DICOM Patient ID)")
    p.add_argument("--accession", default=None, help="only messages with this order number")
    p.add_argument("--study-uid", default=None, help="only DICOM messages of this study")
    p.add_argument("--sop-uid", default=None, help="only the DICOM message of this instance")
    p.add_argument("--outcome", default=None, choices=("ok", "rejected", "error"),
                   help="ok, rejected (the Bot's negative ACK) or error")
    p.add_argument("--since", type=float, default=None, help="received at or after (epoch s)")
    p.add_argument("--until", type=float, default=None, help="received before (epoch s)")
    p.add_argument("--count", type=int, default=20, help="at most this many (default 20)")
    p.add_argument("--page-size", type=int, default=100, help="messages per request (1-100)")
    for name, verb in (("show", "a push's status"), ("retry", "retry a failed push"),
                       ("cancel", "cancel a queued push"),
                       ("resend", "send a finished push's message again, as a new push")):
        p = relay_command(pushes, name, f"cmd_pushes_{name}", verb)
        if name == "retry":  # one push, or --all with filters (medagent.cli_ops)
            add_bulk_retry_flags(p)
            continue
        p.add_argument("id", help="AgentPush id")
    p = relay_command(sub, "tail", "cmd_tail", "follow pushes as they arrive and change state")
    p.add_argument("--agent", default=None, help="only this Agent id's pushes")
    p.add_argument("--state", default=None, help="only pushes in this state")
    p.add_argument("--inbound", action="store_true",
                   help="follow the inbound log (messages from devices) instead of pushes")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between reads (1)")
    p.add_argument("--for", dest="seconds", type=float, default=None,
                   help="stop after this many seconds (default: until Ctrl-C)")
    p = relay_command(sub, "ping", "cmd_ping", "ping a device through an agent")
    p.add_argument("agent", help="Agent id")
    p.add_argument("destination", help="Device/{id}, Device?search, or a destination URL")
    p.add_argument("--timeout", type=int, default=None, help="wait timeout, ms (max 55000)")
    p = relay_command(sub, "reload-config", "cmd_reload_config",
                      "make an agent reload its configuration")
    p.add_argument("agent", help="Agent id")
    p = relay_command(sub, "logs", "cmd_logs", "an agent's recent log lines")
    p.add_argument("agent", help="Agent id")
    p.add_argument("--limit", type=int, default=20, help="lines, 1-1000 (default 20)")

    p = sub.add_parser("push", help="push a message (or every file of a folder) to a device")
    p.add_argument("agent", help="Agent id")
    p.add_argument("destination", help="Device/{id}, Device?search, or a destination URL")
    p.add_argument("body", nargs="?", help="message (default: --file or standard input)")
    p.add_argument("--file", "-f", help="a file, '-' for standard input, or a folder: each "
                   "regular file in it, in name order, one waited push each")
    p.add_argument("--json", action="store_true", help="a folder's summary as JSON")
    p.add_argument("--content-type", default=HL7_V2)
    p.add_argument("--no-wait", action="store_true", help="queue and return at once (202)")
    p.add_argument("--timeout", type=int, default=None, help="wait timeout, ms (max 55000)")
    p.add_argument("--idempotency-key", default=None)
    add_connection_flags(p)
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("demo", help="relay + agent + simulated lab instrument, on this machine")
    p.add_argument("--data", default=None, help="data folder (default: a new temporary one)")
    p.add_argument("--port", type=int, default=8103, help="relay HTTP port (0 = any free port)")
    p.add_argument("--once", action="store_true", help="exit after the first order round trip")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
