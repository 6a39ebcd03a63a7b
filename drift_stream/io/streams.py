"""List, shard and stream input files as bounded Arrow chunks.

Inputs are URLs handled by fsspec (local paths, globs, directories, s3://, gs://, hf://, http(s)://) or a
`datasets.IterableDataset`. `expand_inputs` turns them into a deterministic list of `InputFile`s: each argument's
matches sorted by path, arguments kept in the order given, duplicates dropped (first wins). A path that exists is
read as that path even when its name holds glob characters (`pool[v2].jsonl`); only a name that does not exist is a
pattern. A directory expands to every .parquet / .jsonl / .ndjson / .json file below it (JSON text may end in .gz /
.zst / .zstd / .bz2 / .xz), skipping names that start with '.' or '_' (temporary files, `_SUCCESS`). An
IterableDataset counts as one input file per `ds.n_shards`.

Sharding rule (`shard_files`): input file i goes to shard i % num_shards. More shards than files is allowed (the
extra shards get no files and finish at once), so a fixed-size Slurm array works for any input.

Reading: parquet by `ParquetFile.iter_batches` (one row group in memory at a time); JSON text (JSON Lines, a JSON
array, concatenated objects; any common encoding and line end: io/jsontext.py) record by record. A file's plan (io/schema.py)
comes from what is cheap: its parquet footer, or the first rows of JSON text (io/json_rows.py: at most 10,000 rows /
8 MiB); `iter_planned` yields it and then the file's chunks, so planning reads nothing twice. `plan_inputs` unions
the plans of several files (missing columns null, one string / list flavour). A column whose JSON type varies between rows is carried as
JSON text when the adapter does not read it; in a column the adapter reads, a row of another type becomes a
`BadRow` (`wrong_type:COLUMN`). A line that is not JSON or not a JSON object becomes a `BadRow` (`invalid_json`,
`not_a_json_object`, `invalid_utf8`) carried next to the good rows, never dropped. A file that cannot be opened or
read as a whole (corrupt parquet, a file that is no JSON text, a compressed file cut short) raises `InputError`
naming the file.

Storage options: a dict given by the caller (CLI `--storage-options` JSON) wins; for s3:// the endpoint falls back to
AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, and credentials to botocore's own chain (AWS_ACCESS_KEY_ID, ...). Options are
never logged nor recorded; `redact_url` strips userinfo and secret-looking query values from recorded URLs.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import os
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from drift_stream.errors import ConfigError, InputError
from drift_stream.io.compressed import ZstdFrames
from drift_stream.io.identity import dataset_fingerprint, file_identity
from drift_stream.io.json_rows import json_batches, take_sample
from drift_stream.io.jsontext import RAW_LIMIT, BadRow, iter_json_records
from drift_stream.io.schema import SchemaPlan, TypeStats, conform_table, plan_schema, to_json_text

logger = logging.getLogger(__name__)

_FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}  # JSON text: sniffed
PLAN_METADATA_KEY = b"drift_stream.schema_plan"  # schema metadata: which columns are JSON text / strict
_COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd", ".bz2": "bz2", ".xz": "xz"}
_GLOB_CHARS = set("*?[")
_SECRET_QUERY_WORDS = ("signature", "token", "credential", "secret", "key", "password", "sig")
WHOLE_READ_BYTES = 8 << 20  # remote parquet files up to this size are fetched in one request


@dataclass(frozen=True)
class InputFile:
    """One input file (or dataset shard) at position `index` of `num_files` in the expanded input list."""

    url: str  # credentials-free URL, as recorded in config.json / the manifest
    index: int
    num_files: int
    format: str  # "parquet" | "jsonl" | "dataset"
    compression: str | None = None
    dataset: Any = field(default=None, repr=False, compare=False)  # datasets.IterableDataset when format == "dataset"
    identity: Mapping[str, Any] = field(default_factory=dict, compare=False)  # what resume compares (file_identity)


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
        identity = {"fingerprint": dataset_fingerprint(data)}
        return [InputFile(f"{name}/{i:05d}", i, n, "dataset", dataset=data, identity=identity) for i in range(n)]
    urls = [data] if isinstance(data, str) else list(data)
    if not urls:
        raise ConfigError("no input given: pass at least one --data URL")
    found: list[tuple[str, dict]] = []  # (url, identity)
    seen: set[str] = set()
    for url in urls:
        for full_url, identity in _expand_one(str(url), storage_options):
            if full_url not in seen:
                seen.add(full_url)
                found.append((full_url, identity))
    n = len(found)
    files = []
    for i, (full_url, identity) in enumerate(found):
        fmt, compression = _detect_format(full_url)
        files.append(InputFile(redact_url(full_url), i, n, fmt, compression, identity=identity))
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


def file_type_stats(file: InputFile, storage_options: Mapping[str, Any] | None = None) -> TypeStats:
    """Rows per (column, Arrow type) of one input file, from what is cheap: parquet, its footer; JSON text, its first
    SAMPLE_ROWS rows or SAMPLE_BYTES (json_rows.py)."""
    stats = TypeStats()
    if file.format == "parquet":
        with _open(file, storage_options) as handle:
            reader = _parquet_file(file, handle)
            stats.add_schema(reader.schema_arrow, max(reader.metadata.num_rows, 1))
    elif file.format == "jsonl":
        stats = _json_stats(file, storage_options)
    else:
        stats.add_schema(_dataset_schema(file), 1)
    return stats


def plan_inputs(
    files: Sequence[InputFile], storage_options: Mapping[str, Any] | None = None, strict_columns: Sequence[str] = ()
) -> SchemaPlan:
    """One plan for several files (io/schema.py), each counted from what is cheap (`file_type_stats`): their chunks
    conformed to it share one schema. `strict_columns`: the columns the adapter reads. (`drift-stream score` plans
    each file alone, `iter_planned`, and unites the plans once the run is complete: io/settle.py.)"""
    stats = TypeStats()
    for file in files:
        stats.merge(file_type_stats(file, storage_options))
    return _with_plan_metadata(plan_schema(stats, strict_columns))


def input_schema(file: InputFile, storage_options: Mapping[str, Any] | None = None) -> pa.Schema:
    """The schema of one file alone (`plan_inputs([file])`); its metadata names the JSON-text columns."""
    return plan_inputs([file], storage_options).schema


def iter_chunks(
    file: InputFile, schema: pa.Schema | SchemaPlan, batch_rows: int, storage_options: Mapping[str, Any] | None = None
) -> Iterator[Chunk]:
    """Stream `file` as chunks of at most `batch_rows` rows (good + bad), each conformed to `schema` (a plan, or a
    schema from `input_schema` / `plan_inputs(...).schema`, whose metadata carries the plan)."""
    if batch_rows < 1:
        raise ConfigError(f"batch_rows must be >= 1, got {batch_rows}")
    plan = as_plan(schema)
    if file.format == "parquet":
        yield from _parquet_chunks(file, plan, batch_rows, storage_options)
    elif file.format == "jsonl":
        yield from _json_chunks(file, plan, batch_rows, storage_options)
    else:
        yield from _dataset_chunks(file, plan, batch_rows)


def iter_planned(
    file: InputFile, batch_rows: int, storage_options: Mapping[str, Any] | None = None, strict_columns: Sequence[str] = ()
) -> Iterator[SchemaPlan | Chunk]:
    """The file's own plan, then its chunks conformed to it: the file is read once. The plan comes from what is
    cheap: a parquet footer, the first rows of JSON text (json_rows.py: SAMPLE_ROWS / SAMPLE_BYTES; a later row that
    does not fit is a BadRow with its reason), a dataset's features."""
    if batch_rows < 1:
        raise ConfigError(f"batch_rows must be >= 1, got {batch_rows}")
    if file.format == "parquet":
        yield from _parquet_chunks(file, None, batch_rows, storage_options, strict_columns)
    elif file.format == "jsonl":
        yield from _json_chunks(file, None, batch_rows, storage_options, strict_columns)
    else:
        stats = TypeStats()
        stats.add_schema(_dataset_schema(file), 1)
        plan = _with_plan_metadata(plan_schema(stats, strict_columns))
        yield plan
        yield from _dataset_chunks(file, plan, batch_rows)


