"""Ray: `bank build --engine ray` spreads HF rollouts and rollout / reference gradients over a pool of Ray actors.

`build_bank(..., workers=RayBankWorkers(...))` keeps everything else where it is (queries, verification, signing, the
preconditioner, the bank directory: on the driver) and hands two jobs to the actors, each of which loads the model
once:

- rollouts: the queries are cut into one contiguous chunk per actor; each actor runs `generate_rollouts` on its
  chunk. Every rollout samples with its own generator seeded from (seed, query id, rollout index), so the tokens do
  not depend on which actor or batch a rollout lands in. Only the batch's padding width can change, and with it
  the last bits of the logits: in tests/test_ray.py the sampled tokens equal the local engine's and the recorded
  mean log-probabilities agree within 1e-5;
- features: the driver plans the batches as a local build does (`plan_batches`: batches of `--feature-batch-size`
  rows, or cut by `--max-batch-tokens`) and hands each actor a run of whole batches, so every batch holds the same
  sequences as in a local build; features, losses and token counts are those of the local engine up to float
  reduction order across thread counts.

The actors load the model in the dtype of the driver's model (`--dtype`), so rollouts, features, the Fisher fit and
the model fingerprint share one precision.

The driver still loads the model (projector spec, fingerprints) and fits the preconditioner on `--fisher-data`.
vLLM rollouts stay on the driver (backend vllm is not spread).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from drift_stream.errors import BankMismatchError, ConfigError

logger = logging.getLogger(__name__)


class BankWorker:
    """One actor: the model loaded once; rollouts for a chunk of queries, features for a run of whole batches."""

    def __init__(self, model_path: str, feature_config, device: str = "auto", dtype: str = "auto",
                 threads: int | None = None):
        from drift_stream.model.loading import load_model

        if threads:
            import torch

            torch.set_num_threads(threads)
        self.model = load_model(model_path, device=device, dtype=dtype)
        self.feature_config = feature_config
        self._featurizer = None

    @property
    def featurizer(self):
        if self._featurizer is None:
            from drift_stream.grads.features import GradientFeaturizer

            self._featurizer = GradientFeaturizer(self.model, self.feature_config)
        return self._featurizer

    def describe(self) -> dict:
        """What must equal the driver's: the projector spec and the dtype the model was loaded in."""
        return {"projector": self.featurizer.spec(), "dtype": model_dtype(self.model)}

    def generate(self, tokenizer, chat_tokenizer, queries, rollout_config) -> list:
        from drift_stream.rollouts.engine import generate_rollouts

        return generate_rollouts(self.model, tokenizer, chat_tokenizer, queries, rollout_config, progress=False)

    def featurize(self, batches: list, pad_id: int, loss_only: bool):
        """(features | None, loss, counts, bad) of `batches` (lists of examples, each one batch as planned by the
        driver), rows in batch order."""
        import torch

        from drift_stream.bank.targets import _featurize_all

        parts = [_featurize_all(self.featurizer, batch, pad_id, len(batch), "", False, loss_only) for batch in batches]
        features = None if loss_only else torch.cat([p[0] for p in parts]).cpu()
        return (features, torch.cat([p[1] for p in parts]).cpu(), torch.cat([p[2] for p in parts]).cpu(),
                [b for p in parts for b in p[3]])


def model_dtype(model) -> str:
    """The dtype name (`load_model`'s --dtype spelling: "float32", "bfloat16", ...) of a loaded model's weights."""
    return str(next(model.parameters()).dtype).replace("torch.", "")


