"""Softmax and the pointwise activations: SiLU, GELU (exact and tanh), SwiGLU, GEGLU.

Scalars are Python floats so float32 inputs stay float32 under NumPy 2's promotion rules.
"""
from __future__ import annotations

import math

import numpy as np

from ..device import array_module

_SQRT_HALF = math.sqrt(0.5)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
# Chebyshev fit of erfc(z) = t * exp(-z^2 + P(t)), t = 1 / (1 + z/2), z >= 0, with a
# fractional error below 1.2e-7 everywhere (Press et al., Numerical Recipes, section 6.2).
# NumPy has no erf, and a relative bound on erfc keeps gelu's negative tail accurate.
_ERFC_COEFFS = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806,
                0.27886807, -1.13520398, 1.48851587, -0.82215223, 0.17087277)


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
    return x[..., :f] * gelu(x[..., f:])
