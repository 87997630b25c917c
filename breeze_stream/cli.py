"""`breeze-stream` command line: serve, transcribe, eval, replay, the load generator and the benchmarks.

The composition root: the one module that wires the runtime's commands (serve, transcribe:
streaming) and the tools' (eval, replay, bench-*: bench; train-medusa, build-trtllm: engines), so
that no runtime package imports the tools. Parsing imports only the option modules
(streaming.options, bench.options, engines.options): torch, the engine and the server load once a
command runs, so `--help` and `--version` answer at once and a missing input file is reported
before the model loads. Each command names its function as "module:function".
"""

from __future__ import annotations

import argparse
import importlib
import logging

from bench.options import add_bench_arguments, add_capacity_arguments, add_load_arguments, add_replay_arguments
from bench.readme import add_readme_arguments
from engines.options import add_train_arguments
from streaming.options import (
    CLIPS_HELP,
    add_decoding_arguments,
    add_model_arguments,
    add_serve_arguments,
    window_argument,
)


class _Version(argparse.Action):
    """--version, read from the installed package's metadata only when asked."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help="print the version and exit")

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from importlib.metadata import version

        print(f"breeze-stream {version('breeze-stream')}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """Every command and option; imports nothing heavy (tests/test_cli.py checks it)."""
    parser = argparse.ArgumentParser(prog="breeze-stream", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action=_Version)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(run=run)
        return p

    p = command(
        "serve", "streaming.server.serve:run_serve", "run the WebSocket server (native /v1/stream, metrics, demo page)"
    )
    add_model_arguments(p)
    add_serve_arguments(p)

    p = command(
        "transcribe", "streaming.cli:cmd_transcribe", "transcribe audio files (WAV/FLAC, other formats through ffmpeg)"
    )
    add_model_arguments(p)
    add_decoding_arguments(p)
    p.add_argument("files", nargs="+", metavar="AUDIO", help="audio files, any sample rate")
    p.add_argument("--json", nargs="?", const="-", metavar="OUT", help="segments as JSON: printed, or written to OUT")
    p.add_argument(
        "--word-timestamps",
        action="store_true",
        help="word timings for every segment (text, start, end, probability; one more decoder pass per segment)",
    )

    p = command("eval", "bench.evaluate:cmd_eval", "offline accuracy and speed on a manifest (docs/evaluation.md)")
    add_model_arguments(p)
    add_decoding_arguments(p)
    p.add_argument("manifest", metavar="MANIFEST_OR_FOLDER", help=CLIPS_HELP)
    p.add_argument("--json", metavar="OUT", help="write the full report here")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N clips")

    p = command("replay", "bench.replay:run_replay", "replay clips to a server at real-time pace and measure latency")
    add_replay_arguments(p)

    p = command(
        "bench-load",
        "bench.load:run_load",
        "N concurrent real-time streams looping clips through a server: "
        "latency, losses, CER, server and client load (docs/benchmarks.md)",
    )
    add_load_arguments(p)
    p = command(
        "bench-readme",
        "bench.readme:run_readme",
        "regenerate every CPU figure README.md states, beside its peer, on this machine",
    )
    add_readme_arguments(p)

    p = command(
        "build-trtllm",
        "engines.trtllm.builder:run_build",
        "TensorRT-LLM 1.2.x engines for a Whisper checkpoint (--dry-run prints the commands)",
    )
    from engines.trtllm.builder import add_build_arguments  # standard library only

    add_build_arguments(p)

    p = command(
        "bench-offline",
        "bench.offline:run_bench_offline",
        "our engine and faster-whisper on the same weights over a manifest",
    )
    add_model_arguments(p)
    p.add_argument("manifest", metavar="MANIFEST_OR_FOLDER", help=CLIPS_HELP)
    p.add_argument(
        "--window",
        type=window_argument,
        default=2.0,
        metavar="SECONDS",
        help="the shortened encoder window of the fourth pass (default %(default)s)",
    )
    p.add_argument("--json", metavar="OUT", help="write the full report here")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N clips")

    p = command(
        "train-medusa",
        "engines.speculative.medusa_train:run_train",
        "train Medusa draft heads by self-distillation (labels: the model's own greedy output)",
    )
    add_train_arguments(p)

    p = command(
        "bench-engine",
        "bench.engine:run_bench",
        "encoder/decoder speed on random weights of a model shape (CUDA graphs, HF baseline)",
    )
    add_bench_arguments(p)

    p = command(
        "bench-capacity",
        "bench.capacity:run_capacity",
        "N simulated real-time streams through the engine scheduler (random weights)",
    )
    add_capacity_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    import engines  # noqa: F401  (sets the OpenMP wait policy before torch loads)

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    module, _, function = args.run.partition(":")
    return getattr(importlib.import_module(module), function)(args) or 0
