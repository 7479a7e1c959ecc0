"""Loops in generated text: count repeated word n-grams, and cut a text where it starts to loop.

A small model decoded greedily falls into loops ("la femme au roi, la femme au roi, ..."). The
sampler's repetition penalty and n-gram ban (sampling.py) make loops rare; these functions measure
what is left (tests, benchmarks) and trim a loop from an answer after the fact (the summarizer).

    max_ngram_repeats("a b c d a b c d a b c d", n=4)   # -> ('a b c d', 3)
    has_loop("The keepers: The keepers The keepers: The lights")   # -> True
    trim_loop("Paris is the capital. The keepers: The keepers The keepers")   # -> "Paris is the capital."
"""
from __future__ import annotations

import re
from collections import Counter

# words, and sentence ends as tokens of their own: "la femme au roi, la femme au roi" repeats a
# phrase, "... part of the text. The text is ..." does not
_WORD_RE = re.compile(r"\w+|[.!?।。]+", re.UNICODE)


def words(text: str) -> list[str]:
    """Lower-cased word tokens and sentence ends (other punctuation dropped)."""
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


# What counts as a loop (each found in real SmolLM2-135M output decoded greedily):
#   a 4-word phrase a third time      "la femme au roi, la femme au roi, la femme au roi"
#   a 10-word run a second time       a whole sentence written again further on
#   a phrase of 2-8 words at once again "The keepers: The keepers The keepers:"
PHRASE, PHRASE_TIMES = 4, 2
RUN = 10
STUTTER = range(2, 9)


def _loop_start(w: list[str], n: int = PHRASE, k: int = PHRASE_TIMES) -> int | None:
    """Index of the first word where the text starts to loop, or None."""
    seen: Counter = Counter()
    runs: set = set()
    for i in range(len(w)):
        if not w[i][0].isalnum():         # a loop starts at a word, not at a sentence end
            continue
        # a phrase repeated back to back, with letters in it ("3.0, 3.0" is data)
        if any(w[i - m:i] == w[i:i + m] and any(x.isalpha() for x in w[i:i + m])
               for m in STUTTER if i >= m and i + m <= len(w)):
            return i
        if i + n <= len(w):
            g = tuple(w[i:i + n])
            seen[g] += 1
            if seen[g] > k:
                return i
        if i + RUN <= len(w):
            r = tuple(w[i:i + RUN])
            if r in runs:
                return i
            runs.add(r)
    return None


def has_loop(text: str, n: int = PHRASE, k: int = PHRASE_TIMES) -> bool:
    """True when some word n-gram occurs more than k times, a RUN-word stretch occurs twice, or a
    phrase of 2-8 words comes twice in a row."""
    return _loop_start(words(text), n, k) is not None


def loop_report(text: str, n: int = PHRASE, k: int = PHRASE_TIMES) -> str:
    """"" when there is no loop, else a few words from where the loop starts (for assert messages)."""
    w = words(text)
    i = _loop_start(w, n, k)
    return "" if i is None else f"loops at word {i}: {' '.join(w[max(0, i - 4):i + 8])!r}"


def trim_loop(text: str, n: int = PHRASE, k: int = PHRASE_TIMES) -> str:
    """Cut `text` where it starts to loop (see has_loop), then back to the last sentence end (or
    clause mark) before the cut when there is one; a text without a loop comes back unchanged."""
    spans = [m.span() for m in _WORD_RE.finditer(text)]
    i = _loop_start([text[a:b].lower() for a, b in spans], n, k)
    if i is None:
        return text
    head = text[:spans[i][0]].rstrip()
    end = max((head.rfind(c) for c in ".!?।。"), default=-1)
    if end >= len(head) // 3:
        return head[:end + 1]
    return head.rstrip(" ,;:-–—")
