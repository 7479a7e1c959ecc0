"""`spark-lab bench kernels`: where each kernel sits on this machine's roofline.

1. Measure the two limits: streaming memory bandwidth (a large read-reduce and a large copy)
   and float32 GEMM throughput (BLAS on the CPU, cuBLAS on a GPU).
2. Time every kernel at the sizes the shipped models use (SmolLM2-135M, Gemma3-270M, a small
   UNet block), count its compulsory bytes and its FLOPs, and report GB/s and GFLOP/s as
   fractions of those limits and of the roof min(peak, bandwidth * FLOP/byte).
Limits and kernels are timed the same way: the best of at least REPEATS runs, each run a loop
of at least MIN_SECONDS (a shared machine only ever makes a run slower, so the best run is the
machine's). The roof is the best measured: where a kernel beats the GEMM (or streams its
bytes faster than the 1 MB cache read), the roof is raised to it and the report says so, so
no point is ever drawn above the roof.
Decode-time kernels (one token) should sit on the bandwidth roof; prefill GEMMs and conv2d
should approach the GEMM peak.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass

import numpy as np

from .. import kernels as K
from ..device import get_device, num_threads, set_threads, synchronize, to_device

# model shapes (from the GGUF metadata of the shipped models)
REPEATS = 5                     # at least this many timed runs per kernel; the best counts
LIMIT_TRIES = 3                 # the limits (the yardstick) get this many times more runs
MIN_SECONDS = 0.01              # each timed run loops a kernel for at least this long

SMOL = dict(d=576, heads=9, kv_heads=3, head_dim=64, ffn=1536, vocab=49152)
GEMMA = dict(d=640, heads=4, kv_heads=1, head_dim=256, ffn=2048, vocab=262144, window=512)
UNET = dict(channels=64, size=32, groups=32)


@dataclass
class Result:
    name: str          # kernel and where it runs, e.g. "linear smollm2 ffn_up (decode)"
    shape: str         # the operand shapes
    seconds: float     # best time of one call
    bytes: int         # compulsory traffic: inputs + weights + outputs, read or written once
    flops: int         # nominal floating-point operations
    impl: str = ""     # which code path ran (e.g. the quantized mat-vec used)

    @property
    def gbs(self) -> float:
        return self.bytes / self.seconds / 1e9

    @property
    def gflops(self) -> float:
        return self.flops / self.seconds / 1e9

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes


# ------------------------------------------------------------------------------ timing

def best_time(fn, repeats: int = REPEATS, min_seconds: float = MIN_SECONDS) -> float:
    """Best-of-`repeats` seconds per call; tiny kernels run in loops of >= min_seconds."""
    fn()
    synchronize()                                  # warm-up (and CUDA compile) outside the clock
    t0 = time.perf_counter()
    fn()
    synchronize()
    once = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, min(1000, int(min_seconds / once)))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        synchronize()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def measure_limits(xp, quick: bool, repeats: int) -> dict:
    """Streaming bandwidth (GB/s) and float32 GEMM rate (GFLOP/s) of the current device."""
    gpu = xp is not np
    repeats = max(repeats, REPEATS) * LIMIT_TRIES
    n = (256 if gpu else 64) << 20 if quick else (1024 if gpu else 512) << 20   # bytes
    a = xp.ones(n // 4, dtype=np.float32)
    b = xp.empty_like(a)
    # a max-reduce streams the array once (np.sum's pairwise adds are compute-bound on one core)
    read = n / best_time(lambda: a.max(), repeats) / 1e9
    copy = 2 * n / best_time(lambda: xp.copyto(b, a), repeats) / 1e9      # read + write
    del a, b
    c = xp.ones((1 << 20) // 4, dtype=np.float32)                         # 1 MB: stays in L2
    cache = c.nbytes / best_time(lambda: c.max(), repeats) / 1e9
    m = (4096 if gpu else 512) if quick else (8192 if gpu else 1024)
    x = to_device(np.random.default_rng(0).standard_normal((m, m), dtype=np.float32))
    y = x.copy()
    gemm = 2 * m ** 3 / best_time(lambda: x @ y, repeats) / 1e9
    return {"read_gbs": read, "copy_gbs": copy, "bandwidth_gbs": max(read, copy), "cache_gbs": cache,
            "gemm_gflops": gemm, "gemm_size": m, "stream_bytes": n, "repeats": repeats}


# ------------------------------------------------------------------------------ cases

def _rand(shape, seed=0, scale=1.0):
    return to_device((np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32))


def _quant_blocks(rows: int, cols: int, qname: str, seed: int = 0) -> np.ndarray:
    """Random but valid GGML blocks (uint8 [rows, row_bytes]) without running a quantizer."""
    rng = np.random.default_rng(seed)
    nb = cols // 32
    if qname == "Q8_0":
        blk = rng.integers(0, 256, size=(rows, nb, 34), dtype=np.uint8)
        blk[..., :2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)            # scale d
    elif qname == "Q4_1":
        blk = rng.integers(0, 256, size=(rows, nb, 20), dtype=np.uint8)
        blk[..., :4] = np.frombuffer(np.array([0.01, -0.08], np.float16).tobytes(), np.uint8)  # d, m
    else:
        raise ValueError(f"no block generator for {qname}")
    return blk.reshape(rows, -1)


def _quant_case(name, rows, cols, qname, xp):
    """(fn, bytes, impl) for x[1, cols] @ W[rows, cols].T with W in a GGML block format."""
    import gguf

    from ..quants import QuantTensor, quant_matmul
    qtype = gguf.GGMLQuantizationType[qname]
    qt = QuantTensor(to_device(_quant_blocks(rows, cols, qname)), qtype, (rows, cols))
    x = _rand((1, cols), 1)
    fn, impl = (lambda: K.linear(x, qt)), "kernels.linear (CUDA qmatvec)"
    if xp is np:
        fn, impl = (lambda: quant_matmul(x, qt)), "quants.quant_matmul"
        try:
            from ..kernels.qmatvec import qmatvec
            qmatvec(x, qt)
            fn, impl = (lambda: qmatvec(x, qt)), "kernels.qmatvec"
        except Exception:       # not written yet, or another signature: the generic path stands in
            pass
    return fn, qt.nbytes + 4 * (cols + rows), impl


def kernel_cases(xp, quick: bool):
    """[(name, shape, fn, bytes, flops, impl)] at the shipped models' sizes."""
    s, g, u = SMOL, GEMMA, UNET
    cases = []

    def add(name, shape, fn, nbytes, flops, impl=""):
        cases.append((name, shape, fn, int(nbytes), int(flops), impl))

    # --- SmolLM2-135M
    d, f, V = s["d"], s["ffn"], s["vocab"]
    x1, w_up, w_down = _rand((1, d)), _rand((f, d), 1, 0.05), _rand((d, f), 2, 0.05)
    add("linear smollm2 ffn_up (decode)", f"[1,{d}]x[{f},{d}]", lambda: K.linear(x1, w_up), 4 * (d * f + d + f), 2 * d * f)
    P = 32 if quick else 128
    xp_, hp = _rand((P, f), 3), _rand((P, d), 4)
    add(f"linear smollm2 ffn_down (prefill {P})", f"[{P},{f}]x[{d},{f}]", lambda: K.linear(xp_, w_down),
        4 * (d * f + P * f + P * d), 2 * P * d * f)
    if not quick:
        w_head = _rand((V, d), 5, 0.05)
        add("linear smollm2 lm_head f32 (decode)", f"[1,{d}]x[{V},{d}]", lambda: K.linear(x1, w_head), 4 * (V * d + d + V), 2 * V * d)
    for qname, rows, cols, what in (("Q4_1", f, d, "ffn_up"), ("Q8_0", f, d, "ffn_up"),
                                    ("Q4_1", d, f, "ffn_down"), ("Q8_0", V, d, "lm_head")):
        fn, nbytes, impl = _quant_case(what, rows, cols, qname, xp)
        add(f"qmatvec {qname} smollm2 {what} (decode)", f"[1,{cols}]x[{rows},{cols}]", fn, nbytes, 2 * rows * cols, impl)
    wn = _rand(d, 6)
    add("rmsnorm smollm2 (decode)", f"[1,{d}]", lambda: K.rmsnorm(x1, wn, 1e-5), 4 * (2 * d + d), 4 * d)
    add(f"rmsnorm smollm2 (prefill {P})", f"[{P},{d}]", lambda: K.rmsnorm(hp, wn, 1e-5), 4 * (2 * P * d + d), 4 * P * d)
    H, Hk, D = s["heads"], s["kv_heads"], s["head_dim"]
    qr, pos = _rand((P, H, D), 7), to_device(np.arange(P))
    add(f"rope smollm2 q (prefill {P})", f"[{P},{H},{D}]", lambda: K.rope(qr, pos, 100000.0), 8 * P * H * D, 3 * P * H * D)
    ctx = 256 if quick else 1024
    q1, kc, vc = _rand((1, H, D), 8), _rand((ctx, Hk, D), 9), _rand((ctx, Hk, D), 10)
    add(f"attention smollm2 (decode, ctx {ctx})", f"q[1,{H},{D}] kv[{ctx},{Hk},{D}]",
        lambda: K.attention(q1, kc, vc, q_offset=ctx - 1), 4 * (2 * ctx * Hk * D + 2 * H * D), 4 * H * ctx * D)
    qp, kp, vp = _rand((P, H, D), 11), _rand((P, Hk, D), 12), _rand((P, Hk, D), 13)
    add(f"attention smollm2 (prefill {P})", f"q[{P},{H},{D}] kv[{P},{Hk},{D}]",
        lambda: K.attention(qp, kp, vp), 4 * (2 * P * H * D + 2 * P * Hk * D), 4 * H * P * P * D)
    logits = _rand((1, V), 14, 5.0)
    add("softmax smollm2 vocab", f"[1,{V}]", lambda: K.softmax(logits), 8 * V, 4 * V)
    gt, ut = _rand((P, f), 15), _rand((P, f), 16)
    add(f"swiglu smollm2 (prefill {P})", f"[{P},{f}]", lambda: K.swiglu(gt, ut), 12 * P * f, 5 * P * f)

    # --- Gemma3-270M
    d, f, V = g["d"], g["ffn"], g["vocab"]
    H, Hk, D = g["heads"], g["kv_heads"], g["head_dim"]
    xg, wg = _rand((1, d), 17), _rand((f, d), 18, 0.05)
    add("linear gemma3 ffn_gate (decode)", f"[1,{d}]x[{f},{d}]", lambda: K.linear(xg, wg), 4 * (d * f + d + f), 2 * d * f)
    if not quick:
        fn, nbytes, impl = _quant_case("lm_head", V, d, "Q8_0", xp)
        add("qmatvec Q8_0 gemma3 lm_head (decode)", f"[1,{d}]x[{V},{d}]", fn, nbytes, 2 * V * d, impl)
    qg, posg = _rand((P, H, D), 19), to_device(np.arange(P))
    add(f"rope gemma3 q neox (prefill {P})", f"[{P},{H},{D}]", lambda: K.rope(qg, posg, 1e6, neox=True), 8 * P * H * D, 3 * P * H * D)
    ctx = 256 if quick else 1024
    qd, kd, vd = _rand((1, H, D), 20), _rand((ctx, Hk, D), 21), _rand((ctx, Hk, D), 22)
    W = min(g["window"], ctx)
    add(f"attention gemma3 sliding (decode, ctx {ctx})", f"q[1,{H},{D}] kv[{ctx},{Hk},{D}] w{W}",
        lambda: K.attention(qd, kd, vd, q_offset=ctx - 1, window=W), 4 * (2 * W * Hk * D + 2 * H * D), 4 * H * W * D)
    ga = _rand((P, f), 23)
    add(f"gelu tanh gemma3 (prefill {P})", f"[{P},{f}]", lambda: K.gelu(ga, "tanh"), 8 * P * f, 8 * P * f)

    # --- a small UNet block
    C, S, G = u["channels"], u["size"], u["groups"]
    N = 1 if quick else 2
    xu, wu, bu = _rand((N, C, S, S), 24), _rand((C, C, 3, 3), 25, 0.05), _rand(C, 26)
    add(f"conv2d unet 3x3 (N={N})", f"[{N},{C},{S},{S}]x[{C},{C},3,3]", lambda: K.conv2d(xu, wu, bu, padding=1),
        4 * (2 * N * C * S * S + C * C * 9 + C), 2 * N * C * C * 9 * S * S)
    gw, gb = _rand(C, 27), _rand(C, 28)
    add(f"group_norm unet (N={N})", f"[{N},{C},{S},{S}] g{G}", lambda: K.group_norm(xu, G, gw, gb, 1e-5),
        4 * (2 * N * C * S * S + 2 * C), 8 * N * C * S * S)
    add(f"gelu exact unet (N={N})", f"[{N},{C},{S},{S}]", lambda: K.gelu(xu), 8 * N * C * S * S, 30 * N * C * S * S)
    return cases


