"""
The scheme registry (L{medagent.schemes}): what the protocol packages declare, how the agent
builds its senders and channels from it, and how the relay checks a push's scheme against
the connected agent's announced schemes (falling back to the registry).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from medagent import schemes, wire
from medagent.agent.channels import ChannelConfigError, ChannelManager, ChannelSpec
from medagent.agent.service import default_senders
from medagent.fhir import FHIRError
from medagent.relay.push import PushRequest, PushService


class RegistryTests(SynchronousTestCase):
    def test_every_package_declares_its_schemes(self) -> None:
        self.assertEqual(schemes.sender_schemes(), frozenset(
            ["mllp", "mllps", "astm", "astm+serial", "dicom", "worklist", "tcp"]))
        self.assertEqual(schemes.channel_schemes(),
                         ("mllp", "astm", "astm+serial", "dicom", "dicom-mwl"))

    def test_a_factory_under_two_schemes_builds_one_sender(self) -> None:
        calls: list[Any] = []

        def factory(reactor: Any, context: schemes.SenderContext) -> object:
            calls.append(context)
            return object()

        built = schemes.build_senders(None, schemes.SenderContext(),
                                      {"a": factory, "b": factory})
        self.assertIs(built["a"], built["b"])
        self.assertEqual(len(calls), 1)

    def test_agent_senders_come_from_the_registry(self) -> None:
        senders = default_senders(Clock(), lambda name: None)
        self.assertEqual(set(senders), set(schemes.sender_schemes()))
        self.assertIs(senders["mllp"], senders["mllps"])
        self.assertIs(senders["astm"], senders["astm+serial"])
        for scheme, sender in senders.items():
            self.assertIn(scheme, sender.schemes)

    def test_unknown_channel_scheme_names_the_registry_list(self) -> None:
        manager = ChannelManager(Clock(), None, lambda: None, self.mktemp())
        with self.assertRaises(ChannelConfigError) as e:
            manager._start(ChannelSpec(name="x", address="gopher://0.0.0.0:70"))
        self.assertIn("(supported: mllp, astm, astm+serial, dicom, dicom-mwl)",
                      str(e.exception))
        self.assertEqual(manager.running_specs, {})


class _Session:
    def __init__(self, capabilities: list[str]) -> None:
        self.capabilities = frozenset(capabilities)


class _Hub:
    def __init__(self) -> None:
        self.sessions: dict[str, _Session] = {}


class RelaySchemeCheckTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.hub = _Hub()
        self.push = PushService(self.hub, None, None, Clock())

    def resolve(self, url: str, agent_id: str = "a1") -> Any:
        request = PushRequest(destination=url, content_type="text/plain", body="x",
                              wait=False, wait_timeout_ms=0, options={})
        return self.push.resolve_remote(request, agent_id)

    def test_connected_agent_that_announced_schemes(self) -> None:
        self.hub.sessions["a1"] = _Session([wire.CAP_DEDUPE, wire.CAP_DURABLE,
                                            wire.CAP_TOKEN_REFRESH, "mllp", "mllps"])
        self.assertEqual(self.successResultOf(self.resolve("mllp://h:1")), "mllp://h:1")
        err = self.failureResultOf(self.resolve("dicom://AE@h:104"), FHIRError).value
        self.assertEqual(err.status, 400)
        self.assertIn("Unsupported destination scheme dicom:// (Agent/a1 supports: mllp, "
                      "mllps)", str(err.message))

    def test_offline_or_medplum_agent_gets_the_registry_list(self) -> None:
        self.assertEqual(self.successResultOf(self.resolve("tcp://h:1?startChar=%02")),
                         "tcp://h:1?startChar=%02")
        self.hub.sessions["a1"] = _Session([])  # Medplum's agent announces nothing
        self.assertEqual(self.successResultOf(self.resolve("dicom://AE@h:104")),
                         "dicom://AE@h:104")
        err = self.failureResultOf(self.resolve("gopher://h:70"), FHIRError).value
        self.assertEqual(err.status, 400)
        self.assertIn("(supported: astm, astm+serial, dicom, mllp, mllps, tcp, worklist)",
                      str(err.message))

    def test_announced_schemes_leave_out_features(self) -> None:
        self.assertEqual(wire.announced_schemes(["durable", "dedupe", "token-refresh", "tcp",
                                                 "Not A Scheme"]), frozenset(["tcp"]))


class _Recorder:
    schemes = ("mllp",)

    def __init__(self) -> None:
        self.calls: list[str] = []

    def send(self, destination: Any, content_type: str, body: str, options: Any) -> Any:
        from twisted.internet.defer import Deferred

        self.calls.append(body)
        return Deferred()


class DispatcherTests(SynchronousTestCase):
    """The Dispatcher is a lookup: ordering per device is the queue's lane, not a second one."""

    def test_no_second_lane(self) -> None:
        from medagent.agent.dispatch import Dispatcher

        sender = _Recorder()
        dispatcher = Dispatcher({"mllp": sender})
        dispatcher.dispatch("mllp://h:1", "x", "one")
        dispatcher.dispatch("mllp://h:1", "x", "two")
        self.assertEqual(sender.calls, ["one", "two"])

    def test_unknown_scheme_names_the_agent_list(self) -> None:
        from medagent.agent.dispatch import Dispatcher
        from medagent.delivery import DeliveryError

        err = self.failureResultOf(Dispatcher({"mllp": _Recorder()}).dispatch(
            "tcp://h:1", "x", "one"), DeliveryError).value
        self.assertEqual((err.phase, err.transient), ("destination", False))
        self.assertIn("(this agent supports: mllp)", str(err))


class ChannelFactoryTests(SynchronousTestCase):
    def test_every_channel_factory_builds_its_channel(self) -> None:
        """Each declared channel factory finds its classes and builds (nothing started)."""
        from medagent.agent.channels import listen_endpoint
        from medagent.destination import parse_destination

        addresses = {"mllp": "mllp://127.0.0.1:2575", "astm": "astm://127.0.0.1:15200",
                     "astm+serial": "astm+serial:///dev/ttyS0?baudrate=9600",
                     "dicom": "dicom://AE@127.0.0.1:11112",
                     "dicom-mwl": "dicom-mwl://MWL@127.0.0.1:11113"}
        self.assertEqual(set(addresses), set(schemes.channel_schemes()))
        registered: list[Any] = []
        for scheme, factory in schemes.channel_factories().items():
            destination = parse_destination(addresses[scheme], needs_port=False)
            context = schemes.ChannelContext(
                name="c", address=addresses[scheme], destination=destination,
                endpoint=listen_endpoint(destination), data_dir=self.mktemp(), safe_name="c",
                forward=lambda *a: None, forward_and_wait=lambda *a: None,
                forward_instance=lambda *a: None, register_worklist=registered.append)
            svc, app = factory(Clock(), context)
            self.assertFalse(svc.running)
            self.assertIsNotNone(app)
        self.assertEqual(len(registered), 1)  # the worklist channel
