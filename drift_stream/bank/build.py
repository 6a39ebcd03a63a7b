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
Proximity gap of a query: reference_loss - rollout_loss (token-weighted mean NLL of all its rollouts); overall: the
mean over the queries that have both.
Queries without a contrast (adaptive K, reference as a positive target, dropping) and query weighting (uniform |
learnability p(1-p)): drift_stream/bank/contrast.py; recorded in the manifest's `contrast` and per-query rows.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from drift_stream.batching import plan_batches, validate_max_batch_tokens
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
from drift_stream.bank.contrast import (
    NO_CONTRAST,
    QUERY_WEIGHTINGS,
    contrast_counts,
    contrast_plan,
    query_weights,
    top_up_rollouts,
)
from drift_stream.config_fields import execution_only
from drift_stream.errors import BankError, ConfigError
from drift_stream.grads.projection import FeatureConfig
from drift_stream.rollouts.engine import (
    Query,
    RolloutConfig,
    generate_rollouts,
    iter_input_rows,
    load_queries,
    resolve_backend,
)

logger = logging.getLogger(__name__)

__all__ = [  # bank.store's names are re-exported: they were defined here before the split
    "BANK_FORMAT_VERSION", "MANIFEST_FILE", "PRECONDITIONERS", "ROLLOUTS_FILE", "SIGNINGS", "TARGETS", "TENSORS_FILE",
    "BankConfig", "Query", "ValidationBank", "build_bank", "fingerprint_model", "fingerprint_projector",
    "fingerprint_tokenizer", "load_queries", "signed_weights", "write_bank",
]

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

    def __post_init__(self):
        for name, value, allowed in (("signing", self.signing, SIGNINGS), ("targets", self.targets, TARGETS),
                                     ("preconditioner", self.preconditioner, PRECONDITIONERS)):
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {value!r}")
        if not (isinstance(self.damping, (int, float)) and self.damping >= 0):
            raise ConfigError(f"damping must be a number >= 0, got {self.damping!r}")
        if not 0.0 < self.correct_threshold <= 1.0:
            raise ConfigError(f"correct_threshold must be in (0, 1], got {self.correct_threshold}")
        for name in ("fisher_examples", "feature_batch_size", "max_tokens"):
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


# --------------------------------------------------------------------------------------------------- signing


def signed_weights(rewards: Sequence[float], signing: str, correct_threshold: float = 1.0):
    """(weights s_k [K] as floats, None) or (None, reason) for one query's valid rollouts' rewards."""
    if not rewards:
        return None, "no_valid_rollouts"
    correct = [r >= correct_threshold - 1e-12 for r in rewards]
    if signing == "sign":
        return [1.0 if c else -1.0 for c in correct], None
    if signing == "positive":
        return ([1.0 if c else 0.0 for c in correct], None) if any(correct) else (None, "no_correct_rollout")
    mean = sum(rewards) / len(rewards)
    centered = [r - mean for r in rewards]
    std = math.sqrt(sum(c * c for c in centered) / len(rewards))
    if std <= 1e-12:
        return None, "equal_rewards"
    return (centered if signing == "advantage" else [c / std for c in centered]), None


# --------------------------------------------------------------------------------------------------- build


def _fisher_examples(fisher_data, adapter, chat_tokenizer, limit: int, storage_options=None):
    """Tokenized training rows (at most `limit`) and {reason: count} of the rows that could not be used."""
    from drift_stream.formats import Example, RowError, TokenizedExample, load_adapter

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


def _featurize_all(featurizer, examples, pad_id: int, batch_size: int, desc: str, progress: bool, loss_only=False,
                   max_batch_tokens: int | None = None):
    """(features [N, D] float32 | None, loss [N] float64, num_tokens [N], bad [N]) over tokenized examples, in order.

    Batches of batch_size rows, or (max_batch_tokens) rows sorted by length and cut by padded tokens (batching.py).
    """
    import torch

    from drift_stream.formats import collate

    feats, losses, counts, bad, order = [], [], [], [], []
    bar = None
    if progress and examples:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(examples), desc=desc, unit="seq")
    lengths = [len(ex.input_ids) for ex in examples]
    for idx in plan_batches(lengths, batch_size=batch_size, max_batch_tokens=max_batch_tokens):
        batch = collate([examples[i] for i in idx], pad_id, padding_side="right")
        if loss_only:
            loss, num = featurizer.loss_only(batch)
            row_bad = [None if n > 0 and math.isfinite(x) else "no_loss" for x, n in zip(loss.tolist(), num.tolist())]
        else:
            out = featurizer.featurize(batch)
            feats.append(out.features.float())
            loss, num, row_bad = out.loss, out.num_tokens, out.bad
        losses.append(loss.double())
        counts.append(num)
        bad.extend(row_bad)
        order.extend(idx)
        if bar is not None:
            bar.update(len(row_bad))
    if bar is not None:
        bar.close()
    if not examples:
        return None, torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.long), []
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))  # row i of the output is batch row inverse[i]
    bad = [bad[j] for j in inverse.tolist()]
    return ((None if loss_only else torch.cat(feats)[inverse]), torch.cat(losses)[inverse], torch.cat(counts)[inverse],
            bad)


