"""Read JSON text files as people write them: JSON Lines, one JSON array, or concatenated JSON objects.

`iter_json_records(handle, url)` yields `(row_index, dict | BadRow)` for every record of a binary stream. What the
file holds is decided from its first bytes, never from its name (`.json` files are often JSON Lines, as
`datasets.Dataset.to_json` writes them; `.jsonl` files are sometimes one array):

* **JSON Lines** (first value fits on its first line): one record per line; row_index is the 0-based line number.
  Blank lines are not rows. A line that is not JSON / not an object becomes a BadRow (`invalid_json`,
  `not_a_json_object`) and costs only that line. Line ends: LF, CRLF and lone CR (old Mac) all end a line; JSON
  strings cannot hold a raw CR, so splitting on it never cuts a record.
* **JSON array** (first non-blank character `[`), pretty-printed or on one line: each element is a record, row_index
  is its position in the array; an element that is not an object is a BadRow (`not_a_json_object`). An element with
  a syntax error (a missing comma, a trailing comma, single quotes, a string broken by a raw line end, ...) is a
  BadRow (`invalid_json`) and costs only that element: its extent is found by matching brackets and strings
  (`_value_end`), and reading resumes after it. A missing closing bracket makes the element run on to the next
  bracket that balances it, so the elements it swallows go to rejects inside its raw text. A file cut short (the
  array never closed) stops with an InputError naming the character offset, after the records before it.
* **Concatenated objects** (a pretty-printed object first, as some exporters write `{...}\\n{...}`): each object is
  a record, row_index its position; a broken object costs only itself, as in an array.
* Anything else (CSV, HTML, parquet or gzip bytes under a JSON name, ...) is refused with an InputError naming the
  file and what it looks like.

Encodings: UTF-8 with or without BOM; UTF-16 / UTF-32 (by BOM, or UTF-16 without BOM by its zero bytes). In UTF-8
files a line that is not valid UTF-8 is decoded as Windows-1252 (Latin-1 for the 5 bytes cp1252 leaves undefined)
when that yields a JSON object, so a legacy export keeps its rows; the count is logged as a warning. A line that
decodes in no way becomes a BadRow `invalid_utf8`.
"""

from __future__ import annotations

import codecs
import io
import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Iterator

from drift_stream.errors import InputError

logger = logging.getLogger(__name__)

