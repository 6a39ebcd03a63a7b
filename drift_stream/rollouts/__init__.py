"""Rollouts of the model being refined (engine) and the verifiers that reward them.

Importing this package does not import torch; the engine imports it when it generates.
"""

from drift_stream.rollouts.engine import Query, Rollout, RolloutConfig, generate_rollouts, rollout_seed
from drift_stream.rollouts.verifiers import (
    Verifier,
    VerifierError,
    VerifyResult,
    extract_answer,
    load_verifier,
    run_verifier,
    verify_rollouts,
)

__all__ = [
    "Query",
    "Rollout",
    "RolloutConfig",
    "generate_rollouts",
    "rollout_seed",
    "Verifier",
    "VerifierError",
    "VerifyResult",
    "extract_answer",
    "load_verifier",
    "run_verifier",
    "verify_rollouts",
]
