"""The command line: a thin `main(argv)` over importable functions. Nothing is parsed or imported at module top level
beyond the standard library, so `drift-stream --help` is instant."""

from __future__ import annotations

import logging
import sys
from typing import Sequence

logger = logging.getLogger("drift_stream.cli.main")


def _configure_logging(args) -> None:
    level = logging.DEBUG if args.verbose else (logging.WARNING if args.quiet else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("urllib3", "botocore", "s3fs", "fsspec", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    import os

    # One tokenizer call per row from one thread: the Rust thread pool only adds contention (2x slower on 2 cores).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from drift_stream.cli.config_file import apply_config_file
    from drift_stream.errors import DriftError, IncompleteRunError

    argv = list(sys.argv[1:] if argv is None else argv)
    from drift_stream.cli.parser import build_parser

    parser = build_parser()
    try:
        apply_config_file(parser, argv)
    except DriftError as err:
        print(f"drift-stream: error: {err}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    _configure_logging(args)

    if args.quiet:
        _quiet_progress_bars()
    try:
        return _dispatch(args)
    except IncompleteRunError as err:
        from drift_stream.cli.resume import resume_command

        hint = f"\nthe score command of this run:\n  {resume_command(err.url, err.config)}" if err.url else ""
        print(f"drift-stream: error: {err}{hint}", file=sys.stderr)
        return 2
    except DriftError as err:
        print(f"drift-stream: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("drift-stream: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - one line, not a traceback (--verbose shows it)
        logger.debug("traceback", exc_info=True)
        where = f" ({err.filename})" if isinstance(err, OSError) and getattr(err, "filename", None) else ""
        print(f"drift-stream: error: {type(err).__name__}{where}: {str(err).splitlines()[0] if str(err) else ''}"
              f"{'' if args.verbose else ' (rerun with --verbose for the traceback)'}", file=sys.stderr)
        return 1
    finally:
        from drift_stream.io.background import close_filesystems

        close_filesystems()  # S3 sessions closed, fsspec's loop thread joined: no thread left for shutdown to kill


def _quiet_progress_bars() -> None:
    """--quiet: no progress bar from transformers ("Loading weights"), huggingface_hub or datasets either."""
    import os

    for var in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        os.environ[var] = "1"  # read when those packages are imported
    if "transformers" in sys.modules:  # already imported (main() called in-process): switch it off directly
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()


def _dispatch(args) -> int:
    from drift_stream.cli import commands

    progress = not args.quiet
    threads = args.threads if args.threads is not None else (1 if args.command == "demo" else None)
    if threads is not None:
        if threads < 1:
            from drift_stream.errors import ConfigError

            raise ConfigError(f"--threads must be >= 1, got {threads}")
        import torch

        # The demo's 0.9M-parameter model gains nothing from intra-op threads, and on a busy 2-core machine two
        # spinning OpenMP threads made scoring 20x slower (4 vs 80 rows/s measured here).
        torch.set_num_threads(threads)
    if args.command == "adapters":
        return commands.list_adapters_cmd()
    if args.command == "score":
        return commands.score_cmd(args, progress=progress)
    if args.command == "bank":
        if args.bank_command == "build":
            return commands.bank_build_cmd(args, progress=progress)
        return commands.bank_info_cmd(args.bank_dir)
    if args.command == "refine":
        return commands.refine_cmd(args, progress=progress)
    if args.command == "report":
        return commands.report_cmd(args)
    if args.command == "export":
        return commands.export_cmd(args)
    if args.command == "demo":
        return commands.demo_cmd(args, progress=progress)
    raise AssertionError(args.command)  # argparse guarantees one of the above


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
