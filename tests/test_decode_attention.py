"""engines/gpu/decode_attention.py: the attention kernels compute what the cache scatter and SDPA compute.

On a machine without a GPU the kernel runs in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), in float32; on a GPU the same tests run there. Its speed is in BENCHMARKS.md."""

import pytest
import torch
import torch.nn.functional as F

from engines.gpu.decode_attention import CROSS_BLOCK, MAX_WIDTH, cross_attention, self_attention
from engines.gpu.fused import sdpa_self_attention
from engines.gpu.step_inputs import tree_visibility

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {} if DEVICE.type == "cpu" else {"rtol": 1e-3, "atol": 1e-3}
HEADS, HEAD_DIM, N_CTX = 3, 16, 160


def step(batch, width, n_keys, seed):
    """A step's inputs: rows' query/key/value, a filled cache, slots after each sequence's start,
    and a mask in which node j sees every slot before the start and its tree ancestors (parents
    drawn at random), so that rows of one sequence see different keys."""
    gen = torch.Generator().manual_seed(seed)
    d = HEADS * HEAD_DIM
    qkv = torch.randn(batch * width, 3 * d, generator=gen)
    k_cache, v_cache = (torch.randn(batch + 1, HEADS, N_CTX, HEAD_DIM, generator=gen) for _ in range(2))
    starts = torch.randint(1, n_keys - width, (batch,), generator=gen)
    slots = starts[:, None] + torch.arange(width)
    mask = torch.zeros(batch, 1, width, n_keys, dtype=torch.bool)
    for b in range(batch):
        parents = [-1] + [int(torch.randint(0, j, (1,), generator=gen)) for j in range(1, width)]
        mask[b, 0, :, : starts[b]] = True
        mask[b, 0][:, slots[b]] = torch.from_numpy(tree_visibility(tuple(parents), width).copy())
    return [t.to(DEVICE) for t in (qkv, k_cache, v_cache, slots, mask)]


@pytest.mark.parametrize("batch,width,n_keys", [(1, 1, 64), (3, 4, 100), (2, 9, 150), (5, MAX_WIDTH, 140)])
@pytest.mark.parametrize("additive", [False, True])
def test_matches_scatter_then_sdpa(batch, width, n_keys, additive):
    qkv, k_cache, v_cache, slots, mask = step(batch, width, n_keys, seed=batch * 10 + width)
    if additive:  # the graphed step's form: 0 where seen, -inf elsewhere
        mask = torch.zeros(mask.shape, device=DEVICE).masked_fill(~mask, float("-inf"))
    k_plain, v_plain = k_cache.clone(), v_cache.clone()
    expected = sdpa_self_attention(qkv, k_plain, v_plain, slots, mask)
    got = self_attention(qkv, k_cache, v_cache, slots, mask)
    torch.testing.assert_close(got, expected, **TOL)
    torch.testing.assert_close(k_cache, k_plain)  # the same slots written, nothing else touched
    torch.testing.assert_close(v_cache, v_plain)


def test_queries_alone_over_keys_already_stored():
    """store=False (the row kernels wrote the keys and values): only the queries are passed."""
    qkv, k_cache, v_cache, slots, mask = step(2, 4, 90, seed=7)
    expected = sdpa_self_attention(qkv, k_cache, v_cache, slots, mask)  # writes the cache
    before = k_cache.clone()
    got = self_attention(qkv[:, : HEADS * HEAD_DIM].contiguous(), k_cache, v_cache, slots, mask, store=False)
    torch.testing.assert_close(got, expected, **TOL)
    assert torch.equal(k_cache, before)


def test_refuses_what_it_cannot_take():
    qkv, k_cache, v_cache, slots, mask = step(1, 2, 64, seed=1)
    with pytest.raises(ValueError, match="at most"):
        self_attention(qkv.repeat(MAX_WIDTH, 1), k_cache, v_cache, slots.repeat(1, MAX_WIDTH), mask)
    with pytest.raises(ValueError, match="does not match"):
        self_attention(qkv[:, :10], k_cache, v_cache, slots, mask)
    with pytest.raises(ValueError, match="power of two"):
        self_attention(qkv, k_cache[..., :12], v_cache[..., :12], slots, mask)


def cross_step(batch, width, frames, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch * width, HEADS * HEAD_DIM, generator=gen)
    k, v = (torch.randn(batch, HEADS, frames, HEAD_DIM, generator=gen) for _ in range(2))
    lengths = torch.randint(1, frames + 1, (batch,), generator=gen)
    lengths[0] = frames
    return [t.to(DEVICE) for t in (q, k, v, lengths)]


def sdpa_cross(q, k, v, lengths=None):
    """PyTorch's attention over the first `lengths[b]` frames of sequence b, as rows [B*W, D]."""
    batch, heads, frames, dim = k.shape
    queries = q.view(batch, -1, heads, dim).transpose(1, 2)
    mask = None if lengths is None else (torch.arange(frames, device=DEVICE) < lengths[:, None])[:, None, None, :]
    return F.scaled_dot_product_attention(queries, k, v, attn_mask=mask).transpose(1, 2).reshape(q.shape)


@pytest.mark.parametrize("batch,width,frames", [(1, 1, 300), (3, 4, 700), (2, 9, 256), (1, MAX_WIDTH, 513)])
def test_cross_attention_over_chunks_matches_sdpa(batch, width, frames):
    """Frame counts that split into several chunks (one of them short), and rows that see fewer
    frames than the pools hold (KeyLengths.used: a count per sequence and head)."""
    q, k, v, lengths = cross_step(batch, width, frames, seed=frames + width)
    torch.testing.assert_close(cross_attention(q, k, v, chunk=CROSS_BLOCK), sdpa_cross(q, k, v), **TOL)
    used = lengths.repeat_interleave(HEADS).to(torch.int32)
    torch.testing.assert_close(
        cross_attention(q, k, v, used, chunk=2 * CROSS_BLOCK), sdpa_cross(q, k, v, lengths), **TOL
    )


def test_cross_attention_refuses_what_it_cannot_take():
    q, k, v, _ = cross_step(1, 2, 64, seed=2)
    with pytest.raises(ValueError, match="do not match"):
        cross_attention(q.repeat(MAX_WIDTH, 1), k, v)
    with pytest.raises(ValueError, match="power of two"):
        cross_attention(q[:, : HEADS * 12], k[..., :12], v[..., :12])
    with pytest.raises(ValueError, match="multiple"):
        cross_attention(q, k, v, chunk=CROSS_BLOCK + 1)
    with pytest.raises(ValueError, match="int32"):
        cross_attention(q, k, v, torch.full((HEADS,), 10, device=DEVICE))
