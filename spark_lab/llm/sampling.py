"""Samplers: logits [vocab] -> one token id. Seeded, so a run can be repeated exactly.

The chain follows llama.cpp's default order: repetition penalty -> top-k -> top-p -> min-p
-> temperature -> draw. Temperature 0 is greedy (argmax, ties to the lowest id).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SamplingParams:
    temperature: float = 0.7          # 0 = greedy
    top_k: int = 40                   # 0 = off
    top_p: float = 0.95               # 1 = off
    min_p: float = 0.05               # 0 = off; drop tokens below min_p * p(best)
    repetition_penalty: float = 1.0   # 1 = off; >1 discourages tokens already seen
    repeat_last_n: int = 64           # how many recent tokens the penalty looks at
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p < 1.0:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def apply_repetition_penalty(logits: np.ndarray, recent: list[int], penalty: float) -> np.ndarray:
    """CTRL-style: divide positive logits of seen tokens by `penalty`, multiply negative ones."""
    if penalty == 1.0 or not recent:
        return logits
    ids = np.unique(np.asarray(recent, dtype=np.int64))
    vals = logits[ids]
    logits = logits.copy()
    logits[ids] = np.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def sample(logits: np.ndarray, p: SamplingParams, rng: np.random.Generator, recent: list[int] = ()) -> int:
    """logits [vocab] (float32, host) -> token id."""
    logits = apply_repetition_penalty(logits, list(recent)[-p.repeat_last_n:], p.repetition_penalty)
    if p.temperature == 0.0:
        return int(np.argmax(logits))
    ids = np.arange(logits.shape[0])
    if p.top_k and p.top_k < logits.shape[0]:
        keep = np.argpartition(-logits, p.top_k - 1)[:p.top_k]
        ids, logits = keep, logits[keep]
    order = np.argsort(-logits, kind="stable")                 # best first
    ids, logits = ids[order], logits[order].astype(np.float64)
    probs = np.exp(logits - logits[0])
    probs /= probs.sum()
    if p.top_p < 1.0:
        cut = int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1  # smallest prefix with mass >= top_p
        ids, logits, probs = ids[:cut], logits[:cut], probs[:cut]
    if p.min_p > 0.0:
        keep = probs >= p.min_p * probs[0]
        ids, logits = ids[keep], logits[keep]
    z = (logits - logits[0]) / p.temperature
    probs = np.exp(z)
    probs /= probs.sum()
    return int(ids[rng.choice(len(ids), p=probs)])
