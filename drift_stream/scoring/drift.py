"""DRIFT and its off-policy baselines (less: beta 1, if: beta 0) on one machinery: mean over the bank's queries of
<b_j, u(z)> / ||u(z)||^beta; fit_beta (beta auto) and the debiasing statistics the run manifest records.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from drift_stream.errors import ConfigError
from drift_stream.model.batching import PaddingStats
from drift_stream.scoring.base import (
    ExampleScores,
    ScoreConfig,
    _ModelScorer,
    _to_table,
    chat_tokenizer_for,
)
from drift_stream.scoring.stats import spearman
from drift_stream.scoring.turns import max_turns, per_example, turn_index_batch

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Gradient scorers: DRIFT and its off-policy baselines on the same machinery.


def fit_beta(mean_raw: np.ndarray, grad_norm: np.ndarray) -> float:
    """The beta that makes log|S| uncorrelated with log||u|| on a calibration sample.

    With S = R / ||u||^beta, log|S| = log|R| - beta * log||u||, so the zero-correlation beta is the least-squares slope
    of log|R| on log||u||.   mean_raw: [n], grad_norm: [n]
    """
    keep = np.isfinite(mean_raw) & np.isfinite(grad_norm) & (np.abs(mean_raw) > 0) & (grad_norm > 0)
    if keep.sum() < 8:
        raise ConfigError(
            f"beta: auto needs at least 8 scorable calibration rows, got {int(keep.sum())}: "
            "raise --calibration-rows or pass a number for --beta"
        )
    log_r = np.log(np.abs(mean_raw[keep]))
    log_n = np.log(grad_norm[keep])
    var = np.var(log_n)
    if var <= 0:
        return 1.0
    return float(np.mean((log_r - log_r.mean()) * (log_n - log_n.mean())) / var)


def weighted_query_mean(per_query: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """S [n] = sum_j w_j per_query[:, j] / sum_j w_j for per_query [n, m]; the plain mean when weights is None."""
    if weights is None:
        return per_query.mean(axis=1)
    w = np.asarray(weights, dtype=np.float64)
    return per_query @ w / w.sum()


class DriftScorer(_ModelScorer):
    """DRIFT: mean over validation queries of <b_j, u(z)> / ||u(z)||^beta, with b_j from an on-policy bank.

    `less` and `if` are the same machinery on an off-policy bank with beta fixed to 1 and 0.
    """

    name = "drift"

    def __init__(self, adapter, chat_tokenizer, config, bank, model_path=None, model=None, allow_mismatch=False):
        if config.scorer in ("less", "if") and bank.targets != "off-policy":
            raise ConfigError(
                f"scorer {config.scorer!r} is the off-policy baseline but the bank at {bank.path} was built with "
                f"on-policy targets: build one with `drift-stream bank build --targets off-policy`"
            )
        if config.scorer == "less":
            config = _replace(config, beta=1.0)
        elif config.scorer == "if":
            config = _replace(config, beta=0.0)
        super().__init__(adapter, chat_tokenizer, config, model_path, model)
        self.name = config.scorer
        self.bank = bank
        self.allow_mismatch = allow_mismatch
        self._beta: float | None = None if config.beta == "auto" else float(config.beta)
        self._debias: dict = {}
        self._checked = False

    @classmethod
    def from_pretrained(
        cls,
        model_path: str,
        bank: str,
        adapter: str = "messages",
        *,
        allow_mismatch: bool = False,
        **config: Any,
    ) -> "DriftScorer":
        """Build a scorer from paths: `DriftScorer.from_pretrained("model_dir", bank="bank_dir", adapter="messages")`."""
        from drift_stream.bank.store import ValidationBank
        from drift_stream.data.formats import load_adapter
        from drift_stream.model.loading import load_tokenizer

        cfg = ScoreConfig(scorer=config.pop("scorer", "drift"), adapter=adapter, **config)
        tokenizer = load_tokenizer(model_path)
        chat = chat_tokenizer_for(tokenizer, cfg)
        vb = ValidationBank.load(bank)
        return cls(load_adapter(adapter), chat, cfg, vb, model_path=model_path, allow_mismatch=allow_mismatch)

    # -- features ---------------------------------------------------------------------------------------------
    @property
    def featurizer(self):
        if self._featurizer is None:
            from drift_stream.grads.features import GradientFeaturizer

            model = self.model
            self._featurizer = GradientFeaturizer(model, self.bank.feature_config)
            if not self._checked:
                self.bank.check_compatible(
                    model=model, tokenizer=self._tokenizer_to_check(), featurizer=self._featurizer,
                    chat_tokenizer=self.chat, allow_mismatch=self.allow_mismatch,
                )
                self._checked = True
        return self._featurizer

    def _tokenizer_to_check(self):
        """The tokenizer compared with the bank's: this one, or, when --chat-template gave a tokenizer that has no
        template of its own the template it lacked, that tokenizer carrying it (a bank built from the model whose
        tokenizer carries the template recorded that one; the rendering itself is compared separately)."""
        from drift_stream.bank.store import fingerprint_tokenizer

        completed = self.chat.tokenizer_with_template() if hasattr(self.chat, "tokenizer_with_template") else None
        recorded = self.bank.manifest.get("tokenizer", {}).get("fingerprint")
        if completed is not None and fingerprint_tokenizer(completed)["fingerprint"] == recorded:
            return completed
        return self.chat.tokenizer

    def _raw(self, examples, turns: bool = False):
        """Per-query raw scores [n, m], gradient norms [n], losses [n], bad reasons; with `turns` also the turns'
        raw scores [n, K, m] and norms [n, K] (NaN where a row has no scored turn k; scoring/turns.py)."""
        import torch

        featurizer = self.featurizer
        vectors = self.bank.query_vectors.to(torch.float64)  # [m, D]
        n = len(examples)
        raws = np.zeros((n, vectors.shape[0]))
        norms, losses, bad = np.zeros(n), np.zeros(n), [None] * n
        width = max_turns(examples) if turns else 0
        turn_raws = np.full((n, width, vectors.shape[0]), np.nan)
        turn_norms = np.full((n, width), np.nan)
        for idx, batch in self._planned(examples):
            if turns:
                from drift_stream.grads.turn_features import featurize_turns

                chunk = [examples[i] for i in idx]
                out, per_turn = featurize_turns(featurizer, batch, turn_index_batch(chunk, batch["input_ids"].shape[1]),
                                                max_turns(chunk))
                for k, part in enumerate(per_turn):
                    ok = np.array([r is None for r in part.bad])
                    rows = np.asarray(idx)[ok]
                    turn_raws[rows, k] = (part.features[ok].to(torch.float64) @ vectors.T).numpy()
                    turn_norms[rows, k] = part.grad_norm[ok].double().numpy()
            else:
                out = featurizer.featurize(batch)
            feats = out.features.to(torch.float64).cpu()  # [B, D]
            raws[idx] = (feats @ vectors.T).numpy()  # [B, m]
            norms[idx] = out.grad_norm.double().cpu().numpy()
            losses[idx] = out.loss.double().cpu().numpy()
            for i, reason in zip(idx, out.bad):
                bad[i] = reason
        if turns:
            return raws, norms, losses, bad, (turn_raws, turn_norms)
        return raws, norms, losses, bad

    def calibrate(self, batch: Any) -> float:
        """Fit beta on a calibration sample of rows (beta: auto) and score with it. Returns the fitted beta.

        Prefer `drift_stream.scoring.beta.resolve_beta`, which fits once per run directory and records the value."""
        beta, debias = self.fit_beta(batch)
        self.use_beta(beta, debias)
        return beta

    def use_beta(self, beta: float, debias: dict | None = None) -> None:
        """Score with the fitted `beta` from now on (beta: auto only; `debias`: its calibration statistics)."""
        if self.config.beta != "auto":
            raise ConfigError(f"this scorer has a fixed beta={self.config.beta}: build it with beta='auto' to fit one")
        if not math.isfinite(float(beta)):
            raise ConfigError(f"beta must be a finite number, got {beta!r}")
        self._beta = float(beta)
        self._debias = dict(debias or {})

    def fit_beta(self, batch: Any) -> tuple[float, dict]:
        """(beta, debias statistics) fitted on a calibration sample of rows; changes nothing on the scorer."""
        table, _ = _to_table(batch)
        _, tokenized, _ = self.prepare(table)
        examples = [t for t in tokenized if t is not None]
        if not examples:
            raise ConfigError("beta: auto found no scorable row in the calibration sample")
        before = PaddingStats(**vars(self.padding))
        raw, norm, _, bad = self._raw(examples)
        self.padding = before  # calibration batches are not the run's: keep the per-file counts engine-independent
        ok = np.array([b is None for b in bad])
        weights = self.bank.query_weights
        mean_raw = weighted_query_mean(raw, None if weights is None else weights.double().numpy())
        beta = fit_beta(mean_raw[ok], norm[ok])
        debias = debias_stats(mean_raw[ok], norm[ok], beta)
        debias["calibration_rows"] = int(ok.sum())
        logger.info("beta: auto fitted beta=%.4f on %d rows", beta, int(ok.sum()))
        return beta, debias

    @property
    def needs_calibration(self) -> bool:
        return self._beta is None

    @property
    def beta(self) -> float | None:
        return self._beta

    def _score_examples(self, examples):
        if self._beta is None:
            raise ConfigError(
                "beta: auto has not been calibrated: call scorer.calibrate(rows) on a sample first "
                "(the CLI does this on the first --calibration-rows rows of the input)"
            )
        turns = self.config.granularity == "turn"
        raw, norm, loss, bad, *turn_parts = self._raw(examples, turns=turns)
        scale = np.power(np.maximum(norm, 1e-30), self._beta)[:, None]  # [n, 1]
        per_query = raw / scale  # [n, m]
        # S = sum_j w_j score_j / sum_j w_j (bank query_weighting, bank/contrast.py); no weights: the plain mean
        weights = self.bank.query_weights
        weights = None if weights is None else weights.double().numpy()
        score = weighted_query_mean(per_query, weights)
        turn_scores = None
        if turns:  # the same formula per turn: [n, K, m] / ||u_k||^beta, mean over queries
            turn_raw, turn_norm = turn_parts[0]
            per_turn = turn_raw / np.power(np.maximum(turn_norm, 1e-30), self._beta)[:, :, None]
            n, width, m = per_turn.shape
            turn_mean = weighted_query_mean(per_turn.reshape(n * width, m), weights).reshape(n, width)
            turn_scores = per_example(turn_mean, examples)
        return ExampleScores(score=score, grad_norm=norm, loss=loss, bad=bad, query_scores=per_query,
                             turn_scores=turn_scores)

    def _extra_config(self) -> dict:
        return {"bank": str(self.bank.path), "bank_fingerprint": self.bank.fingerprint}

    def manifest_info(self) -> dict:
        info: dict = {"beta": self._beta, "beta_mode": "auto" if self.config.beta == "auto" else "fixed"}
        if self._featurizer is not None:  # the share of the model's parameters the features see (grads/coverage.py)
            info["feature_coverage"] = self._featurizer.coverage()
        if self._debias:
            info["debias"] = self._debias
        return info


def debias_stats(mean_raw: np.ndarray, grad_norm: np.ndarray, beta: float) -> dict:
    """Spearman of |score| with the gradient norm before (beta = 0) and after debiasing."""
    after = mean_raw / np.power(np.maximum(grad_norm, 1e-30), beta)
    return {
        "beta": float(beta),
        "spearman_abs_score_vs_norm_before": spearman(np.abs(mean_raw), grad_norm),
        "spearman_abs_score_vs_norm_after": spearman(np.abs(after), grad_norm),
        "spearman_score_vs_norm_before": spearman(mean_raw, grad_norm),
        "spearman_score_vs_norm_after": spearman(after, grad_norm),
    }


def _replace(config: ScoreConfig, **changes: Any) -> ScoreConfig:
    from dataclasses import replace

    return replace(config, **changes)
