"""spark_lab vs llama.cpp on the same GGUF: load, TTFT, prefill, decode (also at depth), peak RSS
(see spark_lab/benchmarks/llm.py)."""
import argparse
import json

from spark_lab.benchmarks.llm import PREFILL_TOKENS, markdown, report, run

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None, help="PATH, a catalogue name, synthetic-8b, synthetic-7b-qwen, synthetic-20b-moe")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prefill-tokens", type=int, default=PREFILL_TOKENS, help="0: skip the prefill measurement")
    ap.add_argument("--contexts", type=int, nargs="*", default=[], help="deep contexts for spark_lab's decode, e.g. 4096 16384")
    ap.add_argument("--cache-type-k", default="f16", choices=["f32", "f16", "q8_0"])
    ap.add_argument("--cache-type-v", default="f16", choices=["f32", "f16", "q8_0"])
    ap.add_argument("--spark-only", action="store_true", help="without llama.cpp")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    res = run(a.model, threads=a.threads, repeats=a.repeats, n_new=a.new_tokens, prefill_tokens=a.prefill_tokens,
              contexts=tuple(a.contexts), cache_type_k=a.cache_type_k, cache_type_v=a.cache_type_v,
              engines=("spark_lab",) if a.spark_only else ("spark_lab", "llama.cpp"))
    print(markdown(res) if a.markdown else json.dumps(res, indent=2) if a.json else report(res))
