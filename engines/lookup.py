"""Prompt-lookup drafts: what followed the last few generated tokens where they occurred before.

No training and no model: the newest earlier occurrence of the segment's last n generated tokens
(n from `max_ngram` down to `min_ngram`) in the context (the vocabulary prompt's tokens and the
stream's earlier text, as the decoder's prompt carries them) or in the segment's own output, and
the tokens after it, are the draft. Names and terms of a vocabulary prompt and phrases a speaker
repeats come out right in one forward; elsewhere it usually proposes nothing, which costs nothing.
"""

from __future__ import annotations

from .decoding import Draft


def lookup_draft(
    context: list[int], generated: list[int], limit: int, max_ngram: int = 3, min_ngram: int = 2
) -> list[int]:
    """Up to `limit` tokens that followed the newest earlier occurrence of generated's longest
    matching tail (at most `max_ngram`, at least `min_ngram` tokens) in context + generated."""
    history = context + generated
    n = len(generated)
    for size in range(min(max_ngram, n), min_ngram - 1, -1):
        tail = generated[n - size :]
        for start in range(len(history) - size - 1, -1, -1):  # newest first, never the tail itself
            if history[start : start + size] == tail:
                return history[start + size : start + size + limit]
    return []


class LookupDrafter:
    source = "lookup"

    def __init__(self, context: list[int], max_ngram: int = 3, min_ngram: int = 2):
        self.context = list(context)
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, generated: list[int], limit: int) -> Draft | None:
        draft = lookup_draft(self.context, generated, limit, self.max_ngram, self.min_ngram)
        return Draft.chain(draft, self.source) if draft else None
