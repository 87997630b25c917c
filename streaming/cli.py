"""The runtime's commands: `transcribe`, and the engine every command loads (its options as engine
arguments). The `breeze-stream` dispatcher, which wires these and the tools' commands, is
breeze_stream.cli.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engines.backend import Backend
    from engines.whisper.decoding import DecodingOptions
    from streaming.audio.offline import Segment


def decoding_options(args: argparse.Namespace) -> DecodingOptions:
    from engines.whisper.decoding import DecodingOptions

    language = None if args.language == "auto" else args.language
    return DecodingOptions(language=language, beam_size=args.beam_size, timestamps=args.timestamps, prompt=args.prompt)


def engine_from_arguments(args: argparse.Namespace) -> Backend:
    """The engine the command's options name (engines.backend.create_engine)."""
    from engines.backend import create_engine
    from engines.config import EngineConfig
    from engines.engine import offline_speculative

    config = EngineConfig.from_arguments(args)
    if getattr(args, "speculative", "") is None:  # transcribe and eval: the device's offline default
        config = replace(config, speculative=offline_speculative(config.device))
    return create_engine(config)


def cmd_transcribe(args: argparse.Namespace) -> int:
    paths = [path for path in args.files if Path(path).is_file()]
    failures = len(args.files) - len(paths)
    for path in args.files:
        if path not in paths:
            print(f"error: {path}: no such file", file=sys.stderr)
    if not paths:
        return 1  # reported before torch and the model load
    from engines.whisper.audio import AudioFileError, load_audio
    from streaming.audio.offline import transcribe_audio

    engine = engine_from_arguments(args)
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
