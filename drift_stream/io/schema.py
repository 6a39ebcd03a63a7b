"""One Arrow schema for a whole input (all files), and conforming tables to it.

Pools are written by different tools: the same column may be `string` in one file and `large_string` in another, a
struct may have an extra field in one file, a column may be missing, and in JSON text a value's type may change from
row to row. `TypeStats` counts, per column, how many rows carried each Arrow type; `plan_schema` merges the counts of
every input file into a `SchemaPlan`:

* types that Arrow can unify (int + float, null + anything, structs with different fields, list flavours) are
  unified, then normalised to one flavour (`normalize_type`: string, binary and list, never their large / view
  variants; dictionaries decoded), so every output shard of a run has the same schema;
* a column whose types cannot be unified is carried as **JSON text** (a string holding each row's JSON value) when
  the adapter does not read it: every row keeps its value, and the run manifest names the column;
* a column the adapter reads (`strict_columns`) keeps the type of the largest group of rows whose types unify;
  rows of another type are rejected one by one (`wrong_type:COLUMN`), never the file. When all its types are
  scalars (an `id` that is a number in one file and a string in another, a GSM8K answer), it becomes a plain string
  column instead (`string_columns`: 7 -> "7"), which is how the adapter reads such values anyway.

`conform_table` casts a table to the plan: columns matched by name, missing columns (and struct fields) null, list and
string flavours converted, JSON-text columns encoded. Column order: first appearance over the files in input order.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.types as pat


@dataclass
class TypeStats:
    """Rows per (column, Arrow type) seen in some input; columns in order of first appearance."""

    types: dict[str, Counter] = field(default_factory=dict)

    def add_type(self, name: str, type_: pa.DataType, rows: int) -> None:
        self.types.setdefault(name, Counter())[type_] += rows

    def add_schema(self, schema: pa.Schema, rows: int) -> None:
        for f in schema:
            self.add_type(f.name, f.type, rows)

    def add_rows(self, rows: list[dict]) -> None:
        """Count the types of JSON rows (dicts); fast path: one type per column for the whole list."""
        if not rows:
            return
        try:
            struct = pa.array(rows).type
            for f in struct:
                self.add_type(f.name, f.type, len(rows))
            return
        except (pa.ArrowException, ValueError, TypeError, OverflowError):
            pass
        names = list(dict.fromkeys(k for row in rows for k in row))
        for name in names:
            values = [row.get(name) for row in rows]
            try:
                self.add_type(name, pa.array(values).type, len(rows))
            except (pa.ArrowException, ValueError, TypeError, OverflowError):
                for value in values:  # the rare mixed column: one type per row
                    self.add_type(name, _value_type(value), 1)

    def merge(self, other: "TypeStats") -> None:
        for name, counts in other.types.items():
            self.types.setdefault(name, Counter()).update(counts)


@dataclass(frozen=True)
class SchemaPlan:
    """The schema every chunk of a run is conformed to."""

    schema: pa.Schema
    json_columns: tuple[str, ...] = ()  # carried as JSON text (their value types vary between rows)
    strict_columns: tuple[str, ...] = ()  # read by the adapter: rows of another type are rejected
    string_columns: tuple[str, ...] = ()  # read by the adapter, scalars of several types: carried as str(value)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": [f"{f.name}: {f.type}" for f in self.schema], "json_columns": list(self.json_columns),
                "strict_columns": list(self.strict_columns), "string_columns": list(self.string_columns)}

    @classmethod
    def from_dict(cls, schema: pa.Schema, value: Mapping[str, Any]) -> "SchemaPlan":
        """The plan of `schema` with the column lists of `to_dict()` (or of the schema's plan metadata)."""
        return cls(schema, *(tuple(value.get(k, ())) for k in ("json_columns", "strict_columns", "string_columns")))


def _value_type(value: Any) -> pa.DataType:
    try:
        return pa.array([value]).type
    except (pa.ArrowException, ValueError, TypeError, OverflowError):
        return pa.string()  # e.g. an integer beyond int64 / uint64: only text holds it (and it is not unifiable)


def normalize_type(type_: pa.DataType) -> pa.DataType:
    """One flavour per kind: string / binary / list (not large_* or *_view); dictionaries decoded; recursive."""
    if pat.is_dictionary(type_):
        return normalize_type(type_.value_type)
    if pat.is_large_string(type_) or pat.is_string_view(type_):
        return pa.string()
    if pat.is_large_binary(type_) or pat.is_binary_view(type_):
        return pa.binary()
    if pat.is_list(type_) or pat.is_large_list(type_) or pat.is_list_view(type_) or pat.is_large_list_view(type_):
        return pa.list_(type_.value_field.with_type(normalize_type(type_.value_type)))
    if pat.is_fixed_size_list(type_):
        return pa.list_(type_.value_field.with_type(normalize_type(type_.value_type)), type_.list_size)
    if pat.is_struct(type_):
        return pa.struct([type_.field(i).with_type(normalize_type(type_.field(i).type))
                          for i in range(type_.num_fields)])
    if pat.is_map(type_):
        return pa.map_(normalize_type(type_.key_type), normalize_type(type_.item_type))
    return type_


def unify_types(types: Iterable[pa.DataType]) -> pa.DataType:
    """The permissive Arrow unification of `types`, normalised; raises pa.ArrowTypeError / ArrowInvalid when none."""
    schemas = [pa.schema([("x", normalize_type(t))]) for t in types]
    if not schemas:
        return pa.null()
    return normalize_type(pa.unify_schemas(schemas, promote_options="permissive").field("x").type)


def _unifiable(types: list[pa.DataType]) -> bool:
    try:
        unify_types(types)
        return True
    except (pa.ArrowTypeError, pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return False


def plan_schema(stats: TypeStats, strict_columns: Iterable[str] = ()) -> SchemaPlan:
    """The SchemaPlan for the counted rows (module docstring)."""
    strict = set(strict_columns)
    fields, json_columns, strict_found, string_columns = [], [], [], []
    for name, counts in stats.types.items():
        types = [t for t in counts if not pat.is_null(t)]
        try:
            if not any(_has_empty_struct(t) for t in types):  # parquet cannot store a struct without fields ({})
                fields.append(pa.field(name, unify_types(types)))
                continue
        except (pa.ArrowTypeError, pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
        if name in strict and types and all(_is_scalar(t) for t in types):
            fields.append(pa.field(name, pa.string()))
            string_columns.append(name)
        elif name in strict:
            # the largest group of rows whose types unify, built greedily from the most common type
            group: list[pa.DataType] = []
            for type_, _ in sorted(((t, counts[t]) for t in types), key=lambda tc: (-tc[1], str(tc[0]))):
                if not _has_empty_struct(type_) and _unifiable(group + [type_]):
                    group.append(type_)
            fields.append(pa.field(name, unify_types(group)))
            strict_found.append(name)
        else:
            fields.append(pa.field(name, pa.string()))
            json_columns.append(name)
    return SchemaPlan(pa.schema(fields), tuple(json_columns), tuple(strict_found), tuple(string_columns))


def _is_scalar(type_: pa.DataType) -> bool:
    return pat.is_string(type_) or pat.is_large_string(type_) or pat.is_integer(type_) or pat.is_floating(type_) \
        or pat.is_boolean(type_)


def to_plain_string(value: Any) -> str | None:
    """A scalar as text: strings unchanged, numbers and booleans as JSON writes them (7, 0.5, true)."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value) if isinstance(value, (bool, int, float)) else str(value)


def _has_empty_struct(type_: pa.DataType) -> bool:
    if pat.is_struct(type_):
        return type_.num_fields == 0 or any(_has_empty_struct(type_.field(i).type) for i in range(type_.num_fields))
    if pat.is_list(type_) or pat.is_large_list(type_) or pat.is_fixed_size_list(type_) or pat.is_list_view(type_) \
            or pat.is_large_list_view(type_):
        return _has_empty_struct(type_.value_type)
    if pat.is_map(type_):
        return _has_empty_struct(type_.key_type) or _has_empty_struct(type_.item_type)
    return False


def to_json_text(value: Any) -> str | None:
    """A value's JSON text (None stays None); non-JSON values (bytes, dates) as their string form."""
    if value is None:
        return None
    return json.dumps(value, ensure_ascii=False, sort_keys=False, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def conform_array(array: pa.Array | pa.ChunkedArray, type_: pa.DataType) -> pa.Array | pa.ChunkedArray:
    """`array` as `type_`: structs matched by field name (missing fields null), list flavours rebuilt, else cast."""
    if isinstance(array, pa.ChunkedArray):
        return pa.chunked_array([conform_array(chunk, type_) for chunk in array.chunks], type_)
    if array.type.equals(type_):
        return array  # never cast to the same type: pyarrow 26 corrupts list<null> that way
    if pat.is_null(array.type):
        return pa.nulls(len(array), type_)
    if pat.is_dictionary(array.type):
        return conform_array(array.dictionary_decode(), type_)
    if pat.is_struct(type_) and pat.is_struct(array.type):
        names = {array.type.field(i).name for i in range(array.type.num_fields)}
        children = []
        for i in range(type_.num_fields):
            f = type_.field(i)
            child = array.field(f.name) if f.name in names else pa.nulls(len(array), f.type)  # offset applied
            children.append(conform_array(child, f.type))
        return pa.StructArray.from_arrays(children, fields=list(type_), mask=array.is_null())
    if pat.is_list(type_) and (pat.is_list(array.type) or pat.is_large_list(array.type)
                               or pat.is_fixed_size_list(array.type)):
        if pat.is_fixed_size_list(array.type):
            array = array.cast(pa.list_(array.type.value_field))
        offsets = array.offsets
        start, stop = offsets[0].as_py(), offsets[-1].as_py()
        values = conform_array(array.values.slice(start, stop - start), type_.value_type)
        rebased = pc.subtract(offsets, pa.scalar(start, offsets.type)).cast(pa.int32())
        return pa.ListArray.from_arrays(rebased, values, type=type_, mask=array.is_null())
    return array.cast(type_)


def conform_table(table: pa.Table, schema: pa.Schema, json_columns: Iterable[str] = (),
                  string_columns: Iterable[str] = ()) -> pa.Table:
    """`table` with exactly `schema`'s columns: matched by name, conformed (see conform_array), missing ones null.

    Columns in `json_columns` are encoded as JSON text, every value (a string "a" becomes the text "\"a\"").
    """
    as_json, as_string = set(json_columns), set(string_columns)
    columns = []
    for f in schema:
        if f.name not in table.column_names:
            columns.append(pa.nulls(table.num_rows, f.type))
            continue
        column = table.column(f.name)
        if f.name in as_json:
            column = pa.array([to_json_text(v) for v in column.to_pylist()], pa.string())
        elif f.name in as_string:
            column = pa.array([to_plain_string(v) for v in column.to_pylist()], pa.string())
        columns.append(conform_array(column, f.type))
    return pa.Table.from_arrays(columns, schema=schema)


def union_schema(schemas: Iterable[pa.Schema]) -> SchemaPlan:
    """The plan for tables with these schemas (e.g. the shards of an older run): union of columns, one flavour;
    columns whose types cannot be unified become JSON text."""
    stats = TypeStats()
    for schema in schemas:
        stats.add_schema(schema, 1)
    return plan_schema(stats)


def with_metadata(schema: pa.Schema, metadata: Mapping[bytes, bytes] | None) -> pa.Schema:
    return schema.with_metadata(dict(metadata)) if metadata else schema


def one_output_schema(schemas: Iterable[pa.Schema]) -> list[pa.Schema]:
    """The union schema (`union_schema`) once per input schema: what each output shard is written with.

    Schema metadata is kept only when every input has the same (e.g. `datasets` features of one writer)."""
    schemas = list(schemas)
    plan = union_schema(schemas)
    metas = {tuple(sorted((s.metadata or {}).items())) for s in schemas}
    out = plan.schema.with_metadata(schemas[0].metadata) if len(metas) == 1 and schemas[0].metadata else plan.schema
    return [out] * len(schemas)


def append_fields(schema: pa.Schema, *fields: pa.Field) -> pa.Schema:
    """`schema` with `fields` appended (refine's keep / weight and per-turn list columns), keeping its metadata and
    updating a `datasets` feature list in it so HF readers see the new columns (bool, or float32 for the rest; a
    list field as a Sequence of them); an unreadable feature list is dropped."""
    meta = dict(schema.metadata or {})
    if b"huggingface" in meta:
        try:
            hf = json.loads(meta[b"huggingface"])
            feats = hf.get("info", {}).get("features")
            if isinstance(feats, dict):
                for field in fields:
                    inner = field.type.value_type if pa.types.is_list(field.type) else field.type
                    value = {"dtype": "bool" if inner == pa.bool_() else "float32", "_type": "Value"}
                    feats[field.name] = {"feature": value, "_type": "Sequence"} if inner is not field.type else value
                meta[b"huggingface"] = json.dumps(hf).encode()
        except ValueError:
            del meta[b"huggingface"]
    for field in fields:
        schema = schema.append(field)
    return schema.with_metadata(meta)
