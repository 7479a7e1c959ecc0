"""Normalisations: RMSNorm (decoders), LayerNorm (BERT, CLIP), GroupNorm (UNet, VAE).

Statistics are taken in the input's dtype (float32) with NumPy's pairwise sums; variances use
two passes (mean, then mean of squared deviations), which stays accurate when |mean| >> std.
"""
from __future__ import annotations

import math

import numpy as np

from ..device import array_module
from .activations import split_rows


def _check_vec(name, x, v, n, what):
    if v is not None and tuple(v.shape) != (n,):
        raise ValueError(f"{name}: {what} {tuple(v.shape)} does not match x {tuple(x.shape)} (want [{n}])")


def rmsnorm(x, w, eps, offset=0.0):
    """x [..., d] / rms(x) * (w + offset), w [d] -> [..., d].

    Gemma's checkpoints (transformers) store w - 1 and compute x * (1 + w): pass offset=1.0
    for those. llama.cpp's GGUF conversion already adds the 1 (convert_hf_to_gguf.py,
    `Gemma3Model.norm_shift = 1.0`, applied to every `*norm.weight`), so Gemma GGUF files
    take offset=0.0 like every other architecture.
    """
    d = x.shape[-1]
    _check_vec("rmsnorm", x, w, d, "weight")
    xp = array_module(x)
    if xp.__name__ == "cupy":
        from . import cuda_kernels
        return cuda_kernels.rmsnorm(x, w, float(eps), float(offset))
    r = (x * x).sum(axis=-1, keepdims=True)              # [..., 1]; in place from here: this runs
    r *= 1.0 / d                                          # 61 times per decoded token, so fewer
    r += float(eps)                                       # temporaries matter more than elegance
    xp.sqrt(r, out=r)
    y = x / r                                             # [..., d]
    y *= (w + float(offset)) if offset else w
    return y


def layernorm(x, w, b, eps):
    """(x - mean) / sqrt(var + eps) * w + b over the last dim; x [..., d], w/b [d] or None."""
    d = x.shape[-1]
    _check_vec("layernorm", x, w, d, "weight")
    _check_vec("layernorm", x, b, d, "bias")
    xp = array_module(x)
    mu = xp.mean(x, axis=-1, keepdims=True)               # [..., 1]
    xc = x - mu                                           # [..., d]
    var = xp.mean(xc * xc, axis=-1, keepdims=True)        # [..., 1] (biased, like torch)
    y = xc * (1.0 / xp.sqrt(var + float(eps)))
    if w is not None:
        y *= w
    if b is not None:
        y += b
    return y


def group_norm(x, num_groups, w, b, eps, silu=False):
    """x [N, C, *spatial] normalised over (C/G, *spatial) per group; w/b [C] -> same shape.

    silu=True applies x * sigmoid(x) to the result (a UNet ResNet block's GroupNorm -> SiLU),
    fused into the same pass on the numba path.
    """
    if x.ndim < 2:
        raise ValueError(f"group_norm: x {tuple(x.shape)} needs at least [N, C]")
    N, C = x.shape[:2]
    if C % num_groups:
        raise ValueError(f"group_norm: {C} channels in x {tuple(x.shape)} do not split into {num_groups} groups")
    _check_vec("group_norm", x, w, C, "weight")
    _check_vec("group_norm", x, b, C, "bias")
    xp = array_module(x)
    if xp is np and x.dtype == np.float32 and x.size >= GROUP_NORM_FUSED_MIN:
        y = _group_norm_fused(x, num_groups, w, b, float(eps), bool(silu))
        if y is not None:
            return y
    g = x.reshape(N, num_groups, -1)                      # [N, G, C/G * H * W]
    mu = xp.mean(g, axis=-1, keepdims=True)               # [N, G, 1]
    gc = g - mu
    var = xp.mean(gc * gc, axis=-1, keepdims=True)        # [N, G, 1]
    y = (gc * (1.0 / xp.sqrt(var + float(eps)))).reshape(x.shape)
    bshape = (1, C) + (1,) * (x.ndim - 2)                 # broadcast [C] over N and space
    if w is not None:
        y *= w.reshape(bshape)
    if b is not None:
        y += b.reshape(bshape)
    if silu:
        from .activations import silu as _silu
        y = _silu(y)
    return y


