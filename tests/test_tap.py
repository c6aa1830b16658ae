"""
The composition roots: twistd Options (medagent.relay.tap, medagent.agent.tap), the plugins,
makeService without I/O, the .tac files, and the relay's ordered, waited-for stop.
"""

from __future__ import annotations

import inspect
import os
import shutil
import stat
import tempfile
from typing import Any

from twisted.application import service
from twisted.application.service import IServiceMaker
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.testing import MemoryReactor
from twisted.logger import globalLogPublisher
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from medagent.agent import tap as agent_tap
from medagent.agent.config import DEFAULT_DATA_DIR, DEFAULT_HEARTBEAT_INTERVAL
from medagent.options import argv_from_env
from medagent.relay import tap as relay_tap
from medagent.relay.auth import ADMIN, Principal
from medagent.storage.sqlite import DatabaseStopped
from medagent.relay.service import (DEFAULT_DATA, DEFAULT_LISTEN, DEFAULT_MAX_BODY,
                                    DEFAULT_MAX_MESSAGE, Listener,
                                    RelayService)
from tests.peerenv import ROOT

HL7 = "MSH|^~\\&|A|B|C|D|20240101||ADT^A01|{ctrl}|P|2.5\rPID|1"


def relay_options(*argv: str) -> relay_tap.Options:
    options = relay_tap.Options()
    options.parseOptions(list(argv))
    return options


def agent_options(*argv: str) -> agent_tap.Options:
    options = agent_tap.Options()
    options.parseOptions(list(argv))
    return options


def empty_folder(testcase: Any) -> str:
    folder = tempfile.mkdtemp(prefix="medagent-tap-")
    testcase.addCleanup(shutil.rmtree, folder, True)
    return folder


class RelayOptionsTests(SynchronousTestCase):
    def test_defaults_are_the_service_defaults(self) -> None:
        options = relay_options()
        self.assertEqual(options["listen"], [DEFAULT_LISTEN])
        self.assertEqual(options["data"], DEFAULT_DATA)
        self.assertEqual((options["max-body"], options["max-message"]),
                         (DEFAULT_MAX_BODY, DEFAULT_MAX_MESSAGE))
        kwargs = options.service_kwargs()
        signature = inspect.signature(RelayService.__init__).parameters
        for name, value in kwargs.items():
            default = signature[name].default
            if name == "listen":
                default = [default]
            elif name == "webhook_allow":
                default = list(default)
            self.assertEqual(value, default, name)
        # every setting of RelayService is an option (but the tests' retry knob)
        self.assertEqual(set(signature) - set(kwargs),
                         {"self", "reactor", "subscription_retry_base"})

    def test_numbers_are_coerced(self) -> None:
        options = relay_options("--max-body", "2048", "--max-message", "4096",
                                "--heartbeat-interval", "2.5", "--token-lifetime", "600",
                                "--retention-days", "0.5", "--bot-workers", "3",
                                "--bot-memory-mb", "128", "--bot-time-limit", "4",
                                "--synchronous", "full")
        kwargs = options.service_kwargs()
        self.assertEqual((kwargs["max_body"], kwargs["max_message_size"]), (2048, 4096))
        self.assertIsInstance(kwargs["max_body"], int)
        self.assertEqual(kwargs["heartbeat_interval"], 2.5)
        self.assertEqual((kwargs["token_lifetime"], kwargs["bot_workers"],
                          kwargs["bot_memory_mb"]), (600, 3, 128))
        self.assertEqual((kwargs["retention_days"], kwargs["bot_time_limit"]), (0.5, 4.0))
        self.assertEqual(kwargs["synchronous"], "FULL")

    def test_bad_values_are_usage_errors(self) -> None:
        for argv in (["--max-body", "lots"], ["--max-body", "10"], ["--max-body", "1e3"],
                     ["--max-message", "-1"], ["--heartbeat-interval", "nan"],
                     ["--heartbeat-interval", "0"], ["--heartbeat-interval", "1e309"],
                     ["--token-lifetime", "1.5"], ["--token-lifetime", "0"],
                     ["--retention-days", "0"], ["--retention-days", "inf"],
                     ["--bot-workers", "0"], ["--bot-workers", "two"],
                     ["--bot-memory-mb", "1"], ["--bot-time-limit", "301"],
                     ["--synchronous", "sometimes"], ["--base-url", "relay.example.org"],
                     ["--bot-base-url", "ftp://x"], ["--webhook-allow", "http://ok:1,nope"],
                     ["--listen", ""], ["--listen", "tcp:0:interface=::1"],
                     ["--listen", "nosuchkind:1"], ["--bot-user", ""], ["--no-such-option", "1"]):
            with self.assertRaises(usage.UsageError, msg=argv):
                relay_options(*argv)

    def test_listen_repeats(self) -> None:
        options = relay_options("--listen", "tcp:0:interface=127.0.0.1", "-l",
                                "tcp:0:interface=\\:\\:1")
        self.assertEqual(options["listen"], ["tcp:0:interface=127.0.0.1",
                                             "tcp:0:interface=\\:\\:1"])

    def test_webhook_allow_and_flags(self) -> None:
        options = relay_options("--webhook-allow", "http://127.0.0.1:9000, https://h.test",
                                "--bots-unsandboxed")
        kwargs = options.service_kwargs()
        self.assertEqual(kwargs["webhook_allow"], ["http://127.0.0.1:9000", "https://h.test"])
        self.assertIs(kwargs["bots_unsandboxed"], True)
        self.assertIs(relay_options().service_kwargs()["bots_unsandboxed"], False)

    def test_from_the_environment(self) -> None:
        options = relay_tap.options_from_env({
            "MEDAGENT_DATA": "/srv/relay", "MEDAGENT_MAX_BODY": "4096",
            "MEDAGENT_LISTEN": "tcp:0:interface=127.0.0.1  tcp:0:interface=\\:\\:1",
            "MEDAGENT_BOTS_UNSANDBOXED": "1", "MEDAGENT_BASE_URL": "",
            "MEDAGENT_WEBHOOK_ALLOW": "http://127.0.0.1:9000", "HOME": "/root"})
        self.assertEqual(options["data"], "/srv/relay")
        self.assertEqual(options["max-body"], 4096)
        self.assertEqual(options["listen"],
                         ["tcp:0:interface=127.0.0.1", "tcp:0:interface=\\:\\:1"])
        self.assertIs(options["bots-unsandboxed"], True)
        self.assertIsNone(options["base-url"])
        self.assertEqual(relay_tap.options_from_env({})["listen"], [DEFAULT_LISTEN])
        for bad in ({"MEDAGENT_MAX_BODY": "big"}, {"MEDAGENT_BOTS_UNSANDBOXED": "maybe"}):
            with self.assertRaises(usage.UsageError):
                relay_tap.options_from_env(bad)

    def test_argv_from_env_names(self) -> None:
        self.assertEqual(argv_from_env(relay_tap.Options, {"MEDAGENT_BOT_TIME_LIMIT": "3",
                                                           "MEDAGENT_BOTS_UNSANDBOXED": "no"}),
                         ["--bot-time-limit=3"])


