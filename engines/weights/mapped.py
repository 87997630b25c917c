"""Tensors of a .safetensors read through a memory map of the file rather than into memory."""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import torch

MAPPED_NAME = "decoder.token_embedding.weight"
"""The tensor of our .safetensors read through a memory map rather than into memory: on the CPU the
fp16 token embedding is kept for lookups (engines/weights/fp16.py), which touch a few rows a step;
mapped, only the pages of the rows looked up stay resident (51 MiB for whisper-base otherwise)."""

MAPPED_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


def mapped_tensor(path: Path, name: str) -> torch.Tensor:
    """Tensor `name` of the .safetensors at `path` over a private (copy-on-write) map of the file;
    `drop_mapped_pages` gives back what has been read of it. Its `_file_map` is the mmap."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        entry = json.loads(f.read(size))[name]
        begin, end = entry["data_offsets"]
        dtype = MAPPED_DTYPES[entry["dtype"]]
        file_map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    start = 8 + size + begin
    count = (end - begin) // dtype.itemsize
    tensor = torch.frombuffer(file_map, dtype=dtype, count=count, offset=start).view(entry["shape"])
    tensor._file_map = file_map  # type: ignore[attr-defined]
    return tensor


def drop_mapped_pages(tensor: torch.Tensor) -> None:
    """The pages of a `mapped_tensor` read so far leave the resident set (they are read again from the
    file, or the page cache, when touched); nothing for other tensors."""
    file_map = getattr(tensor, "_file_map", None)
    if file_map is not None and hasattr(mmap, "MADV_DONTNEED"):
        file_map.madvise(mmap.MADV_DONTNEED)
