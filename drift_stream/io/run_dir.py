"""The run directory of `drift-stream score`: atomic shards, completion markers, rejects, manifest, config check.

Layout (fixed names; N = number of input files, I = an input file's position in the expanded input list):

    OUT/data/train-IIIII-of-NNNNN.parquet      scored rows of input file I, in input order
    OUT/rejects/train-IIIII-of-NNNNN.parquet   rejected rows of input file I (only when any), drift_reject_reason
    OUT/completions/IIIII.json                 marker: input file I is done (counts, score summary)
    OUT/manifest.json                          merged from the markers once the last is written (engines/local.py
                                               finish_run; schemas/run_manifest.schema.json)
    OUT/config.json                            resolved config and input identities (write-once); a rerun with
                                               a different config or changed input files is refused

Atomicity. Each parquet appears whole or not at all (io/atomic.py: local temp file + fsync + rename; object stores one
upload that an error discards). In both cases the completion marker is written (one small atomic PUT / replace) only
after the data and rejects shards are complete, so a marker is the only proof of a finished input file: a rerun skips
files with markers and overwrites anything else.

Identity of the inputs. config.json records, per input file, its size and its mtime_ns (local) or content tag
(S3 / HTTP ETag, ...), and for an IterableDataset its recipe fingerprint (io/identity.py `file_identity`,
`dataset_fingerprint`). Every later process compares them and refuses a changed input with InputChangedError, so a
file regenerated in place, or another dataset with the same shard count, never mixes into a run. config.json is
created write-once (`write_json_once`): of two processes started together with different settings exactly one is
recorded and the other is refused.

Score summaries, the provenance header and config diffs are io/manifest.py's; the atomic writers are io/atomic.py's.
"""

from __future__ import annotations

import json
import logging
import os
from importlib import resources
from typing import Any, Mapping

import numpy as np
import pyarrow as pa

from drift_stream.errors import InputChangedError, InputError, RunDirMismatchError
from drift_stream.io.arrow_s3 import read_objects
from drift_stream.io.atomic import _AtomicParquet, write_bytes_atomic
from drift_stream.io.columns import ID, RAW_LINE, REJECT_REASON, ROW_INDEX
from drift_stream.io.manifest import (
    ScoreSummary,
    config_diff,
    git_sha,
    merge_score_summaries,
)
from drift_stream.io.schema import conform_table
from drift_stream.io.settle import schema_to_text
from drift_stream.io.streams import InputFile, filesystem, redact_url
from drift_stream.version import __version__

logger = logging.getLogger(__name__)


CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1

# Columns added to rejected rows (besides the input columns, `id` and `drift_reject_reason`).


def shard_name(index: int, num_files: int) -> str:
    """HF-style shard file name for input file `index` of `num_files`."""
    return f"train-{index:05d}-of-{num_files:05d}.parquet"


def rejects_schema(input_schema: pa.Schema) -> pa.Schema:
    """Schema of rejects/ shards: input columns, `id` (always a string, as on scored rows; in its input position,
    else appended), reason, row index, raw line."""
    fields = {f.name: f for f in input_schema}
    fields[ID] = pa.field(ID, pa.string())
    for name, type_ in ((REJECT_REASON, pa.string()), (ROW_INDEX, pa.int64()), (RAW_LINE, pa.string())):
        fields[name] = pa.field(name, type_)
    return pa.schema(list(fields.values()), metadata=input_schema.metadata)


def empty_data_schema(input_schema: pa.Schema) -> pa.Schema:
    """Schema of a data shard with no scored rows (the scorer never ran on a good row of that file); `id` is a
    string, as on scored rows."""
    fields = {f.name: f for f in input_schema}
    fields[ID] = pa.field(ID, pa.string())
    for name, type_ in (("drift_score", pa.float32()), ("drift_grad_norm", pa.float32()), ("drift_num_tokens", pa.int32())):
        fields[name] = pa.field(name, type_)
    return pa.schema(list(fields.values()), metadata=input_schema.metadata)


def reason_code(reason: str) -> str:
    """The manifest groups rejects by code: the reason up to its first ':' (`too_long:2049>2048` -> `too_long`)."""
    return reason.split(":", 1)[0]



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
            # what io/settle.py unites once the run is complete (no shard is opened for it)
            "data_schema": schema_to_text(self._data.schema),
            **({"rejects_schema": schema_to_text(self._rejects.schema)} if self._rejects is not None else {}),
            "score_summary": scores.to_dict(),
        }
        self.run._write_marker(self.file.index, marker)
        return marker

    def abort(self) -> None:
        """Throw away unfinished shards (nothing becomes visible)."""
        for writer in (self._data, self._rejects):
            if writer is not None:
                writer.abort()


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



