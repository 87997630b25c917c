#!/usr/bin/env python3
"""Real Mandarin recordings for training Medusa heads (recipe `real-cs-words-v1`).

Runs in the product's own environment (numpy, soundfile, soxr, scipy):

    python data/medusa/real.py --out /work/data-medusa/real-v1 \\
        --magicdata RAW/Mandarin_Chinese_Speech_Corpus_for_TTS_Customer_Service_Scene \\
        --audio-cmn RAW/64k/hsk

Sources (fetched as plain files from public GitHub repositories; see README.md for licences):
  * `--magicdata`: Magic Data's "Mandarin Chinese Speech Corpus for TTS (Customer Service Scene)",
    250 studio sentences of one female speaker, 48 kHz (its `Wave/` and `ProsodyLabeling/`);
  * `--audio-cmn`: audio-cmn's HSK word recordings (`64k/hsk/cmn-WORD.mp3`, one speaker).
Sentences are joined 1-3 per clip, words 6-12 per clip (a read word list), with short pauses.
Every sentence is used `--copies` times, each time in another clip with another augmentation.

Held-out split: sentences (and words) are dealt into small buckets, a clip only joins items of
one bucket, and the manifest's `group` is the bucket, so no sentence is on both sides of the
split `train-medusa` draws by group.

Augmentation, drawn per clip (the first clip of a sentence only gets silence and level):
speed 0.9 / 1.0 / 1.1 (1/4, 1/2, 1/4), 0.1-0.6 s of leading and 0.2-0.8 s of trailing silence,
reverberation with probability 0.4 (a synthetic room: exponentially decaying noise, RT60
0.2-0.7 s, 30-60% wet), telephone channel with probability 0.3 (300-3400 Hz, 8 kHz, G.711
mu-law round trip), white or pink noise at 20-35 dB SNR with probability 0.6, level -20..-3 dBFS
peak. Speed, telephone and noise are prepare.py's (the synthetic recipe's) functions.

Output: <out>/clips/*.wav (16 kHz mono PCM16) and <out>/manifest.jsonl:
{"audio": "clips/000123.wav", "text": transcript or words, "group": bucket, "source": ...,
"items": [...], "augment": {...}, "duration": s, "recipe": "real-cs-words-v1"}. The text is for
reading only: `train-medusa` labels every clip with the model's own greedy output.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
import soxr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prepare import SAMPLE_RATE, change_speed, channel  # noqa: E402  (the synthetic recipe's steps)

RECIPE = "real-cs-words-v1"
PROSODY_MARK = re.compile(r"#\d")


@dataclass
class Item:
    id: str
    source: str
    path: Path
    text: str


def magicdata_items(root: Path) -> list[Item]:
    """The corpus' sentences: Wave/<domain>/<id>.wav with the text of ProsodyLabeling/<domain>.txt."""
    items = []
    for labels in sorted((root / "ProsodyLabeling").glob("*.txt")):
        for line in labels.read_text(encoding="utf-8-sig").splitlines():
            if "\t" not in line or not line[:1].isdigit():
                continue  # the pinyin lines start with a tab
            utt, text = line.split("\t", 1)
            wav = root / "Wave" / labels.stem / f"{utt.strip()}.wav"
            if wav.is_file():
                items.append(Item(f"magicdata:{utt.strip()}", "magicdata-cs", wav, PROSODY_MARK.sub("", text).strip()))
    return items


def audio_cmn_items(root: Path) -> list[Item]:
    """audio-cmn's word files, cmn-WORD.mp3 (a trailing _X_ marks a variant reading)."""
    return [
        Item(f"audio-cmn:{f.stem}", "audio-cmn", f, f.stem.removeprefix("cmn-").split("_")[0])
        for f in sorted(root.glob("cmn-*.mp3"))
    ]


def buckets(items: list[Item], size: int, rng: random.Random) -> list[list[Item]]:
    items = items[:]
    rng.shuffle(items)
    return [items[i : i + size] for i in range(0, len(items), size)]


def plan_clips(bucketed: list[list[Item]], uses: int, sizes: list[int], rng: random.Random) -> list[list[Item]]:
    """Clips of `sizes`-many items of one bucket each, every item used `uses` times."""
    clips = []
    for bucket in bucketed:
        pool = [item for _ in range(uses) for item in rng.sample(bucket, len(bucket))]
        while pool:
            k = min(rng.choice(sizes), len(pool))
            clips.append(pool[:k])
            pool = pool[k:]
    rng.shuffle(clips)
    return clips


def load(path: Path) -> np.ndarray:
    audio, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    return soxr.resample(audio, rate, SAMPLE_RATE).astype(np.float32) if rate != SAMPLE_RATE else audio


def trim(audio: np.ndarray, threshold_db: float = -45) -> np.ndarray:
    """Drop leading and trailing silence (below threshold_db of the peak, 10 ms frames)."""
    frame = SAMPLE_RATE // 100
    n = len(audio) // frame
    if n == 0:
        return audio
    level = np.sqrt((audio[: n * frame].reshape(n, frame) ** 2).mean(axis=1) + 1e-12)
    loud = np.nonzero(level > np.abs(audio).max() * 10 ** (threshold_db / 20))[0]
    if not len(loud):
        return audio
    return audio[max(0, loud[0] - 5) * frame : (loud[-1] + 6) * frame]