def as_plan(schema: pa.Schema | SchemaPlan) -> SchemaPlan:
    """A SchemaPlan from a plan or from a schema carrying one in its metadata (else: no JSON-text columns)."""
    if isinstance(schema, SchemaPlan):
        return schema
    meta = json.loads((schema.metadata or {}).get(PLAN_METADATA_KEY, b"{}"))
    return SchemaPlan.from_dict(schema, meta)


def _with_plan_metadata(plan: SchemaPlan) -> SchemaPlan:
    if not plan.json_columns and not plan.strict_columns and not plan.string_columns:
        return plan
    lists = {k: v for k, v in plan.to_dict().items() if k != "schema"}
    return SchemaPlan.from_dict(plan.schema.with_metadata({PLAN_METADATA_KEY: json.dumps(lists)}), lists)


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
            f"unsupported input file {redact_url(url)}: expected .parquet, or JSON text as .jsonl, .ndjson or .json "
            "(JSON Lines or one JSON array; may end in .gz / .zst / .bz2 / .xz)"
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


def _expand_one(url: str, storage_options: Mapping[str, Any] | None) -> list[tuple[str, dict]]:
    """(url, file_identity) of every input file `url` names; the identities come from the listing itself (no
    request per file), or from one `info` for a single file."""
    fs, path = filesystem(url, storage_options)
    protocol = _protocol(url)
    local = protocol == "file"
    to_url = (lambda p: os.path.abspath(p)) if local else fs.unstrip_protocol
    if not local:
        fs.invalidate_cache()  # fsspec reuses filesystem instances: a listing of an earlier run would hide changes
    try:
        if protocol in ("http", "https"):  # no listing over HTTP: a URL names one file
            return [(url, file_identity(_info(fs, path) or {}, local=False))]
        # A path that exists is that path, even when its name holds glob characters ("pool[v2].jsonl"); only a
        # name that does not exist is read as a pattern.
        literal = _info(fs, path) if any(c in path for c in _GLOB_CHARS) else None
        if literal is None and any(c in path for c in _GLOB_CHARS):
            matches = fs.glob(_escape_literal_prefix(fs, path), detail=True)  # one listing, no HEAD per match
            infos = {p: info for p, info in matches.items() if info.get("type") != "directory" and _is_supported(p)}
        elif literal is not None and literal.get("type") != "directory":
            infos = {path: literal}
        elif literal is not None or fs.isdir(path):
            infos = {p: info for p, info in fs.find(path, detail=True).items() if _is_supported(p)}
        else:
            infos = {path: literal or _info(fs, path)}
            if infos[path] is None:
                raise InputError(f"input {redact_url(url)} does not exist")
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - any backend's I/O error (httpx, aiohttp, botocore) names the input
        raise InputError(f"cannot list input {redact_url(url)}: {type(exc).__name__}: {exc}") from exc
    if not infos:
        raise InputError(f"input {redact_url(url)} matched no .parquet / .jsonl files")
    return [(to_url(p), file_identity({**infos[p], "name": p}, local)) for p in sorted(infos)]


