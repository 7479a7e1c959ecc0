"""Hybrid summaries: an extract that fits one context, rewritten by the LLM (one sentence per
topic group for a long text with chapters)."""
from __future__ import annotations

import time

import numpy as np

from .mapreduce import abstractive
from .chunks import MAP_PROMPT, _Budget, _clean, _messages, _progress, generate, unlooped
from .extract import _chapters, _default_encoder, _extract_indexed, _prepare, _rank, topic_segments
from .segment import Paragraph
from .summary import Summary, _done
from .topics import WORDS_PER_TOPIC, Section, fit_words, topic_groups, topical_lines

HYBRID_FACTOR = 4   # hybrid extracts at most this many times max_words before rewriting


def _segment_sections(doc, picks: list, ranked) -> list[Section]:
    """Extracted (index, sentence) pairs -> one untitled Section per topic segment they come from,
    carrying the summed embedding of all the segment's sentences (so that topic_groups merges
    the segments by topic, not by the size of their extract)."""
    cand, emb, _ = ranked
    seg = topic_segments(doc, cand, emb)
    if seg is None:
        return []
    where = {int(c): k for k, c in enumerate(cand)}
    out, rows, last = [], [], None
    for i, t in picks:
        g = int(seg[where[i]]) if i in where else last
        if out and g == last:
            out[-1].paragraphs[0].sentences.append(t)
        else:
            mine = seg == g                                                # [m] this segment's sentences
            out.append(Section("", [Paragraph([t])], emb=emb[mine].sum(axis=0), count=int(mine.sum())))
            rows.append([])
        rows[-1].append(emb[where[i]] if i in where else None)
        last = g
    for sec, r in zip(out, rows):    # the picks' own embeddings, when every pick has one
        sec.rows = None if any(x is None for x in r) else np.stack(r)
    return out


def hybrid(text: str, llm, max_words: int = 150, encoder=None, token_max: int | None = None,
           max_new_tokens: int | None = None, language: str | None = None,
           progress: bool = True) -> Summary:
    """Extract the most central sentences that fit one context window, then rewrite them."""
    if llm is None:
        raise ValueError("hybrid summaries need an LLM: pass llm=LLM.load('smollm2-135m-instruct')")
    t0 = time.perf_counter()
    doc = _prepare(text, language)
    words_in = int(doc.lengths.sum())
    b = _Budget(llm, max_words, max_new_tokens, token_max)
    limit = b.token_max
    total_tokens = b.tokens(text)
    # what fits one context, and at most HYBRID_FACTOR x max_words: a small model rewrites a
    # short, central extract better than a window full of text
    fit = words_in if total_tokens <= limit else int(limit * words_in / max(total_tokens, 1) * 0.9)
    budget_words = max(1, min(fit, HYBRID_FACTOR * max_words))
    many = doc.body.sum() > 1 and int(doc.lengths[doc.body].sum()) > budget_words
    ranked = _rank(doc, encoder, progress) if many else None
    while True:
        picks = _extract_indexed(doc, budget_words, ranked=ranked)
        sents = [t for _, t in picks]
        if b.tokens(" ".join(sents)) <= limit or budget_words <= 8:
            break
        budget_words = int(budget_words * 0.8)
    groups = topic_groups(_chapters(doc, picks), b, max_words) if total_tokens > limit else []
    if len(groups) <= 1 and ranked is not None:
        # no chapters: the extract's sentences bundled by the topic segment they come from
        topics = _segment_sections(doc, picks, ranked)
        groups = topic_groups(topics, b, max_words) if len(topics) >= 3 else groups
    if len(groups) > 1:
        # a long text with chapters: one sentence per topic group, from that group's extract
        # (SmolLM2 given one extract of eight chapters rewrites the first and drops the rest)
        per_topic = max(WORDS_PER_TOPIC, max_words // len(groups))
        outs = []
        for g in _progress(groups, progress, "topics", len(groups)):
            body = " ".join(x for p in g.paragraphs for x in p.sentences)
            body = f"# {g.title}\n\n{body}" if g.title else body
            out = generate(llm, _messages(MAP_PROMPT, body, per_topic), b.out)
            outs.append(" ".join(_clean(out, max_words).split()))
        lines, again = outs, []
        if all(g.emb is not None and not g.title for g in groups):   # tiled: the line that names the topic
            def ask_again(body, words):
                again.append(generate(llm, _messages(MAP_PROMPT, body, words), b.out))
                return " ".join(_clean(again[-1], max_words).split())
            lines = topical_lines([[o] for o in outs], groups, encoder or _default_encoder(), max_words,
                                  doc.language, ask_again=ask_again)
        fitted = unlooped(fit_words(lines, max_words))
        topics = [{"topic": g.title, "chunks": 1, "summary": f} for g, f in zip(groups, fitted)]
        s = Summary(" ".join(f for f in fitted if f), "hybrid", sentences=sents, partials=outs,
                    chunks=len(groups), llm_calls=len(groups) + len(again), language=doc.language,
                    topics=topics)
        return _done(s, words_in, t0)
    paras = [Paragraph(sents)]   # one flowing paragraph: one-line paragraphs invite list-like echoes
    ab = abstractive(" ".join(sents), llm, max_words=max_words, token_max=token_max,
                     max_new_tokens=max_new_tokens, language=doc.language, progress=progress,
                     _paragraphs=paras)
    s = Summary(ab.text, "hybrid", sentences=sents, partials=ab.partials, rounds=ab.rounds,
                chunks=ab.chunks, llm_calls=ab.llm_calls, language=doc.language)
    return _done(s, words_in, t0)
