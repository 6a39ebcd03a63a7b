"""A small plain-PyTorch SFT loop that honours per-row weights, the weighted loss every trainer here shares, and
greedy accuracy for evaluation.

`weighted_example_loss` is THE weighted SFT loss: `train_sft` (the benchmark's continued SFT and the tiny model's
recipe) and `integrations.trl.WeightedSFTTrainer` (what users run) both call it, so the benchmark trains through the
same loss users get. The batch loss is sum_i w_i * l_i / N, with l_i the mean NLL of row i's loss tokens and N the
rows of the whole optimiser step, so weights with mean 1 keep the loss scale. Rows of weight 0 are never drawn:
training with them is exactly training without them. `train_sft` is deterministic under `seed` (data order from a
seeded generator; no dropout), for a fixed torch thread count.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from drift_stream.data.example_types import Example, RowError, TokenizedExample
from drift_stream.data.tokenization import ChatTokenizer, collate
from drift_stream.errors import ConfigError
from drift_stream.model.losses import weighted_example_loss

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SFTConfig:
    """Optimiser and schedule of `train_sft`: AdamW, linear warmup, cosine decay to `min_lr_ratio * lr`."""

    steps: int
    batch_size: int
    lr: float
    seed: int = 0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = 1.0
    max_tokens: int = 256
    max_batch_tokens: int = 2048  # padded tokens per forward pass; changes speed and memory, not the result
    log_every: int = 50

    def __post_init__(self):
        if self.steps < 0:
            raise ConfigError(f"steps must be >= 0, got {self.steps}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if not 0 <= self.warmup_steps <= max(self.steps, 0):
            raise ConfigError(f"warmup_steps must be in [0, steps={self.steps}], got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"grad_clip must be > 0 or None, got {self.grad_clip}")
        if self.max_batch_tokens < 1:
            raise ConfigError(f"max_batch_tokens must be >= 1, got {self.max_batch_tokens}")
        if self.max_tokens < 2:
            raise ConfigError(f"max_tokens must be >= 2, got {self.max_tokens}")

    def lr_at(self, step: int) -> float:
        """Learning rate of optimiser step `step` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        floor = self.min_lr_ratio * self.lr
        return floor + (self.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class SFTResult:
    losses: list[float] = field(default_factory=list)  # weighted batch loss per step
    rows_used: int = 0  # rows with weight > 0 that training drew from
    tokens_seen: int = 0  # loss tokens over all steps
    wall_s: float = 0.0


def encode_rows(tokenizer, rows: Sequence[Mapping[str, Any]], *, max_tokens: int = 256) -> list[TokenizedExample]:
    """Tokenize `messages`-form rows with `formats.ChatTokenizer` (loss on assistant tokens). Raises RowError."""
    chat = ChatTokenizer(tokenizer, max_tokens=max_tokens)
    out = []
    for i, row in enumerate(rows):
        if "messages" not in row:
            raise RowError("missing_field:messages")
        messages = tuple(dict(m) for m in row["messages"])
        out.append(chat.encode(Example(id=str(row.get("id", i)), messages=messages)))
    return out


def _resolve_weights(rows, weights) -> list[float]:
    if weights is None:
        weights = [row.get("weight", 1.0) if isinstance(row, Mapping) else 1.0 for row in rows]
    weights = [float(w) for w in weights]
    if len(weights) != len(rows):
        raise ConfigError(f"weights has {len(weights)} entries for {len(rows)} rows")
    bad = [(i, w) for i, w in enumerate(weights) if not (math.isfinite(w) and w >= 0)]
    if bad:
        raise ConfigError(f"weights must be finite and >= 0; first bad: row {bad[0][0]} has {bad[0][1]}")
    return weights


def _micro_batches(idx: list[int], examples: Sequence[TokenizedExample], max_batch_tokens: int) -> list[list[int]]:
    """Split a batch into length-sorted micro-batches of at most `max_batch_tokens` padded tokens (>= 1 row each)."""
    groups: list[list[int]] = []
    current: list[int] = []
    for i in sorted(idx, key=lambda i: (len(examples[i].input_ids), i)):
        if current and len(examples[i].input_ids) * (len(current) + 1) > max_batch_tokens:
            groups.append(current)
            current = []
        current.append(i)
    groups.append(current)
    return groups


def train_sft(
    model,
    tokenizer,
    rows: Sequence[Mapping[str, Any]] | Sequence[TokenizedExample],
    *,
    weights: Sequence[float] | None = None,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
    **config: Any,
) -> SFTResult:
    """Train `model` in place on `rows` (messages form, or already tokenized) for `steps` AdamW steps.

    Weights come from `weights`, else each row's `weight` key, else 1. Batches are drawn without replacement from the
    rows of weight > 0 in a fresh seeded permutation each epoch. Extra keyword arguments go to SFTConfig.

    The loss is `weighted_example_loss`, the one `integrations.trl.WeightedSFTTrainer` calls (tests/test_trl.py: same
    tokens, mask, loss and gradients). The optimiser loop stays instead of TRL's Trainer for what TRL lacks:
    length-sorted token-budget micro-batches (`max_batch_tokens`; TRL pads every row of a step to its longest), which
    made this loop 4.4x faster per step than WeightedSFTTrainer on the benchmark's shape (`benchmarks/sft_speed.py`:
    shipped model, batch 32, demo pool; best of 2 on a loaded 2-core machine, so indicative only); no `trl`
    dependency for the core (the shipped model's recipe, the benchmark); and the benchmark's numbers stay as they were.
    """
    import torch

    cfg = SFTConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, **config)
    weights = _resolve_weights(rows, weights)
    if rows and isinstance(rows[0], TokenizedExample):
        examples = list(rows)
    else:
        examples = encode_rows(tokenizer, rows, max_tokens=cfg.max_tokens)
    keep = [i for i, w in enumerate(weights) if w > 0]
    if not keep and cfg.steps:
        raise ConfigError("every row has weight 0: nothing to train on")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    result = SFTResult(rows_used=len(keep))
    order: list[int] = []
    start = time.perf_counter()
    was_training = model.training
    model.train()
    for step in range(cfg.steps):
        if len(order) < min(cfg.batch_size, len(keep)):  # new epoch; the last partial batch of an epoch is dropped
            order = [keep[j] for j in torch.randperm(len(keep), generator=generator).tolist()]
        idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr_at(step)
        optimizer.zero_grad(set_to_none=True)
        value = 0.0
        # Same loss and gradient as one padded batch (up to float summation order), but a rare long row pads
        # only its own micro-batch: on the demo pool ~3x faster than padding all 32 rows to ~250 tokens.
        for part in _micro_batches(idx, examples, cfg.max_batch_tokens):
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in part], pad_id).items()}
            w = torch.tensor([weights[i] for i in part], dtype=torch.float32, device=device)  # [b]
            loss = weighted_example_loss(model, batch, w, denominator=len(idx))
            loss.backward()
            value += float(loss.detach())
            result.tokens_seen += int(batch["loss_mask"][:, 1:].sum())
        if not math.isfinite(value):
            raise FloatingPointError(f"non-finite loss {value} at step {step}: lower lr (now {cfg.lr})")
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        result.losses.append(value)
        if on_step is not None:
            on_step(step, value)
        if cfg.log_every and (step + 1) % cfg.log_every == 0:
            logger.info("step %d/%d loss %.4f lr %.2e", step + 1, cfg.steps, value, cfg.lr_at(step))
    model.train(was_training)
    result.wall_s = time.perf_counter() - start
    return result


