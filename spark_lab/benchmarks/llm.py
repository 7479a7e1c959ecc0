"""spark_lab's LLM engine against llama.cpp (llama-cpp-python), side by side in one run.

Each run is a fresh process per engine (so time to first token is from a cold start and peak
RSS is the engine's own), alternating spark_lab / llama.cpp, same GGUF, same prompt, same
thread count, greedy decoding. Reported: prefill tokens/s, decode tokens/s, time to first token
from process start, peak RSS, each the median over repeats, and spark_lab / llama.cpp ratios.

    spark-lab bench llm [--model PATH|synthetic-8b|synthetic-7b-qwen|synthetic-20b-moe] [--threads 2]
                        [--repeats 3] [--cache-type-k f16] [--cache-type-v f16] [--markdown] [--json]
    python benchmarks/llm_vs_llamacpp.py --model synthetic-8b --threads 2 --repeats 1 --markdown

Also: load seconds, the cold process's wall time to the end of its first generation, prefill
tokens/s on a 512-token prompt (warm), decode tokens/s at deep contexts (4k, 16k by default for
the synthetic models; spark_lab only, on a cache filled with random K/V), weight GB/s.
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
N_CTX = 1024          # both engines' context for the main runs (the 512-token prompt and its decode fit)
PREFILL_TOKENS = 512
CHAT_TOKENS, CHAT_TOKENS_MAX = 128, 256   # the TTFT/decode prompt when the chat prompt is longer
DEEP_STEPS = 8        # decode steps timed at each deep context
SYNTHETIC = {"synthetic-8b": "llama3-8b-q4_k_m", "synthetic-7b-qwen": "qwen2.5-7b-q4_k_m",
             "synthetic-20b-moe": "gpt-oss-20b-mxfp4"}
GGML_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}

_CHILD = r"""
import json, os, resource, sys, time
a = json.loads(sys.argv[1]); t_start = a["t_start"]; engine = a["engine"]; threads = a["threads"]
n_new, chat, long_ids, n_ctx = a["n_new"], a["chat"], a["long"], a["n_ctx"]
def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
out = {}
if engine == "spark_lab":
    os.environ["SPARK_LAB_THREADS"] = str(threads)
    from spark_lab.device import set_threads; set_threads(threads)
    from spark_lab.llm import LLM
    t = time.time()
    llm = LLM.load(a["path"], n_ctx=n_ctx, cache_type_k=a["ctk"], cache_type_v=a["ctv"])
    out["load_s"] = time.time() - t
    it = llm.stream_tokens(chat, n_new, temperature=0, stop_at_eos=False)
    next(it); out["ttft_s"] = time.time() - t_start
    for _ in it: pass
    out["cold_wall_s"] = time.time() - t_start
    if long_ids:
        llm.reset(); t = time.perf_counter(); llm.prefill(long_ids)
        out["prefill_tps"] = len(long_ids) / (time.perf_counter() - t)
    llm.reset()  # decode at context ~0: a warm process, the chat prompt processed from scratch
    it = llm.stream_tokens(chat, n_new, temperature=0, stop_at_eos=False)
    while True:
        try: next(it)
        except StopIteration as e: g = e.value; break
    out.update(decode_tps=g.tokens_per_second, tokens=g.token_ids, peak_rss_mb=rss_mb())
    import numpy as np
    from spark_lab.llm.cache import KVCache
    c = llm.config
    for n in a["deep"]:  # a cache filled with random K/V to depth n (its prefill would take hours on 2 cores)
        llm.cache = None
        cache = KVCache(c.n_layer, n + DEEP + 1, c.n_head_kv, c.head_dim, type_k=a["ctk"], type_v=a["ctv"])
        cache.fill_random(n)
        llm.model.forward(np.array([g.token_ids[0]]), n, cache)           # the first step compiles nothing new
        t = time.perf_counter()
        for j in range(DEEP):
            llm.model.forward(np.array([g.token_ids[j % len(g.token_ids)]]), n + 1 + j, cache)
        out[f"decode_tps_{n}"] = DEEP / (time.perf_counter() - t)
        del cache
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
    kw = dict(type_k=a["ggml_k"], type_v=a["ggml_v"])
    if a["ctv"] not in ("f32", "f16"):
        kw["flash_attn"] = True          # llama.cpp needs flash attention for a quantized V cache
    t = time.time()
    llm = Llama(model_path=a["path"], n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512,
                verbose=False, **kw)
    out["load_s"] = time.time() - t
    def last_logits():
        # without logits_all, llama-cpp-python 0.3 leaves llm.scores at zero: read the context's
        # last row (logits_all would make llama.cpp compute the whole prompt's logits: unfair)
        return np.ctypeslib.as_array(C.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))
    def gen(first_done=None):
        llm.reset()
        t0 = time.perf_counter(); llm.eval(chat); t1 = time.perf_counter()
        toks = [int(np.argmax(last_logits()))]
        if first_done: first_done()
        t2 = time.perf_counter()
        for _ in range(n_new - 1):
            llm.eval([toks[-1]]); toks.append(int(np.argmax(last_logits())))
        return t1 - t0, time.perf_counter() - t2, toks
    gen(lambda: out.__setitem__("ttft_s", time.time() - t_start))
    out["cold_wall_s"] = time.time() - t_start
    if long_ids:
        llm.reset(); t = time.perf_counter(); llm.eval(long_ids)
        out["prefill_tps"] = len(long_ids) / (time.perf_counter() - t)
    tp, td, toks = gen()
    out.update(decode_tps=(n_new - 1) / td, tokens=toks, peak_rss_mb=rss_mb())
