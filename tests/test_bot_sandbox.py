"""
The bot sandbox, tested as attacks: each test is a Bot that tries to break out, run against a
real relay with real worker processes, and asserts that it fails.  As root (as in CI) the
bots get the real sandbox with a uid of their own; the attacks need it, so they are skipped
(saying so) only on a machine where the tests do not run as root.
"""

from __future__ import annotations

import errno
import json
import os
import uuid
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SkipTest

from medagent import wire
from tests import procs
from tests.test_bots import ECHO, TEST_BOT_ID, RelayBotsBase, access
from tests.test_hub import FakeConnection


def _status(pid: str) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/status") as f:
            return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    except OSError:
        return {}


def processes_of(uid: int) -> list[int]:
    """Live (not zombie) processes whose real uid is C{uid}."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            status = _status(pid)
            if status.get("Uid", "").split("\t")[:1] == [str(uid)] and \
                    not status.get("State", "").startswith("Z"):
                found.append(int(pid))
    return found


def processes_with(marker: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read().split(b"\0"):
                    if not _status(pid).get("State", "").startswith("Z"):
                        found.append(int(pid))
        except OSError:
            pass
    return found


class SandboxBase(RelayBotsBase):
    def setUp(self) -> Deferred:
        if os.geteuid() != 0:
            raise SkipTest("the bot sandbox needs root (CI runs the tests as root)")
        return super().setUp()

    async def execute(self, code: str, body: Any = None, **extra: Any
                      ) -> tuple[int, Any, dict[str, Any]]:
        bot = await self.bot(code, **extra)
        status, result, _ = await self.call("POST", f"/fhir/R4/Bot/{bot['id']}/$execute",
                                            body if body is not None else {},
                                            ctype="application/json")
        return status, result, bot


class FilesystemTests(SandboxBase):
    def test_bot_cannot_read_the_key_or_the_database(self) -> Deferred:
        async def go() -> None:
            status, seen, _ = await self.execute(
                "import os\n"
                "def handler(medplum, event):\n"
                "    got = {}\n"
                "    for name in ('token.key', 'relay.sqlite', ''):\n"
                "        path = os.path.join(event.input['data'], name)\n"
                "        try:\n"
                "            got[name] = os.listdir(path) if not name else \\\n"
                "                open(path, 'rb').read(16).hex()\n"
                "        except OSError as e:\n"
                "            got[name] = 'refused: ' + type(e).__name__\n"
                "    try:\n"
                "        got['relay-env'] = open('/proc/%d/environ' % event.input['relay'],\n"
                "                                'rb').read(10).hex()\n"
                "    except OSError as e:\n"
                "        got['relay-env'] = 'refused: ' + type(e).__name__\n"
                "    return got\n",
                {"data": self.data_dir, "relay": os.getpid()})
            self.assertEqual(status, 200, seen)
            self.assertTrue(os.path.exists(os.path.join(self.data_dir, "token.key")))
            for name, what in seen.items():
                self.assertTrue(str(what).startswith("refused"), (name, what))
            self.assertEqual(os.stat(self.data_dir).st_mode & 0o777, 0o700)

        return ensureDeferred(go())

    def test_a_huge_file_or_many_files_cannot_fill_the_disk(self) -> Deferred:
        async def go() -> None:
            status, seen, _ = await self.execute(
                "import os\n"
                "def handler(medplum, event):\n"
                "    chunk = b'x' * (1 << 20)\n"
                "    written, errors = 0, []\n"
                "    for i in range(3):\n"
                "        try:\n"
                "            with open('big%d' % i, 'wb') as f:\n"
                "                for _ in range(60):\n"
                "                    f.write(chunk)\n"
                "                    f.flush()\n"
                "                    written += len(chunk)\n"
                "        except OSError as e:\n"
                "            errors.append(e.errno)\n"
                "        try:\n"
                "            os.remove('big%d' % i) if i == 2 else None\n"
                "        except OSError:\n"
                "            pass\n"
                "    outside = []\n"
                "    for path in ('/var/lib/medagent-bot-escape', '/root/x', '/etc/x',\n"
                "                 event.input['cwd'] + '/bot-escape'):\n"
                "        try:\n"
                "            open(path, 'wb').write(b'x')\n"
                "            outside.append(path)\n"
                "        except OSError:\n"
                "            pass\n"
                "    return {'written': written, 'errors': errors, 'outside': outside}\n",
                {"cwd": os.getcwd()})
            self.assertEqual(status, 200, seen)
            # a private 64 MB /tmp: the second file already does not fit
            self.assertLessEqual(seen["written"], 64 * (1 << 20))
            self.assertIn(errno.ENOSPC, seen["errors"])
            self.assertEqual(seen["outside"], [])  # everything else is read-only
            self.assertFalse(os.path.exists(os.path.join(os.getcwd(), "bot-escape")))
            await self.healthy()

        return ensureDeferred(go())


class ProcessTests(SandboxBase):
    def test_setsid_child_dies_at_the_time_limit(self) -> Deferred:
        marker = "%d.%d" % (7000 + os.getpid() % 1000, uuid.uuid4().int % 10 ** 6)

        async def go() -> None:
            escape = ("import os\n"
                      "def handler(medplum, event):\n"
                      "    if os.fork() == 0:\n"
                      "        os.setsid()\n"
                      "        if os.fork() == 0:\n"
                      "            os.execv('/bin/sleep', ['sleep', event.input['m']])\n"
                      "        os._exit(0)\n"
                      "    os.wait()\n"
                      "    while event.input['loop']:\n"
                      "        pass\n")
            status, body, _ = await self.execute(escape, {"m": marker, "loop": True},
                                                 timeout=2)
            self.assertEqual(status, 504, body)
            await procs.wait_until(lambda: not processes_with(marker), timeout=10,
                                   what="the setsid child killed with its run")
            # and one that returns at once: its escapee dies with the run too
            status, body, _ = await self.execute(escape, {"m": marker, "loop": False})
            self.assertEqual(status, 200, body)
            self.assertEqual(processes_with(marker), [])
            self.assertEqual(processes_of(TEST_BOT_ID), [])

        def cleanup() -> None:
            for pid in processes_with(marker):
                os.kill(pid, 9)

        self.addCleanup(cleanup)
        return ensureDeferred(go())

    def test_fork_bomb_is_bounded(self) -> Deferred:
        async def go() -> None:
            status, seen, _ = await self.execute(
                "import os, time\n"
                "def handler(medplum, event):\n"
                "    n = 0\n"
                "    for _ in range(300):\n"
                "        try:\n"
                "            pid = os.fork()\n"
                "        except OSError as e:\n"
                "            return {'forks': n, 'errno': e.errno}\n"
                "        if pid == 0:\n"
                "            time.sleep(60)\n"
                "            os._exit(0)\n"
                "        n += 1\n"
                "    return {'forks': n, 'errno': None}\n", timeout=10)
            self.assertEqual(status, 200, seen)
            self.assertEqual(seen["errno"], errno.EAGAIN)
            self.assertLess(seen["forks"], 32)
            self.assertEqual(processes_of(TEST_BOT_ID), [])  # all gone with the run
            await self.healthy()
            status, echoed, _ = await self.execute(ECHO, {"after": 1})
            self.assertEqual((status, echoed["input"]), (200, {"after": 1}))

        return ensureDeferred(go())


class NetworkTests(SandboxBase):
    def test_no_loopback_port_but_the_relay_api(self) -> Deferred:
        connections: list[Any] = []

        class Count(Protocol):
            def connectionMade(self) -> None:  # noqa: N802
                connections.append(self.transport.getPeer())

        port = reactor.listenTCP(0, Factory.forProtocol(Count), interface="127.0.0.1")
        self.addCleanup(port.stopListening)

        async def go() -> None:
            status, seen, _ = await self.execute(
                "import socket\n"
                "def handler(medplum, event):\n"
                "    got = {}\n"
                "    for port in event.input['ports']:\n"
                "        try:\n"
                "            socket.create_connection(('127.0.0.1', port), timeout=2).close()\n"
                "            got[str(port)] = 'connected'\n"
                "        except OSError as e:\n"
                "            got[str(port)] = 'refused: %s' % e.errno\n"
                "    got['api'] = medplum.request('GET', '/healthz')[0]\n"
                "    return got\n",
                {"ports": [port.getHost().port, int(self.base.rsplit(":", 1)[1])]})
            self.assertEqual(status, 200, seen)
            self.assertEqual(seen.pop("api"), 200)  # the relay, through its API socket
            for target, what in seen.items():
                self.assertTrue(what.startswith("refused"), (target, what))
            self.assertEqual(connections, [])

        return ensureDeferred(go())


class StateTests(SandboxBase):
    workers = 1  # one worker: bot B runs where bot A ran

    def test_a_hooked_worker_does_not_see_the_next_bot(self) -> Deferred:
        hook = ("import builtins, json\n"
                "import medagent.relay.botworker as w\n"
                "import medagent.botapi as api\n"
                "def handler(medplum, event):\n"
                "    if event.input.get('report'):\n"
                "        return {'stolen': getattr(builtins, 'stolen', None)}\n"
                "    builtins.stolen = []\n"
                "    run, init = w.run, api.BotClient.__init__\n"
                "    def spy_run(request, *a, **k):\n"
                "        builtins.stolen.append(json.dumps(request))\n"
                "        return run(request, *a, **k)\n"
                "    def spy_init(self, base, token, **k):\n"
                "        builtins.stolen.append(token)\n"
                "        init(self, base, token, **k)\n"
                "    w.run, api.BotClient.__init__ = spy_run, spy_init\n"
                "    return 'hooked'\n")

        async def go() -> None:
            spy = await self.bot(hook)
            victim = await self.bot(
                "def handler(medplum, event):\n"
                "    return {'mine': event.input['mrn'], 'token': medplum._token[-12:]}\n",
                secret=[{"name": "key", "valueString": "VICTIM-SECRET-42"}])
            status, hooked, _ = await self.call("POST", f"/fhir/R4/Bot/{spy['id']}/$execute",
                                                {}, ctype="application/json")
            self.assertEqual((status, hooked), (200, "hooked"))
            status, seen, _ = await self.call("POST", f"/fhir/R4/Bot/{victim['id']}/$execute",
                                              {"mrn": "PHI-MRN-777"}, ctype="application/json")
            self.assertEqual((status, seen["mine"]), (200, "PHI-MRN-777"))
            status, report, _ = await self.call("POST", f"/fhir/R4/Bot/{spy['id']}/$execute",
                                                {"report": True}, ctype="application/json")
            self.assertEqual(status, 200, report)
            self.assertEqual(report, {"stolen": None})  # a fresh fork: no hook survived
            for leaked in ("PHI-MRN-777", "VICTIM-SECRET-42", seen["token"]):
                self.assertNotIn(leaked, json.dumps(report))

        return ensureDeferred(go())


class TokenTests(SandboxBase):
    def test_bot_token_reaches_only_what_its_bot_grants(self) -> Deferred:
        async def go() -> None:
            device = await self.relay.store.create({"resourceType": "Device",
                                                    "url": "mllp://127.0.0.1:9"})
            agent = await self.relay.store.create({  # a Bot pushes only to the Agent's Devices
                "resourceType": "Agent", "name": "lab", "status": "active",
                "device": {"reference": f"Device/{device['id']}"}})
            other = await self.bot(ECHO)
            status, seen, bot = await self.execute(
                "def handler(medplum, event):\n"
                "    i = event.input\n"
                "    other = {'resourceType': 'Bot', 'id': i['other'], 'code': 'x=1'}\n"
                "    sub = {'resourceType': 'Subscription', 'status': 'active',\n"
                "           'criteria': 'Patient', 'channel': {'type': 'rest-hook',\n"
                "                                              'endpoint': 'Bot/' + i['other']}}\n"
                "    tries = {\n"
                "        'list pushes': ('GET', '/fhir/R4/AgentPush', None),\n"
                "        'list agent pushes': ('GET', '/fhir/R4/AgentPush?agent=' + i['agent'],\n"
                "                              None),\n"
                "        'read other bot': ('GET', '/fhir/R4/Bot/' + i['other'], None),\n"
                "        'rewrite other bot': ('PUT', '/fhir/R4/Bot/' + i['other'], other),\n"
                "        'new subscription': ('POST', '/fhir/R4/Subscription', sub),\n"
                "        'read patients': ('GET', '/fhir/R4/Patient', None),\n"
                "        'execute other bot': ('POST', '/fhir/R4/Bot/%s/$execute' % i['other'],\n"
                "                              {}),\n"
                "        'new client': ('POST', '/fhir/R4/ClientApplication',\n"
                "                       {'resourceType': 'ClientApplication'}),\n"
                "    }\n"
                "    got = {k: medplum.request(m, p, body=b)[0]\n"
                "           for k, (m, p, b) in tries.items()}\n"
                "    got['push'] = medplum.push_to_agent(i['agent'], 'mllp://127.0.0.1:9',\n"
                "        'MSH|^~\\\\&|A|B|C|D|2024||ORM^O01|TOK1|P|2.5',\n"
                "        'x-application/hl7-v2+er7')['issue'][0]['diagnostics']\n"
                "    got['own push'] = medplum.request('GET', '/fhir/R4/AgentPush/' +\n"
                "                                      got['push'].rsplit('/', 1)[1])[0]\n"
                "    got['token'] = medplum._token\n"
                "    return got\n",
                {"other": other["id"], "agent": agent["id"]},
                extension=[access(push=[agent["id"]])])
            self.assertEqual(status, 200, seen)
            token = seen.pop("token")
            self.assertEqual(seen.pop("own push"), 200)  # its own push, by id
            seen.pop("push")
            self.assertEqual(seen, {k: 403 for k in seen}, seen)
            # the same token, taken out of the sandbox, opens no agent session either
            conn = FakeConnection()
            session = self.relay.hub.connection_made(conn)
            self.relay.hub.frame_received(session, wire.encode(
                {"type": wire.CONNECT_REQUEST, "accessToken": token, "agentId": agent["id"]}))
            self.assertEqual(conn.sent[0]["type"], wire.ERROR)
            self.assertIsNotNone(conn.closed)
            self.assertFalse(self.relay.hub.is_connected(agent["id"]))
            unchanged = await self.relay.store.read("Bot", other["id"])
            self.assertEqual(unchanged["code"], ECHO)

        return ensureDeferred(go())
