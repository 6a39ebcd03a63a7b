"""What each CLI subcommand does, as importable functions over parsed arguments. The CLI only parses and dispatches."""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger(__name__)


def list_adapters_cmd() -> int:
    from drift_stream.data.formats import list_adapters

    rows = list_adapters()
    width = max(len(name) for name, _ in rows)
    for name, description in rows:
        print(f"{name:<{width}}  {description}")
    print("\nA custom format: pass --adapter path/to/spec.yaml (see adapters/*.yaml for the spec language).")
    return 0


def score_cmd(args, progress: bool = True) -> int:
    from drift_stream.engines.local import RunConfig, run_score
    from drift_stream.refine.report import summarize_run
    from drift_stream.scoring.build import build_scorer

    scorer_kwargs = dict(
        scorer=args.scorer,
        model=args.model,
        adapter=args.adapter,
        bank=args.bank,
        allow_mismatch=args.allow_mismatch,
        beta=args.beta,
        calibration_rows=args.calibration_rows,
        keep_query_scores=args.keep_query_scores,
        granularity=args.granularity,
        batch_size=args.batch_size,
        max_batch_tokens=args.max_batch_tokens,
        max_tokens=args.max_tokens,
        overlong=args.overlong,
        chat_template=args.chat_template,
        use_chat_template=args.use_chat_template,
        stop_tokens=tuple(args.stop_tokens),
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
    )
    config = RunConfig(
        data=tuple(args.data),
        out=args.out,
        num_shards=args.num_shards,
        shard_index=args.shard_index,
        batch_rows=args.batch_rows,
        tokenize_workers=args.tokenize_workers,
        on_bad_row=args.on_bad_row,
        allow_all_rejected=getattr(args, "allow_all_rejected", False),
        storage_options=args.storage_options,
    )
    if getattr(args, "engine", "local") == "ray":
        from drift_stream.engines.ray import RayEngine, score_on_ray

        engine = RayEngine(scorer_kwargs, actors=args.actors, gpus_per_actor=args.gpus_per_actor,
                           cpus_per_actor=args.cpus_per_actor, threads=args.threads)
        result = score_on_ray(config, scorer_kwargs, engine, address=args.ray_address, progress=progress)
    else:
        result = run_score(config, build_scorer(**scorer_kwargs), progress=progress)
    if not args.quiet:
        # a shard of an array may finish before the others: summarise what is done so far (from its own counts)
        print(summarize_run(args.out, storage_options=args.storage_options, allow_incomplete=True, result=result))
    return 0


def bank_build_cmd(args, progress: bool = True) -> int:
    from drift_stream.bank.build import build_bank
    from drift_stream.bank.config import BankConfig
    from drift_stream.bank.store import ValidationBank
    from drift_stream.grads.projection import FeatureConfig
    from drift_stream.rollouts.engine import RolloutConfig

    config = BankConfig(
        signing=args.signing,
        targets=args.targets,
        preconditioner=args.preconditioner,
        damping=args.damping,
        rollouts=RolloutConfig(
            num_rollouts=args.rollouts,
            temperature=args.temperature,
            top_p=args.top_p,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
        ),
        features=FeatureConfig(proj_dim_in=args.proj_dim, proj_dim_out=args.proj_dim, last_n_blocks=args.last_n_blocks,
                               track_experts=args.track_experts),
        fisher_examples=args.fisher_examples,
        no_contrast=args.no_contrast,
        max_rollouts=args.max_rollouts,
        query_weighting=args.query_weighting,
        max_batch_tokens=args.max_batch_tokens,
        truncated=args.truncated,
        chat_template=args.chat_template,
        use_chat_template=args.use_chat_template,
        stop_tokens=tuple(args.stop_tokens),
    )
    if config.preconditioner != "identity" and not args.fisher_data:
        logger.warning("--preconditioner %s needs --fisher-data (training rows); using identity", args.preconditioner)
    import contextlib

    workers = contextlib.nullcontext()
    if getattr(args, "engine", "local") == "ray":
        from drift_stream.engines.ray_bank import RayBankWorkers

        workers = RayBankWorkers(args.model, config.features, actors=args.actors, gpus_per_actor=args.gpus_per_actor,
                                 cpus_per_actor=args.cpus_per_actor, device=args.device, dtype=args.dtype,
                                 threads=args.threads,
                                 address=args.ray_address)
    with workers as pool:
        build_bank(
            args.model,
            args.queries,
            args.out,
            config,
            verifier=args.verifier,
            adapter=args.adapter,
            fisher_data=args.fisher_data,
            fisher_adapter=args.fisher_adapter,
            device=args.device,
            dtype=args.dtype,
            storage_options=args.storage_options,
            overwrite=args.overwrite,
            progress=progress,
            workers=pool,
        )
    if not args.quiet:
        print(ValidationBank.load(args.out).summary())
    return 0


def bank_info_cmd(bank_dir: str) -> int:
    from drift_stream.bank.store import ValidationBank

    print(ValidationBank.load(bank_dir).summary())
    return 0


def refine_cmd(args, progress: bool = True) -> int:
    from drift_stream.refine.policies import refine_run

    manifest = refine_run(
        args.run_dir,
        args.policy,
        args.out,
        seed=args.seed,
        temperature=args.temperature,
        weight_map=args.weight_map,
        clip_z=args.clip_z,
        granularity=args.granularity,
        keep_all=args.keep_all,
        stratify_by=tuple(c.strip() for c in args.stratify_by.split(",") if c.strip()) if args.stratify_by else (),
        length_buckets=args.length_buckets,
        prefilters=tuple(tuple(p) for p in (args.prefilter or ())),
        storage_options=args.storage_options,
        progress=progress,
        allow_incomplete=args.allow_incomplete,
    )
    if not args.quiet:
        print(
            f"refined {manifest['rows_in']} rows with policy {args.policy}: "
            f"{manifest['rows_written']} rows written to {args.out}"
        )
        from drift_stream.refine.report import weight_summary_line

        spread = weight_summary_line(manifest)
        if spread:
            print(spread)
    fraction = manifest.get("source_fraction_files", 1.0)
    if fraction < 1.0:  # printed even with --quiet: the output covers only part of the pool
        print(f"warning: the run is incomplete; refined {100 * fraction:.1f}% of its input files "
              "(--allow-incomplete)", file=sys.stderr)
    return 0


def report_cmd(args) -> int:
    from drift_stream.refine.report import write_report

    path = write_report(args.run_dir, args.out, storage_options=args.storage_options,
                        allow_incomplete=args.allow_incomplete)
    print(f"report written to {path}")
    return 0


def export_cmd(args) -> int:
    from drift_stream.refine.export import export_run

    manifest = export_run(args.run_dir, args.format, args.out, layout=args.layout, seed=args.seed,
                          dataset_name=args.dataset_name, tokenizer=args.tokenizer,
                          allow_incomplete=args.allow_incomplete, storage_options=args.storage_options)
    if not args.quiet:
        kept = f"; {manifest['shards_resumed']} shard(s) kept from an earlier run" if manifest.get("shards_resumed") else ""
        print(f"exported {manifest['rows_in']} rows as {args.format}: {manifest['rows_written']} rows written to "
              f"{args.out} ({manifest['rows_zero_weight']} of weight 0 left out{kept})")
    return 0


def demo_cmd(args, progress: bool = True) -> int:
    from drift_stream.embedded.demo import run_demo

    run_demo(args.out, policy=args.policy, progress=progress, model=args.model, download=args.download)
    return 0
