"""Checkpoints of `bank build` (per chunk of queries) and the crash hook of the SIGKILL resume tests.

`kill_point(stage, k)`: with DRIFT_STREAM_KILL_AT=STAGE:K in the environment, the process SIGKILLs itself right after
checkpoint K of STAGE ("bank": chunk K of queries saved; "refine": output shard K's marker written). The resume tests
(tests/test_resume_bank.py, tests/test_resume_refine.py) kill real builds at a chosen point this way; unset, it does
nothing.
"""

from __future__ import annotations

import os
import signal

KILL_ENV = "DRIFT_STREAM_KILL_AT"


def kill_point(stage: str, index: int) -> None:
    """SIGKILL this process if DRIFT_STREAM_KILL_AT is `stage:index` (module docstring)."""
    if os.environ.get(KILL_ENV) == f"{stage}:{index}":
        os.kill(os.getpid(), signal.SIGKILL)
