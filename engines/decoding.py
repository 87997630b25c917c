"""Decoding as Whisper does it, with exact speculative verification built into the greedy loop.

Greedy decoding of a batch of segments runs in lockstep forwards. Each forward feeds, per
segment, the last chosen token plus an optional draft (tokens proposed by a `Drafter`:
the previous hypothesis of the segment, Medusa heads, ...). The logits at every fed position
are filtered with Whisper's rules for the prefix that position assumes and then argmax-ed:
draft tokens are accepted while they equal the argmax, and the first disagreeing argmax is
kept as the bonus token. So the output is, by construction, the plain greedy output; the
rejected positions' cache entries are simply overwritten by the next forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from .model import Whisper, causal_mask
from .tokenizer import Tokenizer


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


class LogitFilter:
    """Whisper's token rules: suppressed ids, blank start, timestamp pairing and monotonicity."""

    def __init__(self, tokenizer: Tokenizer, suppress_tokens: list[int], n_vocab: int, options: DecodingOptions, device: torch.device):
        self.tokenizer = tokenizer
        self.options = options
        self.always = torch.zeros(n_vocab, device=device)
        suppress = set(suppress_tokens) | {tokenizer.sot, tokenizer.sot_prev, tokenizer.sot_lm, tokenizer.translate, tokenizer.transcribe}
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
        first = torch.tensor([len(p) == 0 for p in prefixes], device=logits.device)
        logits = logits + torch.where(first[:, None], self.first, self.always)
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
        if span > n:
            continue
        tail = tokens[n - span :]
        if tail[period:] == tail[:-period]:
            return period
    return 0


