"""Topic segmentation of unheaded text (summarize/tiling.py), topic coverage of every method on
the unheaded evaluation documents (tests/data/summaries/unheaded/), and PDF input."""
import json
import zlib

import numpy as np
import pytest

from spark_lab import summarize as S
from spark_lab.benchmarks import summarize as B
from spark_lab.models import ModelNotFound
from spark_lab.summarize import tiling as T

from .test_summarize import EchoLLM, encoder  # noqa: F401  (encoder is a fixture)


class _Cached:
    """The MiniLM encoder with a per-sentence cache: every summary of the set embeds the same
    sentences, and the tests should take seconds."""

    def __init__(self, enc):
        self.enc, self.memo = enc, {}

    def encode(self, sentences, progress=False):
        new = [s for s in dict.fromkeys(sentences) if s not in self.memo]
        if new:
            self.memo.update(zip(new, self.enc.encode(new, progress=False)))
        return np.array([self.memo[s] for s in sentences], dtype=np.float32).reshape(len(sentences), -1)


@pytest.fixture(scope="module")
def cached(encoder):  # noqa: F811
    return _Cached(encoder)


def _blocks(sizes, d=16, seed=0, noise=0.3):
    """Unit embeddings [sum(sizes), d]: each block of sentences near its own random direction."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in sizes:
        c = rng.standard_normal(d)
        rows += [c + noise * np.linalg.norm(c) / np.sqrt(d) * rng.standard_normal(d) for _ in range(n)]
    e = np.array(rows, dtype=np.float32)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def test_gap_similarity_is_the_cosine_of_window_means():
    e = _blocks([6, 6], noise=0.5)
    sim = T.gap_similarity(e, window=2)
    assert sim.shape == (11,)
    l, r = e[3:5].sum(0), e[5:7].sum(0)          # gap 4: sentences 3-4 | 5-6
    assert sim[4] == pytest.approx(l @ r / np.linalg.norm(l) / np.linalg.norm(r), abs=1e-6)
    assert int(np.argmin(sim)) == 5               # the drop lies between the blocks


def test_depth_scores_climb_both_sides():
    sim = np.array([0.9, 0.5, 0.8, 0.7, 0.2, 0.6, 0.95])
    d = T.depth_scores(sim)
    # gap 4: left climbs 0.2 -> 0.7 -> 0.8 (stops at 0.5), right 0.2 -> 0.6 -> 0.95
    assert d[4] == pytest.approx((0.8 - 0.2) + (0.95 - 0.2))
    assert d[1] == pytest.approx((0.9 - 0.5) + (0.8 - 0.5)) and d[0] == 0.0 and d[6] == 0.0


def test_boundaries_on_blocks_and_minimum_length():
    e = _blocks([9, 12, 8, 10])
    assert T.boundaries(e) == [9, 21, 29]
    assert T.segment_ids(6, [2, 4]).tolist() == [0, 0, 1, 1, 2, 2]
    # a 2-sentence aside is not a topic: every segment keeps min_sentences
    e2 = _blocks([14, 2, 14], seed=1)
    got = T.boundaries(e2, cfg=T.TilingConfig(min_sentences=5))
    edges = [0] + got + [30]
    assert got and all(b - a >= 5 for a, b in zip(edges, edges[1:]))
    assert T.boundaries(_blocks([10, 10])[:T.TILE_MIN - 1]) == []   # too short to tile


def test_boundary_hits_and_coverage_measures():
    assert B.boundary_hits([7, 15, 30], [8, 15, 22]) == 2
    assert B.boundary_hits([8], [7, 9]) == 1                       # one found boundary, matched once
    topics = [{"key_terms": ["pool", "swim"]}, {"key_terms": ["snow"]}]
    assert B.coverage("Swimming lessons start.", topics) == 0.5
    assert B.coverage("A pool; snowfall.", topics) == 1.0
    assert B.coverage("Carpool lanes.", topics) == 0.0             # key terms start a word


# ------------------------------------------------------------------------------ the evaluation set

def test_unheaded_documents_record_their_topics():
    docs = B.load_unheaded()
    assert len(docs) >= 3
    for d in docs:
        sents = [s for p in S.split_paragraphs(d["text"], "en") for s in p.sentences]
        assert len(sents) == d["sentences"] and "#" not in d["text"] and len(d["topics"]) >= 3
        for t in d["topics"]:
            assert sents[t["first_sentence"]].startswith(t["starts_with"])
            # the key terms of a topic occur in its own stretch of text
            end = min([u["first_sentence"] for u in d["topics"] if u["first_sentence"] > t["first_sentence"]]
                      + [len(sents)])
            assert B.coverage(" ".join(sents[t["first_sentence"]:end]), [t]) == 1.0


def test_unheaded_boundaries_found_within_two_sentences(cached):
    rows = B.segmentation(encoder=cached)
    hits, total = sum(r["hits"] for r in rows), sum(len(r["true"]) for r in rows)
    print("\n" + "\n".join(f"{r['doc']}: true {r['true']} found {r['found']}" for r in rows))
    assert total >= 9 and hits / total >= 0.8
    assert all(len(r["found"]) <= 2 * len(r["true"]) for r in rows)   # not a boundary everywhere


def test_unheaded_topic_coverage_extractive(cached):
    rows = B.evaluate_coverage(("lead", "extractive"), encoder=cached)
    cov = {m: np.mean([r["coverage"] for r in rows if r["method"] == m]) for m in ("lead", "extractive")}
    assert cov["extractive"] >= 0.9 and cov["lead"] < 0.5           # lead reads only the first topic
    for r in rows:
        assert r["words_out"] <= B.TOPIC_WORDS * r["topics"]


def test_unheaded_topic_coverage_abstractive_and_hybrid_orchestration(cached):
    """With the echoing double, a summary names a topic only when the orchestration gave that
    topic its own LLM call (tiling found it and the per-topic path ran); the double echoes the
    first words of a group, so a boundary found a sentence late can hide a topic's name."""
    for d in B.load_unheaded():
        budget = B.TOPIC_WORDS * len(d["topics"])
        for method in ("abstractive", "hybrid"):
            s = S.summarize(d["text"], method, max_words=budget, llm=EchoLLM(n_ctx=256), encoder=cached,
                            progress=False)
            assert len(s.topics) == len(d["topics"]) and 0 < s.words_out <= budget, (d["name"], method)
            assert B.coverage(s.text, d["topics"]) >= 0.75, (d["name"], method, s.text)
        # a context that holds the whole text: still one LLM call per topic found
        llm = EchoLLM(n_ctx=4096)
        s = S.summarize(d["text"], "abstractive", max_words=budget, llm=llm, encoder=cached, progress=False)
        assert s.chunks == len(d["topics"]) and s.llm_calls == len(d["topics"]) == len(llm.prompts)


