"""
Real processes for integration tests: ``twistd`` relay and agent, third-party peers.

Every process is started with C{reactor.spawnProcess}, its output kept for the test to read,
and killed in the test's cleanup; every wait has a timeout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal as signals
import socket
import sys
import tempfile
from typing import Any, Callable

from twisted.internet import defer, error, protocol, reactor
from twisted.internet.defer import Deferred

from medagent.relay.bots import unused_id
from tests.peerenv import ROOT

TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


def free_port() -> int:
    """
    A port that was free a moment ago.  Racy (another process may take it before the test
    binds it): only for a third-party peer that must be told its port up front; our own
    servers listen on port 0 and say the port they got (L{RelayFixture}).
    """
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Proc(protocol.ProcessProtocol):
    """A child process whose output we can wait on."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.output = bytearray()
        self.ended: Deferred[Any] = Deferred()
        self.exit_code: int | None = None
        self._watchers: list[tuple[bytes, Deferred[None]]] = []

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if len(self.output) > 8 * 1024 * 1024:
            del self.output[: len(self.output) - 4 * 1024 * 1024]
        for needle, d in list(self._watchers):
            if self._has_line_with(needle):
                self._watchers.remove((needle, d))
                d.callback(None)

    def _has_line_with(self, needle: bytes) -> bool:
        """A needle counts once its whole line has arrived (output may come in pieces)."""
        end = self.output.rfind(b"\n")
        return end >= 0 and self.output.find(needle, 0, end + 1) >= 0

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.exit_code = getattr(reason.value, "exitCode", None)
        for needle, d in self._watchers:
            if needle in self.output:
                d.callback(None)
                continue
            d.errback(RuntimeError(f"{self.name} exited before printing {needle!r}:\n"
                                   f"{self.text[-3000:]}"))
        self._watchers = []
        self.ended.callback(None)

    @property
    def text(self) -> str:
        return self.output.decode("utf-8", "replace")

    def wait_for(self, needle: str, timeout: float = 20.0) -> Deferred[None]:
        raw = needle.encode()
        if self._has_line_with(raw) or (self.ended.called and raw in self.output):
            return defer.succeed(None)
        if self.ended.called:
            return defer.fail(RuntimeError(f"{self.name} has exited:\n{self.text[-3000:]}"))
        d: Deferred[None] = Deferred()
        self._watchers.append((raw, d))

        def timed_out(_: Any) -> None:
            raise RuntimeError(f"{self.name} did not print {needle!r} in {timeout}s:\n"
                               f"{self.text[-3000:]}")

        d.addTimeout(timeout, reactor)
        return d.addErrback(lambda f: timed_out(f) if f.check(defer.TimeoutError) else f)

    def count(self, needle: str) -> int:
        return self.text.count(needle)

    def signal(self, sig: int = signals.SIGTERM) -> None:
        try:
            self.transport.signalProcess(sig)
        except error.ProcessExitedAlready:
            pass

    def stop(self, sig: int = signals.SIGTERM, timeout: float = 10.0) -> Deferred[Any]:
        """Signal, then SIGKILL if it lingers; fires when the process is gone."""
        if self.ended.called:
            return defer.succeed(None)
        self.signal(sig)
        killer = reactor.callLater(timeout, self.signal, signals.SIGKILL)

        def done(result: Any) -> Any:
            if killer.active():
                killer.cancel()
            return result

        return _chain(self.ended).addBoth(done)


def _chain(d: Deferred[Any]) -> Deferred[Any]:
    out: Deferred[Any] = Deferred()
    if d.called:
        out.callback(None)
    else:
        d.addBoth(lambda r: (out.callback(None), r)[1])
    return out


def spawn(testcase: Any, name: str, argv: list[str], *, env: dict[str, str] | None = None,
          cwd: str | None = None) -> Proc:
    proc = Proc(name)
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env["PYTHONUNBUFFERED"] = "1"
    full_env.update(env or {})
    reactor.spawnProcess(proc, argv[0], argv, env=full_env, path=cwd or ROOT)
    testcase.addCleanup(proc.stop, signals.SIGKILL)
    return proc


def python(testcase: Any, name: str, args: list[str], **kw: Any) -> Proc:
    return spawn(testcase, name, [sys.executable, *args], **kw)


#: the bots' dedicated uid and gid in tests (as root): one nothing else uses
TEST_BOT_ID = unused_id(61000, 62000)


def bot_sandbox() -> dict[str, Any]:
    """
    RelayService options for bots in tests: the real sandbox when root (as in CI: a uid of
    its own, namespaces), unsandboxed (the documented development opt-in) otherwise.
    """
    if os.geteuid() != 0:
        return {"bots_unsandboxed": True}
    return {"bot_user": f"{TEST_BOT_ID}:{TEST_BOT_ID}"}


def bot_sandbox_args() -> list[str]:
    """The same for a ``twistd medagent-relay`` command line."""
    options = bot_sandbox()
    if options.get("bots_unsandboxed"):
        return ["--bots-unsandboxed"]
    return ["--bot-user", options["bot_user"]]


