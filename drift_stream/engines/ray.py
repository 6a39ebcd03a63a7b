"""Ray: `score --engine ray` writes the same run directory as the local engine, from a pool of Ray actors.

The driver does everything `pipeline.run_score` does (list and assign input files, fit beta `auto` once, record and
check the config, write the manifest); only the scoring of the files that have no completion marker is handed to
`RayEngine`. Each actor builds the scorer once (model and bank loaded once per actor) and runs
`pipeline.score_file` on whole input files: it reads the file with the project's reader, writes the data and
rejects shards through the run directory's atomic writer and then the file's marker, and returns the marker. So:

- scores equal the local engine's row for row (same reader, same chunks, same scorer, same beta);
- a driver killed at any point leaves finished files with markers and unfinished ones without: a rerun skips the
  first and redoes the second;
- an actor that dies (`ray.kill`, a crashed worker, a lost node) is replaced by a new one and its file is scored
  again from the start (at most `max_file_attempts` times per file); a shard that was half written is never visible.

Ray Data users with a Dataset of their own keep `score_with_ray` (rows in, scored rows out; no run directory).
Why not Ray Data for the run directory: its readers decode whole files with their own rules (one undecodable JSON
line fails the read), while the run directory promises rows in = scored + rejected with the row index of every bad
line, which only the project's reader gives; and the unit of resume is the input file, which a file-level actor pool
maps onto directly.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, Mapping

from drift_stream.errors import ConfigError, DriftError

logger = logging.getLogger(__name__)

ACTOR_NAME_PREFIX = "drift-stream-score"


def connect(address: str | None = None) -> bool:
    """`ray.init(address)` unless Ray is already initialised here. Returns True when this call started it.

    address None: the cluster in RAY_ADDRESS (what `ray job submit` sets), else a new local one.
    """
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - the ray extra is not installed
        raise ConfigError("--engine ray needs Ray: pip install 'drift-stream[ray]'") from exc
    if ray.is_initialized():
        return False
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    return True


class _WithInfo:
    """The actor's scorer, reporting the driver's `manifest_info()` (fitted beta, debias statistics) in markers;
    everything else (per-file statistics such as `pop_padding_stats`) is the actor's own scorer's."""

    def __init__(self, scorer, info: Mapping[str, Any]) -> None:
        self.scorer, self.info = scorer, dict(info)

    def __call__(self, batch):
        return self.scorer(batch)

    def __getattr__(self, name: str):
        if "scorer" not in self.__dict__:  # during unpickling
            raise AttributeError(name)
        return getattr(self.__dict__["scorer"], name)

    def manifest_info(self) -> dict:
        return dict(self.info)


class ScoreWorker:
    """One actor: builds the scorer once from plain arguments, then scores whole input files into the run directory."""

    def __init__(self, scorer_kwargs: Mapping[str, Any], scorer_info: Mapping[str, Any], threads: int | None = None):
        from drift_stream.scoring.build import build_scorer

        if threads:
            import torch

            torch.set_num_threads(threads)
        kwargs = dict(scorer_kwargs)
        self.scorer = _WithInfo(build_scorer(kwargs.pop("scorer"), **kwargs), scorer_info)

    def pid(self) -> int:
        return os.getpid()

    def score_file(self, file, config) -> dict:
        from drift_stream.engines.local import score_file
        from drift_stream.io.run_dir import RunDirectory

        return score_file(file, RunDirectory(config.out, config.storage_options), self.scorer, config)


def actor_scorer_kwargs(scorer_kwargs: Mapping[str, Any], scorer) -> dict[str, Any]:
    """The kwargs each actor builds its scorer from: the driver's, with beta `auto` replaced by the fitted number."""
    kwargs = dict(scorer_kwargs)
    if kwargs.get("beta") == "auto":
        beta = getattr(scorer, "beta", None)
        if beta is None:
            raise ConfigError("beta: auto must be fitted on the driver before the actors start")
        kwargs["beta"] = float(beta)
    return kwargs


