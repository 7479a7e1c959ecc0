"""Sinusoidal position encodings: rotary embeddings (decoders) and timestep embeddings (UNets).

RoPE rotates pairs of query/key features by angle pos * inv_freq[i], inv_freq[i] = theta^(-2i/rotary_dim).
Two pairings exist in the wild:
  normal (llama.cpp "norm", llama GGUF files): pairs are adjacent features (2i, 2i+1);
  neox   (GPT-NeoX, transformers' rotate_half; qwen2/3, gemma3, gpt-oss): pairs are (i, i + rotary_dim/2).
Scalings, as GGUF files carry them (all default off: plain RoPE):
  freq_scale    llama.cpp's linear scaling (1 / rope_scaling.factor): it multiplies positions;
  freq_factors  Llama 3.1/3.2's `rope_freqs.weight` [rotary_dim/2]: each frequency is divided by
                its factor (transformers' "llama3" rope type, precomputed by the converter);
  yarn          YaRN (gpt-oss, long-context Qwen): low-frequency pairs interpolated (x freq_scale),
                high-frequency ones kept, a linear ramp between; cos/sin scaled by mscale.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..device import array_module, to_host


@dataclass(frozen=True)
class YaRN:
    """YaRN's parameters beside freq_scale = 1 / factor (transformers' rope_type "yarn")."""
    orig_ctx: int                 # original_max_position_embeddings: the context the model was trained at
    beta_fast: float = 32.0       # rotations over orig_ctx above which a pair is left as is
    beta_slow: float = 1.0        # ... below which it is fully interpolated
    attn_factor: float = 0.0      # cos/sin scale (mscale); 0 = 0.1 * ln(factor) + 1
    ext_factor: float = 1.0       # weight of the ramp (llama.cpp's yarn_ext_factor; 0 = plain interpolation)
    truncate: bool = True         # correction range rounded to whole dims (gpt-oss: False)


def _corr_dim(rd, orig_ctx, theta, rotations):
    """The pair index whose wavelength makes `rotations` turns over orig_ctx positions."""
    return rd * math.log(orig_ctx / (rotations * 2 * math.pi)) / (2 * math.log(theta))


def rope_freqs(rotary_dim, theta=10000.0, freq_scale=1.0, freq_factors=None, yarn=None):
    """inv_freq float64 [rotary_dim/2] (host NumPy) and the cos/sin scale: what rope_table multiplies."""
    rd = int(rotary_dim)
    inv = float(theta) ** (-(np.arange(0, rd, 2, dtype=np.float64) / rd))          # [rd/2]
    if freq_factors is not None:
        ff = np.asarray(to_host(freq_factors), dtype=np.float64).reshape(-1)
        if ff.shape != inv.shape:
            raise ValueError(f"rope: {ff.shape[0]} frequency factors for {inv.shape[0]} rotated pairs (rotary_dim {rd})")
        inv = inv / ff
    if yarn is None:
        return inv * float(freq_scale), 1.0
    lo = _corr_dim(rd, yarn.orig_ctx, theta, yarn.beta_fast)
    hi = _corr_dim(rd, yarn.orig_ctx, theta, yarn.beta_slow)
    if yarn.truncate:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, rd - 1)
    ramp = np.clip((np.arange(rd // 2, dtype=np.float64) - lo) / max(hi - lo, 0.001), 0.0, 1.0)   # 0: keep, 1: interpolate
    mix = (1.0 - ramp) * float(yarn.ext_factor)
    inv = inv * float(freq_scale) * (1.0 - mix) + inv * mix
    mscale = yarn.attn_factor or (1.0 + 0.1 * math.log(1.0 / float(freq_scale)) if freq_scale < 1.0 else 1.0)
    return inv, float(mscale)


def _rope_table(xp, positions, rotary_dim, theta, freq_scale, freq_factors=None, yarn=None):
    """cos, sin [T, 1, rotary_dim/2] float32; angles in float64 so long contexts stay exact."""
    inv, mscale = rope_freqs(rotary_dim, theta, freq_scale, freq_factors, yarn)
    ang = positions.astype(xp.float64)[:, None] * xp.asarray(inv)[None, :]          # [T, rd/2]
    cos, sin = xp.cos(ang), xp.sin(ang)
    if mscale != 1.0:
        cos, sin = cos * mscale, sin * mscale
    return cos.astype(np.float32)[:, None, :], sin.astype(np.float32)[:, None, :]


def rope_table(positions, rotary_dim, theta=10000.0, freq_scale=1.0, freq_factors=None, yarn=None):
    """cos, sin [T, 1, rotary_dim/2] for `rope(..., table=)`: a decoder computes it once per
    forward pass and shares it across layers instead of once per layer and per q/k."""
    xp = array_module(positions)
    return _rope_table(xp, xp.asarray(positions), int(rotary_dim), theta, freq_scale, freq_factors, yarn)


def rope(x, positions, theta=10000.0, rotary_dim=None, neox=False, freq_scale=1.0, table=None,
         freq_factors=None, yarn=None):
    """x [T, H, D], positions [T] int -> x with its first rotary_dim features rotated, [T, H, D].

    table: optional (cos, sin) from `rope_table(positions, rotary_dim, theta, freq_scale, ...)`.
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
        inv, mscale = rope_freqs(rd, theta, freq_scale, freq_factors, yarn)
        return cuda_kernels.rope(x, positions, float(theta), rd, bool(neox), float(freq_scale), inv_freq=inv, mscale=mscale)
    cos, sin = table if table is not None else _rope_table(xp, positions, rd, theta, freq_scale, freq_factors, yarn)  # [T, 1, rd/2]
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
