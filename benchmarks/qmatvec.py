"""Quantized mat-vec on the CPU: numba qmatvec vs quant_matmul vs float32 BLAS, SmolLM2-135M shapes.

    .venv/bin/python benchmarks/qmatvec.py [--threads 1 2] [--repeats 30] [--types Q4_1 Q8_0] [--json]

Times one decode-sized product (x [1, in]) per call: median (and best) of `repeats` runs after
a warm-up. GB/s counts the bytes of the raw GGML weight read per call. The weights are random
blocks with valid scales, so the numbers do not depend on a model download.
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
    scales = {QT.Q4_0: [0], QT.Q4_1: [0, 2], QT.Q5_0: [0], QT.Q8_0: [0], QT.Q4_K: [0, 2], QT.Q6_K: [208]}[q]
    for off in scales:
        b[:, off:off + 2] = rng.uniform(-0.02, 0.02, len(b)).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return QuantTensor(b.reshape(rows, -1), q, (rows, cols))


def timeit(fn, repeats):
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)), float(np.min(ts))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--types", nargs="+", default=["Q4_1", "Q8_0"])
    ap.add_argument("--no-blas", action="store_true", help="skip the float32 BLAS column (its weight is 4 bytes/value)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

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
                        cells = [f"{k[:-3]} {r[k]:8.0f}us {r[k[:-3] + '_GBps']:5.1f}GB/s"
                                 for k in r if k.endswith("_us") and not k.endswith("best_us")]
                        print(f"{tname} {name:22s} t={nt}  " + " | ".join(cells), flush=True)
    if args.json:
        print(json.dumps({"rows": rows_out, "cpu_count": os.cpu_count(), "total_s": time.perf_counter() - t0}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
