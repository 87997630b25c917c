"""Decoding rules, the static-cache greedy loop and exact speculative verification."""

import random
from dataclasses import replace

import pytest
import torch

from bench.tiny import TINY_DIMS
from engines.batching import Decoder
from engines.weights.checkpoints import default_suppress_ids, default_vocabulary
from engines.whisper.decoding import DecodingOptions, Draft, LogitFilter, repetition_period
from engines.whisper.model import Whisper, causal_mask
from engines.whisper.tokenizer import Tokenizer

DIMS = replace(TINY_DIMS, n_text_layer=2)


@pytest.fixture(scope="module")
def decoder() -> Decoder:
    torch.manual_seed(0)
    model = Whisper(DIMS)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)  # varied outputs that do not collapse into a loop at once
    return Decoder(model.eval(), Tokenizer(default_vocabulary()), default_suppress_ids())


def features(decoder: Decoder, batch: int, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    with torch.inference_mode():
        return decoder.model.encoder(torch.randn(batch, 80, 400))


@torch.inference_mode()
def naive_greedy(decoder: Decoder, feats: torch.Tensor, options: DecodingOptions) -> list[int]:
    """Greedy decoding the slow way: the whole sequence through a fresh cache at every step."""
    tok, model = decoder.tokenizer, decoder.model
    prompt = tok.prompt(options.language, options.task, options.timestamps)
    filt = LogitFilter(tok, decoder.suppress_tokens, DIMS.n_vocab, options, torch.device("cpu"))
    cross = model.decoder.cross_kv(feats)
    out: list[int] = []
    for _ in range(options.max_new_tokens):
        seq = torch.tensor([prompt + out])
        pos = torch.arange(seq.shape[1])[None]
        hidden = model.decoder.hidden(seq, pos, model.new_cache(1), None, cross, causal_mask(pos, DIMS.n_text_ctx))
        token = filt.apply(model.decoder.logits(hidden[:, -1]), [out]).argmax(-1).item()
        out.append(token)
        if token == tok.eot or repetition_period(out):
            break
    return out


class ListDrafter:
    def __init__(self, source: str, fn):
        self.source, self.fn = source, fn

    def propose(self, generated, limit):
        return Draft.chain(self.fn(generated)[:limit], self.source)


@pytest.mark.parametrize("timestamps", [False, True])
def test_cached_greedy_equals_naive_greedy(decoder, timestamps):
    options = DecodingOptions(language="zh", timestamps=timestamps, max_new_tokens=40)
    feats = features(decoder, 3, seed=1)
    results = decoder.decode(feats, options)
    for b, result in enumerate(results):
        expected = naive_greedy(decoder, feats[b : b + 1], options)
        if result.looped:
            period = repetition_period(expected)
            expected = expected[: len(expected) - period * (max(3, -(-24 // period)) - 1)]
        assert result.tokens == [t for t in expected if t != decoder.tokenizer.eot]


def test_speculative_output_is_plain_greedy_output(decoder):
    options = DecodingOptions(language="zh", max_new_tokens=60)
    feats = features(decoder, 4, seed=2)
    plain = decoder.decode(feats, options)
    rng = random.Random(0)
    reference = [r.tokens for r in plain]
    drafters = [
        [ListDrafter("hypothesis", lambda g, ref=reference[0]: ref[len(g) :])],  # perfect draft
        [ListDrafter("hypothesis", lambda g: [rng.randrange(50000) for _ in range(5)])],  # junk
        [ListDrafter("hypothesis", lambda g, ref=reference[2]: ref[len(g) : len(g) + 3] + [1, 2, 3])],  # half right
        [],  # no draft in the same batch
    ]
    spec = decoder.decode(feats, options, drafters)
    assert [r.tokens for r in spec] == reference
    assert spec[0].forwards < plain[0].forwards
    assert spec[0].draft_accepted["hypothesis"] > 0
    assert spec[1].draft_accepted["hypothesis"] <= spec[1].draft_proposed["hypothesis"]


def test_timestamp_tokens_come_in_rising_pairs(decoder):
    tok = decoder.tokenizer
    result = decoder.decode(features(decoder, 1, seed=3), DecodingOptions(timestamps=True, max_new_tokens=60))[0]
    stamps = [t for t in result.tokens if t >= tok.timestamp_begin]
    assert result.tokens and result.tokens[0] >= tok.timestamp_begin
    assert result.tokens[0] - tok.timestamp_begin <= 50  # max initial timestamp 1 s
    assert stamps == sorted(stamps)


def test_suppressed_tokens_never_appear(decoder):
    result = decoder.decode(features(decoder, 1, seed=4), DecodingOptions(max_new_tokens=60))[0]
    banned = set(decoder.suppress_tokens) | {decoder.tokenizer.sot, decoder.tokenizer.no_timestamps}
    assert not banned & set(result.tokens)
    assert all(t < decoder.tokenizer.timestamp_begin for t in result.tokens)


def test_beam_search_returns_a_well_formed_hypothesis(decoder):
    options = DecodingOptions(beam_size=3, max_new_tokens=30)
    result = decoder.decode(features(decoder, 1, seed=5), options)[0]
    greedy = decoder.decode(features(decoder, 1, seed=5), DecodingOptions(max_new_tokens=30))[0]
    assert result.tokens and decoder.tokenizer.eot not in result.tokens
    assert result.avg_logprob >= greedy.avg_logprob - 1e-4 or result.looped or greedy.looped


def test_language_detection_picks_a_language(decoder):
    result = decoder.decode(features(decoder, 1, seed=6), DecodingOptions(language=None, max_new_tokens=5))[0]
    assert result.language in decoder.tokenizer.language_ids


def test_repetition_period():
    assert repetition_period([1, 2, 3]) == 0
    assert repetition_period([5] * 24) == 1
    assert repetition_period([9, 8] + [1, 2, 3] * 8) == 3
    assert repetition_period([1, 2] * 11) == 0  # 22 tokens: under the span
    assert repetition_period(list(range(100))) == 0