def _escape_literal_prefix(fs, pattern: str) -> str:
    """`pattern` with the glob characters of its deepest existing folder escaped ("runs [2024]/*.jsonl" -> "runs
    [[]2024]/*.jsonl"): a folder that exists is that folder; only the rest is a pattern."""
    parts = pattern.split("/")
    for k in range(len(parts) - 1, 0, -1):
        prefix = "/".join(parts[:k])
        if any(c in prefix for c in _GLOB_CHARS) and (_info(fs, prefix) or {}).get("type") == "directory":
            escaped = re.sub(r"([*?\[])", r"[\1]", prefix)
            return "/".join([escaped, *parts[k:]])
    return pattern


def _info(fs, path: str) -> dict | None:
    """fsspec's info of what is at `path` taken literally (no glob expansion), or None when nothing is."""
    try:
        return fs.info(path)
    except (FileNotFoundError, OSError, ValueError):
        return None


def _open(file: InputFile, storage_options: Mapping[str, Any] | None, compression: str | None = None):
    fs, path = filesystem(file.url, storage_options)
    try:
        return fs.open(path, "rb", compression=compression)
    except Exception as exc:  # noqa: BLE001 - see _expand_one
        raise InputError(f"cannot open input file {file.url}: {exc}") from exc


@contextlib.contextmanager
def _open_text_stream(file: InputFile, storage_options) -> Iterator[Any]:
    """A binary, line-iterable stream of the decompressed file. gzip, bz2 and xz (Python's readers) raise EOFError
    on a stream cut short; zstd goes through `io.compressed.ZstdFrames`, which does too (python-zstandard alone reports EOF)."""
    if file.compression != "zstd":
        with _open(file, storage_options, compression=file.compression) as handle:
            yield handle
        return
    with _open(file, storage_options) as raw:
        with io.BufferedReader(ZstdFrames(raw, file.url), buffer_size=1 << 20) as handle:
            yield handle


def _parquet_file(file: InputFile, handle) -> pq.ParquetFile:
    try:
        # no pre_buffer (pyarrow's default): it fetches every row group iter_batches will read in one go, so a large
        # file would be held whole while its chunks are scored
        return pq.ParquetFile(handle, pre_buffer=False)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise InputError(f"input file {file.url} is not a readable parquet file ({exc}); replace or remove it") from exc


def _parquet_reader(file: InputFile, storage_options, stack: contextlib.ExitStack) -> pq.ParquetFile:
    """The parquet file, opened once for its footer and its row groups. A remote file of at most WHOLE_READ_BYTES
    is fetched in one request: a footer read (pyarrow asks for the last 64 KiB) and the row groups read through
    fsspec's read-ahead would fetch a small file twice."""
    size = file.identity.get("size")
    if _protocol(file.url) != "file" and size is not None and size <= WHOLE_READ_BYTES:
        fs, path = filesystem(file.url, storage_options)
        try:
            return _parquet_file(file, pa.BufferReader(fs.cat_file(path)))
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - see _expand_one
            raise InputError(f"cannot open input file {file.url}: {exc}") from exc
    return _parquet_file(file, stack.enter_context(_open(file, storage_options)))


