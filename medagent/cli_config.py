"""
Where the ``medagent`` command finds the relay URL and its credentials.

In order, first found wins, for each of relay, client id and client secret:

  1. the flags ``--relay``, ``--client-id``, ``--client-secret``;
  2. the profile named by ``--profile NAME`` (a section of ``profiles.ini``);
  3. the environment: ``MEDAGENT_RELAY``, ``MEDAGENT_CLIENT_ID``, ``MEDAGENT_CLIENT_SECRET``
     or ``MEDAGENT_CLIENT_SECRET_FILE`` (a file holding the secret);
  4. the relay defaults to ``http://127.0.0.1:8103``.

A secret on the command line is visible to every user of the machine (``ps``), so the
environment, a secret file or a profile are the ways meant for scripts.  The profile file is
``$MEDAGENT_PROFILES`` or ``~/.config/medagent/profiles.ini``::

    [lab]
    relay = https://relay.example.org
    client_id = ...
    client_secret = ...          ; or client_secret_file = /path/to/secret

It holds a secret, so it is refused when group or others may read it (as ssh does).
"""

from __future__ import annotations

import argparse
import configparser
import os
import stat
from dataclasses import dataclass
from typing import Mapping

DEFAULT_RELAY = "http://127.0.0.1:8103"


class ConfigError(Exception):
    """Bad or missing configuration: the command exits with 2 and this message."""


@dataclass(frozen=True)
class Credentials:
    relay: str
    client_id: str | None
    client_secret: str | None


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    """The flags every command that calls the relay takes."""
    g = parser.add_argument_group("relay and credentials (flags > --profile > environment)")
    g.add_argument("--relay", default=None, help=f"relay base URL (default {DEFAULT_RELAY})")
    g.add_argument("--client-id", default=None)
    g.add_argument("--client-secret", default=None,
                   help="visible to other users in ps; prefer MEDAGENT_CLIENT_SECRET(_FILE)")
    g.add_argument("--profile", default=None,
                   help="a section of $MEDAGENT_PROFILES or ~/.config/medagent/profiles.ini")


def profiles_path(env: Mapping[str, str]) -> str:
    if env.get("MEDAGENT_PROFILES"):
        return env["MEDAGENT_PROFILES"]
    home = env.get("HOME") or os.path.expanduser("~")
    return os.path.join(home, ".config", "medagent", "profiles.ini")


def _read_private(path: str, what: str) -> str:
    """The text of C{path}, refused when group or others may read or write it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise ConfigError(f"cannot open {what} {path}: {e.strerror}")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{what} {path} is not a regular file")
        if st.st_mode & 0o077:
            raise ConfigError(f"{what} {path} is accessible by group or others "
                              f"(mode {stat.S_IMODE(st.st_mode):o}); chmod 600 it")
        with os.fdopen(fd, encoding="utf-8") as f:
            fd = -1
            return f.read(1 << 20)
    finally:
        if fd >= 0:
            os.close(fd)


def _profile(name: str, env: Mapping[str, str]) -> dict[str, str]:
    path = profiles_path(env)
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(_read_private(path, "profile file"), source=path)
    except configparser.Error as e:
        raise ConfigError(f"profile file {path} is not valid: {type(e).__name__}")
    if not parser.has_section(name):
        raise ConfigError(f"no profile [{name}] in {path}")
    section = dict(parser.items(name))
    unknown = set(section) - {"relay", "client_id", "client_secret", "client_secret_file"}
    if unknown:
        raise ConfigError(f"profile [{name}] in {path}: unknown keys {', '.join(sorted(unknown))}")
    return section


def _secret_file(path: str) -> str:
    secret = _read_private(path, "secret file").strip()
    if not secret:
        raise ConfigError(f"secret file {path} is empty")
    return secret


def resolve(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Credentials:
    """The relay and credentials of a command, from its flags, profile and environment."""
    env = os.environ if env is None else env
    prof = _profile(args.profile, env) if getattr(args, "profile", None) else {}
    relay = (getattr(args, "relay", None) or prof.get("relay") or env.get("MEDAGENT_RELAY")
             or DEFAULT_RELAY)
    client_id = (getattr(args, "client_id", None) or prof.get("client_id")
                 or env.get("MEDAGENT_CLIENT_ID") or None)
    secret = getattr(args, "client_secret", None)
    if not secret and prof.get("client_secret"):
        secret = prof["client_secret"]
    if not secret and prof.get("client_secret_file"):
        secret = _secret_file(os.path.expanduser(prof["client_secret_file"]))
    if not secret and env.get("MEDAGENT_CLIENT_SECRET"):
        secret = env["MEDAGENT_CLIENT_SECRET"]
    if not secret and env.get("MEDAGENT_CLIENT_SECRET_FILE"):
        secret = _secret_file(env["MEDAGENT_CLIENT_SECRET_FILE"])
    if not relay.startswith(("http://", "https://")):
        raise ConfigError(f"relay must be an http:// or https:// URL, not {relay!r}")
    return Credentials(relay.rstrip("/"), client_id, secret or None)


def require(creds: Credentials) -> Credentials:
    """C{creds}, or L{ConfigError} when the client id or secret is missing."""
    if not creds.client_id or not creds.client_secret:
        raise ConfigError("no client credentials: give --client-id/--client-secret, "
                          "MEDAGENT_CLIENT_ID and MEDAGENT_CLIENT_SECRET(_FILE), or --profile")
    return creds
