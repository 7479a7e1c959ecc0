"""Prefill products on the CPU: the int8 GEMM (`qmatvec.qgemm`) vs dequantized tiles + BLAS, one
Llama-3-8B layer's matrices (Q4_K_M's types) with a 512-token x.

    .venv/bin/python benchmarks/qgemm.py [--tokens 512] [--threads 2] [--repeats 3]

Random blocks with valid scales (the speed does not depend on the values). Both columns are
`qmatmul`; "tiles + BLAS" is it with the GEMM turned off. Alternating runs, best of `repeats`;
GFLOP/s = 2 n out in / time. The load average is printed: the machine may be shared.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from gguf import GGMLQuantizationType as QT

SHAPES = [("attn_q/o", "Q4_K", 4096, 4096), ("attn_k/v", "Q4_K", 1024, 4096), ("ffn_gate/up", "Q4_K", 14336, 4096),
          ("ffn_down", "Q6_K", 4096, 14336), ("ffn_down", "Q4_K", 4096, 14336), ("(Q8_0)", "Q8_0", 4096, 4096)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    for v in ("SPARK_LAB_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[v] = str(a.threads)
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from test_qmatvec import random_weight
    from spark_lab.kernels import qmatvec as qm
    rng = np.random.default_rng(0)
    real = qm.qgemm
    print(f"{a.tokens} tokens, {a.threads} threads, load average {os.getloadavg()[0]:.1f}")
    for name, q, rows, cols in SHAPES:
        qt = random_weight(getattr(QT, q), rows, cols, rng)
        qm.prepare(qt)
        x = rng.standard_normal((a.tokens, cols)).astype(np.float32)
        res = {"int8 GEMM": [], "tiles + BLAS": []}
        for _ in range(a.repeats + 1):                                     # the first round warms up
            for mode in res:
                qm.qgemm = real if mode == "int8 GEMM" else (lambda *args, **kw: None)
                t = time.perf_counter()
                qm.qmatmul(x, qt)
                res[mode].append(time.perf_counter() - t)
        qm.qgemm = real
        cells = "  ".join(f"{m} {min(v[1:]) * 1e3:8.1f} ms {2 * a.tokens * rows * cols / min(v[1:]) / 1e9:6.1f} GFLOP/s"
                          for m, v in res.items())
        print(f"{name:12s} {q} {rows:5d}x{cols:<5d}  {cells}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
