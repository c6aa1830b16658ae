"""
``medagent demo``: the whole lab-order flow on one machine, nothing to install.

It starts a relay, an agent and a simulated lab instrument (an MLLP listener that ACKs and
shows what it got); registers the Agent, the instrument's Device, a Bot and a Subscription;
creates a ServiceRequest, and prints each step as it happens: the subscription fires, the
Bot turns the order into HL7 (ORM^O01) and pushes it, the agent delivers it, the ACK comes
back, the push is recorded as delivered.  Then it keeps running and prints how to push more
with curl.  All data is synthetic.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from typing import Any, cast

from twisted.internet.defer import Deferred, ensureDeferred, succeed

from medagent.agent.config import AgentConfig
from medagent.contenttypes import HL7_V2
from medagent.delivery import Reply
from medagent.agent.service import AgentService
from medagent.client import MedagentClient
from medagent.hl7 import message as hl7msg
from medagent.hl7.channel import MLLPChannel
from medagent.relay.auth import EXT_BOT_ACCESS
from medagent.relay.service import RelayService

SAMPLE_ORDER = (
    "MSH|^~\\&|MEDAGENT-DEMO|CLINIC|LIS|LAB|20260101120000||ORM^O01^ORM_O01|{ctrl}|P|2.5.1\r"
    "PID|1||DEMO-0001^^^MRN||DEMO^PATIENT||19700101|U\r"
    "ORC|NW|{ctrl}|||||^^^20260101120000^^R\r"
    "OBR|1|{ctrl}||2345-7^Glucose [Mass/volume] in Serum or Plasma^LN|||20260101120000"
)


#: The seed example's Bot (also run by the test suite): ServiceRequest → ORM^O01 → push.
ORDER_BOT = """\
from medagent.hl7.orders import OrderHeader, order_message


def handler(medplum, event):
    order = event.input
    patient = medplum.read_reference(order["subject"])
    message = order_message(order, patient=patient, previous=event.previous,
                            header=OrderHeader(sending_facility="HOSP",
                                               receiving_application="LIS",
                                               receiving_facility="LAB"))
    ack = medplum.push_to_agent(event.secrets["agent"]["valueString"],
                                event.secrets["device"]["valueString"],
                                message, "x-application/hl7-v2+er7", True, 10000)
    print("device answered", ack.split("\\r")[1][:6])  # MSA-1 only: no patient data
    return ack
