"""
The bot worker process: runs Bot code for the relay, one run at a time, for many runs.

Started by L{medagent.relay.bots.WorkerPool} with a stripped environment, a private temporary
working folder and only stdin/stdout/stderr open.  It speaks one JSON object per line: the
parent writes ``{"type": "run", ...}`` on stdin, the worker answers ``{"type": "result",
...}`` on stdout.  Before the first run it says ``{"type": "ready"}``.

The worker limits itself (address space, file size, open files, no core dumps) and moves
into its own session, so the parent can kill it and anything the bot started as one group.
The bot's ``print`` and logging go to a bounded buffer that comes back with the result; the
real stdout is kept for the protocol only (file descriptor 1 is pointed at stderr, so a bot
that writes to it directly cannot corrupt a reply).

This module imports nothing from Twisted: a worker should start fast and stay small.
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import inspect
import io
import json
import logging
import os
import sys
import time
import traceback
from collections import OrderedDict
from typing import Any, BinaryIO, Mapping

from medagent.contenttypes import HL7_TYPES

#: Bytes of captured output (print, logging, tracebacks) kept per run.
DEFAULT_MAX_LOG = 64 * 1024
CODE_CACHE_SIZE = 32


class BotError(Exception):
    """The bot cannot run as written (no handler, bad return value)."""


class _Capture(io.TextIOBase):
    """A text stream that keeps the first C{limit} characters written to it."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.parts: list[str] = []
        self.size = 0
        self.truncated = False

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        room = self.limit - self.size
        if room > 0:
            part = s[:room]
            self.parts.append(part)
            self.size += len(part)
        if len(s) > max(room, 0):
            self.truncated = True
        return len(s)

    def getvalue(self) -> str:
        text = "".join(self.parts)
        if self.truncated:
            text += "\n[output truncated]"
        return text


class BotEvent(dict):
    """
    What the handler gets as C{event}: a dict (``event["input"]``) that also reads as
    attributes (``event.input``), like Medplum's BotEvent.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def build_ack(self, code: str = "AA", text: str | None = None, error: str | None = None,
                  **kw: Any) -> str:
        """The HL7 v2 acknowledgement of an HL7 input (L{medagent.hl7.message.build_ack})."""
        if (self.get("contentType") or "").split(";")[0].strip().lower() not in HL7_TYPES or \
                not isinstance(self.get("input"), str):
            raise ValueError("build_ack needs an HL7 v2 input (contentType "
                             "x-application/hl7-v2+er7)")
        from medagent.hl7.message import build_ack

        return build_ack(self["input"], code, text, error, **kw)


_codes: OrderedDict[str, Any] = OrderedDict()


def _compile(source: str, name: str) -> Any:
    key = hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest()
    code = _codes.get(key)
    if code is None:
        code = compile(source, name, "exec")
        _codes[key] = code
        while len(_codes) > CODE_CACHE_SIZE:
            _codes.popitem(last=False)
    else:
        _codes.move_to_end(key)
    return code


def serialize(value: Any) -> tuple[str, str | None]:
    """A handler's return value → (resultType, text): ``none``, ``text`` or ``json``."""
    if value is None:
        return "none", None
    if isinstance(value, str):
        return "text", value
    if isinstance(value, (bytes, bytearray)):
        return "text", bytes(value).decode("utf-8", "replace")
    try:
        import hl7  # python-hl7 Message and friends print as ER7

        if isinstance(value, hl7.Container):
            return "text", str(value)
    except ImportError:  # pragma: no cover - hl7 is a dependency
        pass
    try:
        return "json", json.dumps(value, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise BotError(f"The handler returned a {type(value).__name__}, which is neither "
                       f"text nor JSON ({e})") from None


def _bot_traceback(exc: BaseException, filename: str) -> str:
    """The traceback from the bot's own frames on (our wrapper frames left out)."""
    frames = traceback.extract_tb(exc.__traceback__)
    for i, frame in enumerate(frames):
        if frame.filename == filename:
            frames = frames[i:]
            break
    lines = ["Traceback (most recent call last):\n", *traceback.format_list(frames),
             *traceback.format_exception_only(type(exc), exc)]
    return "".join(lines)


def run(request: Mapping[str, Any], max_log: int = DEFAULT_MAX_LOG) -> dict[str, Any]:
    """One bot run: compile (cached), call C{handler(medplum, event)}, serialize."""
    from medagent.botapi import BotClient

    started = time.monotonic()
    capture = _Capture(max_log)
    saved = sys.stdout, sys.stderr
    saved_handlers = list(logging.root.handlers)
    saved_level = logging.root.level
    filename = f"<{request.get('botRef') or 'bot'}>"
    reply: dict[str, Any] = {"type": "result", "id": request.get("id")}
    sys.stdout = sys.stderr = capture
    try:
        code = _compile(request["code"], filename)
        namespace: dict[str, Any] = {"__name__": "bot", "__builtins__": builtins,
                                     "__file__": filename}
        exec(code, namespace)
        handler = namespace.get("handler")
        if not callable(handler):
            raise BotError("The bot defines no handler(medplum, event) function")
        time_limit = float(request.get("timeLimit") or 30.0)
        medplum = BotClient(request.get("baseUrl"), request.get("accessToken"),
                            deadline=started + time_limit,
                            insecure_loopback=bool(request.get("insecureLoopback")))
        event = BotEvent(request.get("event") or {})
        value = handler(medplum, event)
        if inspect.isawaitable(value):
            value = asyncio.run(_await(value))
        result_type, result = serialize(value)
        reply.update(ok=True, resultType=result_type, result=result)
    except MemoryError:
        # Drop what we can before building the reply; the parent retires this worker.
        namespace = {}
        reply.update(ok=False, outcome="memory", fatal=True,
                     error="MemoryError: the bot ran out of memory (worker memory limit)")
    except BotError as e:
        reply.update(ok=False, outcome="invalid", error=str(e))
    except SyntaxError as e:
        reply.update(ok=False, outcome="invalid",
                     error=f"SyntaxError in bot code: {e.msg} (line {e.lineno})")
    except BaseException as e:  # noqa: BLE001 - a bot may raise anything, even SystemExit
        capture.write(_bot_traceback(e, filename))
        reply.update(ok=False, outcome="error", error=_exception_text(e))
    finally:
        sys.stdout, sys.stderr = saved
        logging.root.handlers[:] = saved_handlers
        logging.root.setLevel(saved_level)
    reply["logs"] = capture.getvalue()
    reply["durationMs"] = round((time.monotonic() - started) * 1000.0, 3)
    return reply


async def _await(value: Any) -> Any:
    return await value


def _exception_text(e: BaseException, limit: int = 500) -> str:
    text = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _limits(memory_mb: int) -> None:
    import resource

    def cap(which: int, value: int) -> None:
        soft, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        try:
            resource.setrlimit(which, (value, value if hard == resource.RLIM_INFINITY
                                       else hard))
        except (ValueError, OSError):
            pass

    if memory_mb > 0:
        cap(resource.RLIMIT_AS, memory_mb * 1024 * 1024)
    cap(resource.RLIMIT_CORE, 0)
    cap(resource.RLIMIT_FSIZE, 64 * 1024 * 1024)
    cap(resource.RLIMIT_NOFILE, 256)


def _die_with_parent() -> None:
    """
    Linux: SIGKILL us when the relay dies, even mid-way through a bot's endless loop (a
    relay that is killed cannot kill its workers).  Elsewhere the closed stdin ends us
    between runs.
    """
    parent = os.getppid()
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before we asked
        os._exit(1)


def _open_fds() -> list[int]:
    """The file descriptors open in this process (the listing's own one left out)."""
    if not os.path.isdir("/proc/self/fd"):
        return []
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(name))
        except OSError:
            continue  # the descriptor listdir used, closed by now
        found.append(int(name))
    return sorted(found)


