"""
One DICOM instance as the agent moves it: SOP class, SOP instance, transfer syntax and the
encoded data set - read from a Part 10 file or a DICOM JSON object with pydicom, converted
between uncompressed transfer syntaxes with pydicom when the peer asks for another.

Pure (no Twisted).  Parsing a big instance blocks: callers run it in their thread pool.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import struct
import tempfile
import types
from collections import deque
from io import BytesIO
from typing import Any

import attr
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_preamble
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian

from medagent.dicom import dimse
from medagent.dicom.pdu import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)


class InstanceError(ValueError):
    """Input that is not a usable DICOM instance; the message says what is wrong."""


def valid_uid(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID_RE.match(value))


@attr.s(auto_attribs=True)
class Instance:
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    data: bytes  # the data set, encoded in transfer_syntax (no file meta)
    #: Why this instance cannot be converted to another syntax (None: it can, if native).
    not_convertible: str | None = None

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def convertible(self) -> bool:
        """Whether we may send it in another (uncompressed) syntax than its own."""
        return dimse.is_native(self.transfer_syntax) and self.not_convertible is None

    def offered_syntaxes(self) -> list[list[str]]:
        """
        The transfer syntax lists to propose, one presentation context each: the instance's
        own first (sent as is), then Explicit/Implicit VR LE if we can convert to them
        (only from an uncompressed syntax - we do not decompress pixel data).
        """
        own = [self.transfer_syntax]
        if not self.convertible:
            return [own]
        others: list[str] = [
            ts for ts in (dimse.ExplicitVRLittleEndian, dimse.ImplicitVRLittleEndian)
            if ts != self.transfer_syntax]
        return [own, others]

    def encoded_as(self, syntax: str) -> bytes:
        """
        The data set in C{syntax}: as is, or re-encoded by pydicom (uncompressed only), byte
        order converted value by value (L{convert_native}).  Compressed data is never
        relabelled: an encapsulated instance only goes in its own syntax.
        """
        if UID(syntax) == UID(self.transfer_syntax):
            return self.data
        if not (dimse.is_native(syntax) and dimse.is_native(self.transfer_syntax)):
            raise InstanceError(
                f"cannot convert from transfer syntax {self.transfer_syntax} to {syntax}"
            )
        if self.not_convertible:
            raise InstanceError(self.not_convertible)
        return convert_native(self.data, self.transfer_syntax, syntax)


#: Bytes per value of the binary VRs whose values pydicom keeps as raw bytes: a change of
#: byte order must swap them itself (pydicom's writer does not, see its dcmwrite warning).
#: Number VRs (US, SS, UL, SL, FL, FD, AT, SV, UV) are decoded and re-encoded by pydicom.
SWAP_WIDTH = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
_ARRAY_CODES = {2: "H", 4: "I", 8: "Q"}


def swap_bytes(value: bytes, width: int) -> bytes:
    """C{value} with the byte order of each C{width}-byte word reversed."""
    from array import array

    if len(value) % width:
        raise InstanceError(f"a value of {len(value)} bytes is not made of {width}-byte words")
    words = array(_ARRAY_CODES[width])
    if words.itemsize != width:  # pragma: no cover - exotic platforms
        return b"".join(value[i:i + width][::-1] for i in range(0, len(value), width))
    words.frombytes(value)
    words.byteswap()
    return words.tobytes()


def _unswappable(ds: Dataset, elem: Any) -> str | None:
    """Why C{elem} (of C{ds}) has no byte order we can be sure of, or None."""
    if (elem.VR == "UN" and elem.value) or " or " in str(elem.VR):
        return f"element {elem.tag} has VR {elem.VR}: its byte order cannot be known"
    if elem.tag == 0x7FE00010 and elem.VR == "OW" and ds.get("BitsAllocated", 16) > 16:
        # OW is 16-bit words, but readers disagree on how a big endian 32-bit pixel spans
        # two of them (pydicom: whole values; dcmtk: word by word): no conversion is right
        # for both, so none is made.
        return (f"big endian pixel data with {ds.get('BitsAllocated')} bits allocated has no "
                "agreed little endian form")
    if elem.VR in SWAP_WIDTH and elem.is_undefined_length:
        return f"element {elem.tag} ({elem.VR}) has an undefined length"
    return None


def _swap_binary(ds: Dataset) -> None:
    """Swap, in place and in every nested item, the raw-byte values of C{SWAP_WIDTH} VRs."""
    for elem in ds:  # iterating converts pydicom's raw elements to decoded ones
        why = _unswappable(ds, elem)
        if why:
            raise InstanceError(why)  # refuse rather than guess
        if elem.VR == "SQ":
            for item in elem.value or ():
                _swap_binary(item)
        elif elem.VR in SWAP_WIDTH and elem.value:
            elem.value = swap_bytes(elem.value, SWAP_WIDTH[elem.VR])


def conversion_problem(ds: Dataset) -> str | None:
    """Why the big endian data set C{ds} cannot be converted to little endian, or None."""
    for elem in ds:
        why = _unswappable(ds, elem)
        if why:
            return why
        if elem.VR == "SQ":
            for item in elem.value or ():
                why = conversion_problem(item)
                if why:
                    return why
    return None


def big_endian_problem(data: bytes) -> str | None:
    """
    L{conversion_problem} of a big endian data set, from its header: the elements before
    the pixel data, and the pixel data's VR (its value is not read).
    """
    from pydicom.filereader import read_dataset

    pixel: dict[int, str] = {}

    def stop(tag: Any, vr: Any, length: int) -> bool:
        if tag >= 0x7FE00008:  # (Float / Double Float) Pixel Data: note the VR, stop
            pixel[int(tag)] = str(vr)
            return True
        return False

    ds = read_dataset(BytesIO(data), False, False, stop_when=stop)
    why = conversion_problem(ds)
    if why is None and pixel.get(0x7FE00010) == "OW":
        ds.PixelData = b""  # stands in for the unread value: only VR and Bits Allocated count
        ds["PixelData"].VR = "OW"
        why = _unswappable(ds, ds["PixelData"])
    return why


def convert_native(data: bytes, source: str, target: str) -> bytes:
    """
    Re-encode a data set between uncompressed transfer syntaxes.  Across byte orders (from
    Explicit VR Big Endian) every multi-byte binary value is swapped: numbers by pydicom
    (decoded and re-encoded), OW/OF/OL/OD/OV by L{_swap_binary}; an element whose byte order
    is unknowable (UN, 32/64-bit pixels in OW) makes it fail with L{InstanceError} rather
    than corrupt it.
    """
    if not (dimse.is_native(source) and dimse.is_native(target)):
        raise InstanceError(f"cannot convert from transfer syntax {source} to {target}")
    ds = dimse.decode_dataset(data, source)
    if dimse.syntax_flags(source)[1] != dimse.syntax_flags(target)[1]:
        _swap_binary(ds)
    return dimse.encode_dataset(ds, target)


def _check_uids(sop_class: Any, sop_instance: Any) -> None:
    if not valid_uid(sop_class):
        raise InstanceError("the instance has no valid SOP Class UID (0008,0016)")
    if not valid_uid(sop_instance):
        raise InstanceError("the instance has no valid SOP Instance UID (0008,0018)")


_b64: types.ModuleType
try:  # SIMD base64: a 5 MB instance decodes in ~2 ms instead of ~25 ms
    import pybase64 as _b64
except ImportError:  # pragma: no cover - optional speed-up
    _b64 = base64


def decode_base64(body: str) -> bytes:
    """Strict base64 (whitespace such as MIME line breaks allowed, nothing else)."""
    try:
        return _b64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        pass
    try:
        return _b64.b64decode("".join(body.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InstanceError("the body is not valid base64")


def dataset_offset(raw: bytes) -> tuple[FileMetaDataset, int]:
    """The file meta and where the data set starts in a Part 10 byte string."""
    from pydicom.filereader import _read_file_meta_info  # no public API for a buffer

    fp = BytesIO(raw)
    try:
        if read_preamble(fp, False) is None:
            raise InstanceError("not a DICOM Part 10 file (no 'DICM' prefix)")
        meta = _read_file_meta_info(fp)
    except InstanceError:
        raise
    except Exception as e:
        raise InstanceError(f"unreadable DICOM file meta information ({e.__class__.__name__})")
    return meta, fp.tell()


def read_header(data: bytes, syntax: str, *, stop_after: int | None = None) -> Dataset:
    """
    The data set in C{data} (encoded in C{syntax}) up to, not including, the pixel data -
    or only up to tag C{stop_after} - read by pydicom without copying the pixels.
    """
    from pydicom.filereader import read_dataset

    implicit, little, deflated = dimse.syntax_flags(syntax)
    if deflated:
        import zlib

        data = zlib.decompress(data, -zlib.MAX_WBITS)
    limit = stop_after if stop_after is not None else 0x7FE00007

    def stop(tag: Any, vr: Any, length: int) -> bool:
        return tag > limit

    ds = read_dataset(BytesIO(data), implicit, little, stop_when=stop)
    list(ds)  # parse now (pydicom reads lazily), inside the caller's try
    return ds


def pad_deflated(data: bytes, syntax: str) -> bytes:
    """
    A Deflated Explicit VR Little Endian data set of odd length (the deflate stream as some
    writers leave it) with the single trailing NULL byte PS3.5 A.5 requires: on the wire an
    odd-length data set is invalid, and peers such as Orthanc then wait for a byte that never
    comes.  Inflating ignores the pad.
    """
    if len(data) % 2 and dimse.syntax_flags(syntax)[2]:
        return data + b"\x00"
    return data


#: Explicit VR elements with a 4-byte length (and 2 reserved bytes) (PS3.5 7.1.2).
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
             b"UT", b"UV"}


def _scan_elements(raw: bytes, offset: int, implicit: bool, until: int,
                   wanted: set[int]) -> tuple[dict[int, bytes], int] | None:
    """
    The values of the C{wanted} tags among the little endian elements of C{raw} from
    C{offset}, stopping before the first tag above C{until}; and where it stopped.  None when
    something needs a real parser (an undefined length, a truncated element): the caller
    then asks pydicom.
    """
    found: dict[int, bytes] = {}
    end = len(raw)
    while offset + 8 <= end:
        group, element = struct.unpack_from("<HH", raw, offset)
        tag = (group << 16) | element
        if tag > until:
            return found, offset
        if implicit:
            length = struct.unpack_from("<I", raw, offset + 4)[0]
            start = offset + 8
        else:
            vr = raw[offset + 4: offset + 6]
            if vr in _LONG_VRS:
                if offset + 12 > end:
                    return None
                length = struct.unpack_from("<I", raw, offset + 8)[0]
                start = offset + 12
            else:
                length = struct.unpack_from("<H", raw, offset + 6)[0]
                start = offset + 8
        if length == 0xFFFFFFFF or start + length > end:
            return None
        if tag in wanted:
            found[tag] = raw[start: start + length]
        offset = start + length
    return found, offset


def quick_uids(data: bytes, syntax: str) -> tuple[str | None, str | None] | None:
    """
    SOP Class and SOP Instance UID (None where absent) of a little endian data set, read from
    its bytes after checking that every top-level element is well formed; None when that
    needs a real parser (another syntax, a sequence of undefined length, a truncated or
    overlong element, a UID that is not ASCII): the caller then asks pydicom.
    """
    implicit, little, deflated = dimse.syntax_flags(syntax)
    if deflated or not little:
        return None
    scanned = _scan_elements(data, 0, implicit, 0xFFFFFFFF, {0x00080016, 0x00080018})
    if scanned is None or scanned[1] != len(data):
        return None
    values = scanned[0]
    found = [_text(values.get(tag)) for tag in (0x00080016, 0x00080018)]
    for tag, text in zip((0x00080016, 0x00080018), found):
        if tag in values and text is None:
            return None
    return found[0], found[1]


def _text(value: bytes | None) -> str | None:
    if value is None:
        return None
    try:
        return value.decode("ascii").rstrip("\x00 ")
    except UnicodeDecodeError:
        return None


def _from_part10_quick(raw: bytes) -> Instance | None:
    """
    L{from_part10} for the common case - file meta and data set in (Explicit or Implicit
    VR) Little Endian - by reading only the few elements it needs; None for anything else.
    """
    if raw[128:132] != b"DICM":
        return None
    meta = _scan_elements(raw, 132, False, 0x0002FFFF, {0x00020002, 0x00020003, 0x00020010})
    if meta is None:
        return None
    values, offset = meta
    syntax = _text(values.get(0x00020010))
    if syntax not in (str(ExplicitVRLittleEndian), str(dimse.ImplicitVRLittleEndian)):
        return None
    header = _scan_elements(raw, offset, syntax == dimse.ImplicitVRLittleEndian, 0x00080018,
                            {0x00080016, 0x00080018})
    if header is None:
        return None
    sop_class = _text(header[0].get(0x00080016)) or _text(values.get(0x00020002))
    sop_instance = _text(header[0].get(0x00080018)) or _text(values.get(0x00020003))
    if not (valid_uid(sop_class) and valid_uid(sop_instance)):
        return None  # pydicom's reading says what is wrong
    return Instance(str(sop_class), str(sop_instance), str(syntax), raw[offset:])


def from_part10(raw: bytes) -> Instance:
    """Read a Part 10 file: the SOP UIDs from the data set, the data set bytes as they are."""
    quick = _from_part10_quick(raw)
    if quick is not None:
        return quick
    meta, offset = dataset_offset(raw)
    syntax = meta.get("TransferSyntaxUID")
    if not valid_uid(syntax):
        raise InstanceError("the file meta has no Transfer Syntax UID (0002,0010)")
    data = pad_deflated(raw[offset:], str(syntax))
    try:
        ds = read_header(data, str(syntax), stop_after=0x00080018)
        sop_class, sop_instance = ds.get("SOPClassUID"), ds.get("SOPInstanceUID")
    except Exception as e:
        raise InstanceError(f"unreadable DICOM data set ({e.__class__.__name__})")
    sop_class = str(sop_class) if sop_class is not None else meta.get(
        "MediaStorageSOPClassUID")
    sop_instance = str(sop_instance) if sop_instance is not None else meta.get(
        "MediaStorageSOPInstanceUID")
    _check_uids(sop_class, sop_instance)
    problem = None
    if UID(str(syntax)) == ExplicitVRBigEndian:
        # Retired and rare: read its whole header now, so that an instance we could not
        # convert is only ever offered (and pooled) in its own syntax.
        try:
            problem = big_endian_problem(data)
        except Exception as e:  # sent as it is, then, to a peer that takes Big Endian
            problem = f"its data set cannot be read ({e.__class__.__name__})"
    return Instance(str(sop_class), str(sop_instance), str(syntax), data, problem)


def from_json(body: str | dict) -> Instance:
    """A DICOM JSON model object (PS3.18 F.2) encoded by pydicom as Explicit VR LE."""
    try:
        obj = json.loads(body) if isinstance(body, str) else body
        if not isinstance(obj, dict):
            raise InstanceError("the DICOM JSON body must be one object")
        for value in obj.values():
            if isinstance(value, dict) and "BulkDataURI" in value:
                raise InstanceError("BulkDataURI is not supported; inline the data")
        ds = Dataset.from_json(obj)
    except InstanceError:
        raise
    except Exception as e:
        raise InstanceError(f"invalid DICOM JSON ({e.__class__.__name__}: {e})")
    _check_uids(ds.get("SOPClassUID"), ds.get("SOPInstanceUID"))
    try:
        data = dimse.encode_dataset(ds, ExplicitVRLittleEndian)
    except Exception as e:
        raise InstanceError(f"the DICOM JSON data set cannot be encoded ({e})")
    return Instance(str(ds.SOPClassUID), str(ds.SOPInstanceUID), ExplicitVRLittleEndian, data)


def from_body(content_type: str, body: str) -> Instance:
    ct = content_type.split(";")[0].strip().lower()
    if ct == "application/dicom":
        return from_part10(decode_base64(body))
    if ct == "application/dicom+json":
        return from_json(body)
    raise InstanceError(
        f"content type {content_type} cannot be sent over DICOM "
        "(use application/dicom or application/dicom+json)"
    )


#: What L{search_uids} reads: Patient ID, Study Instance UID, SOP Instance UID.
SEARCH_TAGS = {0x00100020: "patient_id", 0x0020000D: "study_uid", 0x00080018: "sop_uid"}
#: Base64 text L{search_uids} decodes first (the header, almost always): 256 KiB.
SEARCH_PREFIX = 256 * 1024


def _search_value(value: Any) -> str | None:
    text = str(value).strip().rstrip("\x00").strip() if value is not None else ""
    return text[:100] or None


def uids_from_json(obj: Any) -> dict[str, str | None]:
    """L{search_uids} of a DICOM JSON model object (PS3.18 F.2)."""
    out: dict[str, str | None] = dict.fromkeys(SEARCH_TAGS.values())
    if not isinstance(obj, dict):
        return out
    for tag, name in SEARCH_TAGS.items():
        element = obj.get(f"{tag:08X}")
        values = element.get("Value") if isinstance(element, dict) else None
        if isinstance(values, list) and values:
            first = values[0]
            if isinstance(first, dict):  # a PN would be {"Alphabetic": ...}; not ours
                continue
            out[name] = _search_value(first)
    return out


def _uids_of_part10(raw: bytes) -> dict[str, str | None] | None:
    """The search tags of a Little Endian Part 10 file by a scan of its header; None when
    that needs a real parser (or C{raw} ends too soon)."""
    if raw[128:132] != b"DICM":
        return None
    meta = _scan_elements(raw, 132, False, 0x0002FFFF, {0x00020010})
    if meta is None:
        return None
    values, offset = meta
    syntax = _text(values.get(0x00020010))
    if syntax not in (str(ExplicitVRLittleEndian), str(dimse.ImplicitVRLittleEndian)):
        return None
    header = _scan_elements(raw, offset, syntax == dimse.ImplicitVRLittleEndian, 0x0020000D,
                            set(SEARCH_TAGS))
    if header is None or (header[1] + 8 > len(raw) and 0x0020000D not in header[0]):
        return None  # (stopped at the end of a prefix, not past the tags)
    return {name: _search_value(_text(header[0].get(tag))) for tag, name in SEARCH_TAGS.items()}


def search_uids(content_type: str, body: str) -> dict[str, str | None]:
    """
    What the console searches a DICOM message by - C{patient_id}, C{study_uid}, C{sop_uid}
    (each None when absent) - from an ``application/dicom`` (base64 Part 10) or
    ``application/dicom+json`` body; all None for anything else or anything unreadable
    (never an error: a push is not refused for its search fields).  Reads only the header:
    a scan of the first L{SEARCH_PREFIX} characters, else pydicom with
    C{stop_before_pixels} and C{specific_tags}.
    """
    empty: dict[str, str | None] = dict.fromkeys(SEARCH_TAGS.values())
    ct = content_type.split(";")[0].strip().lower()
    if ct == "application/dicom+json":
        try:
            return uids_from_json(json.loads(body))
        except ValueError:
            return empty
    if ct != "application/dicom":
        return empty
    head = body[:SEARCH_PREFIX]
    try:  # (base64 with line breaks may not decode in part: pydicom below)
        quick = _uids_of_part10(decode_base64(head[:len(head) - len(head) % 4]))
    except InstanceError:
        quick = None
    if quick is not None:
        return quick
    try:
        from pydicom import dcmread
        from pydicom.tag import Tag

        ds = dcmread(BytesIO(decode_base64(body)), stop_before_pixels=True,
                     specific_tags=[Tag(t) for t in SEARCH_TAGS])
        return {name: _search_value(ds.get(Tag(tag)).value if Tag(tag) in ds else None)
                for tag, name in SEARCH_TAGS.items()}
    except Exception:
        return empty


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    """One group 0002 element in Explicit VR Little Endian (PS3.10 7.1)."""
    if vr == b"OB":
        return struct.pack("<HH2sHI", 0x0002, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _ui(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


_IMPLEMENTATION_ITEMS = (
    _meta_element(0x0012, b"UI", _ui(IMPLEMENTATION_CLASS_UID))
    + _meta_element(0x0013, b"SH", IMPLEMENTATION_VERSION_NAME.encode("ascii")
                    + b" " * (len(IMPLEMENTATION_VERSION_NAME) % 2)))


def file_meta_bytes(sop_class: str, sop_instance: str, syntax: str) -> bytes:
    """
    Preamble, 'DICM' and the file meta group for a Part 10 file we write: the bytes
    pydicom's writer makes for pynetdicom's C{create_file_meta}, written directly (this runs
    once per received instance, and the writer costs more than the rest of a small store).
    """
    for uid in (sop_class, sop_instance, syntax):
        if not valid_uid(uid):
            raise InstanceError(f"invalid UID for the file meta: {uid!r}")
    items = (_meta_element(0x0001, b"OB", b"\x00\x01")
             + _meta_element(0x0002, b"UI", _ui(sop_class))
             + _meta_element(0x0003, b"UI", _ui(sop_instance))
             + _meta_element(0x0010, b"UI", _ui(syntax))
             + _IMPLEMENTATION_ITEMS)
    return (b"\x00" * 128 + b"DICM" + _meta_element(0x0000, b"UL", struct.pack("<I", len(items)))
            + items)


def atomic_write(path: str, chunks: list[bytes], *, fsync: bool = True,
                 fsync_folder: bool = True, tmp: str | None = None) -> int:
    """
    Write atomically: a temporary file in the same folder (C{tmp}, made ahead by
    L{SpareFiles}, or a new one), fsync, rename (and fsync the folder).  Returns the size.
    Nothing is left behind on failure.
    """
    folder = os.path.dirname(path)
    if tmp is None:
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".part",
                                   dir=folder)
    else:
        fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if fsync and fsync_folder:
        fsync_dir(folder)
    return sum(len(c) for c in chunks)


def write_note(path: str, content: bytes, tmp: str | None = None) -> None:
    """
    Write a small file without fsync: for notes whose existence a later folder fsync makes
    durable and whose content, if a crash tears it, can be rebuilt.  With C{tmp} (a spare
    file) it is written there and renamed into place; without, in place.
    """
    target = path if tmp is None else tmp
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    if tmp is not None:
        os.replace(tmp, path)


class SpareFiles:
    """
    Empty files made ahead in a folder, taken by L{atomic_write} and L{write_note} as their
    temporary file.  On ext4 creating a file waits for the journal about as long as an fsync
    does; made while the peer is busy sending the next instance, that wait is off the path
    between an instance's arrival and its answer.  Thread-safe (a deque); the names start
    with L{PREFIX} so that leftovers of a crash are known and removed (L{remove_leftovers}).
    """

    PREFIX = ".spare-"

    def __init__(self, folder: str, keep: int = 4) -> None:
        self.folder = folder
        self.keep = keep
        self._ready: deque[str] = deque()

    def take(self) -> str | None:
        try:
            return self._ready.popleft()
        except IndexError:
            return None

    @property
    def ready(self) -> int:
        return len(self._ready)

    def refill(self) -> None:
        """Make files until C{keep} are ready (blocking: in a thread pool)."""
        while len(self._ready) < self.keep:
            fd, path = tempfile.mkstemp(prefix=self.PREFIX, suffix=".part", dir=self.folder)
            os.close(fd)
            self._ready.append(path)

    def remove_leftovers(self) -> None:
        """Remove every spare file in the folder, ours or a previous run's (blocking)."""
        self._ready.clear()
        for name in os.listdir(self.folder):
            if name.startswith(self.PREFIX):
                try:
                    os.unlink(os.path.join(self.folder, name))
                except OSError:
                    pass


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def dataset_json(ds: Dataset, bulk_threshold: int = 65536) -> dict:
    """
    DICOM JSON of C{ds} without pixel data; other binary values above C{bulk_threshold}
    bytes are left out as ``BulkDataURI: "bulkdata/<tag>"`` (read them from the file).
    """
    for tag in PIXEL_TAGS:
        if tag in ds:
            del ds[tag]
    return ds.to_json_dict(
        bulk_data_threshold=bulk_threshold,
        bulk_data_element_handler=lambda elem: f"bulkdata/{int(elem.tag):08X}",
        suppress_invalid_tags=True,
    )
