"""pyarrow's own S3 client for the run directory's many small objects (data shards, completion markers).

Through s3fs each request is built and signed in Python, under the GIL, however many are in flight; Arrow's C++ client
does the same without the GIL, so one process reads many small objects at once.
"""

from __future__ import annotations

import os
from typing import Any

_ARROW_S3_OPTIONS = {"key", "secret", "token", "endpoint_url", "client_kwargs", "anon"}


def arrow_filesystem(fs: Any) -> Any:
    """pyarrow's own S3 client for an s3fs filesystem whose options map onto it (key, secret, token, endpoint,
    region), else `fs` itself. Arrow's client reads many small shards concurrently, without the GIL: scanning
    1,000 shards of a run through s3fs costs ~4 ms of round trips each, one after another."""
    options = dict(getattr(fs, "storage_options", None) or {})
    if type(fs).__module__.split(".")[0] != "s3fs" or set(options) - _ARROW_S3_OPTIONS:
        return fs
    client = dict(options.pop("client_kwargs", None) or {})
    if set(client) - {"endpoint_url", "region_name"}:
        return fs
    endpoint = options.get("endpoint_url") or client.get("endpoint_url")
    kwargs: dict[str, Any] = {"access_key": options.get("key"), "secret_key": options.get("secret"),
                              "session_token": options.get("token"), "anonymous": bool(options.get("anon")),
                              "region": client.get("region_name") or os.environ.get("AWS_DEFAULT_REGION")
                              or os.environ.get("AWS_REGION") or "us-east-1"}
    if endpoint:
        scheme, _, host = str(endpoint).partition("://")
        kwargs.update(scheme=scheme or "https", endpoint_override=host.rstrip("/") or scheme)
    try:
        from pyarrow.fs import S3FileSystem

        return S3FileSystem(**kwargs)
    except (ImportError, OSError, ValueError, TypeError):  # an Arrow build without S3, options it refuses
        return fs


READ_THREADS = 32  # small objects in flight at once


def read_objects(fs: Any, paths: list[str], threads: int = READ_THREADS) -> list[bytes | Exception]:
    """The bytes of each of `paths` (small objects of an object store), or the error reading it raised, in order.

    Through Arrow's S3 client from `threads` threads when `fs` maps onto it: 1,000 completion markers (~8 KiB each)
    of a local SeaweedFS in ~0.7 s, against ~1.1-1.4 s through s3fs `cat_ranges` (medians of 5 and 7 reads, in turn,
    on a loaded 2-core box). Else one fsspec `cat_ranges` call (not `cat`: no glob expansion of names like
    "runs/pool[v2]")."""
    arrow = arrow_filesystem(fs)
    if arrow is fs or len(paths) < 2:
        return fs.cat_ranges(paths, None, None, on_error="return")

    def read(path: str) -> bytes | Exception:
        try:
            with arrow.open_input_stream(path) as stream:
                return stream.read()
        except Exception as exc:  # noqa: BLE001 - returned, as cat_ranges returns it: the caller skips that object
            return exc

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(threads, len(paths))) as pool:
        return list(pool.map(read, paths))
