"""What a backend answers for one segment: the decoded text after the text stage, and what it cost.

Every backend (engines/engine.py, engines/trtllm/executor.py) builds its transcripts here, so that
the script conversion and Whisper's silence and loop rules are the same whichever ran the model.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

from engines.whisper.alignment import Word
from engines.whisper.text import chinese_pieces, chinese_text

NO_SPEECH_THRESHOLD = 0.6
LOGPROB_THRESHOLD = -1.0
COMPRESSION_RATIO_THRESHOLD = 2.4
CHINESE = ("zh", "yue")


@dataclass
class Transcript:
    """One decoded segment, with what it cost."""

    text: str  # after the text stage (Traditional Chinese, full-width punctuation, unless the script is as-is)
    tokens: list[int]
    language: str
    no_speech_prob: float
    avg_logprob: float
    looped: bool
    window_frames: int  # mel frames the encoder saw (3000 = the full 30 s window)
    encoder_seconds: float
    decoder_seconds: float
    forwards: int
    draft_proposed: dict[str, int] = field(default_factory=dict)
    draft_accepted: dict[str, int] = field(default_factory=dict)
    words: list[Word] | None = None  # timed words of a final that asked for them (seconds from the audio's start)
    alignment_seconds: float = 0.0  # what finding the word timings took

    @property
    def has_speech(self) -> bool:
        """Whisper's own rule for a silent segment, plus the blank and the loop cases."""
        if not self.text.strip():
            return False
        if self.no_speech_prob > NO_SPEECH_THRESHOLD and self.avg_logprob < LOGPROB_THRESHOLD:
            return False
        return not self.repetitive

    @property
    def repetitive(self) -> bool:
        """Whisper's compression-ratio test: text that gzip shrinks this much repeats itself."""
        data = self.text.encode()
        return len(data) >= 32 and len(data) / len(zlib.compress(data)) > COMPRESSION_RATIO_THRESHOLD

    @property
    def reliable(self) -> bool:
        """Fit to condition the next segment on: openai/whisper carries no text forward from a
        decode that needed its fallback (compression ratio or average log-probability past the
        thresholds), nor from one that looped."""
        return not (self.looped or self.repetitive or self.avg_logprob < LOGPROB_THRESHOLD)


def converts(script: str, language: str) -> bool:
    """Whether the text stage rewrites a transcript: Chinese, with the Traditional script asked for."""
    return script == "traditional" and language in CHINESE


def shape_text(text: str, language: str, script: str) -> str:
    """The decoded text after the text stage (engines/whisper/text.py)."""
    return chinese_text(text) if converts(script, language) else text


def shape_words(words: list[Word], language: str, script: str) -> None:
    """Rewrites timed words in place, piece by piece as `shape_text` rewrites their whole."""
    if converts(script, language):
        for word, piece in zip(words, chinese_pieces([w.text for w in words])):
            word.text = piece
