"""Loading a causal LM and its tokenizer from a local HF directory (trust_remote_code stays off)."""

from __future__ import annotations

import logging
from pathlib import Path

from drift_stream.errors import ConfigError

logger = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")  # --dtype; auto: the checkpoint's (float32 on CPU)


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for but CUDA is not available: pass --device cpu")
    return device


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    _check_model_dir(path)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out everywhere, so any id works; EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, device: str = "auto", dtype: str = "auto"):
    """A causal LM in eval mode on `device`. dtype "auto" keeps the checkpoint's dtype (float32 on CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    _check_model_dir(path)
    device = resolve_device(device)
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=False)
    if dtype == "auto" and device == "cpu" and next(model.parameters()).dtype in (torch.float16, torch.bfloat16):
        model = model.float()  # half precision matmuls are slow and inexact on CPU
    model.to(device)
    model.eval()
    return model


def _check_model_dir(path: str) -> None:
    p = Path(path)
    if not p.is_dir() or not (p / "config.json").is_file():
        raise ConfigError(
            f"--model {path!r} is not a Hugging Face model directory (no config.json there). "
            "Pass a local directory saved with save_pretrained(); nothing is downloaded from a hub."
        )
