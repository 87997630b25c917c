"""Options of the measuring tools, apart from their code: `breeze-stream --help` imports nothing heavy.
`SHAPE_NAMES` and `DTYPE_NAMES` name the keys of engines.synthetic.SHAPES and bench.engine.DTYPES
(tests/test_cli.py checks that they agree)."""

from __future__ import annotations

import argparse

from engines.options import DEVICE_HELP, SPECULATIVE, TOKENS_PER_SECOND
from streaming.options import CLIPS_HELP, add_language_argument

DEFAULT_URL = "ws://127.0.0.1:8765/v1/stream"
SHAPE_NAMES = ("base", "breeze", "large-v2", "tiny")
DTYPE_NAMES = ("bf16", "fp16", "fp32")
SECTIONS = ("encoder", "decoder", "verify", "mixed", "step", "exact", "probe", "hf")
"""Parts of bench-engine (--sections)."""


def add_load_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="MANIFEST_OR_AUDIO",
        help="a manifest (.jsonl: audio, text, lang per line; audio relative to the manifest) "
        "or audio files (no reference, no CER)",
    )
    parser.add_argument("--url", default=DEFAULT_URL, help=f"native protocol endpoint (default {DEFAULT_URL})")
    parser.add_argument("--streams", type=int, default=1, metavar="N", help="concurrent real-time streams (default 1)")
    parser.add_argument(
        "--duration",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="audio per stream: clips are looped until it is reached (default 60)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="P",
        help="client processes the streams are spread over (default 1; about one per 50-100 streams "
        "keeps the client far from saturation: see client_cpu and pacing in the report)",
    )
    parser.add_argument(
        "--sync",
        action="store_true",
        help="start every stream at once with the clips in manifest order (default: staggered starts, "
        "a seeded shuffle per stream)",
    )
    parser.add_argument(
        "--ramp",
        type=float,
        default=None,
        metavar="SECONDS",
        help="spread the starts uniformly over this many seconds (default: the mean clip plus --gap)",
    )
    add_pacing_arguments(parser)
    add_language_argument(
        parser,
        default=None,
        help="language of every stream's start message: zh, en or auto (default: each stream takes "
        "its first clip's, zh for zh and mix, and plays only clips of that language)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-stream clip orders (default 0)")
    parser.add_argument(
        "--end-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="how long a stream waits for 'end' after 'stop' (default 60)",
    )
    parser.add_argument(
        "--json",
        dest="json_out",
        default=None,
        metavar="OUT",
        help="write the report: config, merged figures, server and client figures, per-stream summaries",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def add_pacing_arguments(parser: argparse.ArgumentParser) -> None:
    """How replay and bench-load lay out the clips they stream: silence around them, frame size."""
    parser.add_argument(
        "--gap",
        type=float,
        default=1.5,
        metavar="S",
        help="seconds of silence before, between and after the clips (default 1.5)",
    )
    parser.add_argument(
        "--frame-ms", type=float, default=40.0, metavar="MS", help="audio per binary frame, 20-100 ms (default 40)"
    )


def add_replay_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="MANIFEST_FOLDER_OR_AUDIO",
        help=CLIPS_HELP + ", or audio files (no reference, no CER)",
    )
    parser.add_argument(
        "--url", default="ws://127.0.0.1:8765/v1/stream", help="native protocol endpoint (default %(default)s)"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=1,
        metavar="N",
        help="independent streams at once, each playing every clip (default 1)",
    )
    parser.add_argument(
        "--stagger", type=float, default=0.0, metavar="S", help="start stream i after i*S seconds (default 0)"
    )
    parser.add_argument("--speed", type=float, default=1.0, help="pace as a multiple of real time (default 1.0)")
    add_pacing_arguments(parser)
    add_language_argument(
        parser,
        default=None,
        help="language of every session's start message (default: each clip's manifest lang, "
        "mix as zh, one session per language; zh for audio files)",
    )
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="replay only the first N clips")
    parser.add_argument(
        "--end-timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="how long to wait for 'end' after 'stop' (default 120)",
    )
    parser.add_argument(
        "--json",
        dest="json_out",
        default=None,
        metavar="OUT",
        help="write raw events with send/arrival times, per-clip results and the summary",
    )
    parser.add_argument("--plot", default=None, metavar="OUT.png", help="draw the latencies over stream time")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--quiet", action="store_true", help="print only the headline figures")
    return parser


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shape",
        choices=SHAPE_NAMES,
        default="large-v2",
        help="model shape: large-v2 (= breeze, Breeze-ASR-25), base or tiny",
    )
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="random weights of that shape (the only mode: speed does not depend on the weights)",
    )
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help="default fp16 on CUDA, fp32 on the CPU")
    parser.add_argument("--batch", default="1,8,32,64", help="batch sizes, comma-separated")
    parser.add_argument("--json", metavar="OUT", help="write the results here (rewritten after each section)")
    parser.add_argument(
        "--baseline",
        choices=["none", "hf"],
        default="none",
        help="hf: Hugging Face transformers WhisperForConditionalGeneration, eager, same shape, same run",
    )
    parser.add_argument(
        "--modes",
        default=None,
        help="decoder step modes among eager,graph,kernels,compile (default eager,graph,kernels on CUDA, "
        "eager on the CPU); kernels: the Triton row kernels for steps of up to 16 rows, graphs with the "
        "self-attention kernel above",
    )
    parser.add_argument(
        "--compile-batch", default="1,64", help="batches timed with torch.compile (it compiles per batch)"
    )
    parser.add_argument(
        "--frames",
        default="1500,256",
        help="cross-attention frames of the decoder table (1500 = the 30 s window, 256 = 5.1 s)",
    )
    parser.add_argument("--position", type=int, default=100, help="decoder position of the timed step (tokens so far)")
    parser.add_argument(
        "--encoder-frames", type=int, default=3000, help="mel frames of an encoder window (3000 = 30 s)"
    )
    parser.add_argument(
        "--short-window",
        type=float,
        default=7.0,
        help="also time the encoder on a window this many seconds long (0: no)",
    )
    parser.add_argument(
        "--sampled-clips",
        default="3,8,15",
        help="also time full windows with the padding sampled (engines/whisper/sampled.py, --padding-stride) "
        "for clips of these seconds ('': no)",
    )
    parser.add_argument("--padding-stride", type=int, default=4, help="the sampled windows' stride (default 4)")
    parser.add_argument("--drafts", default="0,1,2,4,8,16", help="draft lengths of the verification table")
    parser.add_argument("--draft-batch", default="1,32", help="batches of the verification table")
    parser.add_argument("--iters", type=int, default=20, help="calls per timing (median of 5 timings)")
    parser.add_argument("--step-steps", type=int, default=12, help="steps timed per batch in the step() table")
    parser.add_argument("--repeats", type=int, default=5, help="timings per figure (their median is reported)")
    parser.add_argument("--hf-steps", type=int, default=16, help="decoder steps timed per batch for the hf baseline")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"which parts to run, among {','.join(SECTIONS)}"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def add_capacity_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shape",
        choices=SHAPE_NAMES,
        default="large-v2",
        help="model shape: large-v2 (= breeze, Breeze-ASR-25), base or tiny",
    )
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help="default fp16 on CUDA, fp32 on the CPU")
    parser.add_argument("--streams", default="50,100,200,300", help="numbers of concurrent streams, one run each")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds measured per run")
    parser.add_argument(
        "--seeds",
        default="0",
        help="comma-separated: each number of streams runs once per seed (other segment lengths and "
        "pauses), so the report shows the run-to-run spread",
    )
    parser.add_argument(
        "--warmup", type=float, default=8.0, help="seconds before measuring (streams start, graphs record)"
    )
    parser.add_argument("--max-batch", type=int, default=128, help="rows of the running batch")
    parser.add_argument(
        "--max-partials",
        type=int,
        default=None,
        help="rows partials may hold (default: 1/16 of the rows on CUDA, all on the CPU)",
    )
    parser.add_argument(
        "--partials-per-round",
        type=int,
        default=None,
        help="partials started between two decoder steps (default: 2 on CUDA)",
    )
    parser.add_argument(
        "--node-budget", type=int, default=None, help="draft nodes per step over all rows (default 128 on CUDA)"
    )
    parser.add_argument(
        "--speculative",
        default="hypothesis",
        choices=SPECULATIVE,
        help="draft sources for exact speculative decoding (default %(default)s; medusa needs heads)",
    )
    parser.add_argument("--rate", type=float, default=TOKENS_PER_SECOND, help="tokens per second of speech")
    parser.add_argument(
        "--final-window",
        type=float,
        default=None,
        help="finals on segment + this many seconds (default: the full 30 s window)",
    )
    parser.add_argument(
        "--partial-window",
        type=float,
        default=2.0,
        help="partials on segment + this many seconds (default %(default)s)",
    )
    parser.add_argument("--window-bucket", type=float, default=1.0, help="seconds; shortened windows round up to it")
    parser.add_argument(
        "--draft-noise",
        type=float,
        default=0.0,
        help="share of draft tokens replaced by random ones, to simulate worse drafts (default 0)",
    )
    parser.add_argument("--no-graphs", action="store_true", help="eager decoder steps")
    parser.add_argument(
        "--equal-priority",
        action="store_true",
        help="the worker's CUDA stream at the encoder thread's priority (default: decoder steps first)",
    )
    parser.add_argument(
        "--no-row-kernels",
        action="store_true",
        help="small steps through PyTorch's kernels instead of the Triton row kernels",
    )
    parser.add_argument(
        "--serial-encoder",
        action="store_true",
        help="encoder calls on the worker thread, between decoder steps (default on CUDA: a thread of their own)",
    )
    parser.add_argument(
        "--cross-attention", default="auto", help="GraphOptions.cross_attention (auto | sdpa | efficient | flash)"
    )
    parser.add_argument(
        "--graph-mode",
        default="graph",
        choices=["graph", "compile"],
        help="GraphOptions.mode: plain CUDA graphs, or Inductor-fused regions inside them (engines/gpu/fused.py)",
    )
    parser.add_argument(
        "--prewarm",
        default="300:12",
        help="STREAMS:SECONDS of an unmeasured run first, so that CUDA graphs are recorded before "
        "measuring (a server records them once, at start); 0:0 = none",
    )
    parser.add_argument("--json", metavar="OUT", help="write the results here")
    parser.add_argument(
        "--measure-rate", metavar="MANIFEST", help="only print the token rate of a manifest's references"
    )
