"""
DIMSE messages (PS3.7) on pynetdicom's message codecs: build requests and responses, cut them
into P-DATA-TF PDUs for the negotiated maximum, and reassemble incoming PDVs into messages.

Pure codec: no Twisted.  pynetdicom encodes and decodes the command sets and does the
fragmenting, except for C-STORE and C-ECHO - once per instance, where pydicom's writer and
reader cost more than the rest of a small store - whose few command elements we encode
(L{encode_command}) and decode (L{decode_command}) ourselves, byte for byte as pynetdicom
does (see the codec tests); pydicom encodes data sets.  Also ours: the bounds (a message may
not grow past C{max_message_bytes}), the ordering checks a stream needs, and the status words.
"""

from __future__ import annotations

import struct
from io import BytesIO
from typing import Any, Iterator

from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import dimse_messages as msgs
from pynetdicom import dimse_primitives as prims
from pynetdicom import status as pstatus
from pynetdicom.dsutils import decode as _decode_ds
from pynetdicom.dsutils import encode as _encode_ds
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA

VERIFICATION = UID("1.2.840.10008.1.1")
MODALITY_WORKLIST_FIND = UID("1.2.840.10008.5.1.4.31")
MPPS = UID("1.2.840.10008.3.1.2.3.3")

NATIVE_SYNTAXES = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
)
DEFAULT_MAX_MESSAGE = 2 * 1024 * 1024 * 1024 - 1  # one instance in memory: bounded, large

COMMAND_NAMES = {code: name for code, (name, _cls) in msgs._MESSAGE_TYPES.items()}

SUCCESS = 0x0000
PENDING = 0xFF00
PENDING_WARNING = 0xFF01
CANCEL = 0xFE00


class DimseError(Exception):
    """A P-DATA stream that does not make a DIMSE message; answered with an A-ABORT."""


def is_native(syntax: str) -> bool:
    return UID(syntax) in NATIVE_SYNTAXES


def syntax_flags(syntax: str) -> tuple[bool, bool, bool]:
    """(implicit VR, little endian, deflated) for an uncompressed transfer syntax."""
    uid = UID(syntax)
    if uid == ImplicitVRLittleEndian:
        return True, True, False
    if uid == ExplicitVRBigEndian:
        return False, False, False
    if uid == DeflatedExplicitVRLittleEndian:
        return False, True, True
    # Explicit VR LE and every encapsulated (compressed) syntax
    return False, True, False


def encode_dataset(ds: Dataset, syntax: str) -> bytes:
    """Encode C{ds} in C{syntax} with pydicom (via pynetdicom's helper)."""
    implicit, little, deflated = syntax_flags(syntax)
    raw = _encode_ds(ds, implicit, little, deflated)
    if raw is None:
        raise ValueError("the data set cannot be encoded in transfer syntax " + str(syntax))
    return raw


def decode_dataset(raw: bytes, syntax: str) -> Dataset:
    implicit, little, deflated = syntax_flags(syntax)
    return _decode_ds(BytesIO(raw), implicit, little, deflated)


def status_meaning(code: int, service: str = "storage") -> tuple[str, str]:
    """(category, meaning) of a DIMSE status, from pynetdicom's tables (PS3.4/PS3.7)."""
    table = {
        "storage": pstatus.STORAGE_SERVICE_CLASS_STATUS,
        "verification": pstatus.VERIFICATION_SERVICE_CLASS_STATUS,
        "find": pstatus.MODALITY_WORKLIST_SERVICE_CLASS_STATUS,
        "mpps": pstatus.GENERAL_STATUS,
    }.get(service, pstatus.GENERAL_STATUS)
    category, meaning = table.get(code, (pstatus.code_to_category(code), ""))
    if not meaning:
        meaning = category
    return category, meaning


# -- building messages ---------------------------------------------------------------------


def _message(cls, primitive) -> msgs.DIMSEMessage:
    m = cls()
    m.primitive_to_message(primitive)
    return m


def c_echo_rq(message_id: int) -> msgs.DIMSEMessage:
    p = prims.C_ECHO()
    p.MessageID = message_id
    p.AffectedSOPClassUID = VERIFICATION
    return _message(msgs.C_ECHO_RQ, p)


