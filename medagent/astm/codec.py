"""
ASTM E1381 (CLSI LIS1-A) frames and ASTM E1394 (CLSI LIS2-A2) records: bytes <-> values.

Pure code, no I/O and no Twisted, so the link protocol, the sender, the channel, the order
builder and the tests all share one reading of the standard:

* frames ``<STX> FN text <ETB|ETX> C1 C2 <CR> <LF>``: L{build_frame}, L{parse_frame},
  L{frame_texts} (split a message into frame texts, at most 240 bytes each), L{FrameDecoder}
  (a bounded byte-stream decoder for the receiving side);
* records (H, P, O, R, C, Q, M, S, L) with delimiters declared by each H record:
  L{Delimiters}, L{encode_record}/L{decode_record}, L{encode_message}/L{decode_message},
  L{MessageAssembler} (records -> complete H..L messages).

Decoded field values are C{str} (plain), C{list[str]} (components) or C{list[list[str]]}
(repeats, each a list of components); L{encode_record} takes the same shapes (and None, int).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Iterator, List, Sequence, Union

STX = b"\x02"
ETX = b"\x03"
EOT = b"\x04"
ENQ = b"\x05"
ACK = b"\x06"
LF = b"\n"
CR = b"\r"
NAK = b"\x15"
ETB = b"\x17"

#: Text bytes per frame (247 bytes on the wire with STX, FN, ETB/ETX, C1 C2, CR LF).
MAX_FRAME_TEXT = 240
#: Default bound for an incoming frame's text: some analyzers send long frames; accept, bounded.
DEFAULT_MAX_INPUT_FRAME_TEXT = 64_000
#: Characters that may not appear in message text (E1381 6.6); CR is the record terminator.
RESTRICTED = frozenset(b"\x01\x02\x03\x04\x05\x06\x10\x15\x16\x17\x0a\x11\x12\x13\x14")
CONTROL_NAMES = {0x02: "STX", 0x03: "ETX", 0x04: "EOT", 0x05: "ENQ", 0x06: "ACK", 0x15: "NAK",
                 0x17: "ETB", 0x0D: "CR", 0x0A: "LF"}

FieldValue = Union[str, List[str], List[List[str]]]
Record = List[FieldValue]


class ASTMError(ValueError):
    """Input that cannot be used as ASTM; the message says why (never quotes patient data)."""


class FrameError(ASTMError):
    """A defective frame: the receiver answers NAK."""


# --------------------------------------------------------------------------- E1381 frames


def checksum(body: bytes) -> bytes:
    """
    E1381 checksum of C{body} = frame number + text + ETB/ETX (everything between STX and
    C1): the byte sum modulo 256 as two uppercase hex digits, high nibble first.
    """
    return b"%02X" % (sum(body) & 0xFF)


def next_frame_number(number: int) -> int:
    """Frame numbers run 1..7, 0, 1... within one transfer phase."""
    return (number + 1) % 8


def build_frame(number: int, text: bytes, final: bool = True) -> bytes:
    """One frame on the wire: C{final} ends it with ETX, otherwise ETB (more frames follow)."""
    if not 0 <= number <= 7:
        raise ASTMError(f"frame number must be 0..7, got {number}")
    body = b"%d" % number + bytes(text) + (ETX if final else ETB)
    return STX + body + checksum(body) + CR + LF


@dataclass(frozen=True)
class Frame:
    """
    A checked frame: its number, its text (between FN and ETB/ETX) and whether it is the end
    frame.
    """

    number: int
    text: bytes
    final: bool


def parse_frame(raw: bytes) -> Frame:
    """
    Check and split one whole frame (STX through the checksum, CR LF optional).  Bytes
    before the last STX are ignored, as E1381 6.5.1 says; lowercase checksum digits are
    accepted.  Raises L{FrameError} with the reason.
    """
    start = raw.rfind(STX)
    if start < 0:
        raise FrameError("frame does not start with STX")
    raw = raw[start:]
    if raw.endswith(CR + LF):
        raw = raw[:-2]
    elif raw.endswith(CR) or raw.endswith(LF):
        raw = raw[:-1]
    if len(raw) < 5:
        raise FrameError("frame too short")
    end = raw[-3:-2]
    if end not in (ETX, ETB):
        raise FrameError("no ETX/ETB before the checksum")
    return _check(raw[1:-2], raw[-2:])


def _check(body: bytes, received: bytes) -> Frame:
    """C{body} = FN + text + ETB/ETX, C{received} = the two checksum characters."""
    fn = body[:1]
    if not (b"0" <= fn <= b"7") or len(fn) != 1:
        raise FrameError(f"invalid frame number {fn!r}")
    computed = checksum(body)
    if received.upper() != computed:
        raise FrameError(
            f"checksum mismatch: frame says {received.decode('latin-1')!r}, computed "
            f"{computed.decode()}"
        )
    return Frame(int(fn), bytes(body[1:-1]), body[-1:] == ETX)


def frame_texts(
    text: bytes, *, packed: bool = False, max_text: int = MAX_FRAME_TEXT
) -> list[tuple[bytes, bool]]:
    """
    Cut encoded message C{text} (records each ending in CR) into frame texts, each with its
    C{final} flag (ETX).  Default: one record per frame, a record longer than C{max_text}
    continues in ETB frames (Roche and LIS01-A2 practice).  C{packed}: the whole message as one
    stream, cut every C{max_text} bytes regardless of record boundaries.
    """
    if max_text < 1:
        raise ASTMError("max_text must be positive")
    if not text:
        raise ASTMError("empty message")
    if packed:
        units = [text]
    else:
        units = [r + CR for r in text.split(CR)[:-1]]
        if not text.endswith(CR):
            units.append(text[text.rfind(CR) + 1:] + CR)
    out: list[tuple[bytes, bool]] = []
    for unit in units:
        n = len(unit)
        for i in range(0, n, max_text):
            out.append((unit[i:i + max_text], i + max_text >= n))
    return out


def check_text(text: bytes) -> None:
    """Refuse message text holding characters E1381 6.6 restricts (they would break framing)."""
    bad = RESTRICTED.intersection(text)
    if bad:
        names = ", ".join(CONTROL_NAMES.get(b, f"0x{b:02X}") for b in sorted(bad))
        raise ASTMError(f"message text contains restricted control characters ({names})")


# Decoder events.
EVENT_CONTROL = "control"   # value: one byte, ENQ/ACK/NAK/EOT
EVENT_FRAME = "frame"       # value: Frame
EVENT_BAD_FRAME = "bad"     # value: reason (str); the receiver answers NAK

_IN_TEXT_SPECIAL = re.compile(b"[\x02\x03\x04\x05\x17]")


class FrameDecoder:
    """
    Incremental, bounded decoder of the receiving side of an E1381 byte stream.  A frame split
    across any number of chunks, at any offset, decodes the same.  Outside a frame, ENQ, ACK,
    NAK and EOT are reported as control events and other bytes are ignored (counted); inside a
    frame STX restarts the frame, EOT/ENQ abandon it (the sender gave up) and text longer than
    C{max_text} is reported as a bad frame.  The CR LF after the checksum is optional.
    """

    _IDLE, _TEXT, _C1, _C2, _TRAILER = range(5)

    def __init__(self, max_text: int = DEFAULT_MAX_INPUT_FRAME_TEXT) -> None:
        self.max_text = max_text
        self.ignored = 0
        self._buf = bytearray()
        self._pos = 0
        self._state = self._IDLE
        self._body = bytearray()  # FN + text + ETB/ETX of the current frame
        self._c1 = b""

    @property
    def in_frame(self) -> bool:
        return self._state in (self._TEXT, self._C1, self._C2)

    def feed(self, data: bytes) -> None:
        """Append received bytes; take events with L{next_event}."""
        if self._pos:
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += data

    def rest(self) -> bytes:
        """Hand back the bytes not decoded yet (the link leaves receiving mode) and reset."""
        out = bytes(self._buf[self._pos:])
        self.reset()
        return out

    def reset(self) -> None:
        self._buf.clear()
        self._pos = 0
        self._state = self._IDLE
        self._body.clear()

    def events(self) -> Iterator[tuple[str, object]]:
        while True:
            event = self.next_event()
            if event is None:
                return
            yield event

    def next_event(self) -> tuple[str, object] | None:
        """The next complete event, or None when more bytes are needed."""
        buf = self._buf
        n = len(buf)
        while self._pos < n:
            state = self._state
            if state == self._IDLE or state == self._TRAILER:
                b = buf[self._pos]
                self._pos += 1
                if b == 0x02:
                    self._state = self._TEXT
                    self._body.clear()
                elif b in (0x05, 0x06, 0x15, 0x04):
                    self._state = self._IDLE
                    return (EVENT_CONTROL, bytes((b,)))
                elif state == self._TRAILER and b in (0x0D, 0x0A):
                    if b == 0x0A:
                        self._state = self._IDLE
                else:
                    self._state = self._IDLE
                    self.ignored += 1
            elif state == self._TEXT:
                m = _IN_TEXT_SPECIAL.search(buf, self._pos)
                stop = m.start() if m else n
                self._body += buf[self._pos:stop]
                self._pos = stop
                if len(self._body) > self.max_text + 1:
                    self._state = self._IDLE
                    self._body.clear()
                    return (EVENT_BAD_FRAME, f"frame longer than {self.max_text} text bytes")
                if m is None:
                    return None
                b = buf[stop]
                self._pos += 1
                if b == 0x02:  # a new STX: the frame restarts (bytes before it are ignored)
                    self.ignored += len(self._body) + 1
                    self._body.clear()
                elif b in (0x03, 0x17):
                    self._body.append(b)
                    self._state = self._C1
                else:  # EOT/ENQ inside a frame: the sender abandoned it
                    self.ignored += len(self._body) + 1
                    self._body.clear()
                    self._state = self._IDLE
                    return (EVENT_CONTROL, bytes((b,)))
            elif state == self._C1:
                self._c1 = bytes((buf[self._pos],))
                self._pos += 1
                self._state = self._C2
            else:  # _C2
                c2 = bytes((buf[self._pos],))
                self._pos += 1
                self._state = self._TRAILER
                body, self._body = bytes(self._body), bytearray()
                try:
                    return (EVENT_FRAME, _check(body, self._c1 + c2))
                except FrameError as e:
                    return (EVENT_BAD_FRAME, str(e))
        return None


# --------------------------------------------------------------------------- E1394 records


@dataclass(frozen=True)
class Delimiters:
    """Field, repeat, component and escape delimiters, as declared after ``H`` (``H|\\^&``)."""

    field: str = "|"
    repeat: str = "\\"
    component: str = "^"
    escape: str = "&"

    def __post_init__(self) -> None:
        chars = (self.field, self.repeat, self.component, self.escape)
        if any(len(c) != 1 for c in chars) or len(set(chars)) != 4:
            raise ASTMError("delimiters must be four different single characters")
        if any(c.isalnum() or c in " \r\n" or ord(c) < 0x20 for c in chars):
            raise ASTMError("delimiters must be printable, non-alphanumeric characters")

    @classmethod
    def from_header(cls, record: str) -> "Delimiters":
        """Read the delimiters an H record declares (the 4 characters after ``H``)."""
        if not record.startswith("H") or len(record) < 5:
            raise ASTMError("not a header record (H + 4 delimiter characters)")
        return cls(*record[1:5])

    @property
    def definition(self) -> str:
        """Field 2 of the H record: repeat, component, escape."""
        return self.repeat + self.component + self.escape


DEFAULT_DELIMITERS = Delimiters()


def escape(value: str, d: Delimiters = DEFAULT_DELIMITERS) -> str:
    """Escape the delimiters in C{value}: ``&F& &S& &R& &E&`` (with the declared escape char)."""
    e = d.escape
    if not any(c in value for c in (d.field, d.repeat, d.component, e)):
        return value
    out = []
    for c in value:
        if c == e:
            out.append(f"{e}E{e}")
        elif c == d.field:
            out.append(f"{e}F{e}")
        elif c == d.component:
            out.append(f"{e}S{e}")
        elif c == d.repeat:
            out.append(f"{e}R{e}")
        else:
            out.append(c)
    return "".join(out)


_MAX_ESCAPE_BODY = 32


def _escape_end(text: str, i: int, e: str) -> int:
    """
    If an escape sequence starts at C{text[i]} (an escape char) return the index just after
    it, else 0 (a literal escape char).  Sequences: ``eFe eSe eRe eEe``, ``eXhh..e``,
    ``eZ..e``, ``eH e`` style alphanumerics, and the vendor form with a delimiter between
    escape chars (``&|&``).  Bounded, so a stray escape char never swallows a record.
    """
    j = text.find(e, i + 1, i + 2 + _MAX_ESCAPE_BODY)
    if j <= i + 1:
        return 0
    body = text[i + 1:j]
    if len(body) == 1 or body.isalnum():
        return j + 1
    return 0


def unescape(value: str, d: Delimiters = DEFAULT_DELIMITERS) -> str:
    """Decode ``eFe eSe eRe eEe`` (and ``e|e`` forms); other sequences are kept verbatim."""
    e = d.escape
    if e not in value:
        return value
    names = {"F": d.field, "S": d.component, "R": d.repeat, "E": e}
    out: list[str] = []
    i = 0
    n = len(value)
    while i < n:
        c = value[i]
        if c == e:
            end = _escape_end(value, i, e)
            if end:
                body = value[i + 1:end - 1]
                if body in names:
                    out.append(names[body])
                elif len(body) == 1 and body in (d.field, d.repeat, d.component, e):
                    out.append(body)
                else:
                    out.append(value[i:end])
                i = end
                continue
        out.append(c)
        i += 1
    return "".join(out)


def _split(text: str, sep: str, e: str) -> list[str]:
    """Split on C{sep} outside escape sequences (which stay verbatim)."""
    if e not in text:
        return text.split(sep)
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c == e:
            end = _escape_end(text, i, e)
            if end:
                cur.append(text[i:end])
                i = end
                continue
        if c == sep:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


def _decode_field(raw: str, d: Delimiters) -> FieldValue:
    if d.repeat not in raw and d.component not in raw:
        return unescape(raw, d)
    reps = _split(raw, d.repeat, d.escape)
    decoded = [[unescape(c, d) for c in _split(r, d.component, d.escape)] for r in reps]
    if len(decoded) == 1:
        return decoded[0]
    return decoded


def decode_record(text: str, d: Delimiters | None = None) -> Record:
    """
    One record (no trailing CR) into fields; index 0 is the record type (ASTM field 1).  An H
    record is read with the delimiters it declares and keeps field 2 verbatim.
    """
    if not text:
        raise ASTMError("empty record")
    if text.startswith("H"):
        d = Delimiters.from_header(text)
        rest = text[5:]
        fields: Record = ["H", d.definition]
        if rest:
            if rest[0] != d.field:
                raise ASTMError("header delimiter definition not followed by a field delimiter")
            fields += [_decode_field(f, d) for f in _split(rest[1:], d.field, d.escape)]
        return fields
    d = d or DEFAULT_DELIMITERS
    return [_decode_field(f, d) for f in _split(text, d.field, d.escape)]


def _encode_value(value: object, d: Delimiters) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return escape(value, d)
    if isinstance(value, (list, tuple)):
        if any(isinstance(v, (list, tuple)) for v in value):
            return d.repeat.join(
                d.component.join(_encode_value(c, d) for c in rep)
                if isinstance(rep, (list, tuple)) else _encode_value(rep, d)
                for rep in value
            )
        return d.component.join(_encode_value(c, d) for c in value)
    if isinstance(value, bool):
        raise ASTMError("booleans have no ASTM form; pass the code letter")
    if isinstance(value, (int, float)):
        return str(value)
    raise ASTMError(f"cannot encode a {type(value).__name__} as an ASTM field")


def encode_record(fields: Sequence[object], d: Delimiters = DEFAULT_DELIMITERS) -> str:
    """
    Fields (index 0 = record type) into one record without its CR.  Trailing empty fields are
    dropped.  For an H record field 2 is always the definition of C{d}.
    """
    if not fields or not isinstance(fields[0], str) or len(fields[0]) != 1 \
            or not fields[0].isalpha():
        raise ASTMError("a record starts with its one-letter type")
    rtype = fields[0].upper()
    parts = [_encode_value(v, d) for v in fields[1:]]
    if rtype == "H":
        parts = parts[1:] if parts else []
        while parts and parts[-1] == "":
            parts.pop()
        return "H" + d.field + d.definition + "".join(d.field + p for p in parts)
    while parts and parts[-1] == "":
        parts.pop()
    return d.field.join([rtype] + parts)


def encode_message(records: Iterable[Sequence[object]], d: Delimiters = DEFAULT_DELIMITERS) -> str:
    """Records into message text, each record ending in CR."""
    out = [encode_record(r, d) + "\r" for r in records]
    if not out:
        raise ASTMError("empty message")
    return "".join(out)


def split_records(text: str) -> list[str]:
    """Message text into record strings: CR, CR LF or LF end a record; blank lines dropped."""
    return [r for r in re.split(r"\r\n|\r|\n", text) if r]


def decode_message(text: str) -> list[Record]:
    """Message text into decoded records, each read with the delimiters of the H before it."""
    d = DEFAULT_DELIMITERS
    out: list[Record] = []
    for line in split_records(text):
        if line.startswith("H"):
            d = Delimiters.from_header(line)
        out.append(decode_record(line, d))
    return out


def normalize_message(text: str) -> str:
    """Message text with every record ending in exactly one CR (``\\n`` accepted on input)."""
    records = split_records(text)
    if not records:
        raise ASTMError("empty message")
    return "".join(r + "\r" for r in records)


def get_field(record: Record, n: int) -> FieldValue:
    """ASTM field C{n} (1-based; field 1 is the record type), '' when absent."""
    return record[n - 1] if 0 < n <= len(record) else ""


@dataclass
class MessageAssembler:
    """
    Groups received records into messages (H ... L).  L{add} returns the complete messages
    (record lists) that a record finished; L{end_session} flushes or discards what is left.
    Bounded: more than C{max_records} pending records raises L{ASTMError}.
    """

    max_records: int = 10_000
    pending: list[str] = field(default_factory=list)

    def add_text(self, text: str) -> list[list[str]]:
        """Feed received text (one or more CR-terminated records)."""
        done: list[list[str]] = []
        for record in split_records(text):
            done.extend(self.add(record))
        return done

    def add(self, record: str) -> list[list[str]]:
        done: list[list[str]] = []
        if record.startswith("H") and self.pending:
            done.append(self.pending)  # a new header ends a message that had no terminator
            self.pending = []
        if len(self.pending) >= self.max_records:
            self.pending = []
            raise ASTMError(f"message longer than {self.max_records} records")
        self.pending.append(record)
        if record.startswith("L"):
            done.append(self.pending)
            self.pending = []
        return done

    def end_session(self, normal: bool) -> list[list[str]]:
        """On EOT (C{normal}) pending records form a message; on abort they are discarded."""
        pending, self.pending = self.pending, []
        return [pending] if (normal and pending) else []


def prepare_message(
    text: str,
    *,
    encoding: str = "latin-1",
    packed: bool = False,
    max_text: int = MAX_FRAME_TEXT,
) -> tuple[list[tuple[bytes, bool]], int]:
    """
    A message to push (records separated by CR, ``\\n`` accepted) into its frame texts and
    record count, checked before any byte goes out: restricted characters and text the
    device's encoding cannot carry are refused with L{ASTMError}.
    """
    if not isinstance(text, str):
        raise ASTMError("ASTM message body must be text")
    records = split_records(text)
    if not records:
        raise ASTMError("empty ASTM message")
    for r in records:
        if not r[:1].isalpha():
            raise ASTMError("every ASTM record starts with its record type letter")
    try:
        data = "".join(r + "\r" for r in records).encode(encoding)
    except LookupError:
        raise ASTMError(f"unknown encoding {encoding!r}")
    except UnicodeEncodeError as e:
        raise ASTMError(f"message has characters the {encoding} encoding cannot carry "
                        f"(position {e.start})")
    check_text(data)
    return frame_texts(data, packed=packed, max_text=max_text), len(records)
