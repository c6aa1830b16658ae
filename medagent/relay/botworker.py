"""
The bot worker process: a zygote that forks a fresh, sandboxed process for every Bot run.

Started by L{medagent.relay.bots.WorkerPool} with a stripped environment, a private temporary
working folder and only stdin/stdout/stderr open.  It speaks one JSON object per line: the
relay writes ``{"type": "run", ...}`` on stdin, the run's supervisor answers ``{"type":
"result", ...}`` on stdout, and the zygote adds ``{"type": "runEnded"}`` once that supervisor
is gone.  Before the first run the zygote says ``{"type": "ready", "sandbox": {...}}`` with
what a probe run saw from inside the sandbox (the relay refuses bots when it is not sound).

How a run is isolated is described below (the zygote, the run supervisor and the sandbox);
docs/security.md says what a bot can reach.  The bot's ``print`` and logging go to a bounded
buffer that comes back with the result; its stdout is /dev/null, so a bot that writes to a
descriptor directly cannot corrupt a reply.

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
import re
import sys
import time
import traceback
from collections import OrderedDict
from typing import Any, Mapping, Sequence

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
    frames: Sequence[traceback.FrameSummary] = traceback.extract_tb(exc.__traceback__)
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
                            insecure_loopback=bool(request.get("insecureLoopback")),
                            unix_socket=request.get("apiSocket"))
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
        reply.update(ok=False, outcome="invalid", errorType="SyntaxError", errorLine=e.lineno,
                     error=f"SyntaxError in bot code: {e.msg} (line {e.lineno})")
    except BaseException as e:  # noqa: BLE001 - a bot may raise anything, even SystemExit
        capture.write(_bot_traceback(e, filename))
        line = _bot_line(e, filename)
        # ``error`` goes to audit trails and agents: the type and line, never the text (an
        # exception message can quote the input).  ``errorText`` is for the admin only.
        reply.update(ok=False, outcome="error", errorType=type(e).__name__, errorLine=line,
                     error=f"{type(e).__name__}" + (f" (line {line})" if line else ""),
                     errorText=_exception_text(e))
    finally:
        sys.stdout, sys.stderr = saved
        logging.root.handlers[:] = saved_handlers
        logging.root.setLevel(saved_level)
    reply["logs"] = capture.getvalue()
    reply["durationMs"] = round((time.monotonic() - started) * 1000.0, 3)
    return reply


async def _await(value: Any) -> Any:
    return await value


def _bot_line(exc: BaseException, filename: str) -> int | None:
    """The line of the bot's own code where C{exc} was raised (its innermost frame)."""
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename == filename:
            line = frame.lineno
    return line


def _exception_text(e: BaseException, limit: int = 500) -> str:
    text = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."



# -- the zygote, the run supervisor and the sandbox ------------------------------------------
#
# One worker process is a *zygote*: it imports what bots use, then never reads a request,
# never runs bot code and never holds a secret.  For each run it forks a *supervisor* (still
# the relay's user), which reads the one request from the pipe, forks the *bot process* --
# pid 1 of a new pid namespace when sandboxed -- and waits for its answer within the time
# limit.  The bot process enters the sandbox (new mount, network, IPC and UTS namespaces, a
# read-only filesystem with a private size-limited /tmp, the relay's data folder hidden,
# resource limits, the dedicated uid, no new privileges) before any bot code runs.  At the
# end of the run, or at the limit, the supervisor kills the bot process, which tears down its
# pid namespace and with it everything the bot started (setsid included); only then is the
# answer sent.  So every run starts from the pristine zygote: nothing a bot changes in its
# process survives it.

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38
#: Where the relay's API socket appears inside the sandbox.
SANDBOX_API_SOCKET = "/run/medagent/api.sock"
SANDBOX_LIB = "/run/medagent/lib"
#: The supervisor's exit code when the relay closed the pipe (the worker retires).
EXIT_RETIRE = 10
EXIT_PROTOCOL = 3
STDERR_TAIL = 4096


class SandboxError(Exception):
    """The sandbox could not be set up: the bot does not run."""


def _libc() -> Any:
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        import ctypes

        err = ctypes.get_errno()
        raise SandboxError(f"{what}: {os.strerror(err)}")


