"""A reader for CTranslate2 `model.bin` files (binary version 6) holding a Whisper model.

Written by hand so that loading the embedded default needs neither the `ctranslate2` package nor
its runtime: the format is a flat list of named tensors, so a few dozen lines read it. See
shared/reference/ctranslate2-whisper.md for the layout and the name mapping checked here.
"""

from __future__ import annotations

import io
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from engines.whisper.model import ModelDims

BINARY_VERSION = 6
# CTranslate2's DataType enum order (include/ctranslate2/types.h).
DTYPES = (torch.float32, torch.int8, torch.int16, torch.int32, torch.float16, torch.bfloat16)


@dataclass
class Ct2Model:
    spec: str
    revision: int
    variables: dict[str, torch.Tensor]
    options: dict[str, int | float] = field(default_factory=dict)  # rank-0 variables
    aliases: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> torch.Tensor:
        """A variable by name, following aliases (CT2 stores a duplicate tensor only once)."""
        for _ in range(64):
            if name in self.variables:
                return self.variables[name]
            if name in self.aliases:
                name = self.aliases[name]
            elif name.endswith("_scale") and name[: -len("_scale")] in self.aliases:
                # an aliased quantized weight implicitly aliases its scale as well
                name = self.aliases[name[: -len("_scale")]] + "_scale"
            else:
                raise KeyError(name)
        raise ValueError(f"alias cycle at {name}")


class Stream(Protocol):
    """What model.bin is read from: an open binary file, or Concatenated parts."""

    def read(self, size: int, /) -> bytes: ...

    def readinto(self, buffer: memoryview, /) -> int | None: ...


