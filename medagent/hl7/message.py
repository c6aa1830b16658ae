"""
HL7 v2 message helpers the agent needs around MLLP: clean up the text, read the header fields
that drive delivery (MSH-9, MSH-10, MSH-18), read an acknowledgement, and build one.

Only what delivery needs is read, by splitting on the separators the message declares in
MSH-1/MSH-2: python-hl7's full parser misreads a short or odd MSH and costs a full parse of a
message that may carry a PDF.  The ACK is built field by field (protocols.md 1.5) because
python-hl7's ``create_ack`` drops MSH-18 and has no MSA-3/ERR; its control-id generator is
used.  Escaping is done here rather than with ``hl7.util`` because that module turns non-ASCII
into ``\\X..\\`` (wrong for UTF-8 messages) and logs field content (patient data) when it meets
a bad escape.  The tests read what we build back with python-hl7 as an independent check.
"""

from __future__ import annotations

import codecs
import re
from datetime import datetime, timezone

import attr
import hl7

ACK_CODES = ("AA", "AE", "AR", "CA", "CE", "CR")
POSITIVE_ACK_CODES = ("AA", "CA")

# MSA-3 texts for negative answers when the caller gives none (same words as Medplum's).
_DEFAULT_ACK_TEXT = {
    "AE": "Application Error",
    "AR": "Application Reject",
    "CE": "Commit Error",
    "CR": "Commit Reject",
}

# HL7 table 0211 (MSH-18) -> Python codec.  Keys are compared upper-cased with runs of
# spaces/underscores collapsed; a few common non-standard spellings are accepted too.
_CHARSETS = {
    "ASCII": "ascii",
    "ISO IR6": "ascii",
    "8859/1": "latin-1",
    "8859/2": "iso8859_2",
    "8859/3": "iso8859_3",
    "8859/4": "iso8859_4",
    "8859/5": "iso8859_5",
    "8859/6": "iso8859_6",
    "8859/7": "iso8859_7",
    "8859/8": "iso8859_8",
    "8859/9": "iso8859_9",
    "8859/15": "iso8859_15",
    "ISO IR14": "shift_jis",  # JIS X 0201 (single byte); shift_jis's one-byte range is exactly it
    "ISO IR87": "iso2022_jp",
    "ISO IR159": "iso2022_jp_2",
    "GB 18030-2000": "gb18030",
    "KS X 1001": "euc_kr",
    "BIG-5": "big5",
    "UNICODE UTF-8": "utf-8",
    "UNICODE UTF-16": "utf-16",
    "UNICODE UTF-32": "utf-32",
    # Seen in the field although not in table 0211:
    "UTF-8": "utf-8",
    "UTF8": "utf-8",
    "ISO IR100": "latin-1",  # the DICOM term for Latin-1
    "ISO IR192": "utf-8",  # the DICOM term for UTF-8
    "ISO-8859-1": "latin-1",
    "WINDOWS-1252": "cp1252",
    "CP1252": "cp1252",
}


class HL7Error(ValueError):
    """Text that cannot be handled as an HL7 v2 message; the message says why."""


@attr.s(frozen=True, auto_attribs=True)
class Separators:
    """The delimiters a message declares in MSH-1/MSH-2 (defaults ``|^~\\&``)."""

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"

    @classmethod
    def from_msh(cls, text: str) -> "Separators":
        """Read MSH-1 and MSH-2 from the start of a message (``MSH|^~\\&|...``)."""
        if len(text) < 4 or not text.startswith("MSH"):
            raise HL7Error("HL7 message must start with MSH")
        field = text[3]
        end = text.find(field, 4)
        seg_end = text.find("\r")
        if end < 0 or (0 <= seg_end < end):
            raise HL7Error("MSH segment is incomplete (no field after MSH-2)")
        enc = text[4:end]
        if any(c.isalnum() or c.isspace() for c in field + enc):
            # e.g. "MSHM...": a letter as separator reads back as different segments, so an
            # ACK built from it would not be an ACK any more
            raise HL7Error("MSH-1/MSH-2 separators must not be letters, digits or whitespace")
        defaults = cls()
        return cls(
            field=field,
            component=enc[0] if len(enc) > 0 else defaults.component,
            repetition=enc[1] if len(enc) > 1 else defaults.repetition,
            escape=enc[2] if len(enc) > 2 else defaults.escape,
            subcomponent=enc[3] if len(enc) > 3 else defaults.subcomponent,
        )

    @property
    def encoding_characters(self) -> str:
        """MSH-2 as written."""
        return self.component + self.repetition + self.escape + self.subcomponent

    def __str__(self) -> str:
        return self.field + self.encoding_characters


