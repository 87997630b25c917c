"""The host-side inputs of one decoder step over draft trees: where each node sits in the cache,
which position it takes, and which slots it sees (its prefix and its tree ancestors)."""

from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=4096)
def tree_visibility(parents: tuple[int, ...], width: int) -> np.ndarray:
    """[width, width] bool: node j sees node i (itself and its ancestors; padding nodes only themselves)."""
    sees = np.eye(width, dtype=bool)
    for j in range(1, len(parents)):
        if parents[j] >= 0:
            sees[j] |= sees[parents[j]]
    sees.setflags(write=False)
    return sees


def step_inputs(trees, starts: list[int], width: int, n_ctx: int, pad_token: int):
    """Host-side inputs of one step: node i of row r sits at slot start + i and position
    start + depth (padding nodes past the tree at the next positions); it sees every slot before
    start and the slots of its tree ancestors. Returns numpy (tokens, positions, slots, mask)."""
    n = len(trees)
    start = np.asarray(starts, dtype=np.int64)
    tokens = np.full((n, width), pad_token, dtype=np.int64)
    depth = np.tile(np.arange(width, dtype=np.int64), (n, 1))
    slots = np.minimum(start[:, None] + np.arange(width), n_ctx - 1)
    mask = np.broadcast_to((np.arange(n_ctx)[None, :] < start[:, None])[:, None, :], (n, width, n_ctx)).copy()
    for i, tree in enumerate(trees):
        k = len(tree.tokens)
        tokens[i, :k] = tree.tokens
        depth[i, :k] = tree.depth
        mask[i][:, slots[i]] = tree_visibility(tuple(tree.parents), width)
    positions = np.minimum(start[:, None] + depth, n_ctx - 1)
    return tokens, positions, slots, mask
