"""fp16-packed weights on the CPU (engines/weights/fp16.py): float32 results, exact speculation."""

import pytest
import torch
import torch.nn.functional as F
from test_decoding import DIMS

from engines.batching import Decoder
from engines.speculative.drafts import HypothesisDrafter
from engines.weights.checkpoints import default_suppress_ids, default_vocabulary
from engines.weights.fp16 import PackedLinear, pack_fp16_weights
from engines.whisper.decoding import DecodingOptions
from engines.whisper.model import Linear, Whisper, causal_mask
from engines.whisper.tokenizer import Tokenizer


def random_model(seed: int = 0) -> Whisper:
    torch.manual_seed(seed)
    model = Whisper(DIMS)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
            p.copy_(p.half().float())  # as the embedded model's weights: exactly representable in fp16
    return model.eval().fuse()


def test_packed_linear_equals_float32_for_fp16_weights():
    torch.manual_seed(1)
    weight, bias, x = torch.randn(96, 64).half().float(), torch.randn(96), torch.randn(3, 5, 64)
    got = PackedLinear(weight, bias)(x)
    assert got.shape == (3, 5, 96)
    torch.testing.assert_close(got, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    # each output row depends on its own input row only (what keeps verification exact)
    assert torch.equal(PackedLinear(weight, bias)(x[:1, :1]), got[:1, :1])


def test_packing_swaps_every_product_and_keeps_the_logits():
    reference, model = random_model(), pack_fp16_weights(random_model())
    assert isinstance(model.decoder.output, PackedLinear)
    for stack in (model.encoder, model.decoder):
        assert all(isinstance(b.attn.fused, PackedLinear) for b in stack.blocks)
        # no float32 copy stays beside the packed ones: not the fused projections' query/key/value
        assert not any(isinstance(m, Linear) for m in stack.modules())
    assert model.decoder.token_embedding.weight.dtype == torch.float16 and model.dtype == torch.float32
    float32 = sum(p.numel() for p in model.parameters() if p.dtype == torch.float32)
    assert float32 < 0.2 * sum(p.numel() for p in reference.parameters())  # norms, biases, convolutions, positions
    torch.manual_seed(2)
    mel = torch.randn(1, 80, 400)
    with torch.inference_mode():
        features = [m.encoder(mel) for m in (reference, model)]
        torch.testing.assert_close(features[1], features[0], rtol=1e-4, atol=1e-4)
        hidden = torch.randn(2, 3, DIMS.n_text_state)
        torch.testing.assert_close(model.decoder.logits(hidden), reference.decoder.logits(hidden), rtol=1e-4, atol=1e-4)


def test_lookups_read_the_checkpoints_mapped_embedding(tmp_path):
    """A model loaded from our .safetensors looks its tokens up in the file's memory-mapped fp16 table
    (no resident copy), with the same embeddings as a copy; a table that is not the model's is copied."""
    from safetensors.torch import save_file

    from engines.weights.mapped import MAPPED_NAME, mapped_tensor

    state = {k: v.half() for k, v in random_model().state_dict().items()}
    save_file(state, str(tmp_path / "m.safetensors"))
    source = mapped_tensor(tmp_path / "m.safetensors", MAPPED_NAME)
    assert source._file_map is not None and torch.equal(source, state[MAPPED_NAME])
    copied, mapped = pack_fp16_weights(random_model()), pack_fp16_weights(random_model(), source)
    assert mapped.decoder.token_embedding.weight.data_ptr() == source.data_ptr()
    tokens, positions = torch.tensor([[1, 50, 7]]), torch.tensor([[0, 1, 2]])
    with torch.inference_mode():
        expected = copied.decoder.embed(tokens, positions, torch.float32)
        assert torch.equal(mapped.decoder.embed(tokens, positions, torch.float32), expected)
    other = pack_fp16_weights(random_model(1), source)
    assert other.decoder.token_embedding.weight.data_ptr() != source.data_ptr()


@torch.inference_mode()
def test_speculation_is_exact_with_packed_weights():
    model = pack_fp16_weights(random_model(3))
    decoder = Decoder(model, Tokenizer(default_vocabulary()), default_suppress_ids())
    torch.manual_seed(5)
    feats = model.encoder(torch.randn(2, 80, 400))
    options = DecodingOptions(max_new_tokens=40)
    plain = decoder.decode(feats, options)
    drafts = [
        [HypothesisDrafter(r.tokens[: len(r.tokens) // 2] + [11, 12] + r.tokens[len(r.tokens) // 2 :])] for r in plain
    ]
    spec = decoder.decode(feats, options, drafts)
    assert [r.tokens for r in spec] == [r.tokens for r in plain]
    assert sum(r.forwards for r in spec) < sum(r.forwards for r in plain)


def test_packing_refuses_a_gpu_model():
    with pytest.raises(ValueError, match="CPU"):
        pack_fp16_weights(random_model().to("meta"))


@torch.inference_mode()
def test_the_packed_step_is_the_modules_step_bit_for_bit():
    """engines/weights/packed_step.py runs the decoder without its modules: the same numbers, for
    prompts, drafts in the cache's rows, sampled cross-attention biases and row subsets."""
    model = pack_fp16_weights(random_model(4))
    assert model.decoder.packed_hidden is not None
    torch.manual_seed(6)
    features = model.encoder(torch.randn(3, 80, 400))
    cross = model.decoder.cross_kv(features)
    tokens = torch.randint(0, DIMS.n_vocab, (3, 5))
    positions = torch.arange(5).expand(3, -1)
    bias = torch.randn(3, 1, 1, features.shape[1])
    bias[0, ..., 150:] = -torch.inf
    outputs = []
    for packed in (model.decoder.packed_hidden, None):
        model.decoder.packed_hidden = packed
        cache = model.new_cache(4)
        mask = causal_mask(positions, DIMS.n_text_ctx)
        first = model.decoder.hidden(tokens, positions, cache, None, cross, mask, bias)
        # then one node for rows 1 and 2 only, at position 5
        rows = torch.tensor([1, 2])
        later = model.decoder.hidden(
            tokens[1:, :1],
            torch.full((2, 1), 5),
            cache,
            rows,
            [(k[1:], v[1:]) for k, v in cross],
            causal_mask(torch.full((2, 1), 5), DIMS.n_text_ctx),
            bias[1:],
        )
        outputs.append((first, later, cache.k.clone(), cache.v.clone()))
    for a, b in zip(*outputs):
        assert torch.equal(a, b)


@torch.inference_mode()
def test_the_packed_step_runs_only_the_nodes_it_is_given():
    """Rows of a step are padded to the widest draft; with `nodes` the products skip the padding,
    and every real node's hidden state and cache entry is what the padded step gives, bit for bit."""
    model = pack_fp16_weights(random_model(4))
    torch.manual_seed(7)
    cross = model.decoder.cross_kv(model.encoder(torch.randn(3, 80, 400)))
    tokens = torch.randint(0, DIMS.n_vocab, (3, 5))
    positions = torch.arange(5).expand(3, -1)
    mask = causal_mask(positions, DIMS.n_text_ctx)
    sizes = [5, 2, 1]
    nodes = torch.tensor([row * 5 + n for row, size in enumerate(sizes) for n in range(size)])
    padded_cache, ragged_cache = model.new_cache(3), model.new_cache(3)
    padded = model.decoder.hidden(tokens, positions, padded_cache, None, cross, mask)
    ragged = model.decoder.hidden(tokens, positions, ragged_cache, None, cross, mask, nodes=nodes)
    assert ragged.shape == (sum(sizes), DIMS.n_text_state)
    assert torch.equal(ragged, padded.flatten(0, 1)[nodes])
    for row, size in enumerate(sizes):
        for pool in ("k", "v"):
            got, want = getattr(ragged_cache, pool), getattr(padded_cache, pool)
            assert torch.equal(got[:, row, :, :size], want[:, row, :, :size])
