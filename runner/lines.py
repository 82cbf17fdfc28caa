"""Turn a child's byte stream into log lines: split, cut, decode, redact."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from urllib.parse import quote

from ahocorasick_rs import AhoCorasick

CUT_MARKER = " …[line cut: {dropped} more bytes]"
MASK = "[redacted]"
MIN_SECRET_LENGTH = 4


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


def secret_forms(secrets: Iterable[str]) -> frozenset[str]:
    """What is masked of each secret (short ones: nothing): itself, URL-encoded, and as a
    JSON string holds it (a sidecar that quotes its config, a child that dumps JSON)."""
    forms: set[str] = set()
    for secret in secrets:
        if len(secret) >= MIN_SECRET_LENGTH:
            forms.update({secret, quote(secret, safe=""), quote(secret)})
            forms.update({json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1]})
    return frozenset(forms)


class Redactor:
    """Masks every secret value (and its URL-encoded and JSON forms) in text.

    One Aho-Corasick automaton finds all of them in one pass, however many there are (an
    alternation regex tried every secret at every position: 0.2 ms a line with 300 secrets).
    Redactors join without rebuilding (`joined`): the runner's cached one of every secret
    Corral holds, plus a command's own. Where matches overlap, their union is masked.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._use(secret_forms(secrets))

    @classmethod
    def of_forms(cls, forms: frozenset[str]) -> Redactor:
        """A redactor of these exact forms (see `secret_forms`)."""
        redactor = cls()
        redactor._use(forms)
        return redactor

    def _use(self, forms: frozenset[str]) -> None:
        self.forms = forms
        self._matchers = [AhoCorasick(sorted(forms))] if forms else []
        self._joinable = not any("\x00" in form for form in forms)

    def joined(self, other: Redactor) -> Redactor:
        """A redactor that masks what either masks."""
        if not other._matchers or other.forms <= self.forms:
            return self
        if not self._matchers:
            return other
        both = Redactor()
        both.forms = self.forms | other.forms
        both._matchers = self._matchers + other._matchers
        both._joinable = self._joinable and other._joinable
        return both

    def _spans(self, text: str) -> list[tuple[int, int]]:
        if len(self._matchers) == 1:
            found = self._matchers[0].find_matches_as_indexes(text, overlapping=True)
        else:
            found = [
                m
                for matcher in self._matchers
                for m in matcher.find_matches_as_indexes(text, overlapping=True)
            ]
        return [(start, end) for _, start, end in found]

    def _mask(self, text: str) -> str:
        spans = self._spans(text)
        if not spans:
            return text
        spans.sort()
        pieces: list[str] = []
        kept = 0  # text before this offset is already written (or masked)
        open_start, open_end = spans[0]
        for start, end in spans[1:]:
            if start < open_end:  # overlapping: one mask over both
                open_end = max(open_end, end)
                continue
            pieces += (text[kept:open_start], MASK)
            kept, (open_start, open_end) = open_end, (start, end)
        pieces += (text[kept:open_start], MASK, text[open_end:])
        return "".join(pieces)

    def __call__(self, text: str) -> str:
        if not self._matchers:
            return text
        return self._mask(text)

    def all(self, texts: list[str]) -> list[str]:
        """Every text masked; the same list when there is nothing to mask.

        The texts are searched joined by NUL, in one pass: no form of a secret holds a NUL
        (the environment cannot carry one), so no match spans two texts; and log lines hold
        none (the splitter replaces it). Should a text or a secret hold one, each text is
        masked alone.
        """
        if not self._matchers:
            return texts
        if self._joinable:
            joined = "\x00".join(texts)
            masked = self._mask(joined)
            if masked is joined:
                return texts
            parts = masked.split("\x00")
            if len(parts) == len(texts):
                return parts
        return [self._mask(text) for text in texts]
