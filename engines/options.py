"""Options of the engine-side commands (`--backend`, train-medusa) and the engine's names.

Defined here, where nothing imports torch, so that `breeze-stream COMMAND --help` answers at once;
the modules that run the commands take their defaults from here. The benchmarks' options are in
bench/options.py.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from engines.trtllm import BACKENDS

DEVICE_HELP = "auto (CUDA when there is a GPU, else the CPU) | cpu | cuda | cuda:N"
SPECULATIVE = ("off", "hypothesis", "lookup", "medusa", "hypothesis+lookup", "both")
LANGUAGES = ("zh", "en", "auto")
"""What --language takes in every command and the native protocol's start message: auto detects."""

TOKENS_PER_SECOND = 5.43
"""Whisper tokens per second of speech in the dev references (zh + mix): bench-capacity's default (bench.capacity.measure_token_rate)."""
DEFAULT_HEADS = 4
"""Medusa heads a new set has (train-medusa --heads; engines.speculative.medusa.MedusaHeads)."""


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


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """`breeze-stream train-medusa`'s options: the base model and audio, the heads' training, the labels."""
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
    _add_head_training_arguments(parser)
    _add_label_arguments(parser)


def _add_head_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The heads' shape and their training on the cached hidden states."""
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
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch")


def _add_label_arguments(parser: argparse.ArgumentParser) -> None:
    """The labels: the frozen model's greedy decodes of the audio and its hidden states, cached."""
    parser.add_argument("--cache", metavar="DIR", help="label / hidden-state cache (default <out>.cache)")
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
    parser.add_argument(
        "--data-recipe",
        help="id of the training data recorded in the heads file "
        "(default: the manifest's 'recipe' field, else the audio path's name)",
    )
