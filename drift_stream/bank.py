"""The on-policy validation bank: rollouts -> verifier -> signed query gradients -> preconditioner -> bank directory.

For query j with rollouts k = 1..K_j that verified and featurized cleanly (K_j <= K; failed ones are counted in the
manifest, never used): g_j = (1/K_j) sum_k s_jk u(tau_jk), with s_jk from the signing:
  sign          +1 if r_jk >= correct_threshold else -1
  advantage     r_jk - mean_k r_jk
  advantage_std (r_jk - mean_k r_jk) / std_k r_jk    (population std)
  positive      1 if correct else 0
Then b_j = H^-1 g_j (preconditioner fitted on `fisher_data`, identity when none), scaled to unit norm by default.
Off-policy targets: g_j = u(reference answer of q_j), no rollouts. Queries with no signal (no valid rollouts,
equal rewards under advantage, no correct rollout under positive, a zero vector) are listed in the manifest with a
reason and left out of the vectors, with a warning.

Bank directory (fixed names): bank.safetensors, manifest.json (schemas/bank_manifest.schema.json), rollouts.parquet.
Proximity gap per query: reference_loss - rollout_loss (token-weighted mean NLL of its rollouts); overall: the mean
over queries that have both.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from drift_stream.errors import BankError, ConfigError
from drift_stream.grads.projection import FeatureConfig
from drift_stream.rollouts.engine import Query, Rollout, RolloutConfig, generate_rollouts, resolve_backend

# Re-exported: the bank's fingerprints and loader live in bank_io-style helpers below this module's build code.
from drift_stream.bank_store import (  # noqa: F401
    BANK_FILES,
    BANK_FORMAT_VERSION,
    ValidationBank,
    fingerprint_model,
    fingerprint_projector,
    fingerprint_tokenizer,
    write_bank,
)

logger = logging.getLogger(__name__)

SIGNINGS = ("sign", "advantage", "advantage_std", "positive")
TARGETS = ("on-policy", "off-policy")
PRECONDITIONERS = ("identity", "diagonal", "block")
