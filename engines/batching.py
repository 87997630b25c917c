"""In-flight batching of greedy decoding: sequences join and leave the running batch at step
boundaries, and every step verifies each sequence's draft (exact speculative decoding).

The batch owns a fixed pool of rows: self-attention cache rows and cross-attention key/value
rows. Active sequences always occupy rows 0..n-1 (a leaving sequence's row is refilled by the
last one), so a step reads plain leading slices of the pools and never gathers: the shapes a
step sees depend only on the number of sequences and the width of their drafts, which is what
lets a GPU capture steps as graphs per batch size.

A sequence's prompt may start with a previous-text prompt (<|startofprev|> and text, before
<|startoftranscript|>): prompts of any lengths share the batch, since every row has its own
positions and cache slots, and masks hide what a row has not written yet. Drafts and the token
rules only ever see the generated tokens, after the prompt.

Per step and per sequence, the fed nodes are the last chosen token plus its draft (a chain or
a tree). The logits at every node are filtered with Whisper's rules for the prefix that node
assumes and argmax-ed; the walk from the root follows children whose token equals the argmax
(accepted draft tokens) and ends with the first argmax no child matches (the bonus token). The
output is therefore the plain greedy output; rejected nodes' cache slots are just overwritten
later, and an accepted tree path is moved to the slots of its positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from engines.draft_tree import Tree, node_index
from engines.gpu.step_inputs import step_inputs, tree_visibility
from engines.whisper.decoding import (
    DecodingOptions,
    DecodingResult,
    Draft,
    Drafter,
    LogitFilter,
    beam_search,
    detect_language,
    repetition_period,
    segment_prompt,
)
from engines.whisper.model import Whisper, grow_layers
from engines.whisper.tokenizer import Tokenizer

if TYPE_CHECKING:  # engines.gpu loads Triton (~70 MiB resident): imported where a step is graphed
    from engines.gpu.cuda_graphs import GraphOptions, StepRunner


@dataclass(eq=False)
class Sequence:
    """One segment being decoded, and what it cost so far."""

    prompt: list[int]
    language: str
    options: DecodingOptions
    drafters: list[Drafter]
    frames: int  # encoder frames this segment's cross-attention may see
    # [frames]: log of the window frames each key stands for (engines/whisper/sampled.py's
    # SampledFeatures); None: one each
    cross_bias: Tensor | None = None
    tag: object = None  # the caller's handle (the engine's request)
    prefix: int = 0  # prompt tokens before <|startoftranscript|>: <|startofprev|> and the previous text
    row: int = -1
    generated: list[int] = field(default_factory=list)
    logprob_sum: float = 0.0
    no_speech_prob: float = 0.0
    done: bool = False
    looped: bool = False
    forwards: int = 0
    proposed: dict[str, int] = field(default_factory=dict)
    accepted: dict[str, int] = field(default_factory=dict)

    cap: int = 0  # most tokens it may generate (the option, within the decoder's context)

    def push(self, token: int, logprob: float, eot: int) -> None:
        """Appends a chosen token; ends at <|endoftext|>, the length cap or a repetition loop."""
        self.generated.append(token)
        self.logprob_sum += logprob
        if token == eot or len(self.generated) >= self.cap:
            self.done = True
            return
        period = repetition_period(self.generated)
        if period:
            del self.generated[-period * (max(3, -(-24 // period)) - 1) :]
            self.looped = self.done = True

    def result(self, tokenizer: Tokenizer) -> DecodingResult:
        toks = self.generated[:-1] if self.generated and self.generated[-1] == tokenizer.eot else self.generated
        return DecodingResult(
            tokens=toks,
            text=tokenizer.decode(toks).strip(),
            language=self.language,
            avg_logprob=self.logprob_sum / (len(self.generated) + 1) if self.generated else 0.0,
            no_speech_prob=self.no_speech_prob,
            looped=self.looped,
            forwards=self.forwards,
            draft_proposed=self.proposed,
            draft_accepted=self.accepted,
        )


class Batch:
    """The running batch: up to `rows` sequences decoded together, one forward per step."""

    def __init__(
        self,
        model: Whisper,
        tokenizer: Tokenizer,
        suppress_tokens: list[int],
        rows: int,
        graphs: GraphOptions | bool | None = None,
        node_budget: int | None = None,
    ):
        """`graphs` (engines/gpu/cuda_graphs.py): run steps through a StepRunner, bucketed and, on CUDA,
        replayed as CUDA graphs; prompts then join the next step instead of a forward of their own.
        None/False: plain eager forwards (the reference path). `node_budget`: draft nodes a step
        feeds at most over all rows; a full batch verifies shorter drafts, since wide trees over
        many rows cost more than the tokens they save (None: each sequence's own max_draft)."""
        self.model, self.tokenizer, self.suppress_tokens = model, tokenizer, suppress_tokens
        dims = model.dims
        self.rows = rows
        self.node_budget = node_budget
        # a graphed step's pools are static, every row, slot and frame allocated at once; the eager
        # path's grow to what its sequences need (`_reserve`) and go when the batch empties
        pooled = rows if graphs else 0
        self.cache = model.new_cache(pooled, dims.n_text_ctx if graphs else 0)
        head_dim = dims.n_text_state // dims.n_text_head
        shape = (dims.n_text_layer, pooled, dims.n_text_head, dims.n_audio_ctx if graphs else 0, head_dim)
        self.cross_k: Tensor | list[Tensor] = torch.zeros(shape, dtype=model.dtype, device=model.device)
        self.cross_v: Tensor | list[Tensor] = torch.zeros(shape, dtype=model.dtype, device=model.device)
        if not graphs:
            self._release()
        self.active: list[Sequence] = []
        self._filters: dict[DecodingOptions, LogitFilter] = {}
        self.runner: StepRunner | None = None
        if graphs:
            from engines.gpu.cuda_graphs import GraphOptions, StepRunner

            self.runner = StepRunner(
                model,
                self.cache,
                self.cross_k,
                self.cross_v,
                graphs if isinstance(graphs, GraphOptions) else GraphOptions(),
            )
        self._pending: dict[Sequence, None] = {}  # admitted, prompt not fed yet (runner path)
        self._bias: tuple[tuple[Sequence, ...], Tensor] = ((), torch.empty(0))  # _cross_bias's last rows and mask

    @property
    def free(self) -> int:
        return self.rows - len(self.active)

    def _filter(self, options: DecodingOptions) -> LogitFilter:
        if options not in self._filters:
            self._filters[options] = LogitFilter(
                self.tokenizer, self.suppress_tokens, self.model.dims.n_vocab, options, self.model.device
            )
        return self._filters[options]

    @staticmethod
    def _filter_key(options: DecodingOptions) -> DecodingOptions:
        """The options with the fields that do not change the token rules zeroed: sequences that
        differ only in their length cap or draft size are filtered together."""
        return replace(options, max_new_tokens=0, max_draft=0, prompt="", previous_text="")

    @torch.inference_mode()
    def admit(self, features: Tensor, sequences: list[Sequence]) -> None:
        """Adds sequences whose encoder output is `features` [n, frames, D]: stores their
        cross-attention keys/values, feeds their prompts and picks each one's first token."""
        if len(sequences) > self.free:
            raise ValueError(f"{len(sequences)} sequences do not fit in {self.free} free rows")
        # sequences with a previous-text prompt last, on adjacent rows (the graphed path feeds those prompts first)
        order = sorted(range(len(sequences)), key=lambda i: (sequences[i].prefix > 0, len(sequences[i].prompt)))
        sequences = [sequences[i] for i in order]
        features = features[order] if order != list(range(len(order))) else features
        first = len(self.active)
        rows = slice(first, first + len(sequences))
        frames = features.shape[1]
        self._reserve(first + len(sequences), frames, 0)
        if self.runner is not None:
            self.runner.store_cross(features, first)
        else:
            for layer, (k, v) in enumerate(self.model.decoder.cross_kv(features)):
                self.cross_k[layer][rows, :, :frames] = k
                self.cross_v[layer][rows, :, :frames] = v
        for i, seq in enumerate(sequences):
            seq.row = first + i
            seq.cap = min(seq.options.max_new_tokens, self.model.dims.n_text_ctx - len(seq.prompt))
            seq.proposed = dict.fromkeys((d.source for d in seq.drafters), 0)
            seq.accepted = dict(seq.proposed)
        self.active.extend(sequences)
        if self.runner is not None:
            # the previous-text prompts now, eagerly (their lengths vary: a graph per length would not pay);
            # the <|startoftranscript|> sequences ride along with the next step
            prompted = [s for s in sequences if s.prefix]
            if prompted:
                self._feed([s.prompt[: s.prefix] for s in prompted], prompted)
                for s in prompted:
                    s.forwards = 1
            self._pending.update(dict.fromkeys(sequences))
            return
        # every prompt in one forward, shorter ones padded: the no-speech probability comes from
        # <|startoftranscript|>, the first token from the prompt's last position
        hidden = self._feed([s.prompt for s in sequences], sequences)
        index = torch.arange(len(sequences), device=hidden.device)
        sot = torch.tensor([s.prefix for s in sequences], device=hidden.device)
        last = torch.tensor([len(s.prompt) - 1 for s in sequences], device=hidden.device)
        logits = self.model.decoder.logits(torch.stack([hidden[index, sot], hidden[index, last]], dim=1))
        no_speech = self.tokenizer.no_speech
        probs = logits[:, 0].softmax(-1)[:, no_speech].tolist() if no_speech is not None else [0.0] * len(sequences)
        for s, p in zip(sequences, probs):
            s.no_speech_prob = p
            s.forwards = 1
        self._choose(sequences, logits[:, 1], hidden[index, last], [Tree.build(s.prompt[-1], None) for s in sequences])

    def _feed(self, prompts: list[list[int]], seqs: list[Sequence]) -> Tensor:
        """One forward of `prompts` from position 0 in the rows of `seqs` (consecutive), padded to the
        longest: a padding node writes a slot past its prompt, which stays hidden until overwritten."""
        width = max(len(p) for p in prompts)
        device = self.model.device
        tokens = torch.tensor([p + [self.tokenizer.eot] * (width - len(p)) for p in prompts], device=device)
        positions = torch.arange(width, device=device).expand_as(tokens)
        return self._forward(seqs, tokens, positions, positions, [Tree.chain(p) for p in prompts], width)

    def _forward(
        self,
        seqs: list[Sequence],
        tokens: Tensor,
        positions: Tensor,
        slots: Tensor,
        trees: list[Tree],
        width: int,
        nodes: Tensor | None = None,
    ) -> Tensor:
        """One decoder forward over `seqs` (which must be rows 0..n-1 or a run of rows); with
        `nodes`, the hidden states of those nodes only (TextDecoder.hidden)."""
        model, n_ctx = self.model, self.model.dims.n_text_ctx
        device = model.device
        lo, hi = seqs[0].row, seqs[-1].row + 1
        assert [s.row for s in seqs] == list(range(lo, hi)), "sequences must occupy consecutive rows"
        keys = torch.arange(n_ctx, device=device)
        mask = (keys < slots[:, :1])[:, None, :].repeat(1, width, 1)  # everything before the first fed node
        sees = np.stack([tree_visibility(tuple(t.parents), width) for t in trees])
        mask.scatter_(2, slots[:, None, :].expand(-1, width, -1), torch.from_numpy(sees).to(device))
        n_slots = int(slots.max()) + 1
        mask = mask[..., :n_slots]  # read only the cache slots in use
        self._reserve(hi, 0, n_slots)
        frames = max(s.frames for s in seqs)
        cross = [
            (self.cross_k[layer][lo:hi, :, :frames], self.cross_v[layer][lo:hi, :, :frames])
            for layer in range(model.dims.n_text_layer)
        ]
        cross_mask: Tensor | None = None
        if any(s.cross_bias is not None for s in seqs):
            cross_mask = self._cross_bias(seqs, frames)
        elif any(s.frames != frames for s in seqs):
            visible = (
                torch.arange(frames, device=device)[None, :]
                < torch.tensor([s.frames for s in seqs], device=device)[:, None]
            )
            cross_mask = visible[:, None, None, :]
        rows = None if lo == 0 else torch.arange(lo, hi, device=device)
        return model.decoder.hidden(
            tokens, positions, self.cache, rows, cross, mask[:, None], cross_mask, slots=slots, nodes=nodes
        )

    def _cross_bias(self, seqs: list[Sequence], frames: int) -> Tensor:
        """The additive cross-attention mask [B, 1, 1, frames] of rows whose keys stand for
        several frames each: their log counts, -inf past a row's own keys. Kept while the rows stay."""
        key = tuple(seqs)  # the sequences themselves (compared by identity), not ids that could be reused
        if self._bias[0] != key:
            bias = torch.full((len(seqs), frames), -torch.inf, dtype=self.model.dtype, device=self.model.device)
            for i, s in enumerate(seqs):
                bias[i, : s.frames] = 0.0 if s.cross_bias is None else s.cross_bias
            self._bias = (key, bias[:, None, None, :])
        return self._bias[1]

    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """One forward for every active sequence; returns the sequences that finished."""
        if not self.active:
            return []
        if self.runner is not None:
            return self._step_runner(self.runner)
        device, n_ctx = self.model.device, self.model.dims.n_text_ctx
        seqs = self.active
        share = self._draft_share(len(seqs))
        trees = []
        for s in seqs:
            limit = min(s.options.max_draft, s.cap - len(s.generated) - 1, share)
            trees.append(Tree.build(s.generated[-1], _draft(s.drafters, s.generated, limit)))
            if trees[-1].source:
                s.proposed[trees[-1].source] += len(trees[-1].tokens) - 1
        width = max(len(t.tokens) for t in trees)
        start = torch.tensor([len(s.prompt) + len(s.generated) - 1 for s in seqs], device=device)[:, None]
        tokens = torch.tensor([t.tokens + [self.tokenizer.eot] * (width - len(t.tokens)) for t in trees], device=device)
        depth = torch.tensor([t.depth + list(range(len(t.depth), width)) for t in trees], device=device)
        positions = (start + depth).clamp(max=n_ctx - 1)
        slots = (start + torch.arange(width, device=device)).clamp(max=n_ctx - 1)
        # rows narrower than the widest are padded; only their own nodes go through the products and
        # the output projection (8 rows of 9 nodes cost 82 ms on the 2-core CPU, 8 of 1 node 18 ms)
        nodes = node_index(trees, width, device)
        hidden = self._forward(seqs, tokens, positions, slots, trees, width, nodes)
        hidden = hidden if nodes is not None else hidden.flatten(0, 1)
        for s in seqs:
            s.forwards += 1
        self._choose(seqs, self.model.decoder.logits(hidden), hidden, trees)
        finished = [s for s in seqs if s.done]
        for s in finished:
            self.remove(s)
        return finished

    def _draft_share(self, n: int) -> int:
        """Draft tokens each of n sequences may feed in this step."""
        return self.model.dims.n_text_ctx if self.node_budget is None else max(0, self.node_budget // n - 1)

    def _step_runner(self, runner: StepRunner) -> list[Sequence]:
        """step() through the StepRunner: inputs built on the host, one bucketed (graphed) forward;
        sequences admitted since the last step feed their prompts in it (no-speech probability
        from the first prompt node, first token from the last)."""
        n_ctx = self.model.dims.n_text_ctx
        seqs = self.active
        share = self._draft_share(len(seqs))
        trees, starts = [], []
        for s in seqs:
            if s in self._pending:  # its <|startoftranscript|> sequence, after the previous-text prompt admit fed
                trees.append(Tree.chain(s.prompt[s.prefix :]))
                starts.append(s.prefix)
                continue
            limit = min(s.options.max_draft, s.cap - len(s.generated) - 1, share)
            trees.append(Tree.build(s.generated[-1], _draft(s.drafters, s.generated, limit)))
            if trees[-1].source:
                s.proposed[trees[-1].source] += len(trees[-1].tokens) - 1
            starts.append(len(s.prompt) + len(s.generated) - 1)
        width = runner.width(max(len(t.tokens) for t in trees))
        tokens, positions, slots, mask = step_inputs(trees, starts, width, n_ctx, self.tokenizer.eot)
        fresh = [i for i, s in enumerate(seqs) if s in self._pending]
        rest = [i for i, s in enumerate(seqs) if s not in self._pending]
        # before the forward: a copy from the host's pageable memory waits for the stream's kernels, and
        # after the replay it would hold back the launches of everything that follows it
        nodes = node_index([trees[i] for i in rest], width, self.model.device, rows=rest) if rest else None
        logits, hidden = runner.forward(tokens, positions, slots, mask, [s.frames for s in seqs])
        for s in seqs:
            s.forwards += 1
        if nodes is not None:
            self._choose(
                [seqs[i] for i in rest],
                logits.flatten(0, 1)[nodes],
                hidden.flatten(0, 1)[nodes],
                [trees[i] for i in rest],
            )
        no_speech = self.tokenizer.no_speech
        for length in sorted({len(seqs[i].prompt) - seqs[i].prefix for i in fresh}):
            group = [i for i in fresh if len(seqs[i].prompt) - seqs[i].prefix == length]
            index = torch.tensor(group, device=logits.device)
            if no_speech is not None:
                probs = logits[index, 0].softmax(-1)[:, no_speech].tolist()
                for i, p in zip(group, probs):
                    seqs[i].no_speech_prob = p
            self._choose(
                [seqs[i] for i in group],
                logits[index, length - 1],
                hidden[index, length - 1],
                [Tree.build(seqs[i].prompt[-1], None) for i in group],
            )
        for i in fresh:
            del self._pending[seqs[i]]
        finished = [s for s in seqs if s.done]
        for s in finished:
            self.remove(s)
        return finished

    def _choose(self, seqs: list[Sequence], logits: Tensor, hidden: Tensor, trees: list[Tree]) -> None:
        """Filters the logits of every node, then walks each tree along the argmax. `logits` [N, V]
        and `hidden` [N, D] hold each tree's nodes in turn (no padding)."""
        sizes = [len(t.tokens) for t in trees]
        starts = np.cumsum([0, *sizes[:-1]]).tolist()
        groups: dict[DecodingOptions, list[int]] = {}
        for i, s in enumerate(seqs):
            groups.setdefault(self._filter_key(s.options), []).append(i)
        if len(groups) == 1:
            ((options, idx),) = groups.items()
            prefixes = [seqs[i].generated + trees[i].path(node) for i in idx for node in range(sizes[i])]
            logprobs = self._filter(options).apply(logits, prefixes).log_softmax(-1)
        else:
            logprobs = torch.empty_like(logits)
            for options, idx in groups.items():
                prefixes = [seqs[i].generated + trees[i].path(node) for i in idx for node in range(sizes[i])]
                index = torch.tensor([starts[i] + n for i in idx for n in range(sizes[i])], device=logits.device)
                logprobs[index] = self._filter(options).apply(logits[index], prefixes).log_softmax(-1)
        chosen = logprobs.argmax(-1, keepdim=True)
        best = chosen[:, 0].tolist()
        best_logprob = logprobs.gather(-1, chosen)[:, 0].tolist()  # one transfer, not one .item() per token
        eot = self.tokenizer.eot
        for s, tree, first in zip(seqs, trees, starts):
            root = len(s.prompt) + len(s.generated) - 1  # slot of node 0
            node, path = 0, []
            while True:
                token = best[first + node]
                s.push(token, best_logprob[first + node], eot)
                child = tree.child(node, token)
                if s.done or child is None:
                    break
                s.accepted[tree.source] += 1
                path.append(child)
                node = child
            if not s.done and any(tree.depth[c] != c for c in path):  # a tree path: move it to its positions
                self.cache.move(s.row, [root + c for c in path], [root + tree.depth[c] for c in path])
            for drafter in s.drafters:
                if hasattr(drafter, "observe"):
                    drafter.observe(hidden[first + node])

    @torch.inference_mode()  # the eager pools are made in inference mode; the worker removes superseded partials outside it
    def remove(self, seq: Sequence) -> None:
        """Takes `seq` out; the last active sequence moves into its row so rows stay 0..n-1."""
        self._pending.pop(seq, None)
        last = self.active.pop()
        if last is not seq:
            i = self.active.index(seq)
            self.active[i] = last
            for layer in (*self.cache.k, *self.cache.v, *self.cross_k, *self.cross_v):
                layer[seq.row] = layer[last.row]
            last.row = seq.row
        seq.row = -1
        if not self.active and self.runner is None:  # the eager pools go until the next admission
            self._release()

    def _release(self) -> None:
        """Empties the eager path's pools: a list of each layer's, so that they grow a layer at a time."""
        empty = self.cross_k[0][:0, :, :0]
        layers = self.model.dims.n_text_layer
        self.cache.k, self.cache.v, self.cross_k, self.cross_v = ([empty] * layers for _ in range(4))

    def _reserve(self, rows: int, frames: int, slots: int) -> None:
        """Grows the eager path's pools to hold `rows` rows, `frames` cross-attention frames and
        `slots` cache slots (with zeros: masked keys must still be finite numbers)."""
        if self.runner is None:
            dims = self.model.dims
            for pools in (self.cross_k, self.cross_v):
                assert isinstance(pools, list)
                grow_layers(pools, rows, frames, 128, dims.n_audio_ctx)
            for pools in (self.cache.k, self.cache.v):
                assert isinstance(pools, list)
                grow_layers(pools, rows, slots, 32, dims.n_text_ctx)


def _draft(drafters: list[Drafter], generated: list[int], limit: int) -> Draft | None:
    """The first non-empty proposal of a sequence's drafters, in their order, cut to `limit`."""
    for drafter in drafters if limit > 0 else []:
        draft = drafter.propose(generated, limit)
        if draft and draft.tokens:
            return Draft(draft.tokens[:limit], draft.parents[:limit], draft.source)
    return None


class Decoder:
    """Decodes a batch of encoded segments to the end: the offline path, and the tests'."""

    def __init__(self, model: Whisper, tokenizer: Tokenizer, suppress_tokens: list[int]):
        self.model, self.tokenizer, self.suppress_tokens = model, tokenizer, suppress_tokens

    @torch.inference_mode()
    def decode(
        self, features: Tensor, options: DecodingOptions, drafters: list[list[Drafter]] | None = None
    ) -> list[DecodingResult]:
        """features [B, frames, D] -> one result per segment; `drafters[b]` draft for segment b
        in their order (greedy only)."""
        batch = features.shape[0]
        if options.language is None:
            languages = detect_language(self.model, self.tokenizer, self.model.decoder.cross_kv(features))
        else:
            languages = [options.language] * batch
        if options.beam_size > 1:
            return [
                beam_search(
                    self.model, self.tokenizer, self.suppress_tokens, features[b : b + 1], languages[b], options
                )
                for b in range(batch)
            ]
        running = Batch(self.model, self.tokenizer, self.suppress_tokens, rows=batch)
        n_ctx = self.model.dims.n_text_ctx
        prompts = [segment_prompt(self.tokenizer, lang, options, n_ctx) for lang in languages]
        seqs = [
            Sequence(prompt, lang, options, (drafters or [[]] * batch)[b], frames=features.shape[1], prefix=prefix)
            for b, (lang, (prompt, prefix)) in enumerate(zip(languages, prompts))
        ]
        running.admit(features, seqs)
        while running.active:
            running.step()
        return [s.result(self.tokenizer) for s in seqs]