@dataclass
class RayEngine:
    """Scores input files on `actors` Ray actors (each `cpus_per_actor` CPUs and `gpus_per_actor` GPUs).

    Pass it as `run_score(..., score_files=engine)` together with the kwargs the driver's scorer was built from
    (`build_scorer(**scorer_kwargs)`), so that every actor builds the same scorer. `stats` counts replaced actors
    and redone files of the last call.
    """

    scorer_kwargs: Mapping[str, Any]
    actors: int = 2
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    threads: int | None = None  # torch threads per actor (default: Ray's OMP_NUM_THREADS = cpus_per_actor)
    max_file_attempts: int = 3  # an input file whose actor died this many times stops the run

    def __post_init__(self) -> None:
        if self.actors < 1:
            raise ConfigError(f"--actors must be >= 1, got {self.actors}")
        if self.gpus_per_actor < 0 or self.cpus_per_actor < 0:
            raise ConfigError("--gpus-per-actor and --cpus-per-actor must be >= 0")
        if self.max_file_attempts < 1:
            raise ConfigError(f"max_file_attempts must be >= 1, got {self.max_file_attempts}")
        if "scorer" not in self.scorer_kwargs:
            raise ConfigError("scorer_kwargs must name the scorer (scorer='drift', ...)")
        self.stats = {"actors_started": 0, "actors_replaced": 0, "files_redone": 0}
        self.actor_names: dict[int, str] = {}  # slot -> name of its current actor (ray.get_actor(name))

    def __call__(self, todo, run, scorer, config, progress: bool = True) -> None:
        import ray
        from tqdm.auto import tqdm

        if any(file.format == "dataset" for file in todo):
            raise ConfigError("the Ray engine scores files (local paths or URLs every node can read), not a "
                              "datasets.IterableDataset: write it to parquet first, or use the local engine")
        if not ray.is_initialized():
            connect(None)
        if run.is_local:  # actors may run in another working directory: give them the absolute path
            config = dataclasses.replace(config, out=run.root)
        info = scorer.manifest_info() if hasattr(scorer, "manifest_info") else {}
        kwargs = actor_scorer_kwargs(self.scorer_kwargs, scorer)
        actor_class = ray.remote(ScoreWorker)
        run_key = uuid.uuid4().hex[:8]
        bar = tqdm(desc="scoring (ray)", unit="rows", unit_scale=True, disable=not progress, dynamic_ncols=True)

        def start(slot: int):
            name = f"{ACTOR_NAME_PREFIX}-{run_key}-{slot}-{self.stats['actors_started']}"
            self.stats["actors_started"] += 1
            self.actor_names[slot] = name
            return actor_class.options(
                name=name, num_cpus=self.cpus_per_actor, num_gpus=self.gpus_per_actor, max_restarts=0,
            ).remote(kwargs, info, self.threads)

        actors = [start(slot) for slot in range(min(self.actors, len(todo)))]
        pending = deque(todo)
        attempts: dict[int, int] = {}
        in_flight: dict[Any, tuple[int, Any]] = {}
        idle = list(range(len(actors)))
        try:
            while pending or in_flight:
                while idle and pending:
                    slot, file = idle.pop(), pending.popleft()
                    attempts[file.index] = attempts.get(file.index, 0) + 1
                    in_flight[actors[slot].score_file.remote(file, config)] = (slot, file)
                (ref,), _ = ray.wait(list(in_flight), num_returns=1)
                slot, file = in_flight.pop(ref)
                try:
                    marker = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    self._replace(actors, slot, start, file, attempts, exc)
                    pending.appendleft(file)
                except ray.exceptions.RayTaskError as exc:
                    cause = getattr(exc, "cause", None)
                    raise (cause if isinstance(cause, DriftError) else exc) from None
                else:
                    bar.update(marker["rows_in"])
                    logger.info("%s: %d rows in, %d scored, %d rejected", file.url, marker["rows_in"],
                                marker["rows_scored"], marker["rows_rejected"])
                idle.append(slot)
        finally:
            bar.close()
            for actor in actors:
                ray.kill(actor)

    def _replace(self, actors, slot, start, file, attempts, exc) -> None:
        if attempts[file.index] >= self.max_file_attempts:
            raise DriftError(
                f"input file {file.url}: its Ray actor died {attempts[file.index]} times; last: "
                f"{exc.__class__.__name__}: {str(exc)[:800]}\nCheck the actor logs (out of memory? drift-stream or "
                "the model missing on a node?), then rerun the same command to resume"
            ) from None
        logger.warning("Ray actor %d died while scoring %s (%s): starting a new one and scoring the file again",
                       slot, file.url, exc.__class__.__name__)
        self.stats["actors_replaced"] += 1
        self.stats["files_redone"] += 1
        actors[slot] = start(slot)


def score_on_ray(config, scorer_kwargs: Mapping[str, Any], engine: RayEngine | None = None, *,
                 address: str | None = None, progress: bool = True) -> dict[str, Any]:
    """`drift-stream score --engine ray`: build the driver's scorer, then `run_score` with `engine` (2 actors by
    default). Connects with `connect(address)` and shuts Ray down afterwards only if this call started it."""
    from drift_stream.engines.local import run_score
    from drift_stream.scoring.build import build_scorer

    kwargs = dict(scorer_kwargs)
    engine = engine or RayEngine(kwargs)
    started = connect(address)
    try:
        scorer = build_scorer(kwargs.pop("scorer"), **kwargs)
        return run_score(config, scorer, progress=progress, score_files=engine)
    finally:
        if started:
            import ray

            ray.shutdown()


# ----------------------------------------------------------------------------------------------------- Ray Data


class RayScorer:
    """Ray Data callable class: constructed once per actor from plain arguments (paths), so it pickles cheaply."""

    def __init__(self, scorer: str = "drift", **kwargs: Any):
        from drift_stream.scoring.build import build_scorer

        self._scorer = build_scorer(scorer, **kwargs)

    def __call__(self, batch):
        return self._scorer(batch)


def score_with_ray(dataset, *, concurrency: int = 1, num_gpus: float = 0, batch_size: int = 256,
                   **scorer_kwargs: Any):
    """`dataset.map_batches(RayScorer, compute=ActorPoolStrategy(size=concurrency))` with Arrow batches: the same
    rows plus drift_* columns (rejected rows keep their place with a `drift_reject_reason`).

        ds = ray.data.read_parquet("s3://bucket/pool/")
        scored = score_with_ray(ds, scorer="drift", model="model_dir", bank="bank_dir", concurrency=4)

    beta "auto" is refused here: fit it once on the driver (`DriftScorer.calibrate`) and pass the number as `beta`,
    so that every actor uses the same beta. For a resumable run directory use `score --engine ray` instead.
    """
    from ray.data import ActorPoolStrategy

    if scorer_kwargs.get("beta") == "auto":
        raise ConfigError("score_with_ray needs a fixed beta: fit it once (DriftScorer.calibrate) and pass beta=VALUE")
    return dataset.map_batches(
        RayScorer,
        fn_constructor_kwargs=scorer_kwargs,
        batch_format="pyarrow",
        batch_size=batch_size,
        compute=ActorPoolStrategy(size=concurrency),
        num_gpus=num_gpus,
    )