@dataclass
class AccuracyResult:
    accuracy: float  # share of queries with reward 1.0
    per_task: dict[str, float]
    counts: dict[str, int]
    records: list[dict]  # id, task, response, reward, correct


def default_score(response: str, query: Mapping[str, Any]) -> float:
    """The task's reasoning-gym verifier when the query names a known task, else exact match after `####`."""
    from drift_stream.embedded import tasks

    task = query.get("task")
    if task in tasks.TASK_SPECS:
        return tasks.score_response(task, response, str(query["answer"]))
    extracted = tasks.extract_answer(response)
    return float(extracted is not None and extracted == str(query["answer"]).strip())


def generate_greedy(
    model, tokenizer, questions: Sequence[str], *, batch_size: int = 64, max_new_tokens: int = 96,
    max_prompt_tokens: int = 2048,
) -> list[str]:
    """Greedy completions (text, special tokens dropped) of single-turn user `questions`, batched with left padding."""
    import torch

    chat = ChatTokenizer(tokenizer, max_tokens=max_prompt_tokens)
    pad_id = chat.pad_token_id
    device = next(model.parameters()).device
    out: list[str] = []
    was_training = model.training
    model.eval()
    try:
        for lo in range(0, len(questions), batch_size):
            prompts = [chat.encode_prompt([{"role": "user", "content": q}]) for q in questions[lo: lo + batch_size]]
            width = max(len(p) for p in prompts)
            ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # [B, T]
            attn = torch.zeros((len(prompts), width), dtype=torch.long)
            for r, p in enumerate(prompts):
                ids[r, width - len(p):] = torch.tensor(p)
                attn[r, width - len(p):] = 1
            with torch.no_grad():
                gen = model.generate(
                    input_ids=ids.to(device), attention_mask=attn.to(device), do_sample=False,
                    max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id,
                )
            out.extend(tokenizer.decode(g[width:], skip_special_tokens=True).strip() for g in gen)
    finally:
        model.train(was_training)
    return out


