"""The text stage: full-width punctuation in Chinese text, ASCII kept in English, numbers, URLs."""

from __future__ import annotations

import pytest

from engines.whisper.text import chinese_pieces, chinese_text, full_width_punctuation
from streaming.scoring import score, tokens

CASES = [
    # (model output, expected, why)
    ("在密碼學中,加密是一種方法.", "在密碼學中，加密是一種方法。", "the issue's example: between CJK and at the end"),
    ("你好嗎?我很好!", "你好嗎？我很好！", "question and exclamation marks between and after CJK"),
    ("注意:請排隊;謝謝", "注意：請排隊；謝謝", "colon and semicolon between CJK"),
    ("價格是3.5元.", "價格是3.5元。", "a decimal point stays, the sentence's full stop turns"),
    ("我有1,000元,夠嗎?", "我有1,000元，夠嗎？", "a thousands separator stays"),
    ("會議在10:30開始.", "會議在10:30開始。", "a clock time keeps its colon"),
    (
        "我用Python,它很簡單.",
        "我用Python，它很簡單。",
        "an English word inside a Chinese clause: the clause's marks turn",
    ),
    ("他說OK.", "他說OK。", "a Chinese clause that ends on a Latin word"),
    ("Hello, world.", "Hello, world.", "an English sentence is left alone"),
    ("Hello, 你好.", "Hello, 你好。", "the English clause keeps its comma, the Chinese one turns"),
    ("I use Python, it is simple. 我也是.", "I use Python, it is simple. 我也是。", "English sentences beside Chinese"),
    (
        "請上https://www.example.com/a?b=1查詢.",
        "請上https://www.example.com/a?b=1查詢。",
        "a URL keeps its colon, dots and question mark",
    ),
    ("網址是www.example.com.謝謝", "網址是www.example.com。謝謝", "a URL without scheme; the full stop after it turns"),
    ("寄到service@example.com.tw,謝謝.", "寄到service@example.com.tw，謝謝。", "an e-mail address keeps its dots"),
    ("我們用.NET開發", "我們用.NET開發", "a dot glued to the ASCII word after it"),
    ("我想想...好吧", "我想想...好吧", "an ellipsis is left as it is"),
    ("真的嗎?!", "真的嗎？！", "a run of marks after Chinese turns as a whole"),
    ("你好 , 我是小明 .", "你好，我是小明。", "spaces beside a mark that turns are dropped"),
    ("版本v2.0,很好", "版本v2.0，很好", "a version number keeps its dot"),
    ("已經是全形，不用改。", "已經是全形，不用改。", "full-width marks are kept"),
    ("e.g. 例如", "e.g. 例如", "an abbreviation before Chinese: its clause holds no CJK"),
    ("", "", "empty text"),
]


@pytest.mark.parametrize(("text", "expected", "why"), CASES, ids=[c[2] for c in CASES])
def test_full_width_punctuation(text: str, expected: str, why: str):
    assert full_width_punctuation(text) == expected, why


def test_chinese_text_converts_script_then_punctuation():
    assert chinese_text("软件很好用,对吧?") == "軟體很好用，對吧？"


@pytest.mark.parametrize(
    "words",
    [
        ["在", "密", "碼學", "中,", "加", "密", "。"],
        ["软", "件", "很好", "用,", "对吧", "?"],
        [" I", " use", " Python,", "它", "很", "好", "."],
    ],
)
def test_chinese_pieces_are_the_whole_text_cut_into_words(words: list[str]):
    pieces = chinese_pieces(words)
    assert len(pieces) == len(words)
    assert "".join(pieces) == chinese_text("".join(words))


@pytest.mark.parametrize(("text", "expected", "why"), CASES, ids=[c[2] for c in CASES])
def test_scoring_ignores_the_punctuation_width(text: str, expected: str, why: str):
    """The eval convention drops punctuation after NFKC: full-width marks change no CER."""
    reference = "在密碼學中加密是一種方法我用Python"
    assert score(reference, full_width_punctuation(text), "mix") == score(reference, text, "mix")
    assert tokens(full_width_punctuation(text), "mix") == tokens(text, "mix")
