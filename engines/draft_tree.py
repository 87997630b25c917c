"""The nodes one sequence of the running batch feeds in a decoder step (engines/batching.py): its
last chosen token and its draft, a chain or a tree."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from engines.whisper.decoding import Draft


@dataclass
class Tree:
    """The nodes one sequence feeds in a step: node 0 is its last chosen token, the rest its draft
    (nodes after their parents). Node i sits at position start + depth[i] and slot start + i."""

    tokens: list[int]
    parents: list[int]
    depth: list[int]
    source: str

    @classmethod
    def chain(cls, tokens: list[int]) -> Tree:
        """Tokens fed in a row (a prompt): each one follows the one before."""
        return cls(list(tokens), list(range(-1, len(tokens) - 1)), list(range(len(tokens))), "")

    @classmethod
    def build(cls, last: int, draft: Draft | None) -> Tree:
        if draft is None:
            return cls([last], [-1], [0], "")
        parents = [-1] + [p + 1 for p in draft.parents]
        depth = [0]
        for p in parents[1:]:
            depth.append(depth[p] + 1)
        return cls([last] + draft.tokens, parents, depth, draft.source)

    def child(self, node: int, token: int) -> int | None:
        return next(
            (i for i in range(node + 1, len(self.tokens)) if self.parents[i] == node and self.tokens[i] == token), None
        )

    def path(self, node: int) -> list[int]:
        """Draft tokens from the root to `node` (what that node's prediction assumes); none for padding."""
        out = []
        while 0 < node < len(self.tokens):
            out.append(self.tokens[node])
            node = self.parents[node]
        return out[::-1]


def node_index(trees: list[Tree], width: int, device: torch.device, rows: list[int] | None = None) -> Tensor | None:
    """Indices of the trees' own nodes among the batch's rows of `width` padded nodes, tree by tree
    (`rows`: each tree's row, else 0, 1, ...); without `rows`, None where every tree is `width` wide."""
    sizes = [len(t.tokens) for t in trees]
    if rows is None and min(sizes) == width:
        return None
    rows = rows if rows is not None else list(range(len(trees)))
    return torch.tensor([row * width + n for row, size in zip(rows, sizes) for n in range(size)], device=device)
