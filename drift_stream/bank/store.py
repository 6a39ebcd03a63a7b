"""A bank directory on disk: file names, manifest schema, fingerprints, write_bank and ValidationBank (load, check).

Bank directory (fixed names): bank.safetensors, manifest.json (schemas/bank_manifest.schema.json), rollouts.parquet.
The manifest records the model / tokenizer / projector fingerprints; loading refuses others unless allow_mismatch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

from drift_stream.errors import BankError, BankMismatchError

logger = logging.getLogger(__name__)

BANK_FORMAT_VERSION = 1
TENSORS_FILE, MANIFEST_FILE, ROLLOUTS_FILE = "bank.safetensors", "manifest.json", "rollouts.parquet"
_FINGERPRINT_SAMPLE = 65536  # elements hashed per parameter tensor (evenly strided): fast on 7B models


# --------------------------------------------------------------------------------------------------- fingerprints


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


# Precisions a fingerprint is taken at. Two loads of one checkpoint agree at the less precise of their two dtypes:
# a bf16 checkpoint loaded as float32 holds the same values; a float32 checkpoint loaded as bf16 holds bf16(x).
_PRECISIONS = ("float32", "bfloat16", "float16")
_RANK = {"float64": 3, "float32": 2, "bfloat16": 1, "float16": 1}
_DTYPE_CONFIG_KEYS = ("torch_dtype", "dtype")  # how the model was loaded, not what it is


def _sample_index(numel: int):
    """Up to 65536 evenly strided positions, computed exactly in int64 on the CPU (no float linspace): [S]."""
    import torch

    if numel <= _FINGERPRINT_SAMPLE:
        return None
    return torch.arange(_FINGERPRINT_SAMPLE, dtype=torch.int64) * (numel - 1) // (_FINGERPRINT_SAMPLE - 1)


def fingerprint_model(model) -> dict:
    """Fingerprint of a loaded model's checkpoint, independent of the dtype and device it was loaded in.

    Returns {"fingerprint", "config_sha256", "params_sha256", "params_sha256_by_dtype", "dtype", "device",
    "num_parameters", "method"}. config: its to_dict() without private, version and dtype keys. params: every
    parameter's name, shape and up to 65536 evenly strided values, rounded to each precision of `_PRECISIONS` and
    hashed as float32 bytes (`params_sha256_by_dtype`); `params_sha256` (and so `fingerprint`) is the bfloat16 one,
    equal for float32 and bfloat16 loads of one checkpoint. dtype: the least precise parameter dtype; device: the
    first parameter's device (both recorded, not hashed).
    """
    import torch

    config = {k: v for k, v in model.config.to_dict().items()
              if not k.startswith("_") and k not in ("transformers_version", "name_or_path", *_DTYPE_CONFIG_KEYS)}
    config_sha = _sha256_json(config)
    hashes = {p: hashlib.sha256() for p in _PRECISIONS}
    total, dtype, device = 0, None, None
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            flat = param.detach().reshape(-1)
            total += flat.numel()
            here = str(param.dtype).replace("torch.", "")
            if dtype is None or _RANK.get(here, 2) < _RANK.get(dtype, 2):
                dtype = here
            device = device or str(param.device)
            index = _sample_index(flat.numel())
            values = (flat if index is None else flat[index.to(flat.device)]).cpu()
            for precision, h in hashes.items():
                h.update(f"{name}|{tuple(param.shape)}|".encode())
                rounded = values.to(getattr(torch, precision)).to(torch.float32).contiguous()
                h.update(rounded.view(torch.uint8).numpy().tobytes())
    by_dtype = {p: h.hexdigest() for p, h in hashes.items()}
    params_sha = by_dtype["bfloat16"]
    return {"fingerprint": hashlib.sha256(f"{config_sha}:{params_sha}".encode()).hexdigest(),
            "config_sha256": config_sha, "params_sha256": params_sha, "params_sha256_by_dtype": by_dtype,
            "dtype": dtype, "device": device, "num_parameters": total,
            "method": f"values-{_FINGERPRINT_SAMPLE}-by-precision-v2"}


def compare_model_fingerprints(built: Mapping[str, Any], given: Mapping[str, Any]) -> tuple[bool, str | None]:
    """(same checkpoint?, note) for a bank's recorded model fingerprint and `fingerprint_model` of a loaded model.

    Compared at the less precise of the two dtypes (float32 vs bfloat16: at bfloat16). The note says when the
    precisions differ (scores then differ in their last digits). bfloat16 vs float16 loads cannot be matched (neither
    rounds to the other): they compare unequal. Banks from before v2 have one dtype-dependent fingerprint.
    """
    if "params_sha256_by_dtype" not in built:  # v1: hashed the runtime dtype's raw bytes
        return built["fingerprint"] == given["fingerprint"], None
    if built["config_sha256"] != given["config_sha256"]:
        return False, None
    a, b = built.get("dtype") or "float32", given.get("dtype") or "float32"
    low = a if _RANK.get(a, 2) <= _RANK.get(b, 2) else b
    precision = low if low in _PRECISIONS else "float32"  # float64 on both sides: compare at float32
    if _RANK.get(a, 2) == _RANK.get(b, 2) == 1 and a != b:
        precision = "bfloat16"
    same = built["params_sha256_by_dtype"].get(precision) == given["params_sha256_by_dtype"].get(precision)
    note = None
    if same and a != b:
        note = (f"the bank was built with the model in {a} on {built.get('device')}, this model is {b} on "
                f"{given.get('device')}: the same checkpoint at {precision} precision; scores differ from a "
                f"same-precision run in their last digits")
    return same, note


def fingerprint_tokenizer(tokenizer) -> dict:
    """{"fingerprint", "vocab_size", "chat_template_sha256"}: vocabulary, special tokens and chat template."""
    template = getattr(tokenizer, "chat_template", None)
    special = {k: str(v) for k, v in (getattr(tokenizer, "special_tokens_map", None) or {}).items()}
    body = {"vocab": sorted(tokenizer.get_vocab().items()), "special": special,
            "ids": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
            "chat_template": template}
    return {"fingerprint": _sha256_json(body), "vocab_size": len(tokenizer.get_vocab()),
            "chat_template_sha256": None if template is None else hashlib.sha256(str(template).encode()).hexdigest()}


def fingerprint_projector(spec: Mapping[str, Any]) -> str:
    """sha256 of a featurizer's spec() (projector, seed, modules and shapes, layout)."""
    return _sha256_json(spec)


