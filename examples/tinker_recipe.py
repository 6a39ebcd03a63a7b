"""Train on DRIFT weights with Tinker: refine --policy weights -> export --format tokens -> Tinker `Datum`s.

    drift-stream refine RUN --policy weights --out REFINED
    drift-stream export REFINED --format tokens --out TOKENS
    python examples/tinker_recipe.py TOKENS --base-model Qwen/Qwen3-4B-Instruct-2507 --steps 100   # TINKER_API_KEY

RUN must be scored with the tokenizer and chat template of the model Tinker trains (`score --model` that model, or
its tokenizer): the export holds the token ids scoring made, and Tinker trains on ids. Each exported row becomes one
`tinker.types.Datum`: model_input = input_ids[:-1], loss_fn_inputs {"target_tokens": input_ids[1:], "weights":
loss mask x the row's weight}. Tinker's `cross_entropy` sums -logp x weight over every token of the batch, so
`datums(..., normalize="example")` divides each row's weights by its loss tokens and by the batch's rows: the summed
loss is then WeightedSFTTrainer's default sum_i w_i * mean_t nll_it / N (tests/test_export_tokens.py checks both
numbers on one batch); "token" gives the token-mean convention, "none" the weights as exported.

`pip install tinker`. Only `train` talks to the service; reading the export and building Datums runs offline.
"""

from __future__ import annotations

import argparse
import glob
import os
from collections.abc import Iterator

from drift_stream.refine.export_tokens import tinker_fields


def read_rows(export_dir: str, batch_rows: int = 1024) -> Iterator[dict]:
    """The token export's rows in file order, read a record batch at a time."""
    import pyarrow.parquet as pq

    files = sorted(glob.glob(os.path.join(export_dir, "data", "*.parquet")))
    if not files:
        raise SystemExit(f"{export_dir}/data has no parquet files: pass the --out of `drift-stream export --format "
                         "tokens`")
    for path in files:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
            yield from batch.to_pylist()


def batches(rows: Iterator[dict], batch_rows: int) -> Iterator[list[dict]]:
    batch = []
    for row in rows:
        batch.append(row)
        if len(batch) == batch_rows:
            yield batch
            batch = []
    if batch:
        yield batch


def datums(rows: list[dict], normalize: str = "example") -> list:
    """One `tinker.types.Datum` per token-export row of one training batch (see the module docstring)."""
    from tinker import types

    return [types.Datum(model_input=types.ModelInput.from_ints(f["model_input"]),
                        loss_fn_inputs={"target_tokens": f["target_tokens"], "weights": f["weights"]})
            for f in tinker_fields(rows, normalize)]


def train(export_dir: str, base_model: str, *, steps: int, batch_rows: int, learning_rate: float, rank: int,
          normalize: str) -> None:
    import tinker
    from tinker import types

    service = tinker.ServiceClient()
    client = service.create_lora_training_client(base_model=base_model, rank=rank).result()
    step = 0
    while step < steps:
        for batch in batches(read_rows(export_dir), batch_rows):
            backward = client.forward_backward(datums(batch, normalize), "cross_entropy")
            optim = client.optim_step(types.AdamParams(learning_rate=learning_rate))
            loss = backward.result().metrics.get("loss:sum")
            optim.result()
            step += 1
            print(f"step {step}: {len(batch)} rows, loss {loss}", flush=True)
            if step == steps:
                break
    print(f"saved: {client.save_weights_for_sampler(name='drift-weighted').result().path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir", help="the --out of `drift-stream export --format tokens`")
    parser.add_argument("--base-model", required=True, help="the model RUN was scored with (same tokenizer)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-rows", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank")
    parser.add_argument("--normalize", default="example", choices=("example", "token", "none"))
    args = parser.parse_args(argv)
    train(args.export_dir, args.base_model, steps=args.steps, batch_rows=args.batch_rows,
          learning_rate=args.learning_rate, rank=args.rank, normalize=args.normalize)


if __name__ == "__main__":
    main()