class RayBankWorkers:
    """A context manager holding `actors` BankWorker actors; pass it as `build_bank(..., workers=...)`.

    The actors start at the first job, loading the model in the dtype of the driver's model (the one `build_bank`
    loaded with its `dtype`): rollouts and features then share the precision of the Fisher fit and the fingerprint.
    `dtype` other than "auto" must equal the driver's.
    """

    def __init__(self, model_path: str, feature_config, *, actors: int = 2, gpus_per_actor: float = 0.0,
                 cpus_per_actor: float = 1.0, device: str = "auto", dtype: str = "auto", threads: int | None = None,
                 address: str | None = None):
        if actors < 1:
            raise ConfigError(f"--actors must be >= 1, got {actors}")
        if not isinstance(model_path, str):
            raise ConfigError("bank build --engine ray needs a model directory (each actor loads it)")
        self.model_path, self.feature_config = model_path, feature_config
        self.num_actors, self.gpus, self.cpus = actors, gpus_per_actor, cpus_per_actor
        self.device, self.dtype, self.threads, self.address = device, dtype, threads, address
        self.actors: list[Any] = []
        self._entered = False
        self._started_ray = False
        self._checked = False

    def __enter__(self) -> "RayBankWorkers":
        from drift_stream.engines.ray import connect

        self._started_ray = connect(self.address)
        self._entered = True
        return self

    def __exit__(self, *exc) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        self._entered = False
        if self._started_ray:
            ray.shutdown()

    def _start(self, driver_model) -> None:
        """Start the actors (once) in the driver model's dtype; check one actor's dtype against it."""
        import ray

        if not self._entered:
            raise ConfigError("RayBankWorkers must be used as a context manager (with RayBankWorkers(...) as w:)")
        if self.actors:
            return
        dtype = model_dtype(driver_model)
        if self.dtype not in ("auto", dtype):
            raise ConfigError(f"the Ray actors were asked for dtype {self.dtype} but the driver's model is {dtype}: "
                              f"pass the same --dtype to both (build_bank(dtype=...) and RayBankWorkers(dtype=...))")
        worker = ray.remote(BankWorker).options(num_cpus=self.cpus, num_gpus=self.gpus, max_restarts=0)
        self.actors = [worker.remote(self.model_path, self.feature_config, self.device, dtype, self.threads)
                       for _ in range(self.num_actors)]
        theirs = self._map("describe", [()])[0]["dtype"]
        if theirs != dtype:
            raise BankMismatchError(f"the Ray actors loaded the model in {theirs}, the driver in {dtype}")

    def _map(self, method: str, chunks: list, *args) -> list:
        """Results of `actor.method(*chunk, *args)` for every chunk, in chunk order."""
        import ray
        from ray.util import ActorPool

        pool = ActorPool(self.actors)
        try:
            return list(pool.map(lambda actor, chunk: getattr(actor, method).remote(*chunk, *args), chunks))
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            raise (cause if isinstance(cause, Exception) else exc) from None

    def generate_rollouts(self, model, tokenizer, chat_tokenizer, queries, config, progress: bool = True) -> list:
        """`rollouts.engine.generate_rollouts` over the actors (`model`, the driver's, sets the actors' dtype)."""
        self._start(model)
        queries = list(queries)
        if not queries:
            return []
        size = math.ceil(len(queries) / len(self.actors))
        chunks = [(tokenizer, chat_tokenizer, queries[s:s + size]) for s in range(0, len(queries), size)]
        logger.info("rollouts: %d queries over %d Ray actors", len(queries), len(chunks))
        return [r for part in self._map("generate", chunks, config) for r in part]

    def featurize_all(self, featurizer, examples, pad_id: int, batch_size: int, desc: str, progress: bool,
                      loss_only: bool = False, max_batch_tokens: int | None = None):
        """`bank.targets._featurize_all` over the actors: the driver plans the batches (`plan_batches`, so
        `max_batch_tokens` cuts them as in one process) and hands each actor a run of whole batches."""
        import torch

        from drift_stream.bank.store import fingerprint_projector
        from drift_stream.model.batching import plan_batches

        self._start(featurizer.model)
        if not self._checked:
            theirs, mine = self._map("describe", [()])[0]["projector"], featurizer.spec()
            if fingerprint_projector(theirs) != fingerprint_projector(mine):
                raise BankMismatchError("the Ray actors' gradient projector differs from the driver's: same model "
                                        "directory and drift-stream version on every node?")
            self._checked = True
        examples = list(examples)
        if not examples:
            return None, torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.long), []
        batches = plan_batches([len(ex.input_ids) for ex in examples], batch_size=batch_size,
                               max_batch_tokens=max_batch_tokens)
        per_actor = math.ceil(len(batches) / len(self.actors))
        runs = [batches[s:s + per_actor] for s in range(0, len(batches), per_actor)]
        chunks = [([[examples[i] for i in batch] for batch in run],) for run in runs]
        logger.info("%s: %d sequences in %d batches over %d Ray actors", desc, len(examples), len(batches), len(runs))
        parts = self._map("featurize", chunks, pad_id, loss_only)
        order = torch.tensor([i for batch in batches for i in batch])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order))  # row i of the output is row inverse[i] of the batches' order
        features = None if loss_only else torch.cat([p[0] for p in parts])[inverse]
        bad = [b for p in parts for b in p[3]]
        return (features, torch.cat([p[1] for p in parts])[inverse], torch.cat([p[2] for p in parts])[inverse],
                [bad[j] for j in inverse.tolist()])
