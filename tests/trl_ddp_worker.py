"""One rank of tests/test_trl.py::test_data_parallel_equals_one_process (run by torchrun on CPU, gloo).

Trains WeightedSFTTrainer for 2 SGD steps with per-device batch 4 on each rank, once per weighting, and rank 0 saves
the parameters to OUT/{weighting}.pt.
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_trl import DDP_WEIGHTS, _config, _dataset, _rows, _tok  # noqa: E402

from drift_stream.embedded.tiny_models import make_tiny_model  # noqa: E402
from drift_stream.integrations.trl import WeightedSFTTrainer  # noqa: E402


def main(out: str) -> None:
    torch.set_num_threads(1)
    for weighting in ("example", "token"):
        model = make_tiny_model("llama", vocab_size=102, hidden_size=32, num_layers=2, num_heads=4,
                                intermediate_size=64, seed=0)
        args = _config(Path(out) / weighting, batch=4, steps=2, ddp_backend="gloo")
        trainer = WeightedSFTTrainer(model=model, args=args, train_dataset=_dataset(_rows(16), DDP_WEIGHTS),
                                     processing_class=_tok(), weighting=weighting)
        trainer.train()
        if trainer.accelerator.num_processes != 2:
            raise SystemExit(f"expected 2 processes, got {trainer.accelerator.num_processes}")
        if trainer.accelerator.is_main_process:
            torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, Path(out) / f"{weighting}.pt")
    # Leave without the interpreter's teardown: destroying the gloo group at exit (static destruction) could abort a
    # rank with "terminate called without an active exception" (SIGABRT, 1 run in 8 here), and an explicit barrier +
    # destroy_process_group hung one rank in CI. Every collective is over and rank 0 has saved its files.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
