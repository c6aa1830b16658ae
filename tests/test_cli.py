"""
The ``medagent`` command: where it finds the relay and credentials (unit), and every
operator command as a real subprocess against an in-process relay and, for push and ping, a
real twistd agent and a python-hl7 MLLP listener (all on loopback).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
from contextlib import redirect_stdout
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.trial.unittest import SynchronousTestCase, TestCase

from medagent import cli
from medagent.cli_config import ConfigError, Credentials, require, resolve
from medagent.client import MedagentClient, RelayError
from medagent.contenttypes import HL7_V2
from tests import procs
from tests.peerenv import FIXTURES


def _args(**kw: object) -> argparse.Namespace:
    base: dict[str, object] = {"relay": None, "client_id": None, "client_secret": None,
                               "profile": None}
    return argparse.Namespace(**{**base, **kw})


class WhereCredentialsComeFrom(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="medagent-cli-")

    def write(self, name: str, text: str, mode: int = 0o600) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)
        return path

    def test_defaults_without_anything(self) -> None:
        self.assertEqual(resolve(_args(), {}), Credentials("http://127.0.0.1:8103", None, None))
        self.assertRaises(ConfigError, require, resolve(_args(), {}))

    def test_environment(self) -> None:
        env = {"MEDAGENT_RELAY": "http://127.0.0.1:9/", "MEDAGENT_CLIENT_ID": "id",
               "MEDAGENT_CLIENT_SECRET": "s"}
        self.assertEqual(resolve(_args(), env), Credentials("http://127.0.0.1:9", "id", "s"))

    def test_secret_file_from_the_environment(self) -> None:
        path = self.write("secret", "s3cret\n")
        env = {"MEDAGENT_CLIENT_ID": "id", "MEDAGENT_CLIENT_SECRET_FILE": path}
        self.assertEqual(resolve(_args(), env).client_secret, "s3cret")

    def test_secret_file_readable_by_others_is_refused(self) -> None:
        path = self.write("secret", "s3cret\n", 0o644)
        e = self.assertRaises(ConfigError, resolve, _args(),
                              {"MEDAGENT_CLIENT_SECRET_FILE": path})
        self.assertIn("group or others", str(e))
        self.assertNotIn("s3cret", str(e))

    def test_flags_win_over_profile_and_profile_over_environment(self) -> None:
        path = self.write("profiles.ini", "[lab]\nrelay = http://127.0.0.1:7\n"
                          "client_id = pid\nclient_secret = psecret\n")
        env = {"MEDAGENT_PROFILES": path, "MEDAGENT_RELAY": "http://127.0.0.1:9",
               "MEDAGENT_CLIENT_ID": "eid", "MEDAGENT_CLIENT_SECRET": "esecret"}
        self.assertEqual(resolve(_args(profile="lab"), env),
                         Credentials("http://127.0.0.1:7", "pid", "psecret"))
        self.assertEqual(resolve(_args(profile="lab", client_id="fid"), env).client_id, "fid")
        self.assertEqual(resolve(_args(), env).client_id, "eid")  # no --profile: not read

    def test_profile_secret_file(self) -> None:
        secret = self.write("secret", "fromfile")
        path = self.write("profiles.ini", f"[lab]\nclient_id = pid\n"
                          f"client_secret_file = {secret}\n")
        creds = resolve(_args(profile="lab"), {"MEDAGENT_PROFILES": path})
        self.assertEqual(creds.client_secret, "fromfile")

    def test_profile_file_readable_by_group_is_refused(self) -> None:
        path = self.write("profiles.ini", "[lab]\nclient_secret = x\n", 0o640)
        e = self.assertRaises(ConfigError, resolve, _args(profile="lab"),
                              {"MEDAGENT_PROFILES": path})
        self.assertIn("group or others", str(e))

    def test_default_profile_path_under_home(self) -> None:
        os.makedirs(os.path.join(self.dir, ".config", "medagent"))
        self.write(os.path.join(".config", "medagent", "profiles.ini"),
                   "[x]\nclient_id = hid\n")
        self.assertEqual(resolve(_args(profile="x"), {"HOME": self.dir}).client_id, "hid")

    def test_missing_profile_and_unknown_keys(self) -> None:
        path = self.write("profiles.ini", "[lab]\nclient_secrt = x\n")
        env = {"MEDAGENT_PROFILES": path}
        self.assertIn("no profile [other]",
                      str(self.assertRaises(ConfigError, resolve, _args(profile="other"), env)))
        self.assertIn("client_secrt",
                      str(self.assertRaises(ConfigError, resolve, _args(profile="lab"), env)))
        self.assertRaises(ConfigError, resolve, _args(profile="lab"),
                          {"MEDAGENT_PROFILES": os.path.join(self.dir, "missing.ini")})

    def test_relay_must_be_http(self) -> None:
        self.assertRaises(ConfigError, resolve, _args(relay="ftp://127.0.0.1"), {})


HL7 = ("MSH|^~\\&|EHR|HOSP|LIS|LAB|20240101120000||ORM^O01|{ctrl}|P|2.5.1\r"
       "PID|1||12345^^^MRN||DOE^JANE||19800101|F\rORC|NW|{ctrl}\rOBR|1|{ctrl}||GLU^Glucose")


class _CLI:
    """Runs ``python -m medagent.cli`` as a subprocess with the admin's credentials in env."""

    testcase: Any
    base: str
    admin_creds: dict[str, Any]

    async def cli(self, *argv: str, env: dict[str, str] | None = None,
                  creds: bool = True) -> procs.Proc:
        full = {"MEDAGENT_RELAY": self.base}
        if creds:
            full.update(MEDAGENT_CLIENT_ID=self.admin_creds["clientId"],
                        MEDAGENT_CLIENT_SECRET=self.admin_creds["clientSecret"])
        full.update(env or {})
        proc = procs.python(self.testcase, "cli", ["-m", "medagent.cli", *argv], env=full)
        await proc.ended
        return proc

    async def clis(self, *argvs: list[str], **kw: Any) -> list[procs.Proc]:
        """Several independent commands at once (each is a Python start-up, ~1 s)."""
        return list(await gatherResults([ensureDeferred(self.cli(*a, **kw)) for a in argvs]))


