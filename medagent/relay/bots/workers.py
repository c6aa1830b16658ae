"""
The bots' worker pool: warm zygote processes, the sandbox each run is forked into, and the
JSON-lines pipe the relay talks to them over.

L{WorkerPool} keeps a few warm *zygotes* (L{medagent.relay.botworker}) and hands each one run
at a time.  Every run is a fresh fork of its zygote into a sandbox -- new pid, mount,
network, IPC and UTS namespaces, a read-only filesystem with a private /tmp, the relay's data
folder hidden, resource limits, a dedicated uid (never root) -- killed with everything it
started at the end of the run or at its time limit.  Without that sandbox (the relay not
root, no bot user, no namespaces) bots are refused, with the reason in the log, unless the
relay was started with ``--bots-unsandboxed`` for development.  A worker that dies fails its
run, never the relay.
"""

from __future__ import annotations

import collections
import grp
import json
import os
import pwd
import re
import shutil
import signal
import stat
import sys
import tempfile
import uuid
from typing import Any, Callable, Mapping, Protocol, Sequence, cast

from twisted.application.internet import backoffPolicy
from twisted.internet import error as ierror
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

import medagent
from medagent.relay.botworker import SANDBOX_API_SOCKET
from medagent.relay.bots.outcomes import BUSY, CRASH, DISABLED, INVALID, STOPPED, TIMEOUT

log = Logger()

DEFAULT_WORKERS = 2
DEFAULT_MEMORY_MB = 256
DEFAULT_QUEUE_TIMEOUT = 30.0
DEFAULT_MAX_QUEUE = 1000
DEFAULT_MAX_MESSAGE = 32 * 1024 * 1024
DEFAULT_MAX_LOG = 64 * 1024
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
#: Seconds before a worker is replaced after the C{n}th death in a row before it was ready:
#: 1, 2, 4 ... 30 (a worker that got ready is replaced at once).  No jitter: one relay.
RESPAWN_BACKOFF = backoffPolicy(initialDelay=0.5, maxDelay=30.0, factor=2.0,
                                jitter=lambda: 0.0)

BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); "
        "from medagent.relay.botworker import main; main(sys.argv[2:])")


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
        respawn_policy: Callable[[int], float] | None = None,
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
        #: seconds before replacing a worker after the C{n}th death in a row before ready
        self.respawn_policy = respawn_policy or RESPAWN_BACKOFF
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
        if self._early_deaths == 0:
            self._spawn()
        else:
            self._respawn_timer = self.reactor.callLater(
                self.respawn_policy(self._early_deaths), self._spawn)

    # -- introspection --------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {"workers": len(self.workers), "idle": len(self._idle),
                "queued": len(self._queue), "spawned": self.spawned,
                "disabled": self.disabled}


def unused_id(first: int = 61000, last: int = 65000) -> int:
    """
    A uid (and gid) that no user, group or running process has: a dedicated bot id when no
    ``medagent-bot`` account exists (the demo, the tests).
    """
    used = {p.pw_uid for p in pwd.getpwall()} | {g.gr_gid for g in grp.getgrall()}
    for name in os.listdir("/proc") if os.path.isdir("/proc") else []:
        try:
            used.add(os.stat(f"/proc/{name}").st_uid)
        except OSError:
            pass
    return next(i for i in range(first, last) if i not in used)
