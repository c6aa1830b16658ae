"""
Python Bots: a pool of worker processes, the sandbox they run bots in, and the runner.

A Bot resource carries Python source defining ``handler(medplum, event)``.  The relay never
runs it in its own process: L{WorkerPool} keeps a few warm *zygotes*
(L{medagent.relay.botworker}) and hands each one run at a time over a JSON-lines pipe.  Every
run is a fresh fork of its zygote into a sandbox -- new pid, mount, network, IPC and UTS
namespaces, a read-only filesystem with a private /tmp, the relay's data folder hidden,
resource limits, a dedicated uid (never root) -- killed with everything it started at the
end of the run or at its time limit.  Without that sandbox (the relay not root, no bot user,
no namespaces) bots are refused, with the reason in the log, unless the relay was started
with ``--bots-unsandboxed`` for development.  A worker that dies fails its run, never the
relay.

L{BotRunner} resolves the Bot, gives it a short-lived token for its own identity
(``Bot/{id}``, role ``bot``, carrying only what the Bot resource grants), runs it, and
records every run as an C{AuditEvent} (bot, trigger, outcome, duration, sizes, the
exception's type and line -- never the input, the result, the output or an exception's
text).
"""

from __future__ import annotations

import base64
import binascii
import collections
import json
import os
import pwd
import re
import shutil
import signal
import stat
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Callable, Mapping, Protocol, Sequence, cast

import attr
from twisted.internet import error as ierror
from twisted.application import service
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    ensureDeferred,
    maybeDeferred,
    succeed,
)
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

import medagent
from medagent.relay.botworker import SANDBOX_API_SOCKET
from medagent.contenttypes import JSON_TYPES, TEXT_TYPES
from medagent.fhir import FHIRError, bad_request, not_found, operation_outcome
from medagent.jsonsafe import loads as json_loads
from medagent.relay.auth import BOT, Principal, bot_grants

log = Logger()

DEFAULT_WORKERS = 2
DEFAULT_MEMORY_MB = 256
DEFAULT_TIME_LIMIT = 10.0
MAX_TIME_LIMIT = 300.0
DEFAULT_QUEUE_TIMEOUT = 30.0
DEFAULT_MAX_QUEUE = 1000
DEFAULT_MAX_MESSAGE = 32 * 1024 * 1024
DEFAULT_MAX_LOG = 64 * 1024
#: Output kept in the AuditEvent of a run.
AUDIT_LOG_CHARS = 4000
#: A worker is replaced after this many runs, to bound what a bot can leak.
DEFAULT_MAX_RUNS = 10000
STARTUP_TIMEOUT = 30.0
#: Seconds past its limit before the relay kills a run's whole worker (the run's own
#: supervisor ends it at the limit).
BACKSTOP_GRACE = 5.0
DEFAULT_BOT_USER = "medagent-bot"
#: Processes and threads of all running bots together (RLIMIT_NPROC of the bot uid).
DEFAULT_MAX_PROCS = 32
DEFAULT_FILE_MB = 64
DEFAULT_TMP_MB = 64
MAX_CODE_BYTES = 1024 * 1024


EXT = "urn:medagent:fhir:StructureDefinition:"
EXT_BOT_RUN = EXT + "bot-run"
AUDIT_TYPE = {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
              "code": "rest", "display": "RESTful Operation"}
AUDIT_SUBTYPE = {"system": "http://hl7.org/fhir/restful-interaction", "code": "execute",
                 "display": "execute"}

# Run outcomes, and what each one answers over HTTP (and to an agent's channel).
SUCCESS = "success"
ERROR = "error"  # the handler raised
INVALID = "invalid"  # no handler, syntax error, unusable return value, bad Bot resource
NOT_FOUND = "not-found"
TIMEOUT = "timeout"
MEMORY = "memory"
CRASH = "crash"  # the worker died
BUSY = "busy"  # no worker free within the queue timeout, or the queue is full
STOPPED = "stopped"  # the relay is shutting down
DISABLED = "disabled"  # no sandbox for bots on this relay (see WorkerPool.start)
HTTP_STATUS = {SUCCESS: 200, ERROR: 400, INVALID: 400, NOT_FOUND: 404, TIMEOUT: 504,
               MEMORY: 400, CRASH: 500, BUSY: 503, STOPPED: 503, DISABLED: 503}
#: AuditEvent.outcome: 0 success, 4 minor failure, 8 serious failure.
AUDIT_OUTCOME = {SUCCESS: "0", ERROR: "4", INVALID: "4", NOT_FOUND: "4", TIMEOUT: "8",
                 MEMORY: "8", CRASH: "8", BUSY: "4", STOPPED: "4", DISABLED: "8"}

BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); "
        "from medagent.relay.botworker import main; main(sys.argv[2:])")


def now_iso(seconds: float | None = None) -> str:
    when = datetime.fromtimestamp(time.time() if seconds is None else seconds, timezone.utc)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- the worker pool ------------------------------------------------------------------------


def _enterable_by(path: str, uid: int, gid: int) -> bool:
    """Could C{uid}/C{gid} open C{path} (the folder itself: its permission bits)?"""
    try:
        st = os.stat(path)
    except OSError:
        return False
    if st.st_uid == uid:
        return True
    if st.st_gid == gid:
        return bool(st.st_mode & (stat.S_IXGRP | stat.S_IRGRP))
    return bool(st.st_mode & (stat.S_IXOTH | stat.S_IROTH))


