"""engines/gpu/row_kernels.py and decode_kernels.py: the row kernels compute what the plain model computes.

On a machine without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), in float32, so the comparison with the plain model is tight. On a GPU the
same tests run there, the float32 products in IEEE precision as torch's, to a tolerance of 1e-3.
The GPU speed and the fp16 agreement are in BENCHMARKS.md."""

import pytest
import torch
import torch.nn.functional as F
from decoder_check import run_against_plain

from engines.gpu.decode_kernels import KernelDecoder
from engines.gpu.row_kernels import GEMV_ROWS, MAX_ROWS, dependent_launch, row_linear
from engines.synthetic import random_model
from engines.whisper.model import ModelDims

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {} if DEVICE.type == "cpu" else {"rtol": 1e-3, "atol": 1e-3}

DIMS = ModelDims(
    n_mels=80,
    n_audio_ctx=64,
    n_audio_state=64,
    n_audio_head=4,
    n_audio_layer=1,
    n_vocab=500,
    n_text_ctx=32,
    n_text_state=64,
    n_text_head=4,
    n_text_layer=2,
)


@pytest.fixture(autouse=True)
def on_device():
    with DEVICE:  # the tensors the tests make
        yield


def assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, **TOL)


@pytest.fixture(scope="module")
def model():
    m = random_model(DIMS, DEVICE, torch.float32, seed=3)
    with torch.no_grad():  # layer norms away from the identity, so a wrong one shows
        for name, p in m.named_parameters():
            p.normal_(1.0 if name.endswith("ln.weight") or "_ln.weight" in name else 0.0, 0.1)
    return m


@pytest.mark.parametrize("rows", [1, GEMV_ROWS, 5, MAX_ROWS])
@pytest.mark.parametrize("k", [300, 256])
def test_row_linear_epilogues_match_torch(rows, k):
    """Column and reduction sizes that are not multiples of the blocks (and a reduction of a power of
    two, which the CUDA-core form of GEMV_ROWS rows holds as one tile), each epilogue alone and together."""
    torch.manual_seed(0)
    n = 72
    x, w, b = torch.randn(rows, k) * 3 + 1, torch.randn(n, k) / 10, torch.randn(n)
    gamma, beta, res = torch.randn(k), torch.randn(k), torch.randn(rows, n)
    norm = (gamma, beta, 1e-5)
    assert_close(row_linear(x, w, b), F.linear(x, w, b))
    normed = F.layer_norm(x, (k,), gamma, beta, 1e-5)
    assert_close(row_linear(x, w, b, norm=norm), F.linear(normed, w, b))
    assert_close(row_linear(x, w, b, norm=norm, gelu=True), F.gelu(F.linear(normed, w, b)))
    assert_close(row_linear(x, w, b, residual=res), res + F.linear(x, w, b))


@pytest.mark.parametrize("batch,width,slots", [(3, 2, [3, 4, 0, 1, 7, 9]), (1, 2, [5, 6]), (1, 1, [8])])
def test_row_linear_stores_keys_and_values_at_the_rows_slots(batch, width, slots):
    torch.manual_seed(1)
    heads, dh, n_ctx = 2, 8, 10
    d = heads * dh
    x, w, b = torch.randn(batch * width, d), torch.randn(3 * d, d), torch.randn(3 * d)
    k_cache, v_cache = torch.zeros(4, heads, n_ctx, dh), torch.zeros(4, heads, n_ctx, dh)
    slots = torch.tensor(slots)
    q = row_linear(x, w, b, kv=(k_cache, v_cache, slots, width))
    expected = F.linear(x, w, b)
    assert_close(q, expected[:, :d])
    for m, slot in enumerate(slots.tolist()):
        row = m // width
        assert_close(k_cache[row, :, slot], expected[m, d : 2 * d].view(heads, dh))
        assert_close(v_cache[row, :, slot], expected[m, 2 * d :].view(heads, dh))
    written = {(m // width, s) for m, s in enumerate(slots.tolist())}
    untouched = [(r, s) for r in range(4) for s in range(n_ctx) if (r, s) not in written]
    assert all(k_cache[r, :, s].abs().sum() == 0 and v_cache[r, :, s].abs().sum() == 0 for r, s in untouched)


def test_row_linear_refuses_more_rows_than_a_tile():
    with pytest.raises(ValueError, match="at most"):
        row_linear(torch.randn(MAX_ROWS + 1, 8), torch.randn(16, 8), torch.randn(16))
    with pytest.raises(ValueError, match="dependent"):
        row_linear(torch.randn(GEMV_ROWS + 1, 8), torch.randn(16, 8), torch.randn(16), dependent=True)


@pytest.mark.parametrize("batch,width", [(1, 1), (1, 2), (3, 1), (2, 4)])
@pytest.mark.parametrize(
    "dependent",
    [
        False,
        pytest.param(
            True,
            marks=pytest.mark.skipif(
                not dependent_launch(DEVICE), reason="programmatic dependent launch needs a Hopper GPU or later"
            ),
        ),
    ],
)
def test_kernel_decoder_matches_hidden_and_writes_the_same_cache(model, batch, width, dependent):
    kernels = KernelDecoder(model.decoder, dependent=dependent)
    got, expected, kernel_cache, plain_cache = run_against_plain(model, kernels.hidden, batch, width)
    assert_close(got, expected)
    assert_close(kernel_cache.k, plain_cache.k)
    assert_close(kernel_cache.v, plain_cache.v)


class Lengths:
    """What the row kernels read of a KeyLengths: frames seen per (sequence, head)."""

    def __init__(self, used):
        self.used = used


@pytest.mark.parametrize("batch,width", [(1, 1), (3, 1), (2, 4)])
def test_kernel_decoder_cross_attention_kernel_reads_each_rows_frames(model, batch, width):
    """cross="kernel" with KeyLengths' counts (the engine's rows of different windows) against the
    plain step with the equivalent boolean mask."""
    kernels = KernelDecoder(model.decoder, cross="kernel")

    def hidden(tokens, positions, cache, cross, mask, cross_mask, slots):
        used = cross_mask[:, 0, 0].sum(-1).repeat_interleave(DIMS.n_text_head).to(torch.int32)
        return kernels.hidden(tokens, positions, cache, cross, mask, Lengths(used), slots)

    got, expected, kernel_cache, plain_cache = run_against_plain(model, hidden, batch, width)
    assert_close(got, expected)
    assert_close(kernel_cache.k, plain_cache.k)


def test_kernel_decoder_refuses_an_unknown_cross_attention(model):
    with pytest.raises(ValueError, match="cross must be"):
        KernelDecoder(model.decoder, cross="flash")


@pytest.mark.skipif(DEVICE.type != "cuda", reason="programs run concurrently only on a GPU")
def test_long_reduction_is_right_every_time_on_gpu():
    """fc2's shape at 16 rows in fp16 (K = 5120), 200 calls, each against float32 torch: a kernel
    whose programs share state shows a wrong call now and then (the split form did, 13% of calls)."""
    torch.manual_seed(5)
    x, w, b = torch.randn(MAX_ROWS, 5120).half(), (torch.randn(1280, 5120) / 70).half(), torch.randn(1280).half()
    res = torch.randn(MAX_ROWS, 1280).half()
    expected = res.float() + F.linear(x.float(), w.float(), b.float())
    worst = max((row_linear(x, w, b, residual=res).float() - expected).abs().max().item() for _ in range(200))
    assert worst < 0.02
