"""Samplers: logits [vocab] -> one token id. Seeded, so a run can be repeated exactly.

The chain follows llama.cpp's default order: repetition penalty -> no-repeat n-gram ban -> top-k
-> top-p -> min-p -> temperature -> draw. Temperature 0 is greedy (argmax, ties to the lowest id).

The defaults are what Ollama and llama.cpp ship, because a 135M-parameter model decoded greedily
tends to loop ("la femme au roi, la femme au roi, ..."): temperature 0.7, top-k 40, top-p 0.9,
min-p 0.05 and a 1.1 repetition penalty over the last 64 tokens, with seed 0 so a notebook gives
the same answer on every run (seed=None draws fresh entropy). Greedy decoding stays the model's
plain argmax: unless a penalty is asked for, temperature 0 applies none, which is what the parity
tests against llama.cpp (`--temp 0`, whose repeat penalty is off by default) compare.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_REPETITION_PENALTY = 1.1   # when sampling and the caller did not choose one


@dataclass
class SamplingParams:
    temperature: float = 0.7          # 0 = greedy
    top_k: int = 40                   # 0 = off
    top_p: float = 0.9                # 1 = off
    min_p: float = 0.05               # 0 = off; drop tokens below min_p * p(best)
    repetition_penalty: float | None = None  # 1 = off; >1 discourages tokens already seen;
                                             # None = 1.1 when sampling, off when greedy
    repeat_last_n: int = 64           # how many recent tokens the penalty looks at
    no_repeat_ngram_size: int = 0     # 0 = off; n > 0 bans a token that repeats an n-gram of the output
    seed: int | None = 0              # None = a fresh random seed every call

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p < 1.0:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.repetition_penalty is None:
            self.repetition_penalty = DEFAULT_REPETITION_PENALTY if self.temperature > 0 else 1.0
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.repeat_last_n < 0:
            raise ValueError(f"repeat_last_n must be >= 0, got {self.repeat_last_n}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")


def apply_repetition_penalty(logits: np.ndarray, recent: list[int], penalty: float) -> np.ndarray:
    """CTRL-style: divide positive logits of seen tokens by `penalty`, multiply negative ones."""
    if penalty == 1.0 or not recent:
        return logits
    ids = np.unique(np.asarray(recent, dtype=np.int64))
    vals = logits[ids]
    logits = logits.copy()
    with np.errstate(over="ignore", divide="ignore"):   # an extreme penalty overflows float32: +-inf, see `sample`
        logits[ids] = np.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def _certain_or_finite(logits: np.ndarray) -> np.ndarray:
    """Logits with NaN or +inf (a damaged model's NaN, a float32 overflow of an extreme repetition penalty,
    found by the server fuzzer) -> ones `sample` can draw from: NaN is never drawn, +inf tokens share all the
    probability; all impossible (-inf or NaN everywhere) falls back to the argmax, as temperature 0 does."""
    plus = np.isposinf(logits)
    if plus.any():
        return np.where(plus, np.float32(0.0), np.float32(-np.inf)).astype(np.float32)
    out = np.where(np.isnan(logits), np.float32(-np.inf), logits).astype(np.float32)
    if np.isneginf(out).all():
        out = np.full_like(out, -np.inf)
        out[int(np.argmax(logits))] = 0.0
    return out


def banned_by_ngrams(generated: list[int], n: int) -> list[int]:
    """Tokens that would repeat an n-gram already in `generated` (transformers' no_repeat_ngram_size)."""
    if n <= 0 or len(generated) < n:
        return []
    g = list(generated)
    head = g[len(g) - n + 1:]                  # the n-1 tokens the next one would extend
    return [g[i + n - 1] for i in range(len(g) - n + 1) if g[i:i + n - 1] == head]


def sample(logits: np.ndarray, p: SamplingParams, rng: np.random.Generator, recent: list[int] = (),
           generated: list[int] = (), allowed: np.ndarray | None = None) -> int:
    """logits [vocab] (float32, host) -> token id. recent: prompt + output so far; generated: output only;
    allowed: bool [vocab] from a grammar (llm/constrain.py), the only tokens that may be drawn."""
    if allowed is not None:
        logits = np.where(allowed, logits, -np.inf).astype(np.float32, copy=False)
    if p.repeat_last_n:
        logits = apply_repetition_penalty(logits, list(recent)[-p.repeat_last_n:], p.repetition_penalty)
    ban = banned_by_ngrams(generated, p.no_repeat_ngram_size)
    if ban:
        logits = logits.copy()
        logits[ban] = -np.inf
    if p.temperature == 0.0:
        return int(np.argmax(logits))
    if not np.isfinite(logits).all():
        logits = _certain_or_finite(logits)
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
    with np.errstate(over="ignore"):                 # a tiny temperature sends the rest to -inf: p = 0
        z = (logits - logits[0]) / p.temperature
    probs = np.exp(z)
    probs /= probs.sum()
    return int(ids[rng.choice(len(ids), p=probs)])
