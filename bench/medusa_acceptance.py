"""Why Medusa drafts are (not) accepted: teacher-forced acceptance of heads files on a manifest.

    python -m bench.medusa_acceptance MANIFEST --heads A.safetensors [B.safetensors ...] \\
        [--model default] [--cache labels.pt] [--json out.json]

Every clip is decoded once by the frozen model exactly as train-medusa labels (greedy, full 30 s
window, language zh, en for `lang: en` clips), keeping the decoder's last hidden states, so the
figures are on the tokens the engine itself outputs. For each heads file it reports:

- top-1 / top-3 accuracy of head k (the token k + 2 ahead), overall and by the kind of token it
  should predict: Chinese (a Han character, or a byte piece of one), punctuation, Latin letters,
  digits, end of text;
- decoder forwards of a walk over each clip's tokens, as the speculative decoder takes them: one
  forward verifies a draft and yields its accepted tokens plus one; the draft comes from the
  heads' candidate tree (the engine's default and larger ones), from prompt lookup (the newest
  earlier occurrence of the last n generated tokens in the prompt or the clip's own output, and
  what followed it), or from lookup first and the heads where lookup finds nothing. The walk
  ignores the engine's gate that stops Medusa after a run of misses, so it is an upper bound
  for the trees; `breeze-stream eval --speculative medusa` gives the engine's own count.

The labels are cached (`--cache`): keep the file outside the repository, it holds what the model
says on evaluation audio.
"""

from __future__ import annotations

import argparse
import json
import sys
import unicodedata
from pathlib import Path

import torch

from engines.speculative.drafts import DEFAULT_TREE
from engines.speculative.lookup import lookup_draft
from engines.speculative.medusa import load_heads

TREES = {
    "chain-1": ((0,),),
    "default": DEFAULT_TREE,
    "chain-4": ((0,), (0, 0), (0, 0, 0), (0, 0, 0, 0)),
    "wide-8": ((0,), (1,), (2,), (0, 0), (1, 0), (0, 1), (0, 0, 0), (1, 0, 0)),
    "wide-16": (
        *((r,) for r in range(5)),
        *((a, b) for a in range(3) for b in range(2)),
        *((a, 0, 0) for a in range(3)),
        (0, 1, 0),
        (0, 0, 0, 0),
    ),
}
KINDS = ("han", "punct", "latin", "digit", "eot", "other")


def token_kind(tokenizer, token: int) -> str:
    if token == tokenizer.eot:
        return "eot"
    if token > tokenizer.eot:
        return "other"
    text = tokenizer.decode([token]).strip()
    if not text:  # a byte piece: Whisper splits rarer Han characters into several tokens
        return "han"
    if any("\u3400" <= c <= "\u9fff" or "\uf900" <= c <= "\ufaff" for c in text):
        return "han"
    if any(c.isascii() and c.isalpha() for c in text):
        return "latin"
    if any(c.isdigit() for c in text):
        return "digit"
    if all(unicodedata.category(c)[0] in "PS" for c in text):
        return "punct"
    return "other"


def label_clips(manifest: Path, model: str, cache: Path | None) -> dict:
    """{"clips": [{"audio", "prompt": text tokens of the prompt, "tokens", "targets", "hidden"}], "weight"}."""
    if cache is not None and cache.is_file():
        return torch.load(cache, weights_only=False)
    from engines.speculative.medusa_labels import Labeller
    from engines.weights.checkpoints import load_checkpoint
    from engines.whisper.audio import load_audio
    from engines.whisper.decoding import DecodingOptions
    from streaming.manifest import read_clips

    checkpoint = load_checkpoint(model, progress=None)
    labeller = Labeller(checkpoint, torch.device("cpu"))
    out = []
    for clip in read_clips(manifest):
        options = DecodingOptions(language="en" if clip.lang == "en" else "zh")
        res = labeller.label([load_audio(clip.audio)], options)[0]
        if isinstance(res, str):
            print(f"{clip.audio.name}: skipped ({res})", file=sys.stderr)
            continue
        prompt = labeller.tokenizer.encode(" " + clip.prompt.strip()) if clip.prompt else []
        out.append({"audio": clip.audio.name, "prompt": prompt, "tokens": res[0], "targets": res[2], "hidden": res[1]})
    data = {
        "clips": out,
        "weight": labeller.model.decoder.token_embedding.weight.detach().float().clone(),
        "vocabulary": checkpoint.vocabulary,
    }
    if cache is not None:
        torch.save(data, cache)
    return data


def head_candidates(heads, weight: torch.Tensor, hidden: torch.Tensor, k: int = 5) -> torch.Tensor:
    """[n, K, k]: the k best tokens of every head at every position."""
    with torch.inference_mode():
        return (heads(hidden.float()) @ weight.T).topk(k, dim=-1).indices


