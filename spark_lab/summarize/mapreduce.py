"""Abstractive summaries: map-reduce with an LLM; a long text with headings is summarized topic
group by topic group, one LLM sentence each (see the package docstring)."""
from __future__ import annotations

import time

from .chunks import (MAP_PROMPT, REDUCE_PROMPT, TOPIC_PROMPT, _Budget, _clean, _messages, _progress, unlooped,
                     chunk_text, generate)
from .segment import _truncate_words, count_words, detect_language, split_paragraphs
from .summary import Summary, _done
from .topics import (WORDS_PER_TOPIC, Section, fit_words, section_chunks, split_sections, tile_sections,
                     topic_groups, topical_lines)

def abstractive(text: str, llm, max_words: int = 150, token_max: int | None = None,
                max_new_tokens: int | None = None, language: str | None = None,
                progress: bool = True, _paragraphs=None, encoder=None) -> Summary:
    """Map-reduce summary with `llm` (count_tokens, chat): see the module docstring."""
    if llm is None:
        raise ValueError("abstractive summaries need an LLM: pass llm=LLM.load('smollm2-135m-instruct')")
    t0 = time.perf_counter()
    lang = language or detect_language(text)
    paras = _paragraphs if _paragraphs is not None else split_paragraphs(text, lang)
    words_in = sum(count_words(s) for p in paras for s in p.sentences)
    if words_in == 0:
        raise ValueError("the text has no sentences to summarize")
    b = _Budget(llm, max_words, max_new_tokens, token_max)
    calls = 0

    def ask(template, body, words, topic="", keep=None):
        """One LLM call; its answer is cleaned and cut to `keep` words (default: `words`)."""
        nonlocal calls
        calls += 1
        return _clean(generate(llm, _messages(template, body, words, topic), b.out), keep or words)

    # 1. map: every chunk summarized on its own
    chunks = chunk_text(paras, b.chunk, b)
    sections, tiled, enc = split_sections(paras), False, None
    if _paragraphs is None:   # topics found where headings are missing or few (hybrid brings its own)
        enc = encoder or _tiling_encoder()
        if enc is not None:
            sections, tiled = tile_sections(sections, enc)
    if len(chunks) == 1 and not (tiled and len(sections) >= 3):
        out = ask(MAP_PROMPT, chunks[0], max_words)
        s = Summary(out, "abstractive", partials=[out], chunks=1, llm_calls=calls, language=lang)
        return _done(s, words_in, t0)
    groups = topic_groups(sections, b, max_words)
    if len(groups) > 1:
        s = _sectioned(groups, b, ask, max_words, progress, lang, words_in, t0, encoder=enc)
        s.llm_calls = calls
        return s
    part_words = _part_words(b, max_words)
    partials = [ask(MAP_PROMPT, c, part_words, keep=max_words) for c in _progress(chunks, progress, "map", len(chunks))]
    # 2. reduce: merge neighbouring partials until all of them fit token_max together
    rounds, cur = _reduce(partials, b, ask, max_words, progress)
    # 3. the final summary from what is left
    out = ask(REDUCE_PROMPT, "\n\n".join(cur), max_words) if len(cur) > 1 else (cur[0] if cur else "")
    s = Summary(out, "abstractive", partials=partials, rounds=rounds, chunks=len(chunks),
                llm_calls=calls, language=lang)
    return _done(s, words_in, t0)


def _tiling_encoder():
    """MiniLM for topic tiling, or None where it is not installed (then headings alone decide)."""
    from ..models import ModelNotFound
    from .extract import _default_encoder
    try:
        return _default_encoder()
    except ModelNotFound:
        return None


def _part_words(b: _Budget, max_words: int) -> int:
    """Words asked of one partial summary: what its output budget can hold (about 1.5 tokens a word)."""
    return max(8, min(max_words, int(b.out / 1.5)))


