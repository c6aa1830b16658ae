"""
The agent as a port scanner or file reader for whoever pushes: destinations outside the site's
allowlist are refused before any connection, pings included.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import succeed
from twisted.trial.unittest import SynchronousTestCase

from medagent.agent.allow import DestinationPolicy, PolicyError
from medagent.agent.dispatch import Dispatcher
from medagent.contenttypes import PING
from medagent.delivery import DeliveryError, Reply
from medagent.destination import parse_destination


class _Sender:
    def __init__(self) -> None:
        self.sent: list[str] = []
        self.pinged: list[str] = []

    def send(self, destination: Any, content_type: str, body: str, options: Any) -> Any:
        self.sent.append(destination.url)
        return succeed(Reply("ok"))

    def ping(self, destination: Any) -> Any:
        self.pinged.append(destination.url)
        return succeed(Reply("pong"))

    def close(self) -> Any:
        return succeed(None)


def allows(policy: DestinationPolicy, url: str) -> bool:
    return policy.allows(parse_destination(url, needs_port=False))


class PolicyTests(SynchronousTestCase):
    def test_patterns(self) -> None:
        policy = DestinationPolicy.from_setting(
            "lab-analyzer.local:2575, mllp://127.0.0.5:2576, 127.0.1.0/24:*, *.lab.local:104,"
            "serial:/dev/ttyUSB*, worklist:mwl")
        self.assertTrue(allows(policy, "mllp://lab-analyzer.local:2575"))
        self.assertTrue(allows(policy, "astm://LAB-ANALYZER.local.:2575"))
        self.assertFalse(allows(policy, "mllp://lab-analyzer.local:22"))
        self.assertTrue(allows(policy, "mllp://127.0.0.5:2576?returnAck=application"))
        self.assertFalse(allows(policy, "astm://127.0.0.5:2576"))
        self.assertTrue(allows(policy, "mllp://127.0.1.77:9999"))
        self.assertFalse(allows(policy, "mllp://127.0.2.1:9999"))
        self.assertTrue(allows(policy, "dicom://PACS@ct1.lab.local:104"))
        self.assertFalse(allows(policy, "dicom://PACS@ct1.lab.local.evil.test:104"))
        self.assertTrue(allows(policy, "astm+serial:///dev/ttyUSB0?baudrate=9600"))
        self.assertFalse(allows(policy, "astm+serial:///dev/ttyS0"))
        self.assertTrue(allows(policy, "worklist://mwl"))
        self.assertFalse(allows(policy, "worklist://other"))

    def test_no_setting_is_open(self) -> None:
        self.assertTrue(DestinationPolicy.from_setting("").open)
        self.assertTrue(allows(DestinationPolicy.from_setting(None), "mllp://anything:1"))

    def test_bad_entries_are_refused_at_startup(self) -> None:
        for bad in ("nohostport", "host:99999", "host:abc", "300.1.1.0/99:1", "serial:"):
            with self.assertRaises(PolicyError):
                DestinationPolicy.from_setting(bad)


class DispatcherTests(SynchronousTestCase):
    def test_refused_before_any_connection_pings_included(self) -> None:
        sender = _Sender()
        dispatcher = Dispatcher({"mllp": sender})
        dispatcher.policy = DestinationPolicy.from_setting("127.0.0.1:2575")
        self.successResultOf(dispatcher.dispatch("mllp://127.0.0.1:2575", "x", "MSH|", {}))
        for url in ("mllp://127.0.0.1:22", "mllp://127.0.0.2:2575"):
            for content_type in ("x-application/hl7-v2+er7", PING):
                f = self.failureResultOf(dispatcher.dispatch(url, content_type, "MSH|", {}))
                err = f.check(DeliveryError) and f.value
                self.assertTrue(err)
                self.assertEqual((err.phase, err.transient), ("destination", False))
                self.assertIn("not allowed", err.reason)
        self.assertEqual(sender.sent, ["mllp://127.0.0.1:2575"])
        self.assertEqual(sender.pinged, [])

    def test_parses_remembered_policy_checked_every_time(self) -> None:
        from medagent import agent
        from medagent.destination import lane_key

        sender = _Sender()
        dispatcher = Dispatcher({"mllp": sender})
        calls = []
        real = agent.dispatch.parse_destination

        def counting(url: str, **kw):
            calls.append(url)
            return real(url, **kw)

        self.patch(agent.dispatch, "parse_destination", counting)
        url = "mllp://127.0.0.1:2575?ackTimeout=5"
        for _ in range(3):
            self.successResultOf(dispatcher.dispatch(url, "x", "MSH|", {}))
            self.assertEqual(dispatcher.lane_key(url), lane_key(url))
        self.assertEqual(calls, [url])
        # the allowlist still applies to a remembered destination (a reload may change it)
        dispatcher.policy = DestinationPolicy.from_setting("127.0.0.2:2575")
        f = self.failureResultOf(dispatcher.dispatch(url, "x", "MSH|", {}))
        self.assertIn("not allowed", f.value.reason)
        # an unparsable URL: its error is remembered too, and it is its own lane
        for _ in range(2):
            f = self.failureResultOf(dispatcher.dispatch("mllp://:bad", "x", "MSH|", {}))
            self.assertEqual(f.value.phase, "destination")
        self.assertEqual(dispatcher.lane_key("mllp://:bad"), "mllp://:bad")
        self.assertEqual(calls, [url, "mllp://:bad"])

    def test_remembered_parses_are_bounded(self) -> None:
        from medagent.agent.dispatch import PARSED_URLS

        dispatcher = Dispatcher({"mllp": _Sender()})
        for port in range(1, PARSED_URLS + 10):
            dispatcher.parse(f"mllp://127.0.0.1:{port}")
        self.assertLessEqual(len(dispatcher._parsed), PARSED_URLS)