@pytest.mark.slow
def test_unheaded_topic_coverage_smollm2(cached):
    """SmolLM2-135M on the unheaded set: every method names >= 90% of the topics (about 2 min)."""
    llm_mod = pytest.importorskip("spark_lab.llm")
    try:
        llm = llm_mod.LLM.load("smollm2-135m-instruct", n_ctx=2048)
    except ModelNotFound as e:
        pytest.skip(str(e))
    rows = B.evaluate_coverage(("abstractive", "hybrid"), llm=llm, encoder=cached)
    for m in ("abstractive", "hybrid"):
        cov = np.mean([r["coverage"] for r in rows if r["method"] == m])
        print(f"\n{m}: coverage {cov:.3f}")
        assert cov >= 0.9, [r["text"] for r in rows if r["method"] == m]


# ------------------------------------------------------------------------------ PDF input

def _pdf(pages: list[list[str]]) -> bytes:
    """A minimal valid PDF: one Helvetica text line per string, xref offsets counted."""
    objs = ["<< /Type /Catalog /Pages 2 0 R >>", None, "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for lines in pages:
        ops = "BT /F1 11 Tf 72 720 Td 14 TL " + " ".join(
            "(" + ln.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ") Tj T*" for ln in lines) + " ET"
        data = zlib.compress(ops.encode("latin-1"))
        objs.append(f"<< /Length {len(data)} /Filter /FlateDecode >>".encode() + b"\nstream\n" + data + b"\nendstream")
        objs.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {len(objs)} 0 R "
                    f"/Resources << /Font << /F1 3 0 R >> >> >>")
        kids.append(len(objs))
    objs[1] = f"<< /Type /Pages /Kids [{' '.join(f'{k} 0 R' for k in kids)}] /Count {len(kids)} >>"
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, o in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n".encode() + (o if isinstance(o, bytes) else o.encode()) + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{x:010d} 00000 n \n" for x in offsets).encode()
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def test_pdf_input(tmp_path):
    pytest.importorskip("pypdf")
    p = tmp_path / "report.pdf"
    p.write_bytes(_pdf([["The new swimming pool opened on Mill Road in", "March and has six lanes.",
                         "Lessons are free for pupils."],
                        ["Snow clearing starts with school streets."]]))
    text = S.read_document(p)
    paras = [" ".join(x.sentences) for x in S.split_paragraphs(text, "en")]
    assert paras == ["The new swimming pool opened on Mill Road in March and has six lanes.",
                     "Lessons are free for pupils.", "Snow clearing starts with school streets."]
    (tmp_path / "noext").write_bytes(p.read_bytes())                # sniffed by its %PDF- header
    assert S.read_document(tmp_path / "noext") == text


def test_pdf_bad_input_is_one_line(tmp_path, capsys):
    pytest.importorskip("pypdf")
    from spark_lab.cli import main
    bad = {"empty.pdf": b"", "broken.pdf": b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n",
           "blank.pdf": _pdf([[]])}
    want = {"empty.pdf": "is empty", "broken.pdf": "not a readable PDF", "blank.pdf": "no text layer"}
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=want[name]):
            S.read_document(tmp_path / name)
        assert main(["summarize", str(tmp_path / name)]) == 1
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and want[name] in err, err