def _reduce(partials: list, b: _Budget, ask, max_words: int, progress: bool, desc: str = "reduce"):
    """Merge neighbouring partials until they fit token_max together -> (rounds, what is left)."""
    rounds, cur = [], [p for p in partials if p]
    while len(cur) > 1 and b.tokens("\n\n".join(cur)) > b.token_max:
        groups = chunk_text([[p] for p in cur], b.token_max, b)
        if len(groups) >= len(cur) or len(rounds) >= 8:
            # no two partials fit together (or no end in sight): shorten them so that pairs fit
            joined = "\n\n".join(cur)
            per_word = b.tokens(joined) / max(count_words(joined), 1)
            cur = [_truncate_words(g, max(2, int(b.token_max / (2.5 * per_word)))) for g in cur]
            if len(rounds) >= 8:
                cur = [_truncate_words(" ".join(cur), max(2, int(b.token_max / (1.5 * per_word))))]
            continue
        cur = [ask(REDUCE_PROMPT, g, max_words) for g in _progress(groups, progress, f"{desc} {len(rounds) + 1}")]
        rounds.append(cur)
    return rounds, cur


def _sectioned(groups: list[Section], b: _Budget, ask, max_words: int, progress: bool, lang: str,
               words_in: int, t0: float, encoder=None) -> Summary:
    """Map inside each topic group (prompts name the group), reduce inside each group until it
    fits, then one LLM sentence per group; the summary is those sentences in document order.
    Groups of tiled text (no headings; they carry embeddings) take the line of what the LLM
    wrote for them that names their topic (topics.topical_lines) when `encoder` is given."""
    work = []                                        # (group index, chunk)
    for gi, g in enumerate(groups):
        work += [(gi, c) for c in section_chunks(g.parts or [g], b)]
    part_words = _part_words(b, max_words)
    partials = [ask(MAP_PROMPT, c, part_words, keep=max_words)
                for gi, c in _progress(work, progress, "map", len(work))]
    per_topic = max(WORDS_PER_TOPIC, max_words // len(groups))   # asked for; fitted below
    rounds, topics, sentences, asked, written = [], [], [], [], []
    for gi, g in enumerate(_progress(groups, progress, "topics", len(groups))):
        mine = [p for (gj, _), p in zip(work, partials) if gj == gi and p]
        r, cur = _reduce(mine, b, ask, max_words, False)
        for k, rr in enumerate(r):                   # reduce rounds of all groups, by depth
            rounds.extend([[]] * (k + 1 - len(rounds)))
            rounds[k] = rounds[k] + rr
        body = "\n\n".join(cur)
        body = f"# {g.title}\n\n{body}" if g.title and body else body
        if b.tokens(body) > b.chunk_for(TOPIC_PROMPT):   # token_max above what fits: cut
            body = _truncate_words(body, int(b.chunk_for(TOPIC_PROMPT) / 2))
        if len(cur) == 1 and not r:   # one partial: it already is this group's summary
            sent = cur[0]
        else:
            sent = ask(TOPIC_PROMPT, body, per_topic, keep=max_words) if body else ""
            asked.append(sent)
        sent = " ".join(sent.split())                # one paragraph: no line breaks inside
        sentences.append(sent)
        written.append([sent] + mine)
        topics.append({"topic": g.title, "chunks": sum(gj == gi for gj, _ in work), "summary": sent})
    if asked:
        rounds.append(asked)
    if encoder is not None and all(g.emb is not None and not g.title for g in groups):
        sentences = topical_lines(written, groups, encoder, max_words, lang,
                                  ask_again=lambda text, words: ask(MAP_PROMPT, text, words, keep=max_words))
    fitted = unlooped(fit_words(sentences, max_words))
    for t, f in zip(topics, fitted):
        t["summary"] = f
    text = " ".join(x for x in fitted if x)
    s = Summary(text, "abstractive", partials=partials, rounds=rounds, chunks=len(work),
                language=lang, topics=topics)
    return _done(s, words_in, t0)
