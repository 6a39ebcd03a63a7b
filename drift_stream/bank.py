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

Bank directory (fixed names): bank.safetensors, manifest.json (schemas/bank_manifest.schema.json), rollouts.parquet.
Proximity gap of a query: reference_loss - rollout_loss (token-weighted mean NLL of all its rollouts); overall: the
mean over the queries that have both.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from drift_stream.errors import BankError, BankMismatchError, ConfigError
from drift_stream.grads.projection import FeatureConfig
from drift_stream.rollouts.engine import Query, RolloutConfig, generate_rollouts, resolve_backend

logger = logging.getLogger(__name__)

BANK_FORMAT_VERSION = 1
TENSORS_FILE, MANIFEST_FILE, ROLLOUTS_FILE = "bank.safetensors", "manifest.json", "rollouts.parquet"
SIGNINGS = ("sign", "advantage", "advantage_std", "positive")
TARGETS = ("on-policy", "off-policy")
PRECONDITIONERS = ("identity", "diagonal", "block")
_FINGERPRINT_SAMPLE = 65536  # elements hashed per parameter tensor (evenly strided): fast on 7B models


@dataclass(frozen=True)
class BankConfig:
    signing: str = "sign"  # --signing
    targets: str = "on-policy"  # --targets
    preconditioner: str = "block"  # --preconditioner; identity is used when no fisher_data is given
    damping: float = 0.1  # --damping: lambda = damping x mean eigenvalue
    normalize: bool = True  # unit-norm b_j
    correct_threshold: float = 1.0  # a rollout is correct when reward >= this
    beta: float | str = "auto"  # default debiasing exponent recorded for the scorer
    fisher_examples: int = 1000  # --fisher-examples: rows of fisher_data used
    rollouts: RolloutConfig = field(default_factory=RolloutConfig)  # --rollouts K -> rollouts.num_rollouts
    features: FeatureConfig = field(default_factory=FeatureConfig)
    feature_batch_size: int = 8
    max_tokens: int = 2048  # prompt + completion tokens per featurized sequence
    verifier_timeout_s: float | None = 10.0
    save_rollout_vectors: bool = False

    def __post_init__(self):
        for name, value, allowed in (("signing", self.signing, SIGNINGS), ("targets", self.targets, TARGETS),
                                     ("preconditioner", self.preconditioner, PRECONDITIONERS)):
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {value!r}")
        if not (isinstance(self.damping, (int, float)) and self.damping >= 0):
            raise ConfigError(f"damping must be a number >= 0, got {self.damping!r}")
        if not 0.0 < self.correct_threshold <= 1.0:
            raise ConfigError(f"correct_threshold must be in (0, 1], got {self.correct_threshold}")
        if not (self.beta == "auto" or (isinstance(self.beta, (int, float)) and math.isfinite(self.beta))):
            raise ConfigError(f"beta must be a number or 'auto', got {self.beta!r}")
        for name in ("fisher_examples", "feature_batch_size", "max_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.verifier_timeout_s is not None and not self.verifier_timeout_s > 0:
            raise ConfigError(f"verifier_timeout_s must be > 0 or None, got {self.verifier_timeout_s}")

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("rollouts", "features")}
        out["rollouts"] = {k: getattr(self.rollouts, k) for k in self.rollouts.__dataclass_fields__}
        out["features"] = self.features.to_dict()
        return out