def _parquet_chunks(file, plan: SchemaPlan | None, batch_rows, storage_options, strict_columns=()) -> Iterator:
    """Chunks of `plan`; with plan None the file's own plan (from its footer) is yielded first."""
    start = 0
    with contextlib.ExitStack() as stack:
        reader = _parquet_reader(file, storage_options, stack)
        if plan is None:
            stats = TypeStats()
            stats.add_schema(reader.schema_arrow, max(reader.metadata.num_rows, 1))
            plan = _with_plan_metadata(plan_schema(stats, strict_columns))
            yield plan
        try:
            for batch in reader.iter_batches(batch_size=batch_rows):
                yield _conform_chunk(file, pa.Table.from_batches([batch]), start, plan)
                start += batch.num_rows
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - corrupt pages or a failed range request: stop, naming the file
            raise InputError(f"input file {file.url} is corrupt or unreadable after row {start} ({exc}); "
                             "replace or remove it") from exc


def _json_records(file: InputFile, storage_options, opened: dict | None = None) -> Iterator[tuple[int, dict | BadRow]]:
    """(row_index, object or BadRow) for every record of a JSON text file (jsontext.iter_json_records);
    `opened["handle"]` is the decompressed stream (its tell() measures the sample)."""
    try:
        with _open_text_stream(file, storage_options) as handle:
            if opened is not None:
                opened["handle"] = handle
            yield from iter_json_records(handle, file.url)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated gzip / zstd stream, network error: stop, naming the file
        raise InputError(f"input file {file.url} cannot be read to the end ({exc}); replace or remove it") from exc


def _position(opened: dict) -> int:
    try:
        return int(opened["handle"].tell())
    except (KeyError, OSError, ValueError, AttributeError):  # a stream without tell(): the row bound alone
        return 0


def _json_stats(file: InputFile, storage_options) -> TypeStats:
    opened: dict = {}
    records = _json_records(file, storage_options, opened)
    try:
        return take_sample(records, lambda: _position(opened))[1]
    finally:
        records.close()


def _json_chunks(file, plan: SchemaPlan | None, batch_rows, storage_options, strict_columns=()) -> Iterator:
    """Chunks of `plan`; with plan None the file's own plan (from its sample, read once) is yielded first."""
    opened: dict = {}
    source = _json_records(file, storage_options, opened)
    records: Iterator = source
    try:
        if plan is None:
            sample, stats = take_sample(source, lambda: _position(opened))
            plan = _with_plan_metadata(plan_schema(stats, strict_columns))
            yield plan
            records = itertools.chain(sample, source)
        for table, kept, bad in json_batches(records, plan, batch_rows):
            yield Chunk(file, table, np.asarray(kept, dtype=np.int64), bad)
    finally:
        source.close()


def _conform_chunk(file: InputFile, table: pa.Table, start: int, plan: SchemaPlan) -> Chunk:
    """A parquet / dataset batch as a Chunk of `plan`; a strict column that cannot be cast rejects its rows."""
    n = table.num_rows
    row_index = np.arange(start, start + n, dtype=np.int64)
    try:
        return Chunk(file, conform_table(table, plan.schema, plan.json_columns, plan.string_columns), row_index, [])
    except (pa.ArrowException, ValueError, TypeError) as exc:
        failing = [f.name for f in plan.schema if f.name in table.column_names and not _column_fits(table, f, plan)]
        if not failing or any(name not in plan.strict_columns for name in failing):
            raise InputError(f"input file {file.url}: column(s) {', '.join(failing) or '?'} cannot be read as the "
                             f"run's schema ({exc})") from exc
        rows = table.to_pylist()
        bad = [BadRow(int(i), f"wrong_type:{failing[0]}", to_json_text(r)[:RAW_LIMIT]) for i, r in zip(row_index, rows)]
        return Chunk(file, plan.schema.empty_table(), np.zeros(0, dtype=np.int64), bad)


def _column_fits(table: pa.Table, field: pa.Field, plan: SchemaPlan) -> bool:
    try:
        conform_table(table.select([field.name]), pa.schema([field]), plan.json_columns, plan.string_columns)
        return True
    except (pa.ArrowException, ValueError, TypeError):
        return False


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


def _dataset_chunks(file, plan: SchemaPlan, batch_rows) -> Iterator[Chunk]:
    start = 0
    for table in _dataset_tables(file, batch_rows):
        yield _conform_chunk(file, table, start, plan)
        start += table.num_rows
