"""Softmax and the pointwise activations: SiLU, GELU (exact and tanh), SwiGLU, GEGLU.

Scalars are Python floats so float32 inputs stay float32 under NumPy 2's promotion rules.
"""
from __future__ import annotations

import math
import threading
from contextlib import contextmanager

import numpy as np

from ..device import array_module, num_threads

_SQRT_HALF = math.sqrt(0.5)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
# Chebyshev fit of erfc(z) = t * exp(-z^2 + P(t)), t = 1 / (1 + z/2), z >= 0, with a
# fractional error below 1.2e-7 everywhere (Press et al., Numerical Recipes, section 6.2).
# NumPy has no erf, and a relative bound on erfc keeps gelu's negative tail accurate.
_ERFC_COEFFS = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806,
                0.27886807, -1.13520398, 1.48851587, -0.82215223, 0.17087277)


# ---------------------------------------------------------------------------- rows on our own threads

SPLIT_MIN_WORK = 1 << 17   # elements (or multiply-adds / 16) below which split_rows stays on this thread (~50-100 us)
SPLIT_PIECES = 1           # pieces per thread (SDXL bench, 2 threads: 1 piece 2.41 s, 2: 2.60 s, 4: 2.58 s)
_SPLIT = 1            # threads split_rows uses: > 1 only inside `row_threads()`
_POOL = None          # (size, ThreadPoolExecutor): split_rows' helper threads
_BLAS = None          # threadpoolctl controllers of the loaded OpenBLAS libraries
_HELPER = "spark_lab-rows"   # the helper threads' name prefix
_LOCAL = threading.local()   # .solo: this thread runs a share_items item (its split_rows stay here)