HEAD_BYTES = 1 << 16  # bytes read to decide the layout and encoding
RAW_LIMIT = 10_000  # characters of a bad record kept in rejects
_READ_CHARS = 1 << 20
_BOMS = (  # longest first: the UTF-32-LE BOM starts with the UTF-16-LE one
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
_MAGIC = (
    (b"PAR1", "a parquet file: name it .parquet"),
    (b"\x1f\x8b", "gzip-compressed data: name it .jsonl.gz"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed data: name it .jsonl.zst"),
    (b"PK\x03\x04", "a zip archive: unzip it first"),
    (b"ARROW1", "an Arrow IPC file: convert it to parquet"),
    (b"BZh", "bzip2-compressed data: name it .jsonl.bz2"),
    (b"\xfd7zXZ\x00", "xz-compressed data: name it .jsonl.xz"),
)


@dataclass(frozen=True)
class BadRow:
    """An input row that could not be decoded; it goes to rejects with `reason`."""

    row_index: int  # 0-based line number (JSON Lines) or element position (array / concatenated objects)
    reason: str
    raw: str  # the record as text (invalid UTF-8 replaced), cut to 10 kB


class _Prepended(io.RawIOBase):
    """`head` followed by the rest of `stream`: lets the reader look at the first bytes without seeking."""

    def __init__(self, head: bytes, stream: Any) -> None:
        self._head, self._stream = memoryview(head), stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if len(self._head):
            n = min(len(buffer), len(self._head))
            buffer[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._stream.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def detect_encoding(head: bytes) -> tuple[str, int]:
    """(codec name, BOM length) of a text file from its first bytes; UTF-8 when nothing says otherwise."""
    for bom, name in _BOMS:
        if head.startswith(bom):
            return name, len(bom)
    if len(head) >= 4 and head[0] != 0 and head[1] == 0 and head[2] != 0 and head[3] == 0:
        return "utf-16-le", 0  # ASCII text in UTF-16-LE without a BOM: every second byte is zero
    if len(head) >= 4 and head[0] == 0 and head[1] != 0 and head[2] == 0 and head[3] != 0:
        return "utf-16-be", 0
    return "utf-8", 0


def describe_bytes(head: bytes) -> str:
    """A few words on what a file that is not JSON looks like (for the refusal message)."""
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    text = head[:4096].decode("utf-8", errors="replace").lstrip()
    first = text.splitlines()[0] if text else ""
    low = text[:200].lower()
    if low.startswith(("<!doctype html", "<html")):
        return "an HTML page (a download that returned a web page?)"
    if low.startswith("<"):
        return "XML or HTML"
    if "\ufffd" in text[:200] or any(c in text[:200] for c in "\x00\x01\x02\x03"):
        return "binary data"
    if first.count(",") >= 1 or first.count("\t") >= 1:
        return f"a CSV/TSV table (first line: {first[:80]!r}); convert it to JSON Lines or parquet"
    return f"text that is not JSON (first line: {first[:80]!r})"


def iter_json_records(handle: Any, url: str) -> Iterator[tuple[int, dict | BadRow]]:
    """(row_index, record or BadRow) for every record of the binary stream `handle`; see the module docstring."""
    head = handle.read(HEAD_BYTES)
    encoding, bom = detect_encoding(head)
    stream = io.BufferedReader(_Prepended(head[bom:], handle), buffer_size=1 << 20)
    if encoding == "utf-8":
        text_head = head[bom:].decode("utf-8", errors="replace")
    else:
        text_head = head[bom:].decode(encoding, errors="ignore")  # may end inside a character
    layout = _layout(text_head, url, head)
    if layout == "empty":
        return
    if layout == "lines" and encoding == "utf-8":
        yield from _utf8_lines(stream, url)
        return
    text = io.TextIOWrapper(stream, encoding=encoding, errors="strict", newline="")
    try:
        if layout == "lines":
            yield from _text_lines(text)
        else:
            yield from _values(text, url, in_array=layout == "array")
    except UnicodeDecodeError as exc:
        raise InputError(f"input file {url} is not valid {encoding} text ({exc}); re-save it as UTF-8") from exc


def _layout(text: str, url: str, head: bytes) -> str:
    """'lines' | 'array' | 'objects' | 'empty', or InputError for a file that is neither."""
    stripped = text.lstrip(" \t\r\n\ufeff")
    if not stripped:
        return "empty"
    lines = [line for line in stripped.replace("\r", "\n").split("\n")[:50] if line.strip()]
    if stripped[0] == "[":
        # one array (pretty or on one line), unless its first line is a whole JSON value followed by more JSON
        # lines: then it is JSON Lines whose first line is not an object
        if len(lines) > 1 and _is_json(lines[0]) and any(_is_json(line) for line in lines[1:-1] or lines[1:]):
            return "lines"
        return "array"
    if stripped[0] == "{":
        if _is_object(lines[0]):
            return "lines"
        try:
            value, end = json.JSONDecoder().raw_decode(stripped)
        except ValueError:
            value, end = None, 0
        if isinstance(value, dict) and "\n" in stripped[:end]:
            return "objects"  # a pretty-printed object, maybe more after it
        return "lines"  # JSON Lines whose first line is damaged: it costs that line
    # The first line is damaged: still JSON Lines if most of the first lines are objects (a bad line costs one row).
    complete = lines[:-1] if len(text) >= HEAD_BYTES - 4 else lines  # the last line in the head may be cut
    good = sum(_is_object(line) for line in complete)
    if complete and good * 2 > len(complete):
        return "lines"
    raise InputError(
        f"input file {url} is neither JSON Lines nor a JSON array: it looks like {describe_bytes(head)}"
    )


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
        return True
    except ValueError:
        return False


def _is_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _record(text: str, row_index: int) -> dict | BadRow | None:
    if not text.strip():
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return BadRow(row_index, "invalid_json", text[:RAW_LIMIT])
    if not isinstance(value, dict):
        return BadRow(row_index, "not_a_json_object", text[:RAW_LIMIT])
    return value


def _legacy_decode(line: bytes) -> str | None:
    """A non-UTF-8 line as Windows-1252 (Latin-1 for its undefined bytes) when that yields a JSON object."""
    text = line.decode("cp1252", errors="replace")
    if "\ufffd" in text:
        text = line.decode("latin-1")
    return text if _is_object(text.strip()) else None


def _utf8_lines(stream: io.BufferedReader, url: str) -> Iterator[tuple[int, dict | BadRow]]:
    line_no, legacy = 0, 0
    for raw in stream:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = _legacy_decode(raw.rstrip(b"\r\n"))
            if text is None:
                yield line_no, BadRow(line_no, "invalid_utf8", raw.decode("utf-8", errors="replace")[:RAW_LIMIT])
                line_no += 1
                continue
            legacy += 1
        for piece in text.rstrip("\r\n").split("\r"):
            record = _record(piece, line_no)
            if record is not None:
                yield line_no, record
            line_no += 1
    if legacy:
        logger.warning("%s: %d line(s) were not UTF-8 and were read as Windows-1252 / Latin-1", url, legacy)


def _text_lines(text: io.TextIOWrapper) -> Iterator[tuple[int, dict | BadRow]]:
    for line_no, line in enumerate(text):  # newline="": LF, CRLF and CR all end a line
        record = _record(line.rstrip("\r\n"), line_no)
        if record is not None:
            yield line_no, record


_STRUCTURE = re.compile(r'[\[\]{}",\n]')
_STRING_REST = re.compile(r'(?:[^"\\\n]|\\.)*"')  # the rest of a JSON string after its opening quote


def _value_end(buf: str, start: int, eof: bool) -> int | None:
    """End (exclusive) of the JSON value that starts at buf[start], found by matching brackets and strings without
    validating anything else; None when buf ends first and more text may follow (not eof).

    A value ends after the bracket that balances its first one; a scalar (or a value opened by no bracket) ends
    before the first ',' / ']' / line end outside brackets. A string broken by a raw line end (invalid JSON) ends at
    that line end, so one broken string cannot swallow the rest of the file. At eof, an unbalanced value ends with
    the text.
    """
    depth, i, bracketed = 0, start, buf[start] in "[{"
    while True:
        m = _STRUCTURE.search(buf, i)
        if m is None:
            return len(buf) if eof else None
        char, i = m.group(), m.end()
        if char == '"':
            rest = _STRING_REST.match(buf, i)
            if rest is not None:
                i = rest.end()
            else:  # a raw line end (or the end of the file) inside a string: it ends there
                line_end = buf.find("\n", i)
                if line_end < 0 and not eof:
                    return None
                i = len(buf) if line_end < 0 else line_end
        elif char in "[{":
            depth += 1
        elif char in "]}":
            if depth == 0:  # the enclosing array's ']' (or a stray bracket) ends a scalar
                return m.start()
            depth -= 1
            if depth == 0 and bracketed:
                return i
        elif depth == 0 and not bracketed:  # ',' or a line end after a scalar
            return m.start()


def _values(text: io.TextIOWrapper, url: str, in_array: bool) -> Iterator[tuple[int, dict | BadRow]]:
    """Stream the elements of a JSON array (or a run of concatenated values) without holding the file."""
    decoder = json.JSONDecoder()
    buf, pos, offset, eof, index = "", 0, 0, False, 0
    want = _READ_CHARS

    def fill() -> None:
        nonlocal buf, pos, offset, eof
        chunk = text.read(want)
        if not chunk:
            eof = True
        offset += pos
        buf, pos = buf[pos:] + chunk, 0

    def skip_space() -> str:
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n\ufeff":
                pos += 1
            if pos < len(buf) or eof:
                return buf[pos] if pos < len(buf) else ""
            fill()

    def fail(what: str) -> InputError:
        return InputError(f"input file {url}: {what} at character {offset + pos}; the records before it were "
                          "read. Fix the file (python -m json.tool FILE shows the error)")

    if in_array:
        skip_space()
        pos += 1  # the '['
    while True:
        char = skip_space()
        if in_array:
            if char == "]":
                pos += 1
                if skip_space():
                    raise fail("text after the end of the JSON array")
                return
            if index:
                if char != ",":
                    raise fail("expected ',' or ']' between array elements")
                pos += 1
                char = skip_space()
        if not char:
            if in_array:
                raise fail("the JSON array is not closed (file cut short?)")
            return
        while True:
            try:
                value, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as exc:
                end = _value_end(buf, pos, eof)
                if end is not None and (end < len(buf) or eof):
                    if end == len(buf) and in_array:  # the array never closes: the file was cut short
                        pos = exc.pos
                        raise fail(f"invalid JSON ({exc.msg})") from None
                    value = BadRow(index, "invalid_json", buf[pos:end][:RAW_LIMIT])  # costs this element only
                    break
                fill()
                want *= 2  # a record larger than the buffer: read more, doubling, so retries stay linear
                continue
            if end == len(buf) and not eof:  # a number may continue in the next read
                fill()
                continue
            break
        want = _READ_CHARS
        if isinstance(value, (dict, BadRow)):
            yield index, value
        else:
            yield index, BadRow(index, "not_a_json_object", json.dumps(value)[:RAW_LIMIT])
        pos = end
        index += 1