def c_echo_rsp(request: msgs.DIMSEMessage, status: int = SUCCESS) -> msgs.DIMSEMessage:
    p = prims.C_ECHO()
    p.MessageIDBeingRespondedTo = request.command_set.MessageID
    p.AffectedSOPClassUID = request.command_set.AffectedSOPClassUID or VERIFICATION
    p.Status = status
    return _message(msgs.C_ECHO_RSP, p)


#: The command elements (group 0000) we encode ourselves: element number -> (keyword, VR).
_COMMAND_ELEMENTS = {
    0x0000: ("CommandGroupLength", "UL"),
    0x0002: ("AffectedSOPClassUID", "UI"),
    0x0100: ("CommandField", "US"),
    0x0110: ("MessageID", "US"),
    0x0120: ("MessageIDBeingRespondedTo", "US"),
    0x0700: ("Priority", "US"),
    0x0800: ("CommandDataSetType", "US"),
    0x0900: ("Status", "US"),
    0x0901: ("OffendingElement", "AT"),
    0x0902: ("ErrorComment", "LO"),
    0x1000: ("AffectedSOPInstanceUID", "UI"),
    0x1030: ("MoveOriginatorApplicationEntityTitle", "AE"),
    0x1031: ("MoveOriginatorMessageID", "US"),
}
_COMMAND_TAGS = {keyword: element for element, (keyword, _vr) in _COMMAND_ELEMENTS.items()}
_ELEMENT_HEADER = struct.Struct("<HHI")
_PDU_HEADER = struct.Struct(">BBII")  # P-DATA-TF type, reserved, length; PDV item length
_US = struct.Struct("<H")
_UL = struct.Struct("<I")


def encode_command(fields: dict[str, Any]) -> bytes:
    """
    A command set (Implicit VR Little Endian, PS3.7 6.3.1) with its group length, from
    C{fields} (keywords of L{_COMMAND_ELEMENTS}): what pydicom writes for the same elements,
    without building a data set - for the commands sent once per instance.
    """
    parts = []
    for element in sorted(_COMMAND_TAGS[k] for k in fields):
        keyword, vr = _COMMAND_ELEMENTS[element]
        value = fields[keyword]
        if vr == "US":
            raw = _US.pack(value)
        elif vr == "UL":
            raw = _UL.pack(value)
        else:
            raw = str(value).encode("ascii")
            if len(raw) % 2:
                raw += b"\x00" if vr == "UI" else b" "
        parts.append(_ELEMENT_HEADER.pack(0x0000, element, len(raw)) + raw)
    body = b"".join(parts)
    return _ELEMENT_HEADER.pack(0x0000, 0x0000, 4) + _UL.pack(len(body)) + body


def _pdv_pdus(context_id: int, control: int, value: bytes | memoryview,
              max_pdu: int) -> Iterator[bytes | memoryview]:
    """
    P-DATA-TF PDUs of one PDV each for C{value}, cut at C{max_pdu} (0 = one PDU), as header
    and value pieces (the value is sliced with a memoryview: no copy per PDU).  C{control}
    is the message control header of a command (1) or data set (0) fragment; the last
    fragment gets bit 1.
    """
    size = len(value) if max_pdu == 0 else max(max_pdu - 6, 1)
    view = memoryview(value)
    offset = 0
    total = len(value)
    while True:
        piece = view[offset: offset + size]
        offset += len(piece)
        last = offset >= total
        yield _PDU_HEADER.pack(0x04, 0, len(piece) + 6, len(piece) + 2) + bytes(
            [context_id, control | (2 if last else 0)])
        yield piece
        if last:
            return


class EncodedMessage:
    """
    A DIMSE message we send, its command set encoded once by L{encode_command}.  It reads
    like pynetdicom's message where callers look (C{command_set}, C{data_set},
    C{context_id}); C{command_set} is built as a pydicom data set only if someone asks.
    """

    def __init__(self, cls: type, fields: dict[str, Any], data: bytes | None) -> None:
        self.message_class = cls
        self.fields = dict(fields)
        self.fields["CommandDataSetType"] = 0x0001 if data else 0x0101
        self.encoded_command = encode_command(self.fields)
        self.data = data or b""
        self.context_id: int | None = None
        self._command_set: Dataset | None = None

    @property
    def command_set(self) -> Dataset:
        if self._command_set is None:
            ds = Dataset()
            ds.CommandGroupLength = len(self.encoded_command) - 12
            for keyword in sorted(self.fields, key=_COMMAND_TAGS.__getitem__):
                setattr(ds, keyword, self.fields[keyword])
            self._command_set = ds
        return self._command_set

    @property
    def data_set(self) -> BytesIO:
        return BytesIO(self.data)

    def pdus(self, context_id: int, max_pdu: int) -> Iterator[bytes | memoryview]:
        self.context_id = context_id
        yield from _pdv_pdus(context_id, 0x01, self.encoded_command, max_pdu)
        if self.data:
            yield from _pdv_pdus(context_id, 0x00, self.data, max_pdu)