def split_rows(kernel, n: int, *args, work: int | None = None) -> None:
    """kernel(*args, lo, hi) over rows [0, n): inside `row_threads()`, in contiguous pieces that
    this thread and the helper threads take in turn until none is left (the kernel must release
    the GIL: numba nogil, a BLAS call); elsewhere, or for less than SPLIT_MIN_WORK of work
    (default n), in one call here. Pieces are taken, not handed out: a helper thread that wakes
    late finds its piece done by the caller instead of keeping the caller waiting."""
    t = min(_SPLIT, n)
    if t <= 1 or (n if work is None else work) < SPLIT_MIN_WORK or _on_own():
        kernel(*args, 0, n)                       # (a helper thread never waits on its own pool)
        return
    _pool(t)
    k = min(n, SPLIT_PIECES * t)
    cuts = [n * i // k for i in range(k + 1)]
    order = iter(range(k))                        # next() on it is atomic under the GIL

    def take():
        for i in order:
            kernel(*args, cuts[i], cuts[i + 1])
    futures = [_POOL[1].submit(take) for _ in range(t - 1)]
    try:
        take()
    finally:
        for f in futures:
            f.result()


def _on_own() -> bool:
    """True on a helper thread or inside a share_items item: split_rows runs its kernel right here."""
    return getattr(_LOCAL, "solo", False) or threading.current_thread().name.startswith(_HELPER)


def _pool(t: int):
    """split_rows' executor, grown to at least t - 1 helper threads."""
    global _POOL
    if _POOL is None or _POOL[0] < t - 1:
        from concurrent.futures import ThreadPoolExecutor
        _POOL = (t - 1, ThreadPoolExecutor(t - 1, thread_name_prefix=_HELPER))
    return _POOL[1]


def row_share_count(n: int) -> int:
    """How many threads share_items would spread n items over (1 outside row_threads())."""
    return 1 if _on_own() else max(1, min(_SPLIT, n))


def share_items(fn, n: int) -> list:
    """[fn(0), ..., fn(n-1)]: inside `row_threads()`, the items taken in turn by this thread and the
    helper threads, each item whole on one thread (the split_rows calls inside it stay on that
    thread, so the threads never wait on each other until the end); elsewhere one after another
    here. For independent pieces of work big enough to keep a core busy (a UNet forward on one
    batch row): no per-kernel hand-offs, and the GIL is taken only between kernels."""
    t = row_share_count(n)
    if t <= 1:
        return [fn(i) for i in range(n)]
    out = [None] * n
    order = iter(range(n))                        # next() on it is atomic under the GIL

    def take():
        was, _LOCAL.solo = getattr(_LOCAL, "solo", False), True
        try:
            for i in order:
                out[i] = fn(i)
        finally:
            _LOCAL.solo = was
    futures = [_pool(t).submit(take) for _ in range(t - 1)]
    try:
        take()
    finally:
        for f in futures:
            f.result()
    return out


@contextmanager
def row_threads(n: int | None = None):
    """Within: OpenBLAS runs on the calling thread only and split_rows shares rows among n threads
    (default num_threads()), so every kernel of a model's forward (GEMM shares, norms, softmax,
    activations) uses the same few threads, which sleep when idle.

    Why not OpenBLAS's own threads plus numba's parallel=True: their workers spin after each
    call, and a UNet alternates a GEMM and a pointwise pass every fraction of a millisecond, so
    a pool's spinning worker kept the other pool's thread off the second core (a block of
    attention: 8x slower on 2 cores). UNet2DConditionModel runs big inputs inside this.
    """
    global _SPLIT, _BLAS
    n = num_threads() if n is None else int(n)
    if n <= 1 or _SPLIT > 1:                      # one thread, or already inside
        yield
        return
    if _BLAS is None:
        try:
            from threadpoolctl import ThreadpoolController
            _BLAS = [c for c in ThreadpoolController().lib_controllers if c.internal_api == "openblas"]
        except ImportError:
            _BLAS = []
    before = [c.num_threads for c in _BLAS]
    for c in _BLAS:
        c.set_num_threads(1)
    _SPLIT = n
    try:
        yield
    finally:
        _SPLIT = 1
        for c, k in zip(_BLAS, before):
            c.set_num_threads(k)


def matmul_rows(x, w, out, b=None):
    """out = x @ w (+ b) for x [M, K], w [K, N] (a view, e.g. a weight's .T), out [M, N]: shares on
    split_rows' threads, each one single-threaded BLAS call. Shares of rows when x is the bigger
    operand (M >= N), else of columns, so that the threads read the bigger one once between them
    (Flux, 288 rows x 768 -> 3072: columns 4.7 ms, rows 5.1 ms on 2 threads)."""
    M, N = out.shape
    work = M * N * x.shape[1] // 16
    if M >= N:
        split_rows(_mm_rows, M, x, w, b, out, work=work)
    else:
        split_rows(_mm_cols, N, x, w, b, out, work=work)
    return out


def _mm_rows(x, w, b, out, lo, hi):
    o = np.matmul(x[lo:hi], w, out=out[lo:hi])
    if b is not None:
        o += b


def _mm_cols(x, w, b, out, lo, hi):
    o = out[:, lo:hi]
    np.matmul(x, w[:, lo:hi], out=o)
    if b is not None:
        o += b[lo:hi]


def softmax(x, axis=-1, mask=None):
    """exp(x - max) / sum over `axis`; mask: bool (True = keep) or additive float, broadcastable.

    Rows where every entry is masked come out as zeros, not NaN.
    """
    xp = array_module(x)
    neg_inf, zero = x.dtype.type(-math.inf), x.dtype.type(0.0)   # typed: no float64 from where()
    if mask is not None:
        if mask.dtype == bool:                            # -> additive, on the mask's (smaller) shape:
            mask = xp.where(mask, zero, neg_inf)          # where() is branchy and slow, an add is SIMD
        x = x + mask
    elif xp.__name__ == "cupy" and axis in (-1, x.ndim - 1) and x.dtype == np.float32:
        from . import cuda_kernels
        return cuda_kernels.softmax(x)
    m = xp.max(x, axis=axis, keepdims=True)
    m = xp.where(m == neg_inf, zero, m)                   # fully masked rows: exp(-inf) = 0
    e = x - m
    xp.exp(e, out=e)
    s = e.sum(axis=axis, keepdims=True)
    e /= xp.where(s > zero, s, x.dtype.type(1.0))
    return e


def silu(x):
    """x * sigmoid(x)."""
    xp = array_module(x)
    with np.errstate(over="ignore"):                      # exp(-x) -> inf for x << 0 gives -0.0, fine
        return x / (1.0 + xp.exp(-x))


def _phi(x):
    """Standard normal CDF, Phi(x) = erfc(-x / sqrt 2) / 2, with a relative error ~1e-7."""
    xp = array_module(x)
    z = xp.abs(x)
    z *= _SQRT_HALF                                       # z = |x| / sqrt 2
    t = 0.5 * z
    t += 1.0
    xp.reciprocal(t, out=t)                               # t = 1 / (1 + z/2)
    p = _ERFC_COEFFS[-1] * t                              # Horner, in place: no temporaries per term
    for c in _ERFC_COEFFS[-2:0:-1]:
        p += c
        p *= t
    p += _ERFC_COEFFS[0]
    z *= z
    p -= z
    xp.exp(p, out=p)
    p *= t
    p *= 0.5                                              # p = Phi(-|x|)
    neg = (x < 0.0).astype(x.dtype)                       # 1.0 where x < 0
    # x < 0: p, else 1 - p; a 0/1 blend is exact, and where() is ~10x slower on random signs
    return p * neg + (1.0 - p) * (1.0 - neg)


def gelu(x, approximate="none"):
    """x * Phi(x) ("none", torch's default) or the tanh approximation ("tanh", GPT-2, Gemma)."""
    xp = array_module(x)
    if approximate == "tanh":
        return 0.5 * x * (1.0 + xp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * (x * x * x))))
    if approximate != "none":
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    if xp.__name__ == "cupy":
        erf = getattr(xp, "erf", None)             # device_strict (SPARK_LAB_DEVICE=strict) carries one
        if erf is None:
            from cupyx.scipy.special import erf
        return 0.5 * x * (1.0 + erf(x * _SQRT_HALF))
    return x * _phi(x)


