"""The run directory of `drift-stream score`: atomic shards, completion markers, rejects, manifest, config check.

Layout (fixed names; N = number of input files, I = an input file's position in the expanded input list):

    OUT/data/train-IIIII-of-NNNNN.parquet      scored rows of input file I, in input order
    OUT/rejects/train-IIIII-of-NNNNN.parquet   rejected rows of input file I (only when any), drift_reject_reason
    OUT/completions/IIIII.json                 marker: input file I is done (counts, score summary)
    OUT/manifest.json                          recomputed from the markers (schemas/run_manifest.schema.json)
    OUT/config.json                            resolved config; a rerun with a different one is refused

Atomicity. Local: each parquet is written to `.NAME.tmp-PID-RANDOM` beside its final name, fsynced, then `os.replace`d. Object
stores: each parquet is written straight to its final key as one upload (multipart for large files), which the store
makes visible only when the upload completes; on an error the upload is aborted (`discard`), and a killed process
leaves at most an unfinished multipart upload, never a partial object. In both cases the completion marker is written
(one small atomic PUT / replace) only after the data and rejects shards are complete, so a marker is the only proof of
a finished input file: a rerun skips files with markers and overwrites anything else.
"""

from __future__ import annotations

import contextlib
import functools
import glob as globlib
import json
import logging
import math
import os
import uuid
import subprocess
import time
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from drift_stream import __version__
from drift_stream.errors import InputError, RunDirMismatchError
from drift_stream.io.streams import InputFile, filesystem, redact_url

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
ORDER_STATS_POINTS = 4096  # per-marker score sketch; exact quantiles while every input file has <= this many rows
QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)

# Columns added to rejected rows (besides the input columns, `id` and `drift_reject_reason`).
ROW_INDEX_COLUMN = "drift_row_index"  # position of the row (jsonl: line number) in its input file
RAW_LINE_COLUMN = "drift_raw_line"  # the undecodable line as text; null for rows the scorer rejected


def shard_name(index: int, num_files: int) -> str:
    """HF-style shard file name for input file `index` of `num_files`."""
    return f"train-{index:05d}-of-{num_files:05d}.parquet"


def rejects_schema(input_schema: pa.Schema) -> pa.Schema:
    """Schema of rejects/ shards: input columns, `id` (string if absent), reason, row index, raw line."""
    fields = {f.name: f for f in input_schema}
    fields.setdefault("id", pa.field("id", pa.string()))
    for name, type_ in (("drift_reject_reason", pa.string()), (ROW_INDEX_COLUMN, pa.int64()), (RAW_LINE_COLUMN, pa.string())):
        fields[name] = pa.field(name, type_)
    return pa.schema(list(fields.values()), metadata=input_schema.metadata)


def empty_data_schema(input_schema: pa.Schema) -> pa.Schema:
    """Schema of a data shard with no scored rows (the scorer never ran on a good row of that file)."""
    fields = {f.name: f for f in input_schema}
    fields.setdefault("id", pa.field("id", pa.string()))
    for name, type_ in (("drift_score", pa.float32()), ("drift_grad_norm", pa.float32()), ("drift_num_tokens", pa.int32())):
        fields[name] = pa.field(name, type_)
    return pa.schema(list(fields.values()), metadata=input_schema.metadata)


def reason_code(reason: str) -> str:
    """The manifest groups rejects by code: the reason up to its first ':' (`too_long:2049>2048` -> `too_long`)."""
    return reason.split(":", 1)[0]


class ScoreSummary:
    """Mergeable summary of one input file's scores: count, mean, M2, min, max and a sorted order-statistics sketch."""

    def __init__(self) -> None:
        self._parts: list[np.ndarray] = []
        self.nonfinite = 0

    def add(self, scores: np.ndarray) -> None:  # scores: [n] float
        scores = np.asarray(scores, dtype=np.float64)
        finite = np.isfinite(scores)
        self.nonfinite += int((~finite).sum())
        if finite.any():
            self._parts.append(scores[finite].astype(np.float32))

    def to_dict(self) -> dict[str, Any]:
        values = np.sort(np.concatenate(self._parts).astype(np.float64)) if self._parts else np.zeros(0)
        n = int(values.size)
        if n == 0:
            return {"count": 0, "mean": None, "m2": None, "min": None, "max": None, "nonfinite": self.nonfinite, "order_stats": []}
        mean = float(values.mean())
        if n <= ORDER_STATS_POINTS:
            sketch = values
        else:
            ranks = np.round(np.linspace(0, n - 1, ORDER_STATS_POINTS)).astype(np.int64)
            sketch = values[ranks]
        return {
            "count": n,
            "mean": mean,
            "m2": float(((values - mean) ** 2).sum()),
            "min": float(values[0]),
            "max": float(values[-1]),
            "nonfinite": self.nonfinite,
            "order_stats": [float(v) for v in sketch],
        }


