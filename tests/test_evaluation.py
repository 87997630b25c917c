"""Evaluating one's own audio (docs/evaluation.md): `eval` and `replay` take a manifest or a folder of
WAV files with a .txt transcript beside each, and score them by the convention of streaming.scoring.

The tiny model answers 好 for every segment, so the expected errors follow from the references."""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile
from hardening_helpers import REPO

from bench import replay
from bench.clips import phrases
from bench.options import add_replay_arguments
from bench.tiny import save_tiny_model
from streaming.manifest import Clip, read_clips

REFERENCES = {"a-short": "好", "b-longer": "你好", "c-english": "good"}


def write_folder(folder: Path) -> Path:
    """Three one-phrase clips; the tiny model hears 好 in each."""
    folder.mkdir()
    for name, text in REFERENCES.items():
        soundfile.write(folder / f"{name}.wav", phrases(1), 16000, subtype="PCM_16")
        (folder / f"{name}.txt").write_text(text + "\n", encoding="utf-8")
    (folder / "notes.md").write_text("not a clip")
    return folder


def test_folder_clips(tmp_path: Path):
    folder = write_folder(tmp_path / "mine")
    assert read_clips(folder) == [
        Clip(folder / "a-short.wav", "好", "zh"),
        Clip(folder / "b-longer.wav", "你好", "zh"),
        Clip(folder / "c-english.wav", "good", "en"),
    ]
    (folder / "b-longer.txt").unlink()
    with pytest.raises(ValueError, match=r"b-longer\.wav: no transcript b-longer\.txt beside it"):
        read_clips(folder)


def test_manifest_errors_name_the_line(tmp_path: Path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"audio": "x.wav", "text": "好", "lang": "fr"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"m\.jsonl:1: lang must be one of zh, mix, en, got 'fr'"):
        read_clips(manifest)
    manifest.write_text('{"audio": "x.wav", "text": "好"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"m\.jsonl: 1 audio file\(s\) missing, first .*x\.wav"):
        read_clips(manifest)


def test_eval_of_a_folder(tmp_path: Path):
    folder = write_folder(tmp_path / "mine")
    out = tmp_path / "eval.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "breeze_stream",
            "eval",
            str(folder),
            "--model",
            str(save_tiny_model(tmp_path / "tiny.pt")),
            "--device",
            "cpu",
            "--json",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text(encoding="utf-8"))
    assert [(c["audio"], c["lang"], c["hyp"]) for c in report["clips"]] == [
        ("a-short.wav", "zh", "好"),
        ("b-longer.wav", "zh", "好"),
        ("c-english.wav", "en", "好"),
    ]
    assert report["cer"] == pytest.approx(1 / 3)  # 你 missing of 你好; 好 right
    assert report["wer_en"] == 1.0


async def test_replay_of_a_folder(tiny_engine, tmp_path: Path):
    from streaming.server.app import Server, ServerConfig

    folder = write_folder(tmp_path / "mine")
    parser = argparse.ArgumentParser()
    add_replay_arguments(parser)
    out = tmp_path / "replay.json"
    async with Server(ServerConfig(port=0), engine=tiny_engine) as server:
        args = parser.parse_args(
            [
                str(folder),
                "--url",
                f"ws://127.0.0.1:{server.port}/v1/stream",
                "--speed",
                "4",
                "--no-progress",
                "--json",
                str(out),
            ]
        )
        code = await asyncio.to_thread(replay.run_replay, args)
    assert code == 0
    groups = json.loads(out.read_text(encoding="utf-8"))["groups"]
    zh, en = groups
    assert [c["reference"] for c in zh["clips"]] == ["好", "你好"] and [c["reference"] for c in en["clips"]] == ["good"]
    assert zh["summary"]["accuracy"]["cer_zh_mix"]["errors"] == 1
    assert zh["summary"]["accuracy"]["cer_zh_mix"]["ref_tokens"] == 3
    assert en["summary"]["accuracy"]["wer_en"]["rate"] == 1.0
