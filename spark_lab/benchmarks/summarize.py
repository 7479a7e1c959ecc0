"""Summary quality and speed: every method against hand-written reference summaries.

    spark-lab bench summarize [--model M] [--quick] [--json]
    spark-lab bench summarize --long [--repeats N]   # 30k words: abstractive, headed vs unheaded

The documents and references live in tests/data/summaries/ (written for this repo). Each
method gets the reference's length as its word budget; scores are ROUGE-1/2/L F1 (stemmed,
`rouge-score`) averaged over documents, and speed is input words per second. Coverage is the
share of true topics a summary names on the unheaded documents in tests/data/summaries/unheaded/
(each NAME.topics.json lists its topics, where each starts and the words that name it), with a
budget of TOPIC_WORDS per topic; the table also reports how many true topic boundaries the tiling
finds within 2 sentences. "lead" (the
first N words) is the usual baseline that a summarizer has to beat. abstractive and hybrid
run only when the LLM loads (SmolLM2-135M by default).
"""
from __future__ import annotations

import json
import os
import random
import re
import statistics
import sys
from pathlib import Path

METRICS = ("rouge1", "rouge2", "rougeL")


def data_dir() -> Path:
    env = os.environ.get("SPARK_LAB_SUMMARY_DATA")
    d = Path(env) if env else Path(__file__).resolve().parents[2] / "tests" / "data" / "summaries"
    if not d.is_dir():
        raise FileNotFoundError(f"no evaluation documents at {d} (set SPARK_LAB_SUMMARY_DATA to the folder)")
    return d


def load_documents(folder: Path | None = None) -> list[dict]:
    """-> [{name, text, reference}] for every NAME.{txt,md,html} with a NAME.ref.txt."""
    from ..summarize import read_document
    folder = folder or data_dir()
    docs = []
    for ref in sorted(folder.glob("*.ref.txt")):
        name = ref.name[:-len(".ref.txt")]
        src = [p for p in folder.glob(name + ".*") if not p.name.endswith(".ref.txt")]
        if not src:
            continue
        docs.append({"name": name, "text": read_document(src[0]), "reference": ref.read_text().strip()})
    if not docs:
        raise FileNotFoundError(f"{folder}: no NAME.txt|md|html + NAME.ref.txt pairs")
    return docs


def long_report(words: int = 30_000, seed: int = 0, headings: bool = True) -> str:
    """A long regional report (long/merrow_coast.json): a title, an introduction, then one
    chapter per subject, each a run of paragraphs of 4-7 sentences drawn from the chapter's own
    templates with seeded names and numbers; chapters get words in proportion to their weights.
    headings=False leaves out the title and chapter headings (the same text otherwise)."""
    report = json.loads((data_dir() / "long" / "merrow_coast.json").read_text())
    rng, num = random.Random(seed), report["numbers"]

    def fill(template, slots):
        def one(m):
            name = m.group(1)
            if name in slots:
                return rng.choice(slots[name])
            lo, hi = num[name]
            return str(rng.randint(lo, hi))
        return re.sub(r"\{(\w+)\}", one, template)

    out = [f"# {report['title']}"] if headings else []
    out.append(" ".join(fill(x, report["intro_slots"]) for x in report["intro"]))
    total = sum(sec["weight"] for sec in report["sections"])
    for sec in report["sections"]:
        if headings:
            out.append(f"## {sec['heading']}")
        target, n = words * sec["weight"] / total + 1, 0
        while n < target:
            para = " ".join(fill(t, sec["slots"]) for t in rng.sample(sec["sentences"], rng.randint(4, 7)))
            out.append(para)
            n += len(para.split())
    return "\n\n".join(out)


def long_timing(llm, repeats: int = 1, words: int = 30_000, max_words: int = 150) -> list[dict]:
    """Abstractive on the long report with its headings and without them, alternating: seconds,
    LLM calls and chapters named (their key terms) per run. Without headings the topics come from
    tiling MiniLM embeddings; the encoder loads once, before the first timed run."""
    from ..summarize import summarize
    from ..summarize.mapreduce import _tiling_encoder
    report = json.loads((data_dir() / "long" / "merrow_coast.json").read_text())
    enc = _tiling_encoder()
    rows = []
    for rep in range(repeats):
        for headed in (True, False):
            s = summarize(long_report(words, headings=headed), "abstractive", max_words=max_words, llm=llm,
                          encoder=enc, max_new_tokens=32, progress=False)
            low = s.text.lower()
            named = sum(any(re.search(k, low) for k in sec["key_terms"]) for sec in report["sections"])
            rows.append(dict(repeat=rep, headed=headed, seconds=s.seconds, words_in=s.words_in,
                             llm_calls=s.llm_calls, chapters=named, of=len(report["sections"]), text=s.text))
    return rows


TOPIC_WORDS = 25   # word budget per true topic when the coverage set is summarized


