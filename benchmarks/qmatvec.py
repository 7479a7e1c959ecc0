"""Quantized mat-vec on the CPU: numba qmatvec vs quant_matmul vs float32 BLAS, SmolLM2-135M shapes.

    .venv/bin/python benchmarks/qmatvec.py [--threads 1 2] [--repeats 30] [--types Q4_1 Q8_0] [--json]
    .venv/bin/python benchmarks/qmatvec.py --model smollm2-135m-instruct   # one decode token's mat-vecs
    .venv/bin/python benchmarks/qmatvec.py --prefill 120 [--model ...]      # a 120-token prompt's products
    .venv/bin/python benchmarks/qmatvec.py --moe [--types MXFP4 Q4_0]       # gpt-oss-20b expert gather

Times one decode-sized product (x [1, in]) per call: median (and best) of `repeats` runs after
a warm-up. GB/s counts the bytes of the raw GGML weight read per call (for BLAS too, although it reads
4 bytes per value), so the columns compare time per call. The weights are random
blocks with valid scales, so the numbers do not depend on a model download.

--moe: one token through 4 of 32 experts of gpt-oss-20b's shape (2880 x 2880 each) with
`moe_matvec`, for each type in --types (default MXFP4 and Q4_0); a 512 MB read between calls
evicts the caches (the machine's L3 could hold a whole stack), and each call picks 4 experts
at random. GB/s counts the raw bytes of the 4 experts read.

--prefill N: x [N, in] instead; columns qmatmul (numba tiles + BLAS), quant_matmul's NumPy
reference (fast=False) and BLAS on a float32 weight; GFLOP/s = 2 N out in / time. Times are
CPU seconds (time.process_time), steadier than wall time on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
from gguf import GGMLQuantizationType as QT

from spark_lab.kernels import qmatvec as qm
from spark_lab.quants import BLOCK_SIZES, QuantTensor, quant_matmul

SHAPES = [  # (name, out, in)
    ("attn_q/o 576->576", 576, 576),
    ("attn_k/v 576->192", 192, 576),
    ("ffn_gate/up 576->1536", 1536, 576),
    ("ffn_down 1536->576", 576, 1536),
    ("output 576->49152", 49152, 576),
]


def random_weight(q, rows, cols, rng):
    """Random blocks whose float16 scales are finite and small."""
    bs, ts = BLOCK_SIZES[q]
    b = rng.integers(0, 256, (rows * cols // bs, ts), dtype=np.uint8)
    scales = {QT.Q4_0: [0], QT.Q4_1: [0, 2], QT.Q5_0: [0], QT.Q8_0: [0], QT.Q4_K: [0, 2], QT.Q6_K: [208]}.get(q, [])
    for off in scales:
        b[:, off:off + 2] = rng.uniform(-0.02, 0.02, len(b)).astype(np.float16).view(np.uint8).reshape(-1, 2)
    if q == QT.MXFP4:
        b[:, 0] = rng.integers(117, 123, len(b))                           # E8M0 scales 2^-10 .. 2^-5
    return QuantTensor(b.reshape(rows, -1), q, (rows, cols))


def moe(types, threads, repeats, as_json, n_expert=32, k=4, rows=2880, cols=2880, flush_mb=512):
    """One token's expert gather at gpt-oss-20b's expert shape: moe_matvec over k of n_expert."""
    import numba
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    x = rng.standard_normal(cols).astype(np.float32)
    flush = np.ones(flush_mb << 18, np.float32)                            # flush_mb MB, read between calls
    res = []
    for tname in types:
        q = QT[tname]
        stack = qm.ExpertStack(np.stack([random_weight(q, rows, cols, rng).data for _ in range(n_expert)]),
                               q, (n_expert, rows, cols))
        for w in stack.experts:                                            # repack every expert up front
            qm.prepare(w)
        out = np.empty((k, rows), np.float32)
        nbytes = k * stack.expert_nbytes()
        for nt in threads:
            numba.set_num_threads(min(nt, numba.config.NUMBA_NUM_THREADS))
            with threadpool_limits(limits=nt):
                qm.moe_matvec(x, stack, np.arange(k), out=out)             # warm-up (compile)
                ts, cs = [], []
                for _ in range(repeats):
                    ids = rng.choice(n_expert, k, replace=False)
                    float(flush.sum())                                     # evict the stack from the caches
                    t0, c0 = time.perf_counter(), time.process_time()
                    qm.moe_matvec(x, stack, ids, out=out)
                    ts.append(time.perf_counter() - t0)
                    cs.append(time.process_time() - c0)
            med, best, cpu = float(np.median(ts)), float(np.min(ts)), float(np.median(cs))
            r = {"type": tname, "experts": f"{k} of {n_expert}", "shape": f"{rows}x{cols}", "threads": nt,
                 "bytes_per_token": nbytes, "packed_bytes_per_expert": stack[0].packed.nbytes,
                 "ms": med * 1e3, "best_ms": best * 1e3, "cpu_ms": cpu * 1e3, "GBps": nbytes / med / 1e9,
                 "best_GBps": nbytes / best / 1e9, "cpu_GBps": nbytes / cpu / 1e9}
            res.append(r)
            if not as_json:
                print(f"{tname:6s} moe_matvec {k} of {n_expert} experts {rows}x{cols} t={nt}: {med * 1e3:6.2f} ms "
                      f"{nbytes / med / 1e9:5.1f} GB/s (best {best * 1e3:.2f} ms {nbytes / best / 1e9:.1f} GB/s; "
                      f"median CPU time {cpu * 1e3:.2f} ms {nbytes / cpu / 1e9:.1f} GB/s), "
                      f"{nbytes / 1e6:.1f} MB read", flush=True)
        del stack
    if as_json:
        print(json.dumps({"rows": res}))
    return 0


def timeit(fn, repeats):
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)), float(np.min(ts))


def cputime(fn, repeats):
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        ts.append(time.process_time() - t0)
    return float(np.median(ts)), float(np.min(ts))


def prefill(model, n, threads, repeats, types, as_json):
    """The weight products of an n-token prompt: per shape (random weights), or every 2-D weight
    of a real GGUF once (the output head excluded: a prompt needs its last row only)."""
    import numba
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    if model:
        from spark_lab.gguf import GGUFFile
        from spark_lab.models import resolve
        f = GGUFFile(resolve(model))
        groups = {model: [QuantTensor(f.raw(t), t.qtype, t.shape) for nm, t in f.tensors.items()
                          if len(t.shape) == 2 and nm not in ("token_embd.weight", "output.weight")]}
    else:
        groups = {f"{t} {name}": [random_weight(QT[t], rows, cols, rng)] for t in types for name, rows, cols in SHAPES[:4]}
    res = []
    for label, ws in groups.items():
        for w in ws:
            qm.prepare(w)
        xs = {c: rng.standard_normal((n, c)).astype(np.float32) for c in {w.shape[1] for w in ws}}
        flops = sum(2 * n * w.shape[0] * w.shape[1] for w in ws)
        f32 = [w.dequantize() for w in ws] if len(ws) < 8 else None
        for nt in threads:
            numba.set_num_threads(min(nt, numba.config.NUMBA_NUM_THREADS))
            from spark_lab.device import set_threads
            set_threads(nt)
            with threadpool_limits(limits=nt):
                cases = {"qmatmul": lambda: [qm.qmatmul(xs[w.shape[1]], w) for w in ws],
                         "numpy_ref": lambda: [quant_matmul(xs[w.shape[1]], w, fast=False) for w in ws]}
                if f32 is not None:
                    cases["blas_f32"] = lambda: [xs[w.shape[1]] @ f.T for w, f in zip(ws, f32)]
                r = {"what": label, "rows": n, "threads": nt, "gflop": flops / 1e9}
                for key, fn in cases.items():
                    med, best = cputime(fn, repeats if key != "numpy_ref" else max(2, repeats // 5))
                    r[key + "_cpu_ms"], r[key + "_gflops"] = med * 1e3, flops / med / 1e9
                if model:
                    r["matmul_only_prompt_tokens_per_cpu_s"] = n / (r["qmatmul_cpu_ms"] / 1e3)
                res.append(r)
                if not as_json:
                    cells = [f"{k[:-7]} {r[k]:8.2f} ms {r[k[:-7] + '_gflops']:6.1f} GFLOP/s" for k in r if k.endswith("_cpu_ms")]
                    print(f"{label:28s} n={n} t={nt}  " + " | ".join(cells), flush=True)
    if as_json:
        print(json.dumps({"rows": res}))
    return 0


def token_matvecs(model, threads, repeats, as_json):
    """Every 2-D weight of a real GGUF, in file order, once: the mat-vec share of one decode step.

    The tied output head (token_embd used as lm_head when there is no output.weight) is
    counted once more, as the engine reads it for the logits."""
    import numba
    from threadpoolctl import threadpool_limits

    from spark_lab.gguf import GGUFFile
    from spark_lab.models import resolve

    f = GGUFFile(resolve(model))
    names = [n for n, t in f.tensors.items() if len(t.shape) == 2 and n != "token_embd.weight"]
    names.append("output.weight" if "output.weight" in f.tensors else "token_embd.weight")
    weights = []
    t0 = time.perf_counter()
    for n in names:
        t = f.tensors[n]
        qt = QuantTensor(f.raw(t), t.qtype, t.shape)
        qm.prepare(qt)
        weights.append(qt)
    t_prep = time.perf_counter() - t0
    xs = {c: np.random.default_rng(c).standard_normal(c).astype(np.float32) for c in {w.shape[1] for w in weights}}
    outs = [np.empty(w.shape[0], np.float32) for w in weights]
    nbytes = sum(w.nbytes for w in weights)
    res = []
    for nt in threads:
        numba.set_num_threads(min(nt, numba.config.NUMBA_NUM_THREADS))
        with threadpool_limits(limits=nt):
            def step():
                for w, o in zip(weights, outs):
                    qm.qmatvec(xs[w.shape[1]], w, out=o)
            med, best = timeit(step, repeats)
        r = {"model": model, "threads": nt, "n_matvecs": len(weights), "weight_bytes": nbytes, "prepare_s": t_prep,
             "ms_per_token": med * 1e3, "best_ms_per_token": best * 1e3, "GBps": nbytes / med / 1e9,
             "matvec_only_tokens_per_s": 1.0 / med}
        res.append(r)
        if not as_json:
            print(f"{model}: {len(weights)} mat-vecs, {nbytes / 1e6:.1f} MB, threads={nt}: {med * 1e3:.2f} ms/token "
                  f"(best {best * 1e3:.2f}), {nbytes / med / 1e9:.1f} GB/s, <= {1 / med:.0f} tokens/s from mat-vecs alone")
    if as_json:
        print(json.dumps({"rows": res}))
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--types", nargs="+", default=None, help="default Q4_1 Q8_0 (--moe: MXFP4 Q4_0)")
    ap.add_argument("--no-blas", action="store_true", help="skip the float32 BLAS column (its weight is 4 bytes/value)")
    ap.add_argument("--model", help="time one decode token's mat-vecs over this GGUF's real weights instead")
    ap.add_argument("--prefill", type=int, default=0, help="time x [N, in] products (prompt processing) instead")
    ap.add_argument("--moe", action="store_true", help="time gpt-oss-20b's expert gather (4 of 32, 2880x2880) instead")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.moe:
        return moe(args.types or ["MXFP4", "Q4_0"], args.threads, args.repeats, args.json)
    args.types = args.types or ["Q4_1", "Q8_0"]
    if args.prefill:
        return prefill(args.model, args.prefill, args.threads, args.repeats, args.types, args.json)
    if args.model:
        return token_matvecs(args.model, args.threads, args.repeats, args.json)

    import numba
    from threadpoolctl import threadpool_limits

    t0 = time.perf_counter()
    assert qm.available(), "numba is not installed"
    rng = np.random.default_rng(0)
    rows_out = []
    for tname in args.types:
        q = QT[tname]
        for name, rows, cols in SHAPES:
            qt = random_weight(q, rows, cols, rng)
            tp = time.perf_counter()
            qm.prepare(qt)
            t_prep = time.perf_counter() - tp
            w = None if args.no_blas else qt.dequantize()                   # [out, in] f32
            x = rng.standard_normal((1, cols)).astype(np.float32)
            out = np.empty((1, rows), np.float32)
            for nt in args.threads:
                numba.set_num_threads(min(nt, numba.config.NUMBA_NUM_THREADS))
                with threadpool_limits(limits=nt):
                    r = {"type": tname, "shape": name, "threads": nt, "weight_bytes": qt.nbytes,
                         "packed_bytes": qt.packed.nbytes, "prepare_s": t_prep}
                    cases = {
                        "qmatvec": lambda: qm.qmatvec(x, qt, out=out),
                        "quant_matmul": lambda: quant_matmul(x, qt),
                    }
                    if w is not None:
                        cases["blas_f32"] = lambda: x @ w.T
                    for key, fn in cases.items():
                        med, best = timeit(fn, args.repeats if key != "quant_matmul" else max(3, args.repeats // 5))
                        r[key + "_us"] = med * 1e6
                        r[key + "_best_us"] = best * 1e6
                        r[key + "_GBps"] = qt.nbytes / med / 1e9
                    rows_out.append(r)
                    if not args.json:
                        cells = [f"{k[:-3]} {r[k]:7.0f}us {r[k[:-3] + '_GBps']:5.1f}GB/s "
                                 f"(best {r[k[:-3] + '_best_us']:.0f}us {qt.nbytes / r[k[:-3] + '_best_us'] / 1e3:.1f})"
                                 for k in r if k.endswith("_us") and not k.endswith("best_us")]
                        print(f"{tname} {name:22s} t={nt}  " + " | ".join(cells), flush=True)
    if args.json:
        print(json.dumps({"rows": rows_out, "cpu_count": os.cpu_count(), "total_s": time.perf_counter() - t0}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
