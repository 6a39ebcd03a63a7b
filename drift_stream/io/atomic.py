"""Files that appear whole or not at all: `atomic_parquet_writer` (parquet) and `write_bytes_atomic` (small files), on
a local disk or an object store.

Local: each parquet is written to `.NAME.tmp-PID-RANDOM` beside its final name, fsynced, then `os.replace`d. Object
stores: each parquet is written straight to its final key as one upload (multipart for large files), which the store
makes visible only when the upload completes; on an error the upload is aborted (`discard`), and a killed process
leaves at most an unfinished multipart upload, never a partial object.
"""

from __future__ import annotations

import contextlib
import glob as globlib
import os
import uuid
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq


@contextlib.contextmanager
def atomic_parquet_writer(fs: Any, path: str, schema: pa.Schema) -> Iterator["_AtomicParquet"]:
    """A parquet writer (`.write(table)`) whose file appears at `path` only if the block exits without error.

    Same rules as the run directory's shards (module docstring): local temp file + fsync + rename; object stores one
    (multipart) upload that an error discards.
    """
    writer = _AtomicParquet(fs, path, schema)
    try:
        yield writer
    except BaseException:
        writer.abort()
        raise
    writer.close()


def _local_temp(path: str) -> str:
    """The temp name a local atomic writer of `path` uses: in the same directory, with pid + a random suffix, so a
    writer that is still dying (an old Ray actor, a resubmitted array task) never shares it; temps of killed writers
    of this file are removed first."""
    directory, name = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    for stale in globlib.glob(os.path.join(globlib.escape(directory), globlib.escape(f".{name}.tmp") + "*")):
        with contextlib.suppress(FileNotFoundError):
            os.remove(stale)
    return os.path.join(directory, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_binary_writer(fs: Any, path: str) -> Iterator[Any]:
    """A binary handle (e.g. for JSON Lines) whose file appears at `path` only if the block exits without error: the
    parquet writer's rule (local: temp file + fsync + rename; object stores: one upload, discarded on error)."""
    from fsspec.implementations.local import LocalFileSystem

    if not isinstance(fs, LocalFileSystem):
        handle = fs.open(path, "wb")
        try:
            yield handle
        except BaseException:
            handle.discard()
            handle.closed = True  # so that __del__ does not complete the upload
            raise
        handle.close()
        return
    temp = _local_temp(path)
    with open(temp, "wb") as handle:
        try:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        except BaseException:
            handle.close()
            os.remove(temp)
            raise
    os.replace(temp, path)


def write_bytes_atomic(fs: Any, path: str, data: bytes) -> None:
    """Write a small file so that readers see the old content or the new, never a part.

    Local: a temp name in the same directory, fsync, then rename. Object stores: one PUT, which is atomic.
    """
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        directory, name = os.path.split(path)
        os.makedirs(directory, exist_ok=True)
        temp = os.path.join(directory, f".{name}.tmp-{os.getpid()}")
        with open(temp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    else:
        fs.pipe_file(path, data)


class _AtomicParquet:
    """A parquet file that appears at its final name only when `close` succeeds (see module docstring)."""

    def __init__(self, fs: Any, path: str, schema: pa.Schema) -> None:
        from fsspec.implementations.local import LocalFileSystem

        self.final = path
        self.schema = schema
        if isinstance(fs, LocalFileSystem):
            self.temp = _local_temp(self.final)
            self.handle = open(self.temp, "wb")
        else:
            self.temp = None
            self.handle = fs.open(self.final, "wb")
        self.writer = pq.ParquetWriter(self.handle, schema)

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return  # no empty row groups: `datasets` reads a file whose first row group is empty as an error
        if not table.schema.equals(self.schema, check_metadata=False):
            table = table.cast(self.schema)
        self.writer.write_table(table)

    def close(self) -> None:
        self.writer.close()
        if self.temp is not None:
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.handle.close()
            os.replace(self.temp, self.final)
        else:
            self.handle.close()  # completes the (multipart) upload

    def abort(self) -> None:
        try:
            self.writer.close()
        except Exception:  # noqa: BLE001 - the file is being thrown away
            pass
        if self.temp is not None:
            self.handle.close()
            if os.path.exists(self.temp):
                os.remove(self.temp)
        else:
            self.handle.discard()
            self.handle.closed = True  # so that __del__ does not complete the upload
