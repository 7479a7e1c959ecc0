"""Decode attention at long context: one layer, one query token, per KV cache type.

    python -m spark_lab.benchmarks.attention [--ctx 16384] [--threads 2]

Shapes are Llama-3-8B's (32 query heads, 8 KV heads, head dim 128). The compulsory traffic of
a step is the visible K and V rows in their storage type (q8_0: int8 codes plus one float32
scale per 32 values), so GB/s here is comparable with the machine's streaming bandwidth and
with the weights' mat-vecs. Best of REPEATS timed calls after one warm-up (a shared machine
only makes a call slower).
"""
from __future__ import annotations

import argparse
import importlib
import os
import time
from dataclasses import dataclass

import numpy as np

from ..kernels.decode_attention import attention_into
from ..llm.cache import KVCache

LLAMA3_8B = dict(heads=32, kv_heads=8, head_dim=128)
REPEATS = 7


@dataclass
class Row:
    kv_type: str
    ctx: int
    ms: float          # best wall time of a call
    gbs: float         # compulsory bytes / best wall time
    cpu_ms: float      # best CPU time of a call, all threads (less sensitive to a loaded machine)


def _storage(k, v, t):
    """k, v f32 [T, Hkv, D] -> (k, k scales or None, v, v scales or None) as the KV cache stores type t."""
    c = KVCache(1, k.shape[0], k.shape[1], k.shape[2], type_k=t, type_v=t)
    c.write(0, 0, k, v)
    return tuple(None if a is None else a[0] for a in (c.k, c.k_scale, c.v, c.v_scale))


def measure(kv_type: str, ctx: int = 16384, seed: int = 0, kernel=attention_into) -> Row:
    s = LLAMA3_8B
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((s["heads"], s["head_dim"]), dtype=np.float32)
    shape = (ctx, s["kv_heads"], s["head_dim"])
    k, ks, v, vs = _storage(rng.standard_normal(shape, dtype=np.float32), rng.standard_normal(shape, dtype=np.float32), kv_type)
    out = np.empty((s["heads"], s["head_dim"]), np.float32)
    scale = 1.0 / np.sqrt(s["head_dim"])
    if not kernel(q, k, v, scale, 0, ctx, out, ks, vs):          # warm-up / compile
        raise RuntimeError("the decode attention kernel needs numba")
    best = cpu = np.inf
    for _ in range(REPEATS):
        t0, c0 = time.perf_counter(), time.process_time()
        kernel(q, k, v, scale, 0, ctx, out, ks, vs)
        best, cpu = min(best, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
    nbytes = sum(a.nbytes for a in (k, v) + tuple(x for x in (ks, vs) if x is not None))
    return Row(kv_type, ctx, best * 1e3, nbytes / best / 1e9, cpu * 1e3)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ctx", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--types", default="f32,f16,q8_0")
    ap.add_argument("--module", default=None, help="time attention_into of another module (e.g. an older copy)")
    a = ap.parse_args(argv)
    if a.threads:
        from ..device import set_threads
        set_threads(a.threads)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for t in a.types.split(","):
        r = measure(t, a.ctx, kernel=importlib.import_module(a.module).attention_into if a.module else attention_into)
        print(f"{r.kv_type:5s} ctx {r.ctx:6d}  {r.ms:7.2f} ms/layer  {r.gbs:5.2f} GB/s  {r.cpu_ms:7.2f} cpu ms")


if __name__ == "__main__":
    main()
