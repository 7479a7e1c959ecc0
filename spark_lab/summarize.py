"""Summaries: extractive (MiniLM + LexRank + MMR), abstractive (LLM map-reduce) and hybrid.

    from spark_lab.summarize import summarize, read_document
    s = summarize(read_document("report.md"), method="extractive", max_words=150)
    s.text, s.sentences, s.words_in, s.words_out, s.seconds

extractive   split into sentences (pysbd, language picked from the script and stop words),
             embed them with all-MiniLM-L6-v2 on spark_lab's BERT, build the cosine-similarity
             graph, score sentences by LexRank (PageRank by power iteration) with a small
             bonus for coming early in their section, then pick by MMR (relevance minus
             redundancy) until `max_words`; sentences come back in document order. Long documents are ranked within sections first, then across sections.
abstractive  map-reduce with an LLM (`spark_lab.llm.LLM`): pack sentences into token-counted
             chunks that fit the context next to the prompt and the output budget, summarize
             each chunk (map), merge partial summaries group by group until they fit
             `token_max` (reduce), then write the final summary. A long text with headings is
             summarized section by section: its sections are bundled into at most
             max_words // WORDS_PER_TOPIC topic groups, chunks never cross a group, each map
             prompt names its group's headings, and the final step asks the LLM for one
             sentence per group; the summary is those sentences in document order (a small
             model asked to merge everything at once drops most topics of a long report).
hybrid       extractive selection down to what fits one context, then one abstractive pass; a
             long text with chapters gets one LLM sentence per topic group from its extract.
"""
from __future__ import annotations

import html.parser
import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

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


# ---------------------------------------------------------------------------- words & language

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af"
_WORD_RE = re.compile(rf"[{_CJK}]|[^\s{_CJK}]+")


def count_words(text: str) -> int:
    """Whitespace words; a CJK character counts as one word (those scripts use no spaces)."""
    return len(_WORD_RE.findall(text))


_SCRIPTS = [  # (first, last, pysbd language)
    (0x0900, 0x097F, "hi"), (0x0600, 0x06FF, "ar"), (0x0400, 0x04FF, "ru"), (0x0370, 0x03FF, "el"),
    (0x0530, 0x058F, "hy"), (0x1000, 0x109F, "my"), (0x1200, 0x137F, "am"), (0x3040, 0x30FF, "ja"),
    (0x4E00, 0x9FFF, "zh"),
]
_STOPWORDS = {
    "en": "the and is of to in that it was for with as on are this be by".split(),
    "de": "der die und ist nicht das mit sich auf für ein eine den dem von zu".split(),
    "es": "el la los las que y en es por con una para del se no".split(),
    "fr": "le la les des et est une dans pour que qui pas du sur au".split(),
    "it": "il di che è la per non una sono gli della del con si".split(),
    "nl": "de het een en van is niet op dat zijn voor met ook".split(),
    "pl": "i w nie się na jest że to z do jak od".split(),
    "da": "og er det at en til ikke på med som af den".split(),
}


def detect_language(text: str) -> str:
    """A pysbd language code from the dominant script, then stop words for Latin text."""
    sample = text[:20000]
    counts: dict[str, int] = {}
    letters = 0
    for ch in sample:
        if not ch.isalpha():
            continue
        letters += 1
        o = ord(ch)
        for lo, hi, lang in _SCRIPTS:
            if lo <= o <= hi:
                counts[lang] = counts.get(lang, 0) + 1
                break
    if letters and counts:
        lang, n = max(counts.items(), key=lambda kv: kv[1])
        if n / letters > 0.3:
            if lang == "zh" and counts.get("ja", 0) > 0.05 * n:
                return "ja"  # kanji + kana
            if lang == "ar":
                if re.search("[ےںٹڈڑ]", sample):
                    return "ur"
                if re.search("[پچژگ]", sample):
                    return "fa"
            return lang
    words = re.findall(r"[^\W\d_]+", sample.lower())[:3000]
    if not words:
        return "en"
    scores = {lang: sum(w in set(sw) for w in words) for lang, sw in _STOPWORDS.items()}
    best = max(scores, key=lambda k: (scores[k], k == "en"))
    return best if scores[best] >= 2 else "en"


# ---------------------------------------------------------------------------- splitting

