"""
DICOM Upper Layer PDUs (PS3.8 section 9): framing and building, on pynetdicom's PDU classes.

Pure codec: no Twisted, no sockets.  L{PDUDecoder} turns a byte stream into pynetdicom PDU
objects with a bounded buffer; the builders turn our association parameters into the PDUs
pynetdicom encodes.  We only write what pynetdicom does not: the stream framing (pynetdicom
reads PDUs from a blocking socket) and the checks a stream reader must make before trusting a
length field.
"""

from __future__ import annotations

from typing import Any

import struct
from typing import Iterable, Sequence

from pydicom.uid import UID, generate_uid
from pynetdicom.pdu import (
    A_ABORT_RQ,
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    A_ASSOCIATE_RQ,
    A_RELEASE_RP,
    A_RELEASE_RQ,
    P_DATA_TF,
)
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext

APPLICATION_CONTEXT_NAME = UID("1.2.840.10008.3.1.1.1")
#: Fixed for this implementation (derived, not random, so it is the same on every install).
IMPLEMENTATION_CLASS_UID = UID(generate_uid(entropy_srcs=["medagent", "dicom", "1"]))
IMPLEMENTATION_VERSION_NAME = "MEDAGENT_01"

#: What we tell peers we can receive in one P-DATA-TF, and what we accept before an
#: association is up (an A-ASSOCIATE-RQ with 128 contexts is ~20 kB).
DEFAULT_MAX_PDU = 262_144
MAX_ASSOCIATE_PDU = 1_048_576
#: Never trust a peer's "unlimited" (0) for what we buffer: cap it here.
ABSOLUTE_MAX_PDU = 64 * 1_048_576

PDU_CLASSES = {
    0x01: A_ASSOCIATE_RQ,
    0x02: A_ASSOCIATE_AC,
    0x03: A_ASSOCIATE_RJ,
    0x04: P_DATA_TF,
    0x05: A_RELEASE_RQ,
    0x06: A_RELEASE_RP,
    0x07: A_ABORT_RQ,
}
PDU_NAMES = {
    0x01: "A-ASSOCIATE-RQ",
    0x02: "A-ASSOCIATE-AC",
    0x03: "A-ASSOCIATE-RJ",
    0x04: "P-DATA-TF",
    0x05: "A-RELEASE-RQ",
    0x06: "A-RELEASE-RP",
    0x07: "A-ABORT",
}
_FIXED_LENGTH = {0x05: 4, 0x06: 4, 0x07: 4}

# A-ABORT source / provider reasons (PS3.8 9.3.8)
ABORT_SOURCE_USER = 0
ABORT_SOURCE_PROVIDER = 2
REASON_NOT_SPECIFIED = 0
REASON_UNRECOGNISED_PDU = 1
REASON_UNEXPECTED_PDU = 2
REASON_UNRECOGNISED_PARAMETER = 4
REASON_UNEXPECTED_PARAMETER = 5
REASON_INVALID_PARAMETER = 6

ABORT_SOURCES = {0: "service-user", 1: "reserved", 2: "service-provider"}
ABORT_REASONS = {
    0: "reason not specified",
    1: "unrecognized PDU",
    2: "unexpected PDU",
    3: "reserved",
    4: "unrecognized PDU parameter",
    5: "unexpected PDU parameter",
    6: "invalid PDU parameter value",
}

# A-ASSOCIATE-RJ (PS3.8 9.3.4)
RESULT_PERMANENT = 1
RESULT_TRANSIENT = 2
SOURCE_USER = 1
SOURCE_ACSE = 2
SOURCE_PRESENTATION = 3
DIAG_NO_REASON = 1
DIAG_APP_CONTEXT_NOT_SUPPORTED = 2
DIAG_CALLING_AE_NOT_RECOGNISED = 3
DIAG_CALLED_AE_NOT_RECOGNISED = 7
DIAG_PROTOCOL_VERSION_NOT_SUPPORTED = 2  # with SOURCE_ACSE
DIAG_TEMPORARY_CONGESTION = 1  # with SOURCE_PRESENTATION
DIAG_LOCAL_LIMIT_EXCEEDED = 2  # with SOURCE_PRESENTATION

REJECT_RESULTS = {1: "rejected-permanent", 2: "rejected-transient"}
REJECT_SOURCES = {
    1: "service-user",
    2: "service-provider (ACSE)",
    3: "service-provider (presentation)",
}
REJECT_REASONS = {
    1: {1: "no reason given", 2: "application context name not supported",
        3: "calling AE title not recognized", 7: "called AE title not recognized"},
    2: {1: "no reason given", 2: "protocol version not supported"},
    3: {0: "reserved", 1: "temporary congestion", 2: "local limit exceeded"},
}

# Presentation context results (PS3.8 9.3.3.2)
CONTEXT_RESULTS = {
    0: "acceptance",
    1: "user-rejection",
    2: "no-reason (provider rejection)",
    3: "abstract-syntax-not-supported (provider rejection)",
    4: "transfer-syntaxes-not-supported (provider rejection)",
}

