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

A text without headings (or with few, long sections) has its topics found by tiling: where the
MiniLM similarity of the sentence windows either side of a gap drops deeply, a new topic starts
(tiling.py, at least MIN_SENTENCES sentences each). Abstractive then takes the per-topic path
over those segments, hybrid groups its extract by them, and extractive MMR picks one sentence
in every segment first (when the budget allows) before filling the rest.

Every LLM call is greedy with loop guards (chunks.LOOP_GUARD: no repeated 6-token run of the output;
afterwards a looping tail is cut off), since a small model decoded greedily loops.

The package, by job: segment (words, language, paragraphs, sentences), extract (the extractive
path), chunks (prompts, token budgets, chunking, the guarded LLM call), topics (sections and topic
groups of long texts), tiling (topic boundaries of unheaded text), mapreduce (abstractive), rewrite
(hybrid), readers (.txt/.md/.html/.pdf), cli.
"""
from __future__ import annotations

from .mapreduce import _part_words, _reduce, _sectioned, abstractive
from .chunks import (LOOP_GUARD, MAP_PROMPT, REDUCE_PROMPT, SYSTEM, TOPIC_PROMPT, _Budget, _clean,
                     _messages, _progress, _split_long, chunk_text)
from .cli import cmd_summarize
from .extract import (DAMPING, DUPLICATE, LAMBDA_MMR, POSITION, SECTION_SENTENCES, _chapters,
                         _default_encoder, _Doc, _extract, _extract_indexed, _prepare, _rank, extractive,
                         lexrank, mmr_select, position_prior, rank_sentences, similarity)
from .rewrite import HYBRID_FACTOR, hybrid
from .readers import decode_bytes, html_to_text, markdown_to_text, pdf_to_text, read_document
from .segment import (Paragraph, _truncate_words, count_words, detect_language, split_paragraphs,
                      split_sentences)
from .summary import METHODS, Summary
from .topics import WORDS_PER_TOPIC, Section, fit_words, section_chunks, split_sections, topic_groups


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
                           language=language, progress=progress, encoder=encoder)
    return hybrid(text, llm, max_words, encoder=encoder, token_max=token_max,
                  max_new_tokens=max_new_tokens, language=language, progress=progress)
