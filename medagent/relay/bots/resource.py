"""
What a Bot resource asks of a run: its Python source, its secrets and its time limit; and how
a run's input and answer are typed.  Pure, apart from reading a Binary the code points to.

(What a Bot may read, write and push to is L{medagent.relay.auth.bot_grants}: the token
carries it.)
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any, Mapping

from medagent.contenttypes import JSON_TYPES, TEXT_TYPES
from medagent.fhir import FHIRError
from medagent.jsonsafe import loads as json_loads

MAX_CODE_BYTES = 1024 * 1024


class BotCodeError(Exception):
    """The Bot resource has no usable code; the text says why."""


def _attachment_text(attachment: Any, what: str) -> str | None:
    if not isinstance(attachment, Mapping):
        return None
    data = attachment.get("data")
    if isinstance(data, str) and data:
        try:
            return base64.b64decode(data, validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            raise BotCodeError(f"Bot.{what}.data is not base64 of UTF-8 text")
    return None


def _binary_id(attachment: Any) -> str | None:
    if isinstance(attachment, Mapping) and isinstance(attachment.get("url"), str):
        match = re.fullmatch(r"(?:.*/)?Binary/([A-Za-z0-9\-.]{1,64})", attachment["url"])
        if match:
            return match.group(1)
    return None


async def bot_code(store: Any, bot: Mapping[str, Any]) -> str:
    """
    The Python source of a Bot: ``Bot.code`` (a string), else ``executableCode`` or
    ``sourceCode`` (an Attachment with base64 ``data``, or a ``url`` to a Binary we keep).
    """
    runtime = bot.get("runtimeVersion")
    if runtime not in (None, "", "python", "python3", "medagent"):
        raise BotCodeError(f"Bot runtimeVersion {runtime!r} is not supported: this relay runs "
                           "Python bots (leave runtimeVersion out or set it to 'python')")
    source: str | None = None
    if isinstance(bot.get("code"), str) and bot["code"].strip():
        source = bot["code"]
    else:
        for field in ("executableCode", "sourceCode"):
            source = _attachment_text(bot.get(field), field)
            if source is not None:
                break
            binary_id = _binary_id(bot.get(field))
            if binary_id is not None:
                try:
                    binary = await store.read("Binary", binary_id)
                except FHIRError:
                    raise BotCodeError(f"Bot.{field} points to Binary/{binary_id}, which does "
                                       "not exist")
                source = _attachment_text({"data": binary.get("data")}, field)
                if source is not None:
                    break
    if source is None:
        raise BotCodeError("Bot has no code (set Bot.code, or Bot.executableCode/sourceCode "
                           "with base64 data)")
    if len(source.encode("utf-8")) > MAX_CODE_BYTES:
        raise BotCodeError(f"Bot code larger than {MAX_CODE_BYTES} bytes")
    return source


def bot_secrets(bot: Mapping[str, Any]) -> dict[str, Any]:
    """``Bot.secret[]`` (name + value[x]) → ``{name: setting}``, as Medplum's event.secrets."""
    out: dict[str, Any] = {}
    for entry in bot.get("secret") or []:
        if isinstance(entry, Mapping) and isinstance(entry.get("name"), str):
            out[entry["name"]] = dict(entry)
    return out


def bot_time_limit(bot: Mapping[str, Any], default: float, maximum: float) -> float:
    """``Bot.timeout`` (seconds) when set, capped; else the relay's default."""
    value = bot.get("timeout")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(min(value, maximum))
    return default


def parse_input(content_type: str, text: str) -> Any:
    """JSON content types are given to the bot parsed; anything else as text."""
    if content_type.split(";")[0].strip().lower() in JSON_TYPES:
        try:
            return json_loads(text)  # bounded depth: the text comes from a device or caller
        except ValueError:
            return text
    return text


def answer_type(input_type: str, result_type: str) -> str:
    """Content type of a bot's answer: JSON for JSON results, the input's type for text
    answers to HL7/ASTM, else text/plain."""
    if result_type == "json":
        return "application/json"
    base = input_type.split(";")[0].strip().lower()
    if base in TEXT_TYPES or base.startswith("text/"):
        return input_type
    return "text/plain"
