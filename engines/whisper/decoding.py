"""Whisper's decoding rules: prompts (previous-text prompts too), suppressed tokens, timestamp rules, the repetition guard,
draft types for speculative decoding, beam search and language detection.

Greedy decoding, speculative or not, runs in engines/batching.py, where segments of many
streams share one running batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from engines.whisper.model import Whisper, causal_mask
from engines.whisper.tokenizer import Tokenizer


@dataclass(frozen=True)
class DecodingOptions:
    language: str | None = "zh"  # None: detect from the audio
    task: str = "transcribe"
    timestamps: bool = False
    beam_size: int = 1  # 1 = greedy
    max_new_tokens: int = 224  # CTranslate2's cap: min(448 / 2, 448 - prompt)
    suppress_blank: bool = True
    length_penalty: float | None = None
    max_initial_timestamp: float = 1.0
    max_draft: int = 8  # draft tokens verified per forward
    # text the segment follows, fed as <|startofprev|> + its tokens before <|startoftranscript|>
    # (openai/whisper's `prompt`, faster-whisper's `initial_prompt`): names and terms to expect
    prompt: str = ""
    # earlier segments' text (openai/whisper's condition_on_previous_text), after `prompt`
    previous_text: str = ""
    # text that prompt-lookup drafts may copy from (a stream's earlier finals); the model never reads it
    draft_text: str = ""


@dataclass
class DecodingResult:
    tokens: list[int]  # generated tokens, without the prompt and without <|endoftext|>
    text: str
    language: str
    avg_logprob: float
    no_speech_prob: float
    looped: bool = False  # the repetition guard cut a loop
    forwards: int = 0  # decoder forward passes this segment took part in
    draft_proposed: dict[str, int] = field(default_factory=dict)
    draft_accepted: dict[str, int] = field(default_factory=dict)


@dataclass
class Draft:
    """Proposed continuation: a chain or a tree. Node i holds `tokens[i]` and follows node
    `parents[i]` (-1: it follows the last generated token)."""

    tokens: list[int]
    parents: list[int]
    source: str

    @classmethod
    def chain(cls, tokens: list[int], source: str) -> Draft:
        return cls(list(tokens), list(range(-1, len(tokens) - 1)), source)


class Drafter(Protocol):
    """Proposes the next tokens of a segment given what has been generated so far. A drafter
    that also has `observe(hidden)` is shown the decoder's last hidden state [n_state] at the
    position that predicted the newest token (Medusa heads draft from it)."""

    source: str

    def propose(self, generated: list[int], limit: int) -> Draft | None: ...


def segment_prompt(
    tok: Tokenizer, language: str, options: DecodingOptions, n_ctx: int, max_text: int | None = None
) -> tuple[list[int], int]:
    """The forced tokens of one segment, and how many of them come before <|startoftranscript|>.

    With a prompt or previous text: <|startofprev|>, then the text tokens (each part encoded
    with a leading space, as openai/whisper encodes its initial prompt), then the usual
    <|startoftranscript|> sequence. The text is capped at half the text context, n_ctx // 2 - 1
    tokens, as in openai/whisper; past it the previous text is trimmed from the left first, so
    that the prompt's names and terms stay, and then the prompt itself. `max_text`: a lower cap
    (a decoder built for shorter inputs); 0 or less: no previous-text prompt."""
    start = tok.prompt(language, options.task, options.timestamps)
    fixed, carried = (
        tok.encode(" " + text.strip()) if text.strip() else [] for text in (options.prompt, options.previous_text)
    )
    if not fixed and not carried:
        return start, 0
    limit = n_ctx // 2 - 1 if max_text is None else min(n_ctx // 2 - 1, max_text)
    if limit <= 0:
        return start, 0
    fixed = fixed[max(0, len(fixed) - limit) :]
    text = fixed + carried[max(0, len(carried) - (limit - len(fixed))) :]
    return [tok.sot_prev, *text, *start], 1 + len(text)


class LogitFilter:
    """Whisper's token rules: suppressed ids, blank start, timestamp pairing and monotonicity."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        suppress_tokens: list[int],
        n_vocab: int,
        options: DecodingOptions,
        device: torch.device,
    ):
        self.tokenizer = tokenizer
        self.options = options
        self.always = torch.zeros(n_vocab, device=device)
        suppress = set(suppress_tokens) | {
            tokenizer.sot,
            tokenizer.sot_prev,
            tokenizer.sot_lm,
            tokenizer.translate,
            tokenizer.transcribe,
        }
        if tokenizer.no_speech is not None:
            suppress.add(tokenizer.no_speech)
        if options.timestamps:
            suppress.add(tokenizer.no_timestamps)
        else:
            suppress.update(range(tokenizer.timestamp_begin, n_vocab))
        self.always[sorted(i for i in suppress if i < n_vocab)] = -math.inf
        self.first = self.always.clone()
        if options.suppress_blank:
            self.first[[tokenizer.ids.get("Ġ", 220), tokenizer.eot]] = -math.inf

    def apply(self, logits: Tensor, prefixes: list[list[int]]) -> Tensor:
        """logits [N, V] for N positions whose generated prefixes are `prefixes`."""
        starting = [len(p) == 0 for p in prefixes]
        if any(starting):
            first = torch.tensor(starting, device=logits.device)
            logits = logits + torch.where(first[:, None], self.first, self.always)
        else:  # most steps: no [N, V] mask, and on a GPU no host copy, which would wait for the step's kernels
            logits = logits + self.always
        if self.options.timestamps:
            for row, prefix in enumerate(prefixes):
                self._timestamp_rules(logits[row], prefix)
        return logits

    def _timestamp_rules(self, logits: Tensor, prefix: list[int]) -> None:
        begin, eot = self.tokenizer.timestamp_begin, self.tokenizer.eot
        last_ts = len(prefix) >= 1 and prefix[-1] >= begin
        penultimate_ts = len(prefix) < 2 or prefix[-2] >= begin
        if last_ts:
            if penultimate_ts:  # a pair just closed: text must follow
                logits[begin:] = -math.inf
            else:  # an open timestamp: another timestamp or the end must follow
                logits[:eot] = -math.inf
        stamps = [t for t in prefix if t >= begin]
        if stamps:  # timestamps never go backwards
            floor = stamps[-1] if last_ts and not penultimate_ts else stamps[-1] + 1
            logits[begin:floor] = -math.inf
        if not prefix:
            logits[:begin] = -math.inf
            last_allowed = begin + round(self.options.max_initial_timestamp / 0.02)
            logits[last_allowed + 1 :] = -math.inf
        logprobs = logits.float().log_softmax(-1)
        if logprobs[begin:].logsumexp(-1) > logprobs[:begin].max():
            logits[:begin] = -math.inf


