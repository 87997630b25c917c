"""train-medusa on Breeze-ASR-25's formats: a Hugging Face checkpoint directory (what
`--model MediaTek-Research/Breeze-ASR-25` downloads) and random weights of a named shape
(`random:large-v2` on the GPU; `random:tiny` here), with the label cache and --resume."""

from __future__ import annotations

import json
import wave

import numpy as np
import pytest
import torch

from engines.medusa import load_heads, read_heads_meta
from engines.medusa_train import main as train_main
from engines.synthetic import SHAPES

transformers = pytest.importorskip("transformers")


def _clips(folder, n=4):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        t = np.arange(int(16000 * (0.6 + 0.2 * i))) / 16000
        x = 0.3 * np.sin(2 * np.pi * (150 + 40 * i) * t) + 0.05 * rng.standard_normal(len(t))
        with wave.open(str(folder / f"{i}.wav"), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(16000)
            w.writeframes((x * 32767).astype("<i2").tobytes())
    return folder


@pytest.fixture(scope="module")
def breeze_format_dir(tmp_path_factory):
    """A tiny WhisperForConditionalGeneration saved by transformers: Breeze-ASR-25's file layout
    (config.json + model.safetensors) at a width of 32 (Whisper's MLP is 4x the width)."""
    config = transformers.WhisperConfig(
        vocab_size=51865,
        num_mel_bins=80,
        d_model=32,
        encoder_layers=1,
        encoder_attention_heads=2,
        decoder_layers=1,
        decoder_attention_heads=2,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_source_positions=1500,
        max_target_positions=448,
    )
    torch.manual_seed(0)
    model = transformers.WhisperForConditionalGeneration(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("breeze") / "tiny-breeze-format"
    model.save_pretrained(path)
    return path


def _train(model: str, tmp_path, *extra: str) -> list[str]:
    return [
        "--model",
        model,
        "--audio",
        str(tmp_path / "clips"),
        "--out",
        str(tmp_path / "heads.safetensors"),
        "--heads",
        "2",
        "--layers",
        "2",
        "--device",
        "cpu",
        "--max-tokens",
        "5",
        "--verify",
        "0",
        "--holdout",
        "0",
        "--negatives",
        "64",
        *extra,
    ]


def test_breeze_format_directory_trains_and_resumes(breeze_format_dir, tmp_path, capsys):
    _clips(tmp_path / "clips")
    assert train_main(_train(str(breeze_format_dir), tmp_path, "--epochs", "1")) == 0
    first = capsys.readouterr()
    summary = json.loads(first.out.strip().splitlines()[-1])
    assert summary["clips"] == 4 and summary["positions"] > 0
    assert "ms/step" in first.err
    heads = load_heads(tmp_path / "heads.safetensors", 32)
    assert (heads.n_heads, heads.n_layers) == (2, 2)

    assert train_main(_train(str(breeze_format_dir), tmp_path, "--epochs", "2", "--resume")) == 0
    second = capsys.readouterr().err
    assert "resumed from" in second and "after epoch 1" in second
    assert "labelling" not in second  # the label cache of the first run was reused
    assert read_heads_meta(tmp_path / "heads.safetensors")["epochs"] == "2"


def test_random_shape_trains_heads_of_that_width(tmp_path, capsys):
    _clips(tmp_path / "clips", n=2)
    assert train_main(_train("random:tiny", tmp_path, "--epochs", "1")) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["clips"] == 2 and summary["positions"] == 2 * 5  # end of text is suppressed: every clip hits the cap
    meta = read_heads_meta(tmp_path / "heads.safetensors")
    assert meta["base_model"].startswith("random:tiny") and meta["n_state"] == str(SHAPES["tiny"].n_text_state)


def test_init_starts_from_other_heads(breeze_format_dir, tmp_path, capsys):
    _clips(tmp_path / "clips", n=2)
    assert train_main(_train(str(breeze_format_dir), tmp_path, "--epochs", "1", "--data-recipe", "first")) == 0
    (tmp_path / "heads.safetensors").rename(tmp_path / "first.safetensors")
    args = _train(str(breeze_format_dir), tmp_path, "--epochs", "1", "--lr", "0", "--data-recipe", "second")
    assert train_main([*args, "--init", str(tmp_path / "first.safetensors")]) == 0
    capsys.readouterr()
    first, second = (load_heads(tmp_path / name, 32) for name in ("first.safetensors", "heads.safetensors"))
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        torch.testing.assert_close(a, b)  # a zero learning rate keeps the initial heads
    assert read_heads_meta(tmp_path / "heads.safetensors")["data_recipe"] == "second (from first.safetensors: first)"
