"""
Agent settings as an attack surface: a relay in clear text, secrets on the command line,
numbers from outside.
"""

from __future__ import annotations

import os
import tempfile

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from medagent.agent.config import ConfigError, is_loopback_host, load_config

BASE = {"client_id": "c", "agent_id": "a"}


class RelaySchemeTests(SynchronousTestCase):
    def test_plain_http_to_a_remote_relay_is_refused(self) -> None:
        for relay in ("http://relay.example.org", "http://relay.example.org:8103/",
                      "http://[2001:db8::1]:8103"):
            with self.assertRaises(ConfigError) as e:
                load_config({**BASE, "client_secret": "s", "relay": relay})
            self.assertIn("https", str(e.exception))
            self.assertNotIn("s3cret", str(e.exception))

    def test_insecure_is_an_explicit_choice(self) -> None:
        config = load_config({**BASE, "client_secret": "s", "relay": "http://relay.example.org",
                              "insecure": True})
        self.assertTrue(config.insecure)

    def test_loopback_and_https_are_fine(self) -> None:
        for relay in ("http://127.0.0.1:8103", "http://localhost:8103", "http://[::1]:8103",
                      "https://relay.example.org"):
            self.assertEqual(load_config({**BASE, "client_secret": "s", "relay": relay}).relay,
                             relay)
        self.assertFalse(is_loopback_host("localhost.example.org"))


class SecretTests(SynchronousTestCase):
    def test_secret_from_a_file(self) -> None:
        fd, path = tempfile.mkstemp()
        self.addCleanup(os.remove, path)
        with os.fdopen(fd, "w") as f:
            f.write("s3cret\n")
        config = load_config({**BASE, "relay": "https://r.test", "client_secret_file": path})
        self.assertEqual(config.client_secret, "s3cret")

    def test_missing_or_empty_secret_file_is_a_clear_error(self) -> None:
        with self.assertRaises(ConfigError):
            load_config({**BASE, "relay": "https://r.test",
                         "client_secret_file": "/nonexistent/secret"})
        fd, path = tempfile.mkstemp()
        os.close(fd)
        self.addCleanup(os.remove, path)
        with self.assertRaises(ConfigError):
            load_config({**BASE, "relay": "https://r.test", "client_secret_file": path})

    def test_secret_from_the_environment(self) -> None:
        os.environ["MEDAGENT_CLIENT_SECRET"] = "from-env"
        self.addCleanup(os.environ.pop, "MEDAGENT_CLIENT_SECRET")
        self.assertEqual(load_config({**BASE, "relay": "https://r.test"}).client_secret,
                         "from-env")


class NumberTests(SynchronousTestCase):
    def test_heartbeat_interval_checked(self) -> None:
        for bad in ("abc", "nan", "0", "1e309", "-5"):
            with self.assertRaises(ConfigError):
                load_config({**BASE, "client_secret": "s", "relay": "https://r.test",
                             "heartbeat_interval": bad})


class PluginTests(SynchronousTestCase):
    def test_bad_settings_are_a_usage_error_not_a_traceback(self) -> None:
        from twisted.plugins.medagent_plugins import agent as maker

        options = maker.options()
        options.parseOptions(["--relay", "http://relay.example.org", "--client-id", "c",
                              "--client-secret-file", "/nonexistent", "--agent-id", "a"])
        with self.assertRaises(usage.UsageError):
            maker.makeService(options)
