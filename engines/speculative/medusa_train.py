"""`breeze-stream train-medusa`: Medusa heads by self-distillation of a frozen Whisper.

    breeze-stream train-medusa --model M --audio DIR|MANIFEST --out heads.safetensors \\
        [--heads 4] [--epochs N] [--device cpu|cuda] [--resume]

1. Labels. Every clip goes through the frozen model exactly as the engine transcribes it (full
   30 s window, clip log-mel padded in the normalised domain, greedy, Whisper's logit rules, the
   repetition guard): the labels are the model's OWN tokens, not any reference text, so the heads
   learn to predict what this model will say. Clips that loop, come out empty or are longer than
   30 s are skipped.
2. Hidden states. The decoder's last hidden states (after its final layer norm) at the positions
   from the last prompt token to the last generated token are kept on the way (with a KV cache
   they are exactly what teacher forcing prompt + labels would give), stored in fp16 with the
   target tokens (generated tokens, then <|endoftext|>) in shards of a cache folder (default
   `<out>.cache/`). This step is the expensive one (an encoder pass and a greedy decode per clip;
   about 2-4 s a clip on 2 shared CPU cores, 0.04 s on an H100); it is resumable (finished shards
   are kept; `--label-only` stops after it) and done once, so epochs cost only the heads. On
   CUDA, `--dtype float32` (TF32 off) gives the CPU engine's labels (checked identical on 384
   clips); the default fp16 gives the CUDA engine's.
3. Training. Only the heads train (AdamW, cosine schedule), the shared output projection stays
   frozen. On CUDA the softmax runs over the full vocabulary; on a CPU, by default, over every
   token that occurs as a target plus 4,096 random others per step (~10x cheaper; accuracy is
   always measured over the full vocabulary). With h_j the hidden state whose base-head target
   is token y_j, head k (0-based) is trained with cross-entropy against y_{j+k+1}: offset k + 2
   from the input token, the convention of engines/speculative/medusa.py. A held-out split (5% of the clips, grouped by the manifest's
   text so the same sentence never lands on both sides) gives per-head top-1 / top-3 accuracy and
   the chain acceptance: the mean number of leading heads whose top-1 is right, so
   1 + that is the expected tokens per decoder forward of a top-1 Medusa chain.
   A checkpoint (`<out>.ckpt`) is written after every epoch; `--resume` continues from it.

Inputs: a folder (every .wav/.flac/.ogg/.mp3 below it; a manifest.jsonl inside it is used instead
when present) or a manifest.jsonl whose lines hold {"audio": path relative to the manifest,
"text": optional, "group": optional (the held-out split's unit; default the text)}. Training on
the project's evaluation sets (../shared/eval) is refused. `--model random:SHAPE` (random weights
of a real shape, e.g. random:large-v2 for Breeze-ASR-25) times labelling and training.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from engines.options import add_train_arguments
from engines.speculative.medusa import MedusaHeads, load_heads, read_heads_meta, save_heads
from engines.speculative.medusa_labels import (
    Clip,
    HiddenCache,
    Labeller,
    build_cache,
    is_held_out,
    list_clips,
    verify_labels,
)
from engines.speculative.medusa_training import format_eval, head_targets, train_heads

if TYPE_CHECKING:
    from engines.weights.checkpoints import Checkpoint
    from engines.whisper.model import ModelDims


def run_train(args: argparse.Namespace) -> int:
    """Labels the clips (cached, resumable), then trains the heads on them and writes them to --out."""
    from engines.engine import resolve_device

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out).expanduser()
    cache_dir = Path(args.cache).expanduser() if args.cache else out.with_name(out.name + ".cache")
    clips = list_clips(args.audio)
    if args.limit:
        clips = clips[: args.limit]
    t_start = time.perf_counter()
    device = resolve_device(args.device)
    checkpoint, labeller = _frozen_model(args, device)
    cache, label_seconds = _label(args, checkpoint, device, labeller, clips, cache_dir)
    if args.label_only:
        done, skipped = len(cache.done), len(cache.index["skipped"])
        summary = {"cache": str(cache_dir), "clips": done - skipped, "skipped": skipped}
        print(json.dumps({**summary, "label_seconds": round(label_seconds, 1)}))
        return 0
    weight = labeller.model.decoder.token_embedding.weight.detach().to(device, torch.float32).clone()
    dims, name = checkpoint.dims, labeller.name
    del labeller, checkpoint
    peak_labels = None
    if device.type == "cuda":  # the frozen model's peak, then the heads' own from here on
        peak_labels = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    data = _training_set(args, cache, clips, device)
    recipe = args.data_recipe or next((c.recipe for c in clips if c.recipe), None) or Path(args.audio).name
    t1 = time.perf_counter()
    heads, history, recipe, negatives = _train(
        args, dims, weight, data, out.with_name(out.name + ".ckpt"), name, recipe
    )
    train_seconds = time.perf_counter() - t1
    final = history[-1].get("heldout") if history else None
    before = history[0].get("heldout") if history and history[0]["epoch"] == -1 else None
    meta = {
        "base_model": name,
        "data_recipe": recipe,
        "n_vocab": str(dims.n_vocab),
        "language": args.language,
        "convention": "head k (0-based) on the hidden state of input x_t predicts x_{t+k+2}",
        "train_clips": str(len(data.ids) - data.held),
        "heldout_clips": str(data.held),
        "epochs": str(max((h["epoch"] for h in history), default=-1) + 1),
        "softmax": "full" if negatives is None else f"sampled (targets + {negatives} negatives)",
        "heldout": final or {},
        "heldout_untrained": before or {},
    }
    save_heads(out, heads, meta)
    summary = {
        "out": str(out),
        "clips": len(data.ids),
        "heldout_clips": data.held,
        "positions": data.positions,
        "label_seconds": round(label_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "peak_gpu_gib_model": round(peak_labels, 2) if peak_labels is not None else None,
        "peak_gpu_gib_training": round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if peak_labels is not None
        else None,
        "heldout": final,
        "untrained": before,
    }
    print(json.dumps(summary, ensure_ascii=False))
    print(
        f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB); held-out {format_eval(final) if final else '(none)'}",
        file=sys.stderr,
    )
    return 0


def _frozen_model(args: argparse.Namespace, device: torch.device) -> tuple[Checkpoint, Labeller]:
    """The base model (--model; random:SHAPE builds random weights of a real shape, which time
    training and train nothing useful) and the labeller that runs it in --dtype."""
    from engines.config import RANDOM_PREFIX
    from engines.synthetic import random_checkpoint
    from engines.weights.checkpoints import load_checkpoint

    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    if args.model.startswith(RANDOM_PREFIX):
        checkpoint = random_checkpoint(
            args.model[len(RANDOM_PREFIX) :],
            device,
            dtype or (torch.float16 if device.type == "cuda" else torch.float32),
            args.seed,
        )
    else:
        checkpoint = load_checkpoint(args.model, progress=lambda m: print(m, file=sys.stderr))
    if device.type == "cuda" and dtype == torch.float32:  # true fp32, as on the CPU
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return checkpoint, Labeller(checkpoint, device, dtype)


def _label(
    args: argparse.Namespace,
    checkpoint: Checkpoint,
    device: torch.device,
    labeller: Labeller,
    clips: list[Clip],
    cache_dir: Path,
) -> tuple[HiddenCache, float]:
    """The label cache with every clip in it (after checking a few labels against the engine), and
    the seconds the labelling took."""
    from engines.whisper.decoding import DecodingOptions

    options = DecodingOptions(language=args.language, max_new_tokens=args.max_tokens)
    key = {
        "model": labeller.name,
        "dims": list(vars(checkpoint.dims).values()),
        "language": args.language,
        "dtype": str(labeller.dtype),
        "max_tokens": args.max_tokens,
    }
    cache = HiddenCache(cache_dir, key)
    todo = [c for c in clips if c.id not in cache.done]
    if todo and args.verify:
        try:
            verify_labels(
                checkpoint, device, todo[: args.verify], labeller, options, lambda m: print(m, file=sys.stderr)
            )
        except Exception as exc:  # the check is advisory: labelling does not depend on the engine
            print(
                f"warning: could not compare the labels with the engine ({type(exc).__name__}: {exc})", file=sys.stderr
            )
    t0 = time.perf_counter()
    build_cache(labeller, clips, cache, options, args.label_batch)
    return cache, time.perf_counter() - t0


@dataclass
class TrainingSet:
    """The cached positions split by clip group into training and held-out sets."""

    ids: list[str]  # the clips in the cache
    positions: int  # token positions of all of them
    held: int  # clips held out
    train: tuple[Tensor, Tensor]  # hidden states, head targets
    heldout: tuple[Tensor, Tensor] | None


def _training_set(args: argparse.Namespace, cache: HiddenCache, clips: list[Clip], device: torch.device) -> TrainingSet:
    wanted = {c.id for c in clips}
    groups = {c.id: c.group for c in clips}
    ids, hidden, per_clip = cache.load(wanted)
    if not ids:
        raise SystemExit("error: no usable clips (all skipped); see the cache's index.json")
    targets = head_targets(per_clip, args.heads)
    held = torch.tensor([is_held_out(groups[i], args.holdout, args.seed) for i in ids])
    lengths = torch.tensor([len(t) for t in per_clip])
    held_pos = held.repeat_interleave(lengths)
    n_held = int(held.sum())
    print(
        f"{len(ids)} clips ({len(cache.index['skipped'])} skipped), {len(hidden)} token positions; "
        f"held out {n_held} clips / {int(held_pos.sum())} positions",
        file=sys.stderr,
    )
    train_h, train_t = hidden[~held_pos], targets[~held_pos]
    eval_h, eval_t = hidden[held_pos], targets[held_pos]
    if device.type == "cuda":  # the whole set fits: no host-to-device copy per step
        train_h, train_t, eval_h, eval_t = (x.to(device) for x in (train_h, train_t, eval_h, eval_t))
    return TrainingSet(ids, len(hidden), n_held, (train_h, train_t), (eval_h, eval_t) if n_held else None)


def _train(
    args: argparse.Namespace,
    dims: ModelDims,
    weight: Tensor,
    data: TrainingSet,
    ckpt: Path,
    name: str,
    recipe: str,
) -> tuple[MedusaHeads, list[dict], str, int | None]:
    """The heads trained (--init: from those heads), their history, the data recipe they record,
    the negatives of their sampled softmax (None: the full one)."""
    sampled = args.softmax == "sampled" or (args.softmax == "auto" and weight.device.type != "cuda")
    negatives = args.negatives if sampled else None
    heads = MedusaHeads(dims.n_text_state, args.heads, args.layers)
    if args.init:  # warm start, e.g. from heads trained on another data set
        heads.load_state_dict(load_heads(args.init, dims).state_dict())
        recipe = f"{recipe} (from {Path(args.init).name}: {read_heads_meta(args.init).get('data_recipe', 'unknown')})"
    history = train_heads(
        heads,
        weight,
        *data.train,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        seed=args.seed,
        eval_set=data.heldout,
        ckpt=ckpt,
        resume=args.resume,
        ckpt_extra={"model": name, "recipe": recipe},
        log=lambda m: print(m, file=sys.stderr),
        negatives=negatives,
    )
    return heads, history, recipe, negatives


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="breeze-stream train-medusa", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_train_arguments(parser)
    return run_train(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
