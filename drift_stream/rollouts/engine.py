"""Rollout engine: K sampled completions per validation query from the model being refined.

HF `generate` is the portable default. Sampling is done by a logits processor that draws each row's token with
that rollout's own CPU generator, seeded from (seed, query id, rollout index), and greedy decoding then takes the
drawn token. So a rollout does not depend on which other rollouts share its batch, on the batch size, or on the
device. vLLM is used when installed and CUDA is present (backend "auto" or "vllm"; not exercised by the tests).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

from drift_stream.errors import ConfigError

logger = logging.getLogger(__name__)

Message = Mapping[str, str]
_BACKENDS = ("hf", "vllm", "auto")
FINISH_REASONS = ("eos", "length")


@dataclass(frozen=True)
class Query:
    """A validation query: the prompt turns, the reference answer, and what a verifier may need."""

    id: str
    messages: tuple[Message, ...]  # prompt turns, ending with the user turn the model answers
    answer: str | None = None  # reference answer, extracted (e.g. "42")
    reference: str | None = None  # the full reference response (off-policy target); None -> `answer`
    task: str | None = None  # e.g. a reasoning-gym dataset name
    metadata: Mapping[str, Any] | None = None  # e.g. a reasoning-gym entry's metadata

    def __post_init__(self):
        if not self.messages or self.messages[-1].get("role") != "user":
            raise ConfigError(f"query {self.id!r} must end with a user turn, got {self.messages!r:.200}")

    @property
    def question(self) -> str:
        return str(self.messages[-1].get("content", ""))

    @property
    def reference_response(self) -> str | None:
        return self.reference if self.reference is not None else self.answer


@dataclass(frozen=True)
class RolloutConfig:
    num_rollouts: int = 8  # K per query
    temperature: float = 1.0  # 0 = greedy (then all K rollouts are the same)
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0
    batch_size: int = 16  # sequences per generate call (HF backend)
    backend: str = "hf"  # "hf" | "vllm" | "auto" (vllm when installed and CUDA is present)

    def __post_init__(self):
        if self.num_rollouts < 1:
            raise ConfigError(f"num_rollouts must be >= 1, got {self.num_rollouts}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.backend not in _BACKENDS:
            raise ConfigError(f"backend must be one of {_BACKENDS}, got {self.backend!r}")


@dataclass(frozen=True)
class Rollout:
    query_id: str
    rollout_index: int
    prompt_ids: tuple[int, ...]  # [P]
    completion_ids: tuple[int, ...]  # [N]; ends with a stop token (EOS, end of turn) when finish_reason == "eos"
    completion: str  # decoded completion, special tokens skipped
    finish_reason: str  # "eos" | "length" (cut by max_new_tokens: truncated)
    mean_logprob: float  # mean over completion tokens of log pi(token | prefix), raw logits (temperature 1)


def rollout_seed(seed: int, query_id: str, rollout_index: int) -> int:
    """A 63-bit seed for one rollout, stable across processes and Python versions."""
    digest = hashlib.sha256(f"{seed}\x00{query_id}\x00{rollout_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the model's generation_config EOS ids."""
    ids: set[int] = set()
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    if not ids:
        raise ConfigError("the tokenizer has no EOS token, so generation could never stop: set tokenizer.eos_token")
    return sorted(ids)


def resolve_backend(backend: str, model: Any = None) -> str:
    """"auto" -> "vllm" when vllm imports, CUDA is present and the model is a directory path; else "hf"."""
    if backend != "auto":
        return backend
    import torch

    if isinstance(model, str) and torch.cuda.is_available():
        try:
            import vllm  # noqa: F401
        except ImportError:
            return "hf"
        return "vllm"
    return "hf"


def generate_rollouts(
    model,
    tokenizer,
    chat_tokenizer,
    queries: Sequence[Query],
    config: RolloutConfig,
    progress: bool = True,
) -> list[Rollout]:
    """K rollouts per query, ordered by (query, rollout index). `model` is a loaded HF causal LM (or, for the vllm
    backend, a model directory path); the prompt is `chat_tokenizer.encode_prompt(query.messages)`."""
    if not queries:
        return []
    ids = [q.id for q in queries]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ConfigError(f"query ids must be unique; repeated: {dup}")
    prompts = [list(chat_tokenizer.encode_prompt(q.messages)) for q in queries]  # each [P_j]
    # end-of-turn tokens of the template (<|im_end|>, <|eot_id|>, ...) and --stop-token end rollouts too
    stops = sorted(getattr(chat_tokenizer, "stop_ids", ()))
    backend = resolve_backend(config.backend, model)
    if backend == "vllm":
        return _generate_vllm(model, tokenizer, queries, prompts, config, progress, stops)
    if isinstance(model, str):
        raise ConfigError("the hf rollout backend needs a loaded model, not a path: load it with drift_stream.model.loading")
    return _generate_hf(model, tokenizer, queries, prompts, config, progress, stops)


