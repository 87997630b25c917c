"""Options of the engine-side commands (`--backend`, bench-engine, bench-capacity, train-medusa).

Defined here, where nothing imports torch, so that `breeze-stream COMMAND --help` answers at once;
the modules that run the commands take their defaults from here. `SHAPE_NAMES` and `DTYPE_NAMES`
name the keys of engines.bench.SHAPES and DTYPES (tests/test_cli.py checks that they agree).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from engines.trtllm import BACKENDS

SHAPE_NAMES = ("base", "breeze", "large-v2", "tiny")
DTYPE_NAMES = ("bf16", "fp16", "fp32")
DEVICE_HELP = "auto (CUDA when there is a GPU, else the CPU) | cpu | cuda | cuda:N"
SPECULATIVE = ("off", "hypothesis", "lookup", "medusa", "both")
LANGUAGES = ("zh", "en", "auto")
"""What --language takes in every command and the native protocol's start message: auto detects."""

SECTIONS = ("encoder", "decoder", "verify", "mixed", "step", "exact", "probe", "hf")
"""Parts of bench-engine (--sections)."""
TOKENS_PER_SECOND = 5.43
"""Whisper tokens per second of speech in the dev references (zh + mix): bench-capacity's default (engines.capacity.measure_token_rate)."""
DEFAULT_HEADS = 4
"""Medusa heads a new set has (train-medusa --heads; engines.medusa.MedusaHeads)."""


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("backend")
    group.add_argument(
        "--backend",
        choices=BACKENDS,
        default=os.environ.get("BREEZE_BACKEND", "torch"),
        help="torch (default): all PyTorch; trtllm-encoder: TensorRT-LLM encoder engine + our PyTorch "
        "speculative decoder; trtllm: TensorRT-LLM's Executor for encoder and decoder (no "
        "speculation, for comparison)",
    )
    group.add_argument(
        "--trtllm-engine-dir",
        type=Path,
        default=os.environ.get("BREEZE_TRTLLM_ENGINE_DIR"),
        metavar="DIR",
        help="engines from `breeze-stream build-trtllm --out DIR` (default $BREEZE_TRTLLM_ENGINE_DIR)",
    )
    group.add_argument(
        "--no-self-test",
        dest="self_test",
        action="store_false",
        help="skip the TensorRT-LLM backends' start-up self-test",
    )


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shape",
        choices=SHAPE_NAMES,
        default="large-v2",
        help="model shape: large-v2 (= breeze, Breeze-ASR-25), base or tiny",
    )
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="random weights of that shape (the only mode: speed does not depend on the weights)",
    )
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help="default fp16 on CUDA, fp32 on the CPU")
    parser.add_argument("--batch", default="1,8,32,64", help="batch sizes, comma-separated")
    parser.add_argument("--json", metavar="OUT", help="write the results here (rewritten after each section)")
    parser.add_argument(
        "--baseline",
        choices=["none", "hf"],
        default="none",
        help="hf: Hugging Face transformers WhisperForConditionalGeneration, eager, same shape, same run",
    )
    parser.add_argument(
        "--modes",
        default=None,
        help="decoder step modes among eager,graph,kernels,compile (default eager,graph,kernels on CUDA, "
        "eager on the CPU); kernels: the Triton row kernels for steps of up to 16 rows, graphs with the "
        "self-attention kernel above",
    )
    parser.add_argument(
        "--compile-batch", default="1,64", help="batches timed with torch.compile (it compiles per batch)"
    )
    parser.add_argument(
        "--frames",
        default="1500,256",
        help="cross-attention frames of the decoder table (1500 = the 30 s window, 256 = 5.1 s)",
    )
    parser.add_argument("--position", type=int, default=100, help="decoder position of the timed step (tokens so far)")
    parser.add_argument(
        "--encoder-frames", type=int, default=3000, help="mel frames of an encoder window (3000 = 30 s)"
    )
    parser.add_argument(
        "--short-window",
        type=float,
        default=7.0,
        help="also time the encoder on a window this many seconds long (0: no)",
    )
    parser.add_argument("--drafts", default="0,1,2,4,8,16", help="draft lengths of the verification table")
    parser.add_argument("--draft-batch", default="1,32", help="batches of the verification table")
    parser.add_argument("--iters", type=int, default=20, help="calls per timing (median of 5 timings)")
    parser.add_argument("--step-steps", type=int, default=12, help="steps timed per batch in the step() table")
    parser.add_argument("--repeats", type=int, default=5, help="timings per figure (their median is reported)")
    parser.add_argument("--hf-steps", type=int, default=16, help="decoder steps timed per batch for the hf baseline")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"which parts to run, among {','.join(SECTIONS)}"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def add_capacity_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shape",
        choices=SHAPE_NAMES,
        default="large-v2",
        help="model shape: large-v2 (= breeze, Breeze-ASR-25), base or tiny",
    )
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help="default fp16 on CUDA, fp32 on the CPU")
    parser.add_argument("--streams", default="50,100,200,300", help="numbers of concurrent streams, one run each")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds measured per run")
    parser.add_argument(
        "--seeds",
        default="0",
        help="comma-separated: each number of streams runs once per seed (other segment lengths and "
        "pauses), so the report shows the run-to-run spread",
    )
    parser.add_argument(
        "--warmup", type=float, default=8.0, help="seconds before measuring (streams start, graphs record)"
    )
    parser.add_argument("--max-batch", type=int, default=128, help="rows of the running batch")
    parser.add_argument(
        "--max-partials",
        type=int,
        default=None,
        help="rows partials may hold (default: 1/16 of the rows on CUDA, all on the CPU)",
    )
    parser.add_argument(
        "--partials-per-round",
        type=int,
        default=None,
        help="partials started between two decoder steps (default: 2 on CUDA)",
    )
    parser.add_argument(
        "--node-budget", type=int, default=None, help="draft nodes per step over all rows (default 128 on CUDA)"
    )
    parser.add_argument(
        "--speculative",
        default="hypothesis",
        choices=SPECULATIVE,
        help="draft sources for exact speculative decoding (default %(default)s; medusa needs heads)",
    )
    parser.add_argument("--rate", type=float, default=TOKENS_PER_SECOND, help="tokens per second of speech")
    parser.add_argument(
        "--final-window",
        type=float,
        default=None,
        help="finals on segment + this many seconds (default: the full 30 s window)",
    )
    parser.add_argument(
        "--partial-window",
        type=float,
        default=2.0,
        help="partials on segment + this many seconds (default %(default)s)",
    )
    parser.add_argument("--window-bucket", type=float, default=1.0, help="seconds; shortened windows round up to it")
    parser.add_argument(
        "--draft-noise",
        type=float,
        default=0.0,
        help="share of draft tokens replaced by random ones, to simulate worse drafts (default 0)",
    )
    parser.add_argument("--no-graphs", action="store_true", help="eager decoder steps")
    parser.add_argument(
        "--equal-priority",
        action="store_true",
        help="the worker's CUDA stream at the encoder thread's priority (default: decoder steps first)",
    )
    parser.add_argument(
        "--no-row-kernels",
        action="store_true",
        help="small steps through PyTorch's kernels instead of the Triton row kernels",
    )
    parser.add_argument(
        "--serial-encoder",
        action="store_true",
        help="encoder calls on the worker thread, between decoder steps (default on CUDA: a thread of their own)",
    )
    parser.add_argument(
        "--cross-attention", default="auto", help="GraphOptions.cross_attention (auto | sdpa | efficient | flash)"
    )
    parser.add_argument(
        "--graph-mode",
        default="graph",
        choices=["graph", "compile"],
        help="GraphOptions.mode: plain CUDA graphs, or Inductor-fused regions inside them (engines/fused.py)",
    )
    parser.add_argument(
        "--prewarm",
        default="300:12",
        help="STREAMS:SECONDS of an unmeasured run first, so that CUDA graphs are recorded before "
        "measuring (a server records them once, at start); 0:0 = none",
    )
    parser.add_argument("--json", metavar="OUT", help="write the results here")
    parser.add_argument(
        "--measure-rate", metavar="MANIFEST", help="only print the token rate of a manifest's references"
    )


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    have = parser._option_string_actions  # the CLI may already have added --model / --device
    if "--model" not in have:
        parser.add_argument(
            "--model",
            default="default",
            help="the frozen base model: 'default' (embedded whisper-base), a local path or a hub id "
            "(MediaTek-Research/Breeze-ASR-25), or random:SHAPE (random weights, to time training)",
        )
    if "--device" not in have:
        parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument(
        "--audio",
        required=True,
        metavar="DIR|MANIFEST",
        help="training audio: a folder of audio files or a manifest.jsonl ({'audio': path, 'text': ...})",
    )
    parser.add_argument("--out", required=True, metavar="HEADS.safetensors", help="where to write the heads")
    parser.add_argument("--heads", type=int, default=DEFAULT_HEADS, help="number of Medusa heads (default 4)")
    parser.add_argument(
        "--layers",
        type=int,
        default=4,
        help="residual blocks per head (default 4, as the shipped heads; 1 = the classic Medusa-1 head, "
        "2 MB instead of 8 MB for whisper-base but fewer accepted drafts)",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=40,
        help="epochs over the cached hidden states (default 40; on a CPU, 10 gets most of the gain)",
    )
    parser.add_argument("--resume", action="store_true", help="continue from <out>.ckpt")
    parser.add_argument(
        "--init", metavar="HEADS.safetensors", help="start from these heads (same shape) instead of untrained ones"
    )
    parser.add_argument("--cache", metavar="DIR", help="label / hidden-state cache (default <out>.cache)")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default %(default)s)")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    parser.add_argument("--batch-size", type=int, default=128, help="token positions per step")
    parser.add_argument(
        "--softmax",
        choices=["auto", "full", "sampled"],
        default="auto",
        help="training loss over the full vocabulary, or a sampled softmax (every target token + "
        "--negatives random others per step: ~5x cheaper); auto = full on CUDA, sampled on CPU",
    )
    parser.add_argument(
        "--negatives",
        type=int,
        default=4096,
        help="random vocabulary entries per step of the sampled softmax (default %(default)s)",
    )
    parser.add_argument("--holdout", type=float, default=0.05, help="fraction of clips held out (default 0.05)")
    parser.add_argument(
        "--language", default="zh", choices=LANGUAGES, help="decoding language of the labels (default zh)"
    )
    parser.add_argument("--label-batch", type=int, default=8, help="clips per encoder/decoder batch while labelling")
    parser.add_argument(
        "--dtype",
        choices=["auto", "float32", "float16", "bfloat16"],
        default="auto",
        help="precision of the frozen model while labelling (auto: the engine's, fp16 on CUDA, fp32 on CPU); "
        "float32 on CUDA (TF32 off) gives labels that match the CPU engine",
    )
    parser.add_argument(
        "--label-only", action="store_true", help="only build the label / hidden-state cache (resumable), then stop"
    )
    parser.add_argument(
        "--verify",
        type=int,
        default=4,
        metavar="N",
        help="check the labels of N clips against Engine.transcribe first (0: skip)",
    )
    parser.add_argument("--max-tokens", type=int, default=224, help="cap on label length (the engine's default)")
    parser.add_argument("--limit", type=int, help="use only the first N clips")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch")
    parser.add_argument(
        "--data-recipe",
        help="id of the training data recorded in the heads file "
        "(default: the manifest's 'recipe' field, else the audio path's name)",
    )
