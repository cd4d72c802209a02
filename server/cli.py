"""`mdl-serve`: the command line of midashenglm-serve.

Subcommands: make-checkpoint, generate (offline captioning through vllm.LLM), serve (the
OpenAI-compatible HTTP gateway), batch (offline dataset jobs), bench.
"""

import argparse
import gc
import json
import sys
from pathlib import Path
from typing import Any

DEMO_CHECKPOINT = Path(".demo/tiny")


def _make_checkpoint(args: argparse.Namespace) -> None:
    from mdlserve.model_plugin.checkpoints import make_checkpoint

    out = make_checkpoint(args.preset, args.out, seed=args.seed, frontend_buffer_keys=args.frontend_buffers)
    print(out)


def demo_clip(seconds: float = 5.0, seed: int = 0):
    """A synthetic clip: a chirp over noise, 16 kHz mono float32."""
    import numpy as np

    t = np.arange(int(seconds * 16000)) / 16000
    chirp = 0.3 * np.sin(2 * np.pi * (300 + 200 * t) * t)
    noise = 0.05 * np.random.default_rng(seed).standard_normal(t.size)
    return (chirp + noise).astype(np.float32)


def _generate(args: argparse.Namespace) -> None:
    from vllm import LLM, SamplingParams

    from mdlserve.model_plugin.checkpoints import CAPTION_PROMPT
    from mdlserve.server.audio import decode_audio

    model = Path(args.model)
    if args.model == str(DEMO_CHECKPOINT) and not (model / "config.json").exists():
        from mdlserve.model_plugin.checkpoints import make_checkpoint

        make_checkpoint("tiny", model)
    clips = [(p, decode_audio(Path(p).read_bytes())) for p in args.audio] or [("<demo clip>", demo_clip())]
    llm = LLM(
        model=str(model),
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=max(len(clips), 1),
        load_format=args.load_format,
        enforce_eager=args.enforce_eager,
        **({"kv_cache_memory_bytes": args.kv_cache_bytes} if args.kv_cache_bytes else {}),
    )
    conversations = [
        [{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": "placeholder"}},
                                      {"type": "text", "text": args.prompt or CAPTION_PROMPT}]}]
        for _ in clips
    ]  # fmt: skip
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    prompts: list[Any] = [
        {"prompt": p, "multi_modal_data": {"audio": clip}} for p, (_, clip) in zip(_render(llm, conversations), clips)
    ]
    for (name, clip), out in zip(clips, llm.generate(prompts, params, use_tqdm=False)):
        print(json.dumps({"audio": name, "seconds": round(len(clip) / 16000, 3), "text": out.outputs[0].text}))


def _render(llm, conversations) -> list[str]:
    tokenizer = llm.get_tokenizer()
    return [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]


def _serve(args: argparse.Namespace) -> int:
    # Start-up imports torch, transformers and vLLM: millions of objects that live as long as
    # the process, which the cyclic collector would walk again and again (~20 % of the import
    # time on the 2-core VM). Paused until the engine starts: re-enabled before vLLM forks its
    # engine core (api_processes.py, engine.py), which would otherwise inherit the pause.
    gc.disable()
    try:
        return _start_serving(args)
    finally:
        gc.enable()


def _start_serving(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from mdlserve.server.serve import serve
    from mdlserve.server.settings import Settings

    overrides = {name: value for name, value in vars(args).items() if name in Settings.model_fields}
    try:
        settings = Settings(**overrides)
    except ValidationError as error:  # a flag or MDL_* variable out of range: say which, no traceback
        print(f"mdl-serve serve: {error}", file=sys.stderr)
        return 2
    if settings.model == str(DEMO_CHECKPOINT) and not (DEMO_CHECKPOINT / "config.json").exists():
        from mdlserve.model_plugin.checkpoints import make_checkpoint

        make_checkpoint("tiny", DEMO_CHECKPOINT)
    return serve(settings)


def _add_settings_flags(parser: argparse.ArgumentParser, model=None, names=None) -> None:
    """One flag per field of `model` (default: the gateway's Settings; only `names` when
    given), `max_num_seqs` -> `--max-num-seqs`. Flags left out are absent from the
    namespace, so MDL_* environment variables and defaults apply."""
    import types
    import typing

    from mdlserve.server.settings import Settings

    model = model or Settings
    for name, field in model.model_fields.items():
        extra = field.json_schema_extra or {}
        if extra.get("cli") is False or (names is not None and name not in names):
            continue
        flag = "--" + name.replace("_", "-")
        help_text = f"{field.description} (env MDL_{name.upper()})" if model is Settings else field.description
        annotation = field.annotation
        if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # X | None
            annotation = next(t for t in typing.get_args(annotation) if t is not type(None))
        kind = typing.get_origin(annotation) or annotation
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif kind is typing.Literal:
            parser.add_argument(flag, choices=typing.get_args(annotation), default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(
                flag, type=kind if kind in (int, float) else str, default=argparse.SUPPRESS, help=help_text
            )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mdl-serve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    mk = sub.add_parser("make-checkpoint", help="write a generated checkpoint (tiny: random weights; 7b: shapes only)")
    mk.add_argument("--preset", choices=["tiny", "7b"], default="tiny")
    mk.add_argument("--out", required=True, help="output directory")
    mk.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    mk.add_argument(
        "--frontend-buffers",
        action="store_true",
        help="also store the STFT window and mel filterbank, as some published snapshots do",
    )
    mk.set_defaults(func=_make_checkpoint)

    gen = sub.add_parser("generate", help="caption or question audio files offline (vllm.LLM)")
    gen.add_argument("audio", nargs="*", help="audio files (any common format); none: a generated demo clip")
    gen.add_argument(
        "--model", default=str(DEMO_CHECKPOINT), help="checkpoint directory (default: the demo checkpoint)"
    )
    gen.add_argument("--prompt", default=None, help="instruction (default: the captioning prompt)")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dtype", default="auto")
    gen.add_argument("--max-model-len", type=int, default=4096)
    gen.add_argument("--load-format", default="auto", help="'dummy' for random weights of the right shapes")
    gen.add_argument(
        "--kv-cache-bytes",
        type=int,
        default=None,
        help="KV cache size in bytes (required on CPU machines; the default on CPU is 1 GiB)",
    )
    gen.add_argument("--enforce-eager", action="store_true")
    gen.set_defaults(func=_generate)

    srv = sub.add_parser(
        "serve",
        help="run the OpenAI-compatible HTTP server",
        description="Every flag is also an MDL_<FLAG> environment variable; flags win.",
    )
    _add_settings_flags(srv)
    srv.set_defaults(func=_serve)

    from mdlserve.benchmarks.cli import add_parser as add_bench_parser
    from mdlserve.server.batch.cli import add_parser as add_batch_parser

    add_bench_parser(sub)
    add_batch_parser(sub, _add_settings_flags)
    return parser


def main(argv: list[str] | None = None) -> int | None:
    """Runs a subcommand; its exit status (batch) or None (0)."""
    args = build_parser().parse_args(argv)
    if getattr(args, "kv_cache_bytes", 0) is None:
        from mdlserve.server.platform import default_kv_cache_bytes

        args.kv_cache_bytes = default_kv_cache_bytes()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