class AgentOptionsTests(SynchronousTestCase):
    REQUIRED = ("--relay", "https://relay.test", "--client-id", "c", "--client-secret", "s",
                "--agent-id", "a")

    def test_defaults_come_from_the_config(self) -> None:
        options = agent_options(*self.REQUIRED)
        self.assertIsNone(options["heartbeat-interval"])  # agent.properties may set it
        config = agent_tap.agent_config(options)
        self.assertEqual((config.data_dir, config.heartbeat_interval),
                         (DEFAULT_DATA_DIR, DEFAULT_HEARTBEAT_INTERVAL))
        self.assertIs(config.insecure, False)

    def test_numbers_are_coerced_and_checked(self) -> None:
        options = agent_options(*self.REQUIRED, "--heartbeat-interval", "2.5",
                                "--synchronous", "full")
        self.assertEqual(options["heartbeat-interval"], 2.5)
        config = agent_tap.agent_config(options)
        self.assertEqual((config.heartbeat_interval, config.synchronous), (2.5, "FULL"))
        for argv in (["--heartbeat-interval", "x"], ["--heartbeat-interval", "0"],
                     ["--heartbeat-interval", "nan"], ["--synchronous", "never"]):
            with self.assertRaises(usage.UsageError, msg=argv):
                agent_options(*self.REQUIRED, *argv)

    def test_missing_settings_are_a_usage_error(self) -> None:
        with self.assertRaises(usage.UsageError):
            agent_tap.makeService(agent_options("--relay", "https://relay.test"),
                                  MemoryReactor())

    def test_from_the_environment(self) -> None:
        options = agent_tap.options_from_env({
            "MEDAGENT_RELAY": "http://relay.example.org", "MEDAGENT_INSECURE": "true",
            "MEDAGENT_CLIENT_ID": "c", "MEDAGENT_CLIENT_SECRET": "s",
            "MEDAGENT_AGENT_ID": "a", "MEDAGENT_DATA": "/srv/agent",
            "MEDAGENT_HEARTBEAT_INTERVAL": "5"})
        config = agent_tap.agent_config(options)
        self.assertEqual((config.relay, config.insecure, config.data_dir,
                          config.heartbeat_interval),
                         ("http://relay.example.org", True, "/srv/agent", 5.0))