def quick_gelu(x):
    """x * sigmoid(1.702 x) (OpenAI CLIP's activation)."""
    return silu(1.702 * x) * (1.0 / 1.702)


def swiglu(gate, up):
    """silu(gate) * up; gate, up [..., ffn] -> [..., ffn] (llama, qwen MLPs)."""
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    return silu(gate) * up


def geglu(x):
    """h, g = split(x, 2, -1); h * gelu(g); x [..., 2f] -> [..., f] (diffusers' GEGLU)."""
    if x.shape[-1] % 2:
        raise ValueError(f"geglu: last dim of x {tuple(x.shape)} is odd, cannot split in two")
    f = x.shape[-1] // 2
    if x.size >= GEGLU_FUSED_MIN and array_module(x) is np and x.dtype == np.float32:
        out = _geglu_fused(x)
        if out is not None:
            return out
    return x[..., :f] * gelu(x[..., f:])


# geglu on this many elements or more takes one fused numba pass (the NumPy body above is the
# reference): _phi's dozen array passes become one loop, and exp is a polynomial LLVM vectorizes
# (numba's np.exp is a scalar libm call). 10x faster on a UNet's [2, 256, 1024] feed-forward.
# fastmath lets LLVM vectorize the first loop's selects and divide: [1024, 1024] 0.90 -> 0.56 ms on one
# thread (torch 0.59), the same numbers to ~1e-7 of the largest.
GEGLU_FUSED_MIN = 1 << 14
_GEGLU = None   # compiled on first use; False without numba


def _compile_geglu():
    global _GEGLU
    try:
        import numba
    except ImportError:
        _GEGLU = False
        return _GEGLU
    c = tuple(np.float32(v) for v in _ERFC_COEFFS)
    sqrt_half, log2e = np.float32(_SQRT_HALF), np.float32(1.0 / math.log(2.0))
    ln2_hi, ln2_lo = np.float32(0.693359375), np.float32(-2.12194440e-4)

    @numba.njit(cache=True, nogil=True, error_model="numpy", fastmath=True)
    def kernel(x, out, lo, hi):
        # rows lo..hi-1 of x [R, 2f], out [R, f]: out = x[:, :f] * g * Phi(g), g = x[:, f:]
        f = out.shape[1]
        pe = np.empty(f, np.float32)            # e^r * t / 2, per column
        b1 = np.empty(f, np.int32)              # 2^n = 2^n1 * 2^n2 (two normal factors reach
        b2 = np.empty(f, np.int32)              # the subnormal tail, like np.exp)
        s1, s2 = b1.view(np.float32), b2.view(np.float32)
        for r in range(lo, hi):
            for j in range(f):
                g = x[r, f + j]
                z = abs(g) * sqrt_half
                t = np.float32(1.0) / (np.float32(1.0) + np.float32(0.5) * z)
                p = c[9]
                p = p * t + c[8]
                p = p * t + c[7]
                p = p * t + c[6]
                p = p * t + c[5]
                p = p * t + c[4]
                p = p * t + c[3]
                p = p * t + c[2]
                p = p * t + c[1]
                a = max(p * t + c[0] - z * z, np.float32(-103.0))   # erfc(z) = t e^a
                n = np.floor(a * log2e + np.float32(0.5))
                rr = a - n * ln2_hi - n * ln2_lo
                q = np.float32(1.0 / 5040.0)
                q = q * rr + np.float32(1.0 / 720.0)
                q = q * rr + np.float32(1.0 / 120.0)
                q = q * rr + np.float32(1.0 / 24.0)
                q = q * rr + np.float32(1.0 / 6.0)
                q = q * rr + np.float32(0.5)
                q = q * rr + np.float32(1.0)
                q = q * rr + np.float32(1.0)
                pe[j] = q * t * np.float32(0.5)
                ni = np.int32(n)
                n1 = ni >> np.int32(1)
                b1[j] = (n1 + np.int32(127)) << np.int32(23)
                b2[j] = (ni - n1 + np.int32(127)) << np.int32(23)
            for j in range(f):
                g = x[r, f + j]
                lo = pe[j] * s1[j] * s2[j]                           # Phi(-|g|)
                phi = lo if g < np.float32(0.0) else np.float32(1.0) - lo
                out[r, j] = x[r, j] * (g * phi)

    _GEGLU = kernel
    return _GEGLU


