"""Text stage: Chinese script conversion with OpenCC.

whisper-base often writes Simplified Chinese; the service answers in Taiwan Traditional
(`s2twp`: Taiwan standard characters and Taiwan phrasing, e.g. 软件 -> 軟體).
"""

from __future__ import annotations

import threading
from functools import lru_cache

_lock = threading.Lock()


@lru_cache(maxsize=None)
def _converter(config: str):
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
        return _converter(config).convert(text)


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