def resolve_bot_ids(user: str | None) -> tuple[tuple[int, int] | None, str | None]:
    """
    The dedicated (uid, gid) bots run as: a user name (default ``medagent-bot``) or
    ``UID:GID``; or why there is none.  Never root, never the relay's own uid, never
    ``nobody`` (shared with other services, whose processes a bot could then signal).
    """
    if not user:
        return None, "no bot user configured (--bot-user)"
    match = re.fullmatch(r"(\d+):(\d+)", user)
    if match:
        uid, gid = int(match.group(1)), int(match.group(2))
    else:
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            return None, (f"there is no user {user!r} for bots; create it (useradd --system "
                          f"--user-group --no-create-home --shell /usr/sbin/nologin {user}) "
                          f"or give --bot-user UID:GID (a uid used by nothing else)")
        uid, gid = pw.pw_uid, pw.pw_gid
    if uid == 0 or gid == 0:
        return None, "bots never run as root (uid or gid 0)"
    if uid == os.getuid():
        return None, "the bot uid must not be the relay's own uid"
    if uid == 65534:
        return None, "the bot uid must be dedicated to bots, not nobody"
    return (uid, gid), None


class _Job:
    """One run waiting for, or on, a worker."""

    def __init__(self, line: bytes, time_limit: float, run_id: str) -> None:
        self.line = line
        self.time_limit = time_limit
        self.id = run_id
        self.deferred: Deferred[dict[str, Any]] = Deferred()
        self.queue_timer: Any = None
        self.run_timer: Any = None
        self.worker: _Worker | None = None
        self.seq = 0
        self.done = False

    def finish(self, reply: dict[str, Any]) -> None:
        if self.done:
            return
        self.done = True
        for timer in (self.queue_timer, self.run_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self.deferred.callback(reply)


def _failure_reply(outcome: str, error: str, logs: str = "") -> dict[str, Any]:
    return {"type": "result", "ok": False, "outcome": outcome, "error": error, "logs": logs}


class _ProcessTransport(Protocol):
    """What the pool uses of a worker's C{IProcessTransport} (zope interfaces are not
    callable types to mypy without the mypy-zope plugin)."""

    pid: int | None

    def write(self, data: bytes) -> None: ...

    def signalProcess(self, signalID: str | int) -> None: ...  # noqa: N802,N803 (Twisted)


class _Worker(ProcessProtocol):
    """The parent's end of one worker process."""

    def __init__(self, pool: "WorkerPool", folder: str) -> None:
        self.pool = pool
        self.folder = folder
        self.buffer = bytearray()
        self.stderr_tail = bytearray()
        self.ready = False
        self.pid: int | None = None
        self.info: dict[str, Any] = {}
        self.job: _Job | None = None
        self.runs = 0
        #: runs whose supervisor has ended (the zygote says ``runEnded`` after each)
        self.ends = 0
        self.retiring = False
        self.killed = False
        self.ended: Deferred[None] = Deferred()
        self.exit: str = ""
        self.startup_timer: Any = None

    def _process(self) -> _ProcessTransport:
        """The worker's process transport; spawnProcess sets it before any callback."""
        if self.transport is None:
            raise RuntimeError("the bot worker process is not running")
        return cast(_ProcessTransport, self.transport)

    def connectionMade(self) -> None:  # noqa: N802 (Twisted name)
        self.pid = self._process().pid

    def outReceived(self, data: bytes) -> None:  # noqa: N802
        self.buffer += data
        while True:
            nl = self.buffer.find(b"\n")
            if nl < 0:
                if len(self.buffer) > self.pool.max_message:
                    self.pool._protocol_error(self, "reply too large")
                return
            line = bytes(self.buffer[:nl])
            del self.buffer[: nl + 1]
            if len(line) > self.pool.max_message:
                self.pool._protocol_error(self, "reply too large")
                return
            if self.killed:
                return  # whatever a dying worker still says is not trusted
            self.pool._line(self, line)

    def errReceived(self, data: bytes) -> None:  # noqa: N802
        self.stderr_tail += data
        if len(self.stderr_tail) > 4096:
            del self.stderr_tail[: len(self.stderr_tail) - 4096]

    def processEnded(self, reason: Failure) -> None:  # noqa: N802
        value = reason.value
        code = getattr(value, "exitCode", None)
        sig = getattr(value, "signal", None)
        self.exit = f"signal {sig}" if sig else f"exit code {code}"
        self.pool._ended(self)
        shutil.rmtree(self.folder, ignore_errors=True)
        self.ended.callback(None)

    def kill(self) -> None:
        """SIGKILL the worker and its process group (whatever the bot started)."""
        if self.exit or self.transport is None:
            return
        self.killed = True
        if self.ready and self.pid:
            try:
                self.pool.killpg(self.pid, signal.SIGKILL)  # the worker called setsid()
            except OSError:
                pass
        try:
            self._process().signalProcess("KILL")
        except (ierror.ProcessExitedAlready, OSError):
            pass


class WorkerPool:
    """
    A fixed number of warm worker processes; runs queue (bounded, with a timeout) when all
    are busy.  L{submit} always fires with a reply dict, never errbacks: failures of the
    pool (timeout, crash, busy) are replies with ``ok: false`` and an ``outcome``.
    """

    def __init__(
        self,
        reactor: Any,
        *,
        size: int = DEFAULT_WORKERS,
        memory_mb: int = DEFAULT_MEMORY_MB,
        max_queue: int = DEFAULT_MAX_QUEUE,
        queue_timeout: float = DEFAULT_QUEUE_TIMEOUT,
        max_message: int = DEFAULT_MAX_MESSAGE,
        max_log: int = DEFAULT_MAX_LOG,
        max_runs: int = DEFAULT_MAX_RUNS,
        bot_user: str | None = DEFAULT_BOT_USER,
        unsandboxed: bool = False,
        hide: Sequence[str] = (),
        max_procs: int = DEFAULT_MAX_PROCS,
        file_mb: int = DEFAULT_FILE_MB,
        tmp_mb: int = DEFAULT_TMP_MB,
        python: str | None = None,
    ) -> None:
        if size < 1:
            raise ValueError("A bot worker pool needs at least one worker")
        self.reactor = reactor
        self.size = size
        self.memory_mb = memory_mb
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.max_message = max_message
        self.max_log = max_log
        self.max_runs = max_runs
        self.bot_user = bot_user
        self.unsandboxed = unsandboxed
        self.hide = [os.path.abspath(h) for h in hide]
        self.max_procs = max_procs
        self.file_mb = file_mb
        self.tmp_mb = tmp_mb
        #: the relay's API socket (host path), set by L{BotsService} before L{start}
        self.api_socket: str | None = None
        #: why bots do not run on this relay (None: they do)
        self.disabled: str | None = None
        self._config: dict[str, Any] = {}
        self.python = python or sys.executable
        self.code_root = os.path.dirname(os.path.dirname(os.path.abspath(medagent.__file__)))
        self.workers: list[_Worker] = []
        self._idle: list[_Worker] = []
        self._queue: collections.deque[_Job] = collections.deque()
        self._running = False
        self._ids: tuple[int, int] | None = None
        self._early_deaths = 0
        self._respawn_timer: Any = None
        #: counters for stats and tests
        self.spawned = 0
        #: how a worker's process group is killed (tests replace it)
        self.killpg: Callable[[int, int], None] = os.killpg

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        if self._running:
            return
        self._running = True
        config, problem = self._plan()
        if problem is not None:
            self._disable(problem)
            return
        self._config = config
        self._ids = (config["uid"], config["gid"]) if config["uid"] is not None else None
        if not config["namespaces"]:
            log.warn("Bots run UNSANDBOXED (--bots-unsandboxed, for development only): "
                     "{how}; a bot can reach the network and whatever {who} can read",
                     how=("as uid %d, no namespaces" % config["uid"]) if self._ids
                     else "as the relay's own user", who="that user")
        for _ in range(self.size):
            self._spawn()
        log.info("Bot worker pool started: {n} worker(s), {mb} MB each, {mode}", n=self.size,
                 mb=self.memory_mb, mode="sandboxed as uid %d" % config["uid"]
                 if config["namespaces"] else "unsandboxed")

    def _plan(self) -> tuple[dict[str, Any], str | None]:
        """The sandbox bots get here, or why they cannot run at all."""
        ids = None
        if os.geteuid() == 0:
            ids, problem = resolve_bot_ids(self.bot_user)
            if problem is not None or ids is None:
                return {}, problem or "no bot uid"
            for path in self.hide:
                if _enterable_by(path, *ids):
                    return {}, (f"the bot uid could open {path}; it must be mode 0700, owned "
                                "by the relay's user")
        elif not self.unsandboxed:
            return {}, ("the relay does not run as root, so it cannot start bots under their "
                        "own uid in a sandbox; run it as root (bots never are), or pass "
                        "--bots-unsandboxed for development")
        return {
            "uid": ids[0] if ids else None, "gid": ids[1] if ids else None,
            "namespaces": ids is not None and not self.unsandboxed,
            "hide": self.hide, "apiSocket": self.api_socket,
            "memoryMb": self.memory_mb, "maxMessage": self.max_message, "maxLog": self.max_log,
            "maxProcs": self.max_procs, "fileMb": self.file_mb, "tmpMb": self.tmp_mb,
        }, None

    def _disable(self, reason: str) -> None:
        """No bot runs on this relay (it serves everything else); say why, loudly."""
        self.disabled = reason
        log.error("Bots are disabled on this relay: {reason}", reason=reason)
        while self._queue:
            self._queue.popleft().finish(self._disabled_reply())
        for worker in list(self.workers):
            job, worker.job = worker.job, None
            if job is not None:
                job.finish(self._disabled_reply())
            worker.kill()

    def _disabled_reply(self) -> dict[str, Any]:
        return _failure_reply(DISABLED, f"Bots are disabled on this relay: {self.disabled}")

    def api_socket_for_bots(self) -> str | None:
        """Where a bot finds the relay's API socket (inside the sandbox, or the host path)."""
        if not self.api_socket:
            return None
        return SANDBOX_API_SOCKET if self._config.get("namespaces") else self.api_socket

    def stop(self) -> Deferred[None]:
        """Fail queued and running runs, kill every worker; fires when all have exited."""
        self._running = False
        if self._respawn_timer is not None and self._respawn_timer.active():
            self._respawn_timer.cancel()
        while self._queue:
            self._queue.popleft().finish(_failure_reply(STOPPED, "The relay is shutting down"))
        waits = []
        for worker in list(self.workers):
            if worker.job is not None:
                job, worker.job = worker.job, None
                job.finish(_failure_reply(STOPPED, "The relay is shutting down"))
            worker.kill()
            waits.append(worker.ended)
        if not waits:
            return succeed(None)
        return DeferredList(waits).addCallback(lambda _: None)

    def _spawn(self) -> None:
        if not self._running or self.disabled:
            return
        folder = tempfile.mkdtemp(prefix="medagent-bot-")
        if self._ids is not None and not self._config.get("namespaces"):
            os.chmod(folder, 0o711)  # unsandboxed runs get a folder of their own in it
        worker = _Worker(self, folder)
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": folder,
            "TMPDIR": folder,
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
        }
        config = dict(self._config, apiSocket=self.api_socket)
        argv = [self.python, "-I", "-c", BOOT, self.code_root,
                json.dumps(config, separators=(",", ":"))]
        # The zygote keeps the relay's user: it never runs bot code; each run drops to the
        # bot uid in its own sandbox (botworker).
        self.reactor.spawnProcess(worker, self.python, argv, env=env, path=folder,
                                  uid=None, gid=None, childFDs={0: "w", 1: "r", 2: "r"})
        self.workers.append(worker)
        self.spawned += 1
        worker.startup_timer = self.reactor.callLater(STARTUP_TIMEOUT, self._startup_timeout,
                                                      worker)

    def _startup_timeout(self, worker: _Worker) -> None:
        if not worker.ready:
            log.warn("Bot worker {pid} did not start in {t}s; killing it", pid=worker.pid,
                     t=STARTUP_TIMEOUT)
            worker.kill()

    # -- runs -----------------------------------------------------------------------------

    def submit(self, request: Mapping[str, Any], time_limit: float) -> Deferred[dict[str, Any]]:
        """Run one request (code, event, token...) on a worker within C{time_limit}."""
        run_id = uuid.uuid4().hex
        line = json.dumps({**request, "type": "run", "id": run_id},
                          separators=(",", ":")).encode("utf-8") + b"\n"
        if len(line) > self.max_message:
            return succeed(_failure_reply(
                INVALID, f"Bot input too large ({len(line)} bytes; limit {self.max_message})"))
        if self.disabled:
            return succeed(self._disabled_reply())
        if not self._running:
            return succeed(_failure_reply(STOPPED, "Bot workers are not running"))
        if len(self._queue) >= self.max_queue:
            return succeed(_failure_reply(BUSY, "Too many bot runs waiting; try again later"))
        job = _Job(line, time_limit, run_id)
        self._queue.append(job)
        job.queue_timer = self.reactor.callLater(self.queue_timeout, self._queue_timeout, job)
        self._dispatch()
        return job.deferred

    def _queue_timeout(self, job: _Job) -> None:
        if job.worker is None and job in self._queue:
            self._queue.remove(job)
            job.finish(_failure_reply(
                BUSY, f"No bot worker became free within {self.queue_timeout:g}s"))

    def _dispatch(self) -> None:
        while self._queue and self._idle:
            worker = self._idle.pop()
            if worker.exit or worker.killed or not worker.ready or worker.job is not None:
                continue
            job = self._queue.popleft()
            if job.queue_timer is not None and job.queue_timer.active():
                job.queue_timer.cancel()
            job.worker = worker
            worker.job = job
            worker.runs += 1
            job.seq = worker.runs
            worker._process().write(job.line)
            # The run's supervisor enforces the limit itself (and keeps the worker); this
            # is the backstop should it not answer.
            job.run_timer = self.reactor.callLater(job.time_limit + BACKSTOP_GRACE,
                                                   self._run_timeout, worker, job)

    def _run_timeout(self, worker: _Worker, job: _Job) -> None:
        if worker.job is not job:
            return
        worker.job = None
        log.warn("Bot run exceeded its time limit of {t}s; killing worker {pid}",
                 t=job.time_limit, pid=worker.pid)
        worker.kill()
        job.finish(_failure_reply(
            TIMEOUT, f"The bot did not finish within its time limit of {job.time_limit:g}s"))

    def _line(self, worker: _Worker, line: bytes) -> None:
        try:
            message = json.loads(line)
            kind = message["type"]
        except (ValueError, KeyError, TypeError):
            self._protocol_error(worker, "unreadable reply")
            return
        if kind == "ready":
            problem = self._sandbox_problem(message.get("sandbox"))
            if problem is not None:
                self._disable(problem)
                return
            worker.ready = True
            worker.info = message
            if worker.startup_timer is not None and worker.startup_timer.active():
                worker.startup_timer.cancel()
            self._early_deaths = 0
            self._idle.append(worker)
            self._dispatch()
            return
        job = worker.job
        if kind == "runEnded":
            worker.ends += 1
            if job is not None and job.seq == worker.ends:  # ended without an answer
                worker.job = None
                job.finish(_failure_reply(CRASH, f"The bot run's supervisor ended "
                                                 f"(exit code {message.get('exit')})"))
                self._idle.append(worker)
                self._dispatch()
            return
        if kind == "error":
            # the worker refused a request (too large, not JSON): it exits after saying so
            if job is not None:
                worker.job = None
                job.finish(_failure_reply(CRASH, f"Bot worker refused the run: "
                                                 f"{message.get('error')}"))
            return
        if kind != "result" or job is None or message.get("id") != job.id:
            self._protocol_error(worker, f"unexpected {kind!r}")
            return
        worker.job = None
        job.finish(message)
        if worker.runs >= self.max_runs:
            worker.retiring = True
            worker.kill()  # replaced in _ended
        else:
            self._idle.append(worker)
        self._dispatch()

    def _sandbox_problem(self, probe: Any) -> str | None:
        """Why the sandbox a worker reported is not good enough (None: it is)."""
        if not self._config.get("namespaces"):
            return None
        if not isinstance(probe, Mapping) or not probe.get("ok"):
            error = probe.get("error") if isinstance(probe, Mapping) else "no report"
            return (f"the bot sandbox cannot be set up here ({error}); bots need Linux "
                    "namespaces (mount, pid, network) as root, or --bots-unsandboxed")
        if probe.get("uid") != self._config["uid"]:
            return "the bot sandbox did not switch to the bot uid"
        if probe.get("network"):
            return "the bot sandbox can reach the network"
        if probe.get("hiddenReadable"):
            return f"the bot sandbox can read {probe['hiddenReadable']}"
        if not probe.get("tmp"):
            return "the bot sandbox has no writable /tmp"
        return None

    def _protocol_error(self, worker: _Worker, what: str) -> None:
        log.warn("Bot worker {pid} broke the protocol ({what}); killing it", pid=worker.pid,
                 what=what)
        job, worker.job = worker.job, None
        worker.kill()
        if job is not None:
            job.finish(_failure_reply(CRASH, f"Bot worker failed ({what})"))

    def _ended(self, worker: _Worker) -> None:
        if worker in self.workers:
            self.workers.remove(worker)
        if worker in self._idle:
            self._idle.remove(worker)
        if worker.startup_timer is not None and worker.startup_timer.active():
            worker.startup_timer.cancel()
        job, worker.job = worker.job, None
        if job is not None:
            tail = bytes(worker.stderr_tail).decode("utf-8", "replace")
            job.finish(_failure_reply(CRASH, f"The bot worker died ({worker.exit})", tail))
        if not self._running or self.disabled:
            return
        if not worker.ready:
            self._early_deaths += 1
            log.error("Bot worker {pid} exited before it was ready ({exit})",
                      pid=worker.pid, exit=worker.exit)
        elif not worker.retiring:
            log.info("Bot worker {pid} ended ({exit}); starting another", pid=worker.pid,
                     exit=worker.exit)
        delay = 0.0 if self._early_deaths == 0 else min(30.0, 0.5 * 2 ** self._early_deaths)
        if delay == 0.0:
            self._spawn()
        else:
            self._respawn_timer = self.reactor.callLater(delay, self._spawn)

    # -- introspection --------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {"workers": len(self.workers), "idle": len(self._idle),
                "queued": len(self._queue), "spawned": self.spawned,
                "disabled": self.disabled}