#: what the relay logs once a listener is bound (L{medagent.relay.service.Listener})
LISTENING = re.compile(rb"medagent relay listening on (http://127\.0\.0\.1:(\d+))")


class RelayFixture:
    """
    A real ``twistd medagent-relay`` with an admin client, an Agent and its credentials.

    Without C{port} the first start listens on port 0 and learns the port from the relay's
    "listening on" line (no free-port race); a restart reuses that port, so agents find it.
    """

    def __init__(self, testcase: Any, data_dir: str | None = None, port: int | None = None):
        self.testcase = testcase
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="medagent-relay-")
        self.port = port
        self.proc: Proc | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("The relay's port is known once it has started")
        return f"http://127.0.0.1:{self.port}"

    def create_client(self, role: str, agents: list[str] = ()) -> dict[str, Any]:
        from medagent.relay.service import open_authority, open_database

        db = open_database(None, self.data_dir)
        return open_authority(db, self.data_dir).create_client_sync(role, list(agents))

    async def start(self, extra: list[str] = ()) -> "RelayFixture":
        self.proc = python(
            self.testcase, "relay",
            ["-c", TWISTD, "-n", "--pidfile=", "medagent-relay", "--data", self.data_dir,
             "--listen", f"tcp:{self.port or 0}:interface=127.0.0.1", *bot_sandbox_args(),
             *extra],
        )
        # the text line, or with --log-format json the event's url field
        await self.proc.wait_for("medagent relay listening on", timeout=30)
        self.port = self._bound_port()
        return self

    def _bound_port(self) -> int:
        assert self.proc is not None
        found = LISTENING.search(bytes(self.proc.output))
        if found is not None:
            return int(found.group(2))
        for line in self.proc.text.splitlines():
            if "medagent relay listening on" in line and line.startswith("{"):
                url = json.loads(line).get("url", "")
                if url.startswith("http://127.0.0.1:"):
                    return int(url.rsplit(":", 1)[1])
        raise RuntimeError(f"relay did not say its port:\n{self.proc.text[-3000:]}")

    async def stop(self, sig: int = signals.SIGTERM) -> None:
        if self.proc is not None:
            await self.proc.stop(sig)


async def relay_with_admin(testcase: Any) -> tuple[RelayFixture, Any]:
    """A started relay and a logged-in admin client (closed in cleanup)."""
    return await relay_with_admin_args(testcase, [])


async def relay_with_admin_args(testcase: Any, extra: list[str]) -> tuple[RelayFixture, Any]:
    """L{relay_with_admin}, the relay started with C{extra} arguments."""
    from medagent.client import MedagentClient

    relay = RelayFixture(testcase)
    admin = relay.create_client("admin")
    await relay.start(extra)
    client = MedagentClient(reactor, relay.url, admin["clientId"], admin["clientSecret"])
    testcase.addCleanup(client.close)
    return relay, client


def agent_process(testcase: Any, relay_url: str, creds: dict[str, Any], agent_id: str,
                  extra: list[str] = ()) -> Proc:
    """
    A real agent process.  Without a C{--data} in C{extra} it gets a folder of its own: the
    agent's default (C{./agent-data}, here the checkout) would be one durable queue shared by
    every test and run, whose leftovers another test's agent would deliver.
    """
    extra = list(extra)
    if not any(a == "--data" or a.startswith("--data=") for a in extra):
        folder = tempfile.mkdtemp(prefix="medagent-test-agent-")
        testcase.addCleanup(shutil.rmtree, folder, True)  # (after the process is stopped)
        extra += ["--data", folder]
    return python(
        testcase, "agent",
        ["-c", TWISTD, "-n", "--pidfile=", "medagent-agent", "--relay", relay_url,
         "--client-id", creds["clientId"], "--client-secret", creds["clientSecret"],
         "--agent-id", agent_id, *extra],
    )


async def wait_until(predicate: Callable[[], Any], timeout: float = 20.0,
                     interval: float = 0.05, what: str = "condition") -> Any:
    """Poll an (async or plain) predicate until it is truthy."""
    from twisted.internet.task import deferLater

    waited = 0.0
    while True:
        value = predicate()
        if isinstance(value, Deferred) or hasattr(value, "__await__"):
            value = await value
        if value:
            return value
        if waited >= timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await deferLater(reactor, interval, lambda: None)
        waited += interval


def dumps(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def in_process_relay(testcase: Any, prefix: str, **kw: Any) -> tuple[Any, str, Any]:
    """
    A L{RelayService} in this process on a free loopback port (real reactor, real SQLite in a
    temporary folder), started, with its base URL and an HTTP pool; both stop in cleanup.
    """
    from twisted.web.client import HTTPConnectionPool

    from medagent.relay.service import RelayService

    relay = RelayService(reactor, data_dir=tempfile.mkdtemp(prefix=prefix),
                         listen="tcp:0:interface=127.0.0.1", **kw)
    relay.startService()
    testcase.addCleanup(relay.stopService)
    pool = HTTPConnectionPool(reactor)
    testcase.addCleanup(pool.closeCachedConnections)
    return relay, relay.urls()[0], pool

