"""Background threads of the I/O layer, stopped and joined on every path (good runs, errors, Ctrl-C).

* `prefetch`: reads input chunks ahead on one thread per stream.
* `Publisher`: publishes finished files (their shards, then their marker) on one thread while the next file is
  scored: on an object store a file's commit is 3-4 round trips, as long as scoring ~50 short rows on a tiny model.
* `WorkerProcesses`: calls a function in worker processes (tokenization off this process's GIL), results as
  futures in submission order; the workers ignore Ctrl-C (the parent stops them) and exit when the parent dies.
* `close_filesystems`: closes the S3 sessions and stops fsspec's event-loop thread (s3fs, gcsfs, http) before the
  interpreter shuts down; the CLI calls it on the way out.

Why: at interpreter shutdown, a thread still inside C++ code that calls back into Python (Arrow reading a parquet
file through a Python file object, for one) is killed in place, and the C++ runtime aborts the whole process with
"terminate called without an active exception" (SIGABRT, exit 134) after the run had finished.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import queue
import signal
import sys
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
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


class WorkerProcesses:
    """`submit(fn, *args)` runs `fn(state, *args)` in one of `workers` worker processes and returns its Future;
    `state` (a picklable object, e.g. a tokenizer) is sent once per worker. `fn` and the arguments must pickle
    (module-level functions; pass bytes, numpy arrays or Arrow IPC buffers rather than many small Python objects).
    Calls go to the workers in turn and each worker answers in order, so futures complete in submission order.

    Each worker is a fresh interpreter (`python -c`, this process's sys.path): not forked, because this process holds
    torch, the prefetch and fsspec threads and open sockets, none of which a forked child may use; not
    multiprocessing's spawn, which re-runs the caller's main script in the child (a script without an
    `if __name__ == "__main__":` guard would score its input again there). A worker ignores SIGINT (Ctrl-C reaches
    the whole process group; the parent's `close` stops it) and exits when its parent is gone (SIGKILL, SIGTERM:
    its end of the socket closes), so no worker outlives the run. `close()` (call it in a `finally`) stops and
    reaps every worker (killed when it still owes answers: those futures fail with WorkerDiedError).
    """

    def __init__(self, state: Any, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        payload = pickle.dumps(state)
        self._workers: list[_Worker] = []
        try:
            for _ in range(workers):
                self._workers.append(_Worker(payload))
        except BaseException:
            self.close()
            raise
        self._turn = 0

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        worker = self._workers[self._turn % len(self._workers)]
        self._turn += 1
        return worker.submit(fn, args)

    def close(self) -> None:
        for worker in self._workers:
            worker.close()


class WorkerDiedError(RuntimeError):
    """A worker process ended before answering (killed, out of memory, or it could not start)."""


class _Worker:
    """One worker process, its socket, and a thread that reads its answers into the pending futures (in order)."""

    def __init__(self, state: bytes) -> None:
        import socket
        import subprocess
        from multiprocessing.connection import Connection

        ours, theirs = socket.socketpair()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        env.setdefault("TOKENIZERS_PARALLELISM", "false")  # one call per row: Rust threads only add contention
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", f"from {__name__} import _worker_main; _worker_main({theirs.fileno()})"],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env)
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        self._pending: deque[Future] = deque()
        self._lock = threading.Lock()  # the pending futures (the reader pops them)
        self._send_lock = threading.Lock()  # one call on the socket at a time, in the order of `_pending`
        try:
            self.conn.send_bytes(state)
        except OSError:
            self.process.kill()
            self.process.wait()
            self.conn.close()
            raise
        self._reader = threading.Thread(target=self._read, name="drift-stream-worker-reader", daemon=True)
        self._reader.start()

    def submit(self, fn: Callable[..., Any], args: tuple) -> Future:
        future: Future = Future()
        with self._send_lock:  # not `_lock`: the reader must keep draining answers while a send blocks
            with self._lock:
                self._pending.append(future)
            try:
                self.conn.send((fn, args))
            except OSError:  # the worker is gone: the reader fails every pending future when it sees the EOF
                pass
        return future

    def _read(self) -> None:
        while True:
            try:
                data = self.conn.recv_bytes()
            except (EOFError, OSError):
                code = self.process.wait()
                self._fail(WorkerDiedError(f"worker process {self.process.pid} ended (exit {code}) before answering"))
                return
            try:
                ok, value = pickle.loads(data)
            except Exception as exc:  # noqa: BLE001 - e.g. an exception class that cannot be rebuilt here
                ok, value = False, RuntimeError(f"the worker's answer could not be read: {type(exc).__name__}: {exc}")
            with self._lock:
                future = self._pending.popleft()
            if future.set_running_or_notify_cancel():
                (future.set_result if ok else future.set_exception)(value)

    def _fail(self, error: BaseException) -> None:
        with self._lock:
            pending, self._pending = list(self._pending), deque()
        for future in pending:
            if future.set_running_or_notify_cancel():
                future.set_exception(error)

    def close(self) -> None:
        with self._lock:
            owed = bool(self._pending)
        if owed:
            self.process.kill()  # answers still owed: nobody will read them
        else:
            with contextlib.suppress(OSError):
                self.conn.send(None)
        self.process.wait()
        self._reader.join()  # it saw the EOF and failed what was pending
        self.conn.close()


def _worker_main(fd: int) -> None:
    """A worker process: read the state, then answer (fn, args) calls in order until None or the parent is gone."""
    from multiprocessing.connection import Connection

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(fd)
    try:
        state = pickle.loads(conn.recv_bytes())
        while (call := conn.recv()) is not None:
            fn, args = call
            try:
                answer = (True, fn(state, *args))
            except Exception as exc:  # noqa: BLE001 - handed to the caller, which re-raises it
                answer = (False, exc)
            try:
                conn.send(answer)
            except (pickle.PicklingError, TypeError, AttributeError) as exc:  # an exception that does not pickle
                conn.send((False, RuntimeError(f"{type(answer[1]).__name__}: {answer[1]} ({exc})")))
    except (EOFError, OSError):  # the parent is gone
        pass


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
