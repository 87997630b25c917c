"""train-medusa's labels: the clips, their held-out split, and the frozen model's own greedy
tokens with the decoder's hidden states, cached in shards (steps 1 and 2 of
engines/speculative/medusa_train.py's docstring)."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

CACHE_FORMAT = "breeze-stream-medusa-cache/1"
AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3", ".m4a", ".opus"}
SHARD_CLIPS = 128


@dataclass
class Clip:
    id: str  # path relative to the data root: stable across runs
    path: Path
    group: str  # clips of one group stay on one side of the held-out split
    recipe: str | None = None


def _eval_root() -> Path:
    return (Path(__file__).resolve().parents[2] / "shared" / "eval").resolve()


def _refuse_eval(path: Path) -> None:
    forbidden = _eval_root()
    resolved = path.resolve()
    if resolved == forbidden or forbidden in resolved.parents:
        raise SystemExit(f"error: {path} is inside the evaluation data ({forbidden}); never train on it")


def list_clips(spec: str | Path) -> list[Clip]:
    """Clips of a manifest.jsonl or a folder (see the module docstring)."""
    path = Path(spec).expanduser()
    _refuse_eval(path)
    if path.is_dir() and (path / "manifest.jsonl").is_file():
        path = path / "manifest.jsonl"
    clips: list[Clip] = []
    if path.is_file():
        root = path.parent
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                audio = Path(rec["audio"]).expanduser()
            except (ValueError, KeyError, TypeError) as exc:
                raise SystemExit(f"error: {path}:{n}: expected a JSON object with an 'audio' field ({exc})") from None
            full = audio if audio.is_absolute() else root / audio
            _refuse_eval(full)
            group = rec.get("group") or rec.get("text") or str(audio)
            clips.append(Clip(str(audio), full, str(group), rec.get("recipe")))
    elif path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file()):
            rel = str(f.relative_to(path))
            clips.append(Clip(rel, f, rel))
    else:
        raise SystemExit(f"error: {spec}: no such folder or manifest")
    if not clips:
        raise SystemExit(f"error: {spec}: no audio clips found")
    return clips


def bar_interval() -> float:
    """Progress-bar refresh: live on a terminal, every 30 s into a log file."""
    return 0.1 if sys.stderr.isatty() else 30.0


def is_held_out(group: str, fraction: float, seed: int) -> bool:
    digest = hashlib.sha256(f"{seed}:{group}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


# ---- step 1 and 2: labels and hidden states ---------------------------------------------------


class HiddenCache:
    """Shards of (hidden [N, n_state] fp16, targets [N] int64, offsets [clips + 1]) + index.json."""

    def __init__(self, folder: Path, key: dict):
        self.folder = folder
        self.key = key
        self.index_path = folder / "index.json"
        self.index: dict[str, Any] = {"format": CACHE_FORMAT, "key": key, "shards": [], "skipped": {}}  # index.json
        if self.index_path.is_file():
            index = json.loads(self.index_path.read_text())
            if index.get("format") != CACHE_FORMAT or index.get("key") != key:
                raise SystemExit(
                    f"error: {folder} holds labels of another model or setting "
                    f"({index.get('key')}); remove it or pass another --cache"
                )
            self.index = index

    @property
    def done(self) -> set[str]:
        ids = set(self.index["skipped"])
        for shard in self.index["shards"]:
            ids.update(shard["clips"])
        return ids

    def add_shard(self, clips: list[str], hidden: list[Tensor], targets: list[Tensor], skipped: dict[str, str]) -> None:
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        if clips:
            name = f"shard-{len(self.index['shards']):05d}.safetensors"
            lengths = torch.tensor([0] + [len(t) for t in targets])
            save_file(
                {
                    "hidden": torch.cat(hidden).to(torch.float16).contiguous(),
                    "targets": torch.cat(targets).to(torch.int64),
                    "offsets": lengths.cumsum(0),
                },
                str(self.folder / name),
            )
            self.index["shards"].append({"file": name, "clips": clips})
        self.index["skipped"].update(skipped)
        tmp = self.index_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.index, ensure_ascii=False, indent=1))
        tmp.replace(self.index_path)

    def load(self, wanted: set[str] | None = None) -> tuple[list[str], Tensor, list[Tensor]]:
        """(clip ids, hidden [N, d] fp16, per-clip target tensors), in shard order."""
        from safetensors.torch import load_file

        ids, hidden, targets = [], [], []
        for shard in self.index["shards"]:
            data = load_file(str(self.folder / shard["file"]))
            off = data["offsets"].tolist()
            for i, clip in enumerate(shard["clips"]):
                if wanted is not None and clip not in wanted:
                    continue
                ids.append(clip)
                hidden.append(data["hidden"][off[i] : off[i + 1]])
                targets.append(data["targets"][off[i] : off[i + 1]])
        return ids, (torch.cat(hidden) if hidden else torch.zeros(0, 0, dtype=torch.float16)), targets


class Labeller:
    """The frozen model, decoding greedily exactly as the engine does (full 30 s window, clip
    log-mel padded in the normalised domain, Whisper's logit rules, the repetition guard), and
    keeping the decoder's last hidden state of every fed position on the way: the state of input
    x_t is the one whose base-head target is x_{t+1}. Greedy decoding with a KV cache computes
    exactly the states a teacher-forced pass over prompt + labels would, so no second pass."""

    def __init__(self, checkpoint, device: torch.device, dtype: torch.dtype | None = None):
        from engines.whisper.model import Whisper
        from engines.whisper.tokenizer import Tokenizer

        self.device = device
        self.dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        self.name = checkpoint.name
        with torch.device(device):  # a large model (Breeze) is built where it runs, not first on the host
            self.model = Whisper(checkpoint.dims)
        self.model.load_state_dict(checkpoint.state_dict)
        self.model.to(device, self.dtype).eval()
        self.tokenizer = Tokenizer(checkpoint.vocabulary)
        self.suppress_tokens = checkpoint.suppress_tokens

    @torch.inference_mode()
    def label(self, audios: list, options) -> list[tuple[list[int], Tensor, Tensor] | str]:
        """Per clip: (greedy tokens, hidden [n + 1, d] fp16 on the CPU, targets [n + 1]) or a skip
        reason. targets = tokens + <|endoftext|> (tokens alone when the length cap cut them)."""
        from engines.whisper.audio import N_FRAMES, clip_mel, pad_mel
        from engines.whisper.decoding import LogitFilter, repetition_period
        from engines.whisper.model import causal_mask

        model, tok, device = self.model, self.tokenizer, self.device
        n_ctx = model.dims.n_text_ctx
        mel = torch.stack([pad_mel(clip_mel(a, model.dims.n_mels), N_FRAMES) for a in audios])
        features = model.encoder(mel.to(device, self.dtype))
        cross = model.decoder.cross_kv(features)
        batch = len(audios)
        prompt = tok.prompt(options.language, options.task, options.timestamps)
        p = len(prompt)
        max_new = min(options.max_new_tokens, n_ctx - p)
        filt = LogitFilter(tok, self.suppress_tokens, model.dims.n_vocab, options, device)
        cache = model.new_cache(batch)
        tokens = torch.tensor([prompt] * batch, device=device)
        positions = torch.arange(p, device=device).expand_as(tokens)
        hidden = model.decoder.hidden(tokens, positions, cache, None, cross, causal_mask(positions, n_ctx))[:, -1]
        generated: list[list[int]] = [[] for _ in range(batch)]
        states: list[list[Tensor]] = [[] for _ in range(batch)]
        status: list[str | None] = [None] * batch  # None: running; "eot" / "cap" / a skip reason
        active = list(range(batch))
        while True:
            logits = filt.apply(model.decoder.logits(hidden[active]), [generated[b] for b in active])
            best = logits.argmax(-1).tolist()
            for i, b in enumerate(active):
                states[b].append(hidden[b].to("cpu", torch.float16))
                t = best[i]
                generated[b].append(t)
                if t == tok.eot:
                    status[b] = "eot"
                elif len(generated[b]) >= max_new:
                    status[b] = "cap"
                elif repetition_period(generated[b]):
                    status[b] = "repetition loop"
            active = [b for b in active if status[b] is None]
            if not active:
                break
            # every row steps (finished ones on a dummy token): gathering the live rows' cache and
            # cross-attention keys/values each step would cost more than the extra rows
            tokens = torch.tensor(
                [[generated[b][-1] if status[b] is None else tok.eot] for b in range(batch)], device=device
            )
            positions = torch.tensor([[min(p + len(generated[b]) - 1, n_ctx - 1)] for b in range(batch)], device=device)
            hidden = model.decoder.hidden(tokens, positions, cache, None, cross, causal_mask(positions, n_ctx))[:, -1]
        out: list = []
        for b in range(batch):
            gen = generated[b][:-1] if status[b] == "eot" else generated[b]
            if status[b] not in ("eot", "cap"):
                out.append(status[b])
            elif not gen:
                out.append("no tokens")
            else:
                target = gen + [tok.eot] if status[b] == "eot" else gen
                out.append((gen, torch.stack(states[b][: len(target)]), torch.tensor(target, dtype=torch.int64)))
        return out


def verify_labels(checkpoint, device: torch.device, clips: list[Clip], labeller: Labeller, options, log) -> None:
    """The labels must be what the engine itself outputs: compare a few clips with
    Engine.transcribe (speculation off where the engine has the switch)."""
    from engines.engine import Engine
    from engines.whisper.audio import load_audio

    try:
        engine = Engine(checkpoint, device=str(device), dtype=labeller.dtype, speculative="off")
    except TypeError:
        engine = Engine(checkpoint, device=str(device), dtype=labeller.dtype)
    same = total = 0
    try:
        for clip in clips:
            audio = load_audio(clip.path)
            mine = labeller.label([audio], options)[0]
            if isinstance(mine, str):
                continue
            total += 1
            same += engine.transcribe(audio, options).tokens == mine[0]
    finally:
        engine.close()
    log(f"label check: {same}/{total} clips decode to the same tokens as Engine.transcribe")
    if same != total:
        log("warning: the labeller and the engine disagree; heads will be trained on slightly different labels")


def build_cache(labeller: Labeller, clips: list[Clip], cache: HiddenCache, options, batch: int) -> None:
    from tqdm import tqdm

    from engines.whisper.audio import SAMPLE_RATE, load_audio

    done = cache.done
    todo = [c for c in clips if c.id not in done]
    if not todo:
        return
    print(
        f"labelling {len(todo)} clips with {labeller.name} (greedy, language {options.language}); "
        f"{len(done)} already in {cache.folder}",
        file=sys.stderr,
    )
    ids, hidden, targets, skipped = [], [], [], {}
    bar = tqdm(total=len(todo), unit="clip", desc="labels", dynamic_ncols=True, mininterval=bar_interval())
    tokens_total = 0
    for start in range(0, len(todo), batch):
        chunk = todo[start : start + batch]
        audios, live = [], []
        for clip in chunk:
            try:
                audio = load_audio(clip.path)
            except Exception as exc:
                skipped[clip.id] = f"unreadable: {exc}"
                continue
            if len(audio) > 30 * SAMPLE_RATE:
                skipped[clip.id] = "longer than 30 s"
                continue
            audios.append(audio)
            live.append(clip)
        for clip, res in zip(live, labeller.label(audios, options) if audios else []):
            if isinstance(res, str):
                skipped[clip.id] = res
            else:
                ids.append(clip.id)
                hidden.append(res[1])
                targets.append(res[2])
                tokens_total += len(res[2])
        bar.update(len(chunk))
        bar.set_postfix(tokens=tokens_total, skipped=len(skipped))
        if len(ids) >= SHARD_CLIPS or start + batch >= len(todo):
            cache.add_shard(ids, hidden, targets, skipped)
            ids, hidden, targets, skipped = [], [], [], {}
    bar.close()


# ---- step 3: training --------------------------------------------------------------------------
