"""An incremental parser for server-sent events (the `text/event-stream` format).

Follows the WHATWG HTML standard's "event stream interpretation": lines end with CRLF, LF
or a lone CR; a line starting with ':' is a comment (servers send `: keep-alive`); other
lines are `field: value` (one space after the colon is dropped) or a bare field name; an
empty line dispatches the event built so far; `data` lines accumulate, joined by LF; an
event without data is not dispatched; a UTF-8 byte order mark at the very start is
ignored; whatever is pending when the stream ends is discarded.

Bytes may arrive split anywhere (inside a UTF-8 character, between CR and LF, in the
middle of a field name): `feed` keeps what it cannot interpret yet, so every split of a
byte stream yields the same events (tests/test_providers.py checks that with hypothesis).
Pure: no I/O.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Event:
    """One dispatched event."""

    data: str
    event: str = "message"
    id: str = ""
    retry: int | None = None


class SSEParser:
    """Feed it bytes as they arrive; it returns the events each piece completes."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._line = ""  # the current line, not yet terminated
        self._after_cr = False  # the last character seen was CR: a following LF is part of it
        self._started = False  # past the optional byte order mark
        self._data: list[str] = []
        self._has_data = False
        self._event = ""
        self._last_id = ""
        self._retry: int | None = None
        self.comments = 0  # comment lines seen (keep-alives), for tests and debugging

    def feed(self, chunk: bytes) -> list[Event]:
        return self._text(self._decoder.decode(chunk))

    def close(self) -> list[Event]:
        """End of stream: decodes what is left; a pending, undispatched event is dropped."""
        events = self._text(self._decoder.decode(b"", final=True))
        self._line = ""
        self._data, self._has_data, self._event = [], False, ""
        return events

    def _text(self, text: str) -> list[Event]:
        if not text:
            return []
        if not self._started:
            self._started = True
            if text.startswith("\ufeff"):
                text = text[1:]
        events: list[Event] = []
        start = 0
        i = 0
        n = len(text)
        while i < n:
            c = text[i]
            if self._after_cr:
                # The previous piece ended with CR: an LF here belongs to it (CRLF).
                self._after_cr = False
                if c == "\n":
                    i += 1
                    start = i
                    continue
            if c == "\r" or c == "\n":
                line = self._line + text[start:i]
                self._line = ""
                self._process(line, events)
                if c == "\r":
                    if i + 1 < n:
                        if text[i + 1] == "\n":
                            i += 1
                    else:
                        self._after_cr = True
                i += 1
                start = i
                continue
            i += 1
        self._line += text[start:]
        return events

    def _process(self, line: str, events: list[Event]) -> None:
        if not line:
            self._dispatch(events)
            return
        if line.startswith(":"):
            self.comments += 1
            return
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
            self._has_data = True
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\x00" not in value:
                self._last_id = value
        elif name == "retry":
            if value.isascii() and value.isdigit():
                self._retry = int(value)
        # Any other field is ignored, as the standard says.

    def _dispatch(self, events: list[Event]) -> None:
        if self._has_data:
            events.append(
                Event(
                    data="\n".join(self._data),
                    event=self._event or "message",
                    id=self._last_id,
                    retry=self._retry,
                )
            )
        self._data, self._has_data, self._event = [], False, ""


def parse_all(pieces: Iterable[bytes]) -> list[Event]:
    """Every event of a whole stream given as pieces (a convenience for tests and tools)."""
    parser = SSEParser()
    events: list[Event] = []
    for piece in pieces:
        events.extend(parser.feed(piece))
    events.extend(parser.close())
    return events