@dataclass
class Paragraph:
    sentences: list            # list[str]
    heading: bool = False      # a heading line: starts a section, never extracted
    level: int = 0             # heading level: 1 for `#`, 2 for `##`, ...; 0 for body text


_HEADING_RE = re.compile(r"^\s{0,3}(#{1,6})\s+")
_LIST_RE = re.compile(r"^\s*(?:[-*+•]|\d{1,3}[.)])\s+")
# cheap pre-cut for very long paragraphs (pysbd is superlinear in paragraph length): only at an
# end mark after a 3+ letter word, before a capital/quote, so abbreviations like "Dr." stay whole
_PRECUT_RE = re.compile(r"(?<=[^\W\d_]{3}[.!?।؟。！？])\s+(?=[\"“'(\[A-Z\u0900-\u097F])")


@lru_cache(maxsize=32)
def _segmenter(language: str):
    import pysbd
    return pysbd.Segmenter(language=language, clean=False)


def _blocks(text: str, limit: int = 2000) -> list[str]:
    if len(text) <= limit:
        return [text]
    out, start, last = [], 0, 0
    for m in _PRECUT_RE.finditer(text):
        if m.start() - start > limit and last > start:
            out.append(text[start:last])
            start = last
        last = m.end()
    out.append(text[start:])
    return out


def split_sentences(text: str, language: str | None = None) -> list[str]:
    """One paragraph (or any text) -> sentences, with pysbd's rules for `language`."""
    lang = language or detect_language(text)
    seg = _segmenter(lang)
    out = []
    for block in _blocks(text):
        out.extend(s.strip() for s in seg.segment(block) if s.strip())
    return out


def split_paragraphs(text: str, language: str | None = None) -> list[Paragraph]:
    """Blank lines, headings (`# ...`) and list items separate paragraphs; lines inside a
    paragraph are joined (hard-wrapped text reads as one flow)."""
    lang = language or detect_language(text)
    paras: list[Paragraph] = []
    lines: list[str] = []

    def flush():
        if lines:
            body = " ".join(l.strip() for l in lines)
            sents = split_sentences(body, lang)
            if sents:
                paras.append(Paragraph(sents))
            lines.clear()

    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if not line.strip():
            flush()
        elif m := _HEADING_RE.match(line):
            flush()
            paras.append(Paragraph([_HEADING_RE.sub("", line).strip().rstrip("#").strip()], heading=True,
                                   level=len(m.group(1))))
        elif _LIST_RE.match(line):
            flush()
            lines.append(_LIST_RE.sub("", line))
        else:
            lines.append(line)
    flush()
    return paras


# ---------------------------------------------------------------------------- extractive

LAMBDA_MMR = 0.7        # relevance vs redundancy in MMR
POSITION = 0.2          # weight of "earlier in its section" in relevance (lead bias of most prose)
DUPLICATE = 0.9         # cosine above which a sentence repeats one already picked: never taken
DAMPING = 0.85          # PageRank damping
SECTION_SENTENCES = 400  # above this many sentences, rank within sections first


@lru_cache(maxsize=2)
def _default_encoder(name: str = "all-minilm-l6-v2"):
    from .text import SentenceEncoder
    return SentenceEncoder.load(name)


def similarity(emb):
    """emb [n, d] unit rows -> cosine similarities [n, n] (host float32)."""
    from . import kernels as K
    from .device import to_device, to_host
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
               candidates=None) -> list[int]:
    """Greedy maximal marginal relevance under a word budget -> chosen indices (document order)."""
    pool = list(range(len(lengths))) if candidates is None else list(candidates)
    chosen: list[int] = []
    used = 0
    max_sim = np.full(len(lengths), -1.0, dtype=np.float32)  # similarity to the closest pick so far
    while pool:
        p = np.array(pool)
        redundancy = max_sim[p] if chosen else 0.0
        score = lam * relevance[p] - (1.0 - lam) * redundancy
        best = int(p[int(np.argmax(score))])  # first maximum: ties go to the earlier sentence
        pool.remove(best)
        if used + lengths[best] > max_words:
            continue
        chosen.append(best)
        used += lengths[best]
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


