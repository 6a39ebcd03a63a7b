"""List, shard and stream input files as bounded Arrow chunks.

Inputs are URLs handled by fsspec (local paths, globs, directories, s3://, gs://, hf://, http(s)://) or a
`datasets.IterableDataset`. `expand_inputs` turns them into a deterministic list of `InputFile`s: each argument's
matches sorted by path, arguments kept in the order given, duplicates dropped (first wins). A directory expands to
every .parquet / .jsonl / .ndjson file below it (optionally .gz / .zst / .zstd), skipping names that start with '.'
or '_' (temporary files, `_SUCCESS`). An IterableDataset counts as one input file per `ds.n_shards`.

Sharding rule (`shard_files`): input file i goes to shard i % num_shards. More shards than files is allowed (the
extra shards get no files and finish at once), so a fixed-size Slurm array works for any input.

Reading: parquet by `ParquetFile.iter_batches` (one row group in memory at a time); jsonl line by line. A jsonl file is
read twice: a first pass infers one Arrow schema for the whole file (per-chunk schemas unified permissively), the
second casts every chunk to it, so every output shard has one schema. A line that is not UTF-8, not JSON, or not a JSON
object becomes a `BadRow` (reason `invalid_utf8`, `invalid_json` or `not_a_json_object`) carried next to the good rows,
never dropped. Blank lines are not rows. A file that cannot be opened or decoded as a whole (corrupt parquet, a column
whose JSON types cannot be unified) raises `InputError` naming the file.

Storage options: a dict given by the caller (CLI `--storage-options` JSON) wins; for s3:// the endpoint falls back to
AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, and credentials to botocore's own chain (AWS_ACCESS_KEY_ID, ...). Options are
never logged nor recorded; `redact_url` strips userinfo and secret-looking query values from recorded URLs.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import queue
import threading
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from drift_stream.errors import ConfigError, InputError

logger = logging.getLogger(__name__)

_FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
_GLOB_CHARS = set("*?[")
_SECRET_QUERY_WORDS = ("signature", "token", "credential", "secret", "key", "password", "sig")
_SCHEMA_PASS_LINES = 4096  # lines per chunk in the jsonl schema pass


@dataclass(frozen=True)
class InputFile:
    """One input file (or dataset shard) at position `index` of `num_files` in the expanded input list."""

    url: str  # credentials-free URL, as recorded in config.json / the manifest
    index: int
    num_files: int
    format: str  # "parquet" | "jsonl" | "dataset"
    compression: str | None = None
    dataset: Any = field(default=None, repr=False, compare=False)  # datasets.IterableDataset when format == "dataset"


@dataclass(frozen=True)
class BadRow:
    """An input row that could not be decoded; it goes to rejects with `reason`."""

    row_index: int  # 0-based line number in the file
    reason: str
    raw: str  # the line as text (invalid UTF-8 replaced), cut to 10 kB


@dataclass
class Chunk:
    """A bounded piece of one input file: decodable rows in input order plus the undecodable ones."""

    file: InputFile
    table: pa.Table  # [n rows], cast to the file's schema
    row_index: np.ndarray  # [n] int64, position of each row in the file
    bad_rows: list[BadRow]


def resolve_storage_options(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """fsspec options for `url`: the caller's dict, plus the S3 endpoint from AWS_ENDPOINT_URL(_S3) when unset."""
    options = dict(storage_options or {})
    protocol = _protocol(url)
    if protocol in ("s3", "s3a"):
        client_kwargs = dict(options.get("client_kwargs") or {})
        if "endpoint_url" not in options and "endpoint_url" not in client_kwargs:
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            if endpoint:
                options["endpoint_url"] = endpoint
    return options


def filesystem(url: str, storage_options: Mapping[str, Any] | None = None):
    """(fsspec filesystem, path inside it) for `url`. Raises InputError if the protocol's package is missing."""
    import fsspec.core

    try:
        return fsspec.core.url_to_fs(url, **resolve_storage_options(url, storage_options))
    except ImportError as exc:
        raise InputError(f"cannot open {redact_url(url)}: {exc}. Install the filesystem package it names.") from exc
    except ValueError as exc:
        raise InputError(f"cannot open {redact_url(url)}: {exc}") from exc


