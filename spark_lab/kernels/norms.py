"""Normalisations: RMSNorm (decoders), LayerNorm (BERT, CLIP), GroupNorm (UNet, VAE).

Statistics are taken in the input's dtype (float32) with NumPy's pairwise sums; variances use
two passes (mean, then mean of squared deviations), which stays accurate when |mean| >> std.
"""
from __future__ import annotations

from ..device import array_module


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


def group_norm(x, num_groups, w, b, eps):
    """x [N, C, *spatial] normalised over (C/G, *spatial) per group; w/b [C] -> same shape."""
    if x.ndim < 2:
        raise ValueError(f"group_norm: x {tuple(x.shape)} needs at least [N, C]")
    N, C = x.shape[:2]
    if C % num_groups:
        raise ValueError(f"group_norm: {C} channels in x {tuple(x.shape)} do not split into {num_groups} groups")
    _check_vec("group_norm", x, w, C, "weight")
    _check_vec("group_norm", x, b, C, "bias")
    xp = array_module(x)
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
    return y
