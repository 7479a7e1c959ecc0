"""Summaries: sentence splitting, readers, LexRank/MMR, map-reduce orchestration, long documents."""
import io
import json
import re
import sys
from argparse import Namespace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from spark_lab import summarize as S
from spark_lab.models import ModelNotFound, resolve

DATA = Path(__file__).parent / "data" / "summaries"


# ------------------------------------------------------------------------------ helpers

@pytest.fixture(scope="module")
def encoder():
    try:
        resolve("all-minilm-l6-v2", kind="embedding")
    except ModelNotFound as e:
        pytest.skip(str(e))
    from spark_lab.text import SentenceEncoder
    return SentenceEncoder.load("all-minilm-l6-v2")


class EchoLLM:
    """A test double for the map-reduce *orchestration* only (chunking, budgets, reduce rounds):
    tokens are whitespace words and a "summary" is the first words of the text it was given.
    It checks that every prompt plus its output budget fits the context. Real-model runs are
    the SmolLM2 tests below."""

    def __init__(self, n_ctx=256):
        self.n_ctx = n_ctx
        self.config = SimpleNamespace(n_ctx=n_ctx)
        self.prompts = []

    def count_tokens(self, text):
        return len(text.split())

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return " ".join(f"<|{m['role']}|> {m['content']} <|end|>" for m in messages) + " <|assistant|>"

    def chat(self, messages, max_new_tokens=128, temperature=0.7, **guards):
        assert temperature == 0.0
        assert guards.get("no_repeat_ngram_size", 0) > 0          # the loop guard
        prompt = self.apply_chat_template(messages)
        used = self.count_tokens(prompt)
        assert used + max_new_tokens <= self.n_ctx, f"{used} prompt + {max_new_tokens} new > {self.n_ctx}"
        self.prompts.append(messages[-1]["content"])
        body = re.split(r"\n\n(?:Text|Summaries):\n", messages[-1]["content"], maxsplit=1)[1]
        return SimpleNamespace(text="Summary: " + " ".join(body.split()[:max_new_tokens // 2]))


REPORT = json.loads((DATA / "long" / "merrow_coast.json").read_text())
SECTIONS = [sec["heading"] for sec in REPORT["sections"]]


def long_document(words=30_000, seed=0, headings=True):
    """A long regional report (tests/data/summaries/long/merrow_coast.json), chapters of seeded
    template sentences (benchmarks.summarize.long_report); headings=False leaves out the title
    and chapter headings."""
    from spark_lab.benchmarks.summarize import long_report
    return long_report(words, seed, headings)


def sections_mentioned(text):
    """Chapters whose key terms (terms that occur in that chapter only) appear in `text`."""
    t = text.lower()
    return [sec["heading"] for sec in REPORT["sections"] if any(re.search(k, t) for k in sec["key_terms"])]


def _norm(text):
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def topics_not_echoed(topics):
    """Chapters whose own group sentence names a key term outside a copy of the chapter's heading
    (a sentence that only repeats "Offshore wind power" does not count)."""
    out = []
    for t in topics:
        said = _norm(t["summary"])
        for h in filter(None, t["topic"].split("; ")):
            said = said.replace(_norm(h), " ")
        out += [h for h in sections_mentioned(said) if h in t["topic"].split("; ")]
    return out


def test_long_document_has_chapters_with_their_own_key_terms():
    text = long_document(30_000)
    assert S.count_words(text) >= 30_000 and text == long_document(30_000)
    parts = re.split(r"(?m)^## (.*)$", text)
    intro, chapters = parts[0], dict(zip(parts[1::2], parts[2::2]))
    assert list(chapters) == SECTIONS and sections_mentioned(intro) == []
    for name, body in chapters.items():
        assert sections_mentioned(body) == [name]          # each chapter names its topic, no other
        assert S.count_words(body) > 2000
    plain = long_document(30_000, headings=False)
    assert "#" not in plain and S.count_words(plain) == S.count_words(text) - S.count_words(
        " ".join(["#", REPORT["title"]] + [f"## {h}" for h in SECTIONS]))


def test_bench_long_times_the_report_headed_and_unheaded():
    """`spark-lab bench summarize --long` (30k words with SmolLM2) in miniature: the same report with
    and without headings, alternating, each run's calls and the chapters its summary names."""
    from spark_lab.benchmarks import summarize as B
    rows = B.long_timing(EchoLLM(n_ctx=1024), repeats=1, words=3000, max_words=80)
    assert [r["headed"] for r in rows] == [True, False]
    assert all(r["words_in"] >= 3000 and r["llm_calls"] >= 2 and r["seconds"] > 0 for r in rows)
    assert all(0 <= r["chapters"] <= r["of"] == len(SECTIONS) for r in rows)
    assert [r["chapters"] for r in rows] == [len(sections_mentioned(r["text"])) for r in rows]
    assert rows[0]["chapters"] >= 4          # the echo keeps chapters' headings and first words


# ------------------------------------------------------------------------------ splitting

def test_english_abbreviations_and_decimals():
    text = "Dr. Smith paid $3.50 for the U.S. edition. It was cheap, e.g. for a student! Was it? Yes."
    assert S.split_sentences(text) == ["Dr. Smith paid $3.50 for the U.S. edition.",
                                       "It was cheap, e.g. for a student!", "Was it?", "Yes."]


def test_hindi_danda_and_other_scripts():
    hi = "भारत एक विशाल देश है। यहाँ कई भाषाएँ बोली जाती हैं। डॉ. शर्मा ने 3.5 किलो आम खरीदे।"
    assert S.detect_language(hi) == "hi"
    assert S.split_sentences(hi) == ["भारत एक विशाल देश है।", "यहाँ कई भाषाएँ बोली जाती हैं।",
                                     "डॉ. शर्मा ने 3.5 किलो आम खरीदे।"]
    assert S.detect_language("東京は日本の首都です。大阪は大きい都市です。") == "ja"
    assert S.detect_language("Это первая фраза. Это вторая фраза.") == "ru"
    assert S.detect_language("Der Hund ist nicht im Haus, er ist mit der Katze auf dem Dach.") == "de"
    assert S.detect_language("The dog is not in the house; it is on the roof with the cat.") == "en"
    assert S.split_sentences("Это первая фраза. Это вторая фраза.") == ["Это первая фраза.", "Это вторая фраза."]
    assert S.count_words("東京は首都") == 5 and S.count_words("one two  three") == 3


def test_paragraphs_headings_and_lists():
    text = ("# Title here\n\nFirst paragraph, line one\ncontinues here. Second sentence.\n\n"
            "- item one\n- item two\n\nLast paragraph.")
    paras = S.split_paragraphs(text)
    assert [p.heading for p in paras] == [True, False, False, False, False]
    assert paras[0].sentences == ["Title here"]
    assert paras[1].sentences == ["First paragraph, line one continues here.", "Second sentence."]
    assert [p.sentences for p in paras[2:]] == [["item one"], ["item two"], ["Last paragraph."]]


def test_long_paragraph_precut_keeps_sentences_whole():
    sents = [f"Dr. Jones measured {i}.5 litres in sample number {i} of the study." for i in range(300)]
    text = " ".join(sents)
    assert S.split_sentences(text) == sents


# ------------------------------------------------------------------------------ readers

def test_readers(tmp_path, monkeypatch):
    doc = S.read_document(DATA / "03_harwick_bike_lane.html")
    assert "Mill Road" in doc and "ignore me" not in doc and "font-family" not in doc
    assert "Home | News" not in doc                          # <nav> is not prose
    assert "“We want our kids" in doc                       # entities decoded
    assert doc.startswith("# Harwick council approves")      # <h1> becomes a heading, <head> dropped
    md = S.read_document(DATA / "02_lighthouses.md")
    assert md.startswith("# How lighthouses") and "## The Fresnel lens" in md
    p = tmp_path / "x.md"
    p.write_text("Read [the docs](http://x.y) and **this**.\n\n```\ncode()\n```\n")
    assert S.read_document(p).strip() == "Read the docs and this."
    p = tmp_path / "bom.txt"
    p.write_bytes("\ufeffHello there.".encode("utf-8"))
    assert S.read_document(p) == "Hello there."
    p.write_bytes("Hello there.".encode("utf-16"))
    assert S.read_document(p) == "Hello there."
    monkeypatch.setattr(sys, "stdin", SimpleNamespace(buffer=io.BytesIO(b"From stdin. Two.")))
    assert S.read_document("-") == "From stdin. Two."


def test_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        S.read_document(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_bytes(b"  \n")
    with pytest.raises(ValueError, match="empty"):
        S.read_document(tmp_path / "empty.txt")
    (tmp_path / "b.txt").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="binary"):
        S.read_document(tmp_path / "b.txt")
    (tmp_path / "l1.txt").write_bytes("café au lait".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8.*offset 3"):
        S.read_document(tmp_path / "l1.txt")
    (tmp_path / "s.html").write_text("<html><script>x()</script></html>")
    with pytest.raises(ValueError, match="no text"):
        S.read_document(tmp_path / "s.html")
    with pytest.raises(ValueError, match="folder"):
        S.read_document(tmp_path)


# ------------------------------------------------------------------------------ ranking

def test_lexrank_is_the_pagerank_stationary_vector():
    rng = np.random.default_rng(0)
    e = rng.standard_normal((12, 8)).astype(np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    sim = e @ e.T
    r = S.lexrank(sim)
    assert r.dtype == np.float32
    # by definition: the eigenvector of G = d P + (1 - d)/n for eigenvalue 1 (float64 reference)
    w = np.clip(sim.astype(np.float64), 0, None)
    np.fill_diagonal(w, 0)
    P = w / w.sum(1, keepdims=True)
    G = S.DAMPING * P + (1 - S.DAMPING) / 12
    vals, vecs = np.linalg.eig(G.T)
    ref = np.real(vecs[:, np.argmin(np.abs(vals - 1))])
    ref /= ref.sum()
    np.testing.assert_allclose(r, ref, atol=1e-6)
    assert S.similarity(e).dtype == np.float32
    np.testing.assert_allclose(S.similarity(e), sim, atol=1e-6)


def test_mmr_skips_duplicates_and_keeps_document_order():
    e = np.eye(4, dtype=np.float32)
    e = np.vstack([e[0], e[0], e[1], e[2]])       # sentences 0 and 1 say the same thing
    rel = np.array([1.0, 0.99, 0.5, 0.4], dtype=np.float32)
    assert S.mmr_select(e, rel, np.array([5, 5, 5, 5]), max_words=10) == [0, 2]
    assert S.mmr_select(e, rel, np.array([5, 5, 5, 5]), max_words=100) == [0, 2, 3]  # never a repeat
    assert S.mmr_select(e, rel, np.array([20, 5, 5, 5]), max_words=10) == [1, 2]   # 0 is too long


def test_sectioned_ranking_covers_every_section():
    rng = np.random.default_rng(1)
    centers = rng.standard_normal((5, 16))
    emb = np.vstack([c + 0.3 * rng.standard_normal((120, 16)) for c in centers]).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    sections = np.repeat(np.arange(5), 120)
    rel = S.rank_sentences(emb, sections, limit=100)
    assert rel.shape == (600,) and rel.dtype == np.float32 and 0 <= rel.min() and rel.max() <= 1
    picks = S.mmr_select(emb, rel, np.full(600, 10), max_words=60)
    assert len({int(sections[i]) for i in picks}) >= 4


# ------------------------------------------------------------------------------ extractive (real MiniLM)

def test_extractive_on_a_document(encoder):
    text = S.read_document(DATA / "04_coral_bleaching.txt")
    a = S.summarize(text, "extractive", max_words=100, encoder=encoder, progress=False)
    b = S.summarize(text, "extractive", max_words=100, encoder=encoder, progress=False)
    assert a.text == b.text and a.sentences == b.sentences            # deterministic
    assert 40 <= a.words_out <= 100 and a.words_in == S.count_words(text)
    positions = [text.index(s) for s in a.sentences]
    assert positions == sorted(positions)                              # document order
    assert "coral" in a.text.lower() and "algae" in a.text            # the document's subject
    assert a.method == "extractive" and a.seconds > 0


def test_extractive_edge_cases(encoder):
    one = "Only one sentence here, and it is rather long for a summary of five words."
    s = S.summarize(one, max_words=5, encoder=encoder, progress=False)
    assert s.text == one                                               # one sentence: as it is
    short = "First point. Second point is here. Third point."
    assert S.summarize(short, max_words=50, encoder=encoder).text == short
    long_sents = "A " + "very " * 60 + "long sentence. Another " + "quite " * 50 + "long sentence."
    cut = S.summarize(long_sents, max_words=20, encoder=encoder, progress=False)
    assert cut.words_out <= 21
    with pytest.raises(ValueError, match="empty"):
        S.summarize("   \n ")
    with pytest.raises(ValueError, match="method"):
        S.summarize("Hi.", method="magic")
    with pytest.raises(ValueError, match="need an LLM"):
        S.summarize("One. Two.", method="abstractive")


# ------------------------------------------------------------------------------ abstractive orchestration

@pytest.fixture
def untiled(monkeypatch):
    """Plain map-reduce on an unheaded text: no MiniLM for topic tiling (as where it is not
    installed), so the text is one topic; the tiled path is tested in test_segment_topics.py."""
    monkeypatch.setattr(sys.modules["spark_lab.summarize.mapreduce"], "_tiling_encoder", lambda: None)


def test_map_reduce_chunks_fit_and_cover_the_text(untiled):
    text = long_document(3000, seed=1, headings=False)
    llm = EchoLLM(n_ctx=256)
    s = S.summarize(text, "abstractive", max_words=40, llm=llm, progress=False)
    assert s.chunks > 10 and len(s.partials) == s.chunks
    assert s.rounds, "partials did not fit token_max: there must be reduce rounds"
    assert s.llm_calls == len(llm.prompts) == s.chunks + sum(len(r) for r in s.rounds) + 1
    # every sentence of the document went into the map prompts as often as it occurs
    map_prompts = llm.prompts[:s.chunks]
    for p in S.split_paragraphs(text):
        for sent in p.sentences:
            assert sum(m.count(sent) for m in map_prompts) == text.count(sent)
    assert s.words_out <= 40 and not s.text.startswith("Summary:") and s.topics == []


def test_sections_become_topic_groups():
    paras = S.split_paragraphs("# Title\n\nIntro text here.\n\n## A\n\nAlpha one. Alpha two.\n\n"
                               "### A.1\n\nAlpha three.\n\n## B\n\nBeta one.\n\n## Empty\n\n## C\n\nGamma.")
    assert [(p.heading, p.level) for p in paras[:3]] == [(True, 1), (False, 0), (True, 2)]
    secs = S.split_sections(paras)
    assert [x.title for x in secs] == ["", "A", "B", "C"]          # title dropped, empty chapter too
    assert [q.sentences for q in secs[1].paragraphs] == [["Alpha one.", "Alpha two."], ["A.1"], ["Alpha three."]]
    assert [x.title for x in S.split_sections(S.split_paragraphs("# Only\n\nText."))] == [""]
    b = S._Budget(EchoLLM(512), 150, 32, None)
    text = long_document(6000)
    secs = S.split_sections(S.split_paragraphs(text))
    assert [x.title for x in secs] == [""] + SECTIONS               # the introduction, then chapters
    g8 = S.topic_groups(secs, b, max_words=150)                      # 12 allowed: the short intro joins
    assert [g.title for g in g8] == SECTIONS                         # its neighbour, chapters stay whole
    g3 = S.topic_groups(secs, b, max_words=40)                       # 3 allowed: neighbours merge
    assert len(g3) == 3 and "; ".join(g.title for g in g3) == "; ".join(SECTIONS)
    assert sum(len(g.paragraphs) for g in g3) == sum(len(x.paragraphs) for x in secs)
    assert S.fit_words(["one two three", "a b c d e f g h i j"], 8) == ["one two three", "a b c d …"]
    assert S.fit_words(["First one. Then more words here", "x y"], 5) == ["First one.", "x y"]
    echo = [{"topic": "Offshore wind power", "summary": "Offshore wind power."},
            {"topic": "The port of Gullhaven; Homes and the cost of housing", "summary": "The port handled grain."}]
    assert topics_not_echoed(echo) == ["The port of Gullhaven"] and sections_mentioned(echo[0]["summary"])


def test_sectioned_map_reduce_one_sentence_per_topic_group():
    text = long_document(3000, seed=1)
    llm = EchoLLM(n_ctx=256)
    s = S.summarize(text, "abstractive", max_words=40, llm=llm, progress=False)
    groups = [t["topic"] for t in s.topics]
    assert len(groups) == 40 // S.WORDS_PER_TOPIC and "; ".join(groups) == "; ".join(SECTIONS)
    assert s.chunks > 10 and len(s.partials) == s.chunks == sum(t["chunks"] for t in s.topics)
    assert s.llm_calls == len(llm.prompts) == s.chunks + sum(len(r) for r in s.rounds)
    # a map chunk starts with the heading of its chapter and holds sentences of the chapters whose
    # headings it carries, all in one topic group
    parts = re.split(r"(?m)^## (.*)$", text)
    chapter_of = {x: h for h, body in zip(parts[1::2], parts[2::2]) for p in S.split_paragraphs(body)
                  for x in p.sentences}
    for prompt in llm.prompts[:s.chunks]:
        body = prompt.split("\n\nText:\n", 1)[1]
        heads = re.findall(r"(?m)^# (.*)$", body)
        inside = {h for x, h in chapter_of.items() if x in body}
        assert inside <= set(heads) and any(set(heads) <= set(t.split("; ")) for t in groups)
        assert body.startswith("# ") or body in parts[0]                # or the introduction
    for sent in chapter_of:                                          # every sentence mapped
        assert sum(m.count(sent) for m in llm.prompts[:s.chunks]) == text.count(sent)
    assert s.words_out <= 40 and s.text == " ".join(t["summary"] for t in s.topics if t["summary"])


def test_token_max_controls_reduce_and_no_progress_is_handled(untiled):
    text = long_document(2000, seed=2, headings=False)
    loose = S.summarize(text, "abstractive", max_words=30, llm=EchoLLM(512), progress=False)
    tight = S.summarize(text, "abstractive", max_words=30, llm=EchoLLM(512), token_max=60, progress=False)
    assert len(tight.rounds) > len(loose.rounds)
    # a single over-long "sentence" is cut into pieces that fit
    s = S.summarize("word " * 2000, "abstractive", max_words=20, llm=EchoLLM(200), progress=False)
    assert s.chunks >= 12
    with pytest.raises(ValueError, match="context of 100 tokens"):
        S.summarize(text, "abstractive", max_words=30, llm=EchoLLM(100), progress=False)


def test_hybrid_extracts_what_fits_then_rewrites(encoder):
    text = S.read_document(DATA / "06_drinking_water.txt")
    llm = EchoLLM(n_ctx=300)
    s = S.summarize(text, "hybrid", max_words=60, llm=llm, encoder=encoder, progress=False)
    # the article has no headings: its topics, found by tiling, get one rewrite call each, and a
    # topic whose rewrite is off topic one more (topics.topical_lines; the echo starts mid-way)
    assert s.method == "hybrid" and s.chunks == len(s.topics) >= 3
    assert s.chunks <= s.llm_calls == len(llm.prompts) <= 2 * s.chunks
    assert sum(S.count_words(x) for x in s.sentences) <= S.HYBRID_FACTOR * 60
    assert all(x in text for x in s.sentences)
    assert s.words_out <= 60


def test_hybrid_long_text_with_chapters_one_sentence_per_group(encoder):
    text = long_document(3000, seed=4)
    llm = EchoLLM(n_ctx=512)
    s = S.summarize(text, "hybrid", max_words=40, llm=llm, encoder=encoder, progress=False)
    assert s.method == "hybrid" and s.llm_calls == len(llm.prompts) == s.chunks == len(s.topics) >= 2
    named = [h for t in s.topics for h in t["topic"].split("; ") if h]
    assert named == [h for h in SECTIONS if h in named]                    # chapters, in order
    assert all(x in text for x in s.sentences) and s.words_out <= 40
    assert s.text == " ".join(t["summary"] for t in s.topics if t["summary"])
    parts = re.split(r"(?m)^## (.*)$", text)
    for prompt, t in zip(llm.prompts, s.topics):       # each prompt: its group's extract only
        body = prompt.split("\n\nText:\n", 1)[1]
        assert body.startswith("# " + t["topic"]) if t["topic"] else not body.startswith("#")
        mine = [b for h, b in zip(parts[1::2], parts[2::2]) if h in t["topic"].split("; ")] or [parts[0]]
        assert all(any(x in b for b in mine) for x in s.sentences if x in body)
    assert sum(sum(x in p for p in llm.prompts) for x in s.sentences) == len(s.sentences)


# ------------------------------------------------------------------------------ long documents

def test_long_document_map_reduce_fits_the_context():
    text = long_document(30_000)
    llm = EchoLLM(n_ctx=2048)
    s = S.summarize(text, "abstractive", max_words=150, llm=llm, progress=False)
    assert s.words_in >= 30_000 and s.chunks >= 15 and s.words_out <= 150
    assert [t["topic"] for t in s.topics] == SECTIONS
    assert sections_mentioned(" ".join(s.partials)) == SECTIONS


@pytest.mark.slow
def test_long_document_extractive(encoder):
    text = long_document(30_000)
    s = S.summarize(text, "extractive", max_words=150, encoder=encoder, progress=False)
    print(f"\nextractive 30k words: {s.seconds:.1f} s, {s.words_per_second:.0f} words/s, "
          f"chapters {len(sections_mentioned(s.text))}/{len(SECTIONS)}")
    assert s.words_out <= 150 and all(x in text for x in s.sentences)
    assert len(sections_mentioned(s.text)) >= 6


# ------------------------------------------------------------------------------ CLI

def test_cmd_summarize(encoder, capsys, monkeypatch):
    monkeypatch.setattr(sys.modules["spark_lab.summarize.extract"], "_default_encoder",
                        lambda name="all-minilm-l6-v2": encoder)
    args = Namespace(file=str(DATA / "05_lumenfold_quarter.txt"), model=None, method="extractive",
                     max_words=60, json=True)
    assert S.cmd_summarize(args) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["method"] == "extractive" and d["words_out"] <= 60 and d["words_in"] > 300
    args.json = False
    assert S.cmd_summarize(args) == 0
    assert capsys.readouterr().out.strip() == d["text"]


# ------------------------------------------------------------------------------ real LLM (SmolLM2)

@pytest.fixture(scope="module")
def smollm():
    llm_mod = pytest.importorskip("spark_lab.llm")
    try:
        return llm_mod.LLM.load("smollm2-135m-instruct", n_ctx=512)
    except ModelNotFound as e:
        pytest.skip(str(e))


def test_abstractive_smollm2_short(smollm):
    text = ("The library will close for two weeks in August so that workers can replace the old roof. "
            "Books can still be returned through the slot by the front door.")
    s = S.summarize(text, "abstractive", max_words=20, llm=smollm, max_new_tokens=12, progress=False)
    assert s.chunks == 1 and s.llm_calls == 1 and 0 < s.words_out <= 20
    assert len(smollm.tokenizer.encode(s.text, add_bos=False)) <= 12 + 2


@pytest.mark.slow
def test_abstractive_smollm2_map_reduce(smollm, untiled):
    text = long_document(2500, seed=3, headings=False)
    s = S.summarize(text, "abstractive", max_words=30, llm=smollm, max_new_tokens=24, progress=False)
    print(f"\nSmolLM2 map-reduce {s.words_in} words: {s.chunks} chunks, {s.llm_calls} calls, {s.seconds:.0f} s")
    # every chunk mapped, every reduce round run, then one final combine of what was left
    assert s.chunks >= 4 and 0 < s.words_out <= 30
    assert s.llm_calls == s.chunks + sum(len(r) for r in s.rounds) + 1


@pytest.mark.slow
def test_long_document_abstractive_smollm2(capsys):
    """30k words through SmolLM2 at n_ctx 2048, 32 new tokens per call: 26 map calls, 8 topic
    calls, 40k prompt tokens; about 4 minutes on one quiet CPU thread (7-11 on a loaded one)."""
    llm_mod = pytest.importorskip("spark_lab.llm")
    try:
        llm = llm_mod.LLM.load("smollm2-135m-instruct", n_ctx=2048)
    except ModelNotFound as e:
        pytest.skip(str(e))
    used, chat = [], llm.chat

    def counted(messages, **kw):   # every prompt plus its output budget, in real tokens
        used.append(len(llm.encode_chat(messages)) + kw["max_new_tokens"])
        return chat(messages, **kw)

    llm.chat = counted
    text = long_document(30_000)
    s = S.summarize(text, "abstractive", max_words=150, llm=llm, max_new_tokens=32, progress=True)
    err = capsys.readouterr().err
    covered = sections_mentioned(s.text)
    print(f"\nSmolLM2 30k words: {s.chunks} chunks, {s.llm_calls} calls, {s.seconds:.0f} s, largest prompt "
          f"+ output {max(used)}/{llm.n_ctx} tokens, chapters {len(covered)}/{len(SECTIONS)} "
          f"({len(topics_not_echoed(s.topics))} without echoing a heading)\n{s.text}")
    assert "map:" in err and "topics:" in err                       # tqdm bars on stderr
    assert s.words_in >= 30_000 and s.chunks >= 15 and len(used) == s.llm_calls
    assert max(used) <= llm.n_ctx
    assert 0 < s.words_out <= 150 and [t["topic"] for t in s.topics] == SECTIONS
    assert len(covered) >= 6, f"the summary names {covered} of {SECTIONS}"


@pytest.mark.slow
def test_long_document_hybrid_smollm2(encoder):
    """30k words: MiniLM ranks every sentence (most of the time), then one SmolLM2 call per topic group."""
    llm_mod = pytest.importorskip("spark_lab.llm")
    try:
        llm = llm_mod.LLM.load("smollm2-135m-instruct", n_ctx=2048)
    except ModelNotFound as e:
        pytest.skip(str(e))
    text = long_document(30_000)
    s = S.summarize(text, "hybrid", max_words=150, llm=llm, encoder=encoder, max_new_tokens=96, progress=False)
    covered = sections_mentioned(s.text)
    print(f"\nhybrid 30k words: {s.seconds:.0f} s, {s.llm_calls} call(s), extract {len(s.sentences)} sentences "
          f"(chapters {len(sections_mentioned(' '.join(s.sentences)))}), summary chapters {len(covered)}/{len(SECTIONS)} "
          f"({len(topics_not_echoed(s.topics))} without echoing a heading)\n{s.text}")
    assert s.words_in >= 30_000 and s.llm_calls == s.chunks == len(s.topics) and 0 < s.words_out <= 150
    assert all(x in text for x in s.sentences)
    assert sum(S.count_words(x) for x in s.sentences) <= S.HYBRID_FACTOR * 150
    assert len(covered) >= 6, f"the summary names {covered} of {SECTIONS}"


def test_cli_errors_are_one_line(tmp_path, capsys):
    from spark_lab.cli import main
    assert main(["summarize", str(tmp_path / "missing.txt")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no such file" in err
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02 binary")
    assert main(["summarize", str(tmp_path / "bin.txt")]) == 1
    assert "binary" in capsys.readouterr().err


# ------------------------------------------------------------------------------ evaluation set

def test_evaluation_set_and_rouge():
    pytest.importorskip("rouge_score")
    from spark_lab.benchmarks import summarize as B
    docs = B.load_documents()
    assert len(docs) >= 5
    for d in docs:
        assert 300 <= S.count_words(d["text"]) <= 2500 and 60 <= S.count_words(d["reference"]) <= 150
    same = B.rouge(docs[0]["reference"], docs[0]["reference"])
    assert same == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    rows = B.evaluate(("lead",), docs[:2])
    assert [r["words_out"] for r in rows] == [S.count_words(d["reference"]) for d in docs[:2]]
    assert 0.2 < rows[0]["rouge1"] < 1.0
    assert "lead" in B.format_table(B.table(rows))


def test_unlooped_cuts_a_phrase_that_the_joined_topic_lines_repeat():
    """Each LLM call is trimmed on its own; three topic lines that each repeat a 4-word phrase loop
    only when joined (found under SPARK_LAB_DEVICE=strict on the README's hybrid summary)."""
    from spark_lab.llm.repetition import has_loop
    from spark_lab.summarize.chunks import unlooped
    lines = ["The spark lab benchmark is fast.", "It runs the spark lab benchmark on GPUs.",
             "Then the spark lab benchmark again, more.", "A clean line."]
    out = unlooped(lines)
    assert has_loop(" ".join(lines)) and not has_loop(" ".join(x for x in out if x))
    assert out == lines[:2] + ["", "A clean line."]
    assert unlooped(["One line.", "", "Two lines."]) == ["One line.", "", "Two lines."]