def redact_url(url: str) -> str:
    """`url` without userinfo and with secret-looking query values replaced by REDACTED."""
    if "://" not in url:
        return url
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    redacted = [(k, "REDACTED" if any(w in k.lower() for w in _SECRET_QUERY_WORDS) else v) for k, v in query]
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, urllib.parse.urlencode(redacted), parts.fragment))


def expand_inputs(
    data: Sequence[str] | str | Any, storage_options: Mapping[str, Any] | None = None
) -> list[InputFile]:
    """Expand URLs / globs / directories (or one IterableDataset) into the ordered list of input files."""
    if is_iterable_dataset(data):
        n = int(data.n_shards)
        name = f"iterable_dataset:{n}_shards"
        return [InputFile(f"{name}/{i:05d}", i, n, "dataset", dataset=data) for i in range(n)]
    urls = [data] if isinstance(data, str) else list(data)
    if not urls:
        raise ConfigError("no input given: pass at least one --data URL")
    found: list[tuple[str, str]] = []  # (url, path)
    seen: set[str] = set()
    for url in urls:
        for full_url in _expand_one(str(url), storage_options):
            if full_url not in seen:
                seen.add(full_url)
                found.append(full_url)
    n = len(found)
    files = []
    for i, full_url in enumerate(found):
        fmt, compression = _detect_format(full_url)
        files.append(InputFile(redact_url(full_url), i, n, fmt, compression))
    return files


def shard_files(files: Sequence[InputFile], num_shards: int, shard_index: int) -> list[InputFile]:
    """Files of shard `shard_index` of `num_shards`: file i goes to shard i % num_shards (empty shards allowed)."""
    if num_shards < 1:
        raise ConfigError(f"num_shards must be >= 1, got {num_shards}")
    if not 0 <= shard_index < num_shards:
        raise ConfigError(f"shard_index must be in [0, {num_shards}), got {shard_index}")
    mine = [f for f in files if f.index % num_shards == shard_index]
    if not mine:
        logger.warning("shard %d of %d has no input files (%d files in all)", shard_index, num_shards, len(files))
    return mine


def input_schema(file: InputFile, storage_options: Mapping[str, Any] | None = None) -> pa.Schema:
    """The Arrow schema every chunk of `file` is cast to. For jsonl this reads the whole file once."""
    if file.format == "parquet":
        with _open(file, storage_options) as handle:
            return _parquet_file(file, handle).schema_arrow
    if file.format == "jsonl":
        return _jsonl_schema(file, storage_options)
    return _dataset_schema(file)


def iter_chunks(
    file: InputFile, schema: pa.Schema, batch_rows: int, storage_options: Mapping[str, Any] | None = None
) -> Iterator[Chunk]:
    """Stream `file` as chunks of at most `batch_rows` rows (good + bad), each cast to `schema`."""
    if batch_rows < 1:
        raise ConfigError(f"batch_rows must be >= 1, got {batch_rows}")
    if file.format == "parquet":
        yield from _parquet_chunks(file, schema, batch_rows, storage_options)
    elif file.format == "jsonl":
        yield from _jsonl_chunks(file, schema, batch_rows, storage_options)
    else:
        yield from _dataset_chunks(file, schema, batch_rows)


def prefetch(items: Iterable[Any], max_items: int) -> Iterator[Any]:
    """Iterate `items` on a background thread, at most `max_items` ahead (reading overlaps compute).

    Exceptions of the producer are re-raised in the consumer; closing the generator stops the thread.
    """
    if max_items < 1:
        yield from items
        return
    buffer: queue.Queue = queue.Queue(maxsize=max_items)
    stop = threading.Event()
    done = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
            put(("done", done))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put(("error", exc))

    thread = threading.Thread(target=produce, name="drift-stream-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = buffer.get()
            if kind == "done":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5.0)


# ----------------------------------------------------------------------------------------------------------- helpers