_HEADER = struct.Struct(">BBI")


class PDUError(Exception):
    """
    A PDU we cannot accept.  C{reason} is the A-ABORT provider reason to answer with
    (PS3.8 9.3.8), so the protocol can tell the peer what was wrong.
    """

    def __init__(self, message: str, reason: int = REASON_INVALID_PARAMETER) -> None:
        super().__init__(message)
        self.reason = reason


def describe_rejection(result: int | None, source: int | None, reason: int | None) -> str:
    """The words for an A-ASSOCIATE-RJ, e.g. for a DeliveryError a person will read."""
    res = REJECT_RESULTS.get(result or 0, f"result {result}")
    src = REJECT_SOURCES.get(source or 0, f"source {source}")
    why = REJECT_REASONS.get(source or 0, {}).get(reason or 0, f"reason {reason}")
    return f"{res}, {src}: {why} (result={result}, source={source}, reason={reason})"


def describe_abort(source: int | None, reason: int | None) -> str:
    """The words and codes of an A-ABORT (the reason only means something from a provider)."""
    src = ABORT_SOURCES.get(source or 0, f"source {source}")
    if source == ABORT_SOURCE_PROVIDER:
        why = ABORT_REASONS.get(reason or 0, f"reason {reason}")
        return f"A-ABORT from {src}: {why} (source={source}, reason={reason})"
    return f"A-ABORT from {src} (source={source})"


class PDUDecoder:
    """
    Splits a byte stream into PDUs.  C{max_length} bounds the PDU length field (and so the
    buffer): set it to the maximum we announced once the association is negotiated.
    A violation raises L{PDUError}; the caller answers it with an A-ABORT.
    """

    def __init__(self, max_length: int = MAX_ASSOCIATE_PDU) -> None:
        self.max_length = max_length
        self._buffer = bytearray()
        #: an acceptor's answers to A-ASSOCIATE-RQs it has seen (L{AssociateAnswers}): a
        #: request with the same bytes (AE titles aside) is not decoded again
        self.answers: AssociateAnswers | None = None

    def feed(self, data: bytes) -> list:
        """Add C{data}; return the complete PDUs it finished, in order."""
        buf = self._buffer
        buf += data
        out = []
        offset = 0
        end = len(buf)
        try:
            while end - offset >= 6:
                pdu_type, _, length = _HEADER.unpack_from(buf, offset)
                if pdu_type not in PDU_CLASSES:
                    raise PDUError(
                        f"unrecognized PDU type 0x{pdu_type:02X}", REASON_UNRECOGNISED_PDU
                    )
                fixed = _FIXED_LENGTH.get(pdu_type)
                if fixed is not None and length != fixed:
                    raise PDUError(
                        f"{PDU_NAMES[pdu_type]} with length {length} (expected {fixed})",
                        REASON_INVALID_PARAMETER,
                    )
                limit = self.max_length if pdu_type == 0x04 else max(
                    self.max_length, MAX_ASSOCIATE_PDU
                )
                if length > limit:
                    raise PDUError(
                        f"{PDU_NAMES[pdu_type]} of {length} bytes exceeds the maximum of {limit}",
                        REASON_INVALID_PARAMETER,
                    )
                if end - offset - 6 < length:
                    break
                with memoryview(buf) as view:
                    raw = bytes(view[offset : offset + 6 + length])
                offset += 6 + length
                if pdu_type == 0x01 and self.answers is not None:
                    known = self.answers.lookup(raw)
                    if known is not None:
                        out.append(known)
                        continue
                out.append(decode_pdu(pdu_type, raw))
        finally:
            if offset:
                # Compact once per feed, not once per PDU.
                del buf[:offset]
        return out

    @property
    def buffered(self) -> int:
        return len(self._buffer)


def ae_titles(raw: bytes) -> tuple[str, str] | None:
    """(calling, called) AE title of an A-ASSOCIATE-RQ's bytes, as pynetdicom reads them."""
    try:
        return raw[26:42].decode("ascii").strip(), raw[10:26].decode("ascii").strip()
    except UnicodeDecodeError:
        return None


class KnownRequest:
    """An A-ASSOCIATE-RQ whose bytes (AE titles aside) were answered before: L{answer}."""

    pdu_type = 0x01

    def __init__(self, raw: bytes, calling: str, called: str, answer: Any) -> None:
        self.raw = raw
        self.calling_ae = calling
        self.called_ae = called
        self.answer = answer


