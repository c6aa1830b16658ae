"""
MLLP release 1 framing (``<VT> payload <FS><CR>``) as a pure codec: bytes in, payloads out.

No Twisted here, so the same decoder serves the client and the server protocol and is tested
on its own.  Every buffer is bounded: bytes outside a frame are skipped (and counted, never
kept), and a frame larger than C{max_size} is refused with L{FrameTooLarge} and discarded as
it streams past.  Input is read leniently (junk between frames, ``<FS>`` without ``<CR>``);
output is always the strict form.
"""

from __future__ import annotations

VT = b"\x0b"
FS = b"\x1c"
CR = b"\x0d"

_VT = VT[0]
_FS = FS[0]
_CR = CR[0]

DEFAULT_MAX_SIZE = 16 * 1024 * 1024

#: Codec name prefixes whose bytes can contain VT/FS: MLLP cannot carry them (the sender refuses
#: such messages, the channel answers in the message's fallback codec instead).
WIDE_CODECS = ("utf-16", "utf-32")


class FramingError(ValueError):
    """A payload that MLLP cannot carry, or a stream that breaks the framing rules."""


class FrameTooLarge(FramingError):
    """
    A frame grew past the decoder's limit.  C{payloads} holds the complete frames of the same
    chunk (before and after the oversize one), so a caller that wants them does not lose them.
    """

    def __init__(self, size: int, max_size: int, payloads: list[bytes] | None = None):
        super().__init__(f"MLLP frame larger than {max_size} bytes (at least {size} bytes)")
        self.size = size
        self.max_size = max_size
        self.payloads = payloads or []


def frame(payload: bytes) -> bytes:
    """
    Wrap one message in an MLLP block.  The payload must not contain VT or FS: the receiver
    would cut the message there (it happens with UTF-16/32, or with binary pasted into a field).
    """
    if _VT in payload or _FS in payload:
        raise FramingError(
            "MLLP payload must not contain VT (0x0B) or FS (0x1C); "
            "use a single-byte charset or UTF-8 and escape binary data"
        )
    return VT + payload + FS + CR


_IDLE = "idle"  # waiting for VT; nothing is buffered
_IN_FRAME = "in-frame"  # after VT, collecting payload until FS
_AFTER_FS = "after-fs"  # a frame just ended; swallow one CR if it comes
_DISCARD = "discard"  # inside an oversize frame; drop bytes until FS


class MLLPDecoder:
    """
    Incremental MLLP decoder.  C{feed} returns every payload completed by the new bytes.

    Counters, for logs and tests: C{skipped} (bytes seen outside any frame, including the
    remains of a frame cut short by a new VT), C{truncated} (frames abandoned because a new VT
    arrived before their FS), C{oversize} (frames refused for size).
    """

    def __init__(self, max_size: int = DEFAULT_MAX_SIZE) -> None:
        if max_size < 1:
            raise ValueError("max_size must be positive")
        self.max_size = max_size
        self.skipped = 0
        self.truncated = 0
        self.oversize = 0
        self._state = _IDLE
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes held for an unfinished frame (never more than C{max_size})."""
        return len(self._buf)

    @property
    def in_frame(self) -> bool:
        """True while a frame has started and not ended (a half-received message)."""
        return self._state in (_IN_FRAME, _DISCARD)

    def reset(self) -> None:
        """Forget any partial frame (e.g. when the connection is reused after an error)."""
        self._state = _IDLE
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """
        Consume C{data}; return the payloads it completed, in order.  Raises L{FrameTooLarge}
        after the whole chunk has been consumed if a frame went over the limit; the decoder
        stays usable and resynchronises on the next VT.
        """
        out: list[bytes] = []
        too_large: FrameTooLarge | None = None
        pos = 0
        n = len(data)
        buf = self._buf
        while pos < n:
            state = self._state
            if state == _AFTER_FS:
                if data[pos] == _CR:
                    pos += 1
                self._state = _IDLE
            elif state == _IDLE:
                start = data.find(VT, pos)
                if start < 0:
                    self.skipped += n - pos
                    break
                self.skipped += start - pos
                pos = start + 1
                self._state = _IN_FRAME
            elif state == _DISCARD:
                end = data.find(FS, pos)
                if end < 0:
                    break
                pos = end + 1
                self._state = _AFTER_FS
            else:  # _IN_FRAME
                end = data.find(FS, pos)
                limit = end if end >= 0 else n
                restart = data.find(VT, pos, limit)
                if restart >= 0:
                    # A new block started before this one ended: the sender gave up on the
                    # first one.  Drop it and follow the new one.
                    self.skipped += 1 + len(buf) + (restart - pos)
                    self.truncated += 1
                    del buf[:]
                    pos = restart + 1
                    continue
                if len(buf) + (limit - pos) > self.max_size:
                    self.oversize += 1
                    size = len(buf) + (limit - pos)
                    too_large = too_large or FrameTooLarge(size, self.max_size)
                    del buf[:]
                    if end < 0:
                        self._state = _DISCARD
                        break
                    pos = end + 1
                    self._state = _AFTER_FS
                    continue
                if end < 0:
                    buf += data[pos:]
                    break
                if buf:
                    buf += data[pos:end]
                    out.append(bytes(buf))
                    del buf[:]
                else:
                    out.append(bytes(data[pos:end]))
                pos = end + 1
                self._state = _AFTER_FS
        if too_large is not None:
            too_large.payloads = out
            raise too_large
        return out