def field(message: Any, keyword: str, default: Any = None) -> Any:
    """A command field of C{message}, without building a data set for our own messages."""
    if isinstance(message, EncodedMessage):
        return message.fields.get(keyword, default)
    return message.command_set.get(keyword, default)


class CommandSet(dict):
    """
    A decoded command set of one of the commands we read most (L{FAST_COMMANDS}), by
    keyword: C{cs.Status}, C{cs.get("ErrorComment")}, like pydicom's data set for these.
    """

    def __getattr__(self, keyword: str) -> Any:
        try:
            return self[keyword]
        except KeyError:
            raise AttributeError(keyword) from None


#: C-STORE and C-ECHO, requests and responses: decoded by L{decode_command}.
FAST_COMMANDS = {0x0001: msgs.C_STORE_RQ, 0x8001: msgs.C_STORE_RSP,
                 0x0030: msgs.C_ECHO_RQ, 0x8030: msgs.C_ECHO_RSP}


def decode_command(raw: bytes | memoryview) -> CommandSet | None:
    """
    The command set in C{raw} (Implicit VR LE), if it is one of L{FAST_COMMANDS} made only
    of the elements in L{_COMMAND_ELEMENTS}; None for anything else (pynetdicom decodes it).
    """
    fields = CommandSet()
    offset, end = 0, len(raw)
    try:
        while offset < end:
            group, element, length = _ELEMENT_HEADER.unpack_from(raw, offset)
            offset += 8
            known = _COMMAND_ELEMENTS.get(element)
            if group != 0 or known is None or offset + length > end:
                return None
            keyword, vr = known
            value = raw[offset: offset + length]
            offset += length
            if vr == "US":
                if length != 2:
                    return None
                fields[keyword] = _US.unpack(value)[0]
            elif vr == "UL":
                if length != 4:
                    return None
                fields[keyword] = _UL.unpack(value)[0]
            elif vr == "AT":
                if length % 4:
                    return None
                tags = [(g << 16) | e for g, e in struct.iter_unpack("<HH", value)]
                fields[keyword] = tags[0] if len(tags) == 1 else tags
            else:
                text = bytes(value).decode("ascii").rstrip("\x00 ")
                fields[keyword] = UID(text) if vr == "UI" else text
    except (struct.error, UnicodeDecodeError):
        return None
    if fields.get("CommandGroupLength") != end - 12 or "CommandDataSetType" not in fields:
        return None
    if fields.get("CommandField") not in FAST_COMMANDS:
        return None
    return fields


class ReceivedMessage:
    """
    A C-STORE or C-ECHO message decoded by L{decode_command}: C{command_set},
    C{data_set} and C{context_id}, as on pynetdicom's messages.
    """

    def __init__(self, command_set: CommandSet, context_id: int) -> None:
        self.command_set = command_set
        self.context_id = context_id
        self.message_class = FAST_COMMANDS[command_set["CommandField"]]
        self.data_set: BytesIO | None = None
        self.expects_data = command_set["CommandDataSetType"] != 0x0101
        self.pieces: list[bytes] = []


def _direct(cls, fields: dict, data: bytes | None) -> EncodedMessage:
    """
    A message of C{cls} with its command set encoded directly: pynetdicom's primitive round
    trip and pydicom's writer cost more than the rest of a small C-STORE.
    """
    return EncodedMessage(cls, fields, data)


def c_store_rq(
    message_id: int, sop_class: str, sop_instance: str, data: bytes, priority: int = 2
) -> EncodedMessage:
    return _direct(msgs.C_STORE_RQ, {
        "AffectedSOPClassUID": sop_class, "CommandField": 0x0001, "MessageID": message_id,
        "Priority": priority, "AffectedSOPInstanceUID": sop_instance}, data)


