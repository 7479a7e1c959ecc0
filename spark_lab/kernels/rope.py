"""Sinusoidal position encodings: rotary embeddings (decoders) and timestep embeddings (UNets).

RoPE rotates pairs of query/key features by angle pos * freq_scale * theta^(-2i/rotary_dim).
Two pairings exist in the wild:
  normal (llama.cpp "norm", llama GGUF files): pairs are adjacent features (2i, 2i+1);
  neox   (GPT-NeoX, transformers' rotate_half; qwen2/3, gemma3): pairs are (i, i + rotary_dim/2).
freq_scale is llama.cpp's linear scaling (1 / rope_scaling.factor): it multiplies positions.
"""
from __future__ import annotations

import math

import numpy as np

from ..device import array_module


def _rope_table(xp, positions, rotary_dim, theta, freq_scale):
    """cos, sin [T, 1, rotary_dim/2] float32; angles in float64 so long contexts stay exact."""
    inv_freq = float(theta) ** (-(xp.arange(0, rotary_dim, 2, dtype=xp.float64) / rotary_dim))  # [rd/2]
    ang = positions.astype(xp.float64)[:, None] * (float(freq_scale) * inv_freq)[None, :]      # [T, rd/2]
    return xp.cos(ang).astype(np.float32)[:, None, :], xp.sin(ang).astype(np.float32)[:, None, :]


def rope_table(positions, rotary_dim, theta=10000.0, freq_scale=1.0):
    """cos, sin [T, 1, rotary_dim/2] for `rope(..., table=)`: a decoder computes it once per
    forward pass and shares it across layers instead of once per layer and per q/k."""
    xp = array_module(positions)
    return _rope_table(xp, xp.asarray(positions), int(rotary_dim), theta, freq_scale)


def rope(x, positions, theta=10000.0, rotary_dim=None, neox=False, freq_scale=1.0, table=None):
    """x [T, H, D], positions [T] int -> x with its first rotary_dim features rotated, [T, H, D].

    table: optional (cos, sin) from `rope_table(positions, rotary_dim, theta, freq_scale)`.
    """
    if x.ndim != 3:
        raise ValueError(f"rope: x {tuple(x.shape)} must be [T, H, D]")
    T, H, D = x.shape
    rd = D if rotary_dim is None else int(rotary_dim)
    if rd % 2 or not 0 < rd <= D:
        raise ValueError(f"rope: rotary_dim {rd} must be even and in (0, {D}] for x {tuple(x.shape)}")
    xp = array_module(x)
    positions = xp.asarray(positions)
    if positions.shape != (T,) or positions.dtype.kind not in "iu":
        raise ValueError(f"rope: positions {tuple(positions.shape)} {positions.dtype} must be [T] integers for x {tuple(x.shape)}")
    if xp.__name__ == "cupy" and x.dtype == np.float32:
        from . import cuda_kernels
        return cuda_kernels.rope(x, positions, float(theta), rd, bool(neox), float(freq_scale))
    cos, sin = table if table is not None else _rope_table(xp, positions, rd, theta, freq_scale)  # [T, 1, rd/2]
    half = rd // 2
    i0, i1 = (slice(0, half), slice(half, rd)) if neox else (slice(0, rd, 2), slice(1, rd, 2))
    x0, x1 = x[..., i0], x[..., i1]                                    # [T, H, rd/2] each
    out = xp.empty_like(x)
    out[..., i0] = x0 * cos - x1 * sin
    out[..., i1] = x0 * sin + x1 * cos
    out[..., rd:] = x[..., rd:]                                        # unrotated tail (partial rotary)
    return out


def timestep_embedding(t, dim, flip_sin_to_cos=False, downscale_freq_shift=1.0, scale=1.0, max_period=10000):
    """Diffusers' get_timestep_embedding: t [N] -> [N, dim] = [sin | cos] (or [cos | sin] if flipped).

    frequency i = exp(-ln(max_period) * i / (dim/2 - downscale_freq_shift)), i < dim/2;
    an odd dim gets a zero last column. Computed in float32 in the same order as diffusers.
    """
    xp = array_module(t)
    t = xp.asarray(t)
    if t.ndim != 1:
        raise ValueError(f"timestep_embedding: t {tuple(t.shape)} must be 1-D [N]")
    half = dim // 2
    exponent = (-math.log(max_period)) * xp.arange(half, dtype=np.float32)
    exponent = exponent / (half - float(downscale_freq_shift))
    freqs = xp.exp(exponent)                                           # [dim/2]
    args = t.astype(np.float32)[:, None] * freqs[None, :]              # [N, dim/2]
    args = float(scale) * args
    sin, cos = xp.sin(args), xp.cos(args)
    emb = xp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)   # [N, 2*(dim/2)]
    if dim % 2:
        emb = xp.concatenate([emb, xp.zeros((emb.shape[0], 1), dtype=np.float32)], axis=-1)
    return emb