# -- bot resources ---------------------------------------------------------------------------


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


# -- runs and their audit trail ------------------------------------------------------------


@attr.s(auto_attribs=True)
class BotRun:
    """The outcome of one run."""

    bot_id: str | None
    outcome: str
    result: str | None = None
    result_type: str = "none"
    #: what went wrong, without payload: relay texts, or the exception type and line
    error: str | None = None
    #: the bot's output (print, logging, traceback): for the admin who ran $execute only
    logs: str = ""
    duration: float = 0.0
    audit_id: str | None = None
    #: the exception's own text (may quote the input): for the admin who ran $execute only
    detail: str | None = None
    error_type: str | None = None
    error_line: int | None = None
    input_bytes: int = 0
    result_bytes: int = 0

    @property
    def ok(self) -> bool:
        return self.outcome == SUCCESS

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.outcome, 500)

    def error_text(self) -> str:
        ref = f"Bot/{self.bot_id}" if self.bot_id else "Bot"
        return f"{ref} failed ({self.outcome}): {self.error or 'no detail'}"


def _reference(ref: Any) -> dict[str, Any] | None:
    if isinstance(ref, str) and ref:
        return {"reference": ref}
    if isinstance(ref, Mapping) and (ref.get("reference") or ref.get("display")):
        return {k: ref[k] for k in ("reference", "display") if k in ref}
    return None