class Decoder:
    """Runs decoding for a batch of encoded segments on one model."""

    def __init__(self, model: Whisper, tokenizer: Tokenizer, suppress_tokens: list[int]):
        self.model = model
        self.tokenizer = tokenizer
        self.suppress_tokens = suppress_tokens

    @torch.inference_mode()
    def detect_language(self, cross: list[tuple[Tensor, Tensor]]) -> list[str]:
        batch = cross[0][0].shape[0]
        tokens = torch.full((batch, 1), self.tokenizer.sot, device=self.model.device)
        positions = torch.zeros_like(tokens)
        cache = self.model.new_cache(batch)
        hidden = self.model.decoder.hidden(tokens, positions, cache, None, cross, causal_mask(positions, self.model.dims.n_text_ctx))
        logits = self.model.decoder.logits(hidden[:, -1])
        langs = self.tokenizer.language_ids
        ids = torch.tensor(list(langs.values()), device=logits.device)
        best = logits[:, ids].argmax(-1).tolist()
        names = list(langs)
        return [names[i] for i in best]

    @torch.inference_mode()
    def decode(self, features: Tensor, options: DecodingOptions, drafters: list[list[Drafter]] | None = None) -> list[DecodingResult]:
        """features [B, n_audio, D] -> one result per segment. `drafters[b]` are tried in order
        for segment b (greedy only)."""
        cross = self.model.decoder.cross_kv(features)
        batch = features.shape[0]
        languages = self.detect_language(cross) if options.language is None else [options.language] * batch
        if options.beam_size > 1:
            return [self._beam(cross, b, languages[b], options) for b in range(batch)]
        return self._greedy(cross, languages, options, drafters or [[] for _ in range(batch)])

    def _prompt_forward(self, cross, prompts: list[list[int]], cache) -> tuple[Tensor, Tensor, Tensor]:
        """Feeds the prompts; returns (logits and hidden state at the last prompt position, no-speech probs)."""
        device = self.model.device
        tokens = torch.tensor(prompts, device=device)
        positions = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
        hidden = self.model.decoder.hidden(tokens, positions, cache, None, cross, causal_mask(positions, self.model.dims.n_text_ctx))
        logits = self.model.decoder.logits(hidden[:, [0, -1]])
        if self.tokenizer.no_speech is None:
            no_speech = torch.zeros(tokens.shape[0])
        else:
            no_speech = logits[:, 0].softmax(-1)[:, self.tokenizer.no_speech]
        return logits[:, 1], hidden[:, -1], no_speech

    def _greedy(self, cross, languages: list[str], options: DecodingOptions, drafters: list[list[Drafter]]) -> list[DecodingResult]:
        tok, model = self.tokenizer, self.model
        device, n_ctx = model.device, model.dims.n_text_ctx
        batch = len(languages)
        prompts = [tok.prompt(lang, options.task, options.timestamps) for lang in languages]
        prompt_len = len(prompts[0])
        max_new = min(options.max_new_tokens, n_ctx - prompt_len)
        filt = LogitFilter(tok, self.suppress_tokens, model.dims.n_vocab, options, device)
        cache = model.new_cache(batch)
        logits, hidden, no_speech = self._prompt_forward(cross, prompts, cache)

        generated: list[list[int]] = [[] for _ in range(batch)]
        logprob_sum = [0.0] * batch
        done = [False] * batch
        looped = [False] * batch
        forwards = [1] * batch
        proposed = [dict.fromkeys((d.source for d in ds), 0) for ds in drafters]
        accepted = [dict(p) for p in proposed]

        # the first token of every segment comes from the prompt's logits
        logprobs = filt.apply(logits, [[] for _ in range(batch)]).log_softmax(-1)
        for b, t in enumerate(logprobs.argmax(-1).tolist()):
            self._push(b, t, logprobs[b, t].item(), generated, logprob_sum, done, looped, max_new)
            self._observe(drafters[b], hidden[b])

        while not all(done):
            active = [b for b in range(batch) if not done[b]]
            trees = [_Tree.build(generated[b][-1], self._draft(drafters[b], generated[b], min(options.max_draft, max_new - len(generated[b]) - 1)))
                     for b in active]
            for b, tree in zip(active, trees):
                if tree.source:
                    proposed[b][tree.source] += len(tree.tokens) - 1
            width = max(len(t.tokens) for t in trees)
            start = torch.tensor([prompt_len + len(generated[b]) - 1 for b in active], device=device)[:, None]
            tokens = torch.tensor([t.tokens + [tok.eot] * (width - len(t.tokens)) for t in trees], device=device)
            depth = torch.tensor([t.depth + list(range(len(t.depth), width)) for t in trees], device=device)
            positions = (start + depth).clamp(max=n_ctx - 1)
            slots = (start + torch.arange(width, device=device)).clamp(max=n_ctx - 1)
            keys = torch.arange(n_ctx, device=device)
            mask = (keys < start)[:, None, :].repeat(1, width, 1)
            for i, t in enumerate(trees):
                for node, ancestors in enumerate(t.ancestors(width)):
                    mask[i, node, slots[i, ancestors]] = True
            rows = torch.tensor(active, device=device)
            sub_cross = cross if len(active) == batch else [(k[rows], v[rows]) for k, v in cross]
            hidden = model.decoder.hidden(tokens, positions, cache, None if len(active) == batch else rows, sub_cross,
                                          mask[:, None], slots=slots)
            # filter every node with the prefix it assumes, then walk the tree along the argmax
            prefixes = [generated[b] + t.path(node) for b, t in zip(active, trees) for node in range(width)]
            flat = filt.apply(model.decoder.logits(hidden).reshape(len(active) * width, -1), prefixes).log_softmax(-1)
            best = flat.argmax(-1).view(len(active), width).tolist()
            flat = flat.view(len(active), width, -1)
            for i, (b, tree) in enumerate(zip(active, trees)):
                forwards[b] += 1
                node, path = 0, []
                while True:
                    t = best[i][node]
                    self._push(b, t, flat[i, node, t].item(), generated, logprob_sum, done, looped, max_new)
                    child = tree.child(node, t)
                    if done[b] or child is None:
                        break
                    accepted[b][tree.source] += 1
                    path.append(child)
                    node = child
                if any(tree.depth[c] != c for c in path):  # tree slots: move the accepted path to its positions
                    s0 = int(start[i])
                    cache.move(b, [s0 + c for c in path], [s0 + tree.depth[c] for c in path])
                self._observe(drafters[b], hidden[i, node])

        results = []
        for b in range(batch):
            toks = generated[b][:-1] if generated[b] and generated[b][-1] == tok.eot else generated[b]
            results.append(DecodingResult(
                tokens=toks, text=tok.decode(toks).strip(), language=languages[b],
                avg_logprob=logprob_sum[b] / (len(generated[b]) + 1) if generated[b] else 0.0,
                no_speech_prob=float(no_speech[b]), looped=looped[b], forwards=forwards[b],
                draft_proposed=proposed[b], draft_accepted=accepted[b],
            ))
        return results

    @staticmethod
    def _draft(drafters: list[Drafter], generated: list[int], limit: int) -> Draft | None:
        """The first non-empty proposal of the segment's drafters, in their order."""
        for drafter in drafters if limit > 0 else []:
            draft = drafter.propose(generated, limit)
            if draft and draft.tokens:
                keep = [i for i in range(len(draft.tokens)) if i < limit]
                return Draft(draft.tokens[:limit], draft.parents[: len(keep)], draft.source)
        return None

    @staticmethod
    def _observe(drafters: list[Drafter], hidden: Tensor) -> None:
        for drafter in drafters:
            if hasattr(drafter, "observe"):
                drafter.observe(hidden)

    def _push(self, b, token, logprob, generated, logprob_sum, done, looped, max_new) -> None:
        """Appends a chosen token; ends the segment at <|endoftext|>, the length cap or a loop."""
        generated[b].append(token)
        logprob_sum[b] += logprob
        if token == self.tokenizer.eot or len(generated[b]) >= max_new:
            done[b] = True
            return
        period = repetition_period(generated[b])
        if period:
            del generated[b][-period * (max(3, -(-24 // period)) - 1):]
            looped[b] = done[b] = True

    def _beam(self, cross, b: int, language: str, options: DecodingOptions) -> DecodingResult:
        """Beam search for one segment (openai/whisper's rule: patience 1, length-normalised)."""
        tok, model = self.tokenizer, self.model
        device, n_ctx, beams = model.device, model.dims.n_text_ctx, options.beam_size
        prompt = tok.prompt(language, options.task, options.timestamps)
        max_new = min(options.max_new_tokens, n_ctx - len(prompt))
        filt = LogitFilter(tok, self.suppress_tokens, model.dims.n_vocab, options, device)
        cross = [(k[b : b + 1].expand(beams, -1, -1, -1), v[b : b + 1].expand(beams, -1, -1, -1)) for k, v in cross]
        cache = model.new_cache(beams)
        logits, _, no_speech = self._prompt_forward(cross, [prompt] * beams, cache)
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
            for seq, (score, src) in ranked:
                if seq[-1] == tok.eot or repetition_period(list(seq)):
                    if len(finished) < beams:
                        looped |= seq[-1] != tok.eot
                        finished[seq] = score
                else:
                    sequences.append(list(seq))
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

        def rank(item):
            seq, score = item
            length = len(seq)
            penalty = length if options.length_penalty is None else ((5 + length) / 6) ** options.length_penalty
            return score / penalty

        seq, score = max(finished.items(), key=rank)
        toks = [t for t in seq if t != tok.eot]
        return DecodingResult(tokens=toks, text=tok.decode(toks).strip(), language=language,
                              avg_logprob=score / (len(seq) + 1), no_speech_prob=float(no_speech[0]),
                              looped=looped, forwards=forwards)


@dataclass
class _Tree:
    """The nodes one segment feeds in a forward: node 0 is its last generated token, the rest a
    draft (nodes come after their parents). Node i sits at position start + depth[i] and in
    cache slot start + i."""

    tokens: list[int]
    parents: list[int]
    depth: list[int]
    source: str

    @classmethod
    def build(cls, last: int, draft: Draft | None) -> _Tree:
        if draft is None:
            return cls([last], [-1], [0], "")
        parents = [-1] + [p + 1 for p in draft.parents]
        depth = [0]
        for p in parents[1:]:
            depth.append(depth[p] + 1)
        return cls([last] + draft.tokens, parents, depth, draft.source)

    def child(self, node: int, token: int) -> int | None:
        return next((i for i in range(node + 1, len(self.tokens)) if self.parents[i] == node and self.tokens[i] == token), None)

    def path(self, node: int) -> list[int]:
        """Draft tokens from the root to `node` (what that node's prediction assumes); none for padding."""
        out = []
        while 0 < node < len(self.tokens):
            out.append(self.tokens[node])
            node = self.parents[node]
        return out[::-1]

    def ancestors(self, width: int) -> list[list[int]]:
        """For each of `width` nodes (padding nodes see only themselves), the nodes it may attend to."""
        out = []
        for node in range(width):
            chain = [node]
            while node < len(self.tokens) and self.parents[node] >= 0:
                node = self.parents[node]
                chain.append(node)
            out.append(chain)
        return out
