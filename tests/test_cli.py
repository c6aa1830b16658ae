"""
The ``medagent`` command: where it finds the relay and credentials (unit), and every
operator command as a real subprocess against an in-process relay and, for push and ping, a
real twistd agent and a python-hl7 MLLP listener (all on loopback).
"""

from __future__ import annotations

import argparse
import os
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from medagent.cli_config import ConfigError, Credentials, require, resolve


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
