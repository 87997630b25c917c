"""`breeze-stream eval`: offline accuracy and speed of the engine over a manifest or a folder.

Inputs (streaming.manifest) and scoring (streaming.scoring) are those of docs/evaluation.md:
corpus CER over zh and mix clips, WER over en clips, real-time factor = processing seconds /
audio seconds. A manifest line may carry a `prompt` (names and terms to expect in that clip): it
replaces `--prompt` for the clip.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engines.engine import Engine
    from engines.whisper.decoding import DecodingOptions
    from streaming.manifest import Clip


def run_eval(engine: Engine, clips: list[Clip], options: DecodingOptions, window: float | None = None) -> dict:
    from tqdm import tqdm

    from engines.whisper.audio import load_audio
    from engines.whisper.text import is_traditional
    from streaming.audio.offline import transcribe_audio
    from streaming.scoring import Score, corpus_score, score

    results, cer_scores, wer_scores = [], [], []
    stats = {"decoder_forwards": 0, "tokens": 0, "encoder_seconds": 0.0, "decoder_seconds": 0.0}
    audio_seconds = wall = 0.0
    for clip in tqdm(clips, desc="eval", unit="clip"):
        audio = load_audio(clip.audio)
        clip_options = options if clip.lang != "en" or options.language is None else replace(options, language="en")
        if clip.prompt is not None:
            clip_options = replace(clip_options, prompt=clip.prompt)
        start = time.perf_counter()
        segments = transcribe_audio(engine, audio, clip_options, window=window)
        elapsed = time.perf_counter() - start
        hyp = "".join(s.text for s in segments) if clip.lang != "en" else " ".join(s.text for s in segments)
        clip_score: Score = score(clip.text, hyp, clip.lang)
        (wer_scores if clip.lang == "en" else cer_scores).append(clip_score)
        for s in segments:
            t = s.transcript
            stats["decoder_forwards"] += t.forwards
            stats["tokens"] += len(t.tokens)
            stats["encoder_seconds"] += t.encoder_seconds
            stats["decoder_seconds"] += t.decoder_seconds
        audio_seconds += len(audio) / 16000
        wall += elapsed
        results.append(
            {
                "audio": clip.audio.name,
                "lang": clip.lang,
                "prompt": clip_options.prompt,
                "ref": clip.text,
                "hyp": hyp,
                "errors": clip_score.errors,
                "ref_tokens": clip_score.ref_tokens,
                "traditional": is_traditional(hyp) if clip.lang != "en" else None,
                "seconds": round(elapsed, 3),
                "duration": round(len(audio) / 16000, 3),
            }
        )
    cer, wer = corpus_score(cer_scores), corpus_score(wer_scores)
    report = {
        "model": engine.name,
        "cer": cer.rate if cer.ref_tokens else None,
        "wer_en": wer.rate if wer.ref_tokens else None,
        "rtf": wall / audio_seconds if audio_seconds else None,
        "audio_seconds": round(audio_seconds, 3),
        "clips": results,
        "stats": stats,
    }
    print(
        f"clips {len(results)}  CER(zh+mix) {_pct(report['cer'])}  WER(en) {_pct(report['wer_en'])}  "
        f"RTF {report['rtf']:.3f}  all zh hypotheses Traditional: "
        f"{all(r['traditional'] for r in results if r['traditional'] is not None)}"
    )
    return report


def cmd_eval(args: argparse.Namespace) -> int:
    """`breeze-stream eval`: a missing manifest is reported before torch and the model load."""
    from streaming.manifest import read_clips

    try:
        clips = read_clips(Path(args.manifest))[: args.limit]
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1  # reported before torch and the model load
    from streaming.cli import decoding_options, engine_from_arguments

    engine = engine_from_arguments(args)
    report = run_eval(engine, clips, decoding_options(args), window=args.window)
    engine.close()
    if args.json:
        Path(args.json).write_text(json.dumps(report, ensure_ascii=False, indent=2))
    return 0


def _pct(rate: float | None) -> str:
    return "n/a" if rate is None else f"{100 * rate:.1f}%"