# --------------------------------------------------------------------------------------------------- on disk

def rollouts_schema():
    import pyarrow as pa

    return pa.schema([
        ("query_id", pa.string()), ("rollout_index", pa.int32()), ("prompt", pa.string()), ("completion", pa.string()),
        ("reward", pa.float64()), ("correct", pa.bool_()), ("sign", pa.float64()), ("finish_reason", pa.string()),
        ("failure_reason", pa.string()), ("completion_ids", pa.list_(pa.int32())), ("num_prompt_tokens", pa.int32()),
        ("num_completion_tokens", pa.int32()), ("mean_logprob", pa.float64()), ("loss", pa.float64()),
    ])


def write_bank(out_dir: Path, tensors: dict, manifest: dict, rollout_rows: list[dict] | None = None, *,
               rollout_files: list[Path] = (), streamed: dict | None = None) -> None:
    """Each file written under a temporary name then renamed; manifest.json last (it marks a complete bank).

    The rollouts are `rollout_rows`, or the rows of the parquet `rollout_files` in order (bank build's chunk
    checkpoints, read one at a time); `streamed`: tensors concatenated from chunk files
    (`bank.tensor_files.write_safetensors`), e.g. rollout_vectors [R, D] without holding them in memory."""
    import jsonschema
    import pyarrow as pa
    import pyarrow.parquet as pq

    from drift_stream.bank.tensor_files import concat_parquet, write_safetensors

    jsonschema.validate(manifest, _manifest_schema())
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)
    write_safetensors(out_dir / TENSORS_FILE, tensors, streamed)  # tensors by name, no metadata: same bytes always
    if rollout_rows is not None:
        tmp = out_dir / f".{ROLLOUTS_FILE}.tmp"
        pq.write_table(pa.Table.from_pylist(rollout_rows, schema=rollouts_schema()), str(tmp))
        os.replace(tmp, out_dir / ROLLOUTS_FILE)
    else:
        concat_parquet(out_dir / ROLLOUTS_FILE, list(rollout_files), rollouts_schema())
    tmp = out_dir / f".{MANIFEST_FILE}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False, allow_nan=False) + "\n")
    os.replace(tmp, out_dir / MANIFEST_FILE)