class _SeededSampler:
    """LogitsProcessor: draws each row's next token with its own generator; returns a one-hot (0 / -inf) score."""

    def __init__(self, generators, temperature: float, top_p: float):
        self.generators, self.temperature, self.top_p = generators, temperature, top_p

    def __call__(self, input_ids, scores):  # scores [B, V] -> [B, V]
        import torch

        if self.temperature == 0:
            return scores
        logits = scores.detach().float().cpu() / self.temperature
        probs = torch.softmax(logits, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # keep the smallest prefix whose mass reaches top_p (always at least the top token)
            drop = (sorted_probs.cumsum(-1) - sorted_probs) >= self.top_p
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        chosen = torch.stack([torch.multinomial(probs[i], 1, generator=g)[0] for i, g in enumerate(self.generators)])
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(scores.shape[0], device=scores.device), chosen.to(scores.device)] = 0.0
        return out


def _generate_hf(model, tokenizer, queries, prompts, config: RolloutConfig, progress: bool,
                 stop_ids=()) -> list[Rollout]:
    import torch
    from transformers import GenerationConfig, LogitsProcessorList

    from drift_stream.model.losses import completion_logprobs

    eos_ids = sorted(set(eos_token_ids(model, tokenizer)) | set(stop_ids))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    max_positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    longest = max(len(p) for p in prompts)
    if max_positions and longest + config.max_new_tokens > max_positions:
        raise ConfigError(
            f"longest prompt ({longest} tokens) + max_new_tokens ({config.max_new_tokens}) exceeds the model's "
            f"{max_positions} positions: lower max_new_tokens or shorten the queries"
        )
    # Neutral values for every processor a checkpoint's generation_config could switch on: rollouts are samples
    # of pi_theta itself at the configured temperature / top_p, and the log-probs are those of pi_theta.
    gen_config = GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=config.max_new_tokens, min_new_tokens=0,
        eos_token_id=eos_ids, pad_token_id=pad_id, repetition_penalty=1.0, no_repeat_ngram_size=0,
        return_dict_in_generate=True,
    )
    device = next(model.parameters()).device
    jobs = [(j, k) for j in range(len(queries)) for k in range(config.num_rollouts)]
    # Longest prompts first so batches hold similar lengths; results do not depend on this order.
    jobs.sort(key=lambda jk: (-len(prompts[jk[0]]), jk))
    results: dict[tuple[int, int], Rollout] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="rollouts", unit="rollout")
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(jobs), config.batch_size):
            chunk = jobs[start : start + config.batch_size]
            width = max(len(prompts[j]) for j, _ in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # [B, P] left padded
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, (j, _) in enumerate(chunk):
                n = len(prompts[j])
                input_ids[row, width - n :] = torch.tensor(prompts[j], dtype=torch.long)
                attention_mask[row, width - n :] = 1
            generators = [
                torch.Generator().manual_seed(rollout_seed(config.seed, queries[j].id, k)) for j, k in chunk
            ]
            sampler = _SeededSampler(generators, config.temperature, config.top_p)
            with torch.no_grad():
                out = model.generate(
                    input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                    generation_config=gen_config, logits_processor=LogitsProcessorList([sampler]),
                )
            new_tokens = out.sequences[:, width:].cpu()  # [B, N]
            finished = []
            for row, (j, k) in enumerate(chunk):
                tokens = new_tokens[row].tolist()
                end = next((i for i, t in enumerate(tokens) if t in eos_ids), None)
                if end is None:
                    completion, reason = tokens, "length"
                else:
                    completion, reason = tokens[: end + 1], "eos"
                finished.append((j, k, completion, reason))
            # log-probs from the one loss path (drift_stream.model.losses), not generate()'s [B, N, V] step logits
            mean_lps = completion_logprobs(model, [prompts[j] for j, _, _, _ in finished],
                                           [c for _, _, c, _ in finished], pad_id)
            for (j, k, completion, reason), mean_lp in zip(finished, mean_lps.tolist()):
                results[(j, k)] = Rollout(
                    query_id=queries[j].id, rollout_index=k, prompt_ids=tuple(prompts[j]),
                    completion_ids=tuple(completion),
                    completion=tokenizer.decode(completion, skip_special_tokens=True),
                    finish_reason=reason, mean_logprob=float(mean_lp),
                )
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return [results[(j, k)] for j in range(len(queries)) for k in range(config.num_rollouts)]


def _generate_vllm(model, tokenizer, queries, prompts, config: RolloutConfig, progress: bool,
                   stop_ids=()) -> list[Rollout]:
    """vLLM: one request per rollout with its own seed, so rollouts are reproducible per (seed, query, k)."""
    try:
        from vllm import LLM, SamplingParams
    except ImportError as exc:
        raise ConfigError("rollout backend 'vllm' needs vllm: pip install 'drift-stream[vllm]'") from exc
    path = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", None)
    if not path:
        raise ConfigError("the vllm rollout backend needs the model directory path")
    eos_ids = eos_token_ids(model, tokenizer) if not isinstance(model, str) else [tokenizer.eos_token_id]
    eos_ids = sorted(set(eos_ids) | set(stop_ids))
    llm = LLM(model=path, tokenizer=path, seed=config.seed, trust_remote_code=False)
    requests, params, keys = [], [], []
    for j, query in enumerate(queries):
        for k in range(config.num_rollouts):
            requests.append({"prompt_token_ids": prompts[j]})
            params.append(SamplingParams(
                n=1, temperature=config.temperature, top_p=config.top_p, max_tokens=config.max_new_tokens,
                seed=rollout_seed(config.seed, query.id, k) % (2**31), stop_token_ids=eos_ids, logprobs=0,
                skip_special_tokens=True,
            ))
            keys.append((j, k))
    outputs = llm.generate(requests, params, use_tqdm=progress)
    rollouts = []
    for (j, k), output in zip(keys, outputs):
        sample = output.outputs[0]
        tokens = list(sample.token_ids)
        reason = "eos" if tokens and tokens[-1] in eos_ids else "length"
        mean_lp = (sample.cumulative_logprob or 0.0) / max(1, len(tokens))
        rollouts.append(Rollout(
            query_id=queries[j].id, rollout_index=k, prompt_ids=tuple(prompts[j]), completion_ids=tuple(tokens),
            completion=sample.text, finish_reason=reason, mean_logprob=float(mean_lp),
        ))
    return rollouts


# ------------------------------------------------------------------------------------------------ reading queries


def _parse_metadata(value: Any) -> Mapping | None:
    from drift_stream.data.example_types import RowError

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


def query_from_example(example, row: Mapping[str, Any] | None = None) -> Query:
    """A Query from an adapter's Example (a trailing assistant turn becomes the reference) plus the row's optional
    `task` and `metadata` (a dict or a JSON string) columns."""
    from drift_stream.data.example_types import RowError

    row = row or {}
    messages = list(example.messages or ())
    reference = example.reference
    if messages and messages[-1].get("role") == "assistant":
        reference = reference if reference is not None else messages[-1]["content"]
        messages = messages[:-1]
    if not messages or messages[-1].get("role") != "user":
        raise RowError("no_user_turn")
    task = row.get("task")
    return Query(id=example.id, messages=tuple(messages), answer=example.answer, reference=reference,
                 task=None if task is None else str(task), metadata=_parse_metadata(row.get("metadata")))


def iter_input_rows(source, storage_options=None) -> Iterator[tuple[Any, str | None]]:
    """(row, None), or (None, reason) for an undecodable line, from URL(s) read by drift_stream.io.streams, or the
    items of any other iterable as they are."""
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
    """(queries, rejected [{"index", "id", "reason"}]) from URL(s) or rows (read with `adapter`), Examples or
    Queries. Rejected rows are returned and logged, never dropped silently; duplicate ids are rejected."""
    from drift_stream.data.example_types import Example, RowError
    from drift_stream.data.formats import load_adapter

    adapter = load_adapter(adapter) if isinstance(adapter, (str, os.PathLike)) else adapter
    queries, rejected, seen = [], [], set()
    for index, (item, reason) in enumerate(iter_input_rows(source, storage_options)):
        qid = None
        try:
            if reason is not None:
                raise RowError(reason)
            if isinstance(item, Query):
                query = item
            elif isinstance(item, Example):
                query = query_from_example(item)
            else:
                query = query_from_example(adapter.to_example(item), item)
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
