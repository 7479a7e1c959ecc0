"""Talking to the LLM within its context: the prompts, the token budget of one call, packing
sentences into chunks that fit, one guarded call, and cleaning what comes back."""
from __future__ import annotations

import re

from ..llm.repetition import trim_loop
from .segment import Paragraph, _truncate_words

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


# Every LLM call of a summary decodes greedily (a summary should not change from run to run) with
# loop guards: SmolLM2-135M alone answers "The keepers: The keepers: ..." or repeats one phrase
# thirty times. A ban on repeating any 6-token run of its own output (long enough that a name such
# as "the Merrow Coast Authority" may come back) and, after the call, a cut where the text starts
# to loop (llm/repetition.py). No repetition penalty: its window holds the end of the prompt, so it
# pushes the model off the source's own words (the 30k-word hybrid test report: 5 of 8 chapters
# named with a 1.1 penalty, 8 of 8 without).
LOOP_GUARD = dict(temperature=0.0, repetition_penalty=1.0, no_repeat_ngram_size=6)
LOOP_NGRAM, LOOP_TIMES = 4, 2   # trim_loop: a 4-word phrase may occur twice, not three times


def generate(llm, messages: list[dict], max_new_tokens: int) -> str:
    """One guarded LLM call -> its text with any loop cut off."""
    g = llm.chat(messages, max_new_tokens=max_new_tokens, **LOOP_GUARD)
    return trim_loop(g.text, LOOP_NGRAM, LOOP_TIMES)


def unlooped(lines: list[str]) -> list[str]:
    """Lines of one summary, each cut where joining it to the lines before it would loop (a phrase
    that each of several topic lines repeats; llm/repetition.py) -> same length, "" for a line
    that adds nothing but the loop. Each LLM call is trimmed on its own; this guards the join."""
    out, text = [], ""
    for line in lines:
        joined = " ".join(x for x in (text, line) if x)
        kept = trim_loop(joined, LOOP_NGRAM, LOOP_TIMES)           # joined itself when it does not loop
        if kept != joined:                                         # a prefix of joined: keep line's share
            line = kept[len(text):].strip()
            joined = " ".join(x for x in (text, line) if x)
        out.append(line)
        text = joined
    return out


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