def c_store_rsp(
    request: msgs.DIMSEMessage, status: int, error_comment: str | None = None
) -> EncodedMessage:
    cs = request.command_set
    fields = {"AffectedSOPClassUID": cs.AffectedSOPClassUID, "CommandField": 0x8001,
              "MessageIDBeingRespondedTo": cs.MessageID, "Status": status,
              "AffectedSOPInstanceUID": cs.AffectedSOPInstanceUID}
    if error_comment:
        fields["ErrorComment"] = error_comment[:64]
    return _direct(msgs.C_STORE_RSP, fields, None)


def c_find_rq(message_id: int, sop_class: str, identifier: bytes) -> msgs.DIMSEMessage:
    p = prims.C_FIND()
    p.MessageID = message_id
    p.AffectedSOPClassUID = sop_class
    p.Priority = 2
    p.Identifier = BytesIO(identifier)
    return _message(msgs.C_FIND_RQ, p)


def c_find_rsp(
    request: msgs.DIMSEMessage, status: int, identifier: bytes | None = None,
    error_comment: str | None = None,
) -> msgs.DIMSEMessage:
    p = prims.C_FIND()
    p.MessageIDBeingRespondedTo = request.command_set.MessageID
    p.AffectedSOPClassUID = request.command_set.AffectedSOPClassUID
    p.Status = status
    if identifier is not None:
        p.Identifier = BytesIO(identifier)
    if error_comment:
        # pynetdicom's primitives set ``ErrorComment = None`` untyped: mypy takes it as None.
        p.ErrorComment = error_comment[:64]  # type: ignore[assignment]
    return _message(msgs.C_FIND_RSP, p)


def n_create_rsp(
    request: msgs.DIMSEMessage, status: int, sop_instance: str | None,
    attributes: bytes | None = None, error_comment: str | None = None,
) -> msgs.DIMSEMessage:
    p = prims.N_CREATE()
    p.MessageIDBeingRespondedTo = request.command_set.MessageID
    p.AffectedSOPClassUID = request.command_set.AffectedSOPClassUID
    if sop_instance:
        p.AffectedSOPInstanceUID = sop_instance
    p.Status = status
    if attributes:
        p.AttributeList = BytesIO(attributes)
    if error_comment:
        # pynetdicom's primitives set ``ErrorComment = None`` untyped: mypy takes it as None.
        p.ErrorComment = error_comment[:64]  # type: ignore[assignment]
    return _message(msgs.N_CREATE_RSP, p)


def n_set_rsp(
    request: msgs.DIMSEMessage, status: int, attributes: bytes | None = None,
    error_comment: str | None = None,
) -> msgs.DIMSEMessage:
    p = prims.N_SET()
    p.MessageIDBeingRespondedTo = request.command_set.MessageID
    p.AffectedSOPClassUID = request.command_set.RequestedSOPClassUID
    p.AffectedSOPInstanceUID = request.command_set.RequestedSOPInstanceUID
    p.Status = status
    if attributes:
        p.AttributeList = BytesIO(attributes)
    if error_comment:
        # pynetdicom's primitives set ``ErrorComment = None`` untyped: mypy takes it as None.
        p.ErrorComment = error_comment[:64]  # type: ignore[assignment]
    return _message(msgs.N_SET_RSP, p)


def generic_failure_rsp(request: msgs.DIMSEMessage, status: int) -> msgs.DIMSEMessage | None:
    """A response with C{status} for any request type we do not serve (None for C-CANCEL)."""
    code = request.command_set.CommandField
    if code == 0x0FFF or code & 0x8000 or (code | 0x8000) not in msgs._MESSAGE_TYPES:
        return None
    rsp_cls = msgs._MESSAGE_TYPES[code | 0x8000][1]
    name = rsp_cls.__name__
    # The primitive class is looked up by message type: its attributes are known at run time.
    primitive: Any = msgs._MSG_TO_PRIMITVE[name[: name.rfind("_R")]]()
    primitive.MessageIDBeingRespondedTo = request.command_set.MessageID
    cs = request.command_set
    sop_class = cs.get("AffectedSOPClassUID") or cs.get("RequestedSOPClassUID")
    if sop_class and hasattr(primitive, "AffectedSOPClassUID"):
        primitive.AffectedSOPClassUID = sop_class
    primitive.Status = status
    return _message(rsp_cls, primitive)