# --------------------------------------------------------------------------------------------------- fingerprints


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def fingerprint_model(model) -> dict:
    """{"fingerprint", "config_sha256", "params_sha256", "num_parameters", "method"} of a loaded model.

    config: its to_dict() without private / version keys. params: every parameter's name, dtype, shape and up to
    65536 evenly strided elements (raw bytes), so two checkpoints differing anywhere a fine-tune touches differ."""
    import torch

    config = {k: v for k, v in model.config.to_dict().items()
              if not k.startswith("_") and k not in ("transformers_version", "name_or_path")}
    config_sha = _sha256_json(config)
    h = hashlib.sha256()
    total = 0
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            flat = p.detach().reshape(-1)
            total += flat.numel()
            h.update(f"{name}|{p.dtype}|{tuple(p.shape)}|".encode())
            if flat.numel() > _FINGERPRINT_SAMPLE:
                idx = torch.linspace(0, flat.numel() - 1, _FINGERPRINT_SAMPLE, device=flat.device).long()
                flat = flat[idx]
            h.update(flat.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    params_sha = h.hexdigest()
    return {"fingerprint": hashlib.sha256(f"{config_sha}:{params_sha}".encode()).hexdigest(),
            "config_sha256": config_sha, "params_sha256": params_sha, "num_parameters": total,
            "method": f"sampled-{_FINGERPRINT_SAMPLE}-v1"}


def fingerprint_tokenizer(tokenizer) -> dict:
    """{"fingerprint", "vocab_size", "chat_template_sha256"}: vocabulary, special tokens and chat template."""
    template = getattr(tokenizer, "chat_template", None)
    special = {k: str(v) for k, v in (getattr(tokenizer, "special_tokens_map", None) or {}).items()}
    body = {"vocab": sorted(tokenizer.get_vocab().items()), "special": special,
            "ids": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
            "chat_template": template}
    return {"fingerprint": _sha256_json(body), "vocab_size": len(tokenizer.get_vocab()),
            "chat_template_sha256": None if template is None else hashlib.sha256(str(template).encode()).hexdigest()}


def fingerprint_projector(spec: Mapping[str, Any]) -> str:
    """sha256 of a featurizer's spec() (projector, seed, modules and shapes, layout)."""
    return _sha256_json(spec)


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


# --------------------------------------------------------------------------------------------------- inputs


def _parse_metadata(value: Any) -> Mapping | None:
    from drift_stream.formats import RowError

    if value is None or isinstance(value, Mapping):
        return value
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            raise RowError("invalid_json:metadata") from None
        if isinstance(parsed, Mapping):
            return parsed
    raise RowError("wrong_type:metadata")


def query_from_row(row: Mapping[str, Any], adapter) -> Query:
    """A Query from one input row: the adapter's example plus optional `task` and `metadata` (dict or JSON) columns."""
    from drift_stream.formats import RowError

    example = adapter.to_example(row)
    messages = list(example.messages or ())
    reference = example.reference
    if messages and messages[-1].get("role") == "assistant":  # a chat row: its last assistant turn is the reference
        reference = reference if reference is not None else messages[-1]["content"]
        messages = messages[:-1]
    if not messages or messages[-1].get("role") != "user":
        raise RowError("no_user_turn")
    task = row.get("task")
    return Query(id=example.id, messages=tuple(messages), answer=example.answer, reference=reference,
                 task=None if task is None else str(task), metadata=_parse_metadata(row.get("metadata")))


def _iter_rows(source, storage_options=None) -> Iterable[tuple[dict | None, str | None]]:
    """(row, None) or (None, reason) from URLs (via drift_stream.io.streams) or an iterable of rows."""
    if isinstance(source, (str, os.PathLike)) or (
        isinstance(source, (list, tuple)) and source and all(isinstance(s, (str, os.PathLike)) for s in source)
    ):
        from drift_stream.io import streams

        urls = [str(source)] if isinstance(source, (str, os.PathLike)) else [str(s) for s in source]
        for file in streams.expand_inputs(urls, storage_options):
            schema = streams.input_schema(file, storage_options)
            for chunk in streams.iter_chunks(file, schema, 1024, storage_options):
                for bad in chunk.bad_rows:
                    yield None, bad.reason
                yield from ((row, None) for row in chunk.table.to_pylist())
    else:
        yield from ((row, None) for row in source)


def load_queries(source, adapter="qa", storage_options=None) -> tuple[list[Query], list[dict]]:
    """(queries, rejected [{"index", "id", "reason"}]) from URLs, rows, Examples or Queries."""
    from drift_stream.formats import Example, RowError, load_adapter

    adapter = load_adapter(adapter) if isinstance(adapter, (str, os.PathLike)) else adapter
    queries, rejected, seen = [], [], set()
    for index, (item, reason) in enumerate(_iter_rows(source, storage_options)):
        qid = None
        try:
            if reason is not None:
                raise RowError(reason)
            if isinstance(item, Query):
                query = item
            elif isinstance(item, Example):
                query = query_from_row({}, _ExampleAdapter(item))
            else:
                query = query_from_row(item, adapter)
            qid = query.id
            if qid in seen:
                raise RowError("duplicate_id")
        except RowError as exc:
            rejected.append({"index": index, "id": qid, "reason": exc.reason})
            continue
        seen.add(qid)
        queries.append(query)
    if rejected:
        logger.warning("%d validation queries rejected (first: %s)", len(rejected), rejected[0])
    if not queries:
        raise ConfigError(f"no usable validation queries ({len(rejected)} rejected): check --queries and --adapter")
    return queries, rejected


class _ExampleAdapter:
    def __init__(self, example):
        self.example = example

    def to_example(self, row):
        return self.example


def _iter_fisher_examples(fisher_data, adapter, chat_tokenizer, limit: int, storage_options=None):
    """Tokenized training rows (at most `limit`) and a {reason: count} of the ones that could not be used."""
    from drift_stream.formats import Example, RowError, TokenizedExample, load_adapter

    adapter = load_adapter(adapter) if isinstance(adapter, (str, os.PathLike)) else adapter
    rejected: dict[str, int] = {}
    out = []
    for item, reason in _iter_rows(fisher_data, storage_options):
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


# --------------------------------------------------------------------------------------------------- features


def _featurize_all(featurizer, examples, pad_id: int, batch_size: int, desc: str, progress: bool, loss_only=False):
    """(features [N, D] float32 | None, loss [N] float64, num_tokens [N], bad list) over tokenized examples."""
    import torch

    from drift_stream.formats import collate

    feats, losses, counts, bad = [], [], [], []
    bar = None
    if progress and examples:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(examples), desc=desc, unit="seq")
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad_id, padding_side="right")
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
        if bar is not None:
            bar.update(len(row_bad))
    if bar is not None:
        bar.close()
    if not examples:
        return None, torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.long), []
    return (None if loss_only else torch.cat(feats)), torch.cat(losses), torch.cat(counts), bad


