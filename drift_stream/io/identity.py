"""What identifies an input beyond its URL, so that a resume never mixes two contents under one name: a file's size
and mtime (local) or content tag (object stores), and an IterableDataset's recipe fingerprint. Recorded in a run's
config.json (`inputs`) and compared on resume (io/run_dir.py, InputChangedError)."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Mapping

_CONTENT_TAGS = ("ETag", "etag", "md5Hash", "generation", "blob_id")  # s3 / http, gcs, hf: change with the content


def file_identity(info: Mapping[str, Any], local: bool) -> dict[str, Any]:
    """What tells a file from the same name with other content: its size, and its mtime in ns (local; taken by
    `os.stat`, as fsspec's float seconds lose the nanoseconds) or its store's content tag (S3 / HTTP `ETag`, GCS
    `md5Hash` / `generation`, the Hub's `blob_id`). Empty when the backend reports none of these."""
    identity: dict[str, Any] = {}
    if info.get("size") is not None:
        identity["size"] = int(info["size"])
    if local:
        with contextlib.suppress(OSError):
            identity["mtime_ns"] = os.stat(info["name"]).st_mtime_ns
        return identity
    tag = next((info[k] for k in _CONTENT_TAGS if info.get(k)), None)
    if tag is not None:
        identity["etag"] = str(tag).strip('"')
    return identity


def dataset_fingerprint(dataset: Any) -> str | None:
    """A hash of an IterableDataset's recipe, equal in every process for the same recipe: its shard count, features
    and the state of each step of its pipeline (`datasets`' Hasher of the source's config or data, the functions
    of `map` / `filter`, shuffle seeds). A step that cannot be hashed counts by its type. `datasets` 5 keeps no
    `_fingerprint` on IterableDataset, and hashing its first step whole is not stable across processes (the
    builder holds per-process state), so bound methods count by their name and their builder's config."""
    import inspect

    try:
        from datasets.fingerprint import Hasher
    except ImportError:  # pragma: no cover - datasets is a dependency
        return None

    def stable(value: Any) -> Any:
        if inspect.ismethod(value):
            owner = value.__self__
            return (value.__func__.__qualname__,
                    stable(owner.config) if hasattr(owner, "config") else type(owner).__qualname__)
        try:
            return Hasher.hash(value)
        except Exception:  # noqa: BLE001 - an unpicklable step: its type still counts
            return type(value).__qualname__

    parts: list[Any] = [int(dataset.n_shards), stable(dataset.features)]
    node = getattr(dataset, "_ex_iterable", None)
    while node is not None:
        state = {k: stable(v) for k, v in sorted(vars(node).items()) if k not in ("ex_iterable", "_state_dict")}
        parts.append((type(node).__qualname__, state))
        node = getattr(node, "ex_iterable", None)
    return Hasher.hash(parts)