"""


def say(step: str, text: str) -> None:
    print(f"[{step:>10}] {text}", flush=True)


class Instrument:
    """A simulated lab instrument: shows each order it receives and answers AA."""

    def __init__(self) -> None:
        self.received = 0
        self.first: Deferred[str] = Deferred()

    def forward(self, content_type: str, body: str, remote: str) -> Deferred[Reply | None]:
        self.received += 1
        say("instrument", f"received {hl7msg.message_type(body)} "
                          f"control id {hl7msg.control_id(body)} from {remote}:")
        for segment in body.strip().split("\r"):
            print(" " * 13 + segment, flush=True)
        ack = hl7msg.build_ack(body, "AA")
        say("instrument", "answered AA")
        if not self.first.called:
            self.first.callback(body)
        return succeed(Reply(body=ack, content_type=HL7_V2))


def _demo_bot_options() -> dict[str, Any]:
    """
    The demo runs its own bot on synthetic data.  A relay that is not root runs it unsandboxed
    (the documented development opt-in); as root it uses the real sandbox, as the user
    ``medagent-bot`` when it exists, else a uid that no account uses (nothing to install).
    """
    if os.geteuid() != 0:
        return {"bots_unsandboxed": True}
    import pwd

    from medagent.relay.bots import unused_id

    try:
        pwd.getpwnam("medagent-bot")
        return {}
    except KeyError:
        pass
    uid = unused_id()
    return {"bot_user": f"{uid}:{uid}"}


async def _run(reactor: Any, args: argparse.Namespace, data_dir: str, stack: list) -> None:
    relay = RelayService(reactor, data_dir=os.path.join(data_dir, "relay"),
                         listen=f"tcp:{args.port or 0}:interface=127.0.0.1",
                         **_demo_bot_options())
    relay.startService()
    stack.append(relay.stopService)
    admin = await relay.authority.create_client("admin", name="demo admin")
    base = relay.urls()[0]  # the port it got (a free one unless --port)
    say("relay", f"listening on {base} (data in {data_dir})")

    instrument = Instrument()
    channel = MLLPChannel(instrument.forward, clock=reactor, name="demo-instrument")
    port = reactor.listenTCP(0, channel, interface="127.0.0.1")
    stack.append(port.stopListening)
    device_url = f"mllp://127.0.0.1:{port.getHost().port}"
    say("instrument", f"simulated lab instrument listening on {device_url}")

    client = MedagentClient(reactor, base, admin["clientId"], admin["clientSecret"])
    stack.append(client.close)
    device = await client.create({"resourceType": "Device", "url": device_url,
                                  "deviceName": [{"name": "Demo analyzer",
                                                  "type": "user-friendly-name"}]})
    # the Agent lists the Devices it serves: pushers and Bots may push only to those
    agent = await client.create({"resourceType": "Agent", "name": "Demo lab agent",
                                 "status": "active",
                                 "device": {"reference": f"Device/{device['id']}"}})
    say("relay", f"created Agent/{agent['id']} and Device/{device['id']} ({device_url})")
    agent_creds = await relay.authority.create_client("agent", [agent["id"]], "demo agent")
    agent_service = AgentService(
        reactor,
        AgentConfig(relay=base, client_id=agent_creds["clientId"],
                    client_secret=agent_creds["clientSecret"], agent_id=agent["id"],
                    data_dir=os.path.join(data_dir, "agent")),
    )
    live: Deferred[None] = Deferred()

    def went_live() -> None:
        if not live.called:
            live.callback(None)

    agent_service.app.on_live.append(went_live)
    agent_service.startService()
    stack.append(agent_service.stopService)
    await live
    say("agent", "connected to the relay over its websocket")

    # The seed flow: ServiceRequest → Subscription → Bot → HL7 → agent → instrument.
    bot = await client.create({
        "resourceType": "Bot", "name": "Lab orders to HL7", "code": ORDER_BOT,
        "secret": [{"name": "agent", "valueString": agent["id"]},
                   {"name": "device", "valueString": f"Device/{device['id']}"}],
        # what its token may do: read the order's Patient, push to this agent
        "extension": [{"url": EXT_BOT_ACCESS, "extension": [
            {"url": "read", "valueCode": "Patient"},
            {"url": "push", "valueReference": {"reference": f"Agent/{agent['id']}"}}]}]})
    await client.create({
        "resourceType": "Subscription", "status": "active", "reason": "Lab orders",
        "criteria": "ServiceRequest", "channel": {"type": "rest-hook",
                                                  "endpoint": f"Bot/{bot['id']}"}})
    say("relay", f"created Bot/{bot['id']} and a Subscription on ServiceRequest")
    bot_done: Deferred[Any] = Deferred()

    def on_subscription(event: str, delivery: Any, detail: str) -> None:
        if event == "queued":
            say("subscript", f"{delivery.interaction} of {delivery.resource_type}/"
                             f"{delivery.resource_id} matched; delivery queued")

    def on_bot(run: Any, trigger: str) -> None:
        say("bot", f"{trigger} run {run.outcome} in {run.duration * 1000:.0f} ms"
                   + (f": {run.error}" if run.error else ""))
        if not bot_done.called:
            bot_done.callback(run)

    relay.subscriptions.observers.append(on_subscription)
    relay.bots.observers.append(on_bot)
    patient = await client.create({
        "resourceType": "Patient", "identifier": [{"system": "urn:demo:mrn",
                                                   "value": "DEMO-0001"}],
        "name": [{"family": "Demo", "given": ["Patient"]}], "birthDate": "1970-01-01"})
    order = await client.create({
        "resourceType": "ServiceRequest", "status": "active", "intent": "order",
        "subject": {"reference": f"Patient/{patient['id']}"},
        "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7",
                             "display": "Glucose [Mass/volume] in Serum or Plasma"}]}})
    say("fhir", f"created ServiceRequest/{order['id']} for Patient/{patient['id']}")
    run = await bot_done
    if run.ok and run.result:
        say("bot", "the Bot's push came back with the instrument's ACK:")
        for segment in run.result.strip().split("\r"):
            print(" " * 13 + segment, flush=True)
    pushes = await client.request_json("GET", "/fhir/R4/AgentPush",
                                       params={"agent": agent["id"]})
    push_id = None
    for entry in pushes.get("entry") or []:
        doc = entry["resource"]
        push_id = push_id or doc["id"]
        say("journal", f"push {doc['id']} is {doc['state']} after {doc['attempts']} attempt(s)")

    if args.once:
        return

    token = await client.access_token()
    example = {"destination": "Device/" + device["id"], "contentType": HL7_V2,
               "waitForResponse": True, "body": SAMPLE_ORDER.format(ctrl="DEMO0002")}
    admin_creds = {"clientId": admin["clientId"], "clientSecret": admin["clientSecret"]}
    print(
        "\nThe demo keeps running. Push another order with curl (token valid 1 hour):\n\n"
        f"  curl -s -X POST '{base}/fhir/R4/Agent/{agent['id']}/$push' \\\n"
        f"    -H 'Authorization: Bearer {token}' \\\n"
        "    -H 'Content-Type: application/fhir+json' \\\n"
        f"    -d '{json.dumps(example)}'\n\n"
        "  Status of a push:  curl -s -H 'Authorization: Bearer ...' "
        f"{base}/fhir/R4/AgentPush/{push_id}\n"
        f"  Admin credentials: {json.dumps(admin_creds)}\n"
        "  Stop with Ctrl-C.",
        flush=True,
    )
    await Deferred()  # run until interrupted


async def _main(reactor: Any, args: argparse.Namespace, data_dir: str) -> None:
    """Run the demo; whatever happens, stop what it started, newest first."""
    stack: list = []
    try:
        await _run(reactor, args, data_dir, stack)
    finally:
        for stop in reversed(stack):
            try:
                await stop()
            except Exception:
                pass


def run_demo(args: argparse.Namespace) -> int:
    from twisted.internet import reactor as _reactor  # composition root of the demo
    from twisted.logger import globalLogBeginner, LogLevel, FilteringLogObserver, \
        ILogFilterPredicate, ILogObserver, LogLevelFilterPredicate, textFileLogObserver

    from medagent.cli import ReactorLoop

    reactor = cast(ReactorLoop, _reactor)
    # The casts below only restate @implementer declarations, which mypy does not read
    # without the mypy-zope plugin.
    predicate = cast(ILogFilterPredicate, LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn))
    observer = cast(ILogObserver, textFileLogObserver(sys.stderr))
    globalLogBeginner.beginLoggingTo(
        [cast(ILogObserver, FilteringLogObserver(observer, [predicate]))],
        redirectStandardIO=False,
    )
    data_dir = args.data or tempfile.mkdtemp(prefix="medagent-demo-")
    outcome: dict[str, int] = {"rc": 0}

    def finished(result: Any) -> None:
        if hasattr(result, "getErrorMessage"):
            print(f"medagent demo failed: {result.getErrorMessage()}", file=sys.stderr)
            outcome["rc"] = 1
        if reactor.running:
            reactor.stop()

    reactor.callWhenRunning(lambda: ensureDeferred(_main(reactor, args, data_dir))
                            .addBoth(finished))
    reactor.run()
    if args.data is None and args.once:
        shutil.rmtree(data_dir, ignore_errors=True)
    return outcome["rc"]
