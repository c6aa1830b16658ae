"""
A write-ahead journal for small received DICOM instances: custody in one cheap flush.

Why: a C-STORE success must not be sent before the instance is durable.  Written as its own
file, a small instance costs a file fsync (an ext4 journal commit: the file is new and grows)
and a folder fsync (its name): two journal commits, ~2-4 ms here, for an instance that took
well under a millisecond to receive - a modality sending one instance at a time waits for
each.  Overwriting blocks that are already allocated and flushed is several times cheaper:
only the data goes to the disk.  So an instance (its Part 10 bytes and what is needed to
forward it) is first appended to a journal segment - a file made ahead, zero-filled and
fsynced, its name fsynced into the folder - and flushed with C{fdatasync}; instances that
arrive together share one write and one flush.  Then the success goes out, and the
instance becomes its own ``.dcm`` file (fsynced, folder fsynced, grouped) off the path; its
record is retired, and a segment whose records are all retired is removed.  After a crash,
L{InstanceJournal.recover} returns every record still in the segments: the channel writes
them out again (the same bytes: writing twice is harmless).

Record: ``MDJ1`` · payload length (u32) · CRC-32 of head and payload (u32) · head length
(u16) · head (JSON) · payload; little endian.  Segments are never reused, so after the last
record there are zeros, or a torn record whose CRC does not match: reading stops there.

Blocking file work only: callers run it in their thread pool.  Thread-safe.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import zlib
from typing import Any, Iterator

from medagent.dicom.instance import fsync_dir

MAGIC = b"MDJ1"
_HEADER = struct.Struct("<4sIIH")
PREFIX = ".journal-"
DEFAULT_SEGMENT_SIZE = 4 * 1024 * 1024
#: instances larger than this are written as their own file before the answer (their data
#: costs more than the two journal commits)
DEFAULT_MAX_RECORD = 512 * 1024


class JournalError(ValueError):
    """A record that cannot go into the journal (too large for a segment)."""


def encode_record(head: dict[str, Any], payload: bytes) -> bytes:
    head_bytes = json.dumps(head, separators=(",", ":")).encode("utf-8")
    if len(head_bytes) > 0xFFFF:
        raise JournalError("record head too large")
    crc = zlib.crc32(payload, zlib.crc32(head_bytes))
    return _HEADER.pack(MAGIC, len(payload), crc, len(head_bytes)) + head_bytes + payload


def read_records(data: bytes) -> Iterator[tuple[dict[str, Any], bytes]]:
    """The valid records at the start of a segment's C{data}, up to zeros or a torn one."""
    offset, end = 0, len(data)
    while offset + _HEADER.size <= end:
        magic, size, crc, head_size = _HEADER.unpack_from(data, offset)
        if magic != MAGIC:
            return
        start = offset + _HEADER.size
        stop = start + head_size + size
        if stop > end:
            return
        head_bytes = data[start:start + head_size]
        payload = data[start + head_size:stop]
        if zlib.crc32(payload, zlib.crc32(head_bytes)) != crc:
            return
        try:
            head = json.loads(head_bytes)
        except ValueError:
            return
        if not isinstance(head, dict):
            return
        yield head, payload
        offset = stop


class _Segment:
    def __init__(self, path: str, fd: int, size: int) -> None:
        self.path = path
        self.fd = fd
        self.size = size
        self.used = 0
        self.records = 0
        self.retired = 0
        self.current = True