def _claim_stdio() -> tuple[BinaryIO, BinaryIO]:
    """Private copies of stdin/stdout for the protocol; fd 0 ← /dev/null, fd 1 → stderr."""
    proto_in = os.fdopen(os.dup(0), "rb", buffering=1 << 16)
    proto_out = os.fdopen(os.dup(1), "wb", buffering=0)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    sys.stdin = open(os.devnull)
    return proto_in, proto_out


def _encode(message: Mapping[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode("utf-8") + b"\n"


def _send(out: BinaryIO, message: Mapping[str, Any]) -> None:
    _write(out, _encode(message))


def _write(out: BinaryIO, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = out.write(view)
        view = view[n:]


def main(argv: list[str]) -> None:
    inherited = _open_fds()
    memory_mb = int(argv[0]) if argv else 256
    max_message = int(argv[1]) if len(argv) > 1 else 32 * 1024 * 1024
    max_log = int(argv[2]) if len(argv) > 2 else DEFAULT_MAX_LOG
    try:
        os.setsid()  # our own process group: the parent kills the bot's children with us
    except OSError:
        pass
    _die_with_parent()
    _limits(memory_mb)
    proto_in, proto_out = _claim_stdio()
    # Warm the imports a bot is likely to use, so the first run is as fast as the next.
    import importlib

    for module in ("medagent.botapi", "hl7", "medagent.hl7.message", "medagent.hl7.orders"):
        try:
            importlib.import_module(module)
        except ImportError:
            pass  # a bot that needs it will say so when it imports it

    _send(proto_out, {"type": "ready", "pid": os.getpid(), "uid": os.getuid(),
                      "inheritedFds": inherited, "cwd": os.getcwd()})
    while True:
        line = proto_in.readline(max_message + 1)
        if not line:
            return  # the parent closed our stdin: retire
        if len(line) > max_message or not line.endswith(b"\n"):
            _send(proto_out, {"type": "error", "error": "request too large"})
            sys.exit(3)
        try:
            request = json.loads(line)
        except ValueError:
            _send(proto_out, {"type": "error", "error": "request is not JSON"})
            sys.exit(3)
        if request.get("type") != "run":
            _send(proto_out, {"type": "error", "error": "unknown request type",
                              "id": request.get("id")})
            continue
        reply = run(request, max_log)
        try:
            data = _encode(reply)
            if len(data) > max_message:
                reply = {"type": "result", "id": request.get("id"), "ok": False,
                         "outcome": "invalid", "logs": reply.get("logs", "")[:max_log],
                         "error": f"The bot's result is too large ({len(data)} bytes; "
                                  f"limit {max_message})"}
                data = _encode(reply)
        except MemoryError:
            reply = {"type": "result", "id": request.get("id"), "ok": False,
                     "outcome": "memory", "fatal": True,
                     "error": "MemoryError while sending the result"}
            data = _encode(reply)
        _write(proto_out, data)
        if reply.get("fatal"):
            return


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