def _manifest_schema() -> dict:
    from importlib import resources

    return json.loads((resources.files("drift_stream") / "schemas" / "bank_manifest.schema.json").read_text())


class ValidationBank:
    """A bank directory, loaded: query_vectors [m, D] float32 (the b_j), signed_vectors [m, D] (the g_j),
    rollout_vectors [R, D] or None, preconditioner tensors, and the manifest."""

    def __init__(self, path: Path, manifest: dict, tensors: dict):
        self.path, self.manifest = path, manifest
        self.query_vectors = tensors["query_vectors"]
        self.signed_vectors = tensors["signed_vectors"]
        self.rollout_vectors = tensors.get("rollout_vectors")
        self.query_weights = tensors.get("query_weights")  # [m] w_j of S(z); None: uniform (the plain mean)
        self.preconditioner_state = {k: v for k, v in tensors.items() if k.startswith("preconditioner.")}
        self.query_ids: list[str] = list(manifest["query_ids"])
        self.dim: int = manifest["dim"]
        self.mismatches: list[str] = []

    @classmethod
    def load(cls, path, *, model=None, tokenizer=None, featurizer=None, allow_mismatch: bool = False):
        """Read and validate a bank; refuse a different model / tokenizer / projector unless allow_mismatch."""
        import jsonschema
        from safetensors.torch import load_file

        path = Path(path)
        for name in (MANIFEST_FILE, TENSORS_FILE, ROLLOUTS_FILE):
            if not (path / name).is_file():
                raise BankError(f"{path} is not a complete bank: {name} is missing (rebuild it with drift-stream bank build)")
        try:
            manifest = json.loads((path / MANIFEST_FILE).read_text())
            jsonschema.validate(manifest, _manifest_schema())
        except (json.JSONDecodeError, jsonschema.ValidationError) as exc:
            raise BankError(f"{path / MANIFEST_FILE} is not a valid bank manifest: {str(exc).splitlines()[0]}") from exc
        if manifest["format_version"] != BANK_FORMAT_VERSION:
            raise BankError(f"bank format version {manifest['format_version']} at {path} is not supported "
                            f"(this drift-stream reads version {BANK_FORMAT_VERSION}): rebuild the bank")
        try:
            tensors = load_file(str(path / TENSORS_FILE))
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise BankError(f"{path / TENSORS_FILE} cannot be read: {exc}") from exc
        shape = tuple(tensors.get("query_vectors", _Absent).shape)
        if shape != (manifest["num_queries"], manifest["dim"]):
            raise BankError(f"{path / TENSORS_FILE}: query_vectors is {shape}, the manifest says "
                            f"({manifest['num_queries']}, {manifest['dim']}): the bank is corrupt, rebuild it")
        weights = tensors.get("query_weights")
        if weights is not None and tuple(weights.shape) != (manifest["num_queries"],):
            raise BankError(f"{path / TENSORS_FILE}: query_weights is {tuple(weights.shape)}, the manifest has "
                            f"{manifest['num_queries']} queries: the bank is corrupt, rebuild it")
        bank = cls(path, manifest, tensors)
        bank.check_compatible(model=model, tokenizer=tokenizer, featurizer=featurizer, allow_mismatch=allow_mismatch)
        return bank

    def check_compatible(self, *, model=None, tokenizer=None, featurizer=None, chat_tokenizer=None,
                         allow_mismatch: bool = False) -> None:
        """Refuse a model / tokenizer / projector / chat template other than the one the bank was built for
        (BankMismatchError). chat_tokenizer: a ChatTokenizer; its rendering ("chat" with the template's sha1, or
        "plain") must match the bank manifest's `tokenization` (banks without that record are not checked)."""
        manifest, checks = self.manifest, []
        built_tok = manifest.get("tokenization") or {}
        if chat_tokenizer is not None and "template" in built_tok:
            given_tok = chat_tokenizer.config_dict()

            def rendering(d):
                return "plain" if d.get("template") != "chat" else f"chat template sha1 {d.get('chat_template_sha1')}"

            checks.append(("rendering", rendering(built_tok), rendering(given_tok)))
        if model is not None:
            given = fingerprint_model(model)
            same, note = compare_model_fingerprints(manifest["model"], given)
            if note:
                logger.warning("%s", note)
            shown = manifest["model"]["fingerprint"] if same else given["fingerprint"]
            if not same and shown == manifest["model"]["fingerprint"]:  # equal at bf16, unequal at float32
                shown = given["params_sha256_by_dtype"]["float32"]
            checks.append(("model", manifest["model"]["fingerprint"], shown))
        if tokenizer is not None:
            checks.append(("tokenizer", manifest["tokenizer"]["fingerprint"], fingerprint_tokenizer(tokenizer)["fingerprint"]))
        if featurizer is not None:
            checks.append(("projector", manifest["projector"]["fingerprint"], fingerprint_projector(featurizer.spec())))
        for what, built, given in checks:
            if built != given:
                if what == "rendering":  # the prompts / targets would be tokenized unlike the bank's rollouts
                    model_path = (manifest.get("model") or {}).get("path") or "the bank's model"
                    if built == "plain":
                        fix = ("score with --no-chat-template (the bank's plain format), rebuild the bank with this "
                               "template")
                    else:
                        fix = (f"score with --chat-template FILE holding the template the bank was built with ({built}"
                               f"; the chat_template of {model_path}), rebuild the bank with this rendering")
                    was, now = (("the plain format" if x == "plain" else f"the {x}") for x in (built, given))
                    message = (f"bank {self.path} was built with {was}, this scorer renders rows in {now}: {fix}, or "
                               "pass --allow-mismatch")
                else:
                    message = (f"bank {self.path} was built for {what} {built[:16]}, this {what} is {given[:16]}: "
                               "rebuild the bank or pass --allow-mismatch")
                if not allow_mismatch:
                    raise BankMismatchError(message)
                logger.warning("%s (allowed by allow_mismatch)", message)
                self.mismatches.append(what)

    @property
    def targets(self) -> str:
        return self.manifest["targets"]

    @property
    def feature_config(self):
        """The FeatureConfig the bank's vectors were made with: a scorer must featurize rows the same way."""
        from drift_stream.grads.projection import FeatureConfig

        spec = dict(self.manifest["config"]["features"])
        spec["module_patterns"] = tuple(spec.get("module_patterns") or ())
        return FeatureConfig(**spec)

    @property
    def fingerprint(self) -> str:
        """model + projector fingerprint: what a run directory records about the bank it used."""
        return f"{self.manifest['model']['fingerprint'][:16]}-{self.manifest['projector']['fingerprint'][:16]}"

    def rollouts(self):
        """rollouts.parquet as a pyarrow Table."""
        import pyarrow.parquet as pq

        return pq.read_table(str(self.path / ROLLOUTS_FILE))

    def preconditioner(self):
        from drift_stream.grads.precondition import Preconditioner

        return Preconditioner.from_state_dict(self.preconditioner_state)

    def summary(self) -> str:
        """A readable summary for `drift-stream bank info`."""
        m = self.manifest
        gap = m["proximity_gap"]
        pre = m["preconditioner"]
        lines = [
            f"bank {self.path}  (drift-stream {m['version']}, format {m['format_version']}, {m['created_at']})",
            f"  model      {m['model']['fingerprint'][:16]}  {m['model'].get('path') or ''}  "
            f"({m['model']['num_parameters']:,} parameters)",
            f"  tokenizer  {m['tokenizer']['fingerprint'][:16]}  (vocab {m['tokenizer']['vocab_size']})",
            f"  projector  {m['projector']['fingerprint'][:16]}  dim {m['dim']} over {len(m['modules'])} modules",
            f"  targets    {m['targets']}  signing {m['signing']}  verifier {m['verifier']}",
            f"  precond.   {pre['kind']} (damping {pre['damping']}, {pre['examples_used']} fisher rows)  "
            f"normalize {m['normalize']}",
            f"  queries    {m['num_queries']} in the bank, {len(m['queries']) - m['num_queries']} excluded, "
            f"{len(m['rejected_queries'])} rejected",
            f"  pass rate  {_fmt(m['pass_rate'])}",
            *([f"  contrast   no_contrast {m['contrast']['no_contrast']}  query weighting "
               f"{m['contrast']['query_weighting']}  by outcome {m['contrast'].get('queries')}"
               + (f"  adaptive K {m['contrast']['adaptive']}" if m["contrast"].get("adaptive") else "")]
              if m.get("contrast") else []),
            f"  proximity gap {_fmt(gap['gap'])} over {gap['num_queries']} queries "
            f"(reference loss {_fmt(gap['reference_loss'])} - rollout loss {_fmt(gap['rollout_loss'])})",
        ]
        trunc = m.get("truncation")
        if trunc and trunc["rollouts"]:
            from drift_stream.bank.config import (
                TRUNCATION_WARN_SHARE,
                truncated_share,
                truncation_warning,
            )

            lines.append(f"  truncated  {trunc['truncated']} of {trunc['rollouts']} rollouts (policy {trunc['policy']})")
            if truncated_share(trunc) >= TRUNCATION_WARN_SHARE:
                lines.append("  warning    " + truncation_warning(trunc))
        if isinstance(gap.get("gap"), (int, float)):
            lines.append("    " + (
                "> 0: the references are farther from the model than its own rollouts; off-policy targets "
                "(less / if) aim away from what the model does" if gap["gap"] > 0 else
                "<= 0: the references are as close to the model as its rollouts; off-policy targets (less / if) "
                "are a strong baseline here"))
        excluded: dict[str, int] = {}
        for row in m["queries"]:
            if row["excluded"]:
                excluded[row["excluded"]] = excluded.get(row["excluded"], 0) + 1
        if excluded:
            lines.append("  excluded   " + ", ".join(f"{k}: {v}" for k, v in sorted(excluded.items())))
        lines.append("  id                          correct incorrect failed  pass   gap")
        for row in m["queries"][:20]:
            lines.append(f"  {row['id'][:26]:<26} {row['correct']:>8} {row['incorrect']:>9} {row['failed']:>6} "
                         f"{_fmt(row['pass_rate']):>5} {_fmt(row['proximity_gap']):>6}"
                         + (f"  excluded: {row['excluded']}" if row["excluded"] else ""))
        if len(m["queries"]) > 20:
            lines.append(f"  ... {len(m['queries']) - 20} more (manifest.json)")
        return "\n".join(lines)


class _Absent:
    shape = None


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"
