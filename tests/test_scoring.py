"""Scoring convention of eval/README.md and the Traditional Chinese text stage."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engines.whisper.text import is_traditional, to_traditional
from streaming.scoring import Score, corpus_score, edit_distance, score, tokens


def test_to_traditional_uses_taiwan_characters_and_phrases():
    assert to_traditional("软件和鼠标") == "軟體和滑鼠"
    assert to_traditional("打印机的信息") == "印表機的資訊"
    assert to_traditional("我們今天去公園散步") == "我們今天去公園散步"  # Traditional stays
    assert to_traditional("") == ""
    assert to_traditional("擁有解密方法的對象") == "擁有解密方法的對象"  # no Taiwan phrasing forced on Traditional text
    assert is_traditional("吃燕窩就選燕之屋") and not is_traditional("吃燕窝")


def test_to_traditional_from_many_threads():
    texts = ["软件和鼠标", "视频信息", "我们的打印机"] * 200
    expected = [to_traditional(t) for t in texts]
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(to_traditional, texts)) == expected


def test_simplified_and_traditional_score_equal():
    assert score("我們用軟體上網，你知道嗎？", "我们用软件上网你知道吗", "zh") == Score(0, 11)


def test_variant_characters_do_not_count():
    assert score("乖乖唸講義，心裡", "乖乖念讲义心裏", "zh") == Score(0, 7)


def test_punctuation_and_symbols_are_ignored():
    assert score("「你好！」——再見……", "你好 再見", "zh") == Score(0, 4)
    assert score("你好", "你好。。。!!!~~~", "zh").errors == 0


def test_latin_words_are_one_token_each():
    assert tokens("我拿到了offer！", "mix") == ["我", "拿", "到", "了", "offer"]
    assert score("我拿到了offer", "我拿到了 Offer。", "mix") == Score(0, 5)
    # "offer" -> "off" is a substitution, the stray "er" an insertion.
    assert score("我拿到了offer", "我拿到了off er", "mix") == Score(2, 5)
    assert tokens("Hello世界 World2 ＯＫ", "mix") == ["hello", "世", "界", "world2", "ok"]


def test_numbers_are_not_verbalised():
    # ref [26, 年] vs hyp [二, 十, 六, 年]: one substitution and two insertions.
    assert score("26年", "二十六年", "zh") == Score(3, 2)


def test_speaker_tags_are_dropped():
    assert tokens("[S1]嗯。[S2]對啊[S1]", "zh") == ["嗯", "對", "啊"]


def test_english_word_error_rate():
    assert score("And so, my fellow Americans:", "and so my fellow americans", "en") == Score(0, 5)
    # "not" deleted, "for you" inserted.
    hypothesis = "ask what your country can do for you"
    assert score("Ask not what your country can do.", hypothesis, "en") == Score(3, 7)
    assert tokens("Don't stop!", "en") == ["dont", "stop"]


def test_edit_distance_small_cases():
    assert edit_distance(list("kitten"), list("sitting")) == 3
    assert edit_distance([], ["a", "b"]) == 2
    assert edit_distance(["a", "b"], []) == 2
    assert edit_distance(["a", "b", "c"], ["a", "c"]) == 1


def test_corpus_rate_is_pooled_not_averaged():
    total = corpus_score([Score(1, 4), Score(1, 16)])
    assert total == Score(2, 20)
    assert total.rate == pytest.approx(0.1)  # the mean of clip rates would be 0.156


def test_empty_reference_rate():
    assert Score(0, 0).rate == 0.0
    assert Score(2, 0).rate == float("inf")
    assert corpus_score([]) == Score(0, 0)


def test_unknown_language_is_rejected():
    with pytest.raises(ValueError, match="zh"):
        tokens("hello", "fr")


words = st.lists(st.sampled_from(["a", "b", "c", "你", "好"]), max_size=12)


@given(words, words)
def test_edit_distance_is_a_bounded_symmetric_metric(a, b):
    d = edit_distance(a, b)
    assert d == edit_distance(b, a)
    assert abs(len(a) - len(b)) <= d <= max(len(a), len(b))
    assert (d == 0) == (a == b)


@given(words, words, words)
def test_edit_distance_triangle_inequality(a, b, c):
    assert edit_distance(a, c) <= edit_distance(a, b) + edit_distance(b, c)
