"""
Pixel data through our SCU in every transfer syntax pydicom's bundled test files cover, to
dcmtk's storescp and to Orthanc: what they stored must be the original's pixels.

What is compared (no numpy here, so no ``pixel_array``):

* uncompressed (Implicit/Explicit VR Little Endian, Explicit VR Big Endian, Deflated): the
  pixel values as numbers - Pixel Data unpacked as BitsAllocated-bit unsigned integers in the
  byte order of the file's own transfer syntax (8-bit data in a big endian OW: 16-bit words
  swapped first, bits 1 and 8 as bytes) - so a converted instance is compared by value, not by
  its bytes.  The decoder is checked against pydicom's little/big endian twins
  (``MR_small.dcm`` / ``MR_small_bigendian.dcm``: first pixel 905).
* compressed (JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, RLE): the encapsulated
  frames, byte for byte (they must arrive as they were: never decompressed nor relabelled).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
import time
from io import BytesIO

import treq
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.encaps import generate_frames
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import SynchronousTestCase

from medagent.delivery import DeliveryError
from medagent.destination import parse_destination
from tests import procs
from tests.test_dicom_peers import _Base, wait_port

#: One (or a few) of pydicom's test files per transfer syntax.  The LE MR image comes before
#: the big endian one so the latter finds a pooled association with only an LE context.
FILES = [
    ("MR_small_implicit.dcm", "1.2.840.10008.1.2"),
    ("rtdose_1frame.dcm", "1.2.840.10008.1.2"),
    ("CT_small.dcm", "1.2.840.10008.1.2.1"),
    ("MR_small.dcm", "1.2.840.10008.1.2.1"),
    ("MR_small_bigendian.dcm", "1.2.840.10008.1.2.2"),
    ("rtdose_expb_1frame.dcm", "1.2.840.10008.1.2.2"),
    ("SC_rgb_small_odd_big_endian.dcm", "1.2.840.10008.1.2.2"),
    ("liver_expb_1frame.dcm", "1.2.840.10008.1.2.2"),
    ("image_dfl.dcm", "1.2.840.10008.1.2.1.99"),
    ("SC_rgb_jpeg_dcmtk.dcm", "1.2.840.10008.1.2.4.50"),
    ("JPEG-lossy.dcm", "1.2.840.10008.1.2.4.51"),
    ("SC_rgb_jpeg_gdcm.dcm", "1.2.840.10008.1.2.4.70"),
    ("MR_small_jpeg_ls_lossless.dcm", "1.2.840.10008.1.2.4.80"),
    ("JPEGLSNearLossless_16.dcm", "1.2.840.10008.1.2.4.81"),
    ("MR_small_jp2klossless.dcm", "1.2.840.10008.1.2.4.90"),
    ("JPEG2000.dcm", "1.2.840.10008.1.2.4.91"),
    ("MR_small_RLE.dcm", "1.2.840.10008.1.2.5"),
]
#: Big endian with 32-bit pixels in OW: readers disagree on its little endian form (pydicom
#: swaps whole pixels, dcmtk 16-bit words), so we send it only as it is.
UNCONVERTED = ("rtdose_expb_1frame.dcm",)
#: Orthanc answers 0xA700 for these (no Study/Series Instance UID).
ORTHANC_REFUSES = ("JPEGLSNearLossless_16.dcm",)
UNCOMPRESSED = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99",
                "1.2.840.10008.1.2.2")


def pixel_values(ds) -> list[int] | bytes:
    """Native Pixel Data as numbers, read in the byte order of C{ds}'s transfer syntax."""
    little = ds.file_meta.TransferSyntaxUID.is_little_endian
    elem = ds["PixelData"]
    data = elem.value
    bits = int(ds.BitsAllocated)
    if bits in (1, 8):
        if elem.VR == "OW" and not little:
            data = b"".join(data[i:i + 2][::-1] for i in range(0, len(data) - 1, 2))
        return data
    code = {16: "H", 32: "I"}[bits]
    n = len(data) // (bits // 8)
    return list(struct.unpack(("<" if little else ">") + f"{n}{code}", data[:n * bits // 8]))


def fingerprint(raw: bytes) -> tuple[str, str]:
    """('values'|'frames', MD5) of a Part 10 file's pixel data, see the module docstring."""
    ds = dcmread(BytesIO(raw))
    if ds.file_meta.TransferSyntaxUID in UNCOMPRESSED:
        values = pixel_values(ds)
        blob = values if isinstance(values, bytes) else repr(values).encode()
        return "values", hashlib.md5(blob).hexdigest()
    frames = int(ds.get("NumberOfFrames") or 1)
    md5 = hashlib.md5()
    for frame in generate_frames(ds.PixelData, number_of_frames=frames):
        md5.update(hashlib.md5(frame).digest())
    return "frames", md5.hexdigest()


def sample_files() -> list[tuple[str, str, bytes, str]]:
    """(name, syntax, Part 10 bytes, SOP Instance UID): pydicom's files, each UID unique."""
    out, seen = [], set()
    for n, (name, syntax) in enumerate(FILES):
        with open(get_testdata_file(name), "rb") as f:
            raw = f.read()
        ds = dcmread(BytesIO(raw), stop_before_pixels=True)
        assert ds.file_meta.TransferSyntaxUID == syntax, name
        uid = str(ds.SOPInstanceUID)
        if uid in seen:
            # Same length, so no length field changes: the file stays byte-identical else.
            last = uid.rsplit(".", 1)[1]
            assert len(last) >= 4 and syntax != "1.2.840.10008.1.2.1.99", name
            new = uid[:-3] + f"{n:03d}"
            raw = raw.replace(uid.encode(), new.encode())
            uid = new
        seen.add(uid)
        out.append((name, syntax, raw, uid))
    return out


class FingerprintTests(SynchronousTestCase):
    def test_decoder_agrees_with_pydicoms_twins(self) -> None:
        def read(name: str) -> bytes:
            with open(get_testdata_file(name), "rb") as f:
                return f.read()

        le, be = dcmread(BytesIO(read("MR_small.dcm"))), dcmread(
            BytesIO(read("MR_small_bigendian.dcm")))
        self.assertEqual(pixel_values(be)[0], 905)
        self.assertEqual(pixel_values(le), pixel_values(be))
        for a, b in [("rtdose_1frame.dcm", "rtdose_expb_1frame.dcm"),
                     ("SC_rgb_small_odd.dcm", "SC_rgb_small_odd_big_endian.dcm"),
                     ("liver_1frame.dcm", "liver_expb_1frame.dcm")]:
            self.assertEqual(fingerprint(read(a)), fingerprint(read(b)), b)
        self.assertNotEqual(fingerprint(read("MR_small.dcm")),
                            fingerprint(read("CT_small.dcm")))


class _Syntaxes(_Base):
    timeout = 240

    def check_stored(self, sent: dict, stored: dict[str, bytes]) -> None:
        for uid, (name, raw) in sent.items():
            self.assertIn(uid, stored, name)
            self.assertEqual(fingerprint(stored[uid]), fingerprint(raw), name)

    async def push_all(self, dest, files, sender=None, dimse_timeout: float = 20,
                       refused: tuple[str, ...] = (), unconverted: tuple[str, ...] = ()):
        """
        Send each file; those named in C{refused} must come back as Orthanc's 0xA700 (it
        answers that for missing Study/Series UIDs): a transient error that carries the
        DIMSE reply, for the queue's bounded retries.  Those in C{unconverted} (big endian
        we do not convert) to a peer that refuses their syntax: a permanent, clear failure.
        """
        sender = sender or self.sender(dimse_timeout=dimse_timeout)
        replies = {}
        for name, syntax, raw, uid in files:
            started = time.monotonic()
            try:
                r = await sender.send(dest, "application/dicom",
                                      base64.b64encode(raw).decode(), {})
            except DeliveryError as e:
                if name in unconverted:
                    self.assertEqual((e.transient, e.phase), (False, "association"))
                    self.assertIn("accepts no presentation context", str(e))
                    self.assertIn("not converted: big endian pixel data with 32 bits", str(e))
                    continue
                if name not in refused:
                    self.fail(f"{name}: {e}")
                self.assertEqual((e.transient, e.phase), (True, "store"))
                self.assertIsNotNone(e.max_attempts)
                body = json.loads(e.reply.body)
                self.assertFalse(e.reply.delivered)
                self.assertEqual((body["status"], body["sopInstanceUID"]), ("0xA700", uid))
                continue
            self.assertNotIn(name, refused + unconverted)
            body = json.loads(r.body)
            self.assertTrue(r.delivered, f"{name}: {r.body}")
            self.assertEqual(body["sopInstanceUID"], uid)
            # An odd-length deflate stream used to stall Orthanc for its 30 s timeout.
            self.assertLess(time.monotonic() - started, 10, name)
            replies[name] = body
        return sender, replies


class ThroughStorescp(_Syntaxes):
    def stored(self, folder: str) -> dict[str, bytes]:
        out = {}
        for name in os.listdir(folder):
            with open(os.path.join(folder, name), "rb") as f:
                raw = f.read()
            out[str(dcmread(BytesIO(raw), stop_before_pixels=True).SOPInstanceUID)] = raw
        return out

    def test_every_syntax_as_is(self) -> Deferred:
        return ensureDeferred(self._as_is())

    async def _as_is(self) -> None:
        files = sample_files()
        port = procs.free_port()
        folder = os.path.join(self.tmp, "in")
        self.storescp(folder, port, options=("+xa",))
        await wait_port(port)
        dest = parse_destination(f"dicom://STORESCP@127.0.0.1:{port}")
        sender, replies = await self.push_all(dest, files)
        # the big endian MR went over the pooled association of the LE one: converted
        self.assertEqual(replies["MR_small_bigendian.dcm"]["transferSyntaxUID"],
                         ExplicitVRLittleEndian)
        self.assertEqual(replies["rtdose_expb_1frame.dcm"]["transferSyntaxUID"],
                         ExplicitVRBigEndian)  # a fresh association: sent as it is
        for name, syntax, _, _ in files:
            if syntax not in UNCOMPRESSED:
                self.assertEqual(replies[name]["transferSyntaxUID"], syntax, name)
        self.check_stored({uid: (name, raw) for name, _, raw, uid in files},
                          self.stored(folder))

    def test_implicit_only_peer(self) -> Deferred:
        return ensureDeferred(self._implicit_only())

    async def _implicit_only(self) -> None:
        files = [f for f in sample_files() if f[1] in UNCOMPRESSED]
        port = procs.free_port()
        folder = os.path.join(self.tmp, "in")
        self.storescp(folder, port, options=("+xi",))
        await wait_port(port)
        dest = parse_destination(f"dicom://STORESCP@127.0.0.1:{port}")
        sender, replies = await self.push_all(dest, files, unconverted=UNCONVERTED)
        for name, body in replies.items():
            self.assertEqual(body["transferSyntaxUID"], ImplicitVRLittleEndian, name)
        stored = self.stored(folder)
        self.check_stored({uid: (name, raw) for name, _, raw, uid in files
                           if name not in UNCONVERTED}, stored)
        self.assertEqual(len(stored), len(files) - len(UNCONVERTED))
        # A compressed instance is never relabelled: it fails, clearly and permanently.
        name, syntax, raw, uid = [f for f in sample_files() if f[0] == "MR_small_RLE.dcm"][0]
        with self.assertRaises(DeliveryError) as e:
            await sender.send(dest, "application/dicom", base64.b64encode(raw).decode(), {})
        self.assertEqual((e.exception.transient, e.exception.phase), (False, "association"))
        self.assertIn("accepts no presentation context", str(e.exception))
        self.assertNotIn(uid, self.stored(folder))


class ThroughOrthanc(_Syntaxes):
    async def stored(self, base: str, pool) -> dict[str, bytes]:
        r = await treq.get(base + "/instances?expand", pool=pool)
        out = {}
        for instance in await r.json():
            f = await treq.get(f"{base}/instances/{instance['ID']}/file", pool=pool)
            out[instance["MainDicomTags"]["SOPInstanceUID"]] = await f.content()
        return out

    def test_every_syntax(self) -> Deferred:
        return ensureDeferred(self._every())

    async def _every(self) -> None:
        files = sample_files()
        base, port, pool = await self.start_orthanc()
        dest = parse_destination(f"dicom://ORTHANC@127.0.0.1:{port}")
        sender, replies = await self.push_all(dest, files, refused=ORTHANC_REFUSES)
        self.assertEqual(replies["MR_small_bigendian.dcm"]["transferSyntaxUID"],
                         ExplicitVRLittleEndian)
        self.assertEqual(replies["image_dfl.dcm"]["transferSyntaxUID"],
                         "1.2.840.10008.1.2.1.99")
        for name, syntax, _, _ in files:
            if syntax not in UNCOMPRESSED and name not in ORTHANC_REFUSES:
                self.assertEqual(replies[name]["transferSyntaxUID"], syntax, name)
        stored = await self.stored(base, pool)
        self.check_stored({uid: (name, raw) for name, _, raw, uid in files
                           if name not in ORTHANC_REFUSES}, stored)
        self.assertEqual(len(stored), len(files) - len(ORTHANC_REFUSES))

    def test_peer_refusing_big_endian(self) -> Deferred:
        return ensureDeferred(self._no_big_endian())

    async def _no_big_endian(self) -> None:
        files = [f for f in sample_files() if f[1] == ExplicitVRBigEndian]
        base, port, pool = await self.start_orthanc(AcceptedTransferSyntaxes=[
            ImplicitVRLittleEndian, ExplicitVRLittleEndian])
        dest = parse_destination(f"dicom://ORTHANC@127.0.0.1:{port}")
        sender, replies = await self.push_all(dest, files, unconverted=UNCONVERTED)
        for name, body in replies.items():
            self.assertIn(body["transferSyntaxUID"],
                          (ExplicitVRLittleEndian, ImplicitVRLittleEndian), name)
        stored = await self.stored(base, pool)
        self.check_stored({uid: (name, raw) for name, _, raw, uid in files
                           if name not in UNCONVERTED}, stored)
        self.assertEqual(len(stored), len(files) - len(UNCONVERTED))


class AgreesWithDcmconv(_Base):
    """Our big endian -> little endian conversion gives dcmtk's dcmconv's pixel bytes."""

    def test_same_pixel_data_as_dcmconv(self) -> Deferred:
        return ensureDeferred(self._dcmconv())

    async def _dcmconv(self) -> None:
        from medagent.dicom import dimse
        from medagent.dicom.instance import InstanceError, from_part10
        from tests.test_dicom_peers import program, run

        for name, syntax, raw, uid in sample_files():
            if syntax != ExplicitVRBigEndian:
                continue
            path = os.path.join(self.tmp, "le-" + name)
            out, code = await run([program("dcmconv"), "+te", get_testdata_file(name), path])
            self.assertEqual(code, 0, out)
            with open(path, "rb") as f:
                theirs = dcmread(f)
            instance = from_part10(raw)
            if name in UNCONVERTED:
                with self.assertRaises(InstanceError):
                    instance.encoded_as(ExplicitVRLittleEndian)
                continue
            ours = dimse.decode_dataset(instance.encoded_as(ExplicitVRLittleEndian),
                                        ExplicitVRLittleEndian)
            self.assertEqual(ours.PixelData, theirs.PixelData, name)
            self.assertEqual(ours.Rows, theirs.Rows, name)
