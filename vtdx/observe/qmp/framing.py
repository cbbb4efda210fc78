"""QMP framing: cutting the input byte stream into JSON messages, decoding and encoding them.

QMP input is a JSON *stream*, not lines: qemu.qmp sends objects without a newline,
qmp-shell with one, and one read may hold half a message or several. ``JsonSplitter`` lexes
just enough JSON (strings, escapes, brackets) to see where each top-level value ends, as
QEMU's qobject/json-streamer.c does, and applies the limits *before* anything is parsed, so
no input can make the decoder recurse or buffer without bound:

* a message is at most ``MAX_MESSAGE`` bytes;
* objects and arrays nest at most ``MAX_NESTING`` deep. QEMU allows 1024, but Python's
  json decoder recurses once per level and raises RecursionError near the interpreter's
  limit (1000 frames, fewer inside an event loop), so vtdx stops well before;
* top-level input must be an object or an array (the latter is refused when decoded);
  anything else is one error per stray token.

A message breaking a limit is reported once, then skipped to its end with the lexer still
tracking strings and brackets, so the message after it is read normally.
"""

from __future__ import annotations

import json
import re
from collections.abc import Generator, Iterator, Mapping

from vtdx.observe.qmp.errors import QmpError

#: Upper bound of one incoming message in bytes.
MAX_MESSAGE = 1 << 20
#: Deepest nesting of objects and arrays in one message (see the module docstring).
MAX_NESTING = 256

#: Error texts of the splitter (also what the client reads in ``desc``).
NOT_AN_OBJECT = "QMP input must be a JSON object"
TOO_DEEP = f"JSON nesting depth limit exceeded (at most {MAX_NESTING} levels)"

_NOT_WHITESPACE = re.compile(rb"[^ \t\r\n]")
_JUNK_END = re.compile(rb'[ \t\r\n"{[]')
_IN_STRING = re.compile(rb'["\\]')
_IN_VALUE = re.compile(rb'[][{}"]')
_QUOTE, _BACKSLASH = 0x22, 0x5C

#: One result of ``JsonSplitter.feed``: ``(message, None)`` or ``(None, error text)``.
Frame = tuple[bytes, None] | tuple[None, str]


class JsonSplitter:
    """Cut a byte stream into top-level JSON texts.

    ``feed`` yields ``(text, None)`` for each complete object or array and ``(None, error)``
    for input that can never become one (a bare scalar, a stray closing bracket) or that
    breaks a limit. State survives between calls, so a message may be fed in any pieces.
    """

    def __init__(self, limit: int = MAX_MESSAGE, max_nesting: int = MAX_NESTING) -> None:
        self.limit = limit
        self.max_nesting = max_nesting
        self._buf = bytearray()
        self._depth = 0  # inside a top-level value when > 0
        self._in_str = False
        self._esc = False
        self._skipping = False  # the current value broke a limit: lex it, keep nothing
        self._junk = False  # inside a bad top-level token (reported once)

    def feed(self, data: bytes) -> Iterator[Frame]:
        i, n = 0, len(data)
        while i < n:
            if self._depth == 0 and not self._in_str:
                i = yield from self._between(data, i)
                continue
            special: int | None = None
            if self._esc:  # the byte after a backslash is never special
                self._esc = False
                end = i + 1
            else:
                m = (_IN_STRING if self._in_str else _IN_VALUE).search(data, i)
                end = n if m is None else m.end()
                special = None if m is None else data[m.start()]
            frame = self._take(data, i, end)
            i = end
            if frame is not None:
                yield frame
            if special is None:
                continue
            if self._in_str:
                if special == _BACKSLASH:
                    self._esc = True
                else:
                    self._in_str = False
                    if self._depth == 0:  # a top-level string ended: still the same junk
                        self._junk = True
            elif special == _QUOTE:
                self._in_str = True
            else:
                frame = self._bracket(special)
                if frame is not None:
                    yield frame

    # -- lexer steps

    def _between(self, data: bytes, i: int) -> Generator[Frame, None, int]:
        """Between top-level values: skip whitespace, start a value, or report junk;
        returns where the lexing continues. Runs of whitespace or junk are skipped by
        regex, not byte by byte, so a flood of either costs little."""
        n = len(data)
        while i < n:
            m = _NOT_WHITESPACE.search(data, i)
            if m is None:
                self._junk = False
                return n
            if m.start() > i:
                self._junk = False  # whitespace ends a junk token
            i = m.start()
            b = data[i]
            if b in b"{[":
                self._junk = False
                self._depth = 1
                self._buf.append(b)
                return i + 1
            if not self._junk:
                self._junk = True
                yield None, NOT_AN_OBJECT
            if b == _QUOTE:  # a top-level string: skip it whole (it may hold spaces)
                self._in_str = True
                return i + 1
            m = _JUNK_END.search(data, i + 1)
            i = n if m is None else m.start()
        return i

    def _take(self, data: bytes, start: int, end: int) -> Frame | None:
        """Keep ``data[start:end]`` of the current value, unless it is being skipped."""
        if self._skipping or self._depth == 0:
            return None
        self._buf += data[start:end]
        if len(self._buf) > self.limit:
            self._skip()
            return None, f"JSON message exceeds {self.limit} bytes"
        return None

    def _bracket(self, b: int) -> Frame | None:
        """A bracket outside strings, inside a value (already kept by ``_take``)."""
        if b in b"{[":
            self._depth += 1
            if self._depth > self.max_nesting and not self._skipping:
                self._skip()
                return None, TOO_DEEP
            return None
        self._depth -= 1
        if self._depth > 0:
            return None
        if self._skipping:  # the end of a value that broke a limit
            self._skipping = False
            return None
        text = bytes(self._buf)
        self._buf.clear()
        return text, None

    def _skip(self) -> None:
        self._skipping = True
        self._buf.clear()


def decode(text: bytes) -> dict[str, object]:
    """One message from a complete JSON text; QmpError (GenericError) if it is not one."""
    try:
        s = text.decode("utf-8")  # QMP is UTF-8; json.loads(bytes) would guess UTF-16/32
    except UnicodeDecodeError as e:
        raise QmpError(f"JSON parse error, invalid UTF-8 at byte {e.start}") from None
    try:
        msg = json.loads(s)
    except RecursionError:  # the splitter bounds nesting; this is only a backstop
        raise QmpError(TOO_DEEP) from None
    except ValueError as e:
        raise QmpError(f"JSON parse error, {e}") from None
    if not isinstance(msg, dict):
        raise QmpError(NOT_AN_OBJECT)
    return msg


def encode(obj: Mapping[str, object]) -> bytes:
    """One outgoing message, CRLF-terminated like QEMU's monitor."""
    return json.dumps(obj, separators=(", ", ": ")).encode() + b"\r\n"