def _truncate_words(text: str, max_words: int) -> str:
    """At most max_words words (an ellipsis counts as one): the last sentence end inside the
    budget when that keeps at least half of it, else a cut marked with " …"."""
    words = list(_WORD_RE.finditer(text))
    if len(words) <= max_words:
        return text
    cut = text[:words[max_words - 1].end()]
    m = max((cut.rfind(c) for c in ".!?।。"), default=-1)
    if m >= len(cut) // 2:
        return cut[:m + 1]
    return cut if max_words < 2 else text[:words[max_words - 2].end()] + " …"


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
    chosen = mmr_select(emb, rel, doc.lengths[cand], max_words)
    if not chosen:  # every sentence is longer than the budget: the best one, cut
        best = int(cand[int(np.argmax(rel))])
        return [(best, _truncate_words(doc.sentences[best], max_words))]
    return [(int(cand[i]), doc.sentences[cand[i]]) for i in chosen]


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


def _done(s: Summary, words_in: int, t0: float) -> Summary:
    s.words_in = words_in
    s.words_out = count_words(s.text)
    s.seconds = time.perf_counter() - t0
    return s


# ---------------------------------------------------------------------------- abstractive

SYSTEM = "You are a careful assistant. You write short, faithful summaries."
MAP_PROMPT = ("Summarize the following text in at most {words} words. Keep the main facts, names "
              "and numbers. Do not add anything that is not in the text.\n\nText:\n{text}")
REDUCE_PROMPT = ("These are summaries of consecutive parts of one document. Combine them into one "
                 "summary of at most {words} words that keeps the main points of every part.\n\n"
                 "Summaries:\n{text}")


# long texts with headings: map chunks use MAP_PROMPT and carry their section's heading inside the
# text (`# Title`): SmolLM2-135M asked to "summarize the section about Title" tends to echo the
# instruction, and "part of a report" makes it talk about "the report" instead of its content
TOPIC_PROMPT = ("These are summaries of consecutive parts of one section of a document. Combine them "
                "into one sentence of at most {words} words that keeps their main point.\n\n"
                "Summaries:\n{text}")


def _messages(template: str, text: str, words: int, topic: str = "") -> list[dict]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": template.format(words=words, text=text, topic=topic)}]


