"""The text of hypotheses: segments joined into one transcript, the prefix two hypotheses agree
on (the stable prefix of partials), word times moved onto the stream's clock."""

from __future__ import annotations

from dataclasses import replace

from engines.whisper.alignment import Word


def _spaced(c: str) -> bool:
    return c.isascii() and c.isalnum()


def join_text(parts: list[str]) -> str:
    """Segment texts as one transcript: a space only between two Latin words or numbers."""
    out = ""
    for part in parts:
        part = part.strip()
        if not part:
            continue
        if out and _spaced(out[-1]) and _spaced(part[0]):
            out += " "
        out += part
    return out


def agreed_prefix(a: str, b: str) -> str:
    """Longest common prefix of two hypotheses, not ending inside a Latin word or number."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    if 0 < n and _wordchar(a[n - 1]) and (_wordchar(a[n : n + 1]) or _wordchar(b[n : n + 1])):
        while n > 0 and _wordchar(a[n - 1]):
            n -= 1
    return a[:n]


def _wordchar(c: str) -> bool:
    return c.isascii() and c.isalnum()


def shift(words: list[Word] | None, offset: float) -> list[Word] | None:
    """Word timings of a segment's audio moved onto the stream's clock (the segment starts at `offset`)."""
    if words is None:
        return None
    return [replace(w, start=offset + w.start, end=offset + w.end) for w in words]
