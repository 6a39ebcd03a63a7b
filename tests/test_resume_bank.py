"""A `bank build` killed with SIGKILL after a chunk of queries resumes to the bank an uninterrupted build writes:
bank.safetensors and rollouts.parquet byte for byte, the manifest equal but for its timings and creation time.

Real subprocesses, a real tiny model, real rollouts, verifier processes and a real SIGKILL: the child builds with
DRIFT_STREAM_KILL_AT=bank:K, which kills it right after chunk K's checkpoint (bank/checkpoint.py `kill_point`).
Both builds run in children with one torch thread, so their float reductions match.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_bank import FEATURES, GRADED, ROLLOUTS, gsm_rows

from drift_stream.bank.build import build_bank
from drift_stream.bank.config import BankConfig
from drift_stream.embedded.tiny_models import save_tiny_model
from drift_stream.errors import RunDirMismatchError

TESTS = Path(__file__).resolve().parent
CHILD = """
import logging, sys, torch
torch.set_num_threads(1)
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from test_bank import FEATURES, GRADED, ROLLOUTS, gsm_rows
from drift_stream.bank.build import build_bank
from drift_stream.bank.config import BankConfig
config = BankConfig(features=FEATURES, rollouts=ROLLOUTS, save_rollout_vectors=True, checkpoint_queries=2,
                    preconditioner="block")
fisher = [{"messages": [{"role": "user", "content": f"add {i} and {i}"},
                        {"role": "assistant", "content": f"{2 * i}"}]} for i in range(8)]
build_bank(sys.argv[1], gsm_rows(7), sys.argv[2], config, verifier=GRADED, fisher_data=fisher, progress=False)
"""


def build_child(model_dir: str, out: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS)]))
    env.pop("DRIFT_STREAM_KILL_AT", None)
    if kill_at:
        env["DRIFT_STREAM_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-c", CHILD, model_dir, str(out)], env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("resume_bank_model"), arch="llama", seed=1)


def test_sigkilled_bank_build_resumes_to_the_uninterrupted_bank(model_dir, tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    done = build_child(model_dir, whole)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in whole.iterdir()) == ["bank.safetensors", "manifest.json", "rollouts.parquet"]

    killed = build_child(model_dir, part, kill_at="bank:1")  # 7 queries in chunks of 2: killed after the 2nd
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (part / "manifest.json").exists()
    assert sorted(p.name for p in (part / "checkpoints").glob("chunk-*.json")) == ["chunk-00000.json",
                                                                                   "chunk-00001.json"]
    resumed = build_child(model_dir, part)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    restored = [line for line in resumed.stderr.splitlines() if "restored from" in line]
    assert len(restored) == 2 and "chunk 1 of 4" in restored[0] and "chunk 2 of 4" in restored[1]
    assert not (part / "checkpoints").exists()  # removed once the bank is written

    for name in ("bank.safetensors", "rollouts.parquet"):
        assert (part / name).read_bytes() == (whole / name).read_bytes(), name
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (part, whole))
    for m in (a, b):
        m.pop("created_at"), m.pop("timings_s")
    assert a == b
    tensors = load_file(str(whole / "bank.safetensors"))
    rollouts = b["truncation"]["rollouts"]
    assert rollouts == 7 * ROLLOUTS.num_rollouts and tensors["rollout_vectors"].shape == (rollouts, b["dim"])
    assert torch.count_nonzero(tensors["rollout_vectors"].abs().sum(1)) > 0
    assert b["preconditioner"]["kind"] == "block" and b["preconditioner"]["examples_used"] == 8


def test_killed_bank_build_with_other_settings_is_refused(model_dir, tmp_path):
    out = tmp_path / "part"
    assert build_child(model_dir, out, kill_at="bank:0").returncode == -signal.SIGKILL
    other = BankConfig(features=FEATURES, rollouts=ROLLOUTS, save_rollout_vectors=True, checkpoint_queries=2,
                       preconditioner="block", signing="advantage")
    with pytest.raises(RunDirMismatchError, match=r"(?s)config.signing: \"sign\" -> \"advantage\".*recorded:.*this build:"):
        build_bank(model_dir, gsm_rows(7), out, other, verifier=GRADED, progress=False)
    with pytest.raises(RunDirMismatchError, match="queries"):  # other queries
        build_bank(model_dir, gsm_rows(5), out, BankConfig(features=FEATURES, rollouts=ROLLOUTS,
                   save_rollout_vectors=True, checkpoint_queries=2, preconditioner="block"), verifier=GRADED,
                   progress=False)
    assert (out / "checkpoints" / "chunk-00000.json").is_file()  # refused: nothing dropped
