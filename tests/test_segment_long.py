"""Long unheaded documents (tests/data/summaries/unheaded_long/, about 3,000 words and 4-5 topics
each): tiling over-segments them, and merging the most similar neighbouring pieces
(tiling.merge_similar, topics.topic_groups) keeps the true topic boundaries."""
import numpy as np

from spark_lab import summarize as S
from spark_lab.benchmarks import summarize as B
from spark_lab.summarize import tiling as T
from spark_lab.summarize.chunks import _Budget

from .test_segment_topics import _blocks, cached  # noqa: F401  (cached is a fixture)
from .test_summarize import EchoLLM, encoder  # noqa: F401  (encoder is a fixture)


def _long():
    return B.load_unheaded(B.data_dir() / "unheaded_long")


def test_merge_similar_drops_the_shallowest_boundaries():
    e = _blocks([12, 10, 14], seed=3)
    over = [6, 12, 17, 22, 29]                        # tiling cut every few sentences
    assert T.merge_similar(e, over, 3) == [12, 22]    # only the block edges stay
    assert T.merge_similar(e, over, 1) == [] and T.merge_similar(e, [12, 22], 5) == [12, 22]
    sim = T.neighbour_similarity(np.stack([e[:12].sum(0), e[12:22].sum(0), e[22:].sum(0)]), e.mean(0))
    assert sim.shape == (2,) and sim.dtype == np.float32 and (sim < 0.5).all()


def test_long_unheaded_documents_record_their_topics():
    docs = _long()
    assert len(docs) == 3
    for d in docs:
        sents = [s for p in S.split_paragraphs(d["text"], "en") for s in p.sentences]
        assert len(sents) == d["sentences"] and d["words"] >= 2800 and "#" not in d["text"]
        assert 4 <= len(d["topics"]) <= 6
        firsts = [t["first_sentence"] for t in d["topics"]]
        for t, end in zip(d["topics"], firsts[1:] + [len(sents)]):
            assert sents[t["first_sentence"]].startswith(t["starts_with"])
            assert B.coverage(" ".join(sents[t["first_sentence"]:end]), [t]) == 1.0


def _group_starts(d, enc, by_topic=True):
    """Sentence index where every topic group after the first starts (the coverage budget)."""
    paras = S.split_paragraphs(d["text"], "en")
    secs, _ = S.topics.tile_sections(S.split_sections(paras), enc)
    if not by_topic:                                  # the size-only merge of before
        for s in secs:
            s.emb = None
    words = B.TOPIC_WORDS * len(d["topics"])
    groups = S.topic_groups(secs, _Budget(EchoLLM(n_ctx=2048), words, None, None), words)
    n = [sum(len(p.sentences) for p in g.paragraphs if not p.heading) for g in groups]
    return [int(x) for x in np.cumsum(n)[:-1]]


def test_long_unheaded_topic_groups_keep_the_true_boundaries(cached):
    rows = []
    for d in _long():
        true = [t["first_sentence"] for t in d["topics"]][1:]
        rows.append((len(true), B.boundary_hits(_group_starts(d, cached), true),
                     B.boundary_hits(_group_starts(d, cached, by_topic=False), true)))
    total, hits, by_size = (sum(r[k] for r in rows) for k in range(3))
    print(f"\ngroup boundaries within 2 sentences: {hits}/{total} by topic, {by_size}/{total} by size")
    assert hits / total >= 0.8 and by_size / total <= 0.5     # measured 9/10 and 2/10


def test_long_unheaded_tiling_recall(cached):
    rows = B.segmentation(_long(), encoder=cached)
    hits, total = sum(r["hits"] for r in rows), sum(len(r["true"]) for r in rows)
    assert hits / total >= 0.8                                 # measured 9/10


def test_long_unheaded_extractive_coverage(cached):
    rows = B.evaluate_coverage(("lead", "extractive"), _long(), encoder=cached)
    cov = {m: np.mean([r["coverage"] for r in rows if r["method"] == m]) for m in ("lead", "extractive")}
    print("\n" + "\n".join(f"{r['doc']} {r['method']}: {r['coverage']:.2f}" for r in rows))
    assert cov["extractive"] >= 0.8 and cov["lead"] <= 0.25   # measured 0.85 (0.57 before merging)
    assert all(r["words_out"] <= B.TOPIC_WORDS * r["topics"] for r in rows)
