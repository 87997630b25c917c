"""Whisper's vocabulary: special token ids, byte-level BPE decoding and encoding.

A token list is all this needs: each checkpoint format ships one (CTranslate2 vocabulary.txt,
tokenizer.json), and special ids are looked up by name, which keeps large-v3's shifted ids right
too. Encoding (prompts) needs no merge table either: Whisper's tokenizer is tiktoken's, whose
merge ranks are the token ids, so the next pair to merge is the one whose concatenation has the
lowest id.
"""

from __future__ import annotations

from functools import cached_property

import regex

# GPT-2's pre-tokenizer, which Whisper's tiktoken encodings use: BPE never merges across these pieces
PIECES = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

LANGUAGES = (
    "en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no th ur hr bg lt la "
    "mi ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw gl mr pa si km sn yo so af oc ka be "
    "tg sd gu am yi lo uz fo ht ps tk nn mt sa lb my bo tl mg as tt haw ln ha ba jw su yue"
).split()


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: printable stand-ins back to raw bytes."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, codes)}


_BYTES = _byte_decoder()
_CHARS = {b: c for c, b in _BYTES.items()}  # raw byte -> its printable stand-in


def byte_encoder() -> dict[int, str]:
    """GPT-2's bytes_to_unicode: each raw byte's printable stand-in in a vocabulary entry."""
    return {b: c for c, b in _BYTES.items()}


class Tokenizer:
    def __init__(self, vocabulary: list[str]):
        self.vocabulary = vocabulary
        self.ids = {token: i for i, token in enumerate(vocabulary)}
        self.eot = self.ids["<|endoftext|>"]
        self.sot = self.ids["<|startoftranscript|>"]
        self.translate = self.ids["<|translate|>"]
        self.transcribe = self.ids["<|transcribe|>"]
        self.sot_lm = self.ids["<|startoflm|>"]
        self.sot_prev = self.ids["<|startofprev|>"]
        self.no_speech = self.ids.get("<|nospeech|>", self.ids.get("<|nocaptions|>"))
        self.no_timestamps = self.ids["<|notimestamps|>"]
        self.timestamp_begin = self.no_timestamps + 1
        self._pieces: dict[str, list[int]] = {}

    @cached_property
    def language_ids(self) -> dict[str, int]:
        return {lang: self.ids[f"<|{lang}|>"] for lang in LANGUAGES if f"<|{lang}|>" in self.ids}

    def language_id(self, language: str) -> int:
        if language not in self.language_ids:
            raise ValueError(f"unknown language {language!r}; use one of: {', '.join(self.language_ids)}")
        return self.language_ids[language]

    def prompt(self, language: str | None, task: str = "transcribe", timestamps: bool = False) -> list[int]:
        """<|startoftranscript|> <|lang|> <|task|> [<|notimestamps|>]; language None = detect first."""
        tokens = [self.sot]
        if language is not None:
            tokens.append(self.language_id(language))
        tokens.append(self.transcribe if task == "transcribe" else self.translate)
        if not timestamps:
            tokens.append(self.no_timestamps)
        return tokens

    @cached_property
    def _ranks(self) -> dict[str, int]:
        """Ordinary tokens (in their printable byte form) -> id, which is also the merge rank."""
        return {token: i for i, token in enumerate(self.vocabulary[: self.eot])}

    def encode(self, text: str) -> list[int]:
        """Token ids of ordinary text (no special tokens), as openai/whisper's tokenizer gives them."""
        ids: list[int] = []
        for piece in PIECES.findall(text):
            ids += self._bpe("".join(_CHARS[b] for b in piece.encode()))
        return ids

    def _bpe(self, word: str) -> list[int]:
        """Byte-level BPE of one piece: merge the adjacent pair of lowest rank until none is a token."""
        cached = self._pieces.get(word)
        if cached is not None:
            return cached
        ranks, parts = self._ranks, list(word)
        while len(parts) > 1:
            merges = [(ranks[a + b], i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if a + b in ranks]
            if not merges:
                break
            _, i = min(merges)
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        missing = [p for p in parts if p not in ranks]
        if missing:
            raise ValueError(f"this vocabulary has no token for the byte(s) {missing!r}; it cannot encode prompts")
        ids = [ranks[p] for p in parts]
        if len(self._pieces) < 65536:  # prompts repeat (every partial of a stream): pieces are encoded once
            self._pieces[word] = ids
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of the ordinary tokens in `ids` (special and timestamp tokens are left out)."""
        data = bytearray()
        for i in ids:
            if i < self.eot:
                data.extend(_BYTES[c] for c in self.vocabulary[i])
        return data.decode("utf-8", errors="ignore")  # a character cut between tokens is left out

    def timestamp(self, token: int) -> float:
        return (token - self.timestamp_begin) * 0.02
