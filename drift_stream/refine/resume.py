"""What makes `drift-stream refine` resumable: the output directory's config record, its fitted plan and a completion
marker per output shard.

    OUT/refine_config.json          write-once: the refine config, the source run and each source shard's identity
                                    (size + mtime_ns or ETag); a rerun with another is refused (RunDirMismatchError,
                                    printing both)
    OUT/refine_plan.json            write-once: what refine fitted on the whole run before writing any row (row
                                    count, score stats, prefilter counts, the top:P cut(s), the weight map's scalars)
    OUT/refine_weight_map.parquet   weight_map rank only: its distinct scores and their weights (written before
                                    refine_plan.json, which vouches for it)
    OUT/completions/IIIII.json      output shard I is complete: its rows and the moments of its kept scores and
                                    weights (written after the shard, which appears atomically)
    OUT/manifest.json               written last, from the plan and the markers

The plan is recorded rather than refitted: the fit is polars reductions and numpy exp / ndtri, whose last bits can
differ between machines (SIMD paths, thread counts); a shard written on the resuming node would then disagree with
one written before the kill. Read back, every shard sees the same cut and the same weights to the bit. The names
differ from a score run's config.json, so export and report never take a killed refine for a scored run.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from drift_stream.errors import InputError, RunDirMismatchError
from drift_stream.io.atomic import atomic_parquet_writer, write_bytes_atomic
from drift_stream.io.identity import file_identity
from drift_stream.io.manifest import config_diff
from drift_stream.io.run_dir import RunDirectory
from drift_stream.refine.weight_map import WeightMap

logger = logging.getLogger(__name__)

CONFIG_FILE = "refine_config.json"
PLAN_FILE = "refine_plan.json"
RANK_TABLE_FILE = "refine_weight_map.parquet"
MANIFEST_FILE = "manifest.json"
MARKERS = "completions"
RANK_TABLE_ROWS = 65_536  # rows per row group of the rank table: its writer and reader hold one group, not the table


def source_identities(fs, paths: list[str], root: str, local: bool) -> dict[str, dict]:
    """{path relative to the run: identity} of the source data shards, from one listing of their directories."""
    infos: dict[str, dict] = {}
    for directory in sorted({p.rsplit("/", 1)[0] for p in paths}):
        fs.invalidate_cache(directory)
        infos.update({fs._strip_protocol(i["name"]): i for i in fs.ls(directory, detail=True)})
    out = {}
    for p in paths:
        info = infos.get(fs._strip_protocol(p)) or fs.info(p)
        out[p[len(root) + 1:] if p.startswith(root + "/") else p] = file_identity(info, local)
    return out


class RefineOutput:
    """A refine output directory (created if absent): its config record, plan, markers and manifest."""

    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        self.dir = RunDirectory(url, storage_options)
        self.url, self.fs, self.root = self.dir.url, self.dir.fs, self.dir.root

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    # ------------------------------------------------------------------ config
    def check_config(self, config: dict[str, Any], sources: dict[str, dict], *, record: bool = False) -> None:
        """Compare `config` (refine settings + source run) and the source shards' identities with the recorded
        ones; with `record`, first record them if nothing is (write-once: refine does so once its plan is fitted,
        so a refine that stops on bad input leaves no record to trip over).

        A different config or source is refused printing both; so is a source whose shards changed since (another
        set of finished files, or a file rewritten): the shards written so far were cut from the recorded ones."""
        config = json.loads(json.dumps(config))
        first = {"config": config, "source_shards": sources}
        recorded = self.dir.read_json(CONFIG_FILE)
        if recorded is None:
            if not record:
                return
            recorded = self.dir.write_json_once(CONFIG_FILE, first)
        if recorded.get("config") != config:
            diff = "\n".join(config_diff(recorded.get("config", {}), config))
            raise RunDirMismatchError(
                f"refine output {self.url} was made with a different config or source run:\n{diff}\n"
                f"recorded:\n{json.dumps(recorded.get('config'), indent=2, sort_keys=True)}\n"
                f"this refine:\n{json.dumps(config, indent=2, sort_keys=True)}\n"
                "choose another --out, or rerun with the recorded settings to resume")
        before = recorded.get("source_shards") or {}
        if before != sources:
            changed = sorted(k for k in set(before) | set(sources) if before.get(k) != sources.get(k))
            shown = "\n".join(f"  {k}: {before.get(k, '<absent>')} -> {sources.get(k, '<absent>')}"
                              for k in changed[:20]) + ("\n  ..." if len(changed) > 20 else "")
            raise RunDirMismatchError(
                f"refine output {self.url} was cut from other shards of {config.get('source_run')} "
                f"({len(changed)} finished, changed or added since):\n{shown}\n"
                "the shards it holds would not match the new ones: choose another --out (or delete this one)")

    # ------------------------------------------------------------------ plan
    def load_plan(self) -> tuple[dict, WeightMap | None] | None:
        """(plan, weight map or None), or None when no plan is recorded yet."""
        plan = self.dir.read_json(PLAN_FILE)
        if plan is None:
            return None
        record = plan.get("weight_map")
        if record is None:
            return plan, None
        values = table = None
        if record["kind"] == "rank":
            path = self.path(RANK_TABLE_FILE)
            try:
                with self.fs.open(path, "rb") as f:
                    values, table = _read_rank_table(f)
            except (OSError, pa.ArrowException) as e:
                raise InputError(f"cannot read {path}, which {PLAN_FILE} relies on: {e}; delete {self.url} and "
                                 "refine again") from e
        return plan, WeightMap.from_record(record, values, table)

    def save_plan(self, plan: dict, wmap: WeightMap | None) -> None:
        """Record the plan (write-once; rank's table first, in row groups of RANK_TABLE_ROWS). Refine then drops
        the fitted map and uses what `load_plan` reads back."""
        plan = dict(plan, weight_map=None if wmap is None else wmap.to_record())
        if wmap is not None and wmap.kind == "rank":
            schema = pa.schema([("score", pa.float64()), ("weight", pa.float64())])
            with atomic_parquet_writer(self.fs, self.path(RANK_TABLE_FILE), schema) as writer:
                for lo in range(0, wmap.values.size, RANK_TABLE_ROWS):
                    writer.write(pa.table({"score": wmap.values[lo: lo + RANK_TABLE_ROWS],
                                           "weight": wmap.table[lo: lo + RANK_TABLE_ROWS]}, schema=schema))
        self.dir.write_json_once(PLAN_FILE, json.loads(json.dumps(plan)))

    # ------------------------------------------------------------------ markers
    def finished(self, names: list[str]) -> dict[int, dict]:
        """Markers of output shards that are complete (marker present, its shard too), by shard index."""
        done = {}
        for index in sorted(self.dir.completed_indexes()):
            marker = self.dir.read_json(f"{MARKERS}/{index:05d}.json")
            if marker is None or not 0 <= index < len(names):
                continue
            self.fs.invalidate_cache(names[index])
            if self.fs.exists(names[index]):
                done[index] = marker
            else:
                logger.warning("%s/%s/%05d.json marks a shard that is missing: writing it again", self.url, MARKERS,
                               index)
        return done

    def write_marker(self, index: int, marker: dict) -> None:
        data = (json.dumps(marker, indent=2, sort_keys=True) + "\n").encode()
        write_bytes_atomic(self.fs, self.path(f"{MARKERS}/{index:05d}.json"), data)

    def read_manifest(self) -> dict | None:
        return self.dir.read_json(MANIFEST_FILE)

    def write_manifest(self, manifest: dict) -> None:
        write_bytes_atomic(self.fs, self.path(MANIFEST_FILE), json.dumps(manifest, indent=2).encode())



def _read_rank_table(f) -> tuple[np.ndarray, np.ndarray]:
    """(scores, weights) of a rank table, [u] float64 each, filled row group by row group into arrays of their own
    (16 bytes a row; read_table + to_numpy held the table twice)."""
    pf = pq.ParquetFile(f, pre_buffer=False)  # pre_buffer would read every row group at once
    values, table = np.empty(pf.metadata.num_rows), np.empty(pf.metadata.num_rows)
    at = 0
    for batch in pf.iter_batches(batch_size=RANK_TABLE_ROWS, columns=["score", "weight"]):
        values[at: at + batch.num_rows] = batch.column(0).to_numpy()
        table[at: at + batch.num_rows] = batch.column(1).to_numpy()
        at += batch.num_rows
    return values, table
