"""
DIMSE messages (PS3.7) on pynetdicom's message codecs: build requests and responses, cut them
into P-DATA-TF PDUs for the negotiated maximum, and reassemble incoming PDVs into messages.

Pure codec: no Twisted.  pynetdicom encodes the command sets (Implicit VR LE) and does the
fragmenting; pydicom encodes data sets.  What is ours: the bounds (a message may not grow past
C{max_message_bytes}), the ordering checks a stream needs, and the status words.
"""

from __future__ import annotations

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


def _direct(cls, fields: dict, data: bytes | None) -> msgs.DIMSEMessage:
    """
    A pynetdicom message with its command set filled in directly: the same elements
    C{primitive_to_message} sets (and the same encoder), without the primitive round trip,
    which costs more than the rest of a small C-STORE.
    """
    m = cls()
    cs = m.command_set
    for keyword in [e.keyword for e in cs]:
        if keyword not in fields and keyword != "CommandGroupLength":
            delattr(cs, keyword)
    for keyword, value in fields.items():
        setattr(cs, keyword, value)
    cs.CommandDataSetType = 0x0001 if data else 0x0101
    m.data_set = BytesIO(data or b"")
    m._set_command_group_length()
    return m


def c_store_rq(
    message_id: int, sop_class: str, sop_instance: str, data: bytes, priority: int = 2
) -> msgs.DIMSEMessage:
    return _direct(msgs.C_STORE_RQ, {
        "AffectedSOPClassUID": sop_class, "CommandField": 0x0001, "MessageID": message_id,
        "Priority": priority, "AffectedSOPInstanceUID": sop_instance}, data)


def c_store_rsp(
    request: msgs.DIMSEMessage, status: int, error_comment: str | None = None
) -> msgs.DIMSEMessage:
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


def message_pdus(message: msgs.DIMSEMessage, context_id: int, max_pdu: int) -> Iterator[bytes]:
    """
    The encoded P-DATA-TF PDUs for C{message}: one PDV each, no PDU longer than C{max_pdu}
    (the peer's Maximum Length Received; 0 = unlimited).
    """
    for primitive in message.encode_msg(context_id, max_pdu):
        yield P_DATA_TF(primitive).encode()


class MessageAssembler:
    """
    Collects the PDVs of P-DATA-TF PDUs into DIMSE messages (pynetdicom's C{decode_msg}),
    one message at a time, all on one presentation context, at most C{max_message_bytes}.
    """

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE) -> None:
        self.max_message_bytes = max_message_bytes
        self._current: msgs.DIMSEMessage | None = None
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

    def feed(self, pdu: P_DATA_TF) -> list[msgs.DIMSEMessage]:
        done = []
        for item in pdu.presentation_data_value_items:
            cid = item.presentation_context_id
            data = item.presentation_data_value
            if cid is None or not data:  # pdu.decode_pdu already refuses both
                raise DimseError("PDV without a context id or a value")
            if self._current is None:
                if not data[0] & 1:
                    raise DimseError("data set fragment before its command set")
                self._current = msgs.DIMSEMessage()
                self._context_id = cid
                self._size = 0
            elif cid != self._context_id:
                raise DimseError("fragments of one message on two presentation contexts")
            self._size += len(data) - 1
            if self._size > self.max_message_bytes:
                raise DimseError(
                    f"DIMSE message larger than {self.max_message_bytes} bytes"
                )
            current = self._current
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


def command_name(message: msgs.DIMSEMessage) -> str:
    return COMMAND_NAMES.get(message.command_set.CommandField, "unknown")