def load_unheaded(folder: Path | None = None) -> list[dict]:
    """-> [{name, text, topics: [{topic, key_terms, first_sentence}], sentences}] for every
    unheaded/NAME.txt with its NAME.topics.json (the true topics, where each starts, and
    words that name each one)."""
    folder = folder or data_dir() / "unheaded"
    docs = []
    for meta in sorted(folder.glob("*.topics.json")):
        src = meta.with_name(meta.name[:-len(".topics.json")] + ".txt")
        if src.exists():
            docs.append({"name": src.stem, "text": src.read_text(), **json.loads(meta.read_text())})
    if not docs:
        raise FileNotFoundError(f"{folder}: no NAME.txt + NAME.topics.json pairs")
    return docs


def coverage(summary: str, topics: list[dict]) -> float:
    """The share of topics a summary names: a topic counts when one of its key terms (a word
    stem, matched at a word start, any case) occurs in the summary."""
    low = summary.lower()
    hit = [any(re.search(r"\b" + re.escape(k.lower()), low) for k in t["key_terms"]) for t in topics]
    return sum(hit) / len(topics)


def boundary_hits(found: list[int], true: list[int], tolerance: int = 2) -> int:
    """How many true boundaries (sentence indices) have a found one within `tolerance` sentences
    (each found boundary matched once)."""
    left, hits = sorted(found), 0
    for t in sorted(true):
        near = [f for f in left if abs(f - t) <= tolerance]
        if near:
            left.remove(min(near, key=lambda f: abs(f - t)))
            hits += 1
    return hits


def segmentation(docs=None, encoder=None) -> list[dict]:
    """Topic boundaries found in each unheaded document vs the true ones."""
    from ..summarize import split_paragraphs
    from ..summarize.extract import _default_encoder
    from ..summarize.tiling import boundaries
    docs = docs if docs is not None else load_unheaded()
    enc = encoder or _default_encoder()
    rows = []
    for d in docs:
        sents = [s for p in split_paragraphs(d["text"], "en") for s in p.sentences]
        found = boundaries(enc.encode(sents, progress=False))
        true = [t["first_sentence"] for t in d["topics"]][1:]
        rows.append({"doc": d["name"], "sentences": len(sents), "true": true, "found": found,
                     "hits": boundary_hits(found, true)})
    return rows


def evaluate_coverage(methods=("lead", "extractive"), docs=None, llm=None, encoder=None,
                      max_new_tokens: int | None = None, progress: bool = False) -> list[dict]:
    """One row per (unheaded document, method): the share of its topics the summary names."""
    from ..summarize import count_words, summarize
    docs = docs if docs is not None else load_unheaded()
    rows = []
    for d in docs:
        budget = TOPIC_WORDS * len(d["topics"])
        for m in methods:
            if m == "lead":
                text, seconds = lead(d["text"], budget), 0.0
            else:
                s = summarize(d["text"], m, max_words=budget, llm=llm, encoder=encoder,
                              max_new_tokens=max_new_tokens, progress=progress)
                text, seconds = s.text, s.seconds
            rows.append({"doc": d["name"], "method": m, "topics": len(d["topics"]),
                         "coverage": coverage(text, d["topics"]), "words_out": count_words(text),
                         "seconds": seconds, "text": text})
    return rows


def lead(text: str, max_words: int) -> str:
    """Baseline: the first max_words words (heading marks dropped, the words kept)."""
    return " ".join(re.sub(r"(?m)^\s{0,3}#{1,6}\s+", "", text).split()[:max_words])


def rouge(candidate: str, reference: str) -> dict:
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise ImportError("ROUGE needs the dev extra: pip install rouge-score") from None
    sc = rouge_scorer.RougeScorer(list(METRICS), use_stemmer=True).score(reference, candidate)
    return {m: sc[m].fmeasure for m in METRICS}


def evaluate(methods=("lead", "extractive"), docs=None, llm=None, encoder=None,
             max_new_tokens: int | None = None, progress: bool = False) -> list[dict]:
    """One row per (document, method): name, method, ROUGE F1s, words_in/out, seconds, words/s, text."""
    import time
    from ..summarize import count_words, summarize
    docs = docs if docs is not None else load_documents()
    rows = []
    for d in docs:
        budget = count_words(d["reference"])
        for m in methods:
            t0 = time.perf_counter()
            if m == "lead":
                text, words_in = lead(d["text"], budget), count_words(d["text"])
                seconds = time.perf_counter() - t0
            else:
                s = summarize(d["text"], m, max_words=budget, llm=llm, encoder=encoder,
                              max_new_tokens=max_new_tokens, progress=progress)
                text, words_in, seconds = s.text, s.words_in, s.seconds
            row = {"doc": d["name"], "method": m, **rouge(text, d["reference"]), "words_in": words_in,
                   "words_out": count_words(text), "seconds": seconds,
                   "words_per_second": words_in / seconds if seconds > 0 else float("inf"), "text": text}
            rows.append(row)
    return rows