class PluginTests(SynchronousTestCase):
    def test_both_tapnames_point_at_the_tap_modules(self) -> None:
        import twisted.plugins

        makers = {m.tapname: m for m in getPlugins(IServiceMaker, twisted.plugins)}
        self.assertIn("medagent-relay", makers)
        self.assertIn("medagent-agent", makers)
        self.assertIs(makers["medagent-relay"].options, relay_tap.Options)
        self.assertIs(makers["medagent-agent"].options, agent_tap.Options)


class MakeServiceTests(SynchronousTestCase):
    def test_relay_tree_without_touching_disk(self) -> None:
        data = os.path.join(empty_folder(self), "relay")
        memory = MemoryReactor()
        relay = relay_tap.makeService(relay_options(
            "--data", data, "--listen", "tcp:0:interface=127.0.0.1",
            "--listen", "tcp:0:interface=\\:\\:1", "--max-body", "2048"), memory)
        self.assertFalse(os.path.exists(data))
        self.assertEqual(memory.tcpServers, [])
        listeners = [s for s in relay if isinstance(s, Listener)]
        self.assertEqual([lst.description for lst in listeners],
                         ["tcp:0:interface=127.0.0.1", "tcp:0:interface=\\:\\:1"])
        # every listener serves the one site, through the connection limits
        self.assertTrue(all(lst.factory is relay.limits and lst.factory.wrappedFactory
                            is relay.site for lst in listeners))
        self.assertEqual(relay.site.max_body, 2048)
        # before twistd sheds privileges: the folder (0700), the key, the ports; no database
        relay.privilegedStartService()
        self.assertEqual(sorted(os.listdir(data)), ["token.key"])
        self.assertEqual(stat.S_IMODE(os.stat(data).st_mode), 0o700)
        self.assertEqual([(port, interface) for port, _, _, interface in memory.tcpServers],
                         [(0, "127.0.0.1"), (0, "::1")])
        self.assertEqual(relay.urls(), ["http://127.0.0.1:0", "http://[::1]:0"])
        self.successResultOf(relay.stopService())
        self.assertEqual(sorted(os.listdir(data)), ["token.key"])

    def test_relay_default_constructor_does_no_io(self) -> None:
        folder = empty_folder(self)
        RelayService(MemoryReactor(), data_dir=os.path.join(folder, "x"))
        self.assertEqual(os.listdir(folder), [])

    def test_agent_tree_without_touching_disk(self) -> None:
        data = os.path.join(empty_folder(self), "agent")
        agent = agent_tap.makeService(agent_options(
            "--relay", "https://relay.test", "--client-id", "c", "--client-secret", "s",
            "--agent-id", "a", "--data", data), MemoryReactor())
        self.assertEqual(agent.config.data_dir, data)
        self.assertFalse(os.path.exists(data))


class ListenerTests(SynchronousTestCase):
    def test_says_its_address_once_started(self) -> None:
        """twistd binds in privilegedStartService; "listening" is said once started (the
        relay's listeners start last), with the address the port got."""
        said: list[str] = []

        def observer(event: dict[str, Any]) -> None:
            if event.get("log_format", "").startswith("medagent relay listening on"):
                said.append(event["url"])

        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        memory = MemoryReactor()
        listener = Listener(memory, "tcp:0:interface=127.0.0.1", object())
        listener.privilegedStartService()
        self.assertEqual((len(memory.tcpServers), said), (1, []))
        listener.startService()
        self.assertEqual((len(memory.tcpServers), said), (1, ["http://127.0.0.1:0"]))
        self.successResultOf(listener.stopService())
        self.assertIsNone(listener.port)