class _Reader:
    """Sequential reads that fail loudly, naming the file and offset, when the data runs out."""

    def __init__(self, f: Stream, source: str):
        self.f, self.source, self.offset = f, source, 0

    def bytes(self, n: int) -> bytearray:
        buf = bytearray(n)
        got = self.f.readinto(memoryview(buf)) if n else 0
        if got != n:
            raise ValueError(
                f"{self.source}: truncated or corrupt CTranslate2 model.bin "
                f"(wanted {n} bytes at offset {self.offset}, got {got})"
            )
        self.offset += n
        return buf

    def unpack(self, fmt: str) -> int:
        return struct.unpack("<" + fmt, self.bytes(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("H")  # length includes the trailing NUL
        raw = self.bytes(n)
        if n == 0 or raw[-1] != 0:
            raise ValueError(f"{self.source}: corrupt CTranslate2 model.bin (bad string at offset {self.offset - n})")
        return raw[:-1].decode("utf-8")


def read_model_bin(f: Stream, source: str = "model.bin") -> Ct2Model:
    """Parse a whole model.bin stream; `source` names the file in error messages."""
    r = _Reader(f, source)
    version = r.unpack("I")
    if version != BINARY_VERSION:
        raise ValueError(f"{source}: unsupported CTranslate2 binary version {version} (expected {BINARY_VERSION})")
    model = Ct2Model(spec=r.string(), revision=r.unpack("I"), variables={})
    n_vars = r.unpack("I")
    for _ in range(n_vars):
        name = r.string()
        rank = r.unpack("B")
        shape = [r.unpack("I") for _ in range(rank)]
        type_id = r.unpack("B")
        n_bytes = r.unpack("I")
        if type_id >= len(DTYPES):
            raise ValueError(f"{source}: corrupt CTranslate2 model.bin (dtype id {type_id} for {name})")
        dtype = DTYPES[type_id]
        expected = dtype.itemsize * (torch.Size(shape).numel())
        if n_bytes != expected:
            raise ValueError(
                f"{source}: corrupt CTranslate2 model.bin ({name}: {n_bytes} bytes for shape {shape} {dtype})"
            )
        data = r.bytes(n_bytes)
        tensor = torch.frombuffer(data, dtype=dtype) if n_bytes else torch.empty(0, dtype=dtype)
        if rank == 0:
            model.options[name] = tensor.item()
        else:
            model.variables[name] = tensor.reshape(shape)
    for _ in range(r.unpack("I")):
        alias = r.string()
        model.aliases[alias] = r.string()
    if f.read(1):
        raise ValueError(f"{source}: corrupt CTranslate2 model.bin (unexpected data after offset {r.offset})")
    return model


def _weight(model: Ct2Model, name: str) -> torch.Tensor:
    """A float weight; int8/int16 quantized ones are dequantized (q / scale)."""
    w = model.get(name)
    if w.is_floating_point():
        return w
    try:
        scale = model.get(name + "_scale")
    except KeyError:
        scale = torch.tensor(model.options[name + "_scale"])
    scale = scale.float().reshape(-1, *([1] * (w.dim() - 1))) if scale.dim() else scale.float()
    return w.float() / scale


def to_openai(model: Ct2Model, source: str = "model.bin") -> tuple[ModelDims, dict[str, torch.Tensor]]:
    """Map a WhisperSpec model onto openai/whisper parameter names, splitting fused projections."""
    if model.spec != "WhisperSpec":
        raise ValueError(f"{source}: not a Whisper model (CTranslate2 spec {model.spec!r})")
    try:
        return _to_openai(model, source)
    except KeyError as e:
        raise ValueError(f"{source}: CTranslate2 Whisper model lacks variable {e.args[0]}") from None


def _to_openai(model: Ct2Model, source: str) -> tuple[ModelDims, dict[str, torch.Tensor]]:
    sd: dict[str, torch.Tensor] = {}

    def linear(dst: str, src: str) -> None:
        sd[dst + ".weight"] = _weight(model, src + "/weight")
        sd[dst + ".bias"] = model.get(src + "/bias")

    def norm(dst: str, src: str) -> None:
        sd[dst + ".weight"] = model.get(src + "/gamma")
        sd[dst + ".bias"] = model.get(src + "/beta")

    def split(dsts: list[str], src: str) -> None:
        """A fused [q; k; v] (or [k; v]) projection; whisper's key has no bias (CT2 stores zeros)."""
        ws = _weight(model, src + "/weight").chunk(len(dsts))
        bs = model.get(src + "/bias").chunk(len(dsts))
        for dst, w, b in zip(dsts, ws, bs):
            sd[dst + ".weight"] = w.clone()
            if not dst.endswith(".key"):
                sd[dst + ".bias"] = b.clone()

    def layers(prefix: str) -> int:
        found = (re.match(prefix + r"/layer_(\d+)/", n) for n in [*model.variables, *model.aliases])
        return len({m.group(1) for m in found if m})

    n_audio_layer, n_text_layer = layers("encoder"), layers("decoder")
    for name in ("conv1", "conv2"):
        linear(f"encoder.{name}", f"encoder/{name}")
    sd["encoder.positional_embedding"] = model.get("encoder/position_encodings/encodings")
    for i in range(n_audio_layer):
        src, dst = f"encoder/layer_{i}", f"encoder.blocks.{i}"
        split([f"{dst}.attn.query", f"{dst}.attn.key", f"{dst}.attn.value"], f"{src}/self_attention/linear_0")
        linear(f"{dst}.attn.out", f"{src}/self_attention/linear_1")
        norm(f"{dst}.attn_ln", f"{src}/self_attention/layer_norm")
        linear(f"{dst}.mlp.0", f"{src}/ffn/linear_0")
        linear(f"{dst}.mlp.2", f"{src}/ffn/linear_1")
        norm(f"{dst}.mlp_ln", f"{src}/ffn/layer_norm")
    norm("encoder.ln_post", "encoder/layer_norm")

    sd["decoder.token_embedding.weight"] = _weight(model, "decoder/embeddings/weight")
    sd["decoder.positional_embedding"] = model.get("decoder/position_encodings/encodings")
    for i in range(n_text_layer):
        src, dst = f"decoder/layer_{i}", f"decoder.blocks.{i}"
        split([f"{dst}.attn.query", f"{dst}.attn.key", f"{dst}.attn.value"], f"{src}/self_attention/linear_0")
        linear(f"{dst}.attn.out", f"{src}/self_attention/linear_1")
        norm(f"{dst}.attn_ln", f"{src}/self_attention/layer_norm")
        linear(f"{dst}.cross_attn.query", f"{src}/attention/linear_0")
        split([f"{dst}.cross_attn.key", f"{dst}.cross_attn.value"], f"{src}/attention/linear_1")
        linear(f"{dst}.cross_attn.out", f"{src}/attention/linear_2")
        norm(f"{dst}.cross_attn_ln", f"{src}/attention/layer_norm")
        linear(f"{dst}.mlp.0", f"{src}/ffn/linear_0")
        linear(f"{dst}.mlp.2", f"{src}/ffn/linear_1")
        norm(f"{dst}.mlp_ln", f"{src}/ffn/layer_norm")
    norm("decoder.ln", "decoder/layer_norm")

    # whisper ties the output projection to the token embedding; CT2 stores it as an alias
    embedding = sd["decoder.token_embedding.weight"]
    if not torch.equal(_weight(model, "decoder/projection/weight"), embedding):
        raise ValueError(f"{source}: decoder/projection/weight differs from the token embedding (whisper ties them)")

    _own_storage(sd)
    return _dims(model, sd, n_audio_layer, n_text_layer), sd


def _own_storage(sd: dict[str, torch.Tensor]) -> None:
    """Aliased variables arrive as one tensor under several names; gives each name its own storage
    (safetensors refuses to save shared tensors, and in-place edits must not leak across names)."""
    seen: set[int] = set()
    for name, tensor in sd.items():
        if tensor.untyped_storage().data_ptr() in seen:
            sd[name] = tensor.clone()
        seen.add(sd[name].untyped_storage().data_ptr())


def _dims(model: Ct2Model, sd: dict[str, torch.Tensor], n_audio_layer: int, n_text_layer: int) -> ModelDims:
    """The model's dimensions, read off its tensors and its options."""
    conv1, audio_pos, text_pos = (
        sd["encoder.conv1.weight"],
        sd["encoder.positional_embedding"],
        sd["decoder.positional_embedding"],
    )
    return ModelDims(
        n_mels=conv1.shape[1],
        n_audio_ctx=audio_pos.shape[0],
        n_audio_state=audio_pos.shape[1],
        n_audio_head=int(model.options["encoder/num_heads"]),
        n_audio_layer=n_audio_layer,
        n_vocab=sd["decoder.token_embedding.weight"].shape[0],
        n_text_ctx=text_pos.shape[0],
        n_text_state=text_pos.shape[1],
        n_text_head=int(model.options["decoder/num_heads"]),
        n_text_layer=n_text_layer,
    )


class Concatenated:
    """Reads several files as one stream, so model.bin's two parts are never joined on disk."""

    def __init__(self, paths: list[Path]):
        self.paths = list(paths)
        self.f: io.BufferedReader | None = None

    def readinto(self, buf: memoryview | bytearray) -> int:
        view, n = memoryview(buf).cast("B"), 0
        while n < len(view):
            if self.f is None:
                if not self.paths:
                    break
                self.f = open(self.paths.pop(0), "rb")
            got = self.f.readinto(view[n:])
            if got:
                n += got
            else:
                self.f.close()
                self.f = None
        return n

    def read(self, size: int) -> bytes:
        buf = bytearray(size)
        return bytes(buf[: self.readinto(buf)])

    def __enter__(self) -> Concatenated:
        return self

    def __exit__(self, *exc) -> None:
        if self.f is not None:
            self.f.close()
