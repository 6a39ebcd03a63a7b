"""Which config fields change a run's output and which only change how it executes.

A field made with `execution_only(...)` (batch size, device, threads, prefetch, rows or tokens per batch) changes
speed and memory, never a score or a row: the run directory records it but a resume does not compare it, so a rerun
with a smaller --batch-size after an out-of-memory crash is accepted (tests/test_config_defaults.py proves the scores
are identical). Every other field changes the output and is compared.
"""

from __future__ import annotations

import dataclasses
from typing import Any

EXECUTION_ONLY = "execution_only"


def execution_only(default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """`dataclasses.field(default=...)` marked as not changing the output (not compared on resume)."""
    metadata = {**kwargs.pop("metadata", {}), EXECUTION_ONLY: True}
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def is_execution_only(field: dataclasses.Field) -> bool:
    return bool(field.metadata.get(EXECUTION_ONLY, False))


def _split(obj: Any, want_execution: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            part = _split(value, want_execution)
            if part:
                out[f.name] = part
        elif is_execution_only(f) == want_execution:
            out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return out


def output_dict(config: Any) -> dict[str, Any]:
    """The fields of a config dataclass (nested ones recursed) that change the output: what a resume compares."""
    return _split(config, want_execution=False)


def execution_dict(config: Any) -> dict[str, Any]:
    """The execution-only fields of a config dataclass (nested ones recursed): recorded, never compared."""
    return _split(config, want_execution=True)
