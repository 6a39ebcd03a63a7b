"""Verifiers in worker processes with a hard timeout: a call past `timeout_s` has its process killed.

A thread cannot be stopped: a backtracking `regex:` pattern or a CPU-bound `math` check held the GIL in a worker
thread for 13.4 s after its 0.5 s timeout (issue 17), and abandoned threads piled up. Here each call runs in one of
`workers` processes; a call that runs past its deadline is answered `timeout:Xs`, its process is killed (SIGKILL) and
replaced, and the other rollouts go on, in parallel. No thread is started.

Processes are forked where the platform allows (Linux): the child inherits the verifier as it is (closures, user
modules, loaded reasoning-gym datasets) without pickling, and starts in milliseconds; it only ever runs `score`.
Elsewhere they are spawned, which needs a picklable verifier; one that is not runs in this process, without a hard
timeout (logged).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import time
from collections import deque
from multiprocessing.connection import wait
from typing import Any, Callable, Sequence

logger = logging.getLogger(__name__)

_READY = "ready"
DEFAULT_MAX_WORKERS = 4  # verifiers are cheap; more processes mostly cost memory while the model is resident


def default_workers(num_items: int) -> int:
    """min(4, CPUs, items), at least 1."""
    return max(1, min(DEFAULT_MAX_WORKERS, os.cpu_count() or 1, num_items))


def _context():
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def _worker_main(conn, run_one: Callable[[Any, str, Any], Any], verifier: Any) -> None:
    """Child process: answer (index, completion, query) with (index, result) until the pipe closes."""
    conn.send(_READY)
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        index, completion, query = task
        conn.send((index, run_one(verifier, completion, query)))


class _Worker:
    def __init__(self, ctx, run_one, verifier) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child, run_one, verifier), daemon=True,
                                   name="drift-verifier")
        self.process.start()
        child.close()
        self.ready = False
        self.task: int | None = None  # index of the rollout it is verifying
        self.deadline = float("inf")

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.process.join(timeout=1.0)
        self.kill()


def run_in_processes(run_one: Callable[[Any, str, Any], Any], verifier: Any, items: Sequence[tuple[str, Any]],
                     timeout_s: float | None, workers: int, on_timeout: Callable[[int], Any],
                     on_death: Callable[[int, int | None], Any], progress: Callable[[int], None] | None = None,
                     ) -> list[Any]:
    """`run_one(verifier, completion, query)` for every item on `workers` processes, results in item order.

    A call running past `timeout_s` seconds (None: no limit) gets `on_timeout(index)` and its process is killed; a
    process that dies mid-call gets `on_death(index, exitcode)`. Every process is gone when this returns.
    """
    ctx = _context()
    if ctx.get_start_method() != "fork":
        try:
            pickle.dumps(verifier)
        except Exception as exc:  # noqa: BLE001 - any pickling failure means: not transferable
            logger.warning("verifier %r cannot be sent to a worker process (%s): verifying in this process, without "
                           "a hard timeout", verifier, exc)
            return [run_one(verifier, c, q) for c, q in items]
    results: list[Any] = [None] * len(items)
    todo = deque(range(len(items)))
    pool = [_Worker(ctx, run_one, verifier) for _ in range(max(1, min(workers, len(items))))]
    done = failed_starts = 0
    try:
        while done < len(items):
            for worker in pool:
                if worker.ready and worker.task is None and todo:
                    index = todo.popleft()
                    completion, query = items[index]
                    worker.conn.send((index, completion, query))
                    worker.task = index
                    worker.deadline = time.monotonic() + timeout_s if timeout_s else float("inf")
            deadline = min(w.deadline for w in pool)
            wait_s = None if deadline == float("inf") else max(0.0, deadline - time.monotonic())
            for conn in wait([w.conn for w in pool], timeout=wait_s):
                worker = next(w for w in pool if w is not None and w.conn is conn)
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    message = None
                if message == _READY:
                    worker.ready = True
                    continue
                if message is None:  # the process died (os._exit, a segfault in a C extension, out of memory)
                    if not worker.ready:
                        failed_starts += 1
                        if failed_starts > 3:
                            raise RuntimeError(f"verifier worker processes die on start (exit code "
                                               f"{worker.process.exitcode}): cannot verify rollouts")
                    if worker.task is not None:
                        worker.process.join()
                        results[worker.task] = on_death(worker.task, worker.process.exitcode)
                        done += 1
                    pool[pool.index(worker)] = _replace(worker, ctx, run_one, verifier, bool(todo))
                    continue
                index, result = message
                results[index] = result
                worker.task, worker.deadline = None, float("inf")
                done += 1
                if progress is not None:
                    progress(1)
            now = time.monotonic()
            for i, worker in enumerate(pool):
                if worker is not None and worker.task is not None and worker.deadline <= now:
                    results[worker.task] = on_timeout(worker.task)
                    done += 1
                    if progress is not None:
                        progress(1)
                    pool[i] = _replace(worker, ctx, run_one, verifier, bool(todo))
            pool = [w for w in pool if w is not None]
    finally:
        for worker in pool:
            worker.stop()
    return results


def _replace(worker: _Worker, ctx, run_one, verifier, needed: bool) -> _Worker | None:
    """Kill `worker`; a fresh one when rollouts are still waiting, else None (removed from the pool)."""
    worker.kill()
    return _Worker(ctx, run_one, verifier) if needed else None
