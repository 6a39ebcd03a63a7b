"""One chunk of a bank build: rollouts, verification, adaptive K, reference and rollout features, and the per-query
rows and g_j of `config.checkpoint_queries` queries (bank/build.py runs the chunks and checkpoints each one:
bank/checkpoint.py). A query's rollouts, vectors and rows depend on its own rollouts only, so a chunk is a unit that
a killed build can skip on resume; the features of a chunk's rollouts are the only [R_c, D] array in memory.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

from drift_stream.bank.contrast import top_up_rollouts
from drift_stream.bank.targets import _encode_all, _off_policy, _on_policy, _Targets


@dataclasses.dataclass
class ChunkContext:
    """What every chunk of one build shares."""

    config: Any  # BankConfig
    model: Any
    gen_model: Any  # the model or, for vLLM, its path
    tokenizer: Any
    chat_tok: Any
    featurizer: Any
    verifier: Any
    generate: Callable
    verify: Callable  # verify(rollouts, queries by id) -> results
    featurize_all: Callable | None
    progress: bool
    pregenerated: dict | None = None  # vLLM: {query id: [Rollout]} made before the HF model was loaded


def build_chunk(ctx: ChunkContext, queries: list) -> tuple[dict, dict, Any, list[dict]]:
    """(marker, {query id: g_j [D] float64}, rollout vectors [R_c, D] | None, rollouts.parquet rows) of `queries`."""
    from drift_stream.data.example_types import Example

    config, on_policy = ctx.config, ctx.config.targets == "on-policy"
    timings = {"generation": 0.0, "verification": 0.0, "gradients": 0.0}
    rollouts, results, adaptive = [], [], None
    by_id = {q.id: q for q in queries}
    if on_policy:
        t0 = time.perf_counter()
        if ctx.pregenerated is not None and all(q.id in ctx.pregenerated for q in queries):
            rollouts = [r for q in queries for r in ctx.pregenerated[q.id]]
        else:
            rollouts = ctx.generate(ctx.gen_model, ctx.tokenizer, ctx.chat_tok, queries, config.rollouts, ctx.progress)
        timings["generation"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        results = ctx.verify(rollouts, by_id)
        timings["verification"] = time.perf_counter() - t0
        if config.max_rollouts is not None:
            t0 = time.perf_counter()
            rollouts, results, adaptive = top_up_rollouts(
                lambda qs, seed: ctx.generate(ctx.gen_model, ctx.tokenizer, ctx.chat_tok, qs,
                                              dataclasses.replace(config.rollouts, seed=seed), ctx.progress),
                lambda rs: ctx.verify(rs, by_id), queries, rollouts, results,
                num_rollouts=config.rollouts.num_rollouts, max_rollouts=config.max_rollouts,
                seed=config.rollouts.seed, correct_threshold=config.correct_threshold)
            timings["adaptive_rollouts"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    batch_args = (ctx.chat_tok.pad_token_id, config.feature_batch_size)
    budget = {"featurize_all": ctx.featurize_all, "max_batch_tokens": config.max_batch_tokens}
    # Reference answers: the off-policy targets, and the other side of the proximity gap.
    refs, ref_errors = _encode_all(
        {j: (Example(id=q.id, messages=tuple(q.messages) + ({"role": "assistant", "content": q.reference_response},)),)
         for j, q in enumerate(queries) if q.reference_response is not None}, ctx.chat_tok.encode)
    ref_errors.update({j: "no_reference" for j, q in enumerate(queries) if q.reference_response is None})
    refs = _Targets(ctx.featurizer, refs, *batch_args, "reference", ctx.progress,
                    loss_only=on_policy and config.no_contrast != "reference", **budget)
    ref_loss = {j: float(refs.loss[refs.row[j]]) for j in refs.owners if refs.ok(j)}
    if on_policy:
        # Each rollout's own tokens: prompt + completion, loss on the completion.
        encoded, encode_errors = _encode_all(
            {i: (r.prompt_ids, r.completion_ids, r.query_id) for i, r in enumerate(rollouts)},
            ctx.chat_tok.encode_rollout)
        feats = _Targets(ctx.featurizer, encoded, *batch_args, "rollout features", ctx.progress, **budget)
        rows, vectors, table, rollout_vectors, target_pass = _on_policy(
            queries, rollouts, results, feats, encode_errors, ref_loss, ref_errors, config, ctx.tokenizer,
            refs if config.no_contrast == "reference" else None)
        if rollout_vectors is not None and rollout_vectors.shape[1] != ctx.featurizer.dim:  # no rollout featurized
            rollout_vectors = rollout_vectors.new_zeros(len(rollouts), ctx.featurizer.dim)
    else:
        (rows, vectors), table, rollout_vectors, target_pass = _off_policy(queries, refs, ref_errors), [], None, {}
    timings["gradients"] = time.perf_counter() - t0
    marker = {"queries": [q.id for q in queries], "rows": rows, "target_pass": target_pass, "adaptive": adaptive,
              "rollouts": len(rollouts), "truncated": sum(r.finish_reason == "length" for r in rollouts),
              "tokenization": ctx.chat_tok.pop_stats(), "timings": timings}
    return marker, vectors, rollout_vectors, table


def merge_adaptive(parts: list[dict | None]) -> dict | None:
    """The manifest's adaptive-K record from the chunks' (None when adaptive K is off)."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    out = {"max_rollouts": parts[0]["max_rollouts"], "rounds": max(p["rounds"] for p in parts)}
    for key in ("extra_rollouts", "queries_topped_up", "queries_resolved"):
        out[key] = sum(p[key] for p in parts)
    return out