def _unshare(flags: int) -> None:
    _check(_libc().unshare(flags), "unshare")


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    def enc(v: str | None) -> bytes | None:
        return None if v is None else v.encode()

    _check(_libc().mount(enc(source), enc(target), enc(fstype), flags, enc(data)),
           f"mount {target}")


def _prctl(option: int, value: int) -> None:
    _check(_libc().prctl(option, value, 0, 0, 0), f"prctl {option}")


def _mount_points() -> list[tuple[str, str]]:
    """(mount point, per-mount options) from /proc/self/mountinfo, in mount order."""
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 5:
                point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
                found.append((point, fields[5]))
    return found


def _enter_sandbox(config: Mapping[str, Any]) -> list[str]:
    """
    As root, in the bot process (pid 1 of its own pid namespace): new mount, network, IPC
    and UTS namespaces; every mount read-only; a private tmpfs on /tmp (also /var/tmp and
    /dev/shm) owned by the bot uid; the relay's data folder hidden; the Python path and the
    relay's API socket bound under /run/medagent.  Returns the new sys.path.
    """
    uid, gid = int(config["uid"]), int(config["gid"])
    _unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS)
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    for point, options in _mount_points():
        flags = options.split(",")
        # nodev only where it was (/dev itself stays usable: /dev/null, /dev/urandom)
        keep = (MS_NOEXEC if "noexec" in flags else 0) | (MS_NODEV if "nodev" in flags else 0)
        try:
            _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | keep)
        except SandboxError:
            if point == "/":
                raise
            # A mount we cannot remount (hidden under another one, or special): checked below.
    _mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    os.makedirs(SANDBOX_LIB)
    paths = []
    for i, entry in enumerate(dict.fromkeys(sys.path)):  # our own path (code root first)
        if not entry or not os.path.isdir(entry):
            continue
        target = f"{SANDBOX_LIB}/{i}"
        os.mkdir(target)
        _mount(entry, target, None, MS_BIND)
        _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
        paths.append((entry, target))
    api = config.get("apiSocket")
    if api:
        open(SANDBOX_API_SOCKET, "w").close()
        _mount(api, SANDBOX_API_SOCKET, None, MS_BIND)
    _mount(None, "/run", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    for hidden in config.get("hide") or []:
        if os.path.isdir(hidden):
            _mount("tmpfs", hidden, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                   "size=4k,mode=000")
        elif os.path.exists(hidden):
            _mount("/dev/null", hidden, None, MS_BIND)
    _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={int(config.get('tmpMb') or 64)}m,mode=0700,uid={uid},gid={gid}")
    for other in ("/var/tmp", "/dev/shm"):
        if os.path.isdir(other) and not os.path.islink(other):
            _mount("/tmp", other, None, MS_BIND)
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    # Imports from here on go through the bound copies (the originals may sit under a
    # folder the bot uid cannot enter, such as /root).
    return _remap_path(paths)


def _remap_path(paths: list[tuple[str, str]]) -> list[str]:
    def remap(entry: str) -> str:
        for original, target in sorted(paths, key=lambda p: -len(p[0])):
            if entry == original or entry.startswith(original.rstrip("/") + "/"):
                return target + entry[len(original.rstrip("/")):]
        return entry

    sys.path[:] = [remap(p) for p in sys.path]
    for module in list(sys.modules.values()):
        search = getattr(module, "__path__", None)
        if isinstance(search, list):
            search[:] = [remap(p) for p in search]
    sys.path_importer_cache.clear()
    import importlib

    importlib.invalidate_caches()
    return list(sys.path)


def _limits(config: Mapping[str, Any], time_limit: float) -> None:
    """Hard limits (the bot cannot raise them): memory, CPU, file size, files, processes."""
    import resource

    def cap(which: int, value: int) -> None:
        soft, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            pass

    memory_mb = int(config.get("memoryMb") or 0)
    if memory_mb > 0:
        cap(resource.RLIMIT_AS, memory_mb * 1024 * 1024)
    cap(resource.RLIMIT_CORE, 0)
    cap(resource.RLIMIT_FSIZE, int(config.get("fileMb") or 64) * 1024 * 1024)
    cap(resource.RLIMIT_NOFILE, 256)
    cap(resource.RLIMIT_CPU, int(time_limit) + 2)
    if config.get("uid") is not None:
        # Counted per uid: every process and thread of every running bot together.
        cap(resource.RLIMIT_NPROC, int(config.get("maxProcs") or 32))


def _die_with_parent() -> None:
    """
    Linux: SIGKILL us when our parent dies, even mid-way through a bot's endless loop (a
    relay that is killed cannot kill its workers).  Elsewhere the closed stdin ends us
    between runs.
    """
    parent = os.getppid()
    try:
        import signal

        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError, SandboxError):
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