@attr.s(frozen=True, auto_attribs=True)
class Ack:
    """What an acknowledgement says: MSA-1, MSA-2 and a human-readable text (MSA-3 or ERR)."""

    code: str
    control_id: str
    text: str | None = None

    @property
    def positive(self) -> bool:
        return self.code in POSITIVE_ACK_CODES


_LINE_ENDS = re.compile(r"\r\n|\n|\r")
_SEGMENT_RUNS = re.compile(r"\r{2,}")


def normalise(text: str) -> str:
    """
    Make hand-written or JSON-carried text a proper HL7 message: ``\\r\\n`` and ``\\n`` become
    ``\\r``, blank lines and surrounding whitespace go, and the message ends with one ``\\r``.
    Raises L{HL7Error} unless it starts with MSH.
    """
    if not isinstance(text, str):
        raise HL7Error("HL7 message must be text")
    text = _LINE_ENDS.sub("\r", text.lstrip("\ufeff")).strip()
    text = _SEGMENT_RUNS.sub("\r", text)
    if not text.startswith("MSH") or len(text) < 4:
        raise HL7Error("HL7 message must start with MSH")
    return text + "\r"


def _first_segment(text: str) -> str:
    end = text.find("\r")
    return text if end < 0 else text[:end]


def _msh(text: str) -> tuple[list[str], Separators]:
    """
    MSH fields as raw strings, indexed by HL7 field number (``fields[10]`` is MSH-10), and the
    separators.  Only the first segment is parsed, so this is cheap even for a message that
    carries a PDF.
    """
    seps = Separators.from_msh(text)
    segment = _first_segment(text)
    # MSH-1 is the field separator itself, so MSH-2 is the first item after it.
    fields = ["MSH", seps.field] + segment[4:].split(seps.field)
    return fields, seps


def _get(fields: list[str], n: int) -> str:
    return fields[n] if n < len(fields) else ""


def _components(raw: str, seps: Separators) -> list[str]:
    """First repetition of a field, split into components."""
    return raw.split(seps.repetition)[0].split(seps.component)


def control_id(text: str) -> str:
    """MSH-10 (message control id), as written; L{HL7Error} if empty."""
    fields, _ = _msh(text)
    value = _get(fields, 10).strip()
    if not value:
        raise HL7Error("HL7 message has no MSH-10 (message control id)")
    return value


def order_number(text: str) -> str | None:
    """
    The order (accession) number of a message: ORC-2 (placer order number), else OBR-2, else
    OBR-3 (filler), first component of the first such segment; None when there is none.
    For search only (bounded to 100 characters).
    """
    try:
        seps = Separators.from_msh(text)
    except HL7Error:
        return None
    found: dict[tuple[str, int], str] = {}
    for raw in text.replace("\r\n", "\r").replace("\n", "\r").split("\r"):
        name = raw[:3]
        if name not in ("ORC", "OBR"):
            continue
        fields = raw.split(seps.field)
        for n in ((2,) if name == "ORC" else (2, 3)):
            value = _components(_get(fields, n), seps)[0].strip()
            if value:
                found.setdefault((name, n), value)
    for key in (("ORC", 2), ("OBR", 2), ("OBR", 3)):
        if key in found:
            return found[key][:100]
    return None


def patient_id(text: str) -> str | None:
    """
    The patient id of a message: the first component of PID-3's first repetition (the
    identifier, without its assigning authority) of the first PID segment; None when there
    is none.  For search only (bounded to 100 characters).
    """
    try:
        seps = Separators.from_msh(text)
    except HL7Error:
        return None
    for raw in text.replace("\r\n", "\r").replace("\n", "\r").split("\r"):
        if raw[:3] == "PID" and raw[3:4] == seps.field:
            value = _components(_get(raw.split(seps.field), 3), seps)[0].strip()
            return value[:100] or None
    return None


def message_type(text: str) -> str:
    """MSH-9 as ``TYPE^TRIGGER`` (``ORM^O01``), always with ``^``, for logs and routing."""
    fields, seps = _msh(text)
    parts = [p for p in _components(_get(fields, 9), seps)[:2] if p]
    return "^".join(parts)


def version(text: str) -> str:
    """MSH-12 (first component), e.g. ``2.5.1``; empty if absent."""
    fields, seps = _msh(text)
    return _components(_get(fields, 12), seps)[0]


def _charset_name(name: str) -> str | None:
    key = " ".join(name.replace("_", " ").split()).upper()
    return _CHARSETS.get(key)


def charset(text: str) -> str | None:
    """
    The Python codec named by MSH-18 (first repetition: the default charset), or None if
    MSH-18 is empty or not one we know.
    """
    fields, seps = _msh(text)
    raw = _get(fields, 18).split(seps.repetition)[0].split(seps.component)[0]
    return _charset_name(raw) if raw.strip() else None