class RunDirectory:
    """A run directory at a local path or fsspec URL (`storage_options` are used, never recorded).

    Writers (`drift-stream score`, the Ray engine) construct it directly (the directory is created); readers
    (refine, report, export) use `io.run_reader.read_completed_shards(RunDirectory.open(url))`, which hands out the
    data shards of finished input files only (see `CompletedShards`).
    """

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None, *, create: bool = True) -> None:
        self.url = redact_url(str(url))
        self.fs, self.root = open_path(str(url), storage_options)
        self.is_local = is_local_fs(self.fs)
        # markers written through this object, as they read back: `completed` serves them without a GET (a shard
        # process prints its own counts, the settling one reads only the others' markers)
        self._written: dict[int, dict] = {}
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

    def _write_json(self, rel: str, value: Any) -> bytes:
        data = (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8")
        write_bytes_atomic(self.fs, self._path(rel), data)
        return data

    def _write_marker(self, index: int, marker: Mapping[str, Any]) -> None:
        """Write the completion marker of input file `index`; keep what a reader of it would get, its score sketch
        as float64 (up to 4,096 values: 32 KiB instead of a list's ~130 KiB, for each file this process scores)."""
        kept = json.loads(self._write_json(f"completions/{index:05d}.json", marker).decode("utf-8"))
        kept["score_summary"]["order_stats"] = np.asarray(kept["score_summary"]["order_stats"], dtype=np.float64)
        self._written[index] = kept

    def _written_marker(self, index: int) -> dict:
        """A marker `_write_marker` kept, as its file reads back."""
        kept = self._written[index]
        return {**kept, "score_summary": {**kept["score_summary"],
                                          "order_stats": kept["score_summary"]["order_stats"].tolist()}}

    def _remove(self, rel: str) -> None:
        path = self._path(rel)
        if self.fs.exists(path):
            self.fs.rm(path)

    # ------------------------------------------------------------------ config
    def check_config(self, config: Mapping[str, Any], execution: Mapping[str, Any] | None = None,
                     inputs: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        """Record `config` on first use (write-once); refuse (RunDirMismatchError, with a diff) a different one later.

        `execution`: settings that change no output (batch size, device: config_fields.execution_only); recorded by
        the first writer beside `config` and never compared, so a rerun with a smaller batch size is accepted.
        `inputs`: {url: identity} of the input files (io/identity.py `file_identity`); a file whose recorded identity
        differs raises InputChangedError (only the keys both records hold are compared; a run directory written
        before identities were recorded is not checked).
        """
        config = json.loads(json.dumps(config))  # normalise tuples etc. to JSON values
        execution_json = json.loads(json.dumps(execution or {}))
        inputs_json = json.loads(json.dumps(inputs)) if inputs is not None else None
        recorded = self._read_json(CONFIG_FILE)
        if recorded is None:
            first = {"config": config, "execution": execution_json, "version": __version__}
            if inputs_json is not None:
                first["inputs"] = inputs_json
            recorded = self.write_json_once(CONFIG_FILE, first)
            if recorded == first:
                return
        if execution is not None and recorded.get("execution") not in (None, execution_json):
            logger.info("execution settings differ from the first run's (they change no score):\n%s",
                        "\n".join(config_diff(recorded["execution"], execution_json)))
        if recorded.get("config") != config:
            diff = "\n".join(config_diff(recorded.get("config", {}), config))
            raise RunDirMismatchError(
                f"run directory {self.url} was made with a different config:\n{diff}\n"
                f"recorded config:\n{json.dumps(recorded.get('config'), indent=2, sort_keys=True)}\n"
                f"this run's config:\n{json.dumps(config, indent=2, sort_keys=True)}\n"
                "use a new --out directory, or rerun with the recorded settings"
            )
        if inputs_json is not None and recorded.get("inputs") is not None:
            self._check_inputs(recorded["inputs"], inputs_json)

    def _check_inputs(self, recorded: Mapping[str, Mapping], current: Mapping[str, Mapping]) -> None:
        changed = []
        for url, identity in current.items():
            before = recorded.get(url) or {}
            diffs = [f"{key} {before[key]} -> {identity[key]}" for key in sorted(set(before) & set(identity))
                     if before[key] != identity[key]]
            if diffs:
                changed.append(f"  {url}: {', '.join(diffs)}")
        if not changed:
            return
        done = len(self.completed_indexes())
        raise InputChangedError(
            f"{len(changed)} input(s) of run directory {self.url} changed since it recorded them:\n"
            + "\n".join(changed[:20]) + ("\n  ..." if len(changed) > 20 else "")
            + f"\n{done} input file(s) were already scored from the recorded content, so resuming would mix the two. "
            f"Use a new --out directory, or delete {self.url} (its config.json, schema.json, beta.json, data/, "
            "rejects/ and completions/) to score the changed inputs from the start"
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
    def list_markers(self) -> dict[str, tuple]:
        """{marker name: version} from one listing; the version (size, ETag / mtime, inode) tells a marker from a
        rewritten one."""
        directory = self._path("completions")
        self.fs.invalidate_cache(directory)
        try:
            entries = self.fs.ls(directory, detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        for entry in entries:
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if name.endswith(".json") and not name.startswith("."):
                out[name] = (entry.get("size"), entry.get("ETag") or entry.get("etag") or entry.get("mtime")
                             or str(entry.get("LastModified")), entry.get("ino"))
        return dict(sorted(out.items()))

    def _marker_names(self) -> list[str]:
        return list(self.list_markers())

    def completed_indexes(self, listing: Mapping[str, tuple] | None = None) -> set[int]:
        """Input indexes whose completion marker exists (reads names only; `listing`: one `list_markers` made)."""
        names = self._marker_names() if listing is None else listing
        return {int(name[:-5]) for name in names if name[:-5].isdigit()}

    def completed(self, indexes: set[int] | None = None, listing: Mapping[str, tuple] | None = None
                  ) -> dict[int, dict]:
        """Markers of finished input files, by input index (treat them as read-only); `indexes`: only those;
        `listing`: those of one `list_markers` the caller made (else this lists them).

        A marker this object wrote is not read back (a shard process of an array lists, and reads only the markers
        of its files finished by an earlier process); each other marker version is read once per process
        (`_MARKERS`: the settling process, its summary and a refine in the same process share the reads), and on
        an object store they are fetched concurrently (`arrow_s3.read_objects`): 1,000 markers one GET after
        another cost ~1,000 round trips."""
        entries = self.list_markers() if listing is None else listing
        keys = {name: (self.url, self.root, name, version) for name, version in entries.items()
                if indexes is None or (name[:-5].isdigit() and int(name[:-5]) in indexes)}
        own = {name: self._written_marker(int(name[:-5])) for name in keys
               if name[:-5].isdigit() and int(name[:-5]) in self._written}
        keys = {name: key for name, key in keys.items() if name not in own}
        todo = [name for name, key in keys.items() if key not in _MARKERS]
        if self.is_local or len(todo) < 2:
            fetched = {name: self._read_json(f"completions/{name}") for name in todo}
        else:  # a marker gone since the listing comes back as its exception and is skipped
            blobs = read_objects(self.fs, [self._path(f"completions/{name}") for name in todo])
            fetched = {name: json.loads(blob.decode("utf-8")) for name, blob in zip(todo, blobs)
                       if isinstance(blob, bytes)}
        if len(_MARKERS) + len(fetched) > _MARKERS_MAX:
            _MARKERS.clear()
        for name, marker in fetched.items():
            if marker is not None:
                _MARKERS[keys[name]] = marker
        markers = [*own.values(), *(_MARKERS.get(key) or fetched.get(name) for name, key in keys.items())]
        return dict(sorted(((int(m["input_index"]), m) for m in markers if m is not None), key=lambda im: im[0]))

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

    def write_manifest(self, config: Mapping[str, Any], input_files: list[str], markers: Mapping[int, dict],
                       extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """manifest.json from markers the caller has read (each once), validated; written only if it changed.
        `extra`: the settled facts (`source_id_column`, `repeated_ids`, `summary`)."""
        import jsonschema

        manifest = {**self.build_manifest(config, input_files, markers), **(extra or {})}
        jsonschema.validate(manifest, _load_manifest_schema())
        if self._read_json(MANIFEST_FILE) != manifest:
            self._write_json(MANIFEST_FILE, manifest)
        return manifest

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

    def write_json(self, rel: str, value: Any) -> None:
        """Replace a small JSON file of the run directory (atomic)."""
        self._write_json(rel, value)

    def read_config(self) -> dict | None:
        """config.json as recorded by the first writer ({"config": ..., "version": ...}), or None."""
        return self._read_json(CONFIG_FILE)


_MARKERS: dict[tuple, dict] = {}  # (run url, root, marker name, version) -> marker, read once per process
_MARKERS_MAX = 200_000


def _sum_padding(markers: list[dict]) -> dict[str, Any]:
    """Real and padded tokens over the completed files' batches; padding_efficiency = real / padded (batching.py)."""
    real = sum(m.get("padding", {}).get("real_tokens", 0) for m in markers)
    padded = sum(m.get("padding", {}).get("padded_tokens", 0) for m in markers)
    batches = sum(m.get("padding", {}).get("batches", 0) for m in markers)
    return {"real_tokens": real, "padded_tokens": padded, "batches": batches,
            "padding_efficiency": real / padded if padded else None}

