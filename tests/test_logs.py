"""
``--log-format``: the JSON observer writes one object a line with the event's fields, and
never a payload field.
"""

from __future__ import annotations

import io
import json

from twisted.application.service import Application, IService, MultiService
from twisted.logger import ILogObserver, Logger, LogPublisher
from twisted.trial.unittest import SynchronousTestCase

from medagent.logs import PAYLOAD_KEYS, log_observer, redact, with_log_format

HL7 = "MSH|^~\\&|LAB|FAC|RIS|FAC|20240101||ORU^R01|CTRL42|P|2.5\rPID|1||PATIENT-98765"


class JSONLogTests(SynchronousTestCase):
    def publish(self, format: str) -> tuple[Logger, io.StringIO]:
        stream = io.StringIO()
        publisher = LogPublisher(log_observer(format, stream))
        return Logger(namespace="medagent.test", observer=publisher), stream

    def test_one_object_a_line_with_fields_and_no_payload(self) -> None:
        log, stream = self.publish("json")
        log.info("Push {push_id} delivered ({size} bytes)", push_id="p-1", size=len(HL7),
                 body=HL7, reply="MSA|AA|CTRL42")
        log.warn("Second {n}", n=2)
        lines = stream.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        event = json.loads(lines[0])
        self.assertEqual(event["push_id"], "p-1")
        self.assertEqual(event["size"], len(HL7))
        self.assertEqual(event["log_format"], "Push {push_id} delivered ({size} bytes)")
        self.assertEqual(event["log_namespace"], "medagent.test")
        self.assertEqual(event["log_level"]["name"], "info")
        self.assertIn("log_time", event)
        self.assertEqual(event["log_omitted"], ["body", "reply"])
        self.assertNotIn("body", event)
        for secret in ("PATIENT-98765", "CTRL42", "MSH|"):
            self.assertNotIn(secret, stream.getvalue())
        self.assertEqual(json.loads(lines[1])["n"], 2)
        self.assertNotIn("\x1e", stream.getvalue())  # no record separator: plain JSON lines

    def test_text_format(self) -> None:
        log, stream = self.publish("text")
        log.info("Push {push_id} delivered", push_id="p-1")
        self.assertIn("Push p-1 delivered", stream.getvalue())
        self.assertRaises(ValueError, log_observer, "xml", io.StringIO())

    def test_redact_leaves_events_without_payload_alone(self) -> None:
        event = {"log_format": "x {n}", "n": 1}
        self.assertEqual(redact(event), event)
        self.assertIn("body", PAYLOAD_KEYS)

    def test_json_observer_given_to_the_twistd_application(self) -> None:
        root = MultiService()
        stream = io.StringIO()
        self.assertIs(with_log_format(root, "text", stream), root)
        wrapped = with_log_format(root, "json", stream)
        application = Application("medagent-test")
        IService(wrapped).setServiceParent(application)  # what twistd does after makeService
        observer = application.getComponent(ILogObserver)
        observer({"log_format": "hello {who}", "who": "ops", "body": HL7, "log_time": 0.0})
        [line] = stream.getvalue().splitlines()
        self.assertEqual(json.loads(line)["who"], "ops")
        self.assertNotIn("PATIENT", line)
        self.assertIs(root.parent, wrapped)
