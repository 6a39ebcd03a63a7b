"""zstd input read frame by frame, so that a file cut short inside a frame is an error rather than a silent EOF.

gzip, bz2 and xz go through Python's own readers (fsspec's `compression=`), which already raise EOFError on a stream
cut short; python-zstandard's stream_reader reports a clean EOF there instead, hence this reader.
"""

from __future__ import annotations

import io
from typing import Any

from drift_stream.errors import InputError

ZSTD_MAX_WINDOW = 1 << 31  # bytes: `zstd --long=31`, the largest window the format allows on 64-bit


class ZstdFrames(io.RawIOBase):
    """The decompressed bytes of every zstd frame in `raw`, one after another; an InputError when the input ends
    inside a frame (a broken download), which python-zstandard's stream_reader reports as a clean EOF.

    Windows up to 2 GiB are accepted: `zstd --long=31` (Pushshift-style dumps) writes 2 GiB windows, above the
    library's default limit of 128 MiB (window_log 27). The decoder allocates the window a frame asks for.
    """

    def __init__(self, raw: Any, url: str) -> None:
        import zstandard

        self._raw, self._url = raw, url
        self._dctx = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
        self._frame = None  # the decompressobj of the frame being read (None between frames)
        self._pending = b""  # decompressed bytes not yet handed out
        self._compressed_in = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            data = self._raw.read(1 << 20)
            if not data:
                if self._frame is not None:
                    raise InputError(
                        f"input file {self._url} is cut short: its zstd stream ends inside a frame after "
                        f"{self._compressed_in} compressed bytes (an interrupted download?); download it again")
                return 0
            self._compressed_in += len(data)
            self._pending = self._decompress(data)
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def _decompress(self, data: bytes) -> bytes:
        import zstandard

        out = []
        while data:
            if self._frame is None:
                self._frame = self._dctx.decompressobj()
            try:
                out.append(self._frame.decompress(data))
            except zstandard.ZstdError as exc:
                raise InputError(f"input file {self._url} is not readable zstd data after {self._compressed_in} "
                                 f"compressed bytes ({exc}); replace or remove it") from exc
            if not self._frame.eof:
                break
            data, self._frame = self._frame.unused_data, None  # the next frame starts in the rest
        return b"".join(out)