print(json.dumps(out))
""".replace("DEEP", str(DEEP_STEPS))


def _run_child(engine: str, path: str, threads: int, n_new: int, chat: list[int], long_ids: list[int],
               deep=(), cache_type_k="f16", cache_type_v="f16", n_ctx: int = N_CTX) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    args = dict(t_start=time.time(), engine=engine, path=path, threads=threads, n_new=n_new, chat=chat, long=long_ids,
                n_ctx=n_ctx, deep=list(deep), ctk=cache_type_k, ctv=cache_type_v,
                ggml_k=GGML_TYPES[cache_type_k], ggml_v=GGML_TYPES[cache_type_v])
    r = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], capture_output=True, text=True, env=env,
                       timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"{engine} benchmark process failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def model_path(model) -> str:
    """A catalogue name, a path, or synthetic-8b | synthetic-7b-qwen | synthetic-20b-moe (written on first use)."""
    if model in SYNTHETIC:
        from .synthetic import synthetic_path
        return str(synthetic_path(SYNTHETIC[model]))
    from ..models import resolve
    return str(resolve(model, "llm"))


def long_prompt(tok, n: int) -> list[int]:
    """n tokens of English (the notes repeated) for the prefill measurement."""
    ids = tok.encode(PROMPT, add_bos=True)
    while len(ids) < n:
        ids += tok.encode(" " + PROMPT, add_bos=False)
    return ids[:n]


def compile_sources() -> None:
    """Byte-compile spark_lab's modules, as `pip install` does for an installed package (and did for
    llama-cpp-python): an editable install under PYTHONDONTWRITEBYTECODE would otherwise have every
    cold child compile ~40 modules from source, ~0.1 s of its time to first token."""
    import compileall
    from pathlib import Path
    compileall.compile_dir(str(Path(__file__).resolve().parents[1]), quiet=2)


KEYS = ("load_s", "ttft_s", "cold_wall_s", "prefill_tps", "decode_tps", "peak_rss_mb")


def run(model=None, threads: int = 2, repeats: int = 3, n_new: int = 64, prefill_tokens: int = PREFILL_TOKENS,
        contexts=(), cache_type_k: str = "f16", cache_type_v: str = "f16", engines=("spark_lab", "llama.cpp")) -> dict:
    """Side by side, a fresh process per engine and repeat, alternating; medians.

    contexts: deep contexts (e.g. 4096, 16384) at which spark_lab's decode is timed on a cache
    filled with random K/V (llama.cpp has no call to fill its cache without running the prompt,
    so there it is not measured)."""
    if "llama.cpp" in engines:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise RuntimeError("llama-cpp-python is not installed: pip install 'spark_lab[bench]'") from None
    from ..tokenizer import Tokenizer
    path = model_path(model)
    tok = Tokenizer.from_gguf(path)
    from ..llm.template import render_chat
    chat = tok.encode(render_chat(tok, [{"role": "user", "content": PROMPT}]), parse_special=True)
    if len(chat) > CHAT_TOKENS_MAX:      # a byte-level vocabulary (the synthetic files): ~650 tokens of
        chat = long_prompt(tok, CHAT_TOKENS)   # chat prompt; 128 tokens of the notes instead
    long_ids = long_prompt(tok, prefill_tokens) if prefill_tokens else []
    n_ctx = max(N_CTX, len(long_ids) + 8, len(chat) + n_new + 8)
    compile_sources()
    rows = {e: [] for e in engines}
    for rep in range(repeats):  # alternate so both see the same machine weather
        for engine in engines:
            # the deep contexts in the last round: a warm loop, timed once the first (cold) round's
            # page-cache reads have settled (after a dropped page cache, rep 0's read-ahead of the
            # repacked weights still ran beside it: 16k at 0.44x of context 0, 0.77x a round later)
            deep = contexts if engine == "spark_lab" and rep == repeats - 1 else ()
            rows[engine].append(_run_child(engine, path, threads, n_new, chat, long_ids, deep,
                                           cache_type_k, cache_type_v, n_ctx))
    med = {e: {k: statistics.median(r[k] for r in rs) for k in KEYS if k in rs[0]} for e, rs in rows.items()}
    for e, rs in rows.items():
        med[e].update({k: v for k, v in rs[-1].items() if k.startswith("decode_tps_")})
        if any(k.startswith("decode_tps_") for k in rs[-1]):
            med[e]["ctx0_decode_tps_same_round"] = rs[-1]["decode_tps"]    # what the deep contexts are compared with
    wbytes = weight_bytes(path)
    from .kernels import measure_limits
    import numpy as np
    read = measure_limits(np, quick=False, repeats=3)["read_gbs"]        # one core, NumPy max-reduce, 512 MB
    res = {
        "weight_bytes_per_token": wbytes, "weight_bytes_total": weight_bytes(path, total=True), "one_core_read_gbs": read,
        "decode_weight_gbs": {e: wbytes * m["decode_tps"] / 1e9 for e, m in med.items()},
        "model": model or "smollm2-135m-instruct", "threads": threads, "prompt_tokens": len(chat),
        "prefill_tokens": len(long_ids), "new_tokens": n_new, "repeats": repeats, "n_ctx": n_ctx,
        "cache_type_k": cache_type_k, "cache_type_v": cache_type_v, "contexts": list(contexts),
        "llamacpp_buffers": "plain" if os.environ.get("SPARK_LAB_LLAMACPP_PLAIN") else "default (repacked)", **med,
    }
    if len(engines) == 2:
        s, l = med["spark_lab"], med["llama.cpp"]
        res["ratios"] = {"load": s["load_s"] / l["load_s"], "ttft": s["ttft_s"] / l["ttft_s"],
                         "cold_wall": s["cold_wall_s"] / l["cold_wall_s"], "decode": s["decode_tps"] / l["decode_tps"],
                         "peak_rss": s["peak_rss_mb"] / l["peak_rss_mb"]}
        if "prefill_tps" in s:
            res["ratios"]["prefill"] = s["prefill_tps"] / l["prefill_tps"]
        same = 0
        for x, y in zip(rows["spark_lab"][0]["tokens"], rows["llama.cpp"][0]["tokens"]):
            if x != y:
                break
            same += 1
        res["greedy_tokens_matching_prefix"] = same
    return res


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


ROWS = (("load s", "load_s", "{:.2f}", "load"), ("TTFT cold s", "ttft_s", "{:.2f}", "ttft"),
        ("cold run wall s", "cold_wall_s", "{:.2f}", "cold_wall"), ("prefill tok/s", "prefill_tps", "{:.1f}", "prefill"),
        ("decode tok/s", "decode_tps", "{:.2f}", "decode"), ("peak RSS MB", "peak_rss_mb", "{:.0f}", "peak_rss"))


def _rows(res: dict):
    """(label, spark_lab text, llama.cpp text, ratio text) for each measured quantity."""
    s, l, r = res.get("spark_lab", {}), res.get("llama.cpp", {}), res.get("ratios", {})
    out = []
    for label, key, fmt, rk in ROWS:
        if key not in s and key not in l:
            continue
        out.append((label, fmt.format(s[key]) if key in s else "-", fmt.format(l[key]) if key in l else "-",
                    f"{r[rk]:.2f}" if rk in r else "-"))
    for n in res.get("contexts", []):
        k = f"decode_tps_{n}"
        if k in s:
            ref = s.get("ctx0_decode_tps_same_round") or s.get("decode_tps")
            ratio = s[k] / ref if ref else float("nan")
            out.append((f"decode tok/s at {n // 1024}k", f"{s[k]:.2f} ({ratio:.2f}x ctx 0)", "not measured", "-"))
    return out


def _title(res: dict) -> str:
    t = (f"{res['model']}: {res['threads']} thread(s), median of {res['repeats']}, "
         f"{res['prompt_tokens']}-token prompt (TTFT, decode) + {res['new_tokens']} new tokens")
    if res.get("prefill_tokens"):
        t += f", prefill of a {res['prefill_tokens']}-token prompt"
    return t + (f", KV cache K {res.get('cache_type_k', 'f32')} / V {res.get('cache_type_v', 'f32')}, "
                f"context {res.get('n_ctx', N_CTX)}")


def _bandwidth(res: dict) -> str | None:
    if "decode_weight_gbs" not in res:
        return None
    g = res["decode_weight_gbs"]
    active = (f" (active; the file holds {res['weight_bytes_total'] / 1e6:.0f} MB)"
              if res.get("weight_bytes_total", 0) > 1.2 * res["weight_bytes_per_token"] else "")
    per = ", ".join(f"{e} {v:.1f} GB/s" for e, v in g.items())
    return (f"decode streams {res['weight_bytes_per_token'] / 1e6:.0f} MB of weights per token{active}: "
            f"{per} (one core reads {res['one_core_read_gbs']:.1f} GB/s here)")


def report(res: dict) -> str:
    lines = [_title(res), f"{'':22s}{'spark_lab':>26s}{'llama.cpp':>14s}{'ratio':>8s}"]
    lines += [f"{a:22s}{b:>26s}{c:>14s}{d:>8s}" for a, b, c, d in _rows(res)]
    if "greedy_tokens_matching_prefix" in res:
        lines.append(f"greedy tokens identical for the first {res['greedy_tokens_matching_prefix']} of {res['new_tokens']}")
    bw = _bandwidth(res)
    if bw:
        lines.append(bw)
    return "\n".join(lines)


def markdown(res: dict) -> str:
    """The README's table for one model (`spark-lab bench llm --markdown`)."""
    buf = res.get("llamacpp_buffers", "")
    lines = [f"**{_title(res)}**", "", f"| | spark_lab | llama.cpp ({buf} buffers) | ratio |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in _rows(res)]
    bw = _bandwidth(res)
    if bw:
        lines += ["", bw + "."]
    return "\n".join(lines)


def main(args) -> int:
    threads = args.threads or 2
    quick = getattr(args, "quick", False)
    contexts = getattr(args, "contexts", None)
    if contexts is None:
        contexts = (4096, 16384) if args.model in SYNTHETIC else ()
    engines = ("spark_lab",) if getattr(args, "spark_only", False) else ("spark_lab", "llama.cpp")
    res = run(args.model, threads=threads, repeats=1 if quick else args.repeats, n_new=16 if quick else 64,
              prefill_tokens=getattr(args, "prefill_tokens", PREFILL_TOKENS), contexts=tuple(contexts),
              cache_type_k=getattr(args, "cache_type_k", None) or "f16",
              cache_type_v=getattr(args, "cache_type_v", None) or "f16", engines=engines)
    if getattr(args, "markdown", False):
        print(markdown(res))
    else:
        print(json.dumps(res, indent=2) if args.json else report(res))
    return 0