def merge_score_summaries(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Score statistics of the whole run from per-file summaries (Chan et al. merge of mean / M2)."""
    count, mean, m2 = 0, 0.0, 0.0
    lo, hi, nonfinite, exact = math.inf, -math.inf, 0, True
    points, weights = [], []
    for part in parts:
        nonfinite += part.get("nonfinite", 0)
        n = part["count"]
        if n == 0:
            continue
        delta = part["mean"] - mean
        total = count + n
        mean += delta * n / total
        m2 += part["m2"] + delta * delta * count * n / total
        count = total
        lo, hi = min(lo, part["min"]), max(hi, part["max"])
        sketch = np.asarray(part["order_stats"], dtype=np.float64)
        exact = exact and sketch.size == n
        points.append(sketch)
        weights.append(np.full(sketch.size, n / sketch.size))
    if count == 0:
        return {"count": 0, "mean": None, "std": None, "min": None, "max": None, "nonfinite": nonfinite,
                "quantiles": {}, "quantiles_exact": True}
    values = np.concatenate(points)
    if exact:
        quantiles = np.quantile(values, QUANTILES)
    else:
        order = np.argsort(values, kind="stable")
        values, cum = values[order], np.cumsum(np.concatenate(weights)[order])
        quantiles = [values[min(np.searchsorted(cum, q * cum[-1]), values.size - 1)] for q in QUANTILES]
    return {
        "count": count,
        "mean": mean,
        "std": math.sqrt(m2 / count),
        "min": lo,
        "max": hi,
        "nonfinite": nonfinite,
        "quantiles": {str(q): float(v) for q, v in zip(QUANTILES, quantiles)},
        "quantiles_exact": bool(exact),
    }


@functools.lru_cache(maxsize=1)
@functools.lru_cache(maxsize=1)
def git_sha() -> str | None:
    """The git commit of the drift_stream source tree, or None when it is not a git checkout (one `git` call per
    process)."""
    source = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and len(sha) == 40 else None


def provenance(kind: str) -> dict[str, Any]:
    """The header every output manifest starts with: what kind of output, which package version and commit, when."""
    return {"kind": kind, "version": __version__, "git_sha": git_sha(),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat or {prefix: {}}
    return {prefix: value}


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Lines `key: old -> new` for every dotted key whose value differs."""
    a, b = _flatten(old), _flatten(new)
    missing = object()
    lines = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key, missing), b.get(key, missing)
        if x != y:
            show = lambda v: "<absent>" if v is missing else json.dumps(v, sort_keys=True)  # noqa: E731
            lines.append(f"  {key}: {show(x)} -> {show(y)}")
    return lines


def _load_manifest_schema() -> dict:
    text = resources.files("drift_stream").joinpath("schemas/run_manifest.schema.json").read_text()
    return json.loads(text)


