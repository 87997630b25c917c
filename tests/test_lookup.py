"""Prompt-lookup drafts: the n-gram search, exactness of the decode they speed up, and the
engine's wiring (prompt text and a stream's earlier finals as the context)."""

import torch
from test_decoding import decoder, features  # noqa: F401  (module fixture and helper)

from engines.decoding import DecodingOptions
from engines.drafts import HypothesisDrafter, MedusaDrafter
from engines.lookup import LookupDrafter, lookup_draft
from engines.medusa import MedusaHeads


def test_the_newest_occurrence_of_the_longest_tail_is_continued():
    context = [1, 2, 3, 4, 9, 2, 3, 5, 6]
    assert lookup_draft(context, [8, 2, 3], 2) == [5, 6]  # "2 3" last occurs before 5 6
    assert lookup_draft(context, [1, 2, 3], 3) == [4, 9, 2]  # the longest tail wins over a newer shorter one
    assert lookup_draft([9, 2, 3, 4, 8, 2, 3, 5], [9, 2, 3], 1) == [4]  # the 3-gram, not the newer 2-gram
    assert lookup_draft([9, 2, 3, 4, 8, 2, 3, 5], [9, 2, 3], 1, max_ngram=2) == [5]
    assert lookup_draft(context, [7, 3], 3) == []  # a 1-token tail is below min_ngram 2
    assert lookup_draft(context, [7, 3], 2, min_ngram=1) == [5, 6]
    # the segment's own output is searched too, but never the tail itself
    assert lookup_draft([], [4, 5, 6, 4, 5], 3) == [6, 4, 5]
    assert lookup_draft([], [4, 5], 3) == []


def test_lookup_drafts_keep_the_decode_exact(decoder):  # noqa: F811
    options = DecodingOptions(max_new_tokens=60)
    feats = features(decoder, 3, seed=11)
    plain = decoder.decode(feats, options)
    torch.manual_seed(7)
    heads = MedusaHeads(decoder.model.dims.n_text_state, 4)
    with torch.no_grad():
        for block in heads.blocks:
            block.linear.weight.normal_(0, 0.05)
    junk = [t for r in plain for t in reversed(r.tokens)]  # the right n-grams, followed by the wrong tokens
    drafters = [
        [LookupDrafter(plain[0].tokens)],  # an earlier final that said the same
        [LookupDrafter(junk), MedusaDrafter(decoder.model, heads)],
        [HypothesisDrafter(plain[2].tokens[:5]), LookupDrafter(plain[2].tokens[3:])],
    ]
    spec = decoder.decode(feats, options, drafters)
    assert [r.tokens for r in spec] == [r.tokens for r in plain]
    assert spec[0].draft_accepted["lookup"] > len(plain[0].tokens) // 2  # its own repeats mislead it at times
    assert spec[0].forwards < plain[0].forwards
    assert spec[1].draft_proposed["lookup"] + spec[1].draft_proposed["medusa"] > 0
    assert spec[2].draft_accepted["hypothesis"] > 0 and spec[2].forwards < plain[2].forwards


def test_engine_drafters_by_mode(tiny_engine):
    tok = tiny_engine.tokenizer
    both = tiny_engine.drafters([1, 2], "both", context=[7, 8], draft_text="你好")
    assert [d.source for d in both][:2] == ["hypothesis", "lookup"]
    assert both[1].context == [7, 8, *tok.encode(" 你好")]
    assert [d.source for d in tiny_engine.drafters([1, 2], "lookup")] == ["lookup"]
    assert [d.source for d in tiny_engine.drafters([1, 2], "hypothesis")] == ["hypothesis"]
    assert tiny_engine.drafters([1, 2], "off") == []