# ------------------------------------------------------------------------------ run + report

def run(quick: bool = False, repeats: int = 3, threads: int | None = None) -> dict:
    """Measure the limits, time every case; a JSON-able dict."""
    if threads is not None:
        set_threads(threads)
    dev = get_device()
    xp = dev.xp
    repeats = max(repeats, REPEATS)                # limits and kernels: the same best-of-n timing
    limits = {**measure_limits(xp, quick, repeats), "kernel_repeats": repeats}
    results = [Result(name, shape, best_time(fn, repeats), nbytes, flops, impl)
               for name, shape, fn, nbytes, flops, impl in kernel_cases(xp, quick)]
    # the roof is the best measured: the GEMM, unless a kernel ran faster (noise, or a better
    # code path); the top bandwidth roof likewise covers kernels whose operands stayed in cache
    fastest = max(results, key=lambda r: r.gflops)
    peak, peak_from = limits["gemm_gflops"], f"GEMM {limits['gemm_size']}^3"
    if fastest.gflops > peak:
        peak, peak_from = fastest.gflops, fastest.name
    streamer = max(results, key=lambda r: r.gbs)
    cache, cache_from = limits["cache_gbs"], "1 MB read"
    if streamer.gbs > cache:
        cache, cache_from = streamer.gbs, streamer.name
    rows = []
    for r in results:
        roof = min(peak, limits["bandwidth_gbs"] * r.intensity)
        rows.append({**asdict(r), "gbs": r.gbs, "gflops": r.gflops, "intensity": r.intensity,
                     "frac_bandwidth": r.gbs / limits["bandwidth_gbs"],
                     "frac_gemm": r.gflops / peak,
                     "frac_roof": r.gflops / roof,
                     "bound": "memory" if limits["bandwidth_gbs"] * r.intensity < peak else "compute"})
    machine = {"device": dev.kind, "name": dev.name, "threads": threads or _blas_threads() or num_threads(),
               "quick": quick, **limits, "peak_gflops": peak, "peak_from": peak_from,
               "cache_roof_gbs": cache, "cache_roof_from": cache_from}
    return {"machine": machine, "kernels": rows}