def table(rows: list[dict]) -> list[dict]:
    """Mean ROUGE per method, and total words / total seconds."""
    out = []
    for m in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == m]
        secs = sum(r["seconds"] for r in rs)
        out.append({"method": m, "docs": len(rs),
                    **{k: statistics.mean(r[k] for r in rs) for k in METRICS},
                    "words_per_second": sum(r["words_in"] for r in rs) / secs if secs > 0 else float("inf"),
                    "seconds": secs})
    return out


def format_table(summary: list[dict]) -> str:
    lines = [f"{'method':12s} {'docs':>4s} {'ROUGE-1':>8s} {'ROUGE-2':>8s} {'ROUGE-L':>8s} {'words/s':>10s} {'seconds':>8s}"
             + (f" {'coverage':>8s}" if any("coverage" in r for r in summary) else "")]
    for r in summary:
        wps = "inf" if r["words_per_second"] == float("inf") else f"{r['words_per_second']:.0f}"
        lines.append(f"{r['method']:12s} {r['docs']:4d} {r['rouge1']:8.3f} {r['rouge2']:8.3f} {r['rougeL']:8.3f} "
                     f"{wps:>10s} {r['seconds']:8.1f}" + (f" {r['coverage']:8.3f}" if "coverage" in r else ""))
    return "\n".join(lines)


def main(args) -> int:
    from ..device import set_threads
    if getattr(args, "threads", None):
        set_threads(args.threads)
    if getattr(args, "long", False):
        return _main_long(args)
    docs = load_documents()
    quick = getattr(args, "quick", False)
    methods = ["lead", "extractive"]
    llm, max_new = None, None
    try:
        from ..llm import LLM
        llm = LLM.load(getattr(args, "model", None) or "smollm2-135m-instruct", n_ctx=2048)
        methods += ["abstractive", "hybrid"]
    except Exception as e:  # no engine or no model: the extractive half still runs
        print(f"abstractive/hybrid skipped: {type(e).__name__}: {e}", file=sys.stderr)
    if quick:  # CI: the two shortest documents, short outputs
        docs = sorted(docs, key=lambda d: len(d["text"]))[:2]
        max_new = 48
    rows = evaluate(methods, docs, llm=llm, max_new_tokens=max_new, progress=sys.stderr.isatty())
    summary = table(rows)
    # topic coverage and boundaries on the long unheaded documents
    unheaded = load_unheaded()
    long_names = set()
    if quick:
        unheaded = unheaded[:1]
    else:   # and the ~3,000-word ones (a meeting, a status report, an e-mail thread)
        longer = load_unheaded(data_dir() / "unheaded_long")
        long_names = {d["name"] for d in longer}
        unheaded += longer
    cov_rows = evaluate_coverage(methods, unheaded, llm=llm, max_new_tokens=max_new)
    cov = {m: statistics.mean(r["coverage"] for r in cov_rows if r["method"] == m) for m in methods}
    for r in summary:
        r["coverage"] = cov[r["method"]]
    seg = segmentation(unheaded)
    hits, total = sum(r["hits"] for r in seg), sum(len(r["true"]) for r in seg)
    if getattr(args, "json", False):
        print(json.dumps({"summary": summary, "rows": rows, "coverage_rows": cov_rows, "segmentation": seg,
                          "boundaries_within_2": hits / max(total, 1),
                          "model": getattr(llm, "name", None)}, ensure_ascii=False))
    else:
        print(format_table(summary))
        print(f"topic boundaries within 2 sentences: {hits}/{total} "
              f"({len(unheaded)} unheaded documents; coverage = share of their topics a summary names)")
        if long_names:
            on_long = {m: statistics.mean(r["coverage"] for r in cov_rows
                                          if r["method"] == m and r["doc"] in long_names) for m in methods}
            print("coverage on the long unheaded documents: "
                  + ", ".join(f"{m} {c:.3f}" for m, c in on_long.items()))
    return 0


def _main_long(args) -> int:
    from ..llm import LLM
    llm = LLM.load(getattr(args, "model", None) or "smollm2-135m-instruct", n_ctx=2048)
    rows = long_timing(llm, repeats=getattr(args, "repeats", 1) or 1)
    med = {h: statistics.median(r["seconds"] for r in rows if r["headed"] == h) for h in (True, False)}
    if getattr(args, "json", False):
        print(json.dumps({"rows": rows, "unheaded_over_headed": med[False] / med[True]}))
        return 0
    for r in rows:
        print(f"{'headed' if r['headed'] else 'unheaded':>9s}  {r['words_in']:,} words  {r['seconds']:7.1f} s  "
              f"{r['llm_calls']} LLM calls  chapters named {r['chapters']}/{r['of']}")
    print(f"abstractive, unheaded / headed time (medians): {med[False] / med[True]:.2f}x")
    return 0
