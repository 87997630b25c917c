"""Options of the measuring tools, apart from their code: `breeze-stream --help` imports nothing heavy."""

from __future__ import annotations

import argparse

from streaming.options import CLIPS_HELP, add_language_argument

DEFAULT_URL = "ws://127.0.0.1:8765/v1/stream"


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
