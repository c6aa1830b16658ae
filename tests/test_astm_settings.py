"""Tests for L{medagent.astm.settings}: what a destination URL asks of an ASTM link (pure)."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from medagent.astm.link import LinkConfig
from medagent.astm.settings import link_settings, serial_settings, target
from medagent.destination import DestinationError, parse_destination


class SettingsTests(SynchronousTestCase):
    def test_link_settings_from_url(self) -> None:
        dest = parse_destination("astm://h:1?ackTimeout=2.5&frameAttempts=3&role=instrument"
                                 "&packed=1&encoding=utf-8&maxFrameText=100")
        config, framing = link_settings(dest, LinkConfig())
        self.assertEqual((config.ack_timeout, config.max_attempts, config.role),
                         (2.5, 3, "instrument"))
        self.assertEqual((framing.packed, framing.encoding, framing.max_text),
                         (True, "utf-8", 100))
        for bad in ("role=boss", "ackTimeout=x", "frameAttempts=0", "encoding=nope",
                    "maxFrameText=0"):
            self.assertRaises(DestinationError, link_settings,
                              parse_destination("astm://h:1?" + bad), LinkConfig())

    def test_serial_settings(self) -> None:
        dest = parse_destination("astm+serial:///dev/ttyUSB0?baudrate=19200&bytesize=7"
                                 "&parity=E&stopbits=2&rtscts=1&xonxoff=0", needs_port=False)
        self.assertEqual(serial_settings(dest), {"baudrate": 19200, "bytesize": 7,
                                                 "parity": "E", "stopbits": 2, "rtscts": 1,
                                                 "xonxoff": 0})
        self.assertEqual(serial_settings(parse_destination("astm+serial:///dev/ttyS0"))
                         ["baudrate"], 9600)
        for bad in ("baudrate=x", "bytesize=9", "parity=Q", "stopbits=3"):
            self.assertRaises(DestinationError, serial_settings,
                              parse_destination("astm+serial:///dev/x?" + bad))

    def test_target_names_the_device(self) -> None:
        self.assertEqual(target(parse_destination("astm://10.0.0.5:5000?ackTimeout=2")),
                         "10.0.0.5:5000")
        self.assertEqual(target(parse_destination("astm+serial:///dev/ttyS0?baudrate=9600")),
                         "/dev/ttyS0")