def _token_mean(losses, counts) -> float | None:
    pairs = [(x, n) for x, n in zip(losses, counts) if n > 0 and math.isfinite(x)]
    return sum(x * n for x, n in pairs) / sum(n for _, n in pairs) if pairs else None


# --------------------------------------------------------------------------------------------------- build


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
) -> "ValidationBank":
    """Build a bank directory at `out_dir` and return it loaded.

    model: HF model directory (or a loaded model with `tokenizer=`). queries: URL(s) (parquet / jsonl, read with
    `adapter`), or rows / Examples / Queries. verifier: a spec for `load_verifier` or a Verifier. fisher_data:
    URL(s), rows (read with `fisher_adapter`), Examples or TokenizedExamples of the training pool.
    """
    import torch

    from drift_stream.formats import ChatTokenizer, Example, RowError, collate
    from drift_stream.grads.features import GradientFeaturizer
    from drift_stream.grads.precondition import Preconditioner, PreconditionerConfig
    from drift_stream.rollouts.verifiers import load_verifier, verify_rollouts

    config = config or BankConfig()
    out_dir = Path(out_dir)
    if (out_dir / MANIFEST_FILE).exists() and not overwrite:
        raise BankError(f"{out_dir} already holds a bank: choose another --out or pass --overwrite")
    on_policy = config.targets == "on-policy"
    verifier = load_verifier(verifier) if on_policy else None
    if isinstance(model, (str, os.PathLike)):
        from drift_stream.models import load_model, load_tokenizer

        model_path = str(model)
        tokenizer = tokenizer or load_tokenizer(model_path)
    else:
        model_path = None
        if tokenizer is None:
            raise ConfigError("build_bank got a loaded model: pass its tokenizer= too")
    chat_tok = ChatTokenizer(tokenizer, max_tokens=config.max_tokens)
    query_list, rejected = load_queries(queries, adapter, storage_options)
    prompts_ok = []
    for q in query_list:
        try:
            chat_tok.encode_prompt(q.messages)
            prompts_ok.append(q)
        except RowError as exc:
            rejected.append({"index": None, "id": q.id, "reason": exc.reason})
    timings = {"generation": 0.0, "verification": 0.0, "gradients": 0.0, "preconditioner": 0.0}

    rollouts = []
    backend = resolve_backend(config.rollouts.backend, model_path)
    if on_policy and backend == "vllm":  # vLLM runs before the HF model is loaded, so both never share the GPU
        t0 = time.perf_counter()
        rollouts = generate_rollouts(model_path, tokenizer, chat_tok, prompts_ok, config.rollouts, progress)
        timings["generation"] = time.perf_counter() - t0
    if model_path is not None:
        model = load_model(model_path, device=device, dtype=dtype)
    if on_policy and backend != "vllm":
        t0 = time.perf_counter()
        rollouts = generate_rollouts(model, tokenizer, chat_tok, prompts_ok, config.rollouts, progress)
        timings["generation"] = time.perf_counter() - t0

    by_id = {q.id: q for q in prompts_ok}
    rewards: list[float | None] = []
    failures: list[str | None] = []
    if on_policy:
        t0 = time.perf_counter()
        results = verify_rollouts(verifier, [(r.completion, by_id[r.query_id]) for r in rollouts],
                                  config.verifier_timeout_s, progress)
        timings["verification"] = time.perf_counter() - t0
        rewards = [res.reward for res in results]
        failures = [res.failure for res in results]

    t0 = time.perf_counter()
    featurizer = GradientFeaturizer(model, config.features)
    pad_id = chat_tok.pad_token_id
    # Targets: each rollout's own tokens (on-policy) or the reference answer (off-policy), loss on the response.
    target_examples, target_owner = [], []  # owner: index into rollouts (on-policy) or query (off-policy)
    target_errors: dict[int, str] = {}
    if on_policy:
        for i, r in enumerate(rollouts):
            try:
                target_examples.append(chat_tok.encode_rollout(r.prompt_ids, r.completion_ids, id=r.query_id))
                target_owner.append(i)
            except RowError as exc:
                target_errors[i] = exc.reason
    refs, ref_owner, ref_errors = [], [], {}
    for j, q in enumerate(prompts_ok):
        if q.reference_response is None:
            ref_errors[j] = "no_reference"
            continue
        try:
            ref = Example(id=q.id, messages=tuple(q.messages) + ({"role": "assistant", "content": q.reference_response},))
            refs.append(chat_tok.encode(ref))
            ref_owner.append(j)
        except RowError as exc:
            ref_errors[j] = exc.reason
    feats, t_loss, t_count, t_bad = _featurize_all(featurizer, target_examples if on_policy else refs, pad_id,
                                                   config.feature_batch_size, "features", progress)
    _, r_loss, r_count, r_bad = (
        _featurize_all(featurizer, refs, pad_id, config.feature_batch_size, "reference loss", progress, loss_only=True)
        if on_policy else (None, t_loss, t_count, t_bad)
    )
    timings["gradients"] = time.perf_counter() - t0
    dim = featurizer.dim

    ref_loss = {ref_owner[i]: float(r_loss[i]) for i in range(len(ref_owner)) if r_bad[i] is None}
    per_query = []  # manifest rows
    signed = []  # g_j in float64, for queries kept
    kept_ids = []
    rollout_rows = []  # parquet rows
    rollout_vectors = torch.zeros(len(rollouts), dim) if (on_policy and config.save_rollout_vectors) else None
    row_of = {owner: i for i, owner in enumerate(target_owner)}  # rollout index -> feature row
    if on_policy:
        start = 0
        for j, q in enumerate(prompts_ok):
            k_all = config.rollouts.num_rollouts
            idx = list(range(start, start + k_all))
            start += k_all
            valid, counts = [], {"correct": 0, "incorrect": 0, "failed": 0}
            losses, tokens = [], []
            for i in idx:
                reason = failures[i] or target_errors.get(i)
                if reason is None and t_bad[row_of[i]] is not None:
                    reason = f"features:{t_bad[row_of[i]]}"
                failures[i] = reason
                if i in row_of and t_bad[row_of[i]] is None:
                    losses.append(float(t_loss[row_of[i]]))
                    tokens.append(int(t_count[row_of[i]]))
                    if rollout_vectors is not None:
                        rollout_vectors[i] = feats[row_of[i]]
                if reason is not None:
                    counts["failed"] += 1
                    continue
                correct = rewards[i] >= config.correct_threshold - 1e-12
                counts["correct" if correct else "incorrect"] += 1
                valid.append(i)
            weights, why = signed_weights([rewards[i] for i in valid], config.signing, config.correct_threshold)
            sign_of = dict(zip(valid, weights or []))
            for i in idx:
                r = rollouts[i]
                rollout_rows.append({
                    "query_id": r.query_id, "rollout_index": r.rollout_index,
                    "prompt": tokenizer.decode(list(r.prompt_ids)), "completion": r.completion,
                    "reward": rewards[i], "correct": None if failures[i] else rewards[i] >= config.correct_threshold - 1e-12,
                    "sign": sign_of.get(i), "finish_reason": r.finish_reason, "failure_reason": failures[i],
                    "completion_ids": list(r.completion_ids), "num_prompt_tokens": len(r.prompt_ids),
                    "num_completion_tokens": len(r.completion_ids), "mean_logprob": r.mean_logprob,
                    "loss": float(t_loss[row_of[i]]) if i in row_of and t_bad[row_of[i]] is None else None,
                })
            vector = None
            if weights is not None:
                stack = feats[[row_of[i] for i in valid]].double()  # [K_j, D]
                vector = (torch.tensor(weights, dtype=torch.float64) @ stack) / len(valid)  # [D]
                if not float(vector.norm()) > 0:
                    vector, why = None, "zero_vector"
            rollout_loss = _token_mean(losses, tokens)
            per_query.append(_query_row(q.id, counts, rollout_loss, ref_loss.get(j), why, ref_errors.get(j)))
            if vector is not None:
                signed.append(vector)
                kept_ids.append(q.id)
    else:
        feat_row = {owner: i for i, owner in enumerate(ref_owner)}
        for j, q in enumerate(prompts_ok):
            why = ref_errors.get(j)
            if why is None and t_bad[feat_row[j]] is not None:
                why = f"features:{t_bad[feat_row[j]]}"
            vector = feats[feat_row[j]].double() if why is None else None
            if vector is not None and not float(vector.norm()) > 0:
                vector, why = None, "zero_vector"
            per_query.append(_query_row(q.id, {"correct": 0, "incorrect": 0, "failed": 0}, None, ref_loss.get(j),
                                        why, ref_errors.get(j)))
            if vector is not None:
                signed.append(vector)
                kept_ids.append(q.id)

    excluded = [row for row in per_query if row["excluded"]]
    if excluded:
        logger.warning("%d of %d queries carry no signal under signing %r and are left out of the bank "
                       "(first: %s: %s)", len(excluded), len(per_query), config.signing, excluded[0]["id"],
                       excluded[0]["excluded"])
    if not signed:
        raise BankError(f"no query carries a signal under signing {config.signing!r}: all {len(per_query)} were "
                        "excluded (see the warnings); try --signing sign or more --rollouts")
    g = torch.stack(signed)  # [m, D] float64

    t0 = time.perf_counter()
    kind = config.preconditioner
    fisher_info = {"examples_used": 0, "rejected": {}}
    if fisher_data is None and kind != "identity":
        logger.warning("no fisher data given: using the identity preconditioner instead of %r", kind)
        kind = "identity"
    pre = Preconditioner(PreconditionerConfig(kind=kind, damping=config.damping), featurizer.block_sizes)
    if kind != "identity":
        fisher_examples, fisher_rejected = _iter_fisher_examples(fisher_data, fisher_adapter, chat_tok,
                                                                 config.fisher_examples, storage_options)
        if not fisher_examples:
            raise ConfigError(f"--fisher-data gave no usable training rows (rejected: {fisher_rejected})")
        for s in range(0, len(fisher_examples), config.feature_batch_size):
            out = featurizer.featurize(collate(fisher_examples[s : s + config.feature_batch_size], pad_id))
            pre.update(out.features, out.bad)
        pre.finalize()
        fisher_info = {"examples_used": pre.count, "skipped": pre.skipped, "rejected": fisher_rejected}
    b = pre.apply(g)  # [m, D] float64
    if config.normalize:
        b = b / b.norm(dim=1, keepdim=True)
    timings["preconditioner"] = time.perf_counter() - t0

    gaps = [row["proximity_gap"] for row in per_query if row["proximity_gap"] is not None]
    scored = [row for row in per_query if row["correct"] + row["incorrect"] > 0]
    spec = featurizer.spec()
    manifest = {
        "format": "drift-stream-bank", "format_version": BANK_FORMAT_VERSION, "version": _package_version(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {**fingerprint_model(model), "path": model_path},
        "tokenizer": fingerprint_tokenizer(tokenizer),
        "projector": {"fingerprint": fingerprint_projector(spec), "spec": spec},
        "modules": [m["name"] for m in spec["modules"]], "dim": dim,
        "signing": config.signing, "targets": config.targets,
        "verifier": None if verifier is None else verifier.spec(),
        "preconditioner": {"kind": kind, "damping": config.damping, **fisher_info},
        "normalize": config.normalize, "beta": config.beta, "config": config.to_dict(),
        "num_queries": len(kept_ids), "query_ids": kept_ids, "queries": per_query, "rejected_queries": rejected,
        "pass_rate": (sum(r["correct"] for r in scored) / sum(r["correct"] + r["incorrect"] for r in scored)
                      if scored else None),
        "proximity_gap": {
            "gap": sum(gaps) / len(gaps) if gaps else None, "num_queries": len(gaps),
            "rollout_loss": _mean([r["rollout_loss"] for r in per_query if r["proximity_gap"] is not None]),
            "reference_loss": _mean([r["reference_loss"] for r in per_query if r["proximity_gap"] is not None]),
        },
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
    }
    tensors = {"query_vectors": b.float().contiguous(), "signed_vectors": g.float().contiguous()}
    if rollout_vectors is not None:
        tensors["rollout_vectors"] = rollout_vectors.contiguous()
    tensors.update({k: v.contiguous() for k, v in pre.state_dict().items()})
    write_bank(out_dir, tensors, manifest, rollout_rows)
    logger.info("bank written to %s: %d queries, dim %d, pass rate %s, proximity gap %s", out_dir, len(kept_ids),
                dim, manifest["pass_rate"], manifest["proximity_gap"]["gap"])
    return ValidationBank.load(out_dir)


def _query_row(qid, counts, rollout_loss, reference_loss, excluded, ref_error) -> dict:
    n = counts["correct"] + counts["incorrect"]
    gap = None if rollout_loss is None or reference_loss is None else reference_loss - rollout_loss
    return {"id": qid, **counts, "pass_rate": counts["correct"] / n if n else None, "rollout_loss": rollout_loss,
            "reference_loss": reference_loss, "proximity_gap": gap, "excluded": excluded,
            "reference_error": ref_error}


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _package_version() -> str:
    from drift_stream import __version__

    return __version__


# --------------------------------------------------------------------------------------------------- on disk

def _rollouts_schema():
    import pyarrow as pa

    return pa.schema([
        ("query_id", pa.string()), ("rollout_index", pa.int32()), ("prompt", pa.string()), ("completion", pa.string()),
        ("reward", pa.float64()), ("correct", pa.bool_()), ("sign", pa.float64()), ("finish_reason", pa.string()),
        ("failure_reason", pa.string()), ("completion_ids", pa.list_(pa.int32())), ("num_prompt_tokens", pa.int32()),
        ("num_completion_tokens", pa.int32()), ("mean_logprob", pa.float64()), ("loss", pa.float64()),
    ])


def write_bank(out_dir: Path, tensors: dict, manifest: dict, rollout_rows: list[dict]) -> None:
    """Each file written under a temporary name then renamed; manifest.json last (it marks a complete bank)."""
    import jsonschema
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors.torch import save_file

    jsonschema.validate(manifest, _manifest_schema())
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)
    tmp = out_dir / f".{TENSORS_FILE}.tmp"
    save_file(tensors, str(tmp), metadata={"format": "drift-stream-bank", "format_version": str(BANK_FORMAT_VERSION)})
    os.replace(tmp, out_dir / TENSORS_FILE)
    tmp = out_dir / f".{ROLLOUTS_FILE}.tmp"
    pq.write_table(pa.Table.from_pylist(rollout_rows, schema=_rollouts_schema()), str(tmp))
    os.replace(tmp, out_dir / ROLLOUTS_FILE)
    tmp = out_dir / f".{MANIFEST_FILE}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False, allow_nan=False) + "\n")
    os.replace(tmp, out_dir / MANIFEST_FILE)


