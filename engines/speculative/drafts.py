"""Draft sources for speculative decoding: the previous hypothesis and Medusa heads.

A streaming segment is decoded again and again as it grows, and each new hypothesis mostly
repeats the last one: the previous hypothesis is a nearly free draft. Where the new text
diverges, the draft re-synchronises by finding the newest generated n-gram in the old
hypothesis (prompt-lookup) and proposing what followed it there. Past the end of the old
hypothesis, Medusa heads guess the next tokens from the decoder's last hidden state, as a
small tree of top-k candidates verified in the same forward.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from engines.speculative.lookup import LookupDrafter
from engines.speculative.medusa import SHIPPED_HEADS, MedusaHeads
from engines.weights.checkpoints import Checkpoint
from engines.whisper.decoding import Draft, Drafter
from engines.whisper.model import Whisper
from engines.whisper.tokenizer import Tokenizer


class HypothesisDrafter:
    source = "hypothesis"

    def __init__(self, previous: list[int], max_ngram: int = 3):
        self.previous = list(previous)
        self.max_ngram = max_ngram

    def propose(self, generated: list[int], limit: int) -> Draft | None:
        prev, n = self.previous, len(generated)
        if prev[:n] == generated:  # still on the old hypothesis: continue it
            return Draft.chain(prev[n : n + limit], self.source) if n < len(prev) else None
        for size in range(min(self.max_ngram, n), 0, -1):
            tail = generated[n - size :]
            # the newest occurrence whose continuation is not empty
            for start in range(len(prev) - size - 1, -1, -1):
                if prev[start : start + size] == tail:
                    return Draft.chain(prev[start + size : start + size + limit], self.source)
        return None


# Medusa candidate tree: each path lists the rank (0 = top-1) of the token taken from heads
# 0, 1, ...: the top-2 of head 0 and the top-1 of head 1 after head 0's best. Deeper heads of
# the shipped whisper-base heads are right 1-3% of the time (engines/speculative/heads/README.md), and on a
# CPU every node costs a full output projection, so the tree stays this small.
DEFAULT_TREE: tuple[tuple[int, ...], ...] = ((0,), (1,), (0, 0))


class MedusaDrafter:
    """Proposes a tree of the heads' top-k tokens from the hidden state `observe` last saw.

    The heads run only when a proposal is asked for, so with the hypothesis drafter in front
    they cost nothing while the old hypothesis still drafts. Drafts are not free (every node
    costs an output projection, which a CPU feels), so a segment whose Medusa drafts keep
    missing stops asking: after `probation` proposals with fewer than `min_hit_rate` of them
    followed by at least their first token, this drafter proposes nothing more."""

    source = "medusa"

    def __init__(
        self,
        model: Whisper,
        heads,
        tree: tuple[tuple[int, ...], ...] = DEFAULT_TREE,
        probation: int = 6,
        min_hit_rate: float = 0.25,
    ):
        self.model, self.heads = model, heads
        self.tree = [path for path in tree if len(path) <= heads.n_heads]
        self.top_k = 1 + max(rank for path in self.tree for rank in path)
        self.probation, self.min_hit_rate = probation, min_hit_rate
        self.hidden: Tensor | None = None
        self.firsts: set[int] = set()  # the depth-1 tokens of the last proposal
        self.at = -1  # len(generated) when it was made
        self.proposals = self.hits = 0

    def observe(self, hidden: Tensor) -> None:
        self.hidden = hidden

    def propose(self, generated: list[int], limit: int) -> Draft | None:
        if self.at >= 0 and len(generated) > self.at:
            self.hits += generated[self.at] in self.firsts
            self.at = -1
        if self.hidden is None or (self.proposals >= self.probation and self.hits < self.min_hit_rate * self.proposals):
            return None
        depth = max(len(path) for path in self.tree)
        with torch.inference_mode():
            logits = self.model.decoder.logits(self.heads(self.hidden)[:depth])  # only the heads the tree uses
        candidates = logits.topk(self.top_k, dim=-1).indices.tolist()
        self.hidden = None
        tokens: list[int] = []
        parents: list[int] = []
        index: dict[tuple[int, ...], int] = {(): -1}
        for path in self.tree:
            if len(tokens) == limit:
                break
            if path[:-1] in index:
                index[path] = len(tokens)
                parents.append(index[path[:-1]])
                tokens.append(candidates[len(path) - 1][path[-1]])
        self.firsts = {t for t, p in zip(tokens, parents) if p == -1}
        self.at = len(generated)
        self.proposals += 1
        return Draft(tokens, parents, self.source)


def heads_file(checkpoint: Checkpoint, medusa: str | Path | None) -> Path | None:
    """The Medusa heads of a model: `medusa`, else the shipped ones when they fit it, else none."""
    if medusa is not None:
        return Path(medusa)
    if not SHIPPED_HEADS.exists() or checkpoint.dims.n_text_state != 512 or "whisper-base" not in checkpoint.name:
        return None
    return SHIPPED_HEADS


def draft_sources(speculative: str) -> tuple[str, ...]:
    """The draft sources a `speculative` mode names: off, both (all three), or sources joined by +."""
    if speculative == "off":
        return ()
    return ("hypothesis", "lookup", "medusa") if speculative == "both" else tuple(speculative.split("+"))


def drafters(
    previous: list[int] | None,
    speculative: str,
    model: Whisper,
    heads: MedusaHeads | None,
    tokenizer: Tokenizer,
    context: list[int] | None = None,
    draft_text: str = "",
) -> list[Drafter]:
    """The draft sources of one request (`speculative`: off, both, or sources joined by +): the
    previous hypothesis first, then prompt lookup over `context` (the prompt's text tokens),
    `draft_text` (a stream's earlier finals) and the segment's own output, then Medusa."""
    out: list[Drafter] = []
    sources = draft_sources(speculative)
    if "hypothesis" in sources and previous:
        out.append(HypothesisDrafter(previous))
    if "lookup" in sources:
        earlier = tokenizer.encode(" " + draft_text.strip()) if draft_text.strip() else []
        out.append(LookupDrafter([*(context or []), *earlier]))
    if "medusa" in sources and heads is not None:
        out.append(MedusaDrafter(model, heads))
    return out
