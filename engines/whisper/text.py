"""Text stage: Chinese script conversion with OpenCC, then full-width punctuation.

whisper-base often writes Simplified Chinese; the service answers in Taiwan Traditional
(`s2twp`: Taiwan standard characters and Taiwan phrasing, e.g. 软件 -> 軟體).
"""

from __future__ import annotations

import itertools
import re
import threading
from functools import cache
from typing import Any

_lock = threading.Lock()


@cache
def _converter(config: str) -> Any:
    """One converter per config: loading its dictionaries costs milliseconds, converting microseconds.
    opencc is imported here, not at module load, so the engine imports where it is absent (a GPU
    benchmark box) as long as no text is converted."""
    import opencc

    return opencc.OpenCC(config)


def convert(text: str, config: str) -> str:
    """`text` converted with the OpenCC config `config` (e.g. "s2twp", "t2s").

    Calls are serialised: the binding does not document its converters as thread-safe, the
    engine converts from worker threads, and a conversion is far cheaper than contention.
    """
    with _lock:
        converted: str = _converter(config).convert(text)
        return converted


def is_traditional(text: str) -> bool:
    """No character of `text` changes when Simplified is converted to Taiwan Traditional.

    (`s2tw`, not `s2t`: plain s2t also swaps standard Traditional characters for variants,
    such as 吃 -> 喫.)"""
    return convert(text, "s2tw") == text


def to_traditional(text: str) -> str:
    """Taiwan Traditional Chinese: OpenCC s2twp when the text holds Simplified characters.

    Text that is already Traditional is left as it is: s2twp also rewrites phrases to Taiwan
    usage (對象 -> 物件), which is right for Mainland text and wrong for a Taiwanese speaker's."""
    return text if is_traditional(text) else convert(text, "s2twp")


# ---- full-width punctuation ----------------------------------------------------------------

FULL_WIDTH = {",": "，", ".": "。", "?": "？", "!": "！", ":": "：", ";": "；"}
# Han (with extensions and compatibility ideographs), kana, bopomofo: the scripts of a Chinese clause
_CJK = re.compile(
    "[\u3040-\u30ff\u3100-\u312f\u31a0-\u31bf\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003ffff]"
)
# left alone: URLs and e-mail addresses (ASCII only, since Chinese text runs on without spaces;
# a mark at their end belongs to the sentence, so a match never ends on one)
_PROTECTED = re.compile(
    r"(?:[A-Za-z][A-Za-z0-9+.-]*://|www\.)[\x21-\x7e]*[A-Za-z0-9/#=_~%&+)-]|"
    r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+"
)


def full_width_punctuation(text: str) -> str:
    """Chinese text with full-width `，。？！：；` where the model wrote ASCII `, . ? ! : ;`
    (Taiwanese readers expect them); which marks change: `full_width_pieces`."""
    return "".join(full_width_pieces(text))


def full_width_pieces(text: str) -> list[str]:
    """What each character of `text` becomes: itself, its full-width form, or "" (a space beside
    a mark that turned full-width, which carries its own spacing). One piece per character, so
    that word timings can follow their characters.

    A mark turns full-width when it ends a clause (it is not inside a word or number) that
    holds a CJK character, and the nearest non-space character before or after it is CJK or it
    ends the text; a mark right after one that turned full-width follows it ("？！"). Left
    alone: marks inside numbers and words ("3.5", "1,000", "10:30"), a "." glued to the ASCII
    word after it (".NET") or to another dot ("..."), URLs, e-mail addresses, English clauses.
    """
    pieces = list(text)
    protected = [False] * len(text)
    for match in _PROTECTED.finditer(text):
        protected[match.start() : match.end()] = [True] * (match.end() - match.start())
    clause_has_cjk = False
    for i, ch in enumerate(text):
        if _CJK.match(ch):
            clause_has_cjk = True
        elif ch in FULL_WIDTH.values() or ch in "、\n":
            clause_has_cjk = False
        elif ch in FULL_WIDTH and not protected[i] and _ends_clause(text, i):
            follows = i > 0 and pieces[i - 1] in FULL_WIDTH.values() and ch != "."
            before, after = _neighbour(text, i, -1), _neighbour(text, i, 1)
            if follows or (clause_has_cjk and (after in ("", "\n") or _CJK.match(before) or _CJK.match(after))):
                pieces[i] = FULL_WIDTH[ch]
                for j in (*_spaces(text, i, -1), *_spaces(text, i, 1)):
                    pieces[j] = ""
            clause_has_cjk = False
    return pieces


def _ends_clause(text: str, i: int) -> bool:
    """The mark text[i] is clause punctuation, not part of a word or number."""
    before, after = text[i - 1 : i], text[i + 1 : i + 2]
    if _word_char(before) and _word_char(after):
        return False  # 3.5, 1,000, 10:30
    return not (text[i] == "." and (_word_char(after) or "." in (before, after)))  # .NET, ...


def _word_char(ch: str) -> bool:
    return len(ch) == 1 and ch.isascii() and ch.isalnum()


def _spaces(text: str, i: int, step: int) -> list[int]:
    """Indices of the spaces right before (step -1) or after (step 1) position i."""
    out = []
    j = i + step
    while 0 <= j < len(text) and text[j] == " ":
        out.append(j)
        j += step
    return out


def _neighbour(text: str, i: int, step: int) -> str:
    """The nearest character before (step -1) or after (step 1) position i that is not a space; "" at the edge."""
    j = i + step * (len(_spaces(text, i, step)) + 1)
    return text[j] if 0 <= j < len(text) else ""


def chinese_text(text: str) -> str:
    """The text stage of Chinese output: Taiwan Traditional, then full-width punctuation."""
    return full_width_punctuation(to_traditional(text))


def chinese_pieces(pieces: list[str]) -> list[str]:
    """`chinese_text` of the text these pieces (words) make up, cut back into pieces: each
    piece's share of the converted whole, so that the words stay the final's text. Where OpenCC
    changes the length of a phrase, pieces are converted one by one instead."""
    whole = "".join(pieces)
    converted = to_traditional(whole)
    if len(converted) == len(whole):
        bounds = list(itertools.accumulate(map(len, pieces), initial=0))
        pieces = [converted[a:b] for a, b in zip(bounds, bounds[1:])]
    else:
        pieces = [to_traditional(p) for p in pieces]
    chars = full_width_pieces("".join(pieces))
    bounds = list(itertools.accumulate(map(len, pieces), initial=0))
    return ["".join(chars[a:b]) for a, b in zip(bounds, bounds[1:])]
