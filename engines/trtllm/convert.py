"""Any checkpoint breeze-stream reads -> an OpenAI-format Whisper `.pt`.

TensorRT-LLM's Whisper converter (`examples/models/core/whisper/convert_checkpoint.py`, 1.2.x)
takes only OpenAI's format: `torch.load(<model_dir>/<model_name>.pt)`, a dict with `dims` (the ten
ModelDimensions integers) and `model_state_dict` (openai/whisper parameter names). It does not
read Hugging Face directories. `engines.weights.checkpoints.load_checkpoint` already maps every format we
support (Hugging Face directory or hub id, CTranslate2, our cache, OpenAI) onto openai names, so
this converter only has to write that state dict out:

    python -m engines.trtllm.convert MODEL OUT.pt [--dtype float16|bfloat16|float32|keep]

The file holds plain dicts, ints and tensors, so it loads with `torch.load(weights_only=True)`
(the default of the torch in TensorRT-LLM 1.2's container). Breeze-ASR-25 needs no conversion:
MediaTek publishes the OpenAI `.pt` itself (`build-trtllm` fetches that).
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from dataclasses import asdict
from pathlib import Path

import torch

from engines.weights.checkpoints import Checkpoint, load_checkpoint
from engines.weights.shapes import check_state_dict, expected_shapes
from engines.whisper.model import ModelDims

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "keep": None}


def to_openai(checkpoint: Checkpoint, dtype: torch.dtype | None = torch.float16) -> dict:
    """The OpenAI checkpoint dict; floating tensors cast to `dtype` (None keeps them)."""
    check_state_dict(checkpoint.state_dict, checkpoint.dims, checkpoint.name)
    state = {}
    for name in expected_shapes(checkpoint.dims):  # openai's order, only openai's names
        tensor = checkpoint.state_dict[name]
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[name] = tensor.detach().contiguous().clone()
    out = {"dims": {k: int(v) for k, v in asdict(checkpoint.dims).items()}, "model_state_dict": state}
    if checkpoint.alignment_heads:  # openai's loader ignores it; ours reads it back
        out["alignment_heads"] = [[int(layer), int(head)] for layer, head in checkpoint.alignment_heads]
    return out


def save_openai(checkpoint: Checkpoint, path: str | Path, dtype: torch.dtype | None = torch.float16) -> Path:
    """Writes the `.pt` atomically (temp file + rename): an interrupted run leaves no half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        torch.save(to_openai(checkpoint, dtype), tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_openai_dims(path: str | Path) -> ModelDims:
    """The dims of an OpenAI `.pt`, read lazily (mmap: a 3 GB file costs no 3 GB of memory)."""
    path = Path(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 -- any unreadable file gets the same clear message
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({exc})") from None
    if not isinstance(data, dict) or "dims" not in data or "model_state_dict" not in data:
        raise ValueError(
            f"{path}: not an OpenAI Whisper checkpoint (expected a dict with 'dims' and 'model_state_dict'); "
            "convert it with `python -m engines.trtllm.convert`"
        )
    dims = ModelDims(**data["dims"])
    check_state_dict(data["model_state_dict"], dims, str(path))
    return dims


def convert(spec: str, out: str | Path, dtype: str = "float16", progress=print) -> Checkpoint:
    """Loads `spec` (anything `load_checkpoint` reads) and writes it to `out` as an OpenAI `.pt`."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    checkpoint = load_checkpoint(spec, progress=progress)
    save_openai(checkpoint, out, DTYPES[dtype])
    return checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.trtllm.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "model", help="Hugging Face directory or hub id, CTranslate2 directory, OpenAI .pt, or 'default'"
    )
    parser.add_argument("out", help="where to write the OpenAI-format .pt")
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="float16",
        help="cast floating tensors (TensorRT-LLM's converter casts to float16 itself); default %(default)s",
    )
    args = parser.parse_args(argv)
    checkpoint = convert(args.model, args.out, args.dtype)
    print(f"wrote {args.out}: {checkpoint.name}, {checkpoint.dims}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