# group_norm on this many float32 elements or more takes the numba kernel (the NumPy body above
# is the reference): statistics in float64 (two passes, like the reference), then one pass for
# scale, shift and the optional SiLU, whose exp is a polynomial LLVM vectorizes. ~4x less CPU
# than the NumPy body + silu() on a UNet's [2, 64, 32, 32].
GROUP_NORM_FUSED_MIN = 1 << 12
_GN = None   # compiled on first use; False without numba


def _compile_group_norm():
    global _GN
    try:
        import numba
    except ImportError:
        _GN = False
        return _GN
    log2e = np.float32(1.0 / math.log(2.0))
    ln2_hi, ln2_lo = np.float32(0.693359375), np.float32(-2.12194440e-4)

    @numba.njit(cache=True, nogil=True, error_model="numpy", fastmath=True)
    def kernel(x, G, w, b, eps, act, out, lo, hi):
        # groups lo..hi-1 (n * G + g) of x/out [N, C, L] (L = spatial size), w/b [C]
        N, C, L = x.shape
        cg = C // G
        e = np.empty(L, np.float32)
        b1 = np.empty(L, np.int32)
        b2 = np.empty(L, np.int32)
        s1, s2 = b1.view(np.float32), b2.view(np.float32)
        for task in range(lo, hi):
            n, g = task // G, task % G
            tot = 0.0
            for c in range(g * cg, (g + 1) * cg):
                for i in range(L):
                    tot += x[n, c, i]
            mu = tot / (cg * L)
            ss = 0.0
            for c in range(g * cg, (g + 1) * cg):
                for i in range(L):
                    d = x[n, c, i] - mu
                    ss += d * d
            inv = 1.0 / np.sqrt(ss / (cg * L) + eps)
            m32 = np.float32(mu)                     # (x - mean) first: folding the mean into
            for c in range(g * cg, (g + 1) * cg):    # the shift cancels badly when |mean| >> std
                a, sh = np.float32(inv * w[c]), b[c]
                if not act:
                    for i in range(L):
                        out[n, c, i] = (x[n, c, i] - m32) * a + sh
                    continue
                for i in range(L):                   # y / (1 + e^-y), e^-y = 2^n e^r
                    y = (x[n, c, i] - m32) * a + sh
                    v = min(max(-y, np.float32(-103.0)), np.float32(88.0))
                    k = np.floor(v * log2e + np.float32(0.5))
                    r = v - k * ln2_hi - k * ln2_lo
                    q = np.float32(1.0 / 5040.0)
                    q = q * r + np.float32(1.0 / 720.0)
                    q = q * r + np.float32(1.0 / 120.0)
                    q = q * r + np.float32(1.0 / 24.0)
                    q = q * r + np.float32(1.0 / 6.0)
                    q = q * r + np.float32(0.5)
                    q = q * r + np.float32(1.0)
                    q = q * r + np.float32(1.0)
                    e[i] = q
                    ki = np.int32(k)
                    k1 = ki >> np.int32(1)
                    b1[i] = (k1 + np.int32(127)) << np.int32(23)
                    b2[i] = (ki - k1 + np.int32(127)) << np.int32(23)
                for i in range(L):
                    y = (x[n, c, i] - m32) * a + sh
                    out[n, c, i] = y / (np.float32(1.0) + e[i] * s1[i] * s2[i])

    _GN = kernel
    return _GN