def _blas_threads() -> int | None:
    """Threads the BLAS library will really use (OMP/OPENBLAS env vars or set_threads)."""
    try:
        from threadpoolctl import threadpool_info
        return max((i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas"), default=None)
    except Exception:
        return None


def format_table(results: dict) -> str:
    m = results["machine"]
    lines = [f"{m['device']} {m['name']}  threads={m['threads']}  "
             f"memory: read {m['read_gbs']:.1f} GB/s, copy {m['copy_gbs']:.1f} GB/s (1 MB in cache: {m['cache_gbs']:.0f} GB/s)  "
             f"GEMM f32 ({m['gemm_size']}^3): {m['gemm_gflops']:.1f} GFLOP/s  "
             f"(limits: best of {m.get('repeats', REPEATS)} runs, kernels: of {m.get('kernel_repeats', REPEATS)})"
             + (f"\npeak {m['peak_gflops']:.1f} GFLOP/s: {m['peak_from']} ran faster than the GEMM"
                if m.get("peak_from", "GEMM").split()[0] != "GEMM" else ""),
             f"{'kernel':44s} {'shape':34s} {'time':>10s} {'GB/s':>8s} {'GFLOP/s':>9s} {'%BW':>6s} {'%GEMM':>6s} {'%roof':>6s}  bound"]
    for r in results["kernels"]:
        t = r["seconds"]
        ts = f"{t * 1e6:.1f} us" if t < 1e-3 else f"{t * 1e3:.2f} ms"
        lines.append(f"{r['name']:44s} {r['shape']:34s} {ts:>10s} {r['gbs']:8.2f} {r['gflops']:9.2f} "
                     f"{100 * r['frac_bandwidth']:5.0f}% {100 * r['frac_gemm']:5.0f}% {100 * r['frac_roof']:5.0f}%  {r['bound']}")
    lines.append("%BW above 100% means the operands stayed in cache (a SmolLM2 layer's f32 matrices are a few MB).")
    impls = sorted({r["impl"] for r in results["kernels"] if r["impl"]})
    if impls:
        lines.append("quantized mat-vec path: " + ", ".join(impls))
    return "\n".join(lines)


def _round_up(v: float) -> float:
    """Three significant figures, rounded up (a roof rounded down could pass under its own point)."""
    step = 10.0 ** (math.floor(math.log10(v)) - 2)
    return math.ceil(v / step) * step


def roofline_figure(results: dict, title: str | None = None):
    """A plotly log-log roofline of this machine with every measured kernel as a point; the roofs
    are the best measured (see the module docstring), so every point is on or under them."""
    from ..plots import roofline
    m = results["machine"]
    n, nk = m.get("repeats", REPEATS), m.get("kernel_repeats", REPEATS)
    pts = [{"name": r["name"], "intensity": r["intensity"], "gflops": r["gflops"]} for r in results["kernels"]]
    peak = m.get("peak_gflops", m["gemm_gflops"])
    peak_from = m.get("peak_from", f"GEMM {m['gemm_size']}^3")
    cache_from = m.get("cache_roof_from", "1 MB read")
    roofs = {"memory": _round_up(m["bandwidth_gbs"]),
             "cache" + ("" if cache_from == "1 MB read" else f" ({cache_from})"):
                 _round_up(m.get("cache_roof_gbs", m["cache_gbs"]))}
    note = (f"peak: the best of {n} runs of a {peak_from}" if peak_from.startswith("GEMM")
            else f"peak: {peak_from}, faster than the best of {n} GEMM runs ({m['gemm_gflops']:.3g} GFLOP/s)")
    note += f"; each kernel: the best of {nk} runs"
    return roofline(pts, _round_up(peak), roofs, peak_note=note,
                    title=title or f"Kernel roofline: {m['device']} {m['name']} "
                                   f"({m['threads']} thread{'s' * (m['threads'] != 1)})")


def main(args) -> int:
    results = run(quick=bool(getattr(args, "quick", False)), repeats=int(getattr(args, "repeats", 3) or 3),
                  threads=getattr(args, "threads", None))
    if getattr(args, "json", False):
        print(json.dumps(results, indent=2))
    else:
        print(format_table(results))
    return 0