class InstanceJournal:
    """
    The journal segments in C{folder} (names start with L{PREFIX}).  C{append} makes records
    durable and returns one reference per record for C{retire}.
    """

    def __init__(self, folder: str, *, segment_size: int = DEFAULT_SEGMENT_SIZE,
                 max_record: int = DEFAULT_MAX_RECORD) -> None:
        if max_record + 4096 > segment_size:
            raise ValueError("segment_size must exceed max_record")
        self.folder = folder
        self.segment_size = segment_size
        self.max_record = max_record
        self._lock = threading.Lock()
        self._current: _Segment | None = None
        self._spare: _Segment | None = None
        self._counter = 0
        self.flushes = 0

    def fits(self, payload_size: int) -> bool:
        return payload_size <= self.max_record

    def _make_segment(self) -> _Segment:
        with self._lock:
            self._counter += 1
            n = self._counter
        path = os.path.join(self.folder, f"{PREFIX}{os.getpid()}-{n}-{os.urandom(4).hex()}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            block = b"\x00" * (1024 * 1024)
            written = 0
            while written < self.segment_size:
                written += os.write(fd, block[: self.segment_size - written])
            os.fsync(fd)
            fsync_dir(self.folder)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        return _Segment(path, fd, self.segment_size)

    def prepare(self) -> None:
        """Make the next segment ahead (blocking), so that no answer waits for one."""
        with self._lock:
            needed = self._spare is None
        if not needed:
            return
        segment = self._make_segment()
        with self._lock:
            if self._spare is None:
                self._spare = segment
                return
        self._drop(segment)

    @property
    def needs_spare(self) -> bool:
        return self._spare is None

    def append(self, records: list[bytes]) -> list[_Segment]:
        """
        Write C{records} (from L{encode_record}) and flush them; one write and one
        C{fdatasync} per segment touched.  Returns each record's segment, for L{retire}.
        Only one caller at a time appends (the channel's group commit); C{retire} may run
        meanwhile.
        """
        refs: list[_Segment] = []
        pending: list[bytes] = []
        pending_size = 0
        for record in records:
            if len(record) > self.segment_size:
                raise JournalError("record larger than a journal segment")
            segment = self._current
            if segment is None or segment.used + pending_size + len(record) > segment.size:
                if segment is not None and pending:
                    self._write(segment, pending)
                    pending, pending_size = [], 0
                segment = self._rotate()
            pending.append(record)
            pending_size += len(record)
            refs.append(segment)
        if pending and self._current is not None:
            self._write(self._current, pending)
        return refs

    def _write(self, segment: _Segment, records: list[bytes]) -> None:
        data = b"".join(records)
        view, offset = memoryview(data), segment.used
        while view:
            n = os.pwrite(segment.fd, view, offset)
            view, offset = view[n:], offset + n
        os.fdatasync(segment.fd)
        self.flushes += 1
        with self._lock:
            segment.used += len(data)
            segment.records += len(records)

    def _rotate(self) -> _Segment:
        with self._lock:
            old, spare, self._spare = self._current, self._spare, None
        new = spare or self._make_segment()
        with self._lock:
            self._current = new
            if old is not None:
                old.current = False
                done = old.retired >= old.records
            else:
                done = False
        if old is not None and done:
            self._drop(old)
        return new

    def retire(self, refs: list[_Segment]) -> None:
        """These records are in their own durable files now (or were never acknowledged)."""
        finished: list[_Segment] = []
        with self._lock:
            for segment in refs:
                segment.retired += 1
                if not segment.current and segment.retired == segment.records:
                    finished.append(segment)
        for segment in finished:
            self._drop(segment)

    def _drop(self, segment: _Segment) -> None:
        try:
            os.close(segment.fd)
        except OSError:
            pass
        try:
            os.unlink(segment.path)
        except OSError:
            pass

    def close(self) -> None:
        """On stop: segments whose records are all retired go; the others stay for recovery."""
        with self._lock:
            current, spare = self._current, self._spare
            self._current = self._spare = None
        if spare is not None:
            self._drop(spare)
        if current is not None:
            if current.retired >= current.records:
                self._drop(current)
            else:
                os.close(current.fd)

    def recover(self) -> list[tuple[str, list[tuple[dict[str, Any], bytes]]]]:
        """
        Every segment a previous run left, with its records (blocking).  The caller writes
        them out, then calls L{forget} with the paths.  Call before the first C{append}.
        """
        found = []
        for name in sorted(os.listdir(self.folder)):
            if not name.startswith(PREFIX):
                continue
            path = os.path.join(self.folder, name)
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError:
                continue
            found.append((path, list(read_records(data))))
        return found

    def forget(self, paths: list[str]) -> None:
        """Remove recovered segments once their records are in their own files (blocking)."""
        for path in paths:
            try:
                os.unlink(path)
            except OSError:
                pass
        if paths:
            fsync_dir(self.folder)
