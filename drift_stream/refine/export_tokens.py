"""`export --format tokens`: each row as the tokens and loss mask scoring computed, with float per-token weights.

The chat tokenizer is rebuilt from the source run's recorded scorer config (model path, --chat-template /
--no-chat-template, --stop-token, --max-tokens, --overlong) through `scoring.base.chat_tokenizer_for`, the function
the scorer itself was built with, and its fingerprint (`ChatTokenizer.config_dict()`: template sha1, stop ids, max
tokens, overlong) must equal the one config.json recorded, so a changed template file or another tokenizer is
refused instead of exported silently.

Columns (one row per refined row of weight > 0), with T the row's tokens:

* `input_ids` [T] int32, `labels` [T] int32: Hugging Face's convention, labels[t] = input_ids[t] where token t is
  trained (predicted from tokens < t) and -100 elsewhere; labels[0] is always -100. The model shifts them.
* `target_tokens` [T-1] int32 = input_ids[1:], `weights` [T-1] float32 = loss_mask[1:] x f[turn_index[1:]]: Tinker's
  `Datum` alignment (https://tinker-docs.thinkingmachines.ai/tinker/losses): position t of the model input
  input_ids[:-1] predicts target_tokens[t] and its loss is multiplied by weights[t]. AWS SageMaker training sessions
  take the same `target_tokens` / `weights` pair.
* `weight` float32: the row's weight (the refine output's `weight` or `keep` column).

f[k] is assistant turn k's exported weight (export_source.turn_weights_out): input_k x turn_weights[k] after a
per-turn weights refine, else the row's weight x input_k x turn_keep[k] (1 without turn_keep), input_k the message's
input `weight` (1 when absent); 0 for tokens outside every turn. A turn of weight 0 (dropped by the refine, or
`weight` 0 in the input) is out of `labels` too, for trainers that read labels only.

Tinker's `cross_entropy` is a plain sum, sum_t -logp(target_t) * weights_t over every token of every Datum
(tinker 0.38 `training_client.py`: "Backend CE is L = sum(-logprobs * weights)"), while WeightedSFTTrainer's
default is sum_i w_i * mean_t nll_it / N. `tinker_fields(rows, normalize=...)` rescales a batch's weights so that
Tinker's sum is exactly that loss ("example"), the token-mean convention ("token": WeightedSFTTrainer
weighting="token", TRL's and LLaMA-Factory's), or leaves them as exported ("none").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from drift_stream.errors import InputChangedError, InputError
from drift_stream.io.columns import ID, WEIGHT

NORMALIZE = ("example", "token", "none")
IGNORE_INDEX = -100  # the label of a token outside the loss (Hugging Face / PyTorch cross_entropy ignore_index)

TOKENS_SCHEMA = pa.schema([
    (ID, pa.string()),
    ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),
    ("target_tokens", pa.list_(pa.int32())),
    ("weights", pa.list_(pa.float32())),
    (WEIGHT, pa.float32()),
])


def chat_tokenizer_for_run(scorer: Mapping[str, Any], source: str, tokenizer_path: str | None = None):
    """The ChatTokenizer the source run scored with, rebuilt from its recorded scorer config.

    `tokenizer_path` replaces the recorded model path (the run was scored on another machine); either way the
    rebuilt tokenizer's fingerprint must equal the recorded one (InputChangedError naming both otherwise).
    """
    from dataclasses import fields

    from drift_stream.model.loading import load_tokenizer
    from drift_stream.scoring.base import ScoreConfig, chat_tokenizer_for

    path = tokenizer_path or scorer.get("model")
    if not path:
        raise InputError(f"{source}/config.json records no model path: pass --tokenizer PATH (the tokenizer the run "
                         "was scored with)")
    recorded = scorer.get("tokenization")
    if not recorded:
        raise InputError(f"{source}/config.json records no tokenization fingerprint: rescore the run with this "
                         "version of drift-stream to export tokens")
    names = {f.name for f in fields(ScoreConfig)}
    cfg = ScoreConfig(**{k: v for k, v in scorer.items() if k in names})
    chat = chat_tokenizer_for(load_tokenizer(path), cfg)
    now = chat.config_dict()
    if now != recorded:
        diff = ", ".join(f"{k}: {recorded.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(recorded) | set(now))
                         if recorded.get(k) != now.get(k))
        raise InputChangedError(f"the tokenizer at {path} with the recorded options does not tokenize as {source} "
                                f"was scored ({diff}): pass --tokenizer with the scored model's tokenizer, or restore "
                                "the --chat-template file the run was scored with")
    return chat


def token_record(chat, example, weight: float, path: str, index: int,
                 turns: tuple[float, ...] | None = None) -> dict:
    """The token columns of one row (module docstring), encoded by `chat.encode` exactly as scoring encoded it.
    turns: each assistant turn's exported weight (export_source.turn_weights_out; None: `weight` on every turn)."""
    from drift_stream.data.example_types import RowError

    try:
        encoded = chat.encode(example)
    except RowError as err:
        raise InputError(f"{path} row {index} (id {example.id}): {err.reason} (the scorer should have rejected it; "
                         "was the run scored with another tokenizer?)") from err
    ids = np.asarray(encoded.input_ids, dtype=np.int32)  # [T]
    mask = np.asarray(encoded.loss_mask, dtype=bool)  # [T]
    per_token = np.full(ids.size, np.float32(weight), dtype=np.float32)  # [T] f[turn of token t]
    if turns is not None:
        f = np.asarray(turns, dtype=np.float64).astype(np.float32)  # [K]
        if encoded.turn_index is None:  # a text / plain prompt+completion row: one turn
            per_token[:] = f[0]
        else:
            turn = np.asarray(encoded.turn_index, dtype=np.int64)  # [T], -1 outside every turn
            per_token = np.where(turn >= 0, f[np.maximum(turn, 0)], np.float32(0.0)).astype(np.float32)
    mask &= per_token != 0  # a dropped (or weight-0) turn is out of the labels too
    return {
        "input_ids": ids,
        "labels": np.where(mask, ids, IGNORE_INDEX).astype(np.int32),
        "target_tokens": ids[1:],
        "weights": mask[1:].astype(np.float32) * per_token[1:],
        WEIGHT: float(weight),
    }