def _manifest_schema() -> dict:
    from importlib import resources

    return json.loads((resources.files("drift_stream") / "schemas" / "bank_manifest.schema.json").read_text())


class ValidationBank:
    """A bank directory, loaded: query_vectors [m, D] float32 (the b_j), signed_vectors [m, D] (the g_j),
    rollout_vectors [R, D] or None, preconditioner tensors, and the manifest."""

    def __init__(self, path: Path, manifest: dict, tensors: dict):
        self.path, self.manifest = path, manifest
        self.query_vectors = tensors["query_vectors"]
        self.signed_vectors = tensors["signed_vectors"]
        self.rollout_vectors = tensors.get("rollout_vectors")
        self.preconditioner_state = {k: v for k, v in tensors.items() if k.startswith("preconditioner.")}
        self.query_ids: list[str] = list(manifest["query_ids"])
        self.dim: int = manifest["dim"]
        self.beta = manifest["beta"]
        self.mismatches: list[str] = []

    @classmethod
    def load(cls, path, *, model=None, tokenizer=None, featurizer=None, allow_mismatch: bool = False):
        """Read and validate a bank; refuse a different model / tokenizer / projector unless allow_mismatch."""
        import jsonschema
        from safetensors.torch import load_file

        path = Path(path)
        for name in (MANIFEST_FILE, TENSORS_FILE, ROLLOUTS_FILE):
            if not (path / name).is_file():
                raise BankError(f"{path} is not a complete bank: {name} is missing (rebuild it with drift-stream bank build)")
        try:
            manifest = json.loads((path / MANIFEST_FILE).read_text())
            jsonschema.validate(manifest, _manifest_schema())
        except (json.JSONDecodeError, jsonschema.ValidationError) as exc:
            raise BankError(f"{path / MANIFEST_FILE} is not a valid bank manifest: {str(exc).splitlines()[0]}") from exc
        if manifest["format_version"] != BANK_FORMAT_VERSION:
            raise BankError(f"bank format version {manifest['format_version']} at {path} is not supported "
                            f"(this drift-stream reads version {BANK_FORMAT_VERSION}): rebuild the bank")
        try:
            tensors = load_file(str(path / TENSORS_FILE))
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise BankError(f"{path / TENSORS_FILE} cannot be read: {exc}") from exc
        shape = tuple(tensors.get("query_vectors", _Absent).shape)
        if shape != (manifest["num_queries"], manifest["dim"]):
            raise BankError(f"{path / TENSORS_FILE}: query_vectors is {shape}, the manifest says "
                            f"({manifest['num_queries']}, {manifest['dim']}): the bank is corrupt, rebuild it")
        bank = cls(path, manifest, tensors)
        checks = []
        if model is not None:
            checks.append(("model", manifest["model"]["fingerprint"], fingerprint_model(model)["fingerprint"]))
        if tokenizer is not None:
            checks.append(("tokenizer", manifest["tokenizer"]["fingerprint"], fingerprint_tokenizer(tokenizer)["fingerprint"]))
        if featurizer is not None:
            checks.append(("projector", manifest["projector"]["fingerprint"], fingerprint_projector(featurizer.spec())))
        for what, built, given in checks:
            if built != given:
                message = (f"bank {path} was built for {what} {built[:16]}, this {what} is {given[:16]}: "
                           "rebuild the bank or pass --allow-mismatch")
                if not allow_mismatch:
                    raise BankMismatchError(message)
                logger.warning("%s (allowed by allow_mismatch)", message)
                bank.mismatches.append(what)
        return bank

    def rollouts(self):
        """rollouts.parquet as a pyarrow Table."""
        import pyarrow.parquet as pq

        return pq.read_table(str(self.path / ROLLOUTS_FILE))

    def preconditioner(self):
        from drift_stream.grads.precondition import Preconditioner

        return Preconditioner.from_state_dict(self.preconditioner_state)

    def summary(self) -> str:
        """A readable summary for `drift-stream bank info`."""
        m = self.manifest
        gap = m["proximity_gap"]
        pre = m["preconditioner"]
        lines = [
            f"bank {self.path}  (drift-stream {m['version']}, format {m['format_version']}, {m['created_at']})",
            f"  model      {m['model']['fingerprint'][:16]}  {m['model'].get('path') or ''}  "
            f"({m['model']['num_parameters']:,} parameters)",
            f"  tokenizer  {m['tokenizer']['fingerprint'][:16]}  (vocab {m['tokenizer']['vocab_size']})",
            f"  projector  {m['projector']['fingerprint'][:16]}  dim {m['dim']} over {len(m['modules'])} modules",
            f"  targets    {m['targets']}  signing {m['signing']}  verifier {m['verifier']}  beta {m['beta']}",
            f"  precond.   {pre['kind']} (damping {pre['damping']}, {pre['examples_used']} fisher rows)  "
            f"normalize {m['normalize']}",
            f"  queries    {m['num_queries']} in the bank, {len(m['queries']) - m['num_queries']} excluded, "
            f"{len(m['rejected_queries'])} rejected",
            f"  pass rate  {_fmt(m['pass_rate'])}",
            f"  proximity gap {_fmt(gap['gap'])} over {gap['num_queries']} queries "
            f"(reference loss {_fmt(gap['reference_loss'])} - rollout loss {_fmt(gap['rollout_loss'])})",
        ]
        excluded: dict[str, int] = {}
        for row in m["queries"]:
            if row["excluded"]:
                excluded[row["excluded"]] = excluded.get(row["excluded"], 0) + 1
        if excluded:
            lines.append("  excluded   " + ", ".join(f"{k}: {v}" for k, v in sorted(excluded.items())))
        lines.append("  id                          correct incorrect failed  pass   gap")
        for row in m["queries"][:20]:
            lines.append(f"  {row['id'][:26]:<26} {row['correct']:>8} {row['incorrect']:>9} {row['failed']:>6} "
                         f"{_fmt(row['pass_rate']):>5} {_fmt(row['proximity_gap']):>6}"
                         + (f"  excluded: {row['excluded']}" if row["excluded"] else ""))
        if len(m["queries"]) > 20:
            lines.append(f"  ... {len(m['queries']) - 20} more (manifest.json)")
        return "\n".join(lines)


class _Absent:
    shape = None


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"
