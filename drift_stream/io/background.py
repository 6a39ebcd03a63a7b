"""Background threads of the I/O layer, stopped and joined on every path (good runs, errors, Ctrl-C).

* `prefetch`: reads input chunks ahead on one thread per stream.
* `Publisher`: publishes finished files (their shards, then their marker) on one thread while the next file is
  scored: on an object store a file's commit is 3-4 round trips, as long as scoring ~50 short rows on a tiny model.
* `close_filesystems`: closes the S3 sessions and stops fsspec's event-loop thread (s3fs, gcsfs, http) before the
  interpreter shuts down; the CLI calls it on the way out.

Why: at interpreter shutdown, a thread still inside C++ code that calls back into Python (Arrow reading a parquet
file through a Python file object, for one) is killed in place, and the C++ runtime aborts the whole process with
"terminate called without an active exception" (SIGABRT, exit 134) after the run had finished.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import sys
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator

logger = logging.getLogger(__name__)


def prefetch(items: Iterable[Any], max_items: int) -> Iterator[Any]:
    """Iterate `items` on a background thread, at most `max_items` ahead (reading overlaps compute).

    Exceptions of the producer are re-raised in the consumer. Closing the generator (also on an error or Ctrl-C in
    the consumer) stops the producer after its current item, closes `items` (its files) and joins the thread.

    The thread is not a daemon, and it also stops when the main thread has ended: a daemon thread that is inside a
    parquet read when the interpreter shuts down (Arrow's C++ calling back into a Python file object) is killed
    there, and the C++ runtime aborts the process ("terminate called without an active exception", exit 134).
    """
    if max_items < 1:
        yield from items
        return
    buffer: queue.Queue = queue.Queue(maxsize=max_items)
    stop = threading.Event()
    done = object()
    main = threading.main_thread()

    def put(item: Any) -> bool:
        while not stop.is_set() and main.is_alive():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        iterator = iter(items)
        try:
            for item in iterator:
                if not put(("item", item)):
                    return
            put(("done", done))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put(("error", exc))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    close()  # runs the reader's finally blocks (open files) in this thread

    thread = threading.Thread(target=produce, name="drift-stream-prefetch", daemon=False)
    thread.start()
    try:
        while True:
            kind, item = buffer.get()
            if kind == "done":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        _join(thread)


class Publisher:
    """Runs `submit`ted calls on one background thread, in order, with at most `depth` waiting (each holds a finished
    file's open shards). `then(result)` runs on the caller's thread once its call is done. The first error is raised
    by the next `submit` or by `close`, which waits for every call (use it in a `finally`: a finished file is
    published even when the next one fails)."""

    def __init__(self, depth: int = 2) -> None:
        self.depth = max(1, depth)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="drift-stream-publish")
        self._pending: deque = deque()

    def submit(self, fn: Callable[..., Any], *args: Any, then: Callable[[Any], None] | None = None) -> None:
        while len(self._pending) >= self.depth:
            self._finish()
        self._pending.append((self._pool.submit(fn, *args), then))

    def _finish(self) -> None:
        future, then = self._pending.popleft()
        result = future.result()
        if then is not None:
            then(result)

    def close(self) -> None:
        try:
            while self._pending:
                self._finish()
        finally:
            self._pool.shutdown(wait=True)


def _join(thread: threading.Thread) -> None:
    """Join `thread`, however long its current read takes (a warning every 30 s says what we are waiting for)."""
    waited = 0.0
    while thread.is_alive():
        thread.join(timeout=1.0)
        waited += 1.0
        if thread.is_alive() and waited % 30 == 0:
            logger.warning("waiting %.0f s for the input reader to finish its current read", waited)


def close_filesystems(timeout_s: float = 10.0) -> None:
    """Close cached s3fs sessions and stop + join fsspec's event-loop thread. Call it when the process is done with
    remote storage (the CLI does, on every exit path); a later fsspec call starts a new loop."""
    asyn = sys.modules.get("fsspec.asyn")
    if asyn is None:
        return
    loop, thread = asyn.loop[0], asyn.iothread[0]
    if loop is None or thread is None or not thread.is_alive():
        return
    s3fs = sys.modules.get("s3fs")
    if s3fs is not None:
        for fs in list(s3fs.S3FileSystem._cache.values()):
            client = getattr(fs, "_s3", None)
            if client is not None and getattr(fs, "loop", None) is loop:
                with contextlib.suppress(Exception):
                    asyn.sync(loop, client.__aexit__, None, None, None, timeout=timeout_s)
                fs._s3 = None
        s3fs.S3FileSystem.clear_instance_cache()
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=timeout_s)
    if thread.is_alive():
        logger.debug("fsspec's event loop did not stop within %.0f s", timeout_s)
        return
    with contextlib.suppress(Exception):
        loop.close()
    asyn.loop[0] = None
    asyn.iothread[0] = None