class OperatorCommands(TestCase, _CLI):
    """agents, status, pushes list/show/retry/cancel against an in-process relay."""

    timeout = 60

    def setUp(self) -> Deferred:
        return ensureDeferred(self._setUp())

    async def _setUp(self) -> None:
        self.testcase = self
        self.relay, self.base, _ = procs.in_process_relay(self, "relay-cli-")
        self.admin_creds = await self.relay.authority.create_client("admin")
        self.admin = MedagentClient(reactor, self.base, self.admin_creds["clientId"],
                                    self.admin_creds["clientSecret"])
        self.addCleanup(self.admin.close)
        self.agent = await self.admin.create({"resourceType": "Agent", "name": "Lab agent",
                                              "status": "active"})

    async def queue(self, n: int) -> list[str]:
        ids = []
        for i in range(n):
            outcome = await self.admin.push_to_agent(
                self.agent["id"], "mllp://127.0.0.1:9", HL7.format(ctrl=f"Q{i}"), HL7_V2, False)
            ids.append(outcome["issue"][0]["diagnostics"].rsplit("/", 1)[-1])
        return ids

    def test_agents_and_status(self) -> Deferred:
        async def go() -> None:
            as_json, as_table, status, missing = await self.clis(
                ["agents", "--json"], ["agents"], ["status", self.agent["id"], "--json"],
                ["status", "no-such-agent"])
            self.assertEqual(as_json.exit_code, 0, as_json.text)
            rows = json.loads(as_json.text)
            self.assertEqual([(r["id"], r["name"], r["status"]) for r in rows],
                             [(self.agent["id"], "Lab agent", "disconnected")])
            self.assertEqual(as_table.exit_code, 0, as_table.text)
            header, row = as_table.text.splitlines()
            self.assertEqual(header.split(), ["ID", "NAME", "STATUS", "VERSION"])
            self.assertTrue(row.startswith(self.agent["id"]), row)
            self.assertIn("disconnected", row)
            self.assertEqual(status.exit_code, 0, status.text)
            self.assertEqual(json.loads(status.text)["status"], "disconnected")
            self.assertEqual(missing.exit_code, 1, missing.text)
            self.assertIn("status failed: HTTP 404", missing.text)

        return ensureDeferred(go())

    def test_pushes_list_follows_next_links_and_filters(self) -> Deferred:
        async def go() -> None:
            ids = await self.queue(5)
            proc = await self.cli("pushes", "list", "--agent", self.agent["id"], "--count", "3",
                                  "--page-size", "2", "--json")
            self.assertEqual(proc.exit_code, 0, proc.text)
            page = json.loads(proc.text)
            self.assertEqual(page["total"], 5)
            self.assertEqual([p["id"] for p in page["pushes"]], ids[::-1][:3])  # newest first
            proc = await self.cli("pushes", "list", "--state", "delivered", "--json")
            self.assertEqual(json.loads(proc.text)["pushes"], [])
            proc = await self.cli("pushes", "list", "--state", "nonsense")
            self.assertEqual(proc.exit_code, 1, proc.text)
            proc = await self.cli("pushes", "list")
            self.assertEqual(proc.exit_code, 0, proc.text)
            lines = proc.text.splitlines()
            self.assertEqual(lines[0].split()[:3], ["ID", "AGENT", "STATE"])
            self.assertEqual(len(lines), 1 + 5 + 1, proc.text)
            self.assertEqual(lines[-1], "# 5 shown of 5")

        return ensureDeferred(go())

    def test_pushes_show_cancel_retry(self) -> Deferred:
        async def go() -> None:
            [push_id] = await self.queue(1)
            proc = await self.cli("pushes", "show", push_id, "--json")
            self.assertEqual(proc.exit_code, 0, proc.text)
            self.assertEqual(json.loads(proc.text)["state"], "queued")
            proc = await self.cli("pushes", "cancel", push_id, "--json")
            self.assertEqual(proc.exit_code, 0, proc.text)
            self.assertEqual(json.loads(proc.text)["state"], "cancelled")
            self.assertEqual((await self.admin.read("AgentPush", push_id))["state"],
                             "cancelled")
            proc = await self.cli("pushes", "retry", push_id)
            self.assertEqual(proc.exit_code, 1, proc.text)  # the relay says no: not retryable
            self.assertIn("pushes retry failed: HTTP", proc.text)
            proc = await self.cli("pushes", "show", "no-such-push")
            self.assertEqual(proc.exit_code, 1, proc.text)

        return ensureDeferred(go())

    def test_client_create_and_list_through_the_relay(self) -> Deferred:
        async def go() -> None:
            made, = await self.clis(["client", "create", "--role", "pusher", "--agent",
                                     self.agent["id"], "--name", "lis"])
            self.assertEqual(made.exit_code, 0, made.text)
            creds = json.loads(made.text[made.text.index("{"):])
            self.assertEqual((creds["role"], creds["agents"]), ("pusher", [self.agent["id"]]))
            pusher = MedagentClient(reactor, self.base, creds["clientId"],
                                    creds["clientSecret"])
            self.addCleanup(pusher.close)
            await pusher.access_token()  # the new credentials work
            listed, = await self.clis(["client", "list"])
            self.assertEqual(listed.exit_code, 0, listed.text)
            rows = json.loads(listed.text[listed.text.index("["):])
            self.assertIn(creds["clientId"], [r["clientId"] for r in rows])
            self.assertNotIn(creds["clientSecret"], listed.text)
            self.assertNotIn("secret", listed.text.lower())
            # least privilege: a pusher may not make itself an admin
            env = {"MEDAGENT_CLIENT_ID": creds["clientId"],
                   "MEDAGENT_CLIENT_SECRET": creds["clientSecret"]}
            escalate, peek = await self.clis(["client", "create", "--role", "admin"],
                                             ["client", "list"], env=env)
            self.assertEqual(escalate.exit_code, 1, escalate.text)
            self.assertIn("403", escalate.text)
            self.assertEqual(peek.exit_code, 1, peek.text)
            for bad in ({"role": "root"}, {"role": "pusher", "agents": "a1"},
                        {"role": "pusher", "name": "x" * 201}, ["pusher"]):
                e = await self.assertFailure(ensureDeferred(self.admin.request_json(
                    "POST", "/fhir/R4/ClientApplication/$credentials", json_body=bad)),
                    RelayError)
                self.assertEqual(e.status, 400, bad)

        return ensureDeferred(go())

    def test_pushes_resend_and_the_consoles_filters(self) -> Deferred:
        async def go() -> None:
            [first] = await self.queue(1)
            await self.admin.request_json("POST", f"/fhir/R4/AgentPush/{first}/$cancel")
            proc = await self.cli("pushes", "resend", first, "--json")
            self.assertEqual(proc.exit_code, 0, proc.text)
            again = json.loads(proc.text[proc.text.index("{"):])
            self.assertNotEqual(again["id"], first)
            self.assertEqual(again["resentFrom"], {"reference": f"AgentPush/{first}"})
            found, by_time, bad = await self.clis(
                ["pushes", "list", "--control-id", "Q0", "--json"],
                ["pushes", "list", "--since", "1", "--until", "2", "--json"],
                ["pushes", "list", "--since", "soon"])
            self.assertEqual(found.exit_code, 0, found.text)
            self.assertEqual(sorted(p["id"] for p in json.loads(found.text)["pushes"]),
                             sorted([first, again["id"]]))
            self.assertEqual(json.loads(by_time.text)["pushes"], [])
            self.assertEqual(bad.exit_code, 2, bad.text)  # argparse: not a number
            e = await self.assertFailure(ensureDeferred(self.admin.request_json(
                "GET", "/fhir/R4/AgentPush?since=nan")), RelayError)
            self.assertEqual(e.status, 400)

        return ensureDeferred(go())

    def test_tail_follows_new_pushes_and_state_changes(self) -> Deferred:
        async def go() -> None:
            [first] = await self.queue(1)
            full = {"MEDAGENT_RELAY": self.base,
                    "MEDAGENT_CLIENT_ID": self.admin_creds["clientId"],
                    "MEDAGENT_CLIENT_SECRET": self.admin_creds["clientSecret"]}
            tail = procs.python(self, "tail", ["-m", "medagent.cli", "tail", "--json",
                                               "--interval", "0.2", "--for", "30"], env=full)
            await tail.wait_for(first, timeout=20)  # what was there when it started
            await self.admin.request_json("POST", f"/fhir/R4/AgentPush/{first}/$cancel")
            [second] = await self.queue(1)
            await tail.wait_for(second, timeout=20)
            await procs.wait_until(lambda: tail.count('"cancelled"') >= 1,
                                   timeout=20, what="the cancel seen")
            tail.transport.signalProcess("TERM")
            await tail.ended
            events = [json.loads(line) for line in bytes(tail.output).decode().splitlines()
                      if line.startswith("{")]
            self.assertEqual([(e["id"], e["state"]) for e in events],
                             [(first, "queued"), (first, "cancelled"), (second, "queued")]
                             if events[1]["id"] == first else
                             [(first, "queued"), (second, "queued"), (first, "cancelled")])
            bad, = await self.clis(["tail", "--interval", "0"])
            self.assertEqual(bad.exit_code, 2, bad.text)

        return ensureDeferred(go())

    def test_exit_2_for_usage_and_config_errors(self) -> Deferred:
        async def go() -> None:
            no_creds, = await self.clis(["agents"], creds=False)
            self.assertEqual(no_creds.exit_code, 2, no_creds.text)
            self.assertIn("no client credentials", no_creds.text)
            procs_ = await self.clis(
                ["pushes", "list", "--count", "0"], ["logs", "x", "--limit", "5000"],
                ["status"],  # argparse: AGENT missing
                ["agents", "--profile", "nope"], ["agents", "--relay", "ftp://127.0.0.1"],
                env={"MEDAGENT_PROFILES": "/nonexistent/profiles.ini"})
            for proc in procs_:
                self.assertEqual(proc.exit_code, 2, proc.text)
            wrong, = await self.clis(["agents", "--client-secret", "wrong"])
            self.assertEqual(wrong.exit_code, 1, wrong.text)  # the relay said no

        return ensureDeferred(go())

    def test_credentials_from_a_profile(self) -> Deferred:
        async def go() -> None:
            folder = tempfile.mkdtemp(prefix="medagent-cli-")
            path = os.path.join(folder, "profiles.ini")
            with open(path, "w") as f:
                f.write(f"[lab]\nrelay = {self.base}\nclient_id = {self.admin_creds['clientId']}"
                        f"\nclient_secret = {self.admin_creds['clientSecret']}\n")
            os.chmod(path, 0o600)
            env = {"MEDAGENT_PROFILES": path, "MEDAGENT_RELAY": "http://127.0.0.1:9"}
            proc = await self.cli("agents", "--profile", "lab", "--json", env=env, creds=False)
            self.assertEqual(proc.exit_code, 0, proc.text)
            self.assertEqual(len(json.loads(proc.text)), 1)
            os.chmod(path, 0o644)
            proc = await self.cli("agents", "--profile", "lab", env=env, creds=False)
            self.assertEqual(proc.exit_code, 2, proc.text)
            self.assertIn("group or others", proc.text)
            self.assertNotIn(self.admin_creds["clientSecret"], proc.text)

        return ensureDeferred(go())

    def test_every_command_has_help(self) -> None:
        for argv in (["agents"], ["status"], ["pushes", "list"], ["pushes", "show"],
                     ["pushes", "retry"], ["pushes", "cancel"], ["pushes", "resend"],
                     ["tail"], ["ping"], ["reload-config"],
                     ["logs"], ["push"], ["client", "create"], ["client", "list"],
                     ["client", "revoke"], ["init"], ["db", "upgrade"], ["db", "status"],
                     ["db", "keys"], ["db", "rotate-key"], ["db", "retire-key"],
                     ["demo"]):
            out = io.StringIO()
            with redirect_stdout(out):
                e = self.assertRaises(SystemExit, cli.main, [*argv, "--help"])
            self.assertEqual(e.code, 0, argv)
            self.assertIn("usage: medagent " + " ".join(argv), out.getvalue())


