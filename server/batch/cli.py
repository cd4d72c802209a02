"""`mdl-serve batch INPUT --output OUT.jsonl` and `mdl-serve batch merge INPUT SHARD_OUTPUT...
--output MERGED.jsonl` (docs/batch.md)."""

import argparse
import json
import logging
from pathlib import Path

from pydantic import ValidationError

from mdlserve.server.batch.options import BatchOptions

# Gateway settings a batch job uses: the engine's, and the input limits the request
# builder applies (flags as for `mdl-serve serve`, also MDL_<FLAG> variables).
SETTINGS_FIELDS = ("model", "served_model_name", "dtype", "max_model_len", "max_num_batched_tokens",
                   "gpu_memory_utilization", "tensor_parallel_size", "quantization", "load_format",
                   "kv_cache_bytes", "enforce_eager", "cudagraph_mode", "cudagraph_capture_sizes",
                   "max_audio_seconds", "max_audio_parts", "fetch_timeout", "fetch_max_bytes")  # fmt: skip
EXIT_USAGE = 2
USAGE = """mdl-serve batch INPUT --output OUT.jsonl [options]
       mdl-serve batch merge INPUT SHARD_OUTPUT... --output MERGED.jsonl [options]"""


def add_parser(subparsers, add_flags) -> None:
    """`add_flags(parser, model, names)` adds one flag per pydantic field (cli.py's helper)."""
    from mdlserve.server.settings import Settings

    parser = subparsers.add_parser(
        "batch", help="caption or transcribe a dataset offline (resumable, sharded)", usage=USAGE, description=__doc__
    )
    parser.add_argument("paths", nargs="+", metavar="INPUT",
                        help="the input (folder, glob, manifest, OpenAI batch file, - for stdin); after 'merge': "
                             "the input, then the shards' output files")  # fmt: skip
    add_flags(parser, BatchOptions)
    add_flags(
        parser.add_argument_group("engine and input limits (as for serve; also MDL_<FLAG>)"), Settings, SETTINGS_FIELDS
    )
    parser.set_defaults(func=_batch)


def _batch(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger = logging.getLogger("mdlserve.batch")
    merging = args.paths[0] == "merge"
    paths = args.paths[1:] if merging else args.paths
    if (merging and len(paths) < 2) or (not merging and len(paths) != 1):
        return _usage_error(logger, f"usage:\n  {USAGE}")
    try:
        given = {k: v for k, v in vars(args).items() if k in BatchOptions.model_fields}
        options = BatchOptions(input=paths[0], **given)
    except ValidationError as exc:
        return _usage_error(logger, "; ".join(f"--{'-'.join(str(p) for p in e['loc'])}: {e['msg']}".replace("_", "-")
                                              for e in exc.errors()))  # fmt: skip
    if merging:
        from mdlserve.server.batch.merge import merge
        from mdlserve.server.batch.outputs import json_line
        from mdlserve.server.batch.runner import input_spec

        summary = merge(input_spec(options), Path(options.output), paths[1:], options.model_name)
        print(json_line(summary), flush=True)
        return 0 if summary["ok"] else 1

    from mdlserve.server.batch.runner import run_batch
    from mdlserve.server.settings import Settings

    def settings() -> Settings:  # built after the job's own checks (BatchJob): a usage error waits for no torch import
        return Settings(
            **{k: v for k, v in vars(args).items() if k in SETTINGS_FIELDS}, max_num_seqs=options.max_in_flight
        )

    return run_batch(options, settings)


def _usage_error(logger: logging.Logger, message: str) -> int:
    logger.error("%s", message)
    print(json.dumps({"error": message, "exit_code": EXIT_USAGE}), flush=True)
    return EXIT_USAGE
