"""The text of hypotheses: clients' prompts checked, segment texts joined into a transcript, the
prefix two partials agree on (LocalAgreement-2), a segment's word timings on the stream's clock."""

from __future__ import annotations

import json
from dataclasses import replace

from engines.whisper.alignment import Word

MAX_PROMPT_CHARS = 1000
"""Longest prompt a client may send; the model reads at most its last 223 tokens anyway."""


def check_prompt(value: object, name: str = "prompt") -> str:
    """A client's prompt (None: none), or ValueError saying what to send instead."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string of the names and terms to expect, got {json.dumps(value)[:60]}")
    if len(value) > MAX_PROMPT_CHARS:
        raise ValueError(
            f"{name} has {len(value)} characters, more than the {MAX_PROMPT_CHARS} allowed; send the names "
            "and terms to expect (the model reads about the last 200 words of it)"
        )
    return value


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
    if 0 < n and _spaced(a[n - 1]) and (_spaced(a[n : n + 1]) or _spaced(b[n : n + 1])):
        while n > 0 and _spaced(a[n - 1]):
            n -= 1
    return a[:n]


def shift(words: list[Word] | None, offset: float) -> list[Word] | None:
    """Word timings of a segment's audio moved onto the stream's clock (the segment starts at `offset`)."""
    if words is None:
        return None
    return [replace(w, start=offset + w.start, end=offset + w.end) for w in words]
