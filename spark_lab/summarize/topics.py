"""Long texts with headings: sections, topic groups of neighbouring sections, their map chunks,
and sharing a word budget between the groups' sentences."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .chunks import MAP_PROMPT, _Budget, chunk_text
from .segment import Paragraph, _truncate_words, count_words
from .tiling import SENTENCE_WORDS, ward_cost

# ---------------------------------------------------------------------------- sections

WORDS_PER_TOPIC = 12   # the shortest sentence a topic group gets in the final summary
ON_TOPIC = 0.5         # its line has to be as topical as the group's median sentence (quantile)


@dataclass
class Section:
    title: str                 # its heading ("" for text before the first heading)
    paragraphs: list           # list[Paragraph]: body text and sub-headings
    parts: list = field(default_factory=list)   # a topic group: the sections it bundles
    emb: object = None         # [d] sum of its body sentences' embeddings (tiled pieces), or None
    count: int = 0             # how many sentences `emb` sums
    rows: object = None        # [count, d] those sentences' embeddings (body sentences, in order), or None


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
    pair merges, until the count fits. A group's title lists its sections' headings.

    Untitled pieces that carry embeddings (tiled text without headings) merge by topic instead
    of size, into at most max_words // SENTENCE_WORDS groups: a small one joins the neighbour
    it is cheaper to join (tiling.ward_cost), then the cheapest neighbouring pair (the
    shallowest topic boundary) merges, so the deepest boundaries are the ones kept. Without a
    heading, a group's sentence has to name its topic itself: cut to 12 words it often stops
    before it does."""
    if len(sections) < 2:
        return sections
    by_topic = all(not s.title and s.emb is not None for s in sections)
    most = max(1, max_words // (SENTENCE_WORDS if by_topic else WORDS_PER_TOPIC))
    sections = [Section(_short_title(s.title, b), s.paragraphs, emb=s.emb, count=s.count, rows=s.rows)
                for s in sections]
    groups = [Section(s.title, list(s.paragraphs), [s], s.emb, s.count, s.rows) for s in sections]
    size = [sum(b.tokens(x) for p in s.paragraphs for x in p.sentences) for s in groups]

    def merge(i):   # group i absorbs group i + 1; a heading shared by both is named once
        parts = groups[i].parts + groups[i + 1].parts
        titles = dict.fromkeys(s.title for s in parts if s.title)
        e = (None if groups[i].emb is None or groups[i + 1].emb is None
             else groups[i].emb + groups[i + 1].emb)
        r = (None if groups[i].rows is None or groups[i + 1].rows is None
             else np.concatenate([groups[i].rows, groups[i + 1].rows]))
        groups[i] = Section("; ".join(titles), groups[i].paragraphs + groups[i + 1].paragraphs, parts, e,
                            groups[i].count + groups[i + 1].count, r)
        size[i] += size.pop(i + 1)
        groups.pop(i + 1)

    # pieces of one headed section (cut by tiling) are one topic: its heading names it
    i = 0
    while i < len(groups) - 1:
        if groups[i].title and groups[i].parts[-1].title == groups[i + 1].parts[0].title:
            merge(i)
        else:
            i += 1
    small = 0.25 * sum(size) / len(size)
    while len(groups) > 1:
        j = min(range(len(groups)), key=lambda k: size[k])
        if len(groups) <= most and size[j] >= small:
            break
        if by_topic:
            cost = ward_cost(np.stack([g.emb for g in groups]), [g.count for g in groups])   # [len(groups) - 1]
        if size[j] < small:   # a small group: merge it into its smaller (or closer) neighbour
            if by_topic:
                left = j > 0 and (j == len(groups) - 1 or cost[j - 1] <= cost[j])
            else:
                left = j == len(groups) - 1 or (j > 0 and size[j - 1] <= size[j + 1])
            i = j - 1 if left else j
        elif by_topic:        # too many groups: merge across the shallowest topic boundary
            i = min(range(len(groups) - 1), key=lambda k: cost[k])
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


def topical_lines(outputs: list, groups: list[Section], encoder, max_words: int, language: str = "en",
                  ask_again=None) -> list:
    """One line per topic group of an unheaded text, from what the LLM wrote for it.

    outputs[g] holds the LLM texts of group g (its answer first, then any map partials).
    SmolLM2-135M asked about a group often writes about something else ("The text is concise
    and focused on the main points", an echo of the prompt, a greeting from the e-mail it read),
    and without a heading nothing tells the reader which topic a line is about. A sentence is
    on topic when it points where the group differs from the whole text (`_toward`) at least as
    much as the group's median sentence does (`rows`, quantile ON_TOPIC; SmolLM2's off-topic
    lines score near zero, its paraphrases of a topic about as high as the sentences they come
    from; with the floor at the least topical tenth, abstractive named 0.85 of the long unheaded
    set's topics, at the median 0.93); the line starts at the first such
    sentence the LLM wrote (else at the one nearest the topic) and goes on with the sentences
    after it while they fit the group's share of max_words. When none is on topic and the
    group's text pairs with its rows, `ask_again(text, words)` rewrites the group's most
    topical sentences (about twice its share: a short extract, which the small model keeps to) and its sentences
    compete too. -> [line per group]"""
    from .segment import split_sentences
    share = max(1, max_words // max(len(groups), 1))
    center = sum(g.emb for g in groups) / max(sum(g.count for g in groups), 1)   # [d] the text's mean
    lines = []
    for g, texts in zip(groups, outputs):
        d = g.emb / max(g.count, 1) - center                                  # [d] what sets g apart
        src = _toward(g.rows, center, d) if g.rows is not None and len(g.rows) else None   # [count]
        floor = float(np.quantile(src, ON_TOPIC)) if src is not None else np.inf
        cands = [split_sentences(t, language) for t in texts if t and t.strip()]
        where = _first_on_topic(cands, encoder, center, d, floor)
        body = [x for p in g.paragraphs if not p.heading for x in p.sentences]
        if where[0] < floor and ask_again is not None and src is not None and len(body) == len(src):
            keep, words = [], 0
            for k in np.argsort(-src, kind="stable"):                         # most topical first
                if words >= 2 * share:
                    break
                keep.append(int(k))
                words += count_words(body[k])
            again = ask_again(" ".join(body[k] for k in sorted(keep)), share)
            cands.append(split_sentences(again, language) if again and again.strip() else [])
            where = _first_on_topic(cands, encoder, center, d, floor)
        if where[1] is None:
            lines.append("")
            continue
        sents = cands[where[1][0]]
        line = [sents[where[1][1]]]
        for x in sents[where[1][1] + 1:]:
            if count_words(" ".join(line + [x])) > share:
                break
            line.append(x)
        lines.append(" ".join(" ".join(line).split()))
    return lines


def _first_on_topic(cands: list, encoder, center, direction, floor: float):
    """cands [[sentence, ...] per text] -> (score, (text, sentence)) of the first sentence
    scoring >= floor, else of the best one; (-inf, None) when there is none."""
    flat = [(ti, si, x) for ti, sents in enumerate(cands) for si, x in enumerate(sents)]
    if not flat:
        return -np.inf, None
    sc = _toward(encoder.encode([x for _, _, x in flat], progress=False), center, direction)   # [k]
    ok = np.flatnonzero(sc >= floor)
    k = int(ok[0]) if len(ok) else int(np.argmax(sc))
    return float(sc[k]), flat[k][:2]


def _toward(rows, center, direction) -> np.ndarray:
    """rows [k, d] sentence embeddings -> [k] cosine of each (less the text's mean `center`)
    with `direction` [d]."""
    x = np.asarray(rows, dtype=np.float32) - center                          # [k, d]
    dn = direction / max(float(np.linalg.norm(direction)), 1e-12)
    return (x @ dn) / np.maximum(np.linalg.norm(x, axis=1), 1e-12)


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


def tile_sections(sections: list[Section], encoder) -> tuple[list[Section], bool]:
    """Sections cut further at topic boundaries found by tiling (tiling.boundaries on the
    sentences' embeddings): a text without headings, or with fewer than three sections, has
    every long section tiled; a text with three or more only its very long ones. -> (sections,
    whether any was cut)."""
    from .tiling import TILE_MIN, boundaries
    out, cut = [], False
    for sec in sections:
        body = [s for p in sec.paragraphs if not p.heading for s in p.sentences]
        if len(body) < TILE_MIN or (len(sections) >= 3 and len(body) < 3 * TILE_MIN):
            out.append(sec)
            continue
        emb = np.asarray(encoder.encode(body, progress=False), dtype=np.float32)   # [n, d]
        starts = set(boundaries(emb))
        if not starts:
            out.append(sec)
            continue
        cut = True
        pieces, k = [[]], 0                       # list[list[Paragraph]]
        for p in sec.paragraphs:
            if p.heading:
                pieces[-1].append(p)
                continue
            cur: list = []
            for s in p.sentences:
                if k in starts and (cur or any(not q.heading for q in pieces[-1])):
                    if cur:
                        pieces[-1].append(Paragraph(cur))
                        cur = []
                    pieces.append([])
                cur.append(s)
                k += 1
            if cur:
                pieces[-1].append(Paragraph(cur))
        edges = [0] + sorted(starts) + [len(body)]
        sums = [emb[a:z].sum(axis=0) for a, z in zip(edges, edges[1:])]    # [d] per piece, in order
        counts = [z - a for a, z in zip(edges, edges[1:])]
        kept = [ps for ps in pieces if any(not q.heading for q in ps)]
        rows = [emb[a:z] for a, z in zip(edges, edges[1:])]                # [count, d] per piece
        if len(kept) != len(sums):                                         # pieces and sums must pair up
            sums, counts, rows = [None] * len(kept), [0] * len(kept), [None] * len(kept)
        out += [Section(sec.title, ps, emb=e, count=c, rows=r) for ps, e, c, r in zip(kept, sums, counts, rows)]
    return out, cut
