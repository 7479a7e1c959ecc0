"""Topic segmentation of text without (usable) headings: TextTiling on sentence embeddings.

The similarity of the sentence windows left and right of every gap is computed from the MiniLM
embeddings the extractive path already has; a topic boundary is a gap where it drops deeply
(the depth score of TextTiling / C99: how far the curve climbs again on both sides), kept only
when the segments it leaves have at least `min_sentences` sentences.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_SENTENCES = 5      # shortest topic segment, in sentences
TILE_MIN = 24          # fewer sentences than this: one topic, no tiling
SENTENCE_WORDS = 20    # a sentence that names a topic: a budget of W words covers W // 20 topics


@dataclass
class TilingConfig:
    window: int = 3               # sentences on each side of a gap
    min_sentences: int = MIN_SENTENCES
    cutoff: float = 0.5           # a boundary needs depth >= mean + cutoff * std of the gaps' depths
    snap: int = 0                 # move a boundary to a paragraph start at most this many sentences away
    max_segments: int | None = None


def gap_similarity(emb, window: int = 3):
    """emb [n, d] unit rows -> sim [n - 1]: cosine of the mean embeddings of the `window`
    sentences before and after each gap (gap g lies between sentences g and g + 1)."""
    emb = np.asarray(emb, dtype=np.float32)
    n = emb.shape[0]
    if n < 2:
        return np.zeros(0, dtype=np.float32)
    c = np.vstack([np.zeros((1, emb.shape[1]), np.float32), np.cumsum(emb, axis=0)])   # [n + 1, d]
    g = np.arange(1, n)                                   # sentences [0, g) | [g, n)
    lo, hi = np.maximum(g - window, 0), np.minimum(g + window, n)
    left = c[g] - c[lo]                                   # [n - 1, d]
    right = c[hi] - c[g]
    num = (left * right).sum(axis=1)
    den = np.linalg.norm(left, axis=1) * np.linalg.norm(right, axis=1)
    return (num / np.maximum(den, 1e-12)).astype(np.float32)


def depth_scores(sim):
    """sim [m] -> depth [m]: (highest point reached climbing left) + (climbing right) - 2 sim."""
    sim = np.asarray(sim, dtype=np.float64)
    m = len(sim)
    depth = np.zeros(m)
    for i in range(m):
        l = i
        while l > 0 and sim[l - 1] >= sim[l]:
            l -= 1
        r = i
        while r < m - 1 and sim[r + 1] >= sim[r]:
            r += 1
        depth[i] = (sim[l] - sim[i]) + (sim[r] - sim[i])
    return depth


def boundaries(emb, paragraph_starts=(), cfg: TilingConfig | None = None) -> list[int]:
    """emb [n, d] -> sorted sentence indices where a new topic starts (0 not included).

    Gaps are taken deepest first while every segment keeps at least cfg.min_sentences; a
    boundary within cfg.snap sentences of a paragraph start moves there (writers change topic
    between paragraphs)."""
    cfg = cfg or TilingConfig()
    n = int(np.asarray(emb).shape[0])
    if n < max(TILE_MIN, 2 * cfg.min_sentences):
        return []
    sim = gap_similarity(emb, cfg.window)
    depth = depth_scores(sim)
    local_min = [g for g in range(len(sim)) if (g == 0 or sim[g] <= sim[g - 1]) and
                 (g == len(sim) - 1 or sim[g] <= sim[g + 1])]
    if not local_min:
        return []
    cut = float(depth.mean() + cfg.cutoff * depth.std())
    starts = sorted(set(int(p) for p in paragraph_starts))
    most = cfg.max_segments or max(1, n // cfg.min_sentences)
    chosen: list[int] = []
    for g in sorted(local_min, key=lambda k: -depth[k]):
        if depth[g] < cut or depth[g] <= 0 or len(chosen) + 1 >= most:
            break
        b = g + 1                                      # the sentence after the gap starts the topic
        near = [s for s in starts if abs(s - b) <= cfg.snap]
        if near:
            b = min(near, key=lambda s: (abs(s - b), s))
        edges = sorted(chosen + [b])
        if b in chosen or any(y - x < cfg.min_sentences for x, y in zip([0] + edges, edges + [n])):
            continue
        chosen.append(b)
    return sorted(chosen)


def ward_cost(sums, counts) -> np.ndarray:
    """sums [g, d] (each segment's summed sentence embeddings, in text order), counts [g]
    (its sentences) -> [g - 1] Ward's cost of joining neighbours: n_a n_b / (n_a + n_b) *
    |mean_a - mean_b|^2, the spread a merge adds. A few sentences split off a topic (a short
    reply, an aside) cost little to put back, while two long segments must really differ to be
    kept apart; the plain similarity of means treats a 5-sentence scrap like a 40-sentence topic
    and keeps scraps at the cost of a true boundary."""
    s = np.asarray(sums, dtype=np.float32)
    n = np.asarray(counts, dtype=np.float32)
    m = s / np.maximum(n, 1.0)[:, None]                                  # [g, d] mean sentences
    d = ((m[:-1] - m[1:]) ** 2).sum(axis=1)                               # [g - 1]
    return (n[:-1] * n[1:] / np.maximum(n[:-1] + n[1:], 1.0) * d).astype(np.float32)


def merge_similar(emb, starts: list[int], most: int) -> list[int]:
    """emb [n, d], boundaries -> at most `most` segments: the neighbouring pair that is cheapest
    to join (ward_cost, the shallowest topic change) merges first. Tiling over-segments long
    texts (every few paragraphs); the deepest boundaries are the topics."""
    emb = np.asarray(emb, dtype=np.float32)
    starts = sorted(starts)
    edges = [0] + starts + [emb.shape[0]]
    sums = [emb[a:z].sum(axis=0) for a, z in zip(edges, edges[1:])]       # [d] per segment
    counts = [z - a for a, z in zip(edges, edges[1:])]
    while len(starts) + 1 > max(1, most):
        k = int(np.argmin(ward_cost(np.stack(sums), counts)))
        starts.pop(k)                                                     # segments k and k + 1 join
        sums[k] = sums[k] + sums.pop(k + 1)
        counts[k] += counts.pop(k + 1)
    return starts


def segment_ids(n: int, starts: list[int]) -> np.ndarray:
    """Boundaries -> segment id [n] for every sentence (0, 0, ..., 1, 1, ...)."""
    out = np.zeros(n, dtype=np.int64)
    for b in starts:
        out[b:] += 1
    return out
