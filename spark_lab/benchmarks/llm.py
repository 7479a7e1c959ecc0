"""spark_lab's LLM engine against llama.cpp (llama-cpp-python), side by side in one run.

Each run is a fresh process per engine (so time to first token is from a cold start and peak
RSS is the engine's own), alternating spark_lab / llama.cpp, same GGUF, same prompt, same
thread count, greedy decoding. Reported: prefill tokens/s, decode tokens/s, time to first token
from process start, peak RSS, each the median over repeats, and spark_lab / llama.cpp ratios.

    spark-lab bench llm [--threads 2] [--repeats 3] [--json]
    python benchmarks/llm_vs_llamacpp.py --threads 1
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

PROMPT = (
    "Summarize the following notes for a new engineer in three sentences. The lab kit runs language "
    "models, text encoders and a diffusion model on its own kernels. On a laptop the kernels use NumPy; "
    "on a GPU they use CuPy, with one memory pool backed by unified memory. Weights stay quantized in "
    "memory and are dequantized inside the matrix-vector products during decoding, which is bound by "
    "memory bandwidth. Prompt processing is bound by matrix-multiply throughput instead. The notebooks "
    "show each step, and the benchmarks compare every engine against a well-known reference."
)
N_CTX = 512

_CHILD = r"""
import json, os, resource, sys, time
t_start = float(sys.argv[1]); engine = sys.argv[2]; path = sys.argv[3]; threads = int(sys.argv[4])
n_new = int(sys.argv[5]); prompt_ids = json.loads(sys.argv[6]); n_ctx = int(sys.argv[7])
def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
if engine == "spark_lab":
    os.environ["SPARK_LAB_THREADS"] = str(threads)
    from spark_lab.device import set_threads; set_threads(threads)
    from spark_lab.llm import LLM
    llm = LLM.load(path, n_ctx=n_ctx)
    t0 = time.perf_counter()
    it = llm.stream_tokens(prompt_ids, n_new, temperature=0, stop_at_eos=False)
    next(it); ttft = time.time() - t_start
    for _ in it: pass
    llm.reset()  # the timed run: a warm process, prompt processed from scratch
    it = llm.stream_tokens(prompt_ids, n_new, temperature=0, stop_at_eos=False)
    while True:
        try: next(it)
        except StopIteration as e: g = e.value; break
    out = dict(prefill_tps=len(prompt_ids) / g.prompt_seconds, decode_tps=g.tokens_per_second, tokens=g.token_ids)
else:
    import numpy as np
    import llama_cpp.llama_cpp as C
    from llama_cpp import Llama
    if os.environ.get("SPARK_LAB_LLAMACPP_PLAIN"):
        # llama.cpp's AMX/repacked buffers die with SIGILL where a sandbox hides AMX from a CPU
        # that reports it: then load weights into plain CPU buffers (what the fixtures use too)
        default = C.llama_model_default_params
        def plain():
            p = default(); p.use_extra_bufts = False; return p
        C.llama_model_default_params = plain
    llm = Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False)
    def last_logits():
        # without logits_all, llama-cpp-python 0.3 leaves llm.scores at zero: read the context's
        # last row (logits_all would make llama.cpp compute the whole prompt's logits: unfair)
        return np.ctypeslib.as_array(C.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))
    def run():
        llm.reset()
        t0 = time.perf_counter(); llm.eval(prompt_ids); t1 = time.perf_counter()
        toks = [int(np.argmax(last_logits()))]
        t2 = time.perf_counter()
        for _ in range(n_new - 1):
            llm.eval([toks[-1]]); toks.append(int(np.argmax(last_logits())))
        t3 = time.perf_counter()
        return t1 - t0, t3 - t2, toks
    llm.reset(); llm.eval(prompt_ids); ttft = time.time() - t_start
    tp, td, toks = run()
    out = dict(prefill_tps=len(prompt_ids) / tp, decode_tps=(n_new - 1) / td, tokens=toks)
