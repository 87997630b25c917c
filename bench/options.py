"""Options of the measuring tools, apart from their code: `breeze-stream --help` imports nothing heavy."""

from __future__ import annotations

import argparse

from streaming.options import add_language_argument, add_pacing_arguments

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
