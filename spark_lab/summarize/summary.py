"""The result of a summary: its text and how it was made."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from .segment import count_words

METHODS = ("extractive", "abstractive", "hybrid")


@dataclass
class Summary:
    text: str                                     # the summary
    method: str                                   # extractive | abstractive | hybrid
    sentences: list = field(default_factory=list)  # extractive picks, in document order
    partials: list = field(default_factory=list)   # map outputs (one per chunk)
    rounds: list = field(default_factory=list)     # reduce rounds: [[summary, ...], ...]
    words_in: int = 0
    words_out: int = 0
    seconds: float = 0.0
    chunks: int = 0                               # map chunks the text was cut into
    llm_calls: int = 0
    language: str = "en"
    topics: list = field(default_factory=list)    # sectioned texts: [{"topic", "chunks", "summary"}]

    @property
    def words_per_second(self) -> float:
        return self.words_in / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["words_per_second"] = self.words_per_second
        return d


def _done(s: Summary, words_in: int, t0: float) -> Summary:
    s.words_in = words_in
    s.words_out = count_words(s.text)
    s.seconds = time.perf_counter() - t0
    return s