class AssociateAnswers:
    """
    The negotiation outcomes of an acceptor, keyed by the request's bytes without its AE
    titles (protocol version, application context, presentation contexts, user information).
    A modality proposes the same hundred-odd contexts on every association: decoding them
    with pynetdicom, negotiating and encoding the answer took tens of milliseconds each time -
    more than storing a hundred small instances.  The AE titles are checked on every
    association; bounded (C{size} entries, oldest dropped).
    """

    def __init__(self, size: int = 16) -> None:
        self.size = size
        self._answers: dict[bytes, Any] = {}
        self.hits = 0

    @staticmethod
    def key(raw: bytes) -> bytes:
        return raw[6:10] + raw[42:]

    def lookup(self, raw: bytes) -> KnownRequest | None:
        answer = self._answers.get(self.key(raw))
        titles = ae_titles(raw)
        if answer is None or titles is None:
            return None
        self.hits += 1
        return KnownRequest(raw, titles[0], titles[1], answer)

    def remember(self, raw: bytes, answer: Any) -> None:
        if len(self._answers) >= self.size:
            self._answers.pop(next(iter(self._answers)))
        self._answers[self.key(raw)] = answer


def decode_pdu(pdu_type: int, raw: bytes):
    """Decode one complete PDU with pynetdicom, turning its errors into L{PDUError}."""
    cls = PDU_CLASSES[pdu_type]
    pdu = cls()
    try:
        pdu.decode(raw)
    except Exception as e:  # pynetdicom raises assorted errors on malformed items
        raise PDUError(
            f"malformed {PDU_NAMES[pdu_type]}: {e.__class__.__name__}", REASON_INVALID_PARAMETER
        )
    if pdu_type == 0x04:
        # pynetdicom checks PDV item lengths with an assert only; check the sum here.
        items = pdu.presentation_data_value_items
        total = sum(5 + len(item.presentation_data_value or b"") for item in items)
        if not items or total != len(raw) - 6:
            raise PDUError("malformed P-DATA-TF: PDV item lengths", REASON_INVALID_PARAMETER)
        for item in items:
            if not item.presentation_data_value:
                raise PDUError("P-DATA-TF with an empty PDV", REASON_INVALID_PARAMETER)
    elif pdu_type == 0x01:
        pdu.medagent_raw = raw  # for L{AssociateAnswers}
        if pdu.application_context_name is None or not [
            i for i in pdu.variable_items if i.__class__.__name__ == "UserInformationItem"
        ]:
            raise PDUError("A-ASSOCIATE-RQ without application context or user information",
                           REASON_INVALID_PARAMETER)
    return pdu


def _user_information(max_pdu: int) -> list:
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = max_pdu
    impl_uid = ImplementationClassUIDNotification()
    impl_uid.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    impl_name = ImplementationVersionNameNotification()
    impl_name.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    return [max_length, impl_uid, impl_name]


def build_contexts(requested: Iterable[tuple[str, Sequence[str]]]) -> list[PresentationContext]:
    """Presentation contexts with odd ids 1, 3, 5... for (abstract syntax, transfer syntaxes)."""
    contexts = []
    for n, (abstract, syntaxes) in enumerate(requested):
        if n >= 128:
            raise ValueError("at most 128 presentation contexts per association")
        cx = PresentationContext()
        cx.context_id = 2 * n + 1
        cx.abstract_syntax = UID(abstract)
        cx.transfer_syntax = [UID(s) for s in syntaxes]
        contexts.append(cx)
    return contexts


def associate_rq(
    calling_ae: str, called_ae: str, contexts: list[PresentationContext], max_pdu: int
) -> A_ASSOCIATE_RQ:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT_NAME
    primitive.calling_ae_title = calling_ae
    primitive.called_ae_title = called_ae
    primitive.presentation_context_definition_list = contexts
    primitive.user_information = _user_information(max_pdu)
    return A_ASSOCIATE_RQ(primitive)


def associate_ac(
    request: A_ASSOCIATE, results: list[PresentationContext], max_pdu: int, extra_items=()
) -> A_ASSOCIATE_AC:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT_NAME
    primitive.calling_ae_title = request.calling_ae_title
    primitive.called_ae_title = request.called_ae_title
    primitive.result = 0x00
    primitive.result_source = 0x01
    primitive.presentation_context_definition_results_list = results
    primitive.user_information = _user_information(max_pdu) + list(extra_items)
    return A_ASSOCIATE_AC(primitive)


def associate_rj(result: int, source: int, reason: int) -> A_ASSOCIATE_RJ:
    pdu = A_ASSOCIATE_RJ()
    pdu.result = result
    pdu.source = source
    pdu.reason_diagnostic = reason
    return pdu


def abort(source: int = ABORT_SOURCE_USER, reason: int = REASON_NOT_SPECIFIED) -> A_ABORT_RQ:
    pdu = A_ABORT_RQ()
    pdu.source = source
    pdu.reason_diagnostic = reason if source == ABORT_SOURCE_PROVIDER else 0
    return pdu


def release_rq() -> A_RELEASE_RQ:
    return A_RELEASE_RQ()


def release_rp() -> A_RELEASE_RP:
    return A_RELEASE_RP()


def pdu_name(pdu) -> str:
    return PDU_NAMES.get(getattr(pdu, "pdu_type", 0), pdu.__class__.__name__)
