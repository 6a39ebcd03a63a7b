"""Settling a run once every input file has its marker: one schema over every shard, and the run's schema.json.

Each input file is planned from itself (io/streams.py `iter_planned`: its footer or its first rows), so no process
reads another shard's data, and the Ray driver reads nothing before its actors start. The price is paid here, once
per run, by the process that sees the last marker (or by a rerun of a finished run): the data shards' schemas, and the
per-file plans, recorded in the markers, are united (io/schema.py `plan_schema`: missing columns null, one string /
list flavour, types that cannot be unified carried as JSON text), and only the shards whose schema differs from the
union are rewritten, row group by row group (atomic, as every shard). A lake written by one tool (the usual case)
has one plan per file that equals the union: nothing is rewritten, nothing is read.

A shard of an input file without scored rows contributes its columns, not their types (its types come from a sample
that may have held only rejected rows). Which columns of a rewritten shard are already JSON text is recorded in its
own footer (`JSON_TEXT_KEY`), so a settle interrupted part-way and run again never encodes a value twice.
"""

from __future__ import annotations

import base64
import json
import logging
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from drift_stream.io.atomic import _AtomicParquet
from drift_stream.io.schema import SchemaPlan, TypeStats, conform_table, plan_schema

logger = logging.getLogger(__name__)

JSON_TEXT_KEY = b"drift_stream.json_text_columns"  # footer metadata of a settled shard: its JSON-text columns


def schema_to_text(schema: pa.Schema) -> str:
    return base64.b64encode(schema.serialize().to_pybytes()).decode()


def schema_from_text(text: str) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text)))


def plan_to_dict(plan: SchemaPlan) -> dict[str, Any]:
    """JSON form of a plan: readable column list plus the exact Arrow schema (IPC, base64)."""
    return {**plan.to_dict(), "arrow_schema_base64": schema_to_text(plan.schema)}


def plan_from_dict(value: Mapping[str, Any]) -> SchemaPlan:
    return SchemaPlan.from_dict(schema_from_text(value["arrow_schema_base64"]), value)


def union_plan(plans: list[SchemaPlan], rows: list[int] | None = None) -> SchemaPlan:
    """The plan of several files' plans: a column is JSON text when any file carries it so or its types cannot be
    unified; strict (adapter) and plain-string columns as any file has them. `rows[i]` = 0: plan i gives columns
    only (its types are null)."""
    if len(plans) == 1 or all(p == plans[0] for p in plans[1:]):
        return plans[0]
    stats = TypeStats()
    for k, plan in enumerate(plans):
        empty = rows is not None and rows[k] == 0
        for f in plan.schema:
            stats.add_type(f.name, pa.null() if empty else f.type, 1)
    strict = dict.fromkeys(c for p in plans for c in p.strict_columns)
    united = plan_schema(stats, strict)
    already = dict.fromkeys(c for p in plans for c in p.json_columns)
    json_columns = tuple(dict.fromkeys([*united.json_columns, *already]))
    string_columns = tuple(dict.fromkeys([*united.string_columns, *(c for p in plans for c in p.string_columns)]))
    fields = [pa.field(f.name, pa.string()) if f.name in json_columns or f.name in string_columns else f
              for f in united.schema]
    return SchemaPlan(pa.schema(fields), json_columns, tuple(c for c in united.strict_columns
                                                             if c not in json_columns), string_columns)


def settle_shards(run: Any, markers: Mapping[int, dict]) -> dict[str, Any] | None:
    """Give every data shard (and every rejects shard) of a finished run one schema; returns the run's input plan
    record (schema.json), or None when the markers predate per-file plans (nothing to settle)."""
    ordered = [markers[i] for i in sorted(markers)]
    if not ordered or any("plan" not in m for m in ordered):
        return None
    input_plan = union_plan([plan_from_dict(m["plan"]) for m in ordered], [m["rows_scored"] for m in ordered])
    for kind, key in (("data", "data_file"), ("rejects", "rejects_file")):
        have = [m for m in ordered if m.get(key) and m.get(f"{kind}_schema")]
        if not have:
            continue
        plans = [SchemaPlan(schema_from_text(m[f"{kind}_schema"]), tuple(m.get("json_text_columns", ())))
                 for m in have]
        rows = [m["rows_scored"] if kind == "data" else m["rows_rejected"] for m in have]
        target = union_plan(plans, rows)
        target_schema = target.schema.remove_metadata()
        for marker, plan in zip(have, plans):
            if plan.schema.remove_metadata().equals(target_schema) and set(target.json_columns) <= set(plan.json_columns):
                continue
            _rewrite(run, marker[key], target, tuple(plan.json_columns))
    return plan_to_dict(input_plan)


def _rewrite(run: Any, rel: str, target: SchemaPlan, json_before: tuple[str, ...]) -> None:
    """Conform one shard to `target`, streaming its row groups into an atomic replacement."""
    path = run._path(rel)
    with run.fs.open(path, "rb") as handle:
        reader = pq.ParquetFile(handle, pre_buffer=False)  # a row group at a time, not the whole shard at once
        meta = reader.schema_arrow.metadata or {}
        if JSON_TEXT_KEY in meta:  # settled before (an interrupted settle): trust the footer, not the marker
            json_before = tuple(json.loads(meta[JSON_TEXT_KEY]))
            if reader.schema_arrow.remove_metadata().equals(target.schema.remove_metadata()) \
                    and set(target.json_columns) <= set(json_before):
                return
        encode = [c for c in target.json_columns if c not in json_before]
        plain = [c for c in target.string_columns if c not in json_before]
        schema = target.schema.with_metadata({**meta, JSON_TEXT_KEY: json.dumps(list(target.json_columns)).encode()})
        writer = _AtomicParquet(run.fs, path, schema)
        try:
            for batch in reader.iter_batches(batch_size=8192):
                writer.write(conform_table(pa.Table.from_batches([batch]), schema, encode, plain))
            writer.close()
        except BaseException:
            writer.abort()
            raise
    logger.info("%s: conformed to the run's one schema (%s)", rel, ", ".join(f"{c} as JSON text" for c in encode)
                or "types united")
