"""The on-policy validation bank: rollouts -> verifier -> signed query gradients -> preconditioner -> bank directory.

For query j with rollouts k = 1..K_j that verified and featurized cleanly (K_j <= K; failed ones are counted in the
manifest, never used): g_j = (1/K_j) sum_k s_jk u(tau_jk), with s_jk from the signing:
  sign           +1 if r_jk >= correct_threshold else -1
  advantage      r_jk - mean_k r_jk
  advantage_std  (r_jk - mean_k r_jk) / std_k r_jk   (population std)
  positive       1 if correct else 0
Then b_j = H^-1 g_j (preconditioner fitted on `fisher_data`; identity when none), scaled to unit norm by default.
Off-policy targets: g_j = u(q_j + its reference answer), no rollouts. Queries with no signal (no valid rollout,
equal rewards under advantage, no correct rollout under positive, a zero vector) are listed in the manifest with a
reason and left out of the vectors, with a warning.

Bank directory (fixed names; written and loaded by bank/store.py): bank.safetensors, manifest.json
(schemas/bank_manifest.schema.json), rollouts.parquet.
Resumable: queries are processed in chunks of `checkpoint_queries` (rollouts, verification, features, g_j:
bank/chunks.py), each saved to OUT/checkpoints/ (bank/checkpoint.py) before the next; a rerun of a killed build with
the same settings restores the saved chunks and builds the rest, to the same bank (other settings are refused).
Rollout features live one chunk at a time; with save_rollout_vectors they are combined from the chunk files into
bank.safetensors without an [R, D] array in memory. The checkpoints are removed once the bank is written.
Proximity gap of a query: reference_loss - rollout_loss (token-weighted mean NLL of all its rollouts); overall: the
mean over the queries that have both.
Queries without a contrast (adaptive K, reference as a positive target, dropping) and query weighting (uniform |
learnability p(1-p)): drift_stream/bank/contrast.py; recorded in the manifest's `contrast` and per-query rows.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping

from drift_stream.bank.checkpoint import BankCheckpoints, kill_point, queries_digest
from drift_stream.bank.chunks import ChunkContext, build_chunk, merge_adaptive
from drift_stream.bank.config import (
    TRUNCATION_WARN_SHARE,
    BankConfig,
    truncated_share,
    truncation_warning,
)
from drift_stream.bank.contrast import contrast_counts, query_weights
from drift_stream.bank.store import (
    BANK_FORMAT_VERSION,
    MANIFEST_FILE,
    ValidationBank,
    fingerprint_model,
    fingerprint_projector,
    fingerprint_tokenizer,
    write_bank,
)
from drift_stream.bank.targets import _encode_all
from drift_stream.errors import BankError, ConfigError
from drift_stream.io.config_fields import output_dict
from drift_stream.model.batching import plan_batches
from drift_stream.rollouts.engine import (
    generate_rollouts,
    iter_input_rows,
    load_queries,
    resolve_backend,
)

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------- build


def _fisher_examples(fisher_data, adapter, chat_tokenizer, limit: int, storage_options=None):
    """Tokenized training rows (at most `limit`) and {reason: count} of the rows that could not be used."""
    from drift_stream.data.example_types import Example, RowError, TokenizedExample
    from drift_stream.data.formats import load_adapter

    adapter = load_adapter(adapter) if isinstance(adapter, (str, os.PathLike)) else adapter
    rejected: dict[str, int] = {}
    out = []
    for item, reason in iter_input_rows(fisher_data, storage_options):
        if len(out) >= limit:
            break
        try:
            if reason is not None:
                raise RowError(reason)
            if isinstance(item, TokenizedExample):
                out.append(item)
            else:
                out.append(chat_tokenizer.encode(item if isinstance(item, Example) else adapter.to_example(item)))
        except RowError as exc:
            rejected[exc.reason] = rejected.get(exc.reason, 0) + 1
    return out, rejected


def _fit_preconditioner(kind, config: BankConfig, featurizer, fisher_data, fisher_adapter, chat_tok, storage_options):
    from drift_stream.data.tokenization import collate
    from drift_stream.grads.precondition import Preconditioner, PreconditionerConfig

    info = {"examples_used": 0, "rejected": {}}
    pre = Preconditioner(PreconditionerConfig(kind=kind, damping=config.damping), featurizer.block_sizes)
    if kind == "identity":
        return pre, info
    examples, rejected = _fisher_examples(fisher_data, fisher_adapter, chat_tok, config.fisher_examples,
                                          storage_options)
    if not examples:
        raise ConfigError(f"--fisher-data gave no usable training rows (rejected by reason: {rejected})")
    lengths = [len(ex.input_ids) for ex in examples]
    for idx in plan_batches(lengths, batch_size=config.feature_batch_size, max_batch_tokens=config.max_batch_tokens):
        out = featurizer.featurize(collate([examples[i] for i in idx], chat_tok.pad_token_id))
        pre.update(out.features, out.bad)  # a sum over rows: the order does not matter
    pre.finalize()
    return pre, {"examples_used": pre.count, "skipped": pre.skipped, "rejected": rejected}


def build_bank(
    model,
    queries,
    out_dir,
    config: BankConfig | None = None,
    *,
    verifier="numeric",
    adapter="qa",
    fisher_data=None,
    fisher_adapter="messages",
    tokenizer=None,
    device: str = "auto",
    dtype: str = "auto",
    storage_options: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    workers=None,
) -> "ValidationBank":
    """Build a bank directory at `out_dir` and return it, loaded.

    model: HF model directory (or a loaded model, with `tokenizer=`). queries: URL(s) of parquet / jsonl read with
    `adapter`, or rows / Examples / Queries. verifier: a `load_verifier` spec or a Verifier. fisher_data: URL(s),
    rows (read with `fisher_adapter`), Examples or TokenizedExamples of the training pool. workers: where HF
    rollouts and rollout / reference features are computed (`engines.ray_bank.RayBankWorkers`: a Ray actor
    pool; its `generate_rollouts` and `featurize_all` have the signatures of rollouts.engine's `generate_rollouts` and
    bank.targets' `_featurize_all`, and take the dtype of the model passed to them, this one's); default this
    process.
    """
    import torch

    from drift_stream.data.tokenization import ChatTokenizer
    from drift_stream.grads.coverage import coverage_warning
    from drift_stream.grads.features import GradientFeaturizer
    from drift_stream.rollouts.verifiers import (
        load_verifier,
        verify_rollouts,
    )

    config = config or BankConfig()
    out_dir = Path(out_dir)
    if (out_dir / MANIFEST_FILE).exists() and not overwrite:
        raise BankError(f"{out_dir} already holds a bank: choose another --out or pass --overwrite")
    on_policy = config.targets == "on-policy"
    verifier = load_verifier(verifier) if on_policy else None
    model_path = str(model) if isinstance(model, (str, os.PathLike)) else None
    if model_path is not None:
        from drift_stream.model.loading import load_model, load_tokenizer

        tokenizer = tokenizer or load_tokenizer(model_path)
    elif tokenizer is None:
        raise ConfigError("build_bank got a loaded model: pass its tokenizer= too")
    chat_tok = ChatTokenizer.from_options(tokenizer, max_tokens=config.max_tokens, chat_template=config.chat_template,
                                          use_chat_template=config.use_chat_template, stop_tokens=config.stop_tokens)
    loaded, rejected = load_queries(queries, adapter, storage_options)
    prompt_errors = _encode_all({q.id: (q.messages,) for q in loaded}, chat_tok.encode_prompt)[1]
    rejected += [{"index": None, "id": qid, "reason": reason} for qid, reason in prompt_errors.items()]
    query_list = [q for q in loaded if q.id not in prompt_errors]
    if not query_list:
        raise ConfigError(f"no validation query fits the tokenizer ({len(rejected)} rejected: {rejected[:3]})")
    timings = dict.fromkeys(("generation", "verification", "gradients", "preconditioner"), 0.0)
    token_stats = chat_tok.pop_stats()  # the prompts': counted by every run, a resumed one too

    # Chunks of queries, each checkpointed (bank/checkpoint.py); a rerun skips the chunks a killed build saved.
    size = config.checkpoint_queries
    chunks = [query_list[s:s + size] for s in range(0, len(query_list), size)]
    store = BankCheckpoints(out_dir)
    if (out_dir / MANIFEST_FILE).exists():  # --overwrite of a complete bank: start over
        store.clear()
    backend = resolve_backend(config.rollouts.backend, model_path)
    pregenerated = None
    pending = [q for c, chunk in enumerate(chunks) if not store.done(c) for q in chunk]
    if on_policy and backend == "vllm" and pending:  # vLLM runs before the HF model is loaded: never both on the GPU
        t0 = time.perf_counter()
        pregenerated = {}
        for r in generate_rollouts(model_path, tokenizer, chat_tok, pending, config.rollouts, progress):
            pregenerated.setdefault(r.query_id, []).append(r)
        timings["generation"] = time.perf_counter() - t0
    if model_path is not None:
        model = load_model(model_path, device=device, dtype=dtype)
    model_fingerprint = fingerprint_model(model)
    store.check_record({"config": output_dict(config), "model": model_path,
                        "model_fingerprint": model_fingerprint["fingerprint"],
                        "tokenizer": fingerprint_tokenizer(tokenizer)["fingerprint"],
                        "queries": queries_digest(query_list), "verifier": verifier and verifier.spec()},
                       overwrite=overwrite)
    featurizer = GradientFeaturizer(model, config.features)
    skipped = coverage_warning(featurizer.coverage())
    if skipped:  # fused MoE experts or large unhooked parameters: the bank's query vectors do not see them
        logger.warning("%s", skipped)
    ctx = ChunkContext(
        config=config, model=model, gen_model=model_path if backend == "vllm" else model, tokenizer=tokenizer,
        chat_tok=chat_tok, featurizer=featurizer, verifier=verifier,
        generate=workers.generate_rollouts if workers is not None and backend != "vllm" else generate_rollouts,
        verify=lambda rs, by_id: verify_rollouts(verifier, [(r.completion, by_id[r.query_id]) for r in rs],
                                                 config.verifier_timeout_s, progress),
        featurize_all=workers.featurize_all if workers is not None else None, progress=progress,
        pregenerated=pregenerated)
    for c, chunk in enumerate(chunks):
        if store.done(c):
            logger.info("bank build: chunk %d of %d (%d queries) restored from %s", c + 1, len(chunks), len(chunk),
                        store.root)
            continue
        store.save(c, *build_chunk(ctx, chunk))
        kill_point("bank", c)  # the SIGKILL resume tests' hook; nothing unless asked
    markers = [store.marker(c) for c in range(len(chunks))]
    rows, vectors, target_pass = [], {}, {}
    for c, m in enumerate(markers):
        rows += m["rows"]
        vectors.update(store.vectors(c, m["vector_ids"]))
        target_pass.update(m["target_pass"])
        for key, value in m["timings"].items():
            timings[key] = timings.get(key, 0.0) + value
    adaptive = merge_adaptive([m["adaptive"] for m in markers])
    num_rollouts = sum(m["rollouts"] for m in markers)

    truncation = {"rollouts": num_rollouts, "truncated": sum(m["truncated"] for m in markers),
                  "policy": config.truncated, "max_new_tokens": config.rollouts.max_new_tokens}
    if on_policy and truncated_share(truncation) >= TRUNCATION_WARN_SHARE:
        logger.warning(truncation_warning(truncation))
    excluded = [row for row in rows if row["excluded"]]
    if excluded:
        logger.warning("%d of %d queries carry no signal under signing %r and are left out of the bank (first: "
                       "%s: %s)", len(excluded), len(rows), config.signing, excluded[0]["id"], excluded[0]["excluded"])
    if not vectors:
        raise BankError(f"no query carries a signal under signing {config.signing!r}: all {len(rows)} were excluded "
                        "(see the manifest reasons in the warnings); try --signing sign or more --rollouts")
    kept_ids = [q.id for q in query_list if q.id in vectors]
    g = torch.stack([vectors[qid] for qid in kept_ids])  # [m, D] float64
    weights = query_weights([target_pass.get(qid, 1.0) for qid in kept_ids], config.query_weighting)  # [m]
    if not weights.sum() > 0:
        raise BankError(f"query_weighting {config.query_weighting!r} gives every one of the {len(kept_ids)} queries "
                        "weight 0 (no query has both correct and incorrect targets): use --query-weighting uniform, "
                        "more --rollouts or --max-rollouts")
    weight_of = dict(zip(kept_ids, weights.tolist()))
    for row in rows:
        row["weight"] = weight_of.get(row["id"])

    t0 = time.perf_counter()
    kind = config.preconditioner
    if fisher_data is None and kind != "identity":
        logger.warning("no fisher data given: using the identity preconditioner instead of %r", kind)
        kind = "identity"
    pre, fisher_info = _fit_preconditioner(kind, config, featurizer, fisher_data, fisher_adapter, chat_tok,
                                           storage_options)
    for stats in [chat_tok.pop_stats()] + [m["tokenization"] for m in markers]:  # the Fisher rows', the chunks'
        token_stats = {k: token_stats.get(k, 0) + v for k, v in stats.items()}
    b = pre.apply(g)  # [m, D] float64
    if config.normalize:
        b = b / b.norm(dim=1, keepdim=True)
    timings["preconditioner"] = time.perf_counter() - t0

    gap_rows = [r for r in rows if r["proximity_gap"] is not None]
    judged = sum(r["correct"] + r["incorrect"] for r in rows)
    spec = featurizer.spec()
    manifest = {
        "format": "drift-stream-bank", "format_version": BANK_FORMAT_VERSION, "version": _package_version(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {**model_fingerprint, "path": model_path}, "tokenizer": fingerprint_tokenizer(tokenizer),
        "projector": {"fingerprint": fingerprint_projector(spec), "spec": spec},
        "modules": [m["name"] for m in spec["modules"]], "dim": featurizer.dim, "coverage": featurizer.coverage(),
        "signing": config.signing, "targets": config.targets, "verifier": verifier and verifier.spec(),
        "preconditioner": {"kind": kind, "damping": config.damping, **fisher_info},
        "normalize": config.normalize, "config": config.to_dict(),
        "num_queries": len(kept_ids), "query_ids": kept_ids, "queries": rows, "rejected_queries": rejected,
        "pass_rate": sum(r["correct"] for r in rows) / judged if judged else None,
        "proximity_gap": {"gap": _mean([r["proximity_gap"] for r in gap_rows]), "num_queries": len(gap_rows),
                          "rollout_loss": _mean([r["rollout_loss"] for r in gap_rows]),
                          "reference_loss": _mean([r["reference_loss"] for r in gap_rows])},
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
        "truncation": truncation,
        "tokenization": {**{k: v for k, v in chat_tok.config_dict().items()
                            if k in ("template", "chat_template_sha1", "stop_token_ids")}, **token_stats},
        "contrast": {"no_contrast": config.no_contrast, "query_weighting": config.query_weighting,
                     "adaptive": adaptive, "queries": contrast_counts(rows) if on_policy else None,
                     "reference_targets": sum(bool(r["reference_target"]) for r in rows)},
    }
    tensors = {"query_vectors": b.float().contiguous(), "signed_vectors": g.float().contiguous(),
               **{k: v.contiguous() for k, v in pre.state_dict().items()}}
    streamed = None
    if on_policy and config.save_rollout_vectors:  # [R, D] from the chunks' files, one chunk in memory at a time
        streamed = {"rollout_vectors": ([store.rollout_vector_file(c) for c in range(len(chunks))], "rollout_vectors")}
    if config.query_weighting != "uniform":  # uniform stores none: the scorer takes the plain mean, as before
        tensors["query_weights"] = torch.from_numpy(weights).float().contiguous()
    write_bank(out_dir, tensors, manifest, rollout_files=[store.table_file(c) for c in range(len(chunks))],
               streamed=streamed)
    store.clear()
    logger.info("bank written to %s: %d queries, dim %d, pass rate %s, proximity gap %s", out_dir, len(kept_ids),
                featurizer.dim, manifest["pass_rate"], manifest["proximity_gap"]["gap"])
    return ValidationBank.load(out_dir)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _package_version() -> str:
    from drift_stream.version import __version__

    return __version__