class _Budget:
    """Token arithmetic for one LLM: what fits next to the prompt and the output."""

    def __init__(self, llm, max_words: int, max_new_tokens: int | None, token_max: int | None):
        self.llm = llm
        n_ctx = int(getattr(llm, "n_ctx", 0) or llm.config.n_ctx)   # the engine's context, not training's
        self.n_ctx, self.words = n_ctx, max_words
        self.out = int(max_new_tokens or min(max(int(max_words * 1.6) + 16, 48), n_ctx // 4))
        overhead = max(self._prompt_tokens(t, max_words) for t in (MAP_PROMPT, REDUCE_PROMPT))
        self.chunk = n_ctx - overhead - self.out - 8   # 8: template/BOS slack
        if self.chunk < 64:
            raise ValueError(f"context of {n_ctx} tokens leaves only {self.chunk} for text after the "
                             f"prompt and {self.out} output tokens; use a longer context or fewer words")
        self.token_max = self.chunk if token_max is None else min(int(token_max), self.chunk)
        if self.token_max < 32:
            raise ValueError(f"token_max={token_max} is too small (at least 32 tokens)")

    def _prompt_tokens(self, template, words, topic=""):
        msgs = _messages(template, "", words, topic)
        if hasattr(self.llm, "encode_chat"):           # exact: special tokens parsed
            return len(self.llm.encode_chat(msgs))
        if hasattr(self.llm, "apply_chat_template"):   # special tokens counted as text: an over-estimate
            return self.llm.count_tokens(self.llm.apply_chat_template(msgs, add_generation_prompt=True))
        return sum(self.llm.count_tokens(m["content"]) + 4 for m in msgs) + 4

    def tokens(self, text: str) -> int:
        return int(self.llm.count_tokens(text))

    def chunk_for(self, template: str) -> int:
        """Text tokens that fit next to `template` (and the output budget)."""
        return min(self.chunk, self.n_ctx - self._prompt_tokens(template, self.words) - self.out - 8)


def _split_long(sentence: str, limit: int, budget: _Budget) -> list[str]:
    """A sentence longer than `limit` tokens -> word runs that each fit."""
    words = sentence.split()
    out, start = [], 0
    per_word = max(budget.tokens(sentence) / max(len(words), 1), 1e-3)
    while start < len(words):
        n = max(1, int(limit / per_word * 0.9))
        while n > 1 and budget.tokens(" ".join(words[start:start + n])) > limit:
            n = max(1, int(n * 0.8))
        out.append(" ".join(words[start:start + n]))
        start += n
    return out


def chunk_text(paragraphs: list, limit: int, budget: _Budget) -> list[str]:
    """Pack sentences into chunks of at most `limit` tokens, breaking at paragraph ends when the
    next paragraph would not fit and the current chunk is already half full."""
    chunks, cur, cur_tok = [], [], 0

    def close():
        nonlocal cur, cur_tok
        if cur:
            chunks.append(" ".join(cur).replace(" \n\n ", "\n\n").strip())
        cur, cur_tok = [], 0

    for p in paragraphs:
        sents = p.sentences if isinstance(p, Paragraph) else list(p)
        toks = [budget.tokens(s) + 1 for s in sents]
        if cur and cur_tok + sum(toks) > limit and cur_tok > limit // 2:
            close()
        for s, t in zip(sents, toks):
            pieces = [(s, t)] if t <= limit else [(x, budget.tokens(x) + 1) for x in _split_long(s, limit - 1, budget)]
            for x, tx in pieces:
                if cur and cur_tok + tx > limit:
                    close()
                cur.append(x)
                cur_tok += tx
        if cur:
            cur.append("\n\n")
    close()
    # token counts of a joined chunk can differ from the sum of its parts: re-check, re-split
    fixed = []
    for c in chunks:
        if budget.tokens(c) <= limit:
            fixed.append(c)
        else:
            fixed.extend(_split_long(c, limit, budget))
    return fixed


_PREFIX_RE = re.compile(r"^\s*(?:#+\s*)?(?:\*\*)?\s*(?:here is (?:a|the) )?(?:short |brief )?summar(?:y|ies)\s*(?:\*\*)?\s*:\s*(?:\*\*)?\s*", re.I)


# an announcement line with nothing after its colon on that line ("The text is as follows:",
# "The report:"): small models often open with one; the content follows on the next lines
_LEADIN_RE = re.compile(r"^\s*(?:the (?:text|report|summary|document|section)|here)\b[^:\n]{0,80}:[ \t]*\n", re.I)


def _clean(text: str, max_words: int) -> str:
    t = _PREFIX_RE.sub("", text.strip()).strip()
    t = _LEADIN_RE.sub("", t + "\n").strip()
    t = re.sub(r"(?m)^#{1,6}\s+", "", t)      # heading marks copied from a `# Title` in the prompt
    return _truncate_words(t, max_words)


def _progress(iterable, enabled: bool, desc: str, total: int | None = None):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, total=total, unit="call", leave=False)


def abstractive(text: str, llm, max_words: int = 150, token_max: int | None = None,
                max_new_tokens: int | None = None, language: str | None = None,
                progress: bool = True, _paragraphs=None) -> Summary:
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
        g = llm.chat(_messages(template, body, words, topic), max_new_tokens=b.out, temperature=0.0)
        return _clean(g.text, keep or words)

    # 1. map: every chunk summarized on its own
    chunks = chunk_text(paras, b.chunk, b)
    if len(chunks) == 1:
        out = ask(MAP_PROMPT, chunks[0], max_words)
        s = Summary(out, "abstractive", partials=[out], chunks=1, llm_calls=calls, language=lang)
        return _done(s, words_in, t0)
    groups = topic_groups(split_sections(paras), b, max_words)
    if len(groups) > 1:
        s = _sectioned(groups, b, ask, max_words, progress, lang, words_in, t0)
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


# ---------------------------------------------------------------------------- sections

WORDS_PER_TOPIC = 12   # the shortest sentence a topic group gets in the final summary


@dataclass
class Section:
    title: str                 # its heading ("" for text before the first heading)
    paragraphs: list           # list[Paragraph]: body text and sub-headings
    parts: list = field(default_factory=list)   # a topic group: the sections it bundles


def split_sections(paras: list) -> list[Section]:
    """Paragraphs -> sections, cut at the shallowest heading level that occurs at least twice
    (a single `# Title` above `## Chapter`s is the document's title, not a section). Sections
    without body text are dropped."""
    levels = sorted({p.level for p in paras if isinstance(p, Paragraph) and p.heading})
    cut = next((lv for lv in levels if sum(p.heading and p.level == lv for p in paras) >= 2), None)
    secs = [Section("", [])]
    for p in paras:
        if cut is not None and p.heading and p.level == cut:
            secs.append(Section(p.sentences[0], []))
        elif not (p.heading and cut is not None and p.level < cut):   # titles above the cut: dropped
            secs[-1].paragraphs.append(p)
    return [s for s in secs if any(not p.heading for p in s.paragraphs)]


def topic_groups(sections: list[Section], b: _Budget, max_words: int) -> list[Section]:
    """Bundle neighbouring sections into at most max_words // WORDS_PER_TOPIC groups: a section
    under a quarter of the mean size joins its smaller neighbour, then the smallest neighbouring
    pair merges, until the count fits. A group's title lists its sections' headings."""
    if len(sections) < 2:
        return sections
    most = max(1, max_words // WORDS_PER_TOPIC)
    sections = [Section(_short_title(s.title, b), s.paragraphs) for s in sections]
    groups = [Section(s.title, list(s.paragraphs), [s]) for s in sections]
    size = [sum(b.tokens(x) for p in s.paragraphs for x in p.sentences) for s in groups]
    small = 0.25 * sum(size) / len(size)

    def merge(i):   # group i absorbs group i + 1
        groups[i] = Section("; ".join(t for t in (groups[i].title, groups[i + 1].title) if t),
                            groups[i].paragraphs + groups[i + 1].paragraphs, groups[i].parts + groups[i + 1].parts)
        size[i] += size.pop(i + 1)
        groups.pop(i + 1)

    while len(groups) > 1:
        j = min(range(len(groups)), key=lambda k: size[k])
        if len(groups) <= most and size[j] >= small:
            break
        if size[j] < small:   # a small group: merge it into its smaller neighbour
            i = j - 1 if j == len(groups) - 1 or (j > 0 and size[j - 1] <= size[j + 1]) else j
        else:                 # too many groups: merge the smallest neighbouring pair
            i = min(range(len(groups) - 1), key=lambda k: size[k] + size[k + 1])
        merge(i)
    return groups


def _short_title(title: str, b: _Budget) -> str:
    """A heading cut to what leaves a map prompt most of its chunk (long headings happen)."""
    words = title.split()
    while len(words) > 3 and b.tokens(" ".join(words)) > 0.1 * b.chunk:
        words = words[:len(words) * 2 // 3]
    return " ".join(words)


def fit_words(texts: list, max_words: int) -> list:
    """Cut texts so that together they have at most max_words words, sharing the budget fairly:
    a text shorter than its share keeps all of it and leaves the rest to the longer ones
    (water-filling); a cut ends at a sentence end when that keeps half the share."""
    n = [count_words(t) for t in texts]
    share = {}
    left, rest = max_words, sorted(range(len(texts)), key=lambda i: n[i])
    while rest:
        fair = left // len(rest)
        i = rest[0]
        if n[i] <= fair:
            share[i] = n[i]
            left -= n[i]
            rest.pop(0)
        else:
            for j in rest:
                share[j] = max(1, fair)
            break
    return [_truncate_words(t, share[i]) if n[i] > share[i] else t for i, t in enumerate(texts)]


def section_chunks(sections: list[Section], b: _Budget) -> list[str]:
    """Chunks of a topic group for the map: each starts with its section's heading (`# Title`),
    a section too long for one chunk is cut (every piece keeps the heading), and neighbouring
    pieces of different sections share a chunk when they fit together."""
    limit = b.chunk_for(MAP_PROMPT)
    pieces = []
    for sec in sections:
        head = f"# {sec.title}\n\n" if sec.title else ""
        room = limit - (b.tokens(head) + 2 if head else 0)
        pieces += [head + c for c in chunk_text(sec.paragraphs, room, b)]
    out = []
    for p in pieces:
        if out and b.tokens(out[-1] + "\n\n" + p) <= limit:
            out[-1] = out[-1] + "\n\n" + p
        else:
            out.append(p)
    return out


def _sectioned(groups: list[Section], b: _Budget, ask, max_words: int, progress: bool, lang: str,
               words_in: int, t0: float) -> Summary:
    """Map inside each topic group (prompts name the group), reduce inside each group until it
    fits, then one LLM sentence per group; the summary is those sentences in document order."""
    work = []                                        # (group index, chunk)
    for gi, g in enumerate(groups):
        work += [(gi, c) for c in section_chunks(g.parts or [g], b)]
    part_words = _part_words(b, max_words)
    partials = [ask(MAP_PROMPT, c, part_words, keep=max_words)
                for gi, c in _progress(work, progress, "map", len(work))]
    per_topic = max(WORDS_PER_TOPIC, max_words // len(groups))   # asked for; fitted below
    rounds, topics, sentences, asked = [], [], [], []
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
        topics.append({"topic": g.title, "chunks": sum(gj == gi for gj, _ in work), "summary": sent})
    if asked:
        rounds.append(asked)
    fitted = fit_words(sentences, max_words)
    for t, f in zip(topics, fitted):
        t["summary"] = f
    text = " ".join(x for x in fitted if x)
    s = Summary(text, "abstractive", partials=partials, rounds=rounds, chunks=len(work),
                language=lang, topics=topics)
    return _done(s, words_in, t0)


HYBRID_FACTOR = 4   # hybrid extracts at most this many times max_words before rewriting


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
    if len(groups) > 1:
        # a long text with chapters: one sentence per topic group, from that group's extract
        # (SmolLM2 given one extract of eight chapters rewrites the first and drops the rest)
        per_topic = max(WORDS_PER_TOPIC, max_words // len(groups))
        outs = []
        for g in _progress(groups, progress, "topics", len(groups)):
            body = " ".join(x for p in g.paragraphs for x in p.sentences)
            body = f"# {g.title}\n\n{body}" if g.title else body
            gen = llm.chat(_messages(MAP_PROMPT, body, per_topic), max_new_tokens=b.out, temperature=0.0)
            outs.append(" ".join(_clean(gen.text, max_words).split()))
        fitted = fit_words(outs, max_words)
        topics = [{"topic": g.title, "chunks": 1, "summary": f} for g, f in zip(groups, fitted)]
        s = Summary(" ".join(f for f in fitted if f), "hybrid", sentences=sents, partials=outs,
                    chunks=len(groups), llm_calls=len(groups), language=doc.language, topics=topics)
        return _done(s, words_in, t0)
    paras = [Paragraph(sents)]   # one flowing paragraph: one-line paragraphs invite list-like echoes
    ab = abstractive(" ".join(sents), llm, max_words=max_words, token_max=token_max,
                     max_new_tokens=max_new_tokens, language=doc.language, progress=progress,
                     _paragraphs=paras)
    s = Summary(ab.text, "hybrid", sentences=sents, partials=ab.partials, rounds=ab.rounds,
                chunks=ab.chunks, llm_calls=ab.llm_calls, language=doc.language)
    return _done(s, words_in, t0)


def summarize(text: str, method: str = "extractive", max_words: int = 150, llm=None, encoder=None,
              token_max: int | None = None, progress: bool = True, max_new_tokens: int | None = None,
              language: str | None = None) -> Summary:
    """text -> Summary. `llm` is needed for abstractive/hybrid; `encoder` (a SentenceEncoder)
    defaults to all-MiniLM-L6-v2; `token_max` caps what a reduce step may read at once."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {', '.join(METHODS)}")
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("the text to summarize is empty")
    if int(max_words) <= 0:
        raise ValueError(f"max_words must be positive, got {max_words}")
    if method == "extractive":
        return extractive(text, max_words, encoder=encoder, language=language, progress=progress)
    if method == "abstractive":
        return abstractive(text, llm, max_words, token_max=token_max, max_new_tokens=max_new_tokens,
                           language=language, progress=progress)
    return hybrid(text, llm, max_words, encoder=encoder, token_max=token_max,
                  max_new_tokens=max_new_tokens, language=language, progress=progress)


# ---------------------------------------------------------------------------- reading files

class _HTMLText(html.parser.HTMLParser):
    """Visible text of an HTML page; block elements become paragraph breaks."""
    BLOCK = {"p", "div", "br", "li", "tr", "section", "article", "header", "footer", "blockquote",
             "pre", "table", "ul", "ol", "dd", "dt", "figcaption", "main", "aside", "hr"}
    SKIP = {"script", "style", "noscript", "template", "head", "svg", "nav"}  # not prose

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip += 1
        elif tag in self.BLOCK:
            self.parts.append("\n\n")
        elif re.fullmatch(r"h[1-6]", tag):
            self.parts.append("\n\n# ")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag in self.BLOCK or re.fullmatch(r"h[1-6]", tag):
            self.parts.append("\n\n")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(re.sub(r"\s+", " ", data))

    def text(self) -> str:
        t = "".join(self.parts)
        t = re.sub(r"[ \t]*\n[ \t]*", "\n", t)
        t = re.sub(r"\n{3,}", "\n\n", t)
        t = re.sub(r"\n# \n", "\n", t)
        return t.strip()


def html_to_text(html_text: str) -> str:
    p = _HTMLText()
    p.feed(html_text)
    p.close()
    return p.text()


def markdown_to_text(md: str) -> str:
    """Light Markdown cleanup: keep headings and list items as lines, drop markup."""
    out, fence = [], False
    for line in md.splitlines():
        if line.strip().startswith(("```", "~~~")):
            fence = not fence
            out.append("")
            continue
        if fence:
            continue  # code is not prose
        line = re.sub(r"!\[[^\]]*\]\([^)]*\)", "", line)           # images
        line = re.sub(r"\[([^\]]+)\]\([^)]*\)", r"\1", line)        # links -> their text
        line = re.sub(r"(\*\*|__|`)", "", line)                     # bold, code spans
        line = re.sub(r"(?<!\w)[*_](\S[^*_]*?)[*_](?!\w)", r"\1", line)  # emphasis
        line = re.sub(r"^\s{0,3}>\s?", "", line)                    # block quotes
        out.append(line)
    return "\n".join(out)


def decode_bytes(data: bytes, name: str = "input") -> str:
    if not data.strip():
        raise ValueError(f"{name} is empty")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            pass
    if b"\x00" in data[:8192]:
        raise ValueError(f"{name} looks like a binary file (it contains NUL bytes), not text")
    for enc in ("utf-8", "utf-8-sig"):
        try:
            return data.decode(enc).lstrip("\ufeff")
        except UnicodeDecodeError as e:
            err = e
    raise ValueError(f"{name} is not UTF-8 text (undecodable byte at offset {err.start}); "
                     f"convert it first, e.g. `iconv -f latin1 -t utf-8`")


def read_document(path: str | Path) -> str:
    """`.txt`, `.md`, `.html`/`.htm` file, or `-` for stdin -> plain text with paragraphs."""
    if str(path) == "-":
        raw, name, suffix = sys.stdin.buffer.read(), "stdin", ""
    else:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"no such file: {p}")
        if p.is_dir():
            raise ValueError(f"{p} is a folder, not a document")
        raw, name, suffix = p.read_bytes(), str(p), p.suffix.lower()
    text = decode_bytes(raw, name)
    looks_html = suffix in (".html", ".htm", ".xhtml") or (
        suffix == "" and re.match(r"\s*(<!doctype html|<html|<body|<p>)", text[:200], re.I))
    if looks_html:
        text = html_to_text(text)
    elif suffix in (".md", ".markdown"):
        text = markdown_to_text(text)
    if not text.strip():
        raise ValueError(f"{name} has no text to summarize")
    return text


# ---------------------------------------------------------------------------- CLI

def cmd_summarize(args) -> int:
    """`spark-lab summarize [--model M] [--method ...] [--max-words N] [--json] FILE|-`"""
    text = read_document(args.file)
    llm = None
    if args.method in ("abstractive", "hybrid"):
        from .llm import LLM
        llm = LLM.load(args.model) if args.model else LLM.load("smollm2-135m-instruct")
    s = summarize(text, method=args.method, max_words=args.max_words, llm=llm,
                  progress=sys.stderr.isatty())
    if getattr(args, "json", False):
        d = s.to_dict()
        if llm is not None:
            d["model"] = getattr(llm, "name", args.model)
        print(json.dumps(d, ensure_ascii=False))
    else:
        print(s.text)
    return 0
