"""Ray: `bank build --engine ray` spreads HF rollouts and rollout / reference gradients over a pool of Ray actors.

`build_bank(..., workers=RayBankWorkers(...))` keeps everything else where it is (queries, verification, signing, the
preconditioner, the bank directory: on the driver) and hands two jobs to the actors, each of which loads the model
once:

- rollouts: the queries are cut into one contiguous chunk per actor; each actor runs `generate_rollouts` on its
  chunk. Every rollout samples with its own generator seeded from (seed, query id, rollout index), so the tokens do
  not depend on which actor or batch a rollout lands in. Only the batch's padding width can change, and with it
  the last bits of the logits: in tests/test_ray.py the sampled tokens equal the local engine's and the recorded
  mean log-probabilities agree within 1e-5;
- features: the tokenized sequences are cut into chunks of whole feature batches (a multiple of the batch size), so
  every batch holds the same sequences as in a local build; features, losses and token counts are those of the
  local engine up to float reduction order across thread counts.

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
    """One actor: the model loaded once; rollouts for a chunk of queries, features for a chunk of sequences."""

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

    def projector_spec(self) -> dict:
        return self.featurizer.spec()

    def generate(self, tokenizer, chat_tokenizer, queries, rollout_config) -> list:
        from drift_stream.rollouts.engine import generate_rollouts

        return generate_rollouts(self.model, tokenizer, chat_tokenizer, queries, rollout_config, progress=False)

    def featurize(self, examples, pad_id: int, batch_size: int, loss_only: bool):
        from drift_stream.bank.targets import _featurize_all

        features, loss, counts, bad = _featurize_all(self.featurizer, examples, pad_id, batch_size, "", False,
                                                     loss_only)
        return (None if features is None else features.cpu()), loss.cpu(), counts.cpu(), bad


class RayBankWorkers:
    """A context manager holding `actors` BankWorker actors; pass it as `build_bank(..., workers=...)`."""

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
        self._started_ray = False
        self._checked = False

    def __enter__(self) -> "RayBankWorkers":
        import ray

        from drift_stream.engines.ray import connect

        self._started_ray = connect(self.address)
        worker = ray.remote(BankWorker).options(num_cpus=self.cpus, num_gpus=self.gpus, max_restarts=0)
        self.actors = [worker.remote(self.model_path, self.feature_config, self.device, self.dtype, self.threads)
                       for _ in range(self.num_actors)]
        return self

    def __exit__(self, *exc) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self._started_ray:
            ray.shutdown()

    def _map(self, method: str, chunks: list, *args) -> list:
        """Results of `actor.method(chunk, *args)` for every chunk, in chunk order."""
        import ray
        from ray.util import ActorPool

        if not self.actors:
            raise ConfigError("RayBankWorkers must be used as a context manager (with RayBankWorkers(...) as w:)")
        pool = ActorPool(self.actors)
        try:
            return list(pool.map(lambda actor, chunk: getattr(actor, method).remote(*chunk, *args), chunks))
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            raise (cause if isinstance(cause, Exception) else exc) from None

    def generate_rollouts(self, model, tokenizer, chat_tokenizer, queries, config, progress: bool = True) -> list:
        """`rollouts.engine.generate_rollouts` over the actors (`model` is ignored: each actor has its own)."""
        queries = list(queries)
        if not queries:
            return []
        size = math.ceil(len(queries) / len(self.actors))
        chunks = [(tokenizer, chat_tokenizer, queries[s:s + size]) for s in range(0, len(queries), size)]
        logger.info("rollouts: %d queries over %d Ray actors", len(queries), len(chunks))
        return [r for part in self._map("generate", chunks, config) for r in part]

    def featurize_all(self, featurizer, examples, pad_id: int, batch_size: int, desc: str, progress: bool,
                      loss_only: bool = False):
        """`bank.targets._featurize_all` over the actors, in chunks of whole batches (same batches as one process)."""
        import torch

        from drift_stream.bank.store import fingerprint_projector

        if not self._checked:
            theirs, mine = self._map("projector_spec", [()])[0], featurizer.spec()
            if fingerprint_projector(theirs) != fingerprint_projector(mine):
                raise BankMismatchError("the Ray actors' gradient projector differs from the driver's: same model "
                                        "directory and drift-stream version on every node?")
            self._checked = True
        examples = list(examples)
        if not examples:
            return None, torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.long), []
        batches = math.ceil(len(examples) / batch_size)
        size = batch_size * math.ceil(batches / len(self.actors))
        chunks = [(examples[s:s + size],) for s in range(0, len(examples), size)]
        logger.info("%s: %d sequences over %d Ray actors", desc, len(examples), len(chunks))
        parts = self._map("featurize", chunks, pad_id, batch_size, loss_only)
        features = None if loss_only else torch.cat([p[0] for p in parts])
        return (features, torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts]),
                [b for p in parts for b in p[3]])
