"""Files of a bank directory written without holding them in memory: a safetensors file assembled from tensors and
per-chunk files (rollout_vectors [R, D] streamed chunk by chunk), and a parquet file concatenated from chunk files.
bank/store.py's write_bank uses both, for the whole bank and for the chunks bank/checkpoint.py saved."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

_DTYPES = {"float32": "F32", "float64": "F64", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
           "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
_SIZES = {"F32": 4, "F64": 8, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def write_safetensors(path: Path, tensors: dict, streamed: dict[str, tuple[list[Path], str]] | None = None) -> None:
    """A safetensors file of `tensors` plus tensors concatenated (dim 0) from chunk files, each read one at a time:
    streamed = {name: (chunk safetensors files holding `key`, key)}. Memory: the in-memory tensors and one chunk.
    Tensors are laid out by name; the header is padded to 8 bytes (as the safetensors library writes it)."""
    import torch
    from safetensors import safe_open

    def spec_of(files: list[Path], key: str) -> tuple[str, list[int]]:
        rows, dims, dtype = 0, None, None
        for f in files:
            with safe_open(str(f), "pt") as h:
                if key not in h.keys():
                    continue
                s = h.get_slice(key)
                shape = s.get_shape()
                if shape[0] or dims is None:  # a chunk without rollouts is [0, 0]
                    dims, dtype = shape[1:], s.get_dtype()
                rows += shape[0]
        return dtype or "F32", [rows, *(dims if dims is not None else [0])]

    streamed = streamed or {}
    entries, offset = {}, 0
    layout = {}
    for name in sorted([*tensors, *streamed]):
        if name in tensors:
            t = tensors[name].contiguous()
            dtype, shape = _DTYPES[str(t.dtype).replace("torch.", "")], list(t.shape)
            size = t.numel() * t.element_size()
        else:
            dtype, shape = spec_of(*streamed[name])
            size = math.prod(shape) * _SIZES[dtype]
        entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        layout[name] = size
        offset += size
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for name in sorted(layout):
            if name in tensors:
                t = tensors[name].contiguous()
                f.write(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
                continue
            files, key = streamed[name]
            for chunk in files:
                with safe_open(str(chunk), "pt") as h:
                    if key in h.keys():
                        part = h.get_tensor(key).contiguous()
                        if part.numel():
                            f.write(part.view(torch.uint8).numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def concat_parquet(path: Path, files: list[Path], schema) -> None:
    """One parquet file of the chunk files' rows in order, a row group per chunk (one chunk in memory)."""
    import pyarrow.parquet as pq

    tmp = path.with_name(f".{path.name}.tmp")
    with pq.ParquetWriter(str(tmp), schema) as writer:
        for f in files:
            table = pq.read_table(str(f), schema=schema)
            if table.num_rows:
                writer.write_table(table)
    os.replace(tmp, path)
