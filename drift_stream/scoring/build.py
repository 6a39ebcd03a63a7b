"""build_scorer: any scorer by name from paths (what the CLI, the Ray actors and the demo call)."""

from __future__ import annotations

from typing import Any

from drift_stream.errors import ConfigError
from drift_stream.scoring.base import (
    GRADIENT_SCORERS,
    BatchScorer,
    ScoreConfig,
    chat_tokenizer_for,
)
from drift_stream.scoring.baselines import IFDScorer, LossScorer, RandomScorer
from drift_stream.scoring.drift import DriftScorer


def build_scorer(
    scorer: str,
    *,
    model: str | None,
    adapter: str = "messages",
    bank: str | None = None,
    allow_mismatch: bool = False,
    model_obj: Any = None,
    tokenizer: Any = None,
    **config: Any,
) -> BatchScorer:
    """Build any scorer by name from paths (what the CLI calls). `model_obj`/`tokenizer` reuse loaded objects."""
    from drift_stream.data.formats import load_adapter
    from drift_stream.model.loading import load_tokenizer

    cfg = ScoreConfig(scorer=scorer, adapter=adapter, **config)
    if scorer in GRADIENT_SCORERS and bank is None:
        raise ConfigError(f"scorer {scorer!r} needs --bank BANK_DIR (build one with `drift-stream bank build`)")
    if model is None and tokenizer is None:
        raise ConfigError("--model is required: the tokenizer decides tokens, loss masks and over-long rejects")
    tok = tokenizer if tokenizer is not None else load_tokenizer(model)
    chat = chat_tokenizer_for(tok, cfg)
    adapter_obj = load_adapter(adapter)
    if scorer == "random":
        return RandomScorer(adapter_obj, chat, cfg, model_path=model)
    if scorer == "loss":
        return LossScorer(adapter_obj, chat, cfg, model_path=model, model=model_obj)
    if scorer == "ifd":
        return IFDScorer(adapter_obj, chat, cfg, model_path=model, model=model_obj)
    from drift_stream.bank.store import ValidationBank

    vb = ValidationBank.load(bank)
    return DriftScorer(adapter_obj, chat, cfg, vb, model_path=model, model=model_obj, allow_mismatch=allow_mismatch)
