"""Words, language and sentences: count words, guess the language, split text into paragraphs
(headings and list items kept apart) and sentences (pysbd), cut a text to a word budget."""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

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
