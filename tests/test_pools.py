"""The running batch's pools on the eager path (the CPU): they hold what the admitted sequences
need, not the batch's every row at full width, and go when the batch empties; a graphed step's
are static (tests/test_cuda_graphs.py checks both give the same tokens)."""

from __future__ import annotations

import os

import torch

from bench.cli_server import rss_bytes
from bench.tiny import tiny_model
from engines.batching import Batch, Sequence
from engines.gpu.cuda_graphs import GraphOptions
from engines.weights.checkpoints import default_suppress_ids, default_vocabulary
from engines.whisper.decoding import DecodingOptions
from engines.whisper.model import grow_layers, grown
from engines.whisper.tokenizer import Tokenizer


def test_a_pool_grows_only_where_it_must_and_keeps_its_contents():
    pool = torch.arange(3 * 2 * 5 * 4, dtype=torch.float32).view(3, 2, 5, 4)
    assert grown(pool, 3, 5, 8, 100) is pool and grown(pool, 1, 2, 8, 100) is pool
    wider = grown(pool, 2, 6, 8, 100)
    assert wider.shape == (3, 2, 8, 4)  # width rounded up to the step, rows kept
    assert torch.equal(wider[:, :, :5], pool) and not wider[:, :, 5:].any()
    more = grown(pool, 5, 0, 8, 100)
    assert more.shape == (5, 2, 5, 4) and torch.equal(more[:3], pool) and not more[3:].any()
    assert grown(pool, 1, 90, 64, 100).shape[2] == 100  # never past the cap


def test_layers_grow_in_place_one_by_one():
    layers = [torch.full((1, 2, 3, 4), float(i)) for i in range(3)]
    pools = list(layers)
    grow_layers(pools, 2, 3, 8, 100)
    assert [p.shape for p in pools] == [(2, 2, 8, 4)] * 3  # rows grown, the width rounded up to the step
    assert all(torch.equal(p[:1, :, :3], old) and p.sum() == old.sum() for p, old in zip(pools, layers))
    same = list(pools)
    grow_layers(pools, 2, 3, 8, 100)
    assert all(p is q for p, q in zip(pools, same))  # nothing to grow: the same tensors


@torch.inference_mode()
def test_the_eager_batch_holds_what_its_sequences_need_and_releases_it():
    model = tiny_model().eval()
    tok = Tokenizer(default_vocabulary())
    batch = Batch(model, tok, default_suppress_ids(), rows=16)

    def pools() -> list[tuple[int, ...]]:  # each pool a list of its layers' [rows, heads, width, head_dim]
        return [tuple(p.shape) for pool in (batch.cache.k, batch.cache.v, batch.cross_k, batch.cross_v) for p in pool]

    assert len(pools()) == 4 * model.dims.n_text_layer
    assert all(shape[0] == 0 for shape in pools())  # nothing before the first admission
    torch.manual_seed(0)
    options = DecodingOptions(max_new_tokens=20)
    seqs = [Sequence(tok.prompt("zh"), "zh", options, [], frames=300) for _ in range(2)]
    batch.admit(model.encoder(torch.randn(2, 80, 600)), seqs)
    k, cross_k = batch.cache.k[0].shape, batch.cross_k[-1].shape
    assert k[0] == cross_k[0] == 2  # two rows of sixteen
    assert cross_k[2] == 384 and k[2] == 32  # 300 frames in steps of 128; the prompt's slots in steps of 32
    with torch.inference_mode(False):  # as the worker drops a superseded partial: outside inference mode
        batch.remove(seqs[0])
    while batch.active:
        batch.step()
    assert all(shape[0] == 0 for shape in pools())  # released with the last sequence
    assert seqs[1].result(tok).tokens


def test_a_graphed_batch_allocates_its_pools_once_in_full():
    model = tiny_model().eval()
    batch = Batch(
        model, Tokenizer(default_vocabulary()), default_suppress_ids(), rows=4, graphs=GraphOptions(mode="eager")
    )
    dims = model.dims
    assert batch.cross_k.shape[1] == 4 and batch.cross_k.shape[3] == dims.n_audio_ctx
    assert batch.cache.k.shape[3] == dims.n_text_ctx


def test_outgrown_pool_layers_go_back_to_the_system():
    """A pool's layers sit in pages of their own: glibc's heap would keep a freed layer resident
    wherever a later allocation sits above it (ten streams' peak 822 -> 721-750 MiB, BENCHMARKS.md)."""
    torch.empty(30 << 20, dtype=torch.uint8)  # freed at once: glibc's heap now takes blocks up to 30 MiB
    pools, pinned = [], []
    for _ in range(16):
        layer = [torch.zeros(0, 8, 0, 128)]
        grow_layers(layer, 1, 1024, 128, 1024)  # a 4 MiB layer
        pools.append(layer[0].fill_(1.0))
        pinned.append(torch.ones(256))  # small blocks after each layer, as a heap would hold them
    assert all(p.shape == (1, 8, 1024, 128) and p.sum() == 8 * 1024 * 128 for p in pools)
    before = rss_bytes(os.getpid())
    del pools
    assert before - rss_bytes(os.getpid()) >= 48 << 20  # of 64 MiB


def test_pool_pages_stay_private_to_the_process():
    """A forked child (a subprocess started by fork) writing to a pool must not change the parent's."""
    layer = [torch.zeros(0, 2, 0, 4)]
    grow_layers(layer, 1, 8, 8, 8)
    pid = os.fork()
    if pid == 0:  # the child: a write through numpy (no torch threads after a fork), then out
        layer[0].numpy()[:] = 5.0
        os._exit(0)
    os.waitpid(pid, 0)
    assert not layer[0].any()