def _encode(message: Mapping[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode("utf-8") + b"\n"


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _read_line(fd: int, limit: int) -> bytes | None:
    """One request line from the pipe (None at EOF).  Nothing follows it: the relay sends
    the next request only after this run's answer."""
    parts = bytearray()
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return None if not parts else bytes(parts)
        parts += chunk
        if len(parts) > limit + 1:
            return bytes(parts)
        if parts.endswith(b"\n"):
            return bytes(parts)


def _ended_text(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    return f"signal {-code}" if code < 0 else f"exit code {code}"


def _bot_process(config: Mapping[str, Any], request: Mapping[str, Any], reply_fd: int,
                 err_fd: int, lifeline: int) -> None:
    """The bot's own process: enter the sandbox, drop privileges, run, answer, exit."""
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.dup2(err_fd, 2)
    keep = sorted({0, 1, 2, reply_fd, lifeline})
    for low, high in zip([-1] + keep, keep + [1 << 16]):
        if high - low > 1:
            os.closerange(low + 1, high)
    probe = request.get("type") == "probe"
    uid, gid = config.get("uid"), config.get("gid")
    workdir = str(config.get("runDir") or os.getcwd())
    try:
        if config.get("namespaces"):
            _enter_sandbox(config)
            workdir = "/tmp"
        _limits(config, float(request.get("timeLimit") or 30.0))
        try:
            os.nice(10)
        except OSError:
            pass
        if uid is not None:
            if gid is None:
                raise SandboxError("a bot uid needs a gid")
            os.setgroups([])
            os.setresgid(int(gid), int(gid), int(gid))
            os.setresuid(int(uid), int(uid), int(uid))
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        import signal

        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # cleared by the uid change: set it after
        import select

        if select.select([lifeline], [], [], 0)[0]:
            os._exit(1)  # the supervisor is gone already
        os.chdir(workdir)
        os.environ.clear()
        os.environ.update({"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir,
                           "TMPDIR": workdir, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"})
    except (OSError, SandboxError) as e:
        _write(reply_fd, _encode({"type": "result", "id": request.get("id"), "ok": False,
                                  "outcome": "crash", "sandbox": False,
                                  "error": f"The bot sandbox could not be set up ({e})"}))
        os._exit(0)
    if probe:
        _write(reply_fd, _encode({"type": "result", "id": request.get("id"), "ok": True,
                                  "probe": _probe_checks(config)}))
        os._exit(0)
    reply = run(request, int(config.get("maxLog") or DEFAULT_MAX_LOG))
    try:
        data = _encode(reply)
        limit = int(config.get("maxMessage") or 32 * 1024 * 1024)
        if len(data) > limit:
            data = _encode({"type": "result", "id": request.get("id"), "ok": False,
                            "outcome": "invalid", "logs": reply.get("logs", "")[:1000],
                            "error": f"The bot's result is too large ({len(data)} bytes; "
                                     f"limit {limit})"})
    except MemoryError:
        data = _encode({"type": "result", "id": request.get("id"), "ok": False,
                        "outcome": "memory", "error": "MemoryError while sending the result"})
    _write(reply_fd, data)
    os._exit(0)


def _probe_checks(config: Mapping[str, Any]) -> dict[str, Any]:
    """What the sandbox looks like from inside (the relay refuses bots unless it is sound)."""
    import socket

    checks: dict[str, Any] = {"uid": os.getuid(), "gid": os.getgid()}
    checks["hiddenReadable"] = [p for p in config.get("hide") or []
                                if os.access(p, os.R_OK) or os.access(p, os.X_OK)]
    import errno

    try:
        with socket.create_connection(("127.0.0.1", 9), timeout=1):
            checks["network"] = True
    except OSError as e:
        # ENETUNREACH: no network at all; "refused" would mean a loopback that is up
        checks["network"] = e.errno == errno.ECONNREFUSED
    try:
        with open("/tmp/.probe", "w") as f:
            f.write("x")
        os.remove("/tmp/.probe")
        checks["tmp"] = True
    except OSError:
        checks["tmp"] = False
    return checks


def _kill_run(pid: int, namespaces: bool, reaped: bool) -> None:
    """SIGKILL the bot process and everything it started; reap them."""
    import signal

    if not reaped:  # (a reaped pid may already be someone else's)
        for kill in (os.killpg, os.kill):
            try:
                kill(pid, signal.SIGKILL)
            except OSError:
                pass
        # Sandboxed, the bot process is pid 1 of its namespace: its end kills all the
        # rest, and waitpid returns once they are gone.
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    if namespaces:
        return
    # Unsandboxed we are the subreaper: orphans (setsid or not) became our children; kill
    # them until none is left.
    children = f"/proc/self/task/{os.getpid()}/children"
    for _ in range(1000):
        try:
            with open(children) as f:
                pids = [int(p) for p in f.read().split()]
        except OSError:
            pids = []
        for child in pids:
            try:
                os.kill(child, signal.SIGKILL)
            except OSError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            return
        if not pids:
            time.sleep(0.01)


def _supervise_run(config: Mapping[str, Any], request: dict[str, Any]) -> dict[str, Any]:
    """Fork the bot process, wait for its answer within the time limit, kill the rest."""
    import select
    import shutil
    import tempfile

    time_limit = float(request.get("timeLimit") or 30.0)
    limit = int(config.get("maxMessage") or 32 * 1024 * 1024)
    namespaces = bool(config.get("namespaces"))
    run_config = dict(config)
    run_dir = None
    if not namespaces:
        run_dir = tempfile.mkdtemp(prefix="run-", dir=os.getcwd())
        if config.get("uid") is not None:
            os.chown(run_dir, int(config["uid"]), int(config["gid"]))
        run_config["runDir"] = run_dir
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
    reply_r, reply_w = os.pipe()
    err_r, err_w = os.pipe()
    life_r, life_w = os.pipe()
    if namespaces:
        _unshare(CLONE_NEWPID)  # our next child is pid 1 of a new pid namespace
    pid = os.fork()
    if pid == 0:
        try:
            for fd in (reply_r, err_r, life_w):
                os.close(fd)
            _bot_process(run_config, request, reply_w, err_w, life_r)
        finally:
            os._exit(70)
    for fd in (reply_w, err_w, life_r):
        os.close(fd)
    deadline = time.monotonic() + time_limit
    answer = bytearray()
    tail = bytearray()
    line = None
    status = None
    open_fds = [reply_r, err_r]
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    while line is None:
        now = time.monotonic()
        if now >= deadline:
            break
        # once the bot process is gone, only what is already in the pipes is left to read
        wait = 0.0 if status is not None else min(deadline - now,
                                                  0.05 if pidfd is None else deadline - now)
        watch = open_fds + ([pidfd] if pidfd is not None and status is None else [])
        ready = select.select(watch, [], [], wait)[0]
        for fd in ready:
            if fd == pidfd:
                continue
            data = os.read(fd, 1 << 16)
            if not data:
                open_fds.remove(fd)
            elif fd == err_r:
                tail += data
                del tail[:-STDERR_TAIL]
            else:
                answer += data
                if b"\n" in answer:
                    line = bytes(answer[:answer.index(b"\n")])
                elif len(answer) > limit:
                    line = b""
        if status is None and line is None:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = st
        elif status is not None and not [fd for fd in ready if fd != pidfd]:
            break  # gone, and nothing more to read
    timed_out = line is None and status is None
    _kill_run(pid, namespaces, reaped=status is not None)
    for fd in [reply_r, err_r, life_w] + ([pidfd] if pidfd is not None else []):
        try:
            os.close(fd)
        except OSError:
            pass
    if run_dir is not None:
        shutil.rmtree(run_dir, ignore_errors=True)
    logs = bytes(tail).decode("utf-8", "replace")
    base = {"type": "result", "id": request.get("id"), "ok": False}
    if timed_out:
        return {**base, "outcome": "timeout", "logs": logs,
                "error": f"The bot did not finish within its time limit of {time_limit:g}s"}
    if line:
        try:
            reply = json.loads(line)
        except ValueError:
            reply = None
        if isinstance(reply, dict) and reply.get("type") == "result":
            reply["id"] = request.get("id")
            return reply
        return {**base, "outcome": "crash", "logs": logs,
                "error": "The bot process wrote an unreadable answer"}
    if line == b"":
        return {**base, "outcome": "invalid", "logs": logs,
                "error": f"The bot's answer is too large (limit {limit} bytes)"}
    return {**base, "outcome": "crash", "logs": logs,
            "error": f"The bot process ended without an answer ({_ended_text(status or 0)})"}


def _supervise(config: Mapping[str, Any], fd_in: int, fd_out: int) -> int:
    """The supervisor of one run: read the request, run it, send the answer."""
    _die_with_parent()  # (not inherited over fork): a dead zygote ends the run at once
    limit = int(config.get("maxMessage") or 32 * 1024 * 1024)
    line = _read_line(fd_in, limit)
    os.close(fd_in)
    if line is None:
        return EXIT_RETIRE
    if len(line) > limit or not line.endswith(b"\n"):
        _write(fd_out, _encode({"type": "error", "error": "request too large"}))
        return EXIT_PROTOCOL
    try:
        request = json.loads(line)
    except ValueError:
        _write(fd_out, _encode({"type": "error", "error": "request is not JSON"}))
        return EXIT_PROTOCOL
    if not isinstance(request, dict) or request.get("type") != "run":
        _write(fd_out, _encode({"type": "error", "error": "unknown request type",
                                "id": request.get("id") if isinstance(request, dict) else None}))
        return 0
    reply = _supervise_run(config, request)
    _write(fd_out, _encode(reply))
    return 0


def _fork_supervisor(config: Mapping[str, Any], fd_in: int, fd_out: int) -> int:
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            code = _supervise(config, fd_in, fd_out)
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def main(argv: list[str]) -> None:
    inherited = _open_fds()
    config: dict[str, Any] = json.loads(argv[0]) if argv else {}
    try:
        os.setsid()  # our own process group: the relay kills the supervisor with us
    except OSError:
        pass
    _die_with_parent()
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # Private copies of the protocol pipes; fd 0 <- /dev/null, fd 1 -> stderr.  The zygote
    # itself never reads a request: each supervisor does, so no request (token, secrets,
    # input) is ever in the memory later runs are forked from.
    fd_in, fd_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    sys.stdin = open(os.devnull)
    # Warm the imports a bot is likely to use, so a run is as fast as a fork.
    import importlib

    for module in ("medagent.botapi", "hl7", "medagent.hl7.message", "medagent.hl7.orders",
                   "ctypes", "select", "socket", "resource", "signal", "shutil", "tempfile",
                   "asyncio", "datetime", "uuid", "base64", "re", "http.client",
                   "urllib.request", "email.parser", "decimal"):
        try:
            importlib.import_module(module)
        except ImportError:
            pass  # a bot that needs it will say so when it imports it
    probe = _run_probe(config)
    _write(fd_out, _encode({"type": "ready", "pid": os.getpid(), "uid": os.getuid(),
                            "inheritedFds": inherited, "cwd": os.getcwd(), "sandbox": probe}))
    while True:
        code = _fork_supervisor(config, fd_in, fd_out)
        if code == EXIT_RETIRE:
            return  # the relay closed our stdin
        _write(fd_out, _encode({"type": "runEnded", "exit": code}))
        if code == EXIT_PROTOCOL:
            sys.exit(EXIT_PROTOCOL)


def _run_probe(config: Mapping[str, Any]) -> dict[str, Any]:
    """The probe run's answer, read through a pipe from a forked supervisor."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            os.close(r)
            _die_with_parent()
            reply = _supervise_run(config, {"type": "probe", "id": "probe", "timeLimit": 20})
            _write(w, _encode(reply))
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    data = bytearray()
    while True:
        chunk = os.read(r, 1 << 16)
        if not chunk or len(data) > 1 << 20:
            break
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    try:
        reply = json.loads(bytes(data).split(b"\n", 1)[0])
    except ValueError:
        return {"ok": False, "error": "the sandbox probe gave no answer"}
    if not reply.get("ok"):
        return {"ok": False, "error": str(reply.get("error") or "probe failed")[:500]}
    return {"ok": True, **(reply.get("probe") or {})}


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