def reverberate(audio: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """A synthetic room: noise decaying by 60 dB in rt60 seconds, mixed `wet` with the dry signal."""
    from scipy.signal import fftconvolve

    rt60, wet = float(rng.uniform(0.2, 0.7)), float(rng.uniform(0.3, 0.6))
    t = np.arange(int(rt60 * SAMPLE_RATE)) / SAMPLE_RATE
    rir = rng.standard_normal(len(t)).astype(np.float32) * np.exp(-6.9 * t / rt60).astype(np.float32)
    rir /= np.sqrt((rir**2).sum())
    tail = fftconvolve(audio, rir)[: len(audio)].astype(np.float32)
    return (1 - wet) * audio + wet * tail, {"rt60": round(rt60, 2), "wet": round(wet, 2)}


def augment(audio: np.ndarray, rng: np.random.Generator, clean: bool) -> tuple[np.ndarray, dict]:
    """Speed, silence, a room, the telephone channel and noise, level; `clean`: silence and level only."""
    info: dict = {}
    if not clean:
        info["speed"] = float(rng.choice([0.9, 1.0, 1.0, 1.1]))
        audio = change_speed(audio, info["speed"]) if info["speed"] != 1.0 else audio
    lead, tail = (np.zeros(int(rng.uniform(a, b) * SAMPLE_RATE), np.float32) for a, b in ((0.1, 0.6), (0.2, 0.8)))
    audio = np.concatenate([lead, audio, tail])
    if not clean:
        if rng.random() < 0.4:
            audio, info["reverb"] = reverberate(audio, rng)
        audio = channel(audio, rng, info)
    peak_db = float(rng.uniform(-20, -3))
    info["peak_dbfs"] = round(peak_db, 1)
    return (audio / max(float(np.abs(audio).max()), 1e-6) * 10 ** (peak_db / 20)).astype(np.float32), info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="data folder (outside the repository)")
    ap.add_argument("--magicdata", type=Path, help="the Customer Service Scene corpus folder (Wave/, ProsodyLabeling/)")
    ap.add_argument("--audio-cmn", type=Path, help="audio-cmn's 64k/hsk folder of cmn-WORD.mp3 files")
    ap.add_argument("--copies", type=int, default=3, help="clips each sentence appears in (default 3)")
    ap.add_argument("--word-clips", type=int, default=300, help="clips of audio-cmn words (default 300)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not args.magicdata and not args.audio_cmn:
        ap.error("give --magicdata and/or --audio-cmn")

    rng = random.Random(args.seed)
    plans: list[tuple[str, list[Item]]] = []
    if args.magicdata:
        sentences = magicdata_items(args.magicdata)
        print(f"magicdata: {len(sentences)} sentences", flush=True)
        for i, bucket in enumerate(buckets(sentences, 5, rng)):
            plans += [(f"magicdata-b{i}", clip) for clip in plan_clips([bucket], args.copies, [1, 2, 2, 3], rng)]
    if args.audio_cmn:
        words = audio_cmn_items(args.audio_cmn)
        per_clip = 9
        words = rng.sample(words, min(len(words), args.word_clips * per_clip))
        print(f"audio-cmn: {len(words)} of its word recordings", flush=True)
        for i, bucket in enumerate(buckets(words, 45, rng)):
            plans += [(f"audio-cmn-b{i}", clip) for clip in plan_clips([bucket], 1, [6, 8, 9, 10, 12], rng)]

    clips_dir = args.out / "clips"
    clips_dir.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    seconds = {"magicdata-cs": 0.0, "audio-cmn": 0.0}
    with (args.out / "manifest.jsonl").open("w", encoding="utf-8") as f:
        for n, (group, clip) in enumerate(plans):
            nrng = np.random.default_rng([args.seed, n])
            parts = []
            for item in clip:
                parts.append(trim(load(item.path)))
                parts.append(np.zeros(int(nrng.uniform(0.2, 0.5) * SAMPLE_RATE), np.float32))
            # a sentence's first appearance stays clean (only silence and level): the real voice as recorded
            clean = clip[0].source == "magicdata-cs" and not any(item.id in seen for item in clip)
            seen.update(item.id for item in clip)
            audio, info = augment(np.concatenate(parts[:-1]), nrng, clean)
            if len(audio) > 29.5 * SAMPLE_RATE:
                continue
            name = f"clips/{n:06d}.wav"
            soundfile.write(str(args.out / name), audio, SAMPLE_RATE, subtype="PCM_16")
            duration = len(audio) / SAMPLE_RATE
            seconds[clip[0].source] += duration
            sep = "" if clip[0].source == "magicdata-cs" else "，"
            rec = {
                "audio": name,
                "text": sep.join(item.text for item in clip),
                "group": group,
                "source": clip[0].source,
                "items": [item.id for item in clip],
                "augment": info,
                "duration": round(duration, 2),
                "recipe": RECIPE,
            }
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    summary = {src: f"{s / 60:.1f} min" for src, s in seconds.items()}
    print(f"{len(plans)} clips -> {args.out / 'manifest.jsonl'}: {summary}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
