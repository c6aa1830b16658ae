"""
Start/end-character framing (``<start> payload <end>``, one byte each) as a pure codec: bytes
in, payloads out.  The byte-stream peers Medplum's agent speaks to (``tcp://`` with
``startChar``/``endChar``) frame this way; MLLP is the same shape with fixed bytes.

No Twisted.  Every buffer is bounded: bytes outside a frame are skipped (and counted, never
kept), a new start byte inside a frame abandons the unfinished one, and a frame larger than
C{max_size} is refused with L{FrameTooLarge} and discarded as it streams past.
"""

from __future__ import annotations

DEFAULT_MAX_SIZE = 16 * 1024 * 1024


class FramingError(ValueError):
    """Framing settings that cannot work, or a payload the framing cannot carry."""


class FrameTooLarge(FramingError):
    """
    A frame grew past the decoder's limit.  C{payloads}: the complete frames of the same chunk,
    so a caller that wants them does not lose them.
    """

    def __init__(self, size: int, max_size: int, payloads: list[bytes] | None = None):
        super().__init__(f"Frame larger than {max_size} bytes (at least {size} bytes)")
        self.size = size
        self.max_size = max_size
        self.payloads = payloads or []


def delimiters(start_char: str | None, end_char: str | None) -> tuple[int, int]:
    """
    The start and end bytes from a destination's ``startChar``/``endChar`` (as Medplum reads
    them: the first character of each value, e.g. ``%02`` and ``%03``).  Both are required,
    single bytes (0-255), and different.
    """
    if not start_char or not end_char:
        raise FramingError("tcp:// destination needs startChar and endChar (e.g. "
                           "?startChar=%02&endChar=%03)")
    start, end = ord(start_char[0]), ord(end_char[0])
    if start > 0xFF or end > 0xFF:
        raise FramingError("startChar and endChar must be single bytes (0x00-0xFF)")
    if start == end:
        raise FramingError("startChar and endChar must differ")
    return start, end


def frame(payload: bytes, start: int, end: int) -> bytes:
    """
    Wrap one message.  The payload must contain neither delimiter: the receiver would cut or
    restart the message there.
    """
    if start in payload or end in payload:
        raise FramingError(f"Payload must not contain the start (0x{start:02X}) or end "
                           f"(0x{end:02X}) byte")
    return bytes([start]) + payload + bytes([end])


class FrameDecoder:
    """
    Incremental decoder.  C{feed} returns every payload completed by the new bytes.

    Counters, for logs and tests: C{skipped} (bytes outside any frame, including the remains
    of a frame cut short by a new start byte), C{truncated} (frames abandoned that way),
    C{oversize} (frames refused for size).
    """

    def __init__(self, start: int, end: int, max_size: int = DEFAULT_MAX_SIZE) -> None:
        if max_size < 1:
            raise ValueError("max_size must be positive")
        if start == end or not (0 <= start <= 0xFF and 0 <= end <= 0xFF):
            raise ValueError("start and end must be two different bytes")
        self.start, self.end, self.max_size = start, end, max_size
        self.skipped = 0
        self.truncated = 0
        self.oversize = 0
        self._in_frame = False
        self._discarding = False
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes held for an unfinished frame (never more than C{max_size})."""
        return len(self._buf)

    @property
    def in_frame(self) -> bool:
        """True while a frame has started and not ended."""
        return self._in_frame

    def feed(self, data: bytes) -> list[bytes]:
        """
        Consume C{data}; return the payloads it completed, in order.  Raises L{FrameTooLarge}
        after the whole chunk is consumed if a frame went over the limit; the decoder stays
        usable and resynchronises on the next start byte.
        """
        out: list[bytes] = []
        too_large: FrameTooLarge | None = None
        start, end = bytes([self.start]), bytes([self.end])
        pos, n, buf = 0, len(data), self._buf
        while pos < n:
            if not self._in_frame:
                begin = data.find(start, pos)
                if begin < 0:
                    self.skipped += n - pos
                    break
                self.skipped += begin - pos
                pos = begin + 1
                self._in_frame, self._discarding = True, False
                continue
            stop = data.find(end, pos)
            limit = stop if stop >= 0 else n
            restart = data.find(start, pos, limit)
            if restart >= 0:  # a new frame began before this one ended: follow the new one
                if not self._discarding:
                    self.skipped += 1 + len(buf) + (restart - pos)
                    self.truncated += 1
                del buf[:]
                self._discarding = False
                pos = restart + 1
                continue
            if not self._discarding and len(buf) + (limit - pos) > self.max_size:
                self.oversize += 1
                too_large = too_large or FrameTooLarge(len(buf) + (limit - pos), self.max_size)
                del buf[:]
                self._discarding = True
            if stop < 0:
                if not self._discarding:
                    buf += data[pos:]
                break
            if not self._discarding:
                out.append(bytes(buf) + bytes(data[pos:stop]))
            del buf[:]
            self._in_frame = self._discarding = False
            pos = stop + 1
        if too_large is not None:
            too_large.payloads = out
            raise too_large
        return out
