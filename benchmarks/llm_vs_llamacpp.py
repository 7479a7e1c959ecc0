"""spark_lab vs llama.cpp on the same GGUF: prefill, decode, TTFT, peak RSS (see spark_lab/benchmarks/llm.py)."""
import argparse
import json

from spark_lab.benchmarks.llm import report, run

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    res = run(a.model, threads=a.threads, repeats=a.repeats, n_new=a.new_tokens)
    print(json.dumps(res, indent=2) if a.json else report(res))
