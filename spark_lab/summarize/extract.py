"""Extractive summaries: MiniLM sentence embeddings, LexRank (PageRank on the cosine graph) with a
small lead bias per section, then MMR picks under a word budget, in document order."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .segment import Paragraph, _truncate_words, count_words, detect_language, split_paragraphs
from .summary import Summary, _done
from .tiling import SENTENCE_WORDS  # a typical extracted sentence: W words cover W // 20 topics
from .topics import Section

# ---------------------------------------------------------------------------- extractive

LAMBDA_MMR = 0.7        # relevance vs redundancy in MMR
POSITION = 0.2          # weight of "earlier in its section" in relevance (lead bias of most prose)
DUPLICATE = 0.9         # cosine above which a sentence repeats one already picked: never taken
DAMPING = 0.85          # PageRank damping
SECTION_SENTENCES = 400  # above this many sentences, rank within sections first
SEGMENT_LEAD = 0.1      # bonus for opening a topic segment (its first sentence usually names the topic)
TOPICAL = 0.6           # weight of topicality (nearness to what sets a sentence's segment apart)


@lru_cache(maxsize=2)
def _default_encoder(name: str = "all-minilm-l6-v2"):
    from ..text import SentenceEncoder
    return SentenceEncoder.load(name)


def similarity(emb):
    """emb [n, d] unit rows -> cosine similarities [n, n] (host float32)."""
    from .. import kernels as K
    from ..device import to_device, to_host
    e = to_device(np.ascontiguousarray(emb, dtype=np.float32))
    return np.asarray(to_host(K.matmul(e, e.T)), dtype=np.float32)


def lexrank(sim, damping: float = DAMPING, tol: float = 1e-7, max_iter: int = 200):
    """Continuous LexRank: PageRank over the graph weighted by positive cosine similarity.

    sim [n, n] -> scores [n] (sum 1). Power iteration on the row-stochastic matrix.
    """
    n = sim.shape[0]
    if n == 1:
        return np.ones(1, dtype=np.float32)
    w = np.clip(sim, 0.0, None).astype(np.float32)
    np.fill_diagonal(w, 0.0)
    rows = w.sum(axis=1, keepdims=True)
    P = np.where(rows > 0, w / np.maximum(rows, 1e-12), 1.0 / n).astype(np.float32)  # [n, n]
    r = np.full(n, 1.0 / n, dtype=np.float32)
    for _ in range(max_iter):
        nxt = (1.0 - damping) / n + damping * (r @ P)   # [n]
        done = float(np.abs(nxt - r).sum()) < tol
        r = nxt.astype(np.float32)
        if done:
            break
    return r / r.sum()


def _minmax(x):
    lo, hi = float(x.min()), float(x.max())
    return np.zeros_like(x) if hi - lo < 1e-12 else (x - lo) / (hi - lo)


def _sections(section_of: np.ndarray, limit: int) -> list[np.ndarray]:
    """Candidate indices grouped by section, each group cut to at most `limit`."""
    groups = []
    for s in np.unique(section_of):
        idx = np.flatnonzero(section_of == s)
        groups.extend(idx[i:i + limit] for i in range(0, len(idx), limit))
    return groups


def rank_sentences(emb, section_of=None, limit: int = SECTION_SENTENCES):
    """emb [n, d] -> relevance [n] in [0, 1].

    Short documents: LexRank over all sentences. Long ones (n > limit): LexRank inside each
    section keeps the graph small (O(sum s^2), not n^2); the best sentences of every section
    then meet in one cross-section LexRank, and the two scores are averaged.
    """
    n = emb.shape[0]
    if n <= limit:
        return _minmax(lexrank(similarity(emb)))
    section_of = np.zeros(n, dtype=np.int64) if section_of is None else np.asarray(section_of)
    local = np.zeros(n, dtype=np.float32)
    finalists = []
    for idx in _sections(section_of, limit):
        sc = _minmax(lexrank(similarity(emb[idx])))
        local[idx] = sc
        keep = max(3, int(math.ceil(len(idx) * 0.1)))
        finalists.extend(idx[np.argsort(-sc, kind="stable")[:keep]].tolist())
    finalists = np.array(sorted(finalists))
    if len(finalists) > 4 * limit:   # extremely long input: keep the strongest locally
        finalists = np.sort(finalists[np.argsort(-local[finalists], kind="stable")[:4 * limit]])
    glob = np.zeros(n, dtype=np.float32)
    glob[finalists] = _minmax(lexrank(similarity(emb[finalists])))
    rel = 0.5 * local
    rel[finalists] += 0.5 * glob[finalists]
    return rel


def mmr_select(emb, relevance, lengths, max_words: int, lam: float = LAMBDA_MMR,
               candidates=None, segment_of=None) -> list[int]:
    """Greedy maximal marginal relevance under a word budget -> chosen indices (document order).

    With `segment_of` [n] (topic segment of every sentence), MMR runs over segments first: while
    a segment has no pick and one of its sentences still fits, only such sentences compete, so
    every topic gets a sentence when the budget allows; then plain MMR fills the rest."""
    pool = list(range(len(lengths))) if candidates is None else list(candidates)
    chosen: list[int] = []
    used = 0
    max_sim = np.full(len(lengths), -1.0, dtype=np.float32)  # similarity to the closest pick so far
    covered: set = set()
    while pool:
        p = np.array(pool)
        if segment_of is not None:
            open_ = p[[int(segment_of[i]) not in covered for i in p]]
            if len(open_):   # a topic without a pick: its sentences first, within a fair share
                n_open = len(set(segment_of[open_].tolist()))
                fair = open_[lengths[open_] <= (max_words - used) / n_open]
                p = fair if len(fair) else open_
        redundancy = max_sim[p] if chosen else 0.0
        score = lam * relevance[p] - (1.0 - lam) * redundancy
        best = int(p[int(np.argmax(score))])  # first maximum: ties go to the earlier sentence
        pool.remove(best)
        if used + lengths[best] > max_words:
            continue
        chosen.append(best)
        used += lengths[best]
        if segment_of is not None:
            covered.add(int(segment_of[best]))
        s = emb @ emb[best]                  # [n]
        max_sim = np.maximum(max_sim, s)
        pool = [i for i in pool if used + lengths[i] <= max_words and max_sim[i] < DUPLICATE]
    return sorted(chosen)


@dataclass
class _Doc:
    sentences: list           # all sentences, document order (headings included)
    candidate: np.ndarray     # bool [n]: may be extracted
    body: np.ndarray          # bool [n]: not a heading
    section_of: np.ndarray    # int [n]
    lengths: np.ndarray       # words [n]
    language: str
    level: np.ndarray = None  # int [n]: heading level (1 for `#`, ...), 0 for body text


def _prepare(text: str, language: str | None) -> _Doc:
    lang = language or detect_language(text)
    paras = split_paragraphs(text, lang)
    sents, cand, sec, level, section = [], [], [], [], 0
    for p in paras:
        if p.heading:
            section += 1
        for s in p.sentences:
            sents.append(s)
            cand.append(not p.heading)
            sec.append(section)
            level.append(p.level if p.heading else 0)
    lengths = np.array([count_words(s) for s in sents], dtype=np.int64)
    cand = np.array(cand, dtype=bool)
    body = cand.copy()
    # fragments of one or two words rarely make a summary sentence; keep them only if nothing else
    if (cand & (lengths >= 3)).any():
        cand &= lengths >= 3
    sec = np.array(sec, dtype=np.int64)
    if len(np.unique(sec)) == 1 and len(sents) > SECTION_SENTENCES:
        # no headings: paragraphs bundled into sections of about half the limit
        pid, starts, count = [], 0, 0
        for p in paras:
            if count >= SECTION_SENTENCES // 2:
                starts += 1
                count = 0
            pid.extend([starts] * len(p.sentences))
            count += len(p.sentences)
        sec = np.array(pid, dtype=np.int64)
    return _Doc(sents, cand, body, sec, lengths, lang, np.array(level, dtype=np.int64))


def _rank(doc: _Doc, encoder=None, progress: bool = False):
    """-> (candidate indices [m], embeddings [m, d], relevance [m])."""
    cand = np.flatnonzero(doc.candidate)
    enc = encoder or _default_encoder()
    emb = enc.encode([doc.sentences[i] for i in cand], progress=progress)  # [m, 384]
    sec = doc.section_of[cand]
    rel = (1.0 - POSITION) * rank_sentences(emb, sec) + POSITION * position_prior(sec)
    return cand, emb, rel.astype(np.float32)


def position_prior(section_of) -> np.ndarray:
    """[n] section ids in document order -> 1.0 for a section's first sentence, down to 0.0 for its last."""
    out = np.zeros(len(section_of), dtype=np.float32)
    for s in np.unique(section_of):
        idx = np.flatnonzero(section_of == s)
        out[idx] = 1.0 - np.arange(len(idx), dtype=np.float32) / max(len(idx) - 1, 1)
    return out


