"""
Transfer syntax conversion of L{medagent.dicom.instance}: byte-correct from Explicit VR Big
Endian (checked against pydicom's little/big endian twin test files), refusing what it cannot
know, never relabelling compressed data; odd-length deflate streams padded (PS3.5 A.5).
"""

from __future__ import annotations

import base64
import struct
import zlib
from io import BytesIO

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    UID,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import dimse_messages as pmsgs
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from medagent.destination import parse_destination
from medagent.dicom import dimse
from medagent.dicom.instance import (
    InstanceError,
    big_endian_problem,
    convert_native,
    from_part10,
)
from medagent.dicom.scu import DICOMSender
from tests.test_dicom_association import accept, pdata, read_pdus
from tests.test_dicom_sender import FakeEndpoint

MR_CLASS = "1.2.840.10008.5.1.4.1.1.4"
TWINS = [("MR_small.dcm", "MR_small_bigendian.dcm"),   # 16-bit OW, first pixel 905
         ("MR_small.dcm", "MR_small_expb.dcm"),
         ("SC_rgb_small_odd.dcm", "SC_rgb_small_odd_big_endian.dcm"),  # 8-bit in OW
         ("liver_1frame.dcm", "liver_expb_1frame.dcm")]  # 1-bit OB


def raw(name: str) -> bytes:
    with open(get_testdata_file(name), "rb") as f:
        return f.read()


def values(ds: Dataset) -> dict:
    """Every element's value (nested items too) except the pixel data, for comparison."""
    out = {}
    for elem in ds:
        if elem.tag in (0x7FE00010, 0xFFFCFFFC):
            continue
        if elem.VR == "SQ":
            out[elem.tag] = [values(item) for item in elem.value]
        else:
            out[elem.tag] = elem.value
    return out


class BigEndianConversionTests(SynchronousTestCase):
    def test_twins(self) -> None:
        for le_name, be_name in TWINS:
            instance = from_part10(raw(be_name))
            self.assertEqual(instance.transfer_syntax, ExplicitVRBigEndian)
            original = dimse.decode_dataset(instance.data, ExplicitVRBigEndian)
            twin = dcmread(BytesIO(raw(le_name)))
            for target in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
                ds = dimse.decode_dataset(instance.encoded_as(target), target)
                self.assertEqual(ds.PixelData, twin.PixelData, f"{be_name} -> {target}")
                self.assertEqual(values(ds), values(original), f"{be_name} -> {target}")
        mr = dimse.decode_dataset(from_part10(raw("MR_small_bigendian.dcm")).encoded_as(
            ExplicitVRLittleEndian), ExplicitVRLittleEndian)
        self.assertEqual(struct.unpack("<H", mr.PixelData[:2])[0], 905)

    def test_32_bit_pixels_in_ow_not_converted(self) -> None:
        # pydicom reads them as whole 32-bit values, dcmtk swaps 16-bit words: no conversion
        # is right for both readers, so the instance only goes in its own syntax.
        for name in ("rtdose_expb_1frame.dcm", "rtdose_expb.dcm"):
            instance = from_part10(raw(name))
            self.assertFalse(instance.convertible)
            self.assertIn("32 bits allocated", instance.not_convertible)
            self.assertEqual(instance.offered_syntaxes(), [[ExplicitVRBigEndian]])
            self.assertEqual(instance.encoded_as(ExplicitVRBigEndian), instance.data)
            for target in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
                with self.assertRaises(InstanceError):
                    instance.encoded_as(target)
                with self.assertRaises(InstanceError):
                    convert_native(instance.data, ExplicitVRBigEndian, target)

    def test_binary_vrs_swapped_numbers_kept(self) -> None:
        ds = Dataset()
        ds.SOPClassUID = MR_CLASS
        ds.SOPInstanceUID = generate_uid()
        ds.Rows = 513
        ds.add_new(0x00281201, "OW", struct.pack(">3H", 1, 2, 0x0102))  # Red Palette LUT Data
        ds.add_new(0x00660016, "OF", struct.pack(">2f", 1.5, -2.0))      # Point Coordinates
        ds.add_new(0x00660040, "OL", struct.pack(">2L", 7, 1 << 20))     # Long Primitive Pts
        ds.add_new(0x00720067, "FD", [2.5])
        item = Dataset()
        item.add_new(0x00660016, "OF", struct.pack(">f", 3.25))
        ds.add_new(0x00660002, "SQ", [item])                             # Surface Sequence
        data = dimse.encode_dataset(ds, ExplicitVRBigEndian)
        out = dimse.decode_dataset(convert_native(data, ExplicitVRBigEndian,
                                                  ExplicitVRLittleEndian),
                                   ExplicitVRLittleEndian)
        self.assertEqual(out.Rows, 513)
        self.assertEqual(struct.unpack("<3H", out[0x00281201].value), (1, 2, 0x0102))
        self.assertEqual(struct.unpack("<2f", out[0x00660016].value), (1.5, -2.0))
        self.assertEqual(struct.unpack("<2L", out[0x00660040].value), (7, 1 << 20))
        self.assertEqual(out[0x00720067].value, 2.5)
        self.assertEqual(struct.unpack("<f", out[0x00660002].value[0][0x00660016].value),
                         (3.25,))

    def test_unknown_byte_order_refused(self) -> None:
        ds = Dataset()
        ds.SOPClassUID = MR_CLASS
        ds.SOPInstanceUID = generate_uid()
        ds.add_new(0x00091010, "UN", b"\x00\x01\x00\x02")  # private, VR unknown
        data = dimse.encode_dataset(ds, ExplicitVRBigEndian)
        with self.assertRaises(InstanceError) as e:
            convert_native(data, ExplicitVRBigEndian, ExplicitVRLittleEndian)
        self.assertIn("UN", str(e.exception))
        self.assertIn("VR UN", big_endian_problem(data))
        # between little endian syntaxes nothing needs swapping: UN passes as it is
        le = dimse.encode_dataset(ds, ExplicitVRLittleEndian)
        out = convert_native(le, ExplicitVRLittleEndian, ImplicitVRLittleEndian)
        self.assertEqual(dimse.decode_dataset(out, ImplicitVRLittleEndian)[0x00091010].value,
                         b"\x00\x01\x00\x02")

    def test_compressed_never_relabelled(self) -> None:
        instance = from_part10(raw("MR_small_RLE.dcm"))
        self.assertEqual(instance.offered_syntaxes(), [[instance.transfer_syntax]])
        for target in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            with self.assertRaises(InstanceError):
                instance.encoded_as(target)


