"""Draft sources: previous-hypothesis lookup and Medusa trees, verified exactly."""

import torch
from test_decoding import decoder, features  # noqa: F401  (module fixture and helper)

from engines.speculative.drafts import HypothesisDrafter, MedusaDrafter
from engines.speculative.medusa import MedusaHeads
from engines.whisper.decoding import DecodingOptions


def test_hypothesis_draft_continues_the_old_hypothesis():
    d = HypothesisDrafter([5, 6, 7, 8, 9])
    assert d.propose([], 3).tokens == [5, 6, 7]
    assert d.propose([5, 6], 8).tokens == [7, 8, 9]
    assert d.propose([5, 6, 7, 8, 9], 4) is None


def test_hypothesis_draft_resynchronises_on_the_newest_ngram():
    d = HypothesisDrafter([1, 2, 3, 4, 2, 3, 9, 10])
    draft = d.propose([7, 2, 3], 3)  # diverged at the start; "2 3" last occurs before 9
    assert draft.tokens == [9, 10]
    assert draft.parents == [-1, 0]
    assert d.propose([42], 3) is None  # nothing to match


def test_medusa_tree_takes_top_two_of_head_0_and_top_one_of_head_1():
    class Identity:
        n_heads = 4

        def __call__(self, hidden):  # per-head "hidden" = per-head logits here
            return hidden

    model = torch.nn.Module()
    model.decoder = type("D", (), {"logits": staticmethod(lambda h: h)})()
    drafter = MedusaDrafter(model, Identity())
    assert drafter.propose([1], 8) is None  # nothing observed yet
    logits = torch.zeros(4, 10)
    logits[0, 7], logits[0, 3] = 2.0, 1.0  # head 0: 7 then 3
    logits[1, 5] = 1.0  # head 1: 5
    drafter.observe(logits)
    draft = drafter.propose([1], 8)
    assert draft.tokens == [7, 3, 5] and draft.parents == [-1, -1, 0]
    assert drafter.propose([1], 8) is None  # a hidden state drafts once


def test_speculation_with_every_source_is_exact(decoder):  # noqa: F811
    torch.manual_seed(7)
    heads = MedusaHeads(decoder.model.dims.n_text_state, 4)
    with torch.no_grad():
        for block in heads.blocks:
            block.linear.weight.normal_(0, 0.05)
    options = DecodingOptions(max_new_tokens=60)
    feats = features(decoder, 3, seed=11)
    plain = decoder.decode(feats, options)
    half = [r.tokens[: len(r.tokens) // 2] + [11, 12] for r in plain]
    drafters = [
        [MedusaDrafter(decoder.model, heads)],
        [HypothesisDrafter(half[1]), MedusaDrafter(decoder.model, heads)],
        [HypothesisDrafter(plain[2].tokens)],
    ]
    spec = decoder.decode(feats, options, drafters)
    assert [r.tokens for r in spec] == [r.tokens for r in plain]
    assert spec[0].draft_proposed["medusa"] > 0
    assert spec[1].draft_accepted["hypothesis"] >= len(half[1]) - 3
    assert spec[2].forwards < plain[2].forwards


def test_medusa_drafter_stops_proposing_after_repeated_misses():
    class Identity:
        n_heads = 2

        def __call__(self, hidden):
            return hidden

    model = torch.nn.Module()
    model.decoder = type("D", (), {"logits": staticmethod(lambda h: h)})()
    drafter = MedusaDrafter(model, Identity(), probation=3, min_hit_rate=0.5)
    logits = torch.zeros(2, 10)
    logits[0, 7] = 1.0
    generated = [1]
    for _ in range(3):  # three proposals of 7, and the decoder goes another way each time
        drafter.observe(logits)
        assert drafter.propose(generated, 4).tokens[0] == 7
        generated.append(2)
    drafter.observe(logits)
    assert drafter.propose(generated, 4) is None


def test_draft_modes_name_their_sources(decoder):  # noqa: F811
    """`both` is every source; `hypothesis+lookup` (the CPU's streaming default) leaves Medusa out."""
    from engines.speculative.drafts import drafters
    from engines.speculative.lookup import LookupDrafter

    heads = MedusaHeads(decoder.model.dims.n_text_state, 4)
    tokenizer = decoder.tokenizer

    def kinds(mode: str) -> list[type]:
        return [type(d) for d in drafters([5, 6], mode, decoder.model, heads, tokenizer)]

    assert kinds("both") == [HypothesisDrafter, LookupDrafter, MedusaDrafter]
    assert kinds("hypothesis+lookup") == [HypothesisDrafter, LookupDrafter]
    assert kinds("medusa") == [MedusaDrafter]
    assert kinds("off") == []


def test_the_cpu_engine_streams_without_medusa_drafts():
    from engines.engine import streaming_speculative

    assert streaming_speculative(torch.device("cpu")) == "hypothesis+lookup"
    assert streaming_speculative(torch.device("cuda")) == "both"


def test_medusa_heads_are_read_when_a_request_first_asks_for_them():
    """The CPU's default drafts leave Medusa out, so its heads stay on disk (16 MiB of the server)
    until a request's drafts name them."""
    import numpy as np

    from engines.engine import Engine

    engine = Engine.load("default", device="cpu")
    try:
        assert engine.heads_file is not None and "heads" not in vars(engine)
        speech_like = np.random.default_rng(0).normal(0, 0.1, 16000).astype(np.float32)
        engine.transcribe(speech_like, DecodingOptions(language="zh"))  # hypothesis+lookup
        assert "heads" not in vars(engine)
        engine.transcribe(speech_like, DecodingOptions(language="zh"), speculative="both")
        assert isinstance(vars(engine)["heads"], MedusaHeads)
    finally:
        engine.close()


def test_an_unknown_draft_mode_is_refused_where_it_is_named(tiny_checkpoint, tiny_engine):
    import numpy as np
    import pytest

    from engines.engine import Engine

    with pytest.raises(ValueError, match="speculative must be one of"):
        Engine(tiny_checkpoint, device="cpu", speculative="medusa+guess")
    with pytest.raises(ValueError, match="hypothesis\\+lookup"):  # the message lists the modes
        tiny_engine.submit(np.zeros(1600, np.float32), DecodingOptions(language="zh"), speculative="guess")
