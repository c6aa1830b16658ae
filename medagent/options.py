# -*- test-case-name: tests.test_tap -*-
"""
Pieces shared by the relay's and the agent's twistd options (L{medagent.relay.tap},
L{medagent.agent.tap}): range-checked coercions (a bad value becomes a L{usage.UsageError}
with the reason, never a traceback) and settings from C{MEDAGENT_*} environment variables
for the ``.tac`` files, parsed by the same L{usage.Options}.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

from twisted.python import usage

#: SQLite's PRAGMA synchronous values (L{medagent.storage.sqlite.database.Database})
SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")


def _shown(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def number(kind: type, low: float, high: float, unit: str = "") -> Callable[[str], Any]:
    """A coercion that parses C{kind} (int or float) and refuses values outside [low, high]
    (NaN and infinities included)."""

    def coerce(text: str) -> Any:
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise ValueError(f"{text!r} is not a{'n integer' if kind is int else ' number'}")
        if not math.isfinite(value) or not low <= value <= high:
            raise ValueError(f"{text!r} is not between {_shown(low)} and {_shown(high)}{unit}")
        return value

    coerce.coerceDoc = (  # type: ignore[attr-defined]
        f"Between {_shown(low)} and {_shown(high)}{unit}.")
    return coerce


def synchronous(text: str) -> str:
    value = text.strip().upper()
    if value not in SYNCHRONOUS_MODES:
        raise ValueError(f"{text!r} is not one of {', '.join(SYNCHRONOUS_MODES)}")
    return value


synchronous.coerceDoc = "NORMAL survives kill -9, FULL also power loss."  # type: ignore


def http_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{text!r} is not an http:// or https:// URL")
    return text


http_url.coerceDoc = "An http:// or https:// URL."  # type: ignore[attr-defined]


def endpoint(text: str) -> str:
    """A server endpoint string (e.g. ``tcp:9465:interface=127.0.0.1``), parsed, not bound."""
    from twisted.internet import endpoints

    try:
        endpoints.serverFromString(None, text)  # parse only
    except Exception as e:
        raise ValueError(f"{text!r} is not an endpoint string "
                         f"(e.g. tcp:9465:interface=127.0.0.1): {e}")
    return text


endpoint.coerceDoc = "An endpoint string."  # type: ignore[attr-defined]

LOG_FORMATS = ("text", "json")


def log_format(text: str) -> str:
    if text not in LOG_FORMATS:
        raise ValueError(f"must be one of {', '.join(LOG_FORMATS)}")
    return text


log_format.coerceDoc = "text or json."  # type: ignore[attr-defined]

def operations_options(metrics_example: str) -> list[list[Any]]:
    """The operations options both services take: ``--metrics`` and ``--log-format``."""
    return [
        ["metrics", None, None,
         f"Endpoint serving Prometheus /metrics, e.g. {metrics_example} (default: off)",
         endpoint],
        ["log-format", None, "text",
         "text (twistd's) or json (one JSON object a line on stdout; run with -n)",
         log_format],
    ]


def env_name(option: str) -> str:
    """C{max-body} -> C{MEDAGENT_MAX_BODY}."""
    return "MEDAGENT_" + option.upper().replace("-", "_")


def argv_from_env(options_class: type[usage.Options], environ: Mapping[str, str],
                  repeatable: Mapping[str, str] | None = None) -> list[str]:
    """
    A command line for C{options_class} from C{MEDAGENT_*} variables: ``--max-body`` is
    ``MEDAGENT_MAX_BODY``; a flag is on when its variable is ``1``/``true``/``yes``/``on``
    (off: ``0``/``false``/``no``/``off``/empty); a repeatable option (C{repeatable}: its
    name to a separator) takes several values from one variable.  Unset or empty variables
    are left out, so the Options' defaults apply.
    """
    repeatable = dict(repeatable or {})
    argv: list[str] = []
    names = [(p[0], False) for p in getattr(options_class, "optParameters", [])]
    names += [(f[0], True) for f in getattr(options_class, "optFlags", [])]
    names += [(name, False) for name in repeatable]
    for name, flag in names:
        value = environ.get(env_name(name))
        if value is None or value.strip() == "":
            continue
        if flag:
            word = value.strip().lower()
            if word in ("1", "true", "yes", "on"):
                argv.append(f"--{name}")
            elif word not in ("0", "false", "no", "off"):
                raise usage.UsageError(f"{env_name(name)} must be 1 or 0, not {value!r}")
        elif name in repeatable:
            argv += [arg for part in value.split(repeatable[name]) if part.strip()
                     for arg in (f"--{name}", part.strip())]
        else:
            argv.append(f"--{name}={value}")
    return argv