# -- fragmenting -------------------------------------------------------------------------


def message_pdus(message: Any, context_id: int, max_pdu: int) -> Iterator[bytes]:
    """
    The encoded P-DATA-TF PDUs for C{message}: one PDV each, no PDU longer than C{max_pdu}
    (the peer's Maximum Length Received; 0 = unlimited).
    """
    if isinstance(message, EncodedMessage):
        pieces = message.pdus(context_id, max_pdu)
        for header in pieces:
            yield bytes(header) + bytes(next(pieces))
        return
    for primitive in message.encode_msg(context_id, max_pdu):
        yield P_DATA_TF(primitive).encode()


def message_bytes(message: Any, context_id: int, max_pdu: int) -> bytes:
    """L{message_pdus} as one string: for our own messages, one copy of the data set."""
    if isinstance(message, EncodedMessage):
        return b"".join(message.pdus(context_id, max_pdu))
    return b"".join(message_pdus(message, context_id, max_pdu))


class MessageAssembler:
    """
    Collects the PDVs of P-DATA-TF PDUs into DIMSE messages (pynetdicom's C{decode_msg}),
    one message at a time, all on one presentation context, at most C{max_message_bytes}.
    """

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE) -> None:
        self.max_message_bytes = max_message_bytes
        self._current: msgs.DIMSEMessage | ReceivedMessage | None = None
        self._context_id: int | None = None
        self._size = 0

    @property
    def in_progress(self) -> bool:
        return self._current is not None

    @property
    def partial_context_id(self) -> int | None:
        return self._context_id

    def reset(self) -> None:
        self._current = None
        self._context_id = None
        self._size = 0

    def feed(self, pdu: P_DATA_TF) -> list[Any]:
        done: list[Any] = []
        for item in pdu.presentation_data_value_items:
            cid = item.presentation_context_id
            data = item.presentation_data_value
            if cid is None or not data:  # pdu.decode_pdu already refuses both
                raise DimseError("PDV without a context id or a value")
            if self._current is None:
                if not data[0] & 1:
                    raise DimseError("data set fragment before its command set")
                self._context_id = cid
                self._size = 0
                if data[0] == 0x03:  # a whole command set in one fragment: the usual case
                    self._size = len(data) - 1
                    self._check_size()
                    command = decode_command(memoryview(data)[1:])
                    if command is not None:
                        fast = ReceivedMessage(command, cid)
                        if fast.expects_data:
                            self._current = fast
                        else:
                            done.append(fast)
                            self.reset()
                        continue
                    self._size = 0
                self._current = msgs.DIMSEMessage()
            elif cid != self._context_id:
                raise DimseError("fragments of one message on two presentation contexts")
            current = self._current
            if isinstance(current, ReceivedMessage):
                if data[0] & 1:
                    raise DimseError("command fragment inside a data set")
                self._size += len(data) - 1
                self._check_size()
                current.pieces.append(data[1:])
                if data[0] & 2:
                    current.data_set = BytesIO(b"".join(current.pieces))
                    current.pieces = []
                    done.append(current)
                    self.reset()
                continue
            self._size += len(data) - 1
            self._check_size()
            if not data[0] & 1 and type(current) is msgs.DIMSEMessage:
                raise DimseError("data set fragment before the last command fragment")
            primitive = P_DATA()
            # pynetdicom annotates the items as tuples but its setter accepts only lists.
            primitive.presentation_data_value_list = [[cid, data]]  # type: ignore[list-item]
            try:
                complete = current.decode_msg(primitive)
            except DimseError:
                raise
            except Exception as e:
                raise DimseError(f"undecodable command set: {e.__class__.__name__}")
            if complete:
                if type(current) is msgs.DIMSEMessage:
                    raise DimseError("message without a command set")
                done.append(current)
                self.reset()
        return done

    def _check_size(self) -> None:
        if self._size > self.max_message_bytes:
            raise DimseError(f"DIMSE message larger than {self.max_message_bytes} bytes")


def command_name(message: msgs.DIMSEMessage) -> str:
    return COMMAND_NAMES.get(message.command_set.CommandField, "unknown")
