"""BankConfig: what `drift-stream bank build` does (signing, targets, preconditioner, rollouts, contrast options),
validated on construction; and the warning for rollouts cut by max_new_tokens (`bank build` / `bank info`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from drift_stream.bank.contrast import NO_CONTRAST, QUERY_WEIGHTINGS
from drift_stream.errors import ConfigError
from drift_stream.grads.projection import FeatureConfig
from drift_stream.io.config_fields import execution_only
from drift_stream.model.batching import validate_max_batch_tokens
from drift_stream.rollouts.engine import RolloutConfig

SIGNINGS = ("sign", "advantage", "advantage_std", "positive")
TRUNCATED = ("negative", "exclude")  # what a rollout cut by max_new_tokens counts as
TARGETS = ("on-policy", "off-policy")
PRECONDITIONERS = ("identity", "diagonal", "block")


@dataclass(frozen=True)
class BankConfig:
    signing: str = "sign"  # --signing
    targets: str = "on-policy"  # --targets
    preconditioner: str = "block"  # --preconditioner; identity is used when no fisher_data is given
    damping: float = 0.1  # --damping: lambda = damping x mean eigenvalue
    normalize: bool = True  # unit-norm b_j
    correct_threshold: float = 1.0  # a rollout is correct when reward >= this
    fisher_examples: int = 1000  # --fisher-examples: rows of fisher_data used
    rollouts: RolloutConfig = field(default_factory=RolloutConfig)  # --rollouts K -> rollouts.num_rollouts
    features: FeatureConfig = field(default_factory=FeatureConfig)
    feature_batch_size: int = execution_only(8)  # examples per featurize call: speed and memory only
    max_tokens: int = 2048  # prompt + completion tokens per featurized sequence
    verifier_timeout_s: float | None = 10.0
    save_rollout_vectors: bool = False
    no_contrast: str = "keep"  # --no-contrast keep | drop | reference (bank/contrast.py)
    max_rollouts: int | None = None  # --max-rollouts: adaptive K budget per query (None: off)
    query_weighting: str = "uniform"  # --query-weighting uniform | learnability
    # --truncated: a rollout cut by max_new_tokens is signed like a finished wrong answer (negative: what an
    # evaluation at the same budget counts, and today's behaviour) or left out of the query's vector (exclude)
    truncated: str = "negative"
    chat_template: str | None = None  # --chat-template FILE: a Jinja template replacing the tokenizer's
    use_chat_template: bool = True  # --no-chat-template: the documented plain format
    stop_tokens: tuple[str, ...] = ()  # --stop-token (repeatable): more tokens that end rollouts
    # --max-batch-tokens: padded tokens per featurize call (rows sorted by length) instead of feature_batch_size rows
    max_batch_tokens: int | None = execution_only(None)
    # queries per checkpoint: rollouts, verification and features of that many queries are done and saved together
    # (OUT/checkpoints/), so a killed build resumes from its last saved chunk and holds the features of one chunk's
    # rollouts only. Compared on resume: the chunks set the feature batches (float bits)
    checkpoint_queries: int = 64

    def __post_init__(self):
        for name, value, allowed in (("signing", self.signing, SIGNINGS), ("targets", self.targets, TARGETS),
                                     ("preconditioner", self.preconditioner, PRECONDITIONERS)):
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {value!r}")
        if not (isinstance(self.damping, (int, float)) and self.damping >= 0):
            raise ConfigError(f"damping must be a number >= 0, got {self.damping!r}")
        if not 0.0 < self.correct_threshold <= 1.0:
            raise ConfigError(f"correct_threshold must be in (0, 1], got {self.correct_threshold}")
        for name in ("fisher_examples", "feature_batch_size", "max_tokens", "checkpoint_queries"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        validate_max_batch_tokens(self.max_batch_tokens)
        if self.verifier_timeout_s is not None and not self.verifier_timeout_s > 0:
            raise ConfigError(f"verifier_timeout_s must be > 0 or None, got {self.verifier_timeout_s}")
        if self.truncated not in TRUNCATED:
            raise ConfigError(f"truncated must be one of {TRUNCATED}, got {self.truncated!r}")
        if not all(isinstance(t, str) and t for t in self.stop_tokens):
            raise ConfigError(f"stop_tokens must be non-empty strings, got {self.stop_tokens!r}")
        object.__setattr__(self, "stop_tokens", tuple(self.stop_tokens))
        for name, value, allowed in (("no_contrast", self.no_contrast, NO_CONTRAST),
                                     ("query_weighting", self.query_weighting, QUERY_WEIGHTINGS)):
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {value!r}")
        if self.max_rollouts is not None and (not isinstance(self.max_rollouts, int)
                                              or self.max_rollouts <= self.rollouts.num_rollouts):
            raise ConfigError(f"max_rollouts (adaptive K) must be an int > rollouts ({self.rollouts.num_rollouts}) "
                              f"or None, got {self.max_rollouts!r}")
        if self.targets == "off-policy" and (self.no_contrast != "keep" or self.max_rollouts is not None
                                             or self.query_weighting != "uniform"):
            raise ConfigError("no_contrast, max_rollouts and query_weighting need rollouts: use them with "
                              "targets on-policy")

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("rollouts", "features")}
        out["rollouts"] = {k: getattr(self.rollouts, k) for k in self.rollouts.__dataclass_fields__}
        out["features"] = self.features.to_dict()
        return out


TRUNCATION_WARN_SHARE = 0.2  # warn when at least this share of rollouts was cut by max_new_tokens


def truncated_share(truncation: Mapping[str, Any] | None) -> float:
    return truncation["truncated"] / truncation["rollouts"] if truncation and truncation["rollouts"] else 0.0


def truncation_warning(truncation: Mapping[str, Any]) -> str:
    """The `bank build` / `bank info` warning when many rollouts were cut by max_new_tokens."""
    return (f"{truncation['truncated']} of {truncation['rollouts']} rollouts ({100 * truncated_share(truncation):.0f}%) "
            f"were cut by --max-new-tokens {truncation['max_new_tokens']} before their end-of-turn token and count "
            f"as {'wrong answers' if truncation['policy'] == 'negative' else 'left out (--truncated exclude)'}: "
            "reasoning models need thousands of tokens; raise --max-new-tokens"
            + (" or pass --truncated exclude" if truncation["policy"] == "negative" else ""))