def _group_norm_fused(x, G, w, b, eps, act):
    """group_norm (+ SiLU) by the numba kernel; None without numba."""
    kern = _GN if _GN is not None else _compile_group_norm()
    if kern is False:
        return None
    N, C = x.shape[:2]
    x3 = np.ascontiguousarray(x.reshape(N, C, -1))                        # [N, C, L]
    w = np.ones(C, np.float32) if w is None else np.ascontiguousarray(w, dtype=np.float32)
    b = np.zeros(C, np.float32) if b is None else np.ascontiguousarray(b, dtype=np.float32)
    out = np.empty(x3.shape, dtype=np.float32)
    split_rows(kern, N * G, x3, G, w, b, eps, act, out, work=x3.size)    # groups on row_threads()
    return out.reshape(x.shape)


# ---------------------------------------------------------------------------- LayerNorm, then w and b per batch item

LAYERNORM_FUSED_MIN = 1 << 14   # float32 elements from which layernorm_affine takes the numba kernel
_LN = None   # compiled on first use; False without numba


def _compile_layernorm():
    global _LN
    try:
        import numba
    except ImportError:
        _LN = False
        return _LN

    @numba.njit(cache=True, nogil=True, error_model="numpy", fastmath=True)
    def kernel(x, w, b, T, eps, out, lo, hi):
        # rows lo..hi-1 of x/out [R, D]; row r takes w[r // T], b[r // T] ([Bw, D] each)
        D = x.shape[1]
        for r in range(lo, hi):
            row, o = x[r], out[r]
            wr, br = w[r // T], b[r // T]
            tot = 0.0
            for i in range(D):
                tot += row[i]
            mu = np.float32(tot / D)
            ss = 0.0
            for i in range(D):
                d = row[i] - mu
                ss += d * d
            inv = np.float32(1.0 / np.sqrt(ss / D + eps))
            for i in range(D):
                o[i] = (row[i] - mu) * inv * wr[i] + br[i]

    _LN = kernel
    return _LN


def layernorm_affine(x, eps, w=None, b=None):
    """LayerNorm of x [B, T, D] over D (no weights of its own), then * w + b, where w and b are [D]
    or one row per batch item [B, 1, D] (AdaLN: w = 1 + scale, b = shift); None: 1 and 0.

    Big float32 inputs on the CPU take one numba pass per row (statistics in float64);
    elsewhere the NumPy body: layernorm(x) * w + b.
    """
    if x.ndim != 3:
        raise ValueError(f"layernorm_affine: x {tuple(x.shape)} must be [B, T, D]")
    B, T, D = x.shape
    xp = array_module(x)
    for name, v in (("w", w), ("b", b)):
        if v is not None and tuple(v.shape) not in ((D,), (B, 1, D), (1, 1, D)):
            raise ValueError(f"layernorm_affine: {name} {tuple(v.shape)} does not fit x {tuple(x.shape)} "
                             f"(want [{D}] or [{B}, 1, {D}])")
    if xp is np and x.dtype == np.float32 and x.size >= LAYERNORM_FUSED_MIN:
        kern = _LN if _LN is not None else _compile_layernorm()
        if kern is not False:
            rows = lambda v, fill: (np.full((1, D), fill, np.float32) if v is None  # noqa: E731
                                    else np.ascontiguousarray(v, dtype=np.float32).reshape(-1, D))
            w2, b2 = rows(w, 1.0), rows(b, 0.0)                               # [1 or B, D]
            nb = max(w2.shape[0], b2.shape[0])                                 # 1: shared by every row
            w2, b2 = (np.ascontiguousarray(np.broadcast_to(v, (nb, D))) for v in (w2, b2))
            x2 = np.ascontiguousarray(x).reshape(B * T, D)
            out = np.empty((B * T, D), np.float32)
            split_rows(kern, B * T, x2, w2, b2, T if nb == B else B * T, float(eps), out, work=x2.size)
            return out.reshape(B, T, D)
    y = layernorm(x, None, None, eps)
    if w is not None:
        y = y * w
    if b is not None:
        y = y + b
    return y