def charset_of_bytes(payload: bytes) -> str | None:
    """L{charset} read straight from the bytes of a received message (MSH is ASCII)."""
    end = payload.find(b"\r")
    head = payload if end < 0 else payload[:end]
    try:
        return charset(head.decode("latin-1").replace("\n", ""))
    except HL7Error:
        return None


def check_codec(name: str) -> str:
    """The canonical name of codec C{name}; L{HL7Error} if Python has no such codec."""
    try:
        return codecs.lookup(name).name
    except LookupError:
        raise HL7Error(f"Unknown character encoding {name!r}")


def decode(payload: bytes, encoding: str | None = None, default: str = "utf-8") -> str:
    """
    Text of a received message: C{encoding} if given (a per-endpoint override, because many
    senders leave MSH-18 empty and send Windows-1252 anyway), else MSH-18, else C{default}.
    L{HL7Error} if the bytes do not decode.
    """
    codec = encoding or charset_of_bytes(payload) or default
    try:
        return payload.decode(check_codec(codec))
    except UnicodeDecodeError as e:
        raise HL7Error(f"Message is not valid {codec} (byte {e.start})")


def escape(text: str, separators: Separators | str = Separators()) -> str:
    """Escape delimiters (``\\F\\ \\S\\ \\R\\ \\T\\ \\E\\``) and line breaks (``\\.br\\``)."""
    seps = _as_separators(separators)
    e = seps.escape
    table = {
        seps.escape: f"{e}E{e}",
        seps.field: f"{e}F{e}",
        seps.component: f"{e}S{e}",
        seps.repetition: f"{e}R{e}",
        seps.subcomponent: f"{e}T{e}",
    }
    text = text.replace("\r\n", "\n")
    out = []
    for c in text:
        if c in table:
            out.append(table[c])
        elif c in "\r\n":
            out.append(f"{e}.br{e}")
        else:
            out.append(c)
    return "".join(out)


def unescape(text: str, separators: Separators | str = Separators()) -> str:
    """
    Undo L{escape}; also ``\\Xhh..\\`` (hex bytes, read as Latin-1) and the formatting codes
    that mean a line break.  Unknown sequences (highlighting, charset switches) are dropped.
    """
    seps = _as_separators(separators)
    e = seps.escape
    if e not in text:
        return text
    table = {
        "F": seps.field,
        "S": seps.component,
        "R": seps.repetition,
        "T": seps.subcomponent,
        "E": seps.escape,
        ".br": "\r",
        ".sp": "\r",
        ".ce": "\r",
    }
    out = []
    i = 0
    while i < len(text):
        c = text[i]
        if c != e:
            out.append(c)
            i += 1
            continue
        end = text.find(e, i + 1)
        if end < 0:  # a lone escape character: keep it as text
            out.append(text[i:])
            break
        code = text[i + 1 : end]
        if code in table:
            out.append(table[code])
        elif code[:1] == "X" and len(code) > 1:
            try:
                out.append(bytes.fromhex(code[1:]).decode("latin-1"))
            except ValueError:
                pass
        i = end + 1
    return "".join(out)


def _as_separators(separators: Separators | str) -> Separators:
    if isinstance(separators, Separators):
        return separators
    return Separators.from_msh("MSH" + separators + separators[0])


def segments(text: str) -> list[list[str]]:
    """
    Every segment split into raw fields (``[name, field1, field2, ...]``), honouring the
    message's separators.  For MSH, index ``n`` is MSH-n as for other segments.
    """
    seps = Separators.from_msh(text)
    out = []
    for raw in text.split("\r"):
        if not raw:
            continue
        if raw.startswith("MSH"):
            fields, _ = _msh(raw)
            out.append(fields)
        else:
            out.append(raw.split(seps.field))
    return out


def parse_ack(text: str) -> Ack:
    """
    Read an acknowledgement (a bare ``ACK`` or a message-specific response such as ``ORR^O02``:
    anything with an MSA segment).  L{HL7Error} if there is no MSA.
    """
    text = normalise(text)
    seps = Separators.from_msh(text)
    msa = err = None
    for seg in segments(text):
        if seg[0] == "MSA" and msa is None:
            msa = seg
        elif seg[0] == "ERR" and err is None:
            err = seg
    if msa is None:
        raise HL7Error("HL7 acknowledgement has no MSA segment")
    code = _components(_get(msa, 1), seps)[0].strip().upper()
    if not code:
        raise HL7Error("HL7 acknowledgement has no MSA-1 (acknowledgment code)")
    ack_text = unescape(_get(msa, 3), seps) or None
    if ack_text is None and err is not None:
        ack_text = _err_text(err, seps)
    return Ack(code=code, control_id=_get(msa, 2).strip(), text=ack_text)