class ThroughAnAgent(TestCase, _CLI):
    """ping, reload-config, logs and a folder push through a real twistd agent."""

    timeout = 90

    def setUp(self) -> Deferred:
        return ensureDeferred(self._setUp())

    async def _setUp(self) -> None:
        self.testcase = self
        self.relay, self.base, _ = procs.in_process_relay(self, "relay-cli-agent-")
        self.admin_creds = await self.relay.authority.create_client("admin")
        self.admin = MedagentClient(reactor, self.base, self.admin_creds["clientId"],
                                    self.admin_creds["clientSecret"])
        self.addCleanup(self.admin.close)
        self.mllp_port = procs.free_port()
        device_proc = procs.python(self, "python-hl7-server", [
            os.path.join(FIXTURES, "hl7", "pyhl7_server.py"), str(self.mllp_port)])
        await device_proc.wait_for("MLLP server on", timeout=20)
        self.device = await self.admin.create(
            {"resourceType": "Device", "url": f"mllp://127.0.0.1:{self.mllp_port}"})
        self.agent = await self.admin.create({
            "resourceType": "Agent", "name": "Lab agent", "status": "active",
            "device": {"reference": f"Device/{self.device['id']}"}})
        creds = await self.relay.authority.create_client("agent", [self.agent["id"]])
        agent_proc = procs.agent_process(self, self.base, creds, self.agent["id"])
        await agent_proc.wait_for(f"Connected to the relay as Agent/{self.agent['id']}",
                                  timeout=30)

    def test_ping_reload_config_logs(self) -> Deferred:
        async def go() -> None:
            dest = f"Device/{self.device['id']}"
            proc = await self.cli("ping", self.agent["id"], dest, "--json")
            self.assertEqual(proc.exit_code, 0, proc.text)
            self.assertEqual(json.loads(proc.text)["destination"], dest)
            proc = await self.cli("ping", self.agent["id"], "mllp://127.0.0.1:1")
            self.assertEqual(proc.exit_code, 1, proc.text)  # not the agent's device: refused
            proc = await self.cli("reload-config", self.agent["id"])
            self.assertEqual(proc.exit_code, 0, proc.text)
            self.assertIn("configuration reloaded", proc.text)
            proc = await self.cli("logs", self.agent["id"], "--limit", "5", "--json")
            self.assertEqual(proc.exit_code, 0, proc.text)
            self.assertIsInstance(json.loads(proc.text), list)
            self.assertLessEqual(len(json.loads(proc.text)), 5)

        return ensureDeferred(go())

    def test_push_a_folder(self) -> Deferred:
        async def go() -> None:
            folder = tempfile.mkdtemp(prefix="medagent-cli-batch-")
            for i in (2, 1, 3):
                with open(os.path.join(folder, f"order{i}.hl7"), "w") as f:
                    f.write(HL7.format(ctrl=f"B{i}"))
            os.mkdir(os.path.join(folder, "sub"))  # not a regular file: not pushed
            dest = f"Device/{self.device['id']}"
            proc = await self.cli("push", self.agent["id"], dest, "--file", folder)
            self.assertEqual(proc.exit_code, 0, proc.text)
            lines = proc.text.splitlines()
            self.assertEqual(lines[:3], [f"[{i}/3] order{i}.hl7 ... delivered"
                                         for i in (1, 2, 3)])
            self.assertEqual(lines[3], "3 files: 3 delivered, 0 rejected, 0 failed")
            delivered = await self.admin.request_json(
                "GET", "/fhir/R4/AgentPush", params={"agent": self.agent["id"],
                                                     "state": "delivered"})
            self.assertEqual(delivered["total"], 3)
            # one message from standard input (--file -)
            stdin = procs.spawn(self, "cli-stdin", [
                "/bin/sh", "-c", f'exec "{sys.executable}" -m medagent.cli push '
                f'{self.agent["id"]} {dest} --file - < "{folder}/order2.hl7"'], env={
                    "MEDAGENT_RELAY": self.base,
                    "MEDAGENT_CLIENT_ID": self.admin_creds["clientId"],
                    "MEDAGENT_CLIENT_SECRET": self.admin_creds["clientSecret"]})
            await stdin.ended
            self.assertEqual(stdin.exit_code, 0, stdin.text)
            self.assertIn("MSA|AA|B2", stdin.text)
            # one file that cannot be pushed: the others still go, exit 1
            with open(os.path.join(folder, "order4.hl7"), "wb") as f:
                f.write(b"\xff\xfe not utf-8")
            proc = await self.cli("push", self.agent["id"], dest, "--file", folder, "--json")
            self.assertEqual(proc.exit_code, 1, proc.text)
            self.assertIn("[4/4] order4.hl7 ... failed (not UTF-8 text)", proc.text)
            summary = json.loads(proc.text[proc.text.index("{"):])
            self.assertEqual((summary["total"], summary["delivered"], summary["failed"]),
                             (4, 3, 1))
            # a device that answers AE to each: every file rejected, exit 1
            ae_port = procs.free_port()
            ae_proc = procs.python(self, "python-hl7-server-ae", [
                os.path.join(FIXTURES, "hl7", "pyhl7_server.py"), str(ae_port), "AE"])
            await ae_proc.wait_for("MLLP server on", timeout=20)
            os.remove(os.path.join(folder, "order4.hl7"))
            proc = await self.cli("push", self.agent["id"], f"mllp://127.0.0.1:{ae_port}",
                                  "--file", folder)
            self.assertEqual(proc.exit_code, 1, proc.text)
            self.assertIn("[1/3] order1.hl7 ... rejected (AE)", proc.text)
            self.assertIn("3 files: 0 delivered, 3 rejected, 0 failed", proc.text)
            # a single push NAKed: exit 1 too, the ACK still printed
            proc = await self.cli("push", self.agent["id"], f"mllp://127.0.0.1:{ae_port}",
                                  "--file", os.path.join(folder, "order1.hl7"))
            self.assertEqual(proc.exit_code, 1, proc.text)
            self.assertIn("MSA|AE|B1", proc.text)
            self.assertIn("the device answered AE", proc.text)

        return ensureDeferred(go())
