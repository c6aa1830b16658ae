"""
The small helpers added when the protocol packages were made mypy-clean: typed transport
access (L{medagent._twisted}), L{Destination.require_port}, the DIMSE assembler's check of a
PDV without a value, and the presentation-context result names of DICOM errors.
"""

from __future__ import annotations

from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_items import PresentationDataValueItem
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from medagent._twisted import maybe_transport, transport_of
from medagent.destination import Destination, DestinationError, parse_destination
from medagent.dicom import dimse
from medagent.dicom.scu import _result_name


class TransportAccessTests(SynchronousTestCase):
    def test_connected_protocol_gives_its_transport(self) -> None:
        proto = Protocol()
        transport = StringTransport()
        proto.makeConnection(transport)
        self.assertIs(transport_of(proto), transport)
        self.assertIs(maybe_transport(proto), transport)

    def test_unconnected_protocol(self) -> None:
        proto = Protocol()
        self.assertIsNone(maybe_transport(proto))
        with self.assertRaises(RuntimeError) as e:
            transport_of(proto)
        self.assertIn("Protocol is not connected", str(e.exception))

    def test_clock_and_delayed_call_protocols_fit_task_clock(self) -> None:
        # The structural types describe what the code calls; task.Clock provides it.
        clock = Clock()
        fired: list[int] = []
        call = clock.callLater(2.0, fired.append, 1)
        call.reset(3.0)
        self.assertTrue(call.active())
        self.assertEqual(call.getTime(), 3.0)
        clock.advance(3.0)
        self.assertEqual(fired, [1])


class RequirePortTests(SynchronousTestCase):
    def test_port_given(self) -> None:
        self.assertEqual(parse_destination("mllp://127.0.0.1:2575").require_port(), 2575)

    def test_no_port_is_a_destination_error(self) -> None:
        d = Destination(url="mllp://127.0.0.1", scheme="mllp", host="127.0.0.1", port=None)
        with self.assertRaises(DestinationError) as e:
            d.require_port()
        self.assertIn("no port", str(e.exception))


class AssemblerPDVTests(SynchronousTestCase):
    def test_pdv_without_a_value_is_a_dimse_error(self) -> None:
        item = PresentationDataValueItem()
        item.presentation_context_id = 1
        item.presentation_data_value = None
        p = P_DATA_TF()
        p.presentation_data_value_items = [item]
        with self.assertRaises(dimse.DimseError):
            dimse.MessageAssembler().feed(p)


class ResultNameTests(SynchronousTestCase):
    def test_names(self) -> None:
        self.assertEqual(_result_name(None), "None")
        self.assertEqual(_result_name(12345), "12345")
        self.assertEqual(_result_name(3), "abstract-syntax-not-supported (provider rejection)")