def _err_text(err: list[str], seps: Separators) -> str | None:
    """ERR-8 (user message), else ERR-3.2 (error code text), else the v2.3 ERR-1.4.2."""
    candidates = [_get(err, 8), _get(_components(_get(err, 3), seps), 1)]
    erl = _components(_get(err, 1), seps)
    if len(erl) > 3:
        candidates.append(_get(erl[3].split(seps.subcomponent), 1))
    for c in candidates:
        value = unescape(c, seps).strip()
        if value:
            return value
    return None


def hl7_timestamp(now: datetime | None = None) -> str:
    """HL7 DTM with seconds and UTC offset (``20240115103001+0000``)."""
    now = now or datetime.now(timezone.utc)
    if now.tzinfo is None:
        now = now.replace(tzinfo=timezone.utc)
    return now.strftime("%Y%m%d%H%M%S%z")


def new_control_id() -> str:
    """A fresh 20-character message control id (python-hl7's timestamp + random scheme)."""
    return hl7.generate_message_control_id()


def _version_tuple(v: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in v.split("."))
    except ValueError:
        return ()


def build_ack(
    message_text: str,
    code: str = "AA",
    text: str | None = None,
    error: str | None = None,
    control_id: str | None = None,
    *,
    error_code: str = "207",
    now: datetime | None = None,
) -> str:
    """
    The acknowledgement of C{message_text} (protocols.md 1.5): sender and receiver swapped,
    ``ACK^<trigger>^ACK``, a new MSH-10, MSH-11/12/18 copied, MSA-1/2, MSA-3 for negatives
    (C{text} or a standard phrase), and an ERR segment when C{error} is given (ERR-3 with
    C{error_code} from table 0357 and ERR-8 for v2.5+, ERR-1 for older versions).  Uses the
    original's separators.  Returns text ending in ``\\r``.
    """
    code = code.upper()
    if code not in ACK_CODES:
        raise ValueError(f"Unknown acknowledgment code {code!r} (expected one of {ACK_CODES})")
    message_text = normalise(message_text)
    fields, seps = _msh(message_text)
    trigger = _components(_get(fields, 9), seps)
    trigger_event = trigger[1] if len(trigger) > 1 else ""
    msg_type = seps.component.join(["ACK", trigger_event, "ACK"]) if trigger_event else "ACK"
    msh = [
        "MSH",
        seps.field,
        seps.encoding_characters,
        _get(fields, 5),
        _get(fields, 6),
        _get(fields, 3),
        _get(fields, 4),
        hl7_timestamp(now),
        "",
        msg_type,
        control_id or new_control_id(),
        _get(fields, 11) or "P",
        _get(fields, 12),
        "",
        "",
        "",
        "",
        "",
        _get(fields, 18),
    ]
    while msh[-1] == "":
        msh.pop()
    msh_text = "MSH" + seps.field + seps.field.join([seps.encoding_characters] + msh[3:])
    msa_text = _default_msa_text(code, text, error)
    msa = ["MSA", code, _get(fields, 10)]
    if msa_text:
        msa.append(escape(msa_text, seps))
    out = [msh_text, seps.field.join(msa)]
    if error:
        out.append(_err_segment(error, error_code, seps, _get(fields, 12)))
    return "\r".join(out) + "\r"


def _default_msa_text(code: str, text: str | None, error: str | None) -> str | None:
    if text:
        return text
    if code in POSITIVE_ACK_CODES:
        return None
    return error or _DEFAULT_ACK_TEXT.get(code)


# HL7 table 0357 (message error condition codes) -> text for ERR-3.2 / ERR-1.4.2.
ERROR_CODES = {
    "0": "Message accepted",
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "200": "Unsupported message type",
    "201": "Unsupported event code",
    "202": "Unsupported processing id",
    "203": "Unsupported version id",
    "204": "Unknown key identifier",
    "205": "Duplicate key identifier",
    "206": "Application record locked",
    "207": "Application internal error",
}


def _err_segment(error: str, error_code: str, seps: Separators, msg_version: str) -> str:
    c, s, f = seps.component, seps.subcomponent, seps.field
    code_text = escape(ERROR_CODES.get(error_code, ""), seps)
    v = _version_tuple(_components(msg_version, seps)[0])
    if v and v < (2, 5):
        # v2.1-2.4: ERR-1 (ELD) = segment^sequence^field^code&text&table
        return f"ERR{f}{c}{c}{c}{error_code}{s}{code_text}{s}HL70357"
    # v2.5+: ERR-3 HL7 error code, ERR-4 severity E, ERR-8 user message
    return f.join(
        ["ERR", "", "", c.join([error_code, code_text, "HL70357"]), "E", "", "", "",
         escape(error, seps)]
    )