class ShardWriter:
    """Writes the data and rejects shards of one input file, then its completion marker (`commit`)."""

    def __init__(self, run: "RunDirectory", file: InputFile, input_schema: pa.Schema) -> None:
        self.run, self.file, self.input_schema = run, file, input_schema
        name = shard_name(file.index, file.num_files)
        self.data_rel, self.rejects_rel = f"data/{name}", f"rejects/{name}"
        self._data: _AtomicParquet | None = None
        self._rejects: _AtomicParquet | None = None
        self.rejects_schema = rejects_schema(input_schema)

    def write_scored(self, table: pa.Table) -> None:
        """Append scored rows (all input columns + id + drift_* score columns), in input order."""
        if self._data is None:
            self._data = _AtomicParquet(self.run.fs, self.run._path(self.data_rel), table.schema)
        self._data.write(table)

    def write_rejects(self, table: pa.Table) -> None:
        """Append rejected rows; columns are matched by name to `rejects_schema(input_schema)`, missing ones null."""
        if table.num_rows == 0:
            return
        if self._rejects is None:
            self._rejects = _AtomicParquet(self.run.fs, self.run._path(self.rejects_rel), self.rejects_schema)
        self._rejects.write(conform_table(table, self.rejects_schema))

    def commit(self, counts: Mapping[str, Any], scores: ScoreSummary) -> dict[str, Any]:
        """Publish both shards, then write the marker. Returns the marker."""
        if self._data is None:
            schema = empty_data_schema(self.input_schema)
            self._data = _AtomicParquet(self.run.fs, self.run._path(self.data_rel), schema)
        self._data.close()
        if self._rejects is not None:
            self._rejects.close()
        else:
            self.run._remove(self.rejects_rel)  # a stale one from an interrupted attempt
        marker = {
            "input_index": self.file.index,
            "num_input_files": self.file.num_files,
            "input_file": self.file.url,
            "data_file": self.data_rel,
            "rejects_file": self.rejects_rel if self._rejects is not None else None,
            **counts,
            "score_summary": scores.to_dict(),
        }
        self.run._write_json(f"completions/{self.file.index:05d}.json", marker)
        return marker

    def abort(self) -> None:
        """Throw away unfinished shards (nothing becomes visible)."""
        for writer in (self._data, self._rejects):
            if writer is not None:
                writer.abort()


