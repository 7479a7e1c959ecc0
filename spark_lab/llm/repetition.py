"""Loops in generated text: count repeated word n-grams, and cut a text where it starts to loop.

A small model decoded greedily falls into loops ("la femme au roi, la femme au roi, ..."). The
sampler's repetition penalty and n-gram ban (sampling.py) make loops rare; these functions measure
what is left (tests, benchmarks) and trim a loop from an answer after the fact (the summarizer).

    max_ngram_repeats("a b c d a b c d a b c d", n=4)   # -> ('a b c d', 3)
    trim_loop("The keepers: The keepers: The keepers: The keepers: the light.")   # -> "The keepers:"
"""
from __future__ import annotations

import re
from collections import Counter

_WORD_RE = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    """Lower-cased word tokens (punctuation dropped): "The keepers:" and "the keepers" are the same."""
    return [w.lower() for w in _WORD_RE.findall(text)]


def max_ngram_repeats(text: str, n: int = 4) -> tuple[str, int]:
    """-> (the most frequent word n-gram, how often it occurs); ("", 0) for texts under n words.
    Occurrences may overlap ("a a a a a" holds "a a a a" twice)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    w = words(text)
    if len(w) < n:
        return "", 0
    counts = Counter(tuple(w[i:i + n]) for i in range(len(w) - n + 1))
    gram, k = counts.most_common(1)[0]
    return " ".join(gram), k


def has_loop(text: str, n: int = 4, k: int = 2) -> bool:
    """True when some word n-gram occurs more than k times."""
    return max_ngram_repeats(text, n)[1] > k


def trim_loop(text: str, n: int = 4, k: int = 2) -> str:
    """Cut `text` just before the (k+1)-th occurrence of a repeated word n-gram, then back to the last
    sentence end (or clause mark) before the cut when there is one; a text without a loop comes back
    unchanged. The first k occurrences stay: a summary may name "the harbour authority" twice."""
    spans = [m.span() for m in _WORD_RE.finditer(text)]
    w = [text[a:b].lower() for a, b in spans]
    seen: Counter = Counter()
    cut = None
    for i in range(len(w) - n + 1):
        g = tuple(w[i:i + n])
        seen[g] += 1
        if seen[g] > k:
            cut = spans[i][0]
            break
    if cut is None:
        return text
    head = text[:cut].rstrip()
    end = max((head.rfind(c) for c in ".!?।。"), default=-1)
    if end >= len(head) // 3:
        return head[:end + 1]
    return head.rstrip(" ,;:-–—")