class DeflatedTests(SynchronousTestCase):
    def test_odd_length_stream_padded(self) -> None:
        file = raw("image_dfl.dcm")
        ds = dcmread(BytesIO(file), stop_before_pixels=True)
        stream_length = len(file) - (132 + 12 + ds.file_meta.FileMetaInformationGroupLength)
        self.assertEqual(stream_length % 2, 1)  # the file as pydicom ships it
        instance = from_part10(file)
        self.assertEqual(instance.transfer_syntax, DeflatedExplicitVRLittleEndian)
        self.assertEqual(instance.size, stream_length + 1)
        self.assertEqual(instance.data[-1:], b"\x00")
        inflated = zlib.decompress(instance.data, -zlib.MAX_WBITS)
        self.assertEqual(inflated, zlib.decompress(instance.data[:-1], -zlib.MAX_WBITS))
        out = dimse.decode_dataset(instance.encoded_as(ExplicitVRLittleEndian),
                                   ExplicitVRLittleEndian)
        self.assertEqual(out.SOPInstanceUID, ds.SOPInstanceUID)


def part10_of(name: str) -> str:
    return base64.b64encode(raw(name)).decode()


class PooledAssociationTests(SynchronousTestCase):
    """A big endian instance on a pooled association that has only LE for its SOP class."""

    def test_big_endian_on_pooled_little_endian_context(self) -> None:
        clock = Clock()
        endpoint = FakeEndpoint()
        sender = DICOMSender(clock, ae_title="AGENT", endpoint_factory=endpoint)
        dest = parse_destination("dicom://PACS@10.0.0.5:104")
        sent = []
        results = []
        for name in ("MR_small.dcm", "MR_small_bigendian.dcm"):
            sender.send(dest, "application/dicom", part10_of(name), {}).addBoth(results.append)
            proto, tr = endpoint.connections[-1]
            if not proto.accepted:
                ac, _ = accept(tr.value(), [(MR_CLASS, [ExplicitVRLittleEndian])])
                tr.clear()
                proto.dataReceived(ac)
            msg = pmsgs.DIMSEMessage()
            for p in read_pdus(tr.value()):
                msg.decode_msg(p.to_primitive())
            tr.clear()
            sent.append(msg.data_set.getvalue())
            proto.dataReceived(pdata(dimse.c_store_rsp(msg, 0), msg.context_id, 16384))
        self.assertEqual(len(endpoint.connections), 1)
        self.assertTrue(all(r.delivered for r in results), results)
        first, second = (dimse.decode_dataset(d, ExplicitVRLittleEndian) for d in sent)
        self.assertEqual(second.PixelData, first.PixelData)
        self.assertEqual(struct.unpack("<H", second.PixelData[:2])[0], 905)
        sender.close()
        proto.connectionLost(None)


    def test_unconvertible_big_endian_not_put_on_pooled_little_endian_context(self) -> None:
        rt_dose = "1.2.840.10008.5.1.4.1.1.481.2"
        clock = Clock()
        endpoint = FakeEndpoint()
        sender = DICOMSender(clock, ae_title="AGENT", endpoint_factory=endpoint)
        dest = parse_destination("dicom://PACS@10.0.0.5:104")
        results = []
        sender.send(dest, "application/dicom", part10_of("rtdose_1frame.dcm"),
                    {}).addBoth(results.append)
        proto, tr = endpoint.connections[-1]
        ac, _ = accept(tr.value(), [(rt_dose, [ImplicitVRLittleEndian])])
        tr.clear()
        proto.dataReceived(ac)
        msg = pmsgs.DIMSEMessage()
        for p in read_pdus(tr.value()):
            msg.decode_msg(p.to_primitive())
        tr.clear()
        proto.dataReceived(pdata(dimse.c_store_rsp(msg, 0), msg.context_id, 16384))
        self.assertTrue(results[0].delivered)

        sender.send(dest, "application/dicom", part10_of("rtdose_expb_1frame.dcm"),
                    {}).addBoth(results.append)
        self.assertEqual(read_pdus(tr.value())[-1].pdu_type, 0x05)  # the pooled one released
        self.assertEqual(len(endpoint.connections), 2)
        proto2, tr2 = endpoint.connections[-1]
        rq = read_pdus(tr2.value())[0].to_primitive()
        self.assertEqual([[str(t) for t in cx.transfer_syntax]
                          for cx in rq.presentation_context_definition_list],
                         [[ExplicitVRBigEndian]])
        ac, _ = accept(tr2.value(), [(rt_dose, [ImplicitVRLittleEndian])])
        proto2.dataReceived(ac)
        error = results[1].value
        self.assertIn("not converted: big endian pixel data with 32 bits", str(error))
        self.assertEqual((error.transient, error.phase), (False, "association"))
        sender.close()
        for p in (proto, proto2):
            p.connectionLost(None)