def conform_table(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with exactly `schema`'s columns (matched by name, conformed; missing ones null): io.schema's.

    (A plain `cast` is not enough: it cannot add a struct field, and pyarrow 26 corrupts list<null> cast to itself.)
    """
    from drift_stream.io.schema import conform_table as conform

    return conform(table, schema)


def is_local_fs(fs: Any) -> bool:
    """True for fsspec's local filesystem (atomic rename available), False for object stores."""
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def open_path(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """(filesystem, normalised path) for a local path or fsspec URL: THE resolver of run, refine and report paths.

    It is `io.streams.filesystem` (so s3:// falls back to AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL), with local paths
    made absolute and trailing slashes removed. Raises InputError for an unknown protocol.
    """
    fs, path = filesystem(str(url), storage_options)
    return fs, (os.path.abspath(path) if is_local_fs(fs) else path.rstrip("/") or path)


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
            directory, name = os.path.split(self.final)
            os.makedirs(directory, exist_ok=True)
            # Temps of killed writers of this shard go; ours gets pid + a random suffix, so a writer that is still
            # dying (an old Ray actor, a resubmitted array task) never shares a temp file with us.
            for stale in globlib.glob(os.path.join(globlib.escape(directory), globlib.escape(f".{name}.tmp") + "*")):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(stale)
            self.temp = os.path.join(directory, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
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


class RunDirectory:
    """A run directory at a local path or fsspec URL (`storage_options` are used, never recorded).

    Writers (`drift-stream score`, the Ray engine) construct it directly (the directory is created); readers
    (refine, report, export) use `RunDirectory.open(url)` and then `read_completed_shards()`, which hands out the
    data shards of finished input files only (see `CompletedShards`).
    """

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None, *, create: bool = True) -> None:
        self.url = redact_url(str(url))
        self.fs, self.root = open_path(str(url), storage_options)
        self.is_local = is_local_fs(self.fs)
        if not create:
            if not self.fs.isdir(self.root):
                raise InputError(f"run directory {self.url} does not exist (expected the --out of `drift-stream score`)")
            return
        try:
            self.fs.makedirs(self.root, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot create run directory {self.url}: {exc}") from exc

    @classmethod
    def open(cls, url: str, storage_options: Mapping[str, Any] | None = None) -> "RunDirectory":
        """An existing run directory, for reading (nothing is created). InputError if it does not exist."""
        return cls(url, storage_options, create=False)

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    # ------------------------------------------------------------------ small files
    def _read_json(self, rel: str) -> dict | None:
        path = self._path(rel)
        self.fs.invalidate_cache(path)  # another process may have written it since we listed
        try:
            with self.fs.open(path, "rb") as handle:
                return json.loads(handle.read().decode("utf-8"))
        except FileNotFoundError:
            return None

    def _write_json(self, rel: str, value: Any) -> None:
        data = (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8")
        write_bytes_atomic(self.fs, self._path(rel), data)

    def _remove(self, rel: str) -> None:
        path = self._path(rel)
        if self.fs.exists(path):
            self.fs.rm(path)

    # ------------------------------------------------------------------ config
    def check_config(self, config: Mapping[str, Any], execution: Mapping[str, Any] | None = None) -> None:
        """Record `config` on first use; refuse (RunDirMismatchError, with a diff) a different one later.

        `execution`: settings that change no output (batch size, device: config_fields.execution_only); recorded by
        the first writer beside `config` and never compared, so a rerun with a smaller batch size is accepted.
        """
        recorded = self._read_json(CONFIG_FILE)
        config = json.loads(json.dumps(config))  # normalise tuples etc. to JSON values
        if recorded is None:
            self._write_json(CONFIG_FILE, {"config": config, "execution": json.loads(json.dumps(execution or {})),
                                           "version": __version__})
            return
        if execution is not None and recorded.get("execution") not in (None, json.loads(json.dumps(execution))):
            logger.info("execution settings differ from the first run's (they change no score):\n%s",
                        "\n".join(config_diff(recorded["execution"], json.loads(json.dumps(execution)))))
        if recorded.get("config") != config:
            diff = "\n".join(config_diff(recorded.get("config", {}), config))
            raise RunDirMismatchError(
                f"run directory {self.url} was made with a different config:\n{diff}\n"
                f"recorded config:\n{json.dumps(recorded.get('config'), indent=2, sort_keys=True)}\n"
                f"this run's config:\n{json.dumps(config, indent=2, sort_keys=True)}\n"
                "use a new --out directory, or rerun with the recorded settings"
            )

    def write_json_once(self, rel: str, value: Any) -> dict:
        """Write `rel` unless it exists; return what the directory holds afterwards (first writer wins).

        Local: the file is created by a hard link of a complete temp file, which fails if the name exists, so of
        concurrent writers exactly one wins. Object stores have no create-if-absent here: the file is read just
        before the PUT and again after it, so processes that race inside those milliseconds read the last PUT.
        """
        path = self._path(rel)
        if self.is_local:
            directory, name = os.path.split(path)
            os.makedirs(directory, exist_ok=True)
            temp = os.path.join(directory, f".{name}.tmp-{os.getpid()}")
            with open(temp, "wb") as handle:
                handle.write((json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8"))
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(temp, path)
            except FileExistsError:
                pass
            finally:
                os.remove(temp)
        elif self._read_json(rel) is None:
            self._write_json(rel, value)
        stored = self._read_json(rel)
        if stored is None:  # pragma: no cover - removed between the write and the read
            raise InputError(f"{self.url}/{rel} vanished right after it was written")
        return stored

    # ------------------------------------------------------------------ markers and shards
    def _marker_names(self) -> list[str]:
        directory = self._path("completions")
        self.fs.invalidate_cache(directory)
        try:
            names = [p.rsplit("/", 1)[-1] for p in self.fs.ls(directory, detail=False)]
        except FileNotFoundError:
            return []
        return sorted(n for n in names if n.endswith(".json") and not n.startswith("."))

    def completed_indexes(self) -> set[int]:
        """Input indexes whose completion marker exists (reads names only)."""
        return {int(name[:-5]) for name in self._marker_names() if name[:-5].isdigit()}

    def completed(self) -> dict[int, dict]:
        """Markers of finished input files, by input index."""
        markers = {}
        for name in self._marker_names():
            marker = self._read_json(f"completions/{name}")
            if marker is not None:
                markers[int(marker["input_index"])] = marker
        return markers

    def shard_writer(self, file: InputFile, input_schema: pa.Schema) -> ShardWriter:
        return ShardWriter(self, file, input_schema)

    # ------------------------------------------------------------------ manifest
    def build_manifest(
        self, config: Mapping[str, Any], input_files: list[str], markers: Mapping[int, dict] | None = None
    ) -> dict[str, Any]:
        """The manifest computed from `markers` (default: those present now); deterministic, no timestamps."""
        markers = self.completed() if markers is None else markers
        ordered = [markers[i] for i in sorted(markers)]
        by_reason: dict[str, int] = {}
        for marker in ordered:
            for code, n in marker["rejected_by_reason"].items():
                by_reason[code] = by_reason.get(code, 0) + n
        rows_in = sum(m["rows_in"] for m in ordered)
        rows_scored = sum(m["rows_scored"] for m in ordered)
        rows_rejected = sum(m["rows_rejected"] for m in ordered)
        return {
            "kind": "score",
            "format_version": MANIFEST_FORMAT,
            "version": __version__,
            "git_sha": git_sha(),
            "complete": len(ordered) == len(input_files),
            "num_input_files": len(input_files),
            "num_completed_files": len(ordered),
            "input_files": list(input_files),
            "rows_in": rows_in,
            "rows_scored": rows_scored,
            "rows_rejected": rows_rejected,
            "rejected_by_reason": dict(sorted(by_reason.items())),
            "json_text_columns": sorted({c for m in ordered for c in m.get("json_text_columns", [])}),
            "score_stats": merge_score_summaries([m["score_summary"] for m in ordered]),
            "scorer_info": ordered[0].get("scorer_info", {}) if ordered else {},
            "padding": _sum_padding(ordered),
            "reasoning_dropped": sum(m.get("tokenization", {}).get("reasoning_dropped", 0) for m in ordered),
            "data_files": [m["data_file"] for m in ordered],
            "rejects_files": [m["rejects_file"] for m in ordered if m["rejects_file"]],
            "config": json.loads(json.dumps(config)),
        }

    def update_manifest(self, config: Mapping[str, Any], input_files: list[str]) -> dict[str, Any]:
        """Recompute manifest.json from the markers; write it only if it changed.

        Several shard processes may finish together: after writing, the markers are listed again and the manifest
        recomputed until the set is stable, so the last writer always saw every marker written before it.
        """
        import jsonschema

        schema = _load_manifest_schema()
        markers = self.completed()
        for _ in range(10):
            manifest = self.build_manifest(config, input_files, markers)
            jsonschema.validate(manifest, schema)
            if self._read_json(MANIFEST_FILE) != manifest:
                self._write_json(MANIFEST_FILE, manifest)
            names = self._marker_names()
            if len(names) == len(markers):
                return manifest
            markers = self.completed()
        return manifest

    def read_manifest(self) -> dict | None:
        return self._read_json(MANIFEST_FILE)

    # ------------------------------------------------------------------ reading a run (refine, report, export, Ray)
    def read_json(self, rel: str) -> dict | None:
        """A small JSON file of the run directory (`beta.json`, `schema.json`, ...), or None when absent."""
        return self._read_json(rel)

    def read_config(self) -> dict | None:
        """config.json as recorded by the first writer ({"config": ..., "version": ...}), or None."""
        return self._read_json(CONFIG_FILE)

    def read_completed_shards(self, *, allow_incomplete: bool = False, command: str = "this command") -> "CompletedShards":
        """The data shards of the run's finished input files: THE way to read a run directory (io/run_reader.py).

        Only input files with a completion marker count. Raises IncompleteRunError when some input file has none,
        naming them and the command that completes the run, unless `allow_incomplete` (then a warning says what
        fraction of the input files was seen); InputError when this is not a score run directory.
        """
        from drift_stream.io.run_reader import read_completed_shards

        return read_completed_shards(self, allow_incomplete=allow_incomplete, command=command)


def _sum_padding(markers: list[dict]) -> dict[str, Any]:
    """Real and padded tokens over the completed files' batches; padding_efficiency = real / padded (batching.py)."""
    real = sum(m.get("padding", {}).get("real_tokens", 0) for m in markers)
    padded = sum(m.get("padding", {}).get("padded_tokens", 0) for m in markers)
    batches = sum(m.get("padding", {}).get("batches", 0) for m in markers)
    return {"real_tokens": real, "padded_tokens": padded, "batches": batches,
            "padding_efficiency": real / padded if padded else None}


def __getattr__(name: str):  # CompletedShards / resume_command live in io/run_reader.py
    if name in ("CompletedShards", "resume_command"):
        from drift_stream.io import run_reader

        return getattr(run_reader, name)
    raise AttributeError(name)
