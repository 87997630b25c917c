"""Word timings of a decoded segment, found the way openai/whisper's timing.py finds them.

The decoder runs once more over the segment's own tokens (start-of-transcript sequence,
<|notimestamps|>, text tokens, <|endoftext|>) with the encoder output, and the cross-attention
weights of the alignment heads (the heads whose attention follows the speech; public per model
in openai/whisper) say which audio frames each token looked at. Per head the weights are
z-scored over the tokens at each frame and median-filtered along time (width 7); their mean
over heads, negated, is the cost matrix of a dynamic time warping from tokens to frames. A
token starts where the warping path first steps onto it; a word spans its tokens.

Words: split at spaces (a space opens a word; punctuation is its own word until it is merged
into a neighbour, as whisper does), or, for languages written without spaces, into the
smallest token groups that decode to whole characters (a token holding half a character's
UTF-8 bytes joins the next). The probability of a word is the mean of its tokens'
probabilities in this same pass.

Normal decoding uses SDPA, which yields no attention weights; `alignment_pass` computes the
same layers by hand and takes the softmax of q·k only for the layers that hold alignment
heads, so the decode path stays as it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from engines.whisper.audio import FRAMES_PER_SECOND, HOP_LENGTH
from engines.whisper.model import Whisper
from engines.whisper.tokenizer import _BYTES, Tokenizer

MEDIAN_FILTER_WIDTH = 7
TOKENS_PER_SECOND = FRAMES_PER_SECOND // 2  # encoder positions per second of audio (50)
UNSPACED_LANGUAGES = ("zh", "ja", "th", "lo", "my", "yue")
PREPEND_PUNCTUATION = "\"'“¿([{-"
APPEND_PUNCTUATION = "\"'.。,，!！?？:：”)]}、"
SENTENCE_END = ".。!！?？"


@dataclass
class Word:
    text: str
    start: float  # seconds from the start of the segment's audio
    end: float
    probability: float  # mean probability of its tokens
    tokens: list[int]


def default_heads(n_layer: int, n_head: int) -> list[tuple[int, int]]:
    """openai/whisper's fallback where a model's alignment heads are unknown: every head of the
    last half of the decoder layers."""
    return [(layer, head) for layer in range(n_layer // 2, n_layer) for head in range(n_head)]


@torch.inference_mode()
def alignment_pass(
    model: Whisper, features: Tensor, tokens: list[int], heads: list[tuple[int, int]]
) -> tuple[Tensor, Tensor]:
    """One causal decoder pass over `tokens` without a cache: logits [T, V] (float32) and the
    scaled q·k of the alignment `heads` over `features` [frames, D], as [len(heads), T, frames]
    (float32, before the softmax)."""
    decoder = model.decoder
    device = features.device
    ids = torch.tensor([tokens], device=device)
    positions = torch.arange(len(tokens), device=device)[None]
    x = decoder.embed(ids, positions, features.dtype)
    causal = torch.ones(len(tokens), len(tokens), dtype=torch.bool, device=device).tril()
    wanted: dict[int, list[int]] = {}
    for layer, head in heads:
        wanted.setdefault(layer, []).append(head)
    qk: dict[tuple[int, int], Tensor] = {}
    for layer, block in enumerate(decoder.layers):
        x = x + block.attn.attend(*block.attn.qkv(block.attn_ln(x)), causal)
        cross, cross_ln = block.cross_layers()
        q = cross.split_heads(cross.query(cross_ln(x)))
        k, v = cross.cross_kv(features[None])
        if layer in wanted:
            index = wanted[layer]
            scores = q[0, index].float() @ k[0, index].float().transpose(-1, -2) / math.sqrt(q.shape[-1])
            qk.update({(layer, head): s for head, s in zip(index, scores)})
        x = x + cross.attend(q, k.to(q.dtype), v.to(q.dtype), None)
        x = x + block.mlp(block.mlp_ln(x))
    logits = decoder.logits(decoder.ln(x))[0]
    return logits, torch.stack([qk[h] for h in heads])


def median_filter(x: Tensor, width: int) -> Tensor:
    """Median over a sliding window of `width` (odd) along the last dimension, reflect-padded."""
    pad = width // 2
    if x.shape[-1] <= pad:
        return x
    padded = F.pad(x.reshape(1, -1, x.shape[-1]), (pad, pad), mode="reflect").reshape(*x.shape[:-1], -1)
    return padded.unfold(-1, width, 1).sort()[0][..., pad]


def dtw(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cheapest monotonic path through `cost` [tokens, frames], from (0, 0) to the last cell:
    its (token, frame) indices. openai/whisper's recurrence and tie-breaking (diagonal, then
    down, then right), computed one anti-diagonal at a time so that numpy does the inner loop."""
    n, m = cost.shape
    total = np.full((n + 1, m + 1), np.inf, dtype=np.float32)
    trace = np.full((n + 1, m + 1), -1, dtype=np.int8)
    total[0, 0] = 0
    for d in range(2, n + m + 1):  # cells (i, j) with i + j = d depend on diagonals d-1 and d-2 only
        i = np.arange(max(1, d - m), min(n, d - 1) + 1)
        j = d - i
        c0, c1, c2 = total[i - 1, j - 1], total[i - 1, j], total[i, j - 1]
        step = np.where((c0 < c1) & (c0 < c2), 0, np.where((c1 < c0) & (c1 < c2), 1, 2))
        total[i, j] = cost[i - 1, j - 1] + np.choose(step, [c0, c1, c2])
        trace[i, j] = step
    trace[0, :] = 2
    trace[:, 0] = 1
    steps: list[tuple[int, int]] = []
    i, j = n, m
    while i > 0 or j > 0:
        steps.append((i - 1, j - 1))
        if trace[i, j] == 0:
            i, j = i - 1, j - 1
        elif trace[i, j] == 1:
            i -= 1
        else:
            j -= 1
    path = np.array(steps[::-1])
    return path[:, 0], path[:, 1]


