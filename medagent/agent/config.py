"""
Agent settings: command line, or Medplum's ``agent.properties`` (``key=value`` lines; values
may themselves contain ``=``).
"""

from __future__ import annotations

import ipaddress
import os
from typing import Mapping
from urllib.parse import urlsplit

import attr

from medagent.agent.allow import DestinationPolicy, PolicyError

#: agent.properties keys (Medplum's names) → our option names
PROPERTY_KEYS = {
    "baseUrl": "relay",
    "clientId": "client_id",
    "clientSecret": "client_secret",
    "agentId": "agent_id",
    "clientSecretFile": "client_secret_file",
    "allowDestinations": "allow_destinations",
    "tlsCa": "tls_ca",
    "tlsCert": "tls_cert",
    "tlsKey": "tls_key",
    "logLevel": "log_level",
    "dataDir": "data_dir",
}


# The agent's defaults, one place each: used by AgentConfig, medagent.agent.tap (twistd
# options) and tac/agent.tac.
DEFAULT_DATA_DIR = "./agent-data"
DEFAULT_HEARTBEAT_INTERVAL = 10.0
DEFAULT_SYNCHRONOUS = "NORMAL"
#: the range --heartbeat-interval (or the properties file) may ask for, seconds
HEARTBEAT_RANGE = (1.0, 300.0)


class ConfigError(ValueError):
    """A setting that is missing or wrong, said in words for the person starting the agent."""


@attr.s(frozen=True, auto_attribs=True)
class AgentConfig:
    relay: str
    client_id: str
    client_secret: str
    agent_id: str
    data_dir: str = DEFAULT_DATA_DIR
    log_level: str = "info"
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL
    #: SQLite durability of the queue: NORMAL survives kill -9, FULL also power loss
    synchronous: str = DEFAULT_SYNCHRONOUS
    #: confirmed answers (and their payloads) are kept this long, then deleted
    retention_seconds: float = 86400.0
    #: plain http:// to a relay that is not on this machine was asked for explicitly
    insecure: bool = False
    #: comma-separated patterns of the devices this agent may connect to (medagent.agent.allow)
    allow_destinations: str = ""
    #: PEM files for mllps:// (trust root; client certificate and key)
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None


def is_loopback_host(host: str) -> bool:
    """True for names and addresses that never leave this machine."""
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_secret_file(path: str) -> str:
    """
    A secret from a file (first line, whitespace stripped): secrets on a command line are
    visible to every user of the machine in C{ps}.
    """
    try:
        with open(path, encoding="utf-8") as f:
            secret = f.readline().strip()
    except OSError as e:
        raise ConfigError(f"Cannot read the client secret file {path}: {e.strerror}")
    if not secret:
        raise ConfigError(f"The client secret file {path} is empty")
    return secret


def parse_properties(text: str) -> dict[str, str]:
    """
    Lines of ``key=value``; ``#``/``!`` comments; the value is everything after the first
    ``=``.
    """
    out: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#!":
            continue
        if "=" not in line:
            raise ConfigError(f"agent.properties line {number}: expected key=value")
        key, _, value = line.partition("=")
        out[key.strip()] = value.strip()
    return out


def load_config(options: Mapping[str, object]) -> AgentConfig:
    """Command-line options win over the properties file."""
    values: dict[str, object] = {}
    path = options.get("config")
    if path:
        try:
            with open(str(path), encoding="utf-8") as f:
                props = parse_properties(f.read())
        except OSError as e:
            raise ConfigError(f"Cannot read {path}: {e.strerror}")
        for key, value in props.items():
            if key in PROPERTY_KEYS:
                values[PROPERTY_KEYS[key]] = value
    for key in ("relay", "client_id", "client_secret", "client_secret_file", "agent_id",
                "data_dir", "log_level", "heartbeat_interval", "synchronous",
                "allow_destinations", "tls_ca", "tls_cert", "tls_key"):
        if options.get(key) not in (None, ""):
            values[key] = options[key]
    env = {"relay": "MEDAGENT_RELAY", "client_id": "MEDAGENT_CLIENT_ID",
           "client_secret": "MEDAGENT_CLIENT_SECRET", "agent_id": "MEDAGENT_AGENT_ID",
           "client_secret_file": "MEDAGENT_CLIENT_SECRET_FILE"}
    for key, var in env.items():
        if key not in values and os.environ.get(var):
            values[key] = os.environ[var]
    secret_file = values.pop("client_secret_file", None)
    if secret_file and not values.get("client_secret"):
        values["client_secret"] = read_secret_file(str(secret_file))
    missing = [k for k in ("relay", "client_id", "client_secret", "agent_id") if not values.get(k)]
    if missing:
        flags = ", ".join("--" + m.replace("_", "-") for m in missing)
        raise ConfigError(f"Missing agent settings: {flags} (or set them in agent.properties;"
                          " the secret best in --client-secret-file or MEDAGENT_CLIENT_SECRET)")
    relay = str(values["relay"])
    if not relay.startswith(("http://", "https://")):
        raise ConfigError(f"--relay must be an http:// or https:// URL, not {relay!r}")
    values["insecure"] = bool(options.get("insecure"))
    host = urlsplit(relay).hostname or ""
    if relay.startswith("http://") and not is_loopback_host(host) and not values["insecure"]:
        raise ConfigError(
            f"Refusing plain http:// to {host}: the client secret and patient data would "
            "cross the network unencrypted. Use https://, or --insecure if you really mean it.")
    if "heartbeat_interval" in values:
        raw = values["heartbeat_interval"]
        try:
            if not isinstance(raw, (str, int, float)):
                raise TypeError(type(raw).__name__)
            interval = float(raw)
        except (TypeError, ValueError):
            raise ConfigError("--heartbeat-interval must be a number of seconds")
        if not HEARTBEAT_RANGE[0] <= interval <= HEARTBEAT_RANGE[1]:
            raise ConfigError("--heartbeat-interval must be between 1 and 300 seconds")
        values["heartbeat_interval"] = interval
    try:
        DestinationPolicy.from_setting(str(values.get("allow_destinations") or ""))
    except PolicyError as e:
        raise ConfigError(str(e))
    # Keys and values come from the table above and the checks here: mypy cannot follow a
    # dict[str, object] into the keyword arguments.
    return AgentConfig(**values)  # type: ignore[arg-type]
