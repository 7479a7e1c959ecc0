"""Long texts with headings: sections, topic groups of neighbouring sections, their map chunks,
and sharing a word budget between the groups' sentences."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .chunks import MAP_PROMPT, _Budget, chunk_text
from .segment import Paragraph, _truncate_words, count_words
from .tiling import neighbour_similarity

# ---------------------------------------------------------------------------- sections

WORDS_PER_TOPIC = 12   # the shortest sentence a topic group gets in the final summary


@dataclass
class Section:
    title: str                 # its heading ("" for text before the first heading)
    paragraphs: list           # list[Paragraph]: body text and sub-headings
    parts: list = field(default_factory=list)   # a topic group: the sections it bundles
    emb: object = None         # [d] sum of its body sentences' embeddings (tiled pieces), or None


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
    of size: a small one joins its more similar neighbour, then the most similar neighbouring
    pair (the shallowest topic boundary) merges, so the deepest boundaries are the ones kept."""
    if len(sections) < 2:
        return sections
    most = max(1, max_words // WORDS_PER_TOPIC)
    sections = [Section(_short_title(s.title, b), s.paragraphs, emb=s.emb) for s in sections]
    groups = [Section(s.title, list(s.paragraphs), [s], s.emb) for s in sections]
    size = [sum(b.tokens(x) for p in s.paragraphs for x in p.sentences) for s in groups]

    def merge(i):   # group i absorbs group i + 1; a heading shared by both is named once
        parts = groups[i].parts + groups[i + 1].parts
        titles = dict.fromkeys(s.title for s in parts if s.title)
        e = (None if groups[i].emb is None or groups[i + 1].emb is None
             else groups[i].emb + groups[i + 1].emb)
        groups[i] = Section("; ".join(titles), groups[i].paragraphs + groups[i + 1].paragraphs, parts, e)
        size[i] += size.pop(i + 1)
        groups.pop(i + 1)

    # pieces of one headed section (cut by tiling) are one topic: its heading names it
    i = 0
    while i < len(groups) - 1:
        if groups[i].title and groups[i].parts[-1].title == groups[i + 1].parts[0].title:
            merge(i)
        else:
            i += 1
    by_topic = all(not g.title and g.emb is not None for g in groups)
    if by_topic:   # the text's mean sentence: what every piece shares (speaker names, style)
        n = sum(len(p.sentences) for g in groups for p in g.paragraphs if not p.heading)
        center = sum(g.emb for g in groups) / max(n, 1)                   # [d]
    small = 0.25 * sum(size) / len(size)
    while len(groups) > 1:
        j = min(range(len(groups)), key=lambda k: size[k])
        if len(groups) <= most and size[j] >= small:
            break
        if by_topic:
            sim = neighbour_similarity(np.stack([g.emb for g in groups]), center)   # [len(groups) - 1]
        if size[j] < small:   # a small group: merge it into its smaller (or more similar) neighbour
            if by_topic:
                left = j > 0 and (j == len(groups) - 1 or sim[j - 1] >= sim[j])
            else:
                left = j == len(groups) - 1 or (j > 0 and size[j - 1] <= size[j + 1])
            i = j - 1 if left else j
        elif by_topic:        # too many groups: merge across the shallowest topic boundary
            i = max(range(len(groups) - 1), key=lambda k: sim[k])
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
        kept = [ps for ps in pieces if any(not q.heading for q in ps)]
        sums = sums if len(kept) == len(sums) else [None] * len(kept)      # pieces and sums must pair up
        out += [Section(sec.title, ps, emb=e) for ps, e in zip(kept, sums)]
    return out, cut