class _Targets:
    """Features of a list of sequences, addressed by an owner key (a rollout or query index)."""

    def __init__(self, featurizer, examples: dict, pad_id: int, batch_size: int, desc: str, progress: bool,
                 loss_only: bool = False, featurize_all=None, max_batch_tokens: int | None = None):
        self.owners = list(examples)
        budget = {} if max_batch_tokens is None else {"max_batch_tokens": max_batch_tokens}
        self.features, self.loss, self.num_tokens, self.bad = (featurize_all or _featurize_all)(
            featurizer, [examples[o] for o in self.owners], pad_id, batch_size, desc, progress, loss_only, **budget)
        self.row = {owner: i for i, owner in enumerate(self.owners)}

    def ok(self, owner) -> bool:
        return owner in self.row and self.bad[self.row[owner]] is None

    def reason(self, owner) -> str | None:
        return None if owner not in self.row or self.bad[self.row[owner]] is None else f"features:{self.bad[self.row[owner]]}"


def _encode_all(items: dict, encode) -> tuple[dict, dict]:
    """({key: TokenizedExample}, {key: RowError reason}) for {key: args} through `encode(*args)`."""
    from drift_stream.formats import RowError

    done, errors = {}, {}
    for key, args in items.items():
        try:
            done[key] = encode(*args)
        except RowError as exc:
            errors[key] = exc.reason
    return done, errors


def _query_row(qid, counts, rollout_loss, reference_loss, excluded, ref_error, reference_target=False) -> dict:
    n = counts["correct"] + counts["incorrect"]
    gap = None if rollout_loss is None or reference_loss is None else reference_loss - rollout_loss
    return {"id": qid, **counts, "pass_rate": counts["correct"] / n if n else None, "rollout_loss": rollout_loss,
            "reference_loss": reference_loss, "proximity_gap": gap, "excluded": excluded, "reference_error": ref_error,
            "reference_target": reference_target, "weight": None}


def _on_policy(queries, rollouts, results, feats: _Targets, encode_errors, ref_loss, ref_errors, config, tokenizer,
               refs: _Targets | None = None):
    """(manifest rows, {query id: g_j [D] float64}, parquet rows, rollout vectors [R, D] | None, {query id: target
    pass rate}). Rollouts are in (query, rollout index) order, K_j of them per query (adaptive K: K_j may vary)."""
    import torch

    rows, vectors, table, target_pass = [], {}, [], {}
    rollout_vectors = torch.zeros(len(rollouts), feats.features.shape[1] if feats.features is not None else 0) \
        if config.save_rollout_vectors else None
    groups: dict[str, list[int]] = {q.id: [] for q in queries}
    for i, r in enumerate(rollouts):
        groups[r.query_id].append(i)
    for j, q in enumerate(queries):
        idx = groups[q.id]
        failures = {i: results[i].failure or encode_errors.get(i) or feats.reason(i)
                    or ("truncated" if config.truncated == "exclude" and rollouts[i].finish_reason == "length" else None)
                    for i in idx}
        valid = [i for i in idx if failures[i] is None]
        correct = {i: results[i].reward >= config.correct_threshold - 1e-12 for i in valid}
        counts = {"correct": sum(correct.values()), "incorrect": len(valid) - sum(correct.values()),
                  "failed": len(idx) - len(valid),
                  "truncated": sum(rollouts[i].finish_reason == "length" for i in idx)}
        target_rewards, why, use_ref = contrast_plan([results[i].reward for i in valid], config.correct_threshold,
                                                     config.no_contrast, refs is not None and refs.ok(j))
        weights = None
        if why is None:
            weights, why = signed_weights(target_rewards, config.signing, config.correct_threshold)
        sign_of = dict(zip(valid, weights or []))
        if weights is not None:
            stack = feats.features[[feats.row[i] for i in valid]].double()  # [K_j, D]
            if use_ref:  # the reference as one more, correct, target: [K_j + 1, D]
                stack = torch.cat([stack, refs.features[refs.row[j]].double()[None]])
            g = (torch.tensor(weights, dtype=torch.float64) @ stack) / len(weights)  # [D]
            target_pass[q.id] = sum(r >= config.correct_threshold - 1e-12 for r in target_rewards) / len(weights)
            if float(g.norm()) > 0:
                vectors[q.id] = g
            else:
                why = "zero_vector"
        scored = [i for i in idx if feats.ok(i)]  # every rollout with a finite loss counts toward the gap
        rollout_loss = _token_mean([float(feats.loss[feats.row[i]]) for i in scored],
                                   [int(feats.num_tokens[feats.row[i]]) for i in scored])
        rows.append(_query_row(q.id, counts, rollout_loss, ref_loss.get(j), why, ref_errors.get(j), use_ref))
        for i in idx:
            r = rollouts[i]
            if rollout_vectors is not None and feats.ok(i):
                rollout_vectors[i] = feats.features[feats.row[i]]
            table.append({
                "query_id": r.query_id, "rollout_index": r.rollout_index, "prompt": tokenizer.decode(list(r.prompt_ids)),
                "completion": r.completion, "reward": results[i].reward, "correct": correct.get(i),
                "sign": sign_of.get(i), "finish_reason": r.finish_reason, "failure_reason": failures[i],
                "completion_ids": list(r.completion_ids), "num_prompt_tokens": len(r.prompt_ids),
                "num_completion_tokens": len(r.completion_ids), "mean_logprob": r.mean_logprob,
                "loss": float(feats.loss[feats.row[i]]) if feats.ok(i) else None,
            })
    return rows, vectors, table, rollout_vectors, target_pass