class TacTests(SynchronousTestCase):
    def load(self, name: str, env: dict[str, str]) -> Any:
        saved = {k: v for k, v in os.environ.items() if k.startswith("MEDAGENT_")}
        for key in saved:
            del os.environ[key]
        os.environ.update(env)

        def restore() -> None:
            for key in [k for k in os.environ if k.startswith("MEDAGENT_")]:
                del os.environ[key]
            os.environ.update(saved)

        self.addCleanup(restore)
        application = service.loadApplication(os.path.join(ROOT, "tac", name), "python")
        return list(service.IServiceCollection(application))[0]

    def test_relay_tac_exposes_every_setting(self) -> None:
        data = os.path.join(empty_folder(self), "relay")
        relay = self.load("relay.tac", {"MEDAGENT_DATA": data,
                                        "MEDAGENT_LISTEN": "tcp:0:interface=127.0.0.1",
                                        "MEDAGENT_HEARTBEAT_INTERVAL": "7",
                                        "MEDAGENT_BOT_WORKERS": "1",
                                        "MEDAGENT_BOTS_UNSANDBOXED": "1"})
        self.assertIsInstance(relay, RelayService)
        self.assertEqual(relay.listen, ["tcp:0:interface=127.0.0.1"])
        self.assertEqual((relay.hub.heartbeat_interval, relay.bot_pool.size), (7.0, 1))
        self.assertFalse(os.path.exists(data))
        with self.assertRaises(usage.UsageError):
            self.load("relay.tac", {"MEDAGENT_MAX_BODY": "huge"})

    def test_agent_tac(self) -> None:
        data = os.path.join(empty_folder(self), "agent")
        folder = empty_folder(self)
        props = os.path.join(folder, "agent.properties")
        with open(props, "w") as f:
            f.write("baseUrl=https://relay.test\nclientId=c\nclientSecret=s\nagentId=a\n")
        agent = self.load("agent.tac", {"MEDAGENT_CONFIG": props, "MEDAGENT_DATA": data,
                                        "MEDAGENT_SYNCHRONOUS": "FULL"})
        self.assertEqual((agent.config.agent_id, agent.config.data_dir,
                          agent.config.synchronous), ("a", data, "FULL"))
        self.assertFalse(os.path.exists(data))


class RelayLifecycleTests(TestCase):
    """The real reactor, loopback, a temp folder."""

    timeout = 60

    def test_start_makes_the_folder_and_says_its_address(self) -> Deferred:
        async def go() -> None:
            data = os.path.join(empty_folder(self), "relay")
            relay = RelayService(reactor, data_dir=data, listen="tcp:0:interface=127.0.0.1",
                                 bots_unsandboxed=True, bot_workers=1)
            self.assertFalse(os.path.exists(data))
            said: list[str] = []

            def observer(event: dict[str, Any]) -> None:
                if event.get("log_format", "").startswith("medagent relay listening on"):
                    said.append(event["url"])

            globalLogPublisher.addObserver(observer)
            self.addCleanup(globalLogPublisher.removeObserver, observer)
            relay.startService()
            stopped = False
            try:
                self.assertIn("token.key", os.listdir(data))
                [url] = relay.urls()
                self.assertTrue(url.startswith("http://127.0.0.1:"))
                self.assertNotEqual(url, "http://127.0.0.1:0")
                self.assertEqual(said, [url])
                self.assertEqual(relay.bots.base_url, url)  # learnt from the bound port
                await relay.stopService()
                stopped = True
            finally:
                if not stopped:
                    await relay.stopService()

        return ensureDeferred(go())


class ShutdownTests(TestCase):
    """
    A push in flight when the relay stops finishes its database work before the database
    closes (MultiService would close it at once): nothing is lost, no write reaches a stopped
    pool, nothing is logged as an error.
    """

    timeout = 60

    def test_push_in_flight_at_stop(self) -> Deferred:
        async def go() -> None:
            data = os.path.join(empty_folder(self), "relay")
            options = {"data_dir": data, "listen": "tcp:0:interface=127.0.0.1",
                       "bots_unsandboxed": True, "bot_workers": 1}
            relay = RelayService(reactor, **options)
            relay.startService()
            agent = await relay.store.create({"resourceType": "Agent", "name": "lab",
                                              "status": "active"})
            device = await relay.store.create({"resourceType": "Device",
                                               "url": "mllp://127.0.0.1:1"})
            late: list[str] = []
            stop, run = relay.db.stop, relay.db.run

            def stopping() -> None:
                relay.db.run = lambda fn, *a: (late.append(fn.__name__), run(fn, *a))[1]
                stop()

            relay.db.stop = stopping
            admin = Principal("admin-test", ADMIN)
            pushed = ensureDeferred(relay.pushes.push(admin, (agent["id"], None), {
                "destination": f"Device/{device['id']}",
                "contentType": "x-application/hl7-v2+er7", "body": HL7.format(ctrl="S1")}))
            stopped = relay.stopService()  # while the push is reading and writing
            result = await pushed
            await stopped
            self.assertEqual(late, [])
            self.assertFalse(result.waited)
            # a caller that outlives the relay gets a failed Deferred, not a restarted pool
            self.failureResultOf(relay.db.run(lambda conn: None), DatabaseStopped)

            again = RelayService(reactor, **options)
            again.startService()
            try:
                stored = await again.journal.get(result.push.id)
                self.assertEqual((stored.agent_id, stored.state), (agent["id"], "queued"))
            finally:
                await again.stopService()

        return ensureDeferred(go())