def tree_accepts(tree, candidates: torch.Tensor, truth: list[int]) -> int:
    """Accepted draft tokens: the longest tree path whose tokens (rank r of head d at depth d) are the truth."""
    best = 0
    for path in tree:
        if len(path) > len(truth):
            continue
        if all(candidates[d, rank].item() == truth[d] for d, rank in enumerate(path)):
            best = max(best, len(path))
    return best


def lookup_accepts(context: list[int], generated: list[int], truth: list[int], max_ngram: int, min_ngram: int) -> int:
    draft = lookup_draft(context, generated, len(truth), max_ngram, min_ngram)
    n = 0
    while n < len(draft) and draft[n] == truth[n]:
        n += 1
    return n


def walk(clip: dict, candidates: torch.Tensor | None, tree, lookup: tuple[int, int] | None) -> int:
    """Decoder forwards to produce the clip's targets (generated tokens, then end of text)."""
    targets = clip["targets"].tolist()
    forwards, j = 1, 0  # the prompt's forward yields targets[0]
    while j < len(targets) - 1:
        truth = targets[j + 1 : j + 1 + 8]
        accepted = 0
        if lookup is not None:
            accepted = lookup_accepts(clip["prompt"], targets[: j + 1], truth, *lookup)
            found = bool(lookup_draft(clip["prompt"], targets[: j + 1], 1, *lookup))
        if candidates is not None and (lookup is None or not found):
            accepted = tree_accepts(tree, candidates[j], truth)
        forwards += 1
        j += accepted + 1
    return forwards


def report(data: dict, heads_path: Path | None, lookups: list[tuple[int, int]]) -> dict:
    from engines.whisper.tokenizer import Tokenizer

    tokenizer = Tokenizer(data["vocabulary"])
    clips, weight = data["clips"], data["weight"]
    tokens = sum(len(c["tokens"]) for c in clips)
    out: dict = {"heads": str(heads_path) if heads_path else None, "clips": len(clips), "tokens": tokens}
    cands = None
    if heads_path is not None:
        heads = load_heads(heads_path, weight.shape[1])
        cands = [head_candidates(heads, weight, c["hidden"]) for c in clips]
        n_heads = heads.n_heads
        hit1 = {k: {kind: [0, 0] for kind in KINDS} for k in range(n_heads)}
        hit3 = {k: [0, 0] for k in range(n_heads)}
        for clip, cand in zip(clips, cands):
            y = clip["targets"].tolist()
            for j in range(len(y)):
                for k in range(n_heads):
                    if j + k + 1 >= len(y):
                        break
                    want = y[j + k + 1]
                    kind = token_kind(tokenizer, want)
                    hit1[k][kind][0] += cand[j, k, 0].item() == want
                    hit1[k][kind][1] += 1
                    hit3[k][0] += want in cand[j, k, :3].tolist()
                    hit3[k][1] += 1
        out["top1"] = [round(sum(h[0] for h in hit1[k].values()) / max(1, hit3[k][1]), 4) for k in range(n_heads)]
        out["top3"] = [round(hit3[k][0] / max(1, hit3[k][1]), 4) for k in range(n_heads)]
        out["top1_by_kind"] = {
            kind: [
                f"{hit1[k][kind][0]}/{hit1[k][kind][1]}"
                + (f" ({hit1[k][kind][0] / hit1[k][kind][1]:.1%})" if hit1[k][kind][1] else "")
                for k in range(n_heads)
            ]
            for kind in KINDS
        }
        out["tokens_per_forward"] = {
            name: round(tokens / sum(walk(c, cd, tree, None) for c, cd in zip(clips, cands)), 3)
            for name, tree in TREES.items()
        }
    out["tokens_per_forward_off"] = round(tokens / sum(len(c["targets"]) for c in clips), 3)
    for max_n, min_n in lookups:
        key = f"lookup {min_n}-{max_n}"
        out.setdefault("tokens_per_forward_lookup", {})[key] = round(
            tokens / sum(walk(c, None, None, (max_n, min_n)) for c in clips), 3
        )
        if cands is not None:
            out["tokens_per_forward_lookup"][key + " then default tree"] = round(
                tokens / sum(walk(c, cd, DEFAULT_TREE, (max_n, min_n)) for c, cd in zip(clips, cands)), 3
            )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("manifest", type=Path)
    ap.add_argument("--heads", type=Path, nargs="*", default=[], help="heads files to compare")
    ap.add_argument("--model", default="default")
    ap.add_argument("--cache", type=Path, help="labels cache (outside the repository)")
    ap.add_argument("--json", type=Path, help="write the reports here")
    args = ap.parse_args(argv)
    data = label_clips(args.manifest, args.model, args.cache)
    lookups = [(3, 1), (3, 2), (4, 3)]
    reports = [report(data, path, lookups) for path in args.heads] or [report(data, None, lookups)]
    for r in reports:
        print(json.dumps(r, ensure_ascii=False, indent=1))
    if args.json:
        args.json.write_text(json.dumps(reports, ensure_ascii=False, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
