"""The runtime's commands: `transcribe`, and the engine every command loads (its options as engine
arguments). The `breeze-stream` dispatcher, which wires these and the tools' commands, is
breeze_stream.cli.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engines.decoding import DecodingOptions
    from streaming.audio.offline import Segment


def decoding_options(args: argparse.Namespace) -> DecodingOptions:
    from engines.decoding import DecodingOptions

    language = None if args.language == "auto" else args.language
    return DecodingOptions(language=language, beam_size=args.beam_size, timestamps=args.timestamps, prompt=args.prompt)


def load_engine(args: argparse.Namespace) -> Any:
    """The engine the options name: engines.engine.Engine, or a TensorRT-LLM backend."""
    from engines.trtllm.backend import load_backend  # --backend torch is engines.engine.Engine.load

    extra = engine_options(getattr(args, "fp32_weights", False), getattr(args, "cuda_graphs", "graph"))
    return load_backend(args, speculative=getattr(args, "speculative", "both"), medusa=args.medusa, **extra)


def engine_options(
    fp32_weights: bool = False,
    cuda_graphs: str = "graph",
    max_batch: int | None = None,
    window_bucket: float | None = None,
) -> dict[str, Any]:
    """Engine keyword arguments of --fp32-weights, --cuda-graphs, --max-batch and --window-bucket
    (only where they differ from the defaults, so that backends without these options are not
    handed them)."""
    extra: dict[str, Any] = {"fp16_weights": False} if fp32_weights else {}
    if max_batch is not None:
        extra["max_batch"] = max_batch
    if window_bucket is not None:
        extra["window_bucket"] = window_bucket
    if cuda_graphs != "graph":
        from engines.cuda_graphs import GraphOptions

        extra["cuda_graphs"] = False if cuda_graphs == "off" else GraphOptions(mode=cuda_graphs)
    return extra


def cmd_transcribe(args: argparse.Namespace) -> int:
    paths = [path for path in args.files if Path(path).is_file()]
    failures = len(args.files) - len(paths)
    for path in args.files:
        if path not in paths:
            print(f"error: {path}: no such file", file=sys.stderr)
    if not paths:
        return 1  # reported before torch and the model load
    from streaming.audio.codecs import AudioFileError, load_audio
    from streaming.audio.offline import transcribe_audio

    engine = load_engine(args)
    options = decoding_options(args)
    out = []
    for path in paths:
        try:
            audio = load_audio(path)
        except AudioFileError as exc:  # its message names the file
            print(f"error: {exc}", file=sys.stderr)
            failures += 1
            continue
        segments = transcribe_audio(engine, audio, options, window=args.window, words=args.word_timestamps)
        if args.json:
            out.append({"file": path, "segments": [segment_json(s) for s in segments]})
        else:
            print(f"# {path}")
            for s in segments:
                print(f"[{s.start:7.2f} -> {s.end:7.2f}] {s.text}")
                for w in s.words or []:
                    print(f"    [{w.start:7.2f} -> {w.end:7.2f}] {w.text.strip()}  ({w.probability:.2f})")
    if args.json:
        text = json.dumps(out, ensure_ascii=False, indent=2)
        print(text) if args.json == "-" else Path(args.json).write_text(text + "\n", encoding="utf-8")
    engine.close()
    return 1 if failures else 0


def segment_json(segment: Segment) -> dict[str, Any]:
    """One segment of `transcribe --json`: times, text, and the word timings when asked for."""
    from streaming.protocols.native import word_list

    out = {"start": round(segment.start, 2), "end": round(segment.end, 2), "text": segment.text}
    if segment.words is not None:
        out["words"] = word_list(segment.words)
    return out