def repetition_period(tokens: list[int], min_span: int = 24, max_period: int = 40) -> int:
    """Period of a loop at the end of `tokens` (0 if none): a pattern of p tokens repeated at
    least 3 times and over at least `min_span` tokens. Whisper loops this way on hard audio."""
    n = len(tokens)
    for period in range(1, min(max_period, n // 3) + 1):
        repeats = max(3, -(-min_span // period))
        span = period * repeats
        if span > n or tokens[-1] != tokens[-1 - period]:  # cheap rejection first: this runs for every token
            continue
        tail = tokens[n - span :]
        if tail[period:] == tail[:-period]:
            return period
    return 0


@torch.inference_mode()
def beam_search(
    model: Whisper,
    tok: Tokenizer,
    suppress_tokens: list[int],
    features: Tensor,
    language: str,
    options: DecodingOptions,
) -> DecodingResult:
    """Beam search for one segment (features [1, frames, D]); openai/whisper's rule: patience 1,
    length-normalised scores."""
    device, n_ctx, beams = model.device, model.dims.n_text_ctx, options.beam_size
    prompt, sot = segment_prompt(tok, language, options, n_ctx)
    max_new = min(options.max_new_tokens, n_ctx - len(prompt))
    filt = LogitFilter(tok, suppress_tokens, model.dims.n_vocab, options, device)
    cross = [(k.expand(beams, -1, -1, -1), v.expand(beams, -1, -1, -1)) for k, v in model.decoder.cross_kv(features)]
    cache = model.new_cache(beams)
    tokens = torch.tensor([prompt] * beams, device=device)
    positions = torch.arange(len(prompt), device=device).expand_as(tokens)
    hidden = model.decoder.hidden(tokens, positions, cache, None, cross, causal_mask(positions, n_ctx))
    logits = model.decoder.logits(hidden[:, [sot, -1]])
    no_speech = logits[:, 0].softmax(-1)[:, tok.no_speech] if tok.no_speech is not None else torch.zeros(beams)
    logits = logits[:, 1]
    sequences: list[list[int]] = [[]]  # start with a single live beam
    scores = [0.0]
    finished: dict[tuple[int, ...], float] = {}
    forwards = 1
    looped = False
    for step in range(max_new):
        logprobs = filt.apply(logits[: len(sequences)], sequences).log_softmax(-1)
        candidates: dict[tuple[int, ...], tuple[float, int]] = {}
        top = logprobs.topk(beams + 1, dim=-1)
        for i, seq in enumerate(sequences):
            for lp, t in zip(top.values[i].tolist(), top.indices[i].tolist()):
                candidates[tuple(seq + [t])] = (scores[i] + lp, i)
        ranked = sorted(candidates.items(), key=lambda kv: kv[1][0], reverse=True)
        sequences, scores, sources = [], [], []
        for candidate, (score, src) in ranked:
            if candidate[-1] == tok.eot or repetition_period(list(candidate)):
                if len(finished) < beams:
                    looped |= candidate[-1] != tok.eot
                    finished[candidate] = score
            else:
                sequences.append(list(candidate))
                scores.append(score)
                sources.append(src)
            if len(sequences) == beams:
                break
        if len(finished) >= beams or not sequences or step == max_new - 1:
            break
        cache.reorder(torch.tensor(sources + [0] * (beams - len(sources)), device=device))
        n = len(sequences)
        tokens = torch.tensor([[s[-1]] for s in sequences] + [[tok.eot]] * (beams - n), device=device)
        positions = torch.full_like(tokens, len(prompt) + len(sequences[0]) - 1)
        hidden = model.decoder.hidden(tokens, positions, cache, None, cross, causal_mask(positions, n_ctx))
        logits = model.decoder.logits(hidden[:, -1])
        forwards += 1
    for seq, score in zip(sequences, scores):
        if len(finished) >= beams:
            break
        finished[tuple(seq)] = score

    def rank(item: tuple[tuple[int, ...], float]) -> float:
        seq, score = item
        length = len(seq)
        penalty = length if options.length_penalty is None else ((5 + length) / 6) ** options.length_penalty
        return score / penalty

    best, score = max(finished.items(), key=rank)
    toks = [t for t in best if t != tok.eot]
    return DecodingResult(
        tokens=toks,
        text=tok.decode(toks).strip(),
        language=language,
        avg_logprob=score / (len(seq) + 1),
        no_speech_prob=float(no_speech[0]),
        looped=looped,
        forwards=forwards,
    )


@torch.inference_mode()
def detect_language(model: Whisper, tok: Tokenizer, cross: list[tuple[Tensor, Tensor]]) -> list[str]:
    """The most likely language token after <|startoftranscript|>, per segment."""
    batch = cross[0][0].shape[0]
    tokens = torch.full((batch, 1), tok.sot, device=model.device)
    positions = torch.zeros_like(tokens)
    hidden = model.decoder.hidden(
        tokens, positions, model.new_cache(batch), None, cross, causal_mask(positions, model.dims.n_text_ctx)
    )
    logits = model.decoder.logits(hidden[:, -1])
    names = list(tok.language_ids)
    ids = torch.tensor(list(tok.language_ids.values()), device=logits.device)
    return [names[i] for i in logits[:, ids].argmax(-1).tolist()]