out.update(ttft_s=ttft, peak_rss_mb=rss_mb())
print(json.dumps(out))
"""


def _run_child(engine: str, path: str, threads: int, n_new: int, prompt_ids: list[int]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    t_start = time.time()
    r = subprocess.run([sys.executable, "-c", _CHILD, repr(t_start), engine, path, str(threads), str(n_new),
                        json.dumps(prompt_ids), str(N_CTX)], capture_output=True, text=True, env=env, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"{engine} benchmark process failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run(model=None, threads: int = 2, repeats: int = 3, n_new: int = 64) -> dict:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise RuntimeError("llama-cpp-python is not installed: pip install 'spark_lab[bench]'") from None
    from ..models import resolve
    from ..tokenizer import Tokenizer
    path = str(resolve(model, "llm"))
    tok = Tokenizer.from_gguf(path)
    from ..llm.template import render_chat
    prompt_ids = tok.encode(render_chat(tok, [{"role": "user", "content": PROMPT}]), parse_special=True)
    rows = {"spark_lab": [], "llama.cpp": []}
    for _ in range(repeats):  # alternate so both see the same machine weather
        for engine in ("spark_lab", "llama.cpp"):
            rows[engine].append(_run_child(engine, path, threads, n_new, prompt_ids))
    med = {e: {k: statistics.median(r[k] for r in rs) for k in ("prefill_tps", "decode_tps", "ttft_s", "peak_rss_mb")}
           for e, rs in rows.items()}
    same = 0
    for a, b in zip(rows["spark_lab"][0]["tokens"], rows["llama.cpp"][0]["tokens"]):
        if a != b:
            break
        same += 1
    s, l = med["spark_lab"], med["llama.cpp"]
    wbytes = weight_bytes(path)
    from .kernels import measure_limits
    import numpy as np
    read = measure_limits(np, quick=False, repeats=3)["read_gbs"]        # one core, NumPy max-reduce, 512 MB
    return {
        "weight_bytes_per_token": wbytes, "weight_bytes_total": weight_bytes(path, total=True), "one_core_read_gbs": read,
        "decode_weight_gbs": {e: wbytes * m["decode_tps"] / 1e9 for e, m in med.items()},
        "model": model or "smollm2-135m-instruct", "threads": threads, "prompt_tokens": len(prompt_ids),
        "new_tokens": n_new, "repeats": repeats, "spark_lab": s, "llama.cpp": l,
        "ratios": {"prefill": s["prefill_tps"] / l["prefill_tps"], "decode": s["decode_tps"] / l["decode_tps"],
                   "ttft": s["ttft_s"] / l["ttft_s"], "peak_rss": s["peak_rss_mb"] / l["peak_rss_mb"]},
        "greedy_tokens_matching_prefix": same,
    }


def weight_bytes(path, total: bool = False) -> int:
    """Bytes of weights one decoded token reads: every tensor once (the embedding table only as
    the output matrix when it is tied: a lookup reads one row), and of a mixture-of-experts
    layer's experts (`*_exps` tensors) only its top-k: expert_used_count / expert_count of them.
    total=True: every byte of every tensor (what the file holds)."""
    from ..gguf import GGUFFile
    f = GGUFFile(path)
    t = f.tensors
    if total:
        return sum(v.nbytes for v in t.values())
    tied = "output.weight" not in t
    n_exp, k = f.get("{arch}.expert_count"), f.get("{arch}.expert_used_count")
    frac = int(k) / int(n_exp) if n_exp and k else 1.0
    return int(sum(v.nbytes * (frac if "_exps." in k_ else 1.0) for k_, v in t.items()
                   if k_ != "token_embd.weight" or tied))


def report(res: dict) -> str:
    s, l, r = res["spark_lab"], res["llama.cpp"], res["ratios"]
    lines = [f"{res['model']}: {res['prompt_tokens']}-token prompt, {res['new_tokens']} new tokens, "
             f"{res['threads']} thread(s), median of {res['repeats']}",
             f"{'':14s}{'spark_lab':>12s}{'llama.cpp':>12s}{'ratio':>8s}",
             f"{'prefill tok/s':14s}{s['prefill_tps']:12.1f}{l['prefill_tps']:12.1f}{r['prefill']:8.2f}",
             f"{'decode tok/s':14s}{s['decode_tps']:12.1f}{l['decode_tps']:12.1f}{r['decode']:8.2f}",
             f"{'TTFT cold s':14s}{s['ttft_s']:12.2f}{l['ttft_s']:12.2f}{r['ttft']:8.2f}",
             f"{'peak RSS MB':14s}{s['peak_rss_mb']:12.0f}{l['peak_rss_mb']:12.0f}{r['peak_rss']:8.2f}",
             f"greedy tokens identical for the first {res['greedy_tokens_matching_prefix']} of {res['new_tokens']}"]
    if "decode_weight_gbs" in res:
        g = res["decode_weight_gbs"]
        active = (f" (active; the file holds {res['weight_bytes_total'] / 1e6:.0f} MB)"
                  if res.get("weight_bytes_total", 0) > 1.2 * res["weight_bytes_per_token"] else "")
        lines.append(f"decode streams {res['weight_bytes_per_token'] / 1e6:.0f} MB of weights per token{active}: "
                     f"spark_lab {g['spark_lab']:.1f} GB/s, llama.cpp {g['llama.cpp']:.1f} GB/s "
                     f"(one core reads {res['one_core_read_gbs']:.1f} GB/s here)")
    return "\n".join(lines)


def main(args) -> int:
    threads = args.threads or 2
    res = run(args.model, threads=threads, repeats=1 if args.quick else args.repeats, n_new=16 if args.quick else 64)
    print(json.dumps(res, indent=2) if args.json else report(res))
    return 0
