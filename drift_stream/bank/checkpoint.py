"""Checkpoints of `bank build` (per chunk of queries) and the crash hook of the SIGKILL resume tests.

`kill_point(stage, k)`: with DRIFT_STREAM_KILL_AT=STAGE:K in the environment, the process SIGKILLs itself right after
checkpoint K of STAGE ("bank": chunk K of queries saved; "refine": output shard K's marker written). The resume tests
(tests/test_resume_bank.py, tests/test_resume_refine.py) kill real builds at a chosen point this way; unset, it does
nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
from pathlib import Path

from drift_stream.errors import RunDirMismatchError
from drift_stream.io.atomic import write_bytes_atomic
from drift_stream.io.manifest import config_diff

logger = logging.getLogger(__name__)

KILL_ENV = "DRIFT_STREAM_KILL_AT"


def kill_point(stage: str, index: int) -> None:
    """SIGKILL this process if DRIFT_STREAM_KILL_AT is `stage:index` (module docstring)."""
    if os.environ.get(KILL_ENV) == f"{stage}:{index}":
        os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------------------------------- checkpoints

CHECKPOINT_DIR = "checkpoints"
RECORD_FILE = "build.json"


def _atomic_write(path: Path, data: bytes) -> None:
    from fsspec.implementations.local import LocalFileSystem

    write_bytes_atomic(LocalFileSystem(), str(path), data)


def queries_digest(queries) -> str:
    """sha256 of the queries a build uses (ids, prompts, references, answers): a resume must see the same ones."""
    body = [[q.id, list(q.messages), q.answer, q.reference, q.task] for q in queries]
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


class BankCheckpoints:
    """OUT/checkpoints/ of a bank build: the build's record and one checkpoint per chunk of queries.

        build.json               write-once: what the build is (config without execution-only fields, model,
                                 tokenizer, queries, verifier); a rerun with another is refused, printing both
        chunk-CCCCC.safetensors  signed vectors g_j [m_c, D] float64 of the chunk's queries that have one, and with
                                 save_rollout_vectors its rollouts' features [R_c, D] float32
        chunk-CCCCC.parquet      the chunk's rows of rollouts.parquet
        chunk-CCCCC.json         the marker, written last: manifest rows, counts, target pass rates, timings

    A chunk counts as done only when its marker exists; the directory is removed once the bank is written."""

    def __init__(self, out_dir: Path) -> None:
        self.root = Path(out_dir) / CHECKPOINT_DIR

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def check_record(self, record: dict, *, overwrite: bool) -> None:
        """Record `record` (first build) or compare it with the recorded one. Different: refused (RunDirMismatchError
        printing both), unless `overwrite`, which drops the old checkpoints and starts over."""
        record = json.loads(json.dumps(record, default=str))
        path = self.root / RECORD_FILE
        if path.is_file():
            recorded = json.loads(path.read_text())
            if recorded == record:
                return
            if not overwrite:
                diff = "\n".join(config_diff(recorded, record))
                raise RunDirMismatchError(
                    f"{self.root} holds the checkpoints of a bank build with other settings:\n{diff}\n"
                    f"recorded:\n{json.dumps(recorded, indent=2, sort_keys=True)}\n"
                    f"this build:\n{json.dumps(record, indent=2, sort_keys=True)}\n"
                    "rerun with the recorded settings to resume, pass --overwrite to start over, or choose another --out")
            logger.warning("dropping the checkpoints of a bank build with other settings in %s (--overwrite)", self.root)
            self.clear()
        self.root.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())

    def _path(self, index: int, suffix: str) -> Path:
        return self.root / f"chunk-{index:05d}.{suffix}"

    def done(self, index: int) -> bool:
        return self._path(index, "json").is_file()

    def save(self, index: int, marker: dict, vectors: dict, rollout_vectors, table_rows: list[dict]) -> None:
        """Checkpoint chunk `index`: tensors, rollout rows, then the marker (the chunk is done once it exists)."""
        import pyarrow as pa
        import pyarrow.parquet as pq
        import torch
        from safetensors.torch import save_file

        from drift_stream.bank.store import rollouts_schema

        ids = list(vectors)
        tensors = {"signed_vectors": torch.stack([vectors[q] for q in ids]) if ids
                   else torch.zeros(0, 0, dtype=torch.float64)}
        if rollout_vectors is not None:
            tensors["rollout_vectors"] = rollout_vectors.float().contiguous()
        tmp = self._path(index, "safetensors.tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, self._path(index, "safetensors"))
        tmp = self._path(index, "parquet.tmp")
        pq.write_table(pa.Table.from_pylist(table_rows, schema=rollouts_schema()), str(tmp))
        os.replace(tmp, self._path(index, "parquet"))
        marker = dict(marker, vector_ids=ids)
        _atomic_write(self._path(index, "json"), (json.dumps(marker, indent=1) + "\n").encode())

    def marker(self, index: int) -> dict:
        return json.loads(self._path(index, "json").read_text())

    def vectors(self, index: int, ids: list[str]) -> dict:
        """{query id: g_j [D] float64} of chunk `index`."""
        from safetensors.torch import load_file

        if not ids:
            return {}
        g = load_file(str(self._path(index, "safetensors")))["signed_vectors"]
        return {q: g[i] for i, q in enumerate(ids)}

    def rollout_vector_file(self, index: int) -> Path:
        return self._path(index, "safetensors")

    def table_file(self, index: int) -> Path:
        return self._path(index, "parquet")


# --------------------------------------------------------------------------------------------------- combined files