def greedy_accuracy(
    model,
    tokenizer,
    queries: Sequence[Mapping[str, Any]],
    *,
    score_fn: Callable[[str, Mapping[str, Any]], float] | None = None,
    batch_size: int = 64,
    max_new_tokens: int = 96,
) -> AccuracyResult:
    """Greedy-decode each query's `question` and count it correct when `score_fn(response, query) == 1.0`.

    `queries` are `qa` rows {question, answer, task?, id?}; per-task accuracy groups by `task` ("all" if absent).
    """
    if not queries:
        raise ConfigError("greedy_accuracy needs at least one query")
    score_fn = score_fn or default_score
    responses = generate_greedy(model, tokenizer, [str(q["question"]) for q in queries],
                                batch_size=batch_size, max_new_tokens=max_new_tokens)
    records, hits, counts = [], {}, {}
    for i, (q, response) in enumerate(zip(queries, responses)):
        reward = float(score_fn(response, q))
        task = str(q.get("task", "all"))
        correct = reward == 1.0
        records.append({"id": q.get("id", i), "task": task, "response": response, "reward": reward, "correct": correct})
        counts[task] = counts.get(task, 0) + 1
        hits[task] = hits.get(task, 0) + int(correct)
    per_task = {t: hits[t] / counts[t] for t in sorted(counts)}
    return AccuracyResult(sum(hits.values()) / len(queries), per_task, dict(sorted(counts.items())), records)


@dataclass(frozen=True)
class TinyModelRecipe:
    """The embedded default: a 4-layer Llama (0.88M parameters) trained from scratch by `train_sft` on a pool.

    On the demo pool, 1400 steps at lr 1e-3 leave it partly competent on the target tasks (docs/demo_data.md).
    """

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    max_positions: int = 256
    init_seed: int = 0
    steps: int = 1400
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 100
    seed: int = 0

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        SFTConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr, warmup_steps=self.warmup_steps)

    def build(self, tokenizer):
        """A freshly initialised LlamaForCausalLM sized for `tokenizer` (seeded by `init_seed`)."""
        from drift_stream.embedded.tiny_models import make_tiny_model

        return make_tiny_model(
            "llama", vocab_size=len(tokenizer), hidden_size=self.hidden_size, num_layers=self.num_layers,
            num_heads=self.num_heads, intermediate_size=self.intermediate_size, max_positions=self.max_positions,
            seed=self.init_seed,
        )

    def sft_kwargs(self) -> dict:
        return dict(steps=self.steps, batch_size=self.batch_size, lr=self.lr, warmup_steps=self.warmup_steps,
                    seed=self.seed)