def audit_event(
    *,
    trigger: str,
    outcome: str,
    started: float,
    ended: float,
    summary: str,
    logs: str = "",
    bot: Mapping[str, Any] | None = None,
    bot_ref: str | None = None,
    requester: Any = None,
    entities: Sequence[Any] = (),
    attempt: int | None = None,
    extra: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """
    An AuditEvent for one bot run or subscription delivery.  No payload: never the input,
    the result, the bot's output or an exception's text (any of them can quote the HL7
    message); only sizes, the exception type and line (C{extra}), ids and outcomes.
    """
    desc = summary
    agents: list[dict[str, Any]] = []
    if bot_ref:
        who = {"reference": bot_ref}
        if bot is not None and isinstance(bot.get("name"), str):
            who["display"] = bot["name"]
        agents.append({"who": who, "requestor": False,
                       "type": {"text": "bot"}})
    req = _reference(requester)
    if req is not None:
        agents.append({"who": req, "requestor": True})
    if not agents:
        agents.append({"who": {"display": "medagent-relay"}, "requestor": False})
    entity = []
    if bot_ref:
        entity.append({"what": {"reference": bot_ref}, "role": {"code": "bot"}})
    for e in entities:
        ref = _reference(e)
        if ref is not None:
            entity.append({"what": ref})
    details = [{"url": "trigger", "valueCode": trigger},
               {"url": "outcome", "valueCode": outcome},
               {"url": "durationMs", "valueDecimal": round((ended - started) * 1000.0, 3)}]
    if attempt is not None:
        details.append({"url": "attempt", "valueInteger": attempt})
    if logs:
        details.append({"url": "outputBytes", "valueInteger": len(logs.encode("utf-8"))})
    details.extend(dict(x) for x in extra)
    return {
        "resourceType": "AuditEvent",
        "type": AUDIT_TYPE,
        "subtype": [AUDIT_SUBTYPE],
        "action": "E",
        "period": {"start": now_iso(started), "end": now_iso(ended)},
        "recorded": now_iso(ended),
        "outcome": AUDIT_OUTCOME.get(outcome, "4"),
        "outcomeDesc": desc,
        "agent": agents,
        "source": {"observer": {"display": "medagent-relay"}},
        "entity": entity,
        "extension": [{"url": EXT_BOT_RUN, "extension": details}],
    }


def _detached(inner: Deferred[Any]) -> Deferred[Any]:
    """A Deferred for the caller: cancelling it stops the wait, not the run (or its audit)."""
    outer: Deferred[Any] = Deferred(lambda d: None)

    def relay(result: Any) -> None:
        if not outer.called:
            outer.callback(result) if not isinstance(result, Failure) else outer.errback(result)
        elif isinstance(result, Failure) and not result.check(CancelledError):
            log.failure("Bot run failed after its caller left", result)

    inner.addBoth(relay)
    return outer


class BotRunner:
    """Resolve, run and audit bots (subscriptions, $execute and agent channels use this)."""

    def __init__(
        self,
        reactor: Any,
        store: Any,
        authority: Any,
        pool: WorkerPool,
        *,
        base_url: str | None,
        default_time_limit: float = DEFAULT_TIME_LIMIT,
        max_time_limit: float = MAX_TIME_LIMIT,
        token_lifetime: int = 600,
        audit: bool = True,
        insecure_loopback: bool = False,
    ) -> None:
        self.reactor = reactor
        self.store = store
        self.authority = authority
        self.pool = pool
        self.base_url = base_url
        self.default_time_limit = default_time_limit
        self.max_time_limit = max_time_limit
        self.token_lifetime = token_lifetime
        self.audit = audit
        self.insecure_loopback = insecure_loopback
        self.stopped = False
        self._tokens: dict[tuple[str, str], tuple[str, float]] = {}
        self._codes: dict[tuple[str, str], str] = {}
        #: called with each finished BotRun (for the demo and tests); must not raise
        self.observers: list[Callable[[BotRun, str], None]] = []

    def stop(self) -> None:
        """From now on nothing is written (the database is about to close)."""
        self.stopped = True

    def _token(self, bot: Mapping[str, Any], time_limit: float) -> str:
        """
        The Bot's token for one run: its own identity (``Bot/{id}``, role ``bot``) and only
        what its Bot resource grants (L{bot_grants}) -- never admin.  Cached per Bot
        version, so a change of grants applies from the next run.
        """
        now = time.time()
        bot_id = str(bot.get("id"))
        key = (bot_id, str((bot.get("meta") or {}).get("versionId")))
        cached = self._tokens.get(key)
        if cached is not None and cached[1] - now > time_limit + 60:
            return cached[0]
        read, write, push = bot_grants(dict(bot))
        lifetime = max(self.token_lifetime, int(time_limit) + 120)  # capped by mint_token
        token = self.authority.mint_token(Principal(f"Bot/{bot_id}", BOT, push, read, write),
                                          lifetime)
        if len(self._tokens) > 1024:
            self._tokens.clear()
        self._tokens[key] = (token, now + min(lifetime, self.authority.max_lifetime))
        return token

    async def _code(self, bot: Mapping[str, Any]) -> str:
        key = (str(bot.get("id")), str((bot.get("meta") or {}).get("versionId")))
        code = self._codes.get(key)
        if code is None:
            code = await bot_code(self.store, bot)
            if len(self._codes) > 256:
                self._codes.clear()
            self._codes[key] = code
        return code

    def execute(
        self,
        bot: str | Mapping[str, Any],
        input: Any,
        content_type: str,
        *,
        trigger: str,
        requester: Any = None,
        headers: Mapping[str, str] | None = None,
        entities: Sequence[Any] = (),
        attempt: int | None = None,
        event_extra: Mapping[str, Any] | None = None,
    ) -> Deferred[BotRun]:
        """
        Run a Bot (a resource, or its id) with C{input}; fires with a L{BotRun} whatever
        happens (errbacks only on a bug).  The run is audited before the Deferred fires.
        """
        return _detached(ensureDeferred(self._execute(
            bot, input, content_type, trigger, requester, dict(headers or {}), entities,
            attempt, dict(event_extra or {}))))

    async def _execute(self, bot: Any, input: Any, content_type: str, trigger: str,
                       requester: Any, headers: dict[str, str], entities: Sequence[Any],
                       attempt: int | None, event_extra: dict[str, Any]) -> BotRun:
        started = time.time()
        bot_id = bot if isinstance(bot, str) else (bot.get("id") if isinstance(bot, Mapping)
                                                   else None)
        resource: Mapping[str, Any] | None = bot if isinstance(bot, Mapping) else None
        run: BotRun
        try:
            if resource is None:
                try:
                    resource = await self.store.read("Bot", str(bot_id))
                except FHIRError:
                    raise _Refused(NOT_FOUND, f"Bot/{bot_id} not found")
            try:
                code = await self._code(resource)
            except BotCodeError as e:
                raise _Refused(INVALID, str(e))
            time_limit = bot_time_limit(resource, self.default_time_limit, self.max_time_limit)
            bot_ref = f"Bot/{bot_id}"
            socket_for = getattr(self.pool, "api_socket_for_bots", None)
            api = socket_for() if socket_for is not None else None
            event = {
                "bot": {"reference": bot_ref, **({"display": resource["name"]}
                                                 if isinstance(resource.get("name"), str)
                                                 else {})},
                "input": input,
                "contentType": content_type,
                "secrets": bot_secrets(resource),
                "requester": _reference(requester),
                "headers": headers,
                "traceId": uuid.uuid4().hex,
                **event_extra,
            }
            request = {
                "botRef": bot_ref,
                "code": code,
                "event": event,
                # the relay's API socket: the only way out of the sandbox
                "apiSocket": api,
                "baseUrl": "http://medagent-relay" if api else self.base_url,
                "accessToken": self._token(resource, time_limit),
                "timeLimit": time_limit,
                "insecureLoopback": self.insecure_loopback,
            }
            reply = await self.pool.submit(request, time_limit)
            outcome = SUCCESS if reply.get("ok") else str(reply.get("outcome") or ERROR)
            result = reply.get("result") if reply.get("ok") else None
            line = reply.get("errorLine")
            run = BotRun(
                bot_id=bot_id,
                outcome=outcome,
                result=result,
                result_type=str(reply.get("resultType") or "none"),
                error=None if reply.get("error") is None else str(reply["error"])[:500],
                logs=str(reply.get("logs") or ""),
                detail=reply.get("errorText") if isinstance(reply.get("errorText"), str)
                else None,
                error_type=str(reply["errorType"])[:100] if reply.get("errorType") else None,
                error_line=line if isinstance(line, int) and not isinstance(line, bool)
                else None,
                input_bytes=_size(input),
                result_bytes=len(result.encode("utf-8")) if isinstance(result, str) else 0,
            )
        except _Refused as e:
            run = BotRun(bot_id=bot_id, outcome=e.outcome, error=e.message)
        ended = time.time()
        run.duration = ended - started
        (log.debug if run.ok else log.warn)(
            "Bot/{bot_id} {trigger} run: {outcome} in {ms:.1f} ms", bot_id=bot_id,
            trigger=trigger, outcome=run.outcome, ms=run.duration * 1000)
        if self.audit and not self.stopped and run.outcome != STOPPED:
            summary = (f"Bot run ({trigger}): {run.outcome}" if run.ok
                       else f"Bot run ({trigger}): {run.outcome}: {run.error or ''}")
            extra: list[dict[str, Any]] = [
                {"url": "inputBytes", "valueInteger": run.input_bytes},
                {"url": "resultBytes", "valueInteger": run.result_bytes}]
            if run.error_type:
                extra.append({"url": "errorType", "valueCode": run.error_type})
            if run.error_line is not None:
                extra.append({"url": "errorLine", "valueInteger": run.error_line})
            event_resource = audit_event(
                trigger=trigger, outcome=run.outcome, started=started, ended=ended,
                summary=summary, logs=run.logs, bot=resource,
                bot_ref=f"Bot/{bot_id}" if bot_id else None, requester=requester,
                entities=entities, attempt=attempt, extra=extra)
            try:
                stored = await self.store.create(event_resource)
                run.audit_id = stored["id"]
            except Exception:
                log.failure("Could not record the AuditEvent of a Bot/{bot_id} run",
                            bot_id=bot_id)
        for observer in list(self.observers):
            try:
                observer(run, trigger)
            except Exception:
                log.failure("Bot run observer failed")
        return run

    # -- POST /fhir/R4/Bot/{id}/$execute ---------------------------------------------------

    async def execute_http(self, request: Any, principal: Principal, bot_id: str | None,
                           query: Mapping[str, list[str]]) -> Any:
        """The ``$execute`` operation: the request body is the input, the answer the result."""
        from medagent.storage.resources import search_one
        from medagent.relay.web import Response, json_response

        if request.method != b"POST":
            raise FHIRError(405, "$execute needs POST", "not-supported")
        principal.require_admin()
        if bot_id is not None:
            try:
                bot = await self.store.read("Bot", bot_id)
            except FHIRError:
                raise not_found(f"Bot/{bot_id} not found")
        else:
            identifiers = query.get("identifier") or []
            identifier = identifiers[-1] if identifiers else None
            if not identifier:
                raise bad_request("Bot/$execute needs a Bot id or ?identifier=")
            bot = await search_one(self.store, "Bot", {"identifier": [identifier]})
        ctype = (request.getHeader(b"content-type") or b"").decode("latin-1").strip()
        ctype = ctype or "text/plain"
        raw = request.content.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise bad_request("$execute input must be UTF-8 text (or JSON)")
        if ctype.split(";")[0].strip().lower() in JSON_TYPES:
            try:
                value: Any = json_loads(text) if text.strip() else {}
            except ValueError as e:
                raise bad_request(f"Invalid JSON body: {e}")
        else:
            value = text
        headers = {}
        for name, values in request.requestHeaders.getAllRawHeaders():
            key = name.decode("latin-1")
            if key.lower() in ("authorization", "cookie", "proxy-authorization"):
                continue
            headers[key] = values[-1].decode("latin-1")[:1024]
            if len(headers) >= 64:
                break
        run = await self.execute(bot, value, ctype, trigger="execute",
                                 requester=principal.client_id if "/" in principal.client_id
                                 else f"ClientApplication/{principal.client_id}",
                                 headers=headers)
        extra = {"X-Medagent-AuditEvent": run.audit_id} if run.audit_id else {}
        if run.ok:
            body = (run.result or "").encode("utf-8")
            return Response(200, body, answer_type(ctype, run.result_type), extra)
        # The caller is an admin who ran the bot by hand: the exception's text and the
        # output are shown to them here, and nowhere else (never in the AuditEvent).
        shown = "\n".join(x for x in (run.detail, run.logs[-AUDIT_LOG_CHARS:]) if x)
        outcome = operation_outcome(
            run.error_text(),
            code={TIMEOUT: "timeout", BUSY: "transient", NOT_FOUND: "not-found",
                  CRASH: "exception", STOPPED: "transient",
                  DISABLED: "transient"}.get(run.outcome, "processing"),
            severity="error",
            diagnostics=shown or None,
        )
        return json_response(outcome, run.http_status, **extra)


def _size(value: Any) -> int:
    """Bytes of a bot's input (text, or its compact JSON)."""
    if isinstance(value, str):
        return len(value.encode("utf-8"))
    try:
        return len(json.dumps(value, separators=(",", ":")).encode("utf-8"))
    except (TypeError, ValueError):
        return 0


class _Refused(Exception):
    def __init__(self, outcome: str, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.message = message


def base_url_from_listen(listen: str) -> str | None:
    """
    The URL a bot worker on this machine uses to reach the relay, from the listen endpoint
    string (``tcp:8103:interface=127.0.0.1``, ``ssl:8443:...``); None when it cannot tell.
    """
    parts = re.split(r"(?<!\\):", listen)
    if not parts:
        return None
    kind = parts[0].lower()
    if kind not in ("tcp", "ssl", "tcp6", "ssl6"):
        return None
    port = None
    interface = ""
    for part in parts[1:]:
        if "=" in part:
            key, _, value = part.partition("=")
            if key == "port":
                port = value
            elif key == "interface":
                interface = value.replace("\\:", ":")
        elif port is None:
            port = part
    if not port or not port.isdigit() or int(port) == 0:
        return None
    if interface in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif interface == "::":
        host = "[::1]"
    elif ":" in interface:
        host = f"[{interface}]"
    else:
        host = interface
    scheme = "https" if kind.startswith("ssl") else "http"
    return f"{scheme}://{host}:{port}"


class BotsService(service.Service):
    """Starts the relay's API socket for bots, the worker pool and the subscription
    deliveries; stops them, and its Deferred fires once the workers are gone.  The relay
    closes its database only after that (L{medagent.relay.service.RelayService.stopService}
    waits for it)."""

    def __init__(self, pool: WorkerPool, runner: BotRunner, subscriptions: Any = None,
                 closers: Sequence[Callable[[], Any]] = (), reactor: Any = None) -> None:
        self.pool = pool
        self.runner = runner
        self.subscriptions = subscriptions
        self.closers = list(closers)
        self.reactor = reactor
        #: the relay's HTTP site, served to bots on a Unix socket (set by the relay)
        self.site: Any = None
        self._api_port: Any = None
        self._api_dir: str | None = None

    def _listen_api(self) -> None:
        """The API on a Unix socket in a folder of its own (0700): bots reach it only
        through the bind the sandbox makes; it carries no more than any HTTP request."""
        if self.site is None or self.reactor is None:
            return
        self._api_dir = tempfile.mkdtemp(prefix="medagent-botapi-")
        path = os.path.join(self._api_dir, "api.sock")
        try:
            self._api_port = self.reactor.listenUNIX(path, self.site, mode=0o666)
        except Exception:
            log.failure("Could not listen on the bots' API socket {path}", path=path)
            shutil.rmtree(self._api_dir, ignore_errors=True)
            self._api_dir = None
            return
        self.pool.api_socket = path

    def startService(self) -> None:  # noqa: N802 (Twisted name)
        super().startService()
        self.runner.stopped = False
        self._listen_api()
        self.pool.start()
        if self.subscriptions is not None:
            self.subscriptions.start()

    def stopService(self) -> Deferred[Any]:  # noqa: N802
        super().stopService()
        if self.subscriptions is not None:
            self.subscriptions.stop()
        self.runner.stop()
        waits = [self.pool.stop()]
        if self._api_port is not None:
            port, self._api_port = self._api_port, None
            folder = self._api_dir
            waits.append(maybeDeferred(port.stopListening).addBoth(
                lambda _: shutil.rmtree(folder or "", ignore_errors=True)))
        for close in self.closers:
            waits.append(maybeDeferred(close))
        return DeferredList(waits, consumeErrors=True).addCallback(lambda _: None)


def unused_id(first: int = 61000, last: int = 65000) -> int:
    """
    A uid (and gid) that no user, group or running process has: a dedicated bot id when no
    ``medagent-bot`` account exists (the demo, the tests).
    """
    import grp
    import pwd

    used = {p.pw_uid for p in pwd.getpwall()} | {g.gr_gid for g in grp.getgrall()}
    for name in os.listdir("/proc") if os.path.isdir("/proc") else []:
        try:
            used.add(os.stat(f"/proc/{name}").st_uid)
        except OSError:
            pass
    return next(i for i in range(first, last) if i not in used)

