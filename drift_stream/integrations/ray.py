"""Ray Data: the core scorer as a callable class that `map_batches` runs on an actor pool.

    import ray.data
    ds = ray.data.read_parquet("s3://bucket/pool/")
    scored = score_with_ray(ds, scorer="drift", model="model_dir", bank="bank_dir", adapter="messages", concurrency=4)
    scored.write_parquet("s3://bucket/scored/")

Each actor loads the model once. On a GPU cluster pass `num_gpus=1` so every actor gets a device.
"""

from __future__ import annotations

from typing import Any


class RayScorer:
    """Constructed once per actor from plain arguments (paths), so it pickles cheaply across the cluster."""

    def __init__(self, scorer: str = "drift", *, beta_value: float | None = None, **kwargs: Any):
        from drift_stream.scoring import build_scorer

        self._scorer = build_scorer(scorer, **kwargs)
        if beta_value is not None and getattr(self._scorer, "_beta", 0) is None:
            self._scorer._beta = float(beta_value)  # beta fitted once on the driver, shared by every actor

    def __call__(self, batch):
        return self._scorer(batch)


def score_with_ray(dataset, *, concurrency: int = 1, num_gpus: float = 0, batch_size: int = 256, **scorer_kwargs: Any):
    """`dataset.map_batches(RayScorer, ...)` with Arrow batches: same rows plus drift_* columns.

    With beta "auto", fit beta once on the driver (`DriftScorer.calibrate`) and pass it as `beta_value`, so that every
    actor uses the same beta.
    """
    from ray.data import ActorPoolStrategy

    return dataset.map_batches(
        RayScorer,
        fn_constructor_kwargs=scorer_kwargs,
        batch_format="pyarrow",
        batch_size=batch_size,
        compute=ActorPoolStrategy(size=concurrency),
        num_gpus=num_gpus,
    )