def _protocol(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else "file"


def is_iterable_dataset(obj: Any) -> bool:
    try:
        from datasets import IterableDataset
    except ImportError:  # pragma: no cover - datasets is a dependency
        return False
    return isinstance(obj, IterableDataset)


def _detect_format(url: str) -> tuple[str, str | None]:
    name = url.rsplit("/", 1)[-1].split("?", 1)[0].lower()
    stem, ext = os.path.splitext(name)
    compression = _COMPRESSIONS.get(ext)
    if compression:
        stem, ext = os.path.splitext(stem)
    fmt = _FORMATS.get(ext)
    if fmt is None or (fmt == "parquet" and compression):
        raise InputError(
            f"unsupported input file {redact_url(url)}: expected .parquet, .jsonl or .ndjson "
            "(jsonl may end in .gz / .zst)"
        )
    return fmt, compression


def _is_supported(path: str) -> bool:
    base = path.rstrip("/").rsplit("/", 1)[-1]
    if base.startswith((".", "_")):
        return False
    try:
        _detect_format(path)
    except InputError:
        return False
    return True


def _expand_one(url: str, storage_options: Mapping[str, Any] | None) -> list[str]:
    fs, path = filesystem(url, storage_options)
    protocol = _protocol(url)
    local = protocol == "file"
    to_url = (lambda p: p) if local else fs.unstrip_protocol
    if protocol in ("http", "https"):
        return [url]  # no listing over HTTP: a URL names one file
    try:
        if any(c in path for c in _GLOB_CHARS):
            matches = fs.glob(path, detail=True)  # one listing, no HEAD per match
            paths = sorted(p for p, info in matches.items() if info.get("type") != "directory" and _is_supported(p))
        elif fs.isdir(path):
            paths = sorted(p for p in fs.find(path) if _is_supported(p))
        elif fs.exists(path):
            paths = [path]
        else:
            raise InputError(f"input {redact_url(url)} does not exist")
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - any backend's I/O error (httpx, aiohttp, botocore) names the input
        raise InputError(f"cannot list input {redact_url(url)}: {type(exc).__name__}: {exc}") from exc
    if not paths:
        raise InputError(f"input {redact_url(url)} matched no .parquet / .jsonl files")
    if local:
        paths = [os.path.abspath(p) for p in paths]
    return [to_url(p) for p in paths]


def _open(file: InputFile, storage_options: Mapping[str, Any] | None, compression: str | None = None):
    fs, path = filesystem(file.url, storage_options)
    try:
        return fs.open(path, "rb", compression=compression)
    except Exception as exc:  # noqa: BLE001 - see _expand_one
        raise InputError(f"cannot open input file {file.url}: {exc}") from exc


@contextlib.contextmanager
def _open_text_stream(file: InputFile, storage_options) -> Iterator[Any]:
    """A binary, line-iterable stream of the decompressed file (fsspec's zstd reader cannot iterate lines)."""
    if file.compression != "zstd":
        with _open(file, storage_options, compression=file.compression) as handle:
            yield handle
        return
    import zstandard

    with _open(file, storage_options) as raw:
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        with io.BufferedReader(reader, buffer_size=1 << 20) as handle:
            yield handle


def _parquet_file(file: InputFile, handle) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(handle)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise InputError(f"input file {file.url} is not a readable parquet file ({exc}); replace or remove it") from exc


def _parquet_chunks(file, schema, batch_rows, storage_options) -> Iterator[Chunk]:
    start = 0
    with _open(file, storage_options) as handle:
        reader = _parquet_file(file, handle)
        try:
            for batch in reader.iter_batches(batch_size=batch_rows):
                table = _cast(pa.Table.from_batches([batch]), schema)
                n = table.num_rows
                yield Chunk(file, table, np.arange(start, start + n, dtype=np.int64), [])
                start += n
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - corrupt pages or a failed range request: stop, naming the file
            raise InputError(f"input file {file.url} is corrupt or unreadable after row {start} ({exc}); "
                             "replace or remove it") from exc


def _decode_line(line: bytes, row_index: int) -> dict | BadRow | None:
    """A JSON object, a BadRow, or None for a blank line."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return BadRow(row_index, "invalid_utf8", line.decode("utf-8", errors="replace")[:10_000])
    if not text.strip():
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return BadRow(row_index, "invalid_json", text.rstrip("\r\n")[:10_000])
    if not isinstance(value, dict):
        return BadRow(row_index, "not_a_json_object", text.rstrip("\r\n")[:10_000])
    return value


def _jsonl_lines(file: InputFile, storage_options) -> Iterator[tuple[int, dict | BadRow]]:
    """(row_index, object or BadRow) for every non-blank line; row_index is the 0-based line number."""
    try:
        with _open_text_stream(file, storage_options) as handle:
            for line_no, line in enumerate(handle):
                decoded = _decode_line(line, line_no)
                if decoded is not None:
                    yield line_no, decoded
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated gzip / zstd stream, network error: stop, naming the file
        raise InputError(f"input file {file.url} cannot be read to the end ({exc}); replace or remove it") from exc


def _jsonl_schema(file: InputFile, storage_options) -> pa.Schema:
    schemas: list[pa.Schema] = []
    rows: list[dict] = []

    def flush() -> None:
        if rows:
            # pa.array unifies the keys of all rows (Table.from_pylist would only look at the first row's keys)
            try:
                struct_type = pa.array(rows).type
            except (pa.ArrowException, ValueError) as exc:
                raise InputError(
                    f"input file {file.url}: a column holds JSON values of incompatible types in different rows "
                    f"({exc}); fix the file or convert it to parquet with one type per column"
                ) from exc
            schemas.append(pa.schema(list(struct_type)))
            rows.clear()
            if len(schemas) > 16:
                schemas[:] = [_unify(file, schemas)]

    for _, decoded in _jsonl_lines(file, storage_options):
        if isinstance(decoded, dict):
            rows.append(decoded)
            if len(rows) >= _SCHEMA_PASS_LINES:
                flush()
    flush()
    return _unify(file, schemas) if schemas else pa.schema([])


def _unify(file: InputFile, schemas: list[pa.Schema]) -> pa.Schema:
    try:
        return pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowTypeError, pa.ArrowInvalid) as exc:
        raise InputError(
            f"input file {file.url}: a column holds JSON values of incompatible types in different rows ({exc}); "
            "fix the file or convert it to parquet with one type per column"
        ) from exc


def _jsonl_chunks(file, schema, batch_rows, storage_options) -> Iterator[Chunk]:
    rows: list[dict] = []
    index: list[int] = []
    bad: list[BadRow] = []

    def emit() -> Chunk:
        try:
            table = pa.Table.from_pylist(rows, schema=schema)
        except (pa.ArrowException, ValueError) as exc:
            raise InputError(f"input file {file.url}: rows do not fit the inferred schema ({exc})") from exc
        chunk = Chunk(file, table, np.asarray(index, dtype=np.int64), list(bad))
        rows.clear()
        index.clear()
        bad.clear()
        return chunk

    for line_no, decoded in _jsonl_lines(file, storage_options):
        if isinstance(decoded, BadRow):
            bad.append(decoded)
        else:
            rows.append(decoded)
            index.append(line_no)
        if len(rows) + len(bad) >= batch_rows:
            yield emit()
    if rows or bad:
        yield emit()


def _dataset_schema(file: InputFile) -> pa.Schema:
    features = file.dataset.features
    if features is not None:
        return features.arrow_schema
    for table in _dataset_tables(file, batch_rows=64):
        return table.schema
    return pa.schema([])


def _dataset_tables(file: InputFile, batch_rows: int) -> Iterator[pa.Table]:
    shard = file.dataset.shard(num_shards=file.num_files, index=file.index)
    yield from shard.with_format("arrow").iter(batch_size=batch_rows)


def _dataset_chunks(file, schema, batch_rows) -> Iterator[Chunk]:
    start = 0
    for table in _dataset_tables(file, batch_rows):
        table = _cast(table, schema)
        n = table.num_rows
        yield Chunk(file, table, np.arange(start, start + n, dtype=np.int64), [])
        start += n


def _cast(table: pa.Table, schema: pa.Schema) -> pa.Table:
    if table.schema.equals(schema, check_metadata=False):
        return table.replace_schema_metadata(schema.metadata)
    return table.cast(schema)
