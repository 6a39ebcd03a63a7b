"""The validation bank room: config.py (BankConfig), build.py (build_bank: rollouts -> verifier -> signed query
gradients -> preconditioner -> bank directory), targets.py (the per-query vectors g_j and signing), store.py (the bank
directory on disk: write_bank, ValidationBank, fingerprints) and contrast.py (queries without a contrast, query
weighting).

`from drift_stream.bank import X` keeps working for every name the former module drift_stream/bank.py exported.
"""

from drift_stream.bank.build import build_bank
from drift_stream.bank.config import (
    PRECONDITIONERS,
    SIGNINGS,
    TARGETS,
    TRUNCATED,
    TRUNCATION_WARN_SHARE,
    BankConfig,
    truncated_share,
    truncation_warning,
)
from drift_stream.bank.store import (
    BANK_FORMAT_VERSION,
    MANIFEST_FILE,
    ROLLOUTS_FILE,
    TENSORS_FILE,
    ValidationBank,
    fingerprint_model,
    fingerprint_projector,
    fingerprint_tokenizer,
    write_bank,
)
from drift_stream.bank.targets import signed_weights
from drift_stream.rollouts.engine import Query, load_queries

__all__ = [
    "BANK_FORMAT_VERSION", "MANIFEST_FILE", "PRECONDITIONERS", "ROLLOUTS_FILE", "SIGNINGS", "TARGETS", "TENSORS_FILE",
    "TRUNCATED", "TRUNCATION_WARN_SHARE", "BankConfig", "Query", "ValidationBank", "build_bank", "fingerprint_model",
    "fingerprint_projector", "fingerprint_tokenizer", "load_queries", "signed_weights", "truncated_share",
    "truncation_warning", "write_bank",
]