def topicality(emb, segment_of) -> np.ndarray:
    """emb [m, d] unit rows, segment_of [m] -> [m] in [0, 1]: how closely each sentence points
    where its segment differs from the whole text (cosine of the sentence and the segment's mean,
    both less the text's mean), scaled within its segment. LexRank favours sentences central to
    the whole text, which in a long one are its common talk ("Remind us of the cost."); the
    sentence that names a segment's topic is the one nearest what sets the segment apart."""
    emb = np.asarray(emb, dtype=np.float32)
    c = emb.mean(axis=0)                                                  # [d]
    x = emb - c
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)      # [m, d]
    out = np.zeros(len(emb), dtype=np.float32)
    for s in np.unique(segment_of):
        idx = np.flatnonzero(segment_of == s)
        m = x[idx].mean(axis=0)
        out[idx] = _minmax(x[idx] @ (m / max(float(np.linalg.norm(m)), 1e-12)))
    return out


def _extract(doc: _Doc, max_words: int, ranked=None, encoder=None, progress: bool = False) -> list[str]:
    """The extractive picks (document order) for a word budget."""
    return [t for _, t in _extract_indexed(doc, max_words, ranked, encoder, progress)]


def _extract_indexed(doc: _Doc, max_words: int, ranked=None, encoder=None, progress: bool = False) -> list:
    """-> [(sentence index in doc.sentences, text)] in document order."""
    cand, body = np.flatnonzero(doc.candidate), np.flatnonzero(doc.body)
    if len(body) == 0:
        raise ValueError("the text has no sentences to summarize")
    if len(body) == 1 or int(doc.lengths[body].sum()) <= max_words:
        return [(int(i), doc.sentences[i]) for i in body]   # nothing to choose: the text (without headings)
    cand, emb, rel = ranked or _rank(doc, encoder, progress)
    # as many topics as the budget gives a sentence each: a long text tiles into far more
    # segments than that, and their shallowest boundaries are dropped first
    seg = topic_segments(doc, cand, emb, max_segments=max(2, max_words // SENTENCE_WORDS))
    if seg is not None and len(np.unique(seg)) > 1:   # the sentence that opens or sets apart a topic names it
        rel = rel + SEGMENT_LEAD * position_prior(seg) + TOPICAL * topicality(emb, seg)
    chosen = mmr_select(emb, rel, doc.lengths[cand], max_words, segment_of=seg)
    if not chosen:  # every sentence is longer than the budget: the best one, cut
        best = int(cand[int(np.argmax(rel))])
        return [(best, _truncate_words(doc.sentences[best], max_words))]
    return [(int(cand[i]), doc.sentences[cand[i]]) for i in chosen]


def _has_chapters(doc: _Doc) -> bool:
    heads = doc.level[doc.level > 0]
    return any(int((heads == lv).sum()) >= 2 for lv in set(heads.tolist()))


def topic_segments(doc: _Doc, cand, emb, max_segments: int | None = None):
    """Topic segment [m] of every candidate sentence, or None for a text too short to have
    several. Chapters (headings) when the text has them; a text without them, or with few and
    long ones, is tiled by the similarity of neighbouring sentence windows (tiling.boundaries),
    a text without chapters into at most `max_segments` topics (tiling.merge_similar)."""
    from .tiling import TILE_MIN, boundaries, merge_similar, segment_ids
    if len(cand) < TILE_MIN:
        return None
    if _has_chapters(doc):
        heads = doc.level[doc.level > 0]
        cut = min(lv for lv in set(heads.tolist()) if int((heads == lv).sum()) >= 2)
        chapter = np.cumsum(doc.level == cut)[cand]       # [m]
    else:
        chapter = np.zeros(len(cand), dtype=np.int64)
    names, counts = np.unique(chapter, return_counts=True)
    if len(names) >= 3 and counts.max() < 3 * TILE_MIN:   # enough chapters of a readable size
        # a short text's chapters already share the picks through their lead bias
        return chapter if len(cand) > SECTION_SENTENCES else None
    seg = np.zeros(len(cand), dtype=np.int64)
    nxt = 0
    for c in names:                                       # tile inside every long chapter
        idx = np.flatnonzero(chapter == c)
        starts = boundaries(emb[idx])
        if max_segments and len(names) == 1 and len(idx) >= 4 * TILE_MIN:   # a long text only:
            # a short one's few tiles are its topics already (merging them cost ROUGE there)
            starts = merge_similar(emb[idx], starts, max_segments)
        seg[idx] = nxt + segment_ids(len(idx), starts)
        nxt = int(seg[idx].max()) + 1
    return seg


def _chapters(doc: _Doc, picks: list) -> list[Section]:
    """Extracted (index, sentence) pairs -> one Section per chapter they come from (chapters cut
    at the shallowest heading level that occurs twice, as in split_sections)."""
    heads = doc.level[doc.level > 0]
    cut = next((lv for lv in sorted(set(heads.tolist())) if int((heads == lv).sum()) >= 2), None)
    if cut is None:
        return [Section("", [Paragraph([t for _, t in picks])])]
    title_of, title = [], ""
    for i, lv in enumerate(doc.level.tolist()):
        if lv == cut:
            title = doc.sentences[i]
        title_of.append(title)
    out: list[Section] = []
    for i, t in picks:
        if out and out[-1].title == title_of[i]:
            out[-1].paragraphs[0].sentences.append(t)
        else:
            out.append(Section(title_of[i], [Paragraph([t])]))
    return out


def extractive(text: str, max_words: int = 150, encoder=None, language: str | None = None,
               progress: bool = False) -> Summary:
    t0 = time.perf_counter()
    doc = _prepare(text, language)
    sents = _extract(doc, max_words, encoder=encoder, progress=progress)
    s = Summary(" ".join(sents), "extractive", sents, language=doc.language)
    return _done(s, int(doc.lengths.sum()), t0)