def tokens_table(records: Sequence[dict]) -> pa.Table:
    """Token records -> a table of TOKENS_SCHEMA (list columns built from the concatenated arrays)."""
    columns = []
    for field in TOKENS_SCHEMA:
        values = [r[field.name] for r in records]
        if pa.types.is_list(field.type):
            lengths = np.fromiter((len(v) for v in values), dtype=np.int32, count=len(values))
            offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32)
            flat = np.concatenate(values) if values else np.zeros(0)
            columns.append(pa.ListArray.from_arrays(pa.array(offsets, pa.int32()),
                                                    pa.array(flat, type=field.type.value_type)))
        else:
            columns.append(pa.array(values, type=field.type))
    return pa.Table.from_arrays(columns, schema=TOKENS_SCHEMA)


def tinker_fields(rows: Sequence[Mapping[str, Any]], normalize: str = "example") -> list[dict]:
    """Tinker `Datum` fields of one training batch of token-export rows: per row {"model_input": input_ids[:-1],
    "target_tokens", "weights"} as plain lists.

    normalize "example": weights / (row's loss tokens x the batch's rows with loss tokens), so Tinker's summed
    cross-entropy equals WeightedSFTTrainer's loss on this batch (sum_i w_i mean_t nll_it / N); "token": weights /
    (the batch's loss tokens), WeightedSFTTrainer weighting="token"; "none": the exported weights.
    """
    if normalize not in NORMALIZE:
        raise InputError(f"normalize must be one of {', '.join(NORMALIZE)}, got {normalize!r}")
    weights = [np.asarray(r["weights"], dtype=np.float64) for r in rows]
    # the row's loss tokens: labels[1:] != -100 (what WeightedSFTTrainer's mean runs over), else nonzero weights
    counts = [int(np.count_nonzero(np.asarray(r["labels"])[1:] != IGNORE_INDEX)) if "labels" in r
              else int(np.count_nonzero(w)) for r, w in zip(rows, weights)]
    rows_with_tokens = sum(c > 0 for c in counts)
    out = []
    for row, w, n in zip(rows, weights, counts):
        if normalize == "example":
            w = w / (n * rows_with_tokens) if n else w
        elif normalize == "token":
            w = w / max(sum(counts), 1)
        ids = [int(t) for t in row["input_ids"]]
        targets = [int(t) for t in row["target_tokens"]]
        if targets != ids[1:] or len(w) != len(targets):
            raise InputError(f"row {row.get(ID)}: target_tokens / weights are not input_ids[1:]-aligned: not a "
                             "drift-stream token export")
        out.append({"model_input": ids[:-1], "target_tokens": targets, "weights": w.astype(np.float32).tolist()})
    return out