def _off_policy(queries, refs: _Targets, ref_errors):
    """(manifest rows, {query id: g_j [D] float64}): g_j is the feature of the query with its reference answer."""
    rows, vectors = [], {}
    zero = {"correct": 0, "incorrect": 0, "failed": 0}
    for j, q in enumerate(queries):
        why = ref_errors.get(j) or refs.reason(j)
        if why is None:
            g = refs.features[refs.row[j]].double()
            if float(g.norm()) > 0:
                vectors[q.id] = g
            else:
                why = "zero_vector"
        loss = float(refs.loss[refs.row[j]]) if refs.ok(j) else None
        rows.append(_query_row(q.id, zero, None, loss, why, ref_errors.get(j)))
    return rows, vectors


def _fit_preconditioner(kind, config: BankConfig, featurizer, fisher_data, fisher_adapter, chat_tok, storage_options):
    from drift_stream.formats import collate
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
    rollouts and rollout / reference features are computed (`integrations.ray_bank.RayBankWorkers`: a Ray actor
    pool; its `generate_rollouts` and `featurize_all` have the signatures of this module's); default this process.
    """
    import torch

    from drift_stream.formats import ChatTokenizer, Example
    from drift_stream.grads.features import GradientFeaturizer
    from drift_stream.rollouts.verifiers import VerifyResult, load_verifier, verify_rollouts

    config = config or BankConfig()
    out_dir = Path(out_dir)
    if (out_dir / MANIFEST_FILE).exists() and not overwrite:
        raise BankError(f"{out_dir} already holds a bank: choose another --out or pass --overwrite")
    on_policy = config.targets == "on-policy"
    verifier = load_verifier(verifier) if on_policy else None
    model_path = str(model) if isinstance(model, (str, os.PathLike)) else None
    if model_path is not None:
        from drift_stream.models import load_model, load_tokenizer

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

    rollouts = []
    backend = resolve_backend(config.rollouts.backend, model_path)
    if on_policy and backend == "vllm":  # vLLM runs before the HF model is loaded, so both never share the GPU
        t0 = time.perf_counter()
        rollouts = generate_rollouts(model_path, tokenizer, chat_tok, query_list, config.rollouts, progress)
        timings["generation"] = time.perf_counter() - t0
    if model_path is not None:
        model = load_model(model_path, device=device, dtype=dtype)
    generate = workers.generate_rollouts if workers is not None and backend != "vllm" else generate_rollouts
    featurize_all = workers.featurize_all if workers is not None else None
    if on_policy and backend != "vllm":
        t0 = time.perf_counter()
        rollouts = generate(model, tokenizer, chat_tok, query_list, config.rollouts, progress)
        timings["generation"] = time.perf_counter() - t0
    results: list[VerifyResult] = []
    if on_policy:
        t0 = time.perf_counter()
        by_id = {q.id: q for q in query_list}
        results = verify_rollouts(verifier, [(r.completion, by_id[r.query_id]) for r in rollouts],
                                  config.verifier_timeout_s, progress)
        timings["verification"] = time.perf_counter() - t0
    adaptive = None
    if on_policy and config.max_rollouts is not None:
        import dataclasses

        t0 = time.perf_counter()
        gen_model = model_path if backend == "vllm" else model
        rollouts, results, adaptive = top_up_rollouts(
            lambda qs, seed: generate(gen_model, tokenizer, chat_tok, qs,
                                               dataclasses.replace(config.rollouts, seed=seed), progress),
            lambda rs: verify_rollouts(verifier, [(r.completion, by_id[r.query_id]) for r in rs],
                                       config.verifier_timeout_s, progress),
            query_list, rollouts, results, num_rollouts=config.rollouts.num_rollouts,
            max_rollouts=config.max_rollouts, seed=config.rollouts.seed, correct_threshold=config.correct_threshold)
        timings["adaptive_rollouts"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    featurizer = GradientFeaturizer(model, config.features)
    batch_args = (chat_tok.pad_token_id, config.feature_batch_size)
    # Reference answers: the off-policy targets, and the other side of the proximity gap.
    refs, ref_errors = _encode_all(
        {j: (Example(id=q.id, messages=tuple(q.messages) + ({"role": "assistant", "content": q.reference_response},)),)
         for j, q in enumerate(query_list) if q.reference_response is not None}, chat_tok.encode)
    ref_errors.update({j: "no_reference" for j, q in enumerate(query_list) if q.reference_response is None})
    refs = _Targets(featurizer, refs, *batch_args, "reference", progress,
                    loss_only=on_policy and config.no_contrast != "reference", featurize_all=featurize_all,
                    max_batch_tokens=config.max_batch_tokens)
    ref_loss = {j: float(refs.loss[refs.row[j]]) for j in refs.owners if refs.ok(j)}
    if on_policy:
        # Each rollout's own tokens: prompt + completion, loss on the completion.
        encoded, encode_errors = _encode_all(
            {i: (r.prompt_ids, r.completion_ids, r.query_id) for i, r in enumerate(rollouts)}, chat_tok.encode_rollout)
        feats = _Targets(featurizer, encoded, *batch_args, "rollout features", progress, featurize_all=featurize_all,
                         max_batch_tokens=config.max_batch_tokens)
        rows, vectors, table, rollout_vectors, target_pass = _on_policy(
            query_list, rollouts, results, feats, encode_errors, ref_loss, ref_errors, config, tokenizer,
            refs if config.no_contrast == "reference" else None)
    else:
        (rows, vectors), table, rollout_vectors, target_pass = _off_policy(query_list, refs, ref_errors), [], None, {}
    timings["gradients"] = time.perf_counter() - t0

    truncation = {"rollouts": len(rollouts), "truncated": sum(r.finish_reason == "length" for r in rollouts),
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
        "model": {**fingerprint_model(model), "path": model_path}, "tokenizer": fingerprint_tokenizer(tokenizer),
        "projector": {"fingerprint": fingerprint_projector(spec), "spec": spec},
        "modules": [m["name"] for m in spec["modules"]], "dim": featurizer.dim,
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
                            if k in ("template", "chat_template_sha1", "stop_token_ids")}, **chat_tok.stats()},
        "contrast": {"no_contrast": config.no_contrast, "query_weighting": config.query_weighting,
                     "adaptive": adaptive, "queries": contrast_counts(rows) if on_policy else None,
                     "reference_targets": sum(bool(r["reference_target"]) for r in rows)},
    }
    tensors = {"query_vectors": b.float().contiguous(), "signed_vectors": g.float().contiguous(),
               **{k: v.contiguous() for k, v in pre.state_dict().items()}}
    if rollout_vectors is not None:
        tensors["rollout_vectors"] = rollout_vectors.contiguous()
    if config.query_weighting != "uniform":  # uniform stores none: the scorer takes the plain mean, as before
        tensors["query_weights"] = torch.from_numpy(weights).float().contiguous()
    write_bank(out_dir, tensors, manifest, table)
    logger.info("bank written to %s: %d queries, dim %d, pass rate %s, proximity gap %s", out_dir, len(kept_ids),
                featurizer.dim, manifest["pass_rate"], manifest["proximity_gap"]["gap"])
    return ValidationBank.load(out_dir)


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


def _token_mean(losses, counts) -> float | None:
    pairs = [(x, n) for x, n in zip(losses, counts) if n > 0 and math.isfinite(x)]
    return sum(x * n for x, n in pairs) / sum(n for _, n in pairs) if pairs else None


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _package_version() -> str:
    from drift_stream import __version__

    return __version__
