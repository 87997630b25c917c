"""Accuracy scoring, the convention of `eval/README.md`, so every number stays comparable.

- zh / mix: drop `[S1]`-style speaker tags, fold both sides with OpenCC t2s then s2twp (variant
  characters such as 裡/裏 do not count), drop punctuation and symbols, then count edits over
  tokens that are one CJK character or one lower-cased Latin/digit word (CER; for
  code-switched speech the usual mixed error rate). Numbers are not verbalised.
- en: lower-case, drop punctuation, WER.
- Corpus rates are total errors / total reference tokens, never averages of clip rates.

Two readings the README leaves open: text is NFKC-normalised first (full-width "ＯＫ２６" is the
Latin word "ok26"), and dropped punctuation is deleted, not turned into a space ("don't" is
one word, "dont").
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from engines.whisper.text import convert

LANGUAGES = ("zh", "mix", "en")

_SPEAKER_TAG = re.compile(r"\[S\d+\]")
# Han (with extensions and compatibility ideographs), kana, bopomofo, hangul: one token per character.
_CJK = (
    "\u3040-\u30ff\u3100-\u312f\u31a0-\u31bf\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0003ffff"
)
_ZH_TOKEN = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")


def _drop_punctuation(text: str) -> str:
    """Delete punctuation (P*) and symbols (S*), after NFKC so full-width forms fold to ASCII."""
    text = unicodedata.normalize("NFKC", text)
    return "".join(ch for ch in text if unicodedata.category(ch)[0] not in "PS")


def tokens(text: str, lang: str) -> list[str]:
    """The tokens errors are counted over, for language `lang` ("zh", "mix" or "en")."""
    if lang == "en":
        return _drop_punctuation(text).lower().split()
    if lang not in LANGUAGES:
        raise ValueError(f"lang must be one of {', '.join(LANGUAGES)}, got {lang!r}")
    folded = convert(convert(_SPEAKER_TAG.sub(" ", text), "t2s"), "s2twp")
    return _ZH_TOKEN.findall(_drop_punctuation(folded).lower())


def edit_distance(ref: Sequence[str], hyp: Sequence[str]) -> int:
    """Levenshtein distance between token lists (substitutions, deletions, insertions cost 1)."""
    previous = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        current = [i]
        for j, h in enumerate(hyp, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h)))
        previous = current
    return previous[-1]


@dataclass(frozen=True)
class Score:
    """Errors against reference tokens, for one clip or a whole corpus."""

    errors: int
    ref_tokens: int

    @property
    def rate(self) -> float:
        """errors / ref_tokens; an empty reference scores 0 when the hypothesis is empty too, else inf."""
        if self.ref_tokens:
            return self.errors / self.ref_tokens
        return 0.0 if self.errors == 0 else float("inf")


def score(ref: str, hyp: str, lang: str) -> Score:
    """Score one hypothesis against its reference transcript."""
    ref_tokens = tokens(ref, lang)
    return Score(edit_distance(ref_tokens, tokens(hyp, lang)), len(ref_tokens))


def corpus_score(scores: Iterable[Score]) -> Score:
    """Corpus-level total: the rate is total errors over total reference tokens."""
    errors = ref_tokens = 0
    for s in scores:
        errors += s.errors
        ref_tokens += s.ref_tokens
    return Score(errors, ref_tokens)