class QuickReadTests(SynchronousTestCase):
    """
    The file meta we write and the quick Part 10 reader against pydicom / pynetdicom: the
    same bytes, the same UIDs and data set, and pydicom's reading for everything else.
    """

    def test_file_meta_bytes_are_pynetdicoms(self) -> None:
        from pynetdicom.dsutils import create_file_meta, encode_file_meta

        from medagent.dicom.instance import file_meta_bytes
        from medagent.dicom.pdu import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

        for sop_instance in ("1.2.3", "1.2.34"):
            for syntax in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1",
                           "1.2.840.10008.1.2.4.50"):
                meta = create_file_meta(
                    sop_class_uid=UID("1.2.840.10008.5.1.4.1.1.2"),
                    sop_instance_uid=UID(sop_instance), transfer_syntax=UID(syntax),
                    implementation_uid=IMPLEMENTATION_CLASS_UID,
                    implementation_version=IMPLEMENTATION_VERSION_NAME)
                self.assertEqual(
                    file_meta_bytes("1.2.840.10008.5.1.4.1.1.2", sop_instance, syntax),
                    b"\x00" * 128 + b"DICM" + encode_file_meta(meta))
        with self.assertRaises(InstanceError):
            file_meta_bytes("1.2.840.10008.5.1.4.1.1.2", "not a uid", "1.2.840.10008.1.2")

    def test_quick_reader_agrees_with_pydicom(self) -> None:
        from medagent.dicom.instance import _from_part10_quick, dataset_offset, read_header

        quick_ones = 0
        for name in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "MR_small_implicit.dcm",
                     "MR_small_bigendian.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm"):
            data = raw(name)
            quick = _from_part10_quick(data)
            meta, offset = dataset_offset(data)
            syntax = str(meta.TransferSyntaxUID)
            if syntax not in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1"):
                self.assertIsNone(quick, name)  # pydicom reads those
                continue
            ds = read_header(data[offset:], syntax, stop_after=0x00080018)
            assert quick is not None
            quick_ones += 1
            self.assertEqual((quick.sop_class, quick.sop_instance, quick.transfer_syntax),
                             (str(ds.SOPClassUID), str(ds.SOPInstanceUID), syntax), name)
            self.assertEqual(quick.data, data[offset:])
            self.assertEqual(from_part10(data), quick)
        self.assertGreaterEqual(quick_ones, 3)

    def test_quick_reader_leaves_odd_files_to_pydicom(self) -> None:
        from medagent.dicom.instance import _from_part10_quick

        data = raw("CT_small.dcm")
        self.assertIsNone(_from_part10_quick(data[:140]))  # truncated in the file meta
        self.assertIsNone(_from_part10_quick(b"\x00" * 128 + b"DICX" + data[132:]))
        with self.assertRaises(InstanceError):
            from_part10(data[:140])
