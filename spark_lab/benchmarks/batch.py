"""Scale-out throughput: the same batch job on LocalClusters of 1 and 2 single-thread workers.

    spark-lab bench batch [--repeats R] [--quick] [--json]

The job is issue 18's yardstick: 200 documents summarized extractively (40 words each). The
documents are the paragraphs of the summary test documents (tests/data/summaries), each made
distinct by a numbered closing line, so no two inputs are the same. Models load on every
worker before the clock starts (`batch.run_batch` does that); what is timed is the map itself.
Runs alternate 1, 2, 1, 2, ... workers; the speedup reported is the median of the per-pair
ratios, and every run's summaries are checked against a sequential run in this process.
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

DOCS = 200
QUICK_DOCS = 24
MAX_WORDS = 40


def documents(n: int) -> list[str]:
    """n distinct documents of 60+ words: paragraphs of the summary test set, numbered."""
    from .summarize import data_dir
    paras = [p for f in sorted(data_dir().glob("*.txt")) if not f.name.endswith(".ref.txt")
             for p in f.read_text(encoding="utf-8").split("\n\n") if len(p.split()) >= 60]
    if not paras:
        raise FileNotFoundError(f"{data_dir()}: no paragraphs of 60+ words to summarize")
    return [f"{paras[i % len(paras)]}\n\n(Document {i + 1}.)" for i in range(n)]


def measure(n_docs: int = DOCS, repeats: int = 3, workers=(1, 2)) -> dict:
    """-> {docs, runs: [{workers, seconds, items_per_second}], speedup, speedups, same_as_sequential}."""
    from .. import batch as B
    texts = documents(n_docs)
    want = {r["id"]: r["output"] for r in B.warm_sequential("summarize", texts, max_words=MAX_WORDS)}
    runs, same = [], True
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(repeats):
            for n in workers:
                out = Path(tmp) / f"{rep}-{n}.jsonl"
                client = B.local_cluster(workers=n, threads=1, dashboard=False)
                try:
                    r = B.run_batch("summarize", texts, out, client=client, resume=False, progress=None,
                                    max_words=MAX_WORDS)
                finally:
                    B.close(client)
                got = {row["id"]: row["output"] for row in B.read_results(out)}
                same = same and got == want
                runs.append({"workers": n, "seconds": r.seconds, "items_per_second": r.items_per_second})
    base = [r for r in runs if r["workers"] == workers[0]]
    top = [r for r in runs if r["workers"] == workers[-1]]
    speedups = [b["seconds"] / t["seconds"] for b, t in zip(base, top)]
    return {"docs": n_docs, "workers": list(workers), "runs": runs, "speedups": speedups,
            "speedup": statistics.median(speedups), "same_as_sequential": same}


def main(args) -> int:
    quick = getattr(args, "quick", False)
    res = measure(QUICK_DOCS if quick else DOCS, 1 if quick else getattr(args, "repeats", 3))
    if getattr(args, "json", False):
        json.dump(res, sys.stdout, indent=1)
        print()
        return 0
    print(f"summarize (extractive, {MAX_WORDS} words) x {res['docs']} documents, single-thread workers")
    for r in res["runs"]:
        print(f"  {r['workers']} worker(s): {r['seconds']:6.2f} s  {r['items_per_second']:6.2f} docs/s")
    print(f"speedup {res['workers'][-1]} vs {res['workers'][0]} workers: median {res['speedup']:.2f}x "
          f"({', '.join(f'{s:.2f}' for s in res['speedups'])}); "
          f"same summaries as the sequential run: {res['same_as_sequential']}")
    return 0
