"""A child's byte stream as lines: split (LF or CRLF), long ones cut, decoded."""

from __future__ import annotations

from collections.abc import Iterator

CUT_MARKER = " …[line cut: {dropped} more bytes]"


class LineSplitter:
    """Feed bytes in, get whole lines out (LF or CRLF); lines over `max_bytes` are cut.

    A line is never held whole in memory past `max_bytes`: the rest is counted and dropped.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._buffer = bytearray()
        self._dropped = 0

    def feed(self, chunk: bytes) -> list[str]:
        """The lines completed by `chunk` (its unfinished end is kept for the next one)."""
        end = chunk.rfind(b"\n")
        if end == -1:
            self._keep(chunk)
            return []
        if self._dropped or len(self._buffer) + end > self.max_bytes:
            return list(self._feed_slowly(chunk))
        # No line here can be over the limit: decode the whole run at once, then split
        # (a LF byte never occurs inside a UTF-8 sequence, so this equals a per-line decode).
        data = chunk[:end]
        if self._buffer:
            data = bytes(self._buffer) + data
            self._buffer.clear()
        self._keep(chunk[end + 1 :])
        text = data.decode("utf-8", errors="replace")
        if "\x00" in text:  # PostgreSQL text cannot hold NUL
            text = text.replace("\x00", "\ufffd")
        lines = text.split("\n")
        if "\r" in text:
            lines = [line[:-1] if line.endswith("\r") else line for line in lines]
        return lines

    def _feed_slowly(self, chunk: bytes) -> Iterator[str]:
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if end == -1:
                self._keep(chunk[start:])
                return
            self._keep(chunk[start:end])
            yield self._take()
            start = end + 1

    def close(self) -> Iterator[str]:
        """The partial last line, if any."""
        if self._buffer or self._dropped:
            yield self._take()

    def _keep(self, piece: bytes) -> None:
        room = self.max_bytes - len(self._buffer)
        if len(piece) <= room:
            self._buffer += piece
        else:
            self._buffer += piece[: max(room, 0)]
            self._dropped += len(piece) - max(room, 0)

    def _take(self) -> str:
        raw = bytes(self._buffer)
        dropped = self._dropped
        self._buffer.clear()
        self._dropped = 0
        if raw.endswith(b"\r") and not dropped:
            raw = raw[:-1]
        text = raw.decode("utf-8", errors="replace")
        if "\x00" in text:  # PostgreSQL text cannot hold NUL
            text = text.replace("\x00", "\ufffd")
        if dropped:
            text += CUT_MARKER.format(dropped=dropped)
        return text
