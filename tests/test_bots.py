"""
Python Bots.

Units: the worker pool's scheduling, time limit, crash and respawn logic on a Clock with fake
processes; the worker's run loop in-process (output capture, errors, return values); Bot
resources (code sources, secrets, limits).  Integration: a real relay in-process with real
worker processes: ``$execute``, bots that raise, loop forever, eat memory or kill their
worker (each a failed AuditEvent, the relay still answering), isolation of the worker, the
``medplum`` client inside a bot, and a Subscription that runs a bot after the HTTP write.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
import time
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool

from medagent.relay import bots as b
from medagent.relay import botworker
from medagent.relay.service import RelayService
from medagent.storage.sqlite.store import SQLiteStore
from tests import procs
from tests.procs import TEST_BOT_ID, bot_sandbox  # noqa: F401 (used by other tests)
from tests.fakes import InlineReactor, inline_database

HL7 = "MSH|^~\\&|LAB|FAC|EHR|HOSP|20240101120000||ADT^A01|CTRL0001|P|2.5.1\rPID|1||42^^^MRN"


# -- the pool, with fake processes --------------------------------------------------------


class FakeTransport:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.written: list[bytes] = []
        self.signals: list[Any] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def signalProcess(self, sig: Any) -> None:  # noqa: N802
        self.signals.append(sig)


class FakeProcessReactor(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[dict[str, Any]] = []

    def spawnProcess(self, proto: Any, executable: str, args: list[str], env: dict[str, str],
                     path: str, uid: Any, gid: Any, childFDs: Any) -> None:  # noqa: N802,N803
        transport = FakeTransport(4000 + len(self.spawned))
        proto.makeConnection(transport)
        self.spawned.append({"proto": proto, "args": args, "env": env, "path": path,
                             "uid": uid, "gid": gid, "childFDs": childFDs})


class PoolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = FakeProcessReactor()
        self.killed: list[int] = []
        self.pool = self.make_pool(size=1)

    def make_pool(self, **kw: Any) -> b.WorkerPool:
        kw.setdefault("unsandboxed", True)
        pool = b.WorkerPool(self.reactor, bot_user=f"{TEST_BOT_ID}:{TEST_BOT_ID}",
                            queue_timeout=30.0, **kw)
        pool.killpg = lambda pid, sig: self.killed.append(pid)
        pool.start()
        self.addCleanup(self.stop_pool, pool)
        return pool

    def stop_pool(self, pool: b.WorkerPool) -> None:
        pool.stop()
        for worker in list(pool.workers):
            self.end(worker)

    def worker(self, n: int = -1) -> Any:
        return self.reactor.spawned[n]["proto"]

    def ready(self, worker: Any) -> None:
        worker.outReceived(b'{"type":"ready","pid":1}\n')

    def end(self, worker: Any, reason: Any = None) -> None:
        if worker.exit:
            return
        worker.processEnded(Failure(reason or ProcessTerminated(signal=9)))

    def sent(self, worker: Any) -> list[dict[str, Any]]:
        return [json.loads(line) for line in worker.transport.written]

    def reply(self, worker: Any, **kw: Any) -> None:
        run_id = self.sent(worker)[-1]["id"]
        worker.outReceived(json.dumps({"type": "result", "id": run_id, **kw}).encode() + b"\n")

    def test_spawn_is_stripped_and_isolated(self) -> None:
        spawned = self.reactor.spawned[0]
        self.assertEqual(spawned["childFDs"], {0: "w", 1: "r", 2: "r"})
        self.assertEqual(set(spawned["env"]), {"PATH", "HOME", "TMPDIR", "LANG", "LC_ALL"})
        self.assertEqual(spawned["env"]["HOME"], spawned["path"])
        self.assertTrue(os.path.isdir(spawned["path"]))
        self.assertIn("-I", spawned["args"])
        self.assertIsNone(spawned["uid"])
        self.end(self.worker())
        self.assertFalse(os.path.exists(spawned["path"]))  # its temp folder goes with it

    def test_runs_after_ready_and_reuses_the_worker(self) -> None:
        d1 = self.pool.submit({"code": "x"}, 5.0)
        worker = self.worker()
        self.assertEqual(worker.transport.written, [])  # not before it is ready
        self.ready(worker)
        self.assertEqual(self.sent(worker)[0]["type"], "run")
        self.reply(worker, ok=True, resultType="text", result="r1")
        self.assertEqual(self.successResultOf(d1)["result"], "r1")
        d2 = self.pool.submit({"code": "y"}, 5.0)
        self.reply(worker, ok=True, resultType="none")
        self.assertTrue(self.successResultOf(d2)["ok"])
        self.assertEqual(len(self.reactor.spawned), 1)  # warm: no process per run

    def test_queue_order_and_queue_timeout(self) -> None:
        self.ready(self.worker())
        d1 = self.pool.submit({"n": 1}, 100.0)
        d2 = self.pool.submit({"n": 2}, 100.0)
        d3 = self.pool.submit({"n": 3}, 100.0)
        self.assertEqual([m["n"] for m in self.sent(self.worker())], [1])
        self.reply(self.worker(), ok=True)
        self.assertEqual([m["n"] for m in self.sent(self.worker())], [1, 2])
        self.assertNoResult(d3)
        self.reactor.advance(30)
        self.assertEqual(self.successResultOf(d3)["outcome"], b.BUSY)
        self.reply(self.worker(), ok=True)
        self.assertTrue(self.successResultOf(d1)["ok"] and self.successResultOf(d2)["ok"])
        self.assertEqual(len(self.sent(self.worker())), 2)  # the timed-out run never ran

    def test_full_queue_and_large_input(self) -> None:
        pool = self.make_pool(size=1, max_queue=1, max_message=1000)
        pool.submit({}, 5.0)
        self.assertEqual(self.successResultOf(pool.submit({}, 5.0))["outcome"], b.BUSY)
        big = pool.submit({"input": "x" * 2000}, 5.0)
        self.assertEqual(self.successResultOf(big)["outcome"], b.INVALID)

    def test_time_limit_backstop_kills_and_respawns(self) -> None:
        # The run's supervisor answers "timeout" at the limit itself; should it not, the
        # relay kills the whole worker a little later.
        worker = self.worker()
        self.ready(worker)
        d = self.pool.submit({}, 2.0)
        self.reactor.advance(2.0 + b.BACKSTOP_GRACE - 0.1)
        self.assertNoResult(d)
        self.reactor.advance(0.1)
        result = self.successResultOf(d)
        self.assertEqual(result["outcome"], b.TIMEOUT)
        self.assertIn("2s", result["error"])
        self.assertEqual(self.killed, [worker.pid])  # the whole process group
        self.assertEqual(worker.transport.signals, ["KILL"])
        self.end(worker)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.ready(self.worker())
        d = self.pool.submit({}, 2.0)
        self.reply(self.worker(), ok=True)
        self.assertTrue(self.successResultOf(d)["ok"])

    def test_supervisor_end_without_answer_fails_only_that_run(self) -> None:
        worker = self.worker()
        self.ready(worker)
        d1 = self.pool.submit({}, 5.0)
        d2 = self.pool.submit({}, 5.0)
        self.reply(worker, ok=True)
        worker.outReceived(b'{"type":"runEnded","exit":0}\n')  # run 1's: answered
        self.assertTrue(self.successResultOf(d1)["ok"])
        self.assertNoResult(d2)
        worker.outReceived(b'{"type":"runEnded","exit":70}\n')  # run 2's: no answer
        self.assertEqual(self.successResultOf(d2)["outcome"], b.CRASH)
        self.assertEqual(worker.transport.signals, [])  # the zygote stays
        d3 = self.pool.submit({}, 5.0)
        self.reply(worker, ok=True)
        self.assertTrue(self.successResultOf(d3)["ok"])

    def test_sandbox_required_unless_unsandboxed(self) -> None:
        # Sandboxed, a worker whose probe says the sandbox is not sound disables bots:
        # every run is refused (503), nothing runs, and no worker is started again.
        pool = self.make_pool(size=1, unsandboxed=False)
        if os.geteuid() != 0:
            self.assertIn("--bots-unsandboxed", pool.disabled)
        else:
            worker = self.worker()
            worker.outReceived(json.dumps({"type": "ready", "pid": 1, "sandbox": {
                "ok": True, "uid": TEST_BOT_ID, "network": True, "hiddenReadable": [],
                "tmp": True}}).encode() + b"\n")
            self.assertIn("network", pool.disabled)
            self.assertEqual(worker.transport.signals, ["KILL"])
            self.end(worker)
        result = self.successResultOf(pool.submit({}, 1.0))
        self.assertEqual(result["outcome"], b.DISABLED)
        self.assertEqual(b.HTTP_STATUS[result["outcome"]], 503)

    def test_never_root(self) -> None:
        for user, text in (("0:0", "root"), ("65534:65534", "nobody"),
                           ("no-such-user-here", "useradd")):
            ids, problem = b.resolve_bot_ids(user)
            self.assertIsNone(ids)
            self.assertIn(text, problem)
        if os.geteuid() == 0:
            pool = b.WorkerPool(self.reactor, bot_user="no-such-user-here", unsandboxed=True)
            pool.start()
            self.addCleanup(pool.stop)
            self.assertIn("useradd", pool.disabled)  # even unsandboxed: never as root

    def test_worker_death_fails_the_run_with_its_stderr(self) -> None:
        worker = self.worker()
        self.ready(worker)
        d = self.pool.submit({}, 5.0)
        worker.errReceived(b"Fatal Python error: Segmentation fault")
        self.end(worker, ProcessTerminated(signal=11))
        result = self.successResultOf(d)
        self.assertEqual(result["outcome"], b.CRASH)
        self.assertIn("signal 11", result["error"])
        self.assertIn("Segmentation fault", result["logs"])
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_garbage_and_oversized_replies_kill_the_worker(self) -> None:
        worker = self.worker()
        self.ready(worker)
        d = self.pool.submit({}, 5.0)
        worker.outReceived(b"not json\n")
        self.assertEqual(self.successResultOf(d)["outcome"], b.CRASH)
        self.assertEqual(worker.transport.signals, ["KILL"])
        self.end(worker)
        pool = self.make_pool(size=1, max_message=100)
        worker = self.worker()
        self.ready(worker)
        d = pool.submit({}, 5.0)
        worker.outReceived(b"{" + b"x" * 200)  # no newline, over the bound
        self.assertEqual(self.successResultOf(d)["outcome"], b.CRASH)

    def test_max_runs_recycles(self) -> None:
        pool = self.make_pool(size=1, max_runs=2)
        worker = self.worker()
        self.ready(worker)
        for _ in range(2):
            pool.submit({}, 5.0)
            self.reply(worker, ok=True)
        self.assertEqual(worker.transport.signals, ["KILL"])

    def test_early_deaths_back_off(self) -> None:
        self.end(self.worker(), ProcessDone(1))
        self.assertEqual(len(self.reactor.spawned), 1)
        self.reactor.advance(1.0)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.end(self.worker(), ProcessDone(1))
        self.reactor.advance(1.9)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.reactor.advance(0.1)
        self.assertEqual(len(self.reactor.spawned), 3)
        self.ready(self.worker())
        self.assertEqual(self.pool._early_deaths, 0)

    def test_early_death_backoff_is_injectable(self) -> None:
        # twisted's backoffPolicy shape: the policy gets the count of deaths in a row
        asked: list[int] = []
        self.pool.stop()
        pool = self.make_pool(size=1, respawn_policy=lambda n: asked.append(n) or 7.0)
        before = len(self.reactor.spawned)
        self.end(self.worker(), ProcessDone(1))
        self.reactor.advance(6.9)
        self.assertEqual(len(self.reactor.spawned), before)
        self.reactor.advance(0.1)
        self.assertEqual(len(self.reactor.spawned), before + 1)
        self.assertEqual(asked, [1])
        self.assertEqual(pool._early_deaths, 1)

    def test_default_respawn_backoff_doubles_to_30s(self) -> None:
        self.assertEqual([b.RESPAWN_BACKOFF(n) for n in range(1, 8)],
                         [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0])

    def test_startup_timeout(self) -> None:
        worker = self.worker()
        self.reactor.advance(b.STARTUP_TIMEOUT)
        self.assertEqual(worker.transport.signals, ["KILL"])

    def test_stop_fails_everything_and_waits_for_exit(self) -> None:
        worker = self.worker()
        self.ready(worker)
        running = self.pool.submit({}, 5.0)
        queued = self.pool.submit({}, 5.0)
        stopped = self.pool.stop()
        self.assertEqual(self.successResultOf(running)["outcome"], b.STOPPED)
        self.assertEqual(self.successResultOf(queued)["outcome"], b.STOPPED)
        self.assertNoResult(stopped)
        self.end(worker)
        self.successResultOf(stopped)
        self.assertEqual(len(self.reactor.spawned), 1)  # not respawned
        self.assertEqual(self.successResultOf(self.pool.submit({}, 1.0))["outcome"], b.STOPPED)


# -- the worker's run loop, in-process ----------------------------------------------------


def run(code: str, input: Any = HL7, content_type: str = "x-application/hl7-v2+er7",
        **kw: Any) -> dict[str, Any]:
    return botworker.run({"id": "1", "code": code, "botRef": "Bot/t", "timeLimit": 5,
                          "event": {"input": input, "contentType": content_type,
                                    "secrets": {"k": {"name": "k", "valueString": "v"}}}},
                         **kw)


class WorkerRunTests(SynchronousTestCase):
    def test_text_json_none_and_output(self) -> None:
        reply = run("import logging\n"
                    "def handler(medplum, event):\n"
                    "    print('got', event.contentType, event['secrets']['k']['valueString'])\n"
                    "    logging.warning('careful')\n"
                    "    return event.build_ack()\n")
        self.assertEqual((reply["ok"], reply["resultType"]), (True, "text"))
        self.assertIn("MSA|AA|CTRL0001", reply["result"])
        self.assertIn("got x-application/hl7-v2+er7 v", reply["logs"])
        self.assertIn("careful", reply["logs"])
        reply = run("def handler(m, e):\n    return {'n': [1, 2]}")
        self.assertEqual((reply["resultType"], json.loads(reply["result"])),
                         ("json", {"n": [1, 2]}))
        reply = run("def handler(m, e):\n    pass")
        self.assertEqual((reply["ok"], reply["resultType"], reply["result"]), (True, "none", None))
        reply = run("async def handler(m, e):\n    return 'async ok'")
        self.assertEqual(reply["result"], "async ok")
        reply = run("import hl7\ndef handler(m, e):\n    return hl7.parse(e.input)")
        self.assertEqual(reply["result"], HL7 + "\r")  # python-hl7 ends segments with \r

    def test_errors(self) -> None:
        reply = run("def handler(m, e):\n    x = 1\n    raise ValueError('bad order')\n")
        self.assertEqual((reply["ok"], reply["outcome"]), (False, b.ERROR))
        # the type and line for audit trails; the text (which may quote input) separately
        self.assertEqual((reply["error"], reply["errorType"], reply["errorLine"]),
                         ("ValueError (line 3)", "ValueError", 3))
        self.assertEqual(reply["errorText"], "ValueError: bad order")
        self.assertIn('File "<Bot/t>", line 3, in handler', reply["logs"])
        self.assertNotIn("botworker.py", reply["logs"])  # our frames are left out
        for code, text in (("def handler(:", "SyntaxError"), ("x = 1", "no handler"),
                           ("def handler(m, e):\n    return object()", "neither text nor JSON"),
                           ("def handler(m, e):\n    return float('nan')", "JSON")):
            reply = run(code)
            self.assertEqual(reply["outcome"], b.INVALID, code)
            self.assertIn(text, reply["error"])
        reply = run("import sys\ndef handler(m, e):\n    sys.exit(3)")
        self.assertEqual(reply["outcome"], b.ERROR)
        reply = run("def handler(m, e):\n    return e.build_ack()", input="{}",
                    content_type="application/json")
        self.assertIn("needs an HL7 v2 input", reply["errorText"])

    def test_output_is_bounded_and_state_does_not_leak(self) -> None:
        reply = run("def handler(m, e):\n    print('x' * 100000)", max_log=1000)
        self.assertLess(len(reply["logs"]), 1100)
        self.assertIn("[output truncated]", reply["logs"])
        run("import logging\nlogging.basicConfig()\nX = 1\ndef handler(m, e):\n    pass")
        reply = run("def handler(m, e):\n    return 'X' in globals()")
        self.assertEqual(reply["result"], "false")


# -- Bot resources ----------------------------------------------------------------------------


class BotResourceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = InlineReactor()
        self.store = SQLiteStore(inline_database(self, SQLiteStore.schema(), self.clock))

    def code(self, bot: dict[str, Any]) -> str:
        return self.successResultOf(ensureDeferred(b.bot_code(self.store, bot)))

    def test_code_sources(self) -> None:
        src = "def handler(m, e):\n    return 1\n"
        data = base64.b64encode(src.encode()).decode()
        self.assertEqual(self.code({"code": src}), src)
        self.assertEqual(self.code({"executableCode": {"contentType": "text/x-python",
                                                       "data": data}}), src)
        binary = self.successResultOf(self.store.create(
            {"resourceType": "Binary", "contentType": "text/x-python", "data": data}))
        self.assertEqual(self.code({"sourceCode": {"url": f"Binary/{binary['id']}"}}), src)
        for bot, text in (({}, "no code"), ({"code": "   "}, "no code"),
                          ({"sourceCode": {"data": "@@@"}}, "not base64"),
                          ({"sourceCode": {"url": "Binary/missing"}}, "does not exist"),
                          ({"code": src, "runtimeVersion": "vmcontext"}, "not supported")):
            f = self.failureResultOf(ensureDeferred(b.bot_code(self.store, bot)),
                                     b.BotCodeError)
            self.assertIn(text, str(f.value))

    def test_secrets_limits_and_types(self) -> None:
        self.assertEqual(b.bot_secrets({"secret": [{"name": "a", "valueString": "1"}, "x"]}),
                         {"a": {"name": "a", "valueString": "1"}})
        self.assertEqual(b.bot_time_limit({"timeout": 5}, 10, 60), 5.0)
        self.assertEqual(b.bot_time_limit({"timeout": 500}, 10, 60), 60.0)
        self.assertEqual(b.bot_time_limit({"timeout": True}, 10, 60), 10.0)
        self.assertEqual(b.parse_input("application/fhir+json", '{"a":1}'), {"a": 1})
        self.assertEqual(b.parse_input("application/json", "{bad"), "{bad")
        self.assertEqual(b.parse_input("x-application/hl7-v2+er7", "MSH"), "MSH")
        self.assertEqual(b.answer_type("x-application/hl7-v2+er7", "text"),
                         "x-application/hl7-v2+er7")
        self.assertEqual(b.answer_type("application/json", "text"), "text/plain")
        self.assertEqual(b.answer_type("text/plain", "json"), "application/json")

    def test_base_url_from_listen(self) -> None:
        for listen, url in (("tcp:8103:interface=127.0.0.1", "http://127.0.0.1:8103"),
                            ("tcp:8103", "http://127.0.0.1:8103"),
                            ("tcp:port=9000:interface=0.0.0.0", "http://127.0.0.1:9000"),
                            ("tcp6:9000:interface=\\:\\:1", "http://[::1]:9000"),
                            ("ssl:8443:privateKey=k.pem", "https://127.0.0.1:8443"),
                            ("unix:/tmp/s", None), ("tcp:0", None)):
            self.assertEqual(b.base_url_from_listen(listen), url, listen)

    def test_audit_event_has_no_payload(self) -> None:
        event = b.audit_event(trigger="channel", outcome=b.TIMEOUT, started=100.0, ended=101.5,
                              summary="Bot run (channel): timeout", logs="PID|1||MRN-42" * 100,
                              bot={"name": "ADT"}, bot_ref="Bot/1", requester="Agent/a",
                              entities=["Agent/a"])
        self.assertEqual((event["resourceType"], event["outcome"], event["action"]),
                         ("AuditEvent", "8", "E"))
        self.assertEqual(event["outcomeDesc"], "Bot run (channel): timeout")
        self.assertNotIn("MRN-42", json.dumps(event))  # the output: its size only
        details = {x["url"]: x for x in event["extension"][0]["extension"]}
        self.assertEqual(details["trigger"]["valueCode"], "channel")
        self.assertEqual(details["durationMs"]["valueDecimal"], 1500.0)
        self.assertEqual(details["outputBytes"]["valueInteger"], 1300)
        self.assertEqual([a["who"] for a in event["agent"]],
                         [{"reference": "Bot/1", "display": "ADT"}, {"reference": "Agent/a"}])


# -- integration: real relay, real workers ---------------------------------------------------


LOOP = "def handler(medplum, event):\n    while True:\n        pass\n"
GREEDY = ("def handler(medplum, event):\n    hoard = []\n    while True:\n"
          "        hoard.append(bytearray(16 * 1024 * 1024))\n")
RAISES = "def handler(medplum, event):\n    raise RuntimeError('order has no patient')\n"
DIES = "import os\ndef handler(medplum, event):\n    os._exit(7)\n"
ECHO = ("def handler(medplum, event):\n    print('echo bot ran')\n"
        "    return {'input': event.input, 'contentType': event.contentType,\n"
        "            'requester': event.requester, 'bot': event.bot}\n")
ACK = "def handler(medplum, event):\n    return event.build_ack()\n"


def access(read: list[str] = (), write: list[str] = (), push: list[str] = ()
           ) -> dict[str, Any]:
    """The bot-access extension of a Bot resource (what its token may do)."""
    from medagent.relay.auth import EXT_BOT_ACCESS

    return {"url": EXT_BOT_ACCESS, "extension": (
        [{"url": "read", "valueCode": t} for t in read]
        + [{"url": "write", "valueCode": t} for t in write]
        + [{"url": "push", "valueReference": {"reference": f"Agent/{a}"}} for a in push])}


class RelayBotsBase(TestCase):
    timeout = 120
    workers = 2

    def setUp(self) -> Deferred:
        return ensureDeferred(self._setUp())

    async def _setUp(self) -> None:
        self.data_dir = tempfile.mkdtemp(prefix="relay-bots-")
        self.relay = RelayService(reactor, data_dir=self.data_dir,
                                  listen="tcp:0:interface=127.0.0.1",
                                  bot_workers=self.workers, bot_time_limit=10.0,
                                  subscription_retry_base=0.5, **bot_sandbox())
        self.relay.startService()
        self.addCleanup(self.relay.stopService)
        self.base = self.relay.urls()[0]
        self.pool = HTTPConnectionPool(reactor)
        self.addCleanup(self.pool.closeCachedConnections)
        admin = await self.relay.authority.create_client("admin")
        r = await treq.post(self.base + "/oauth2/token", data={
            "grant_type": "client_credentials", "client_id": admin["clientId"],
            "client_secret": admin["clientSecret"]}, pool=self.pool)
        self.token = (await r.json())["access_token"]
        await procs.wait_until(lambda: len(self.relay.bot_pool._idle) == self.workers,
                               timeout=30, what="bot workers ready")

    async def call(self, method: str, path: str, body: Any = None, *,
                   ctype: str = "application/fhir+json", raw: bytes | None = None
                   ) -> tuple[int, Any, Any]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None
                                            else None)
        r = await treq.request(method, self.base + path, data=data, pool=self.pool,
                               headers={"Content-Type": [ctype],
                                        "Authorization": [f"Bearer {self.token}"]})
        content = await r.content()
        try:
            parsed = json.loads(content)
        except ValueError:
            parsed = content.decode("utf-8", "replace")
        return r.code, parsed, r.headers

    async def bot(self, code: str, **extra: Any) -> dict[str, Any]:
        code_, bot, _ = await self.call("POST", "/fhir/R4/Bot",
                                        {"resourceType": "Bot", "name": "test bot",
                                         "code": code, **extra})
        self.assertEqual(code_, 201, bot)
        return bot

    async def audit(self, headers: Any) -> dict[str, Any]:
        audit_id = headers.getRawHeaders("x-medagent-auditevent")[0]
        code, event, _ = await self.call("GET", f"/fhir/R4/AuditEvent/{audit_id}")
        self.assertEqual(code, 200)
        return event

    async def audits(self) -> list[dict[str, Any]]:
        code, bundle, _ = await self.call("GET", "/fhir/R4/AuditEvent?_count=1000")
        return [e["resource"] for e in bundle.get("entry") or []]

    async def healthy(self) -> None:
        code, body, _ = await self.call("GET", "/healthz")
        self.assertEqual((code, body["status"]), (200, "ok"))


def details(event: dict[str, Any]) -> dict[str, Any]:
    return {x["url"]: next(v for k, v in x.items() if k.startswith("value"))
            for x in event["extension"][0]["extension"]}


class ExecuteTests(RelayBotsBase):
    def test_execute_json_and_hl7(self) -> Deferred:
        async def go() -> None:
            bot = await self.bot(ECHO)
            code, result, headers = await self.call(
                "POST", f"/fhir/R4/Bot/{bot['id']}/$execute", {"mrn": "PHI-MARKER-123"},
                ctype="application/json")
            self.assertEqual(code, 200, result)
            self.assertEqual(headers.getRawHeaders("content-type"), ["application/json"])
            self.assertEqual(result["input"], {"mrn": "PHI-MARKER-123"})
            self.assertEqual(result["bot"]["reference"], f"Bot/{bot['id']}")
            self.assertTrue(result["requester"]["reference"].startswith("ClientApplication/"))
            event = await self.audit(headers)
            self.assertEqual((event["outcome"], details(event)["trigger"]), ("0", "execute"))
            # no input, no result, no output: sizes only
            self.assertNotIn("echo bot ran", json.dumps(event))
            self.assertNotIn("PHI-MARKER-123", json.dumps(event))
            self.assertEqual(details(event)["outputBytes"], len("echo bot ran\n"))
            self.assertEqual(details(event)["inputBytes"], len('{"mrn":"PHI-MARKER-123"}'))
            self.assertEqual(event["entity"][0]["what"]["reference"], f"Bot/{bot['id']}")
            ack_bot = await self.bot(ACK)
            code, ack, headers = await self.call(
                "POST", f"/fhir/R4/Bot/{ack_bot['id']}/$execute", raw=HL7.encode(),
                ctype="x-application/hl7-v2+er7")
            self.assertEqual(code, 200)
            self.assertEqual(headers.getRawHeaders("content-type"), ["x-application/hl7-v2+er7"])
            self.assertIn("MSA|AA|CTRL0001", ack)
            self.assertTrue(ack.startswith("MSH|^~\\&|EHR|HOSP|LAB|FAC|"))
            code, outcome, _ = await self.call("POST", "/fhir/R4/Bot/nope/$execute", {})
            self.assertEqual(code, 404)
            code, outcome, _ = await self.call("GET", f"/fhir/R4/Bot/{bot['id']}/$execute")
            self.assertEqual(code, 405)

        return ensureDeferred(go())

    def test_failures_are_audited_and_the_relay_keeps_answering(self) -> Deferred:
        async def go() -> None:
            cases = [
                (RAISES, {}, 400, b.ERROR, "4", "order has no patient"),
                (LOOP, {"timeout": 1.5}, 504, b.TIMEOUT, "8", "time limit of 1.5s"),
                (GREEDY, {}, 400, b.MEMORY, "8", "MemoryError"),
                (DIES, {}, 500, b.CRASH, "8", "exit code 7"),
                ("def handler(:\n", {}, 400, b.INVALID, "4", "SyntaxError"),
            ]
            for code_text, extra, status, outcome, audit_outcome, text in cases:
                bot = await self.bot(code_text, **extra)
                started = time.monotonic()
                code, body, headers = await self.call(
                    "POST", f"/fhir/R4/Bot/{bot['id']}/$execute", raw=b"x", ctype="text/plain")
                self.assertEqual(code, status, (outcome, body))
                # the admin who ran it sees the exception's text; the AuditEvent does not
                shown = body["issue"][0]["details"]["text"] + \
                    body["issue"][0].get("diagnostics", "")
                self.assertIn(text, shown)
                event = await self.audit(headers)
                self.assertEqual((event["outcome"], details(event)["outcome"]),
                                 (audit_outcome, outcome))
                await self.healthy()
                if outcome == b.TIMEOUT:
                    self.assertLess(time.monotonic() - started, 5.0)
                self.assertNotIn("order has no patient", json.dumps(event))
            await procs.wait_until(lambda: len(self.relay.bot_pool._idle) == self.workers,
                                   timeout=30, what="workers idle")
            # Each run was its own fork: loop, memory and exit cost no worker.
            self.assertEqual(self.relay.bot_pool.spawned, self.workers)
            bot = await self.bot(ECHO)
            code, result, _ = await self.call("POST", f"/fhir/R4/Bot/{bot['id']}/$execute",
                                              {"ok": 1})
            self.assertEqual((code, result["input"]), (200, {"ok": 1}))

        return ensureDeferred(go())

    def test_workers_stay_warm(self) -> Deferred:
        async def go() -> None:
            bot = await self.bot(ACK)
            for i in range(20):
                code, ack, _ = await self.call(
                    "POST", f"/fhir/R4/Bot/{bot['id']}/$execute",
                    raw=HL7.replace("CTRL0001", f"C{i}").encode(),
                    ctype="x-application/hl7-v2+er7")
                self.assertIn(f"MSA|AA|C{i}", ack)
            self.assertEqual(self.relay.bot_pool.spawned, self.workers)

        return ensureDeferred(go())

    def test_worker_isolation(self) -> Deferred:
        async def go() -> None:
            os.environ["MEDAGENT_TEST_RELAY_SECRET"] = "must-not-leak"
            self.addCleanup(os.environ.pop, "MEDAGENT_TEST_RELAY_SECRET", None)
            # A fresh worker, spawned while the relay's environment has the secret.
            self.relay.bot_pool.workers[0].kill()
            await procs.wait_until(lambda: self.relay.bot_pool.spawned == self.workers + 1
                                   and len(self.relay.bot_pool._idle) == self.workers,
                                   timeout=30, what="worker replaced")
            bot = await self.bot(
                "import os, resource\n"
                "import csv, email.mime.text, sqlite3, xml.etree.ElementTree  # not preloaded\n"
                "def handler(medplum, event):\n"
                "    return {'env': dict(os.environ), 'cwd': os.getcwd(),\n"
                "            'as': resource.getrlimit(resource.RLIMIT_AS)[0],\n"
                "            'uid': os.getuid(), 'fds': sorted(os.listdir('/proc/self/fd')),\n"
                "            'dev': [open('/dev/null').read(), len(open('/dev/urandom',\n"
                "                                                            'rb').read(4))],\n"
                "            'pgid': os.getpgrp() == os.getpid()}\n")
            code, seen, _ = await self.call("POST", f"/fhir/R4/Bot/{bot['id']}/$execute", {})
            self.assertEqual(code, 200, seen)
            self.assertEqual(set(seen["env"]), {"PATH", "HOME", "TMPDIR", "LANG", "LC_ALL"})
            self.assertNotIn("must-not-leak", json.dumps(seen))
            if os.geteuid() == 0:  # sandboxed: a private /tmp, the bots' own uid
                self.assertEqual((seen["cwd"], seen["uid"]), ("/tmp", TEST_BOT_ID))
            else:
                self.assertIn("medagent-bot-", seen["cwd"])
            self.assertNotEqual(seen["cwd"], os.getcwd())
            # stdin, stdout (null), stderr, its answer pipe, the supervisor's lifeline (and
            # the descriptor listdir used): none of the relay's, not the protocol pipes
            self.assertEqual(len(seen["fds"]), 6, seen["fds"])
            self.assertEqual(seen["dev"], ["", 4])  # /dev/null and /dev/urandom still work
            self.assertEqual(seen["as"], 256 * 1024 * 1024)
            self.assertTrue(seen["pgid"])
            for worker in self.relay.bot_pool.workers:
                self.assertEqual(worker.info["inheritedFds"], [0, 1, 2])

        return ensureDeferred(go())

    def test_medplum_client_inside_a_bot(self) -> Deferred:
        async def go() -> None:
            device = await self.relay.store.create({"resourceType": "Device",
                                                    "url": "mllp://127.0.0.1:9"})
            agent = await self.relay.store.create({  # a Bot pushes only to the Agent's Devices
                "resourceType": "Agent", "name": "lab", "status": "active",
                "device": {"reference": f"Device/{device['id']}"}})
            bot = await self.bot(
                "def handler(medplum, event):\n"
                "    me = medplum.request('GET', '/auth/me')\n"
                "    p = medplum.create_resource({'resourceType': 'Patient',\n"
                "                                 'name': [{'family': 'Botson'}]})\n"
                "    p['gender'] = 'female'\n"
                "    p = medplum.updateResource(p)\n"
                "    found = medplum.search_resources('Patient', 'name=botson')\n"
                "    one = medplum.search_one('Patient', {'_id': p['id']})\n"
                "    read = medplum.read_reference({'reference': 'Patient/' + p['id']})\n"
                "    medplum.delete_resource('Patient', p['id'])\n"
                "    try:\n"
                "        medplum.read_resource('Patient', p['id'])\n"
                "        gone = False\n"
                "    except Exception as e:\n"
                "        gone = e.status\n"
                "    pushed = medplum.push_to_agent(event.secrets['agent']['valueString'],\n"
                "        'mllp://127.0.0.1:9', 'MSH|^~\\\\&|A|B|C|D|2024||ORM^O01|BOT1|P|2.5',\n"
                "        'x-application/hl7-v2+er7')\n"
                "    return {'me': me[2].decode(), 'version': p['meta']['versionId'],\n"
                "            'found': [x['id'] for x in found], 'one': one['id'],\n"
                "            'read': read['gender'], 'gone': gone, 'pushed': pushed}\n",
                secret=[{"name": "agent", "valueString": agent["id"]}],
                extension=[access(write=["Patient"], push=[agent["id"]])])
            code, seen, _ = await self.call("POST", f"/fhir/R4/Bot/{bot['id']}/$execute", {})
            self.assertEqual(code, 200, seen)
            self.assertEqual(json.loads(seen["me"])["profile"]["id"], f"Bot/{bot['id']}")
            self.assertEqual(seen["version"], "2")
            self.assertEqual((seen["read"], seen["gone"]), ("female", 404))
            self.assertEqual(seen["found"], [seen["one"]])
            self.assertEqual(seen["pushed"]["resourceType"], "OperationOutcome")
            push_id = seen["pushed"]["issue"][0]["diagnostics"].rsplit("/", 1)[1]
            push = await self.relay.journal.get(push_id)
            self.assertEqual((push.requester, push.state), (f"Bot/{bot['id']}", "queued"))

        return ensureDeferred(go())


class SubscriptionRunTests(RelayBotsBase):
    def test_bot_runs_after_the_http_write_and_retries(self) -> Deferred:
        async def go() -> None:
            # The bot waits at a gate the test opens: a resource it may read (nothing else
            # of the host is visible from its sandbox).
            code, gate, _ = await self.call("POST", "/fhir/R4/Task", {
                "resourceType": "Task", "status": "on-hold", "intent": "order"})
            self.assertEqual(code, 201, gate)
            bot = await self.bot(
                "import time\n"
                "def handler(medplum, event):\n"
                "    gate = event.secrets['gate']['valueString']\n"
                "    for _ in range(500):\n"
                "        if medplum.read_resource('Task', gate)['status'] == 'ready':\n"
                "            break\n"
                "        time.sleep(0.01)\n"
                "    if event.headers['X-Medagent-Attempt'] == '1':\n"
                "        raise RuntimeError('first attempt fails')\n"
                "    return 'seen ' + event.input['id']\n",
                secret=[{"name": "gate", "valueString": gate["id"]}],
                extension=[access(read=["Task"])])
            code, sub, _ = await self.call("POST", "/fhir/R4/Subscription", {
                "resourceType": "Subscription", "status": "active", "reason": "t",
                "criteria": "Patient", "channel": {"type": "rest-hook",
                                                   "endpoint": f"Bot/{bot['id']}"}})
            self.assertEqual(code, 201)
            code, patient, _ = await self.call("POST", "/fhir/R4/Patient",
                                               {"resourceType": "Patient"})
            self.assertEqual(code, 201)
            # The write answered while the bot is still held at its gate.
            await procs.wait_until(lambda: any(w.job for w in self.relay.bot_pool.workers),
                                   timeout=10, what="bot started")
            self.assertEqual(await self.audits(), [])
            [pending] = await self.relay.subscriptions.deliveries(sub["id"])
            self.assertEqual((pending.state, pending.attempts), ("pending", 1))
            gate["status"] = "ready"
            code, _, _ = await self.call("PUT", f"/fhir/R4/Task/{gate['id']}", gate)
            self.assertEqual(code, 200)

            async def delivered() -> Any:
                found = await self.relay.subscriptions.deliveries(sub["id"])
                return found and found[0].state == "delivered" and found[0]

            delivery = await procs.wait_until(delivered, timeout=30, what="delivery")
            self.assertEqual(delivery.attempts, 2)
            audits = await self.audits()
            self.assertEqual(sorted(a["outcome"] for a in audits), ["0", "4"])
            for audit in audits:
                self.assertEqual(details(audit)["trigger"], "subscription")
                refs = {e["what"]["reference"] for e in audit["entity"]}
                self.assertEqual(refs, {f"Bot/{bot['id']}", f"Subscription/{sub['id']}",
                                        f"Patient/{patient['id']}"})

        return ensureDeferred(go())


class _Hook:
    """A webhook receiver (twisted.web on loopback) that fails its first request."""

    def __init__(self) -> None:
        from twisted.web.resource import Resource

        self.requests: list[tuple[bytes, dict[str, str]]] = []
        hook = self

        class Receiver(Resource):
            isLeaf = True

            def render_POST(self, request: Any) -> bytes:  # noqa: N802
                hook.requests.append((request.content.read(), {
                    k.decode().lower(): v[-1].decode()
                    for k, v in request.requestHeaders.getAllRawHeaders()}))
                request.setResponseCode(500 if len(hook.requests) == 1 else 204)
                return b"x" * 200_000 if len(hook.requests) == 1 else b""

        self.resource = Receiver()


class WebhookTests(RelayBotsBase):
    def test_url_subscription_is_signed_and_retried(self) -> Deferred:
        import hashlib
        import hmac

        from twisted.web.server import Site

        async def go() -> None:
            hook = _Hook()
            port = reactor.listenTCP(0, Site(hook.resource), interface="127.0.0.1")
            self.addCleanup(port.stopListening)
            url = f"http://127.0.0.1:{port.getHost().port}/hook"
            # plain http to loopback is refused unless an admin allowed the origin
            self.relay.subscriptions.policy.allow(url)
            code, sub, _ = await self.call("POST", "/fhir/R4/Subscription", {
                "resourceType": "Subscription", "status": "active", "reason": "t",
                "criteria": "Patient?name=hook",
                "channel": {"type": "rest-hook", "endpoint": url,
                            "header": ["X-Team: lab"]},
                "extension": [{"url": "https://www.medplum.com/fhir/StructureDefinition/"
                                      "subscription-secret", "valueString": "hush"}]})
            self.assertEqual(code, 201)
            await self.call("POST", "/fhir/R4/Patient", {"resourceType": "Patient",
                                                         "name": [{"family": "Other"}]})
            code, patient, _ = await self.call("POST", "/fhir/R4/Patient", {
                "resourceType": "Patient", "name": [{"family": "Hookman"}]})

            async def delivered() -> Any:
                found = await self.relay.subscriptions.deliveries(sub["id"])
                return found and found[0].state == "delivered" and found[0]

            delivery = await procs.wait_until(delivered, timeout=30, what="webhook delivered")
            self.assertEqual(delivery.attempts, 2)  # the 500 was retried
            self.assertEqual(len(hook.requests), 2)
            body, headers = hook.requests[-1]
            self.assertEqual(json.loads(body), patient)
            self.assertEqual(headers["x-signature"],
                             hmac.new(b"hush", body, hashlib.sha256).hexdigest())
            self.assertEqual((headers["content-type"], headers["x-team"],
                              headers["x-medplum-interaction"]),
                             ("application/fhir+json", "lab", "create"))
            audits = await self.audits()
            self.assertEqual(sorted(a["outcome"] for a in audits), ["0", "4"])

        return ensureDeferred(go())


from medagent.demo import ORDER_BOT  # noqa: E402  (the demo's bot, tested here)


class OrderBotEndToEnd(RelayBotsBase):
    """
    The seed example: a ServiceRequest is created → a Subscription fires a Bot → the Bot
    builds an ORM with L{medagent.hl7.orders} and pushes it → a real agent process delivers
    it over MLLP to a real third-party listener (python-hl7) → the ACK comes back.  Revoking
    the order sends the cancel.
    """

    workers = 1

    def test_order_create_and_cancel_reach_the_lab(self) -> Deferred:
        from tests.peerenv import FIXTURES

        async def go() -> None:
            lab_port = procs.free_port()
            lab = procs.python(self, "python-hl7-server",
                               [os.path.join(FIXTURES, "hl7", "pyhl7_server.py"),
                                str(lab_port)])
            await lab.wait_for("MLLP server on", timeout=20)
            store = self.relay.store
            lab_device = await store.create({"resourceType": "Device",
                                             "url": f"mllp://127.0.0.1:{lab_port}"})
            agent = await store.create({"resourceType": "Agent", "name": "lab agent",
                                        "status": "active",
                                        "device": {"reference": f"Device/{lab_device['id']}"}})
            creds = await self.relay.authority.create_client("agent", [agent["id"]])
            procs.agent_process(self, self.base, creds, agent["id"])
            await procs.wait_until(lambda: self.relay.hub.is_connected(agent["id"]),
                                   timeout=30, what="agent connected")
            bot = await self.bot(ORDER_BOT, secret=[
                {"name": "agent", "valueString": agent["id"]},
                {"name": "device", "valueString": f"mllp://127.0.0.1:{lab_port}"}],
                extension=[access(read=["Patient"], push=[agent["id"]])])
            code, sub, _ = await self.call("POST", "/fhir/R4/Subscription", {
                "resourceType": "Subscription", "status": "active", "reason": "lab orders",
                "criteria": "ServiceRequest",
                "channel": {"type": "rest-hook", "endpoint": f"Bot/{bot['id']}"},
                "extension": [{"url": "https://medplum.com/fhir/StructureDefinition/"
                                      "subscription-supported-interaction",
                               "valueCode": i} for i in ("create", "update")]})
            self.assertEqual(code, 201, sub)
            code, patient, _ = await self.call("POST", "/fhir/R4/Patient", {
                "resourceType": "Patient", "name": [{"family": "Doe", "given": ["Jane"]}],
                "birthDate": "1980-01-01", "gender": "female",
                "identifier": [{"type": {"coding": [{"code": "MR"}]}, "value": "MRN12345"}]})
            code, order, _ = await self.call("POST", "/fhir/R4/ServiceRequest", {
                "resourceType": "ServiceRequest", "status": "active", "intent": "order",
                "subject": {"reference": f"Patient/{patient['id']}"},
                "identifier": [{"type": {"coding": [{"code": "PLAC"}]}, "value": "ORD-77"}],
                "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7",
                                     "display": "Glucose"}]}})
            self.assertEqual(code, 201, order)

            async def deliveries(n: int) -> Any:
                found = await self.relay.subscriptions.deliveries(sub["id"])
                done = [d for d in found if d.state != "pending"]
                return len(done) >= n and found

            [first] = await procs.wait_until(lambda: deliveries(1), timeout=60,
                                             what="order delivered")
            self.assertEqual((first.state, first.attempts), ("delivered", 1), first.last_error)
            await lab.wait_for("ORC|NW", timeout=10)
            received = [line for line in lab.text.splitlines() if line.startswith("RECV")]
            self.assertEqual(len(received), 1)
            segments = received[0].split(": ", 1)[1].split("\\r")
            by_name = {s.split("|", 1)[0]: s for s in segments}
            self.assertTrue(by_name["MSH"].startswith("MSH|^~\\&|MEDAGENT|HOSP|LIS|LAB|"))
            self.assertIn("|ORM^O01^ORM_O01|", by_name["MSH"])
            self.assertTrue(by_name["PID"].startswith("PID|1||MRN12345"))
            self.assertIn("|Doe^Jane", by_name["PID"])
            self.assertTrue(by_name["ORC"].startswith("ORC|NW|ORD-77^MEDAGENT"))
            self.assertTrue(by_name["OBR"].startswith("OBR|1|ORD-77^MEDAGENT||2345-7^Glucose^LN"))

            order["status"] = "revoked"
            code, revoked, _ = await self.call("PUT", f"/fhir/R4/ServiceRequest/{order['id']}",
                                               order)
            self.assertEqual(code, 200)
            await procs.wait_until(lambda: deliveries(2), timeout=60, what="cancel delivered")
            await lab.wait_for("ORC|CA", timeout=10)
            self.assertEqual(lab.count("RECV from"), 2)
            audits = [a for a in await self.audits()
                      if details(a)["trigger"] == "subscription"]
            self.assertEqual(sorted(a["outcome"] for a in audits), ["0", "0"])
            self.assertFalse(any("device answered" in json.dumps(a) for a in audits))
            self.assertNotIn("MRN12345", json.dumps(audits))

        return ensureDeferred(go())