def split_words(tokenizer: Tokenizer, tokens: list[int], language: str) -> list[tuple[str, list[int]]]:
    """(text, tokens) of each word of the text `tokens` (no special tokens)."""
    groups = _whole_characters(tokenizer, tokens)
    if language in UNSPACED_LANGUAGES:
        return groups
    words: list[tuple[str, list[int]]] = []
    for text, group in groups:
        if not words or text.startswith(" ") or text.strip() in _ASCII_PUNCTUATION:
            words.append((text, group))
        else:
            words[-1] = (words[-1][0] + text, words[-1][1] + group)
    return words


_ASCII_PUNCTUATION = set("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


def _whole_characters(tokenizer: Tokenizer, tokens: list[int]) -> list[tuple[str, list[int]]]:
    """The smallest runs of tokens whose bytes decode to whole UTF-8 characters. Bytes that can
    never decode (the model wrote invalid UTF-8) close their run too, decoded with replacement."""
    groups: list[tuple[str, list[int]]] = []
    run: list[int] = []
    data = bytearray()
    for token in tokens:
        run.append(token)
        data.extend(_BYTES[c] for c in tokenizer.vocabulary[token])
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            if exc.reason == "unexpected end of data":
                continue  # half a character: the next token completes it
            text = data.decode("utf-8", errors="replace")
        groups.append((text, run))
        run, data = [], bytearray()
    if run:
        groups.append((data.decode("utf-8", errors="replace"), run))
    return groups


def find_alignment(
    model: Whisper,
    tokenizer: Tokenizer,
    heads: list[tuple[int, int]],
    features: Tensor,
    sot_sequence: list[int],
    text_tokens: list[int],
    language: str,
    num_frames: int,
) -> list[Word]:
    """Words of `text_tokens` with their times (openai/whisper's find_alignment), for audio of
    `num_frames` mel frames encoded as `features` [frames, D]."""
    if not text_tokens:
        return []
    tokens = [*sot_sequence, tokenizer.no_timestamps, *text_tokens, tokenizer.eot]
    logits, qk = alignment_pass(model, features, tokens, heads)
    probs = logits[len(sot_sequence) :, : tokenizer.eot].softmax(dim=-1)
    token_probs = probs[torch.arange(len(text_tokens)), torch.tensor(text_tokens)].tolist()

    weights = qk[:, :, : max(1, num_frames // 2)].softmax(dim=-1)
    std, mean = torch.std_mean(weights, dim=-2, keepdim=True, unbiased=False)
    weights = median_filter((weights - mean) / std.clamp_min(1e-10), MEDIAN_FILTER_WIDTH)
    matrix = weights.mean(dim=0)[len(sot_sequence) : -1]  # rows: <|notimestamps|> and the text tokens
    text_indices, time_indices = dtw(-matrix.double().cpu().numpy())

    words = split_words(tokenizer, text_tokens, language)
    boundaries = np.pad(np.cumsum([len(w) for _, w in words]), (1, 0))
    jumps = np.pad(np.diff(text_indices), (1, 0), constant_values=1).astype(bool)
    jump_times = time_indices[jumps] / TOKENS_PER_SECOND
    return [
        Word(text, float(jump_times[a]), float(jump_times[b]), float(np.mean(token_probs[a:b])), group)
        for (text, group), a, b in zip(words, boundaries[:-1], boundaries[1:])
    ]


def merge_punctuation(words: list[Word]) -> list[Word]:
    """Opening marks join the word after them, closing marks the word before (whisper's rule)."""
    if not words:
        return []
    following = words[-1]
    for previous in reversed(words[:-1]):
        if previous.text.startswith(" ") and previous.text.strip() in PREPEND_PUNCTUATION:
            following.text, following.tokens = previous.text + following.text, previous.tokens + following.tokens
            previous.text, previous.tokens = "", []
        else:
            following = previous
    kept: list[Word] = []
    for word in words:
        if kept and word.text and word.text in APPEND_PUNCTUATION and not kept[-1].text.endswith(" "):
            kept[-1].text, kept[-1].tokens = kept[-1].text + word.text, kept[-1].tokens + word.tokens
        elif word.text:
            kept.append(word)
    return kept


def word_timings(
    model: Whisper,
    tokenizer: Tokenizer,
    heads: list[tuple[int, int]],
    features: Tensor,
    sot_sequence: list[int],
    tokens: list[int],
    language: str,
    audio: np.ndarray,
) -> list[Word]:
    """Timed words of one segment's decoded `tokens` (timestamp tokens are skipped) in its 16 kHz
    `audio`: openai/whisper's add_word_timestamps for one segment that starts the audio (long
    words at sentence ends and at the start cut to twice the median duration), then each word's
    edges moved off the silence it spans (`trim_silence`)."""
    num_frames = min(len(audio) // HOP_LENGTH, 2 * features.shape[0])
    text_tokens = [t for t in tokens if t < tokenizer.eot]
    words = find_alignment(model, tokenizer, heads, features, sot_sequence, text_tokens, language, num_frames)
    durations = np.array([w.end - w.start for w in words])
    durations = durations[durations.nonzero()]
    median = min(0.7, float(np.median(durations))) if len(durations) else 0.0
    longest = 2 * median
    if len(durations):
        for previous, word in zip(words, words[1:]):
            if word.end - word.start > longest:
                if word.text in SENTENCE_END:
                    word.end = word.start + longest
                elif previous.text in SENTENCE_END:
                    word.start = word.end - longest
    words = merge_punctuation(words)
    if (
        words
        and words[0].end > 4 * median
        and (
            words[0].end - words[0].start > longest or (len(words) > 1 and words[1].end - words[0].start > 2 * longest)
        )
    ):
        if len(words) > 1 and words[1].end - words[1].start > longest:  # the first words after a pause
            words[0].end = words[1].start = max(words[1].end / 2, words[1].end - longest)
        words[0].start = max(0.0, words[0].end - longest)
    duration = num_frames / FRAMES_PER_SECOND
    for word in words:
        word.start, word.end = min(word.start, duration), min(word.end, duration)
    return trim_silence(words, audio)


def trim_silence(words: list[Word], audio: np.ndarray, floor_db: float = 35.0) -> list[Word]:
    """Words whose edges lie in silence, moved onto the speech inside them: a start forward to
    the first voiced 20 ms step of the word, an end back past its last one. Whisper's path
    gives a word after a pause the pause as well (the first word always starts at 0), which
    puts its start up to the whole pause early; this is the remedy of stable-ts and WhisperX
    (VAD) in its simplest form. Voiced: within `floor_db` of the loudest step, so that in noisy
    audio (no clear silence) nothing moves. Starts only move later and ends earlier, each
    within its own word, so the order of the words is kept."""
    step = HOP_LENGTH * 2  # one encoder position, the resolution of the timings
    n = len(audio) // step
    if not words or n == 0:
        return words
    power = np.square(audio[: n * step].astype(np.float64)).reshape(n, step).mean(axis=1)
    level = 10 * np.log10(power + 1e-12)
    voiced = level > level.max() - floor_db
    for word in words:
        a = int(round(word.start * TOKENS_PER_SECOND))
        b = min(n, int(round(word.end * TOKENS_PER_SECOND)))
        inside = np.flatnonzero(voiced[a:b])
        if len(inside):
            word.start = (a + inside[0]) / TOKENS_PER_SECOND
            word.end = (a + inside[-1] + 1) / TOKENS_PER_SECOND
    return words