def _geglu_fused(x):
    """geglu by the numba kernel; None without numba."""
    kern = _GEGLU if _GEGLU is not None else _compile_geglu()
    if kern is False:
        return None
    f = x.shape[-1] // 2
    x2 = np.ascontiguousarray(x.reshape(-1, 2 * f))                     # [R, 2f]
    out = np.empty((x2.shape[0], f), dtype=np.float32)
    split_rows(kern, x2.shape[0], x2, out, work=x2.size)              # rows on row_threads()
    return out.reshape(x.shape[:-1] + (f,))


# ---------------------------------------------------------------------------- tanh GELU in place

# gelu_tanh_ on this many float32 elements or more takes the numba kernel (6x less time than
# NumPy's tanh formula, which makes five passes and a temporary)
GELU_FUSED_MIN = 1 << 14
_GELU_TANH = None   # compiled on first use; False without numba


def _compile_gelu_tanh():
    global _GELU_TANH
    try:
        import numba
    except ImportError:
        _GELU_TANH = False
        return _GELU_TANH
    c1, c3 = np.float32(-2.0 * _SQRT_2_OVER_PI), np.float32(-2.0 * _SQRT_2_OVER_PI * 0.044715)
    log2e = np.float32(1.0 / math.log(2.0))
    ln2_hi, ln2_lo = np.float32(0.693359375), np.float32(-2.12194440e-4)

    @numba.njit(cache=True, nogil=True, error_model="numpy", fastmath=True)
    def kernel(x, lo, hi):
        # rows lo..hi-1 of x [R, n] in place: 0.5 x (1 + tanh(u)) = x / (1 + e^(-2u)),
        # u = sqrt(2/pi) (x + 0.044715 x^3); e^v = 2^k e^r as in group_norm's SiLU
        n = x.shape[1]
        e = np.empty(n, np.float32)
        b1 = np.empty(n, np.int32)
        b2 = np.empty(n, np.int32)
        s1, s2 = b1.view(np.float32), b2.view(np.float32)
        for r in range(lo, hi):
            row = x[r]
            for i in range(n):
                t = row[i]
                v = min(max(t * (c1 + c3 * t * t), np.float32(-103.0)), np.float32(88.0))
                k = np.floor(v * log2e + np.float32(0.5))
                rr = v - k * ln2_hi - k * ln2_lo
                q = np.float32(1.0 / 5040.0)
                q = q * rr + np.float32(1.0 / 720.0)
                q = q * rr + np.float32(1.0 / 120.0)
                q = q * rr + np.float32(1.0 / 24.0)
                q = q * rr + np.float32(1.0 / 6.0)
                q = q * rr + np.float32(0.5)
                q = q * rr + np.float32(1.0)
                q = q * rr + np.float32(1.0)
                e[i] = q
                ki = np.int32(k)
                k1 = ki >> np.int32(1)
                b1[i] = (k1 + np.int32(127)) << np.int32(23)
                b2[i] = (ki - k1 + np.int32(127)) << np.int32(23)
            for i in range(n):
                row[i] = row[i] / (np.float32(1.0) + e[i] * s1[i] * s2[i])

    _GELU_TANH = kernel
    return _GELU_TANH


def gelu_tanh_(x):
    """gelu(x, approximate="tanh") written over x itself (x: a fresh array the caller owns, e.g. a
    linear layer's output): one numba pass for big float32 arrays on the CPU, NumPy in place
    elsewhere. Same numbers as gelu(..., "tanh") to ~3e-7 relative."""
    xp = array_module(x)
    if (xp is np and x.dtype == np.float32 and x.size >= GELU_FUSED_MIN and x.flags.c_contiguous
            and x.ndim >= 1 and x.shape[-1] > 0):
        kern = _GELU_TANH if _GELU_TANH is not None else _compile_gelu_tanh()
        if kern is not False:
            x2 = x.reshape(-1, x.shape[-1])
            split_rows(kern, x2.shape[0], x2, work=x2.size)
            return x
    u = x * x
    u *= 0.044715
    u += 1.0
    u *= x
    u *= _SQRT_2_OVER_PI                                  # u = sqrt(2/pi) (x + 0.044715 x^3)
    xp.tanh(u, out=u)
    u += 1.0
    u *= 0.5
    x *= u
    return x
