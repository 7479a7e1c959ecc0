"""Attention inside a UNet: diffusers' `Attention`, `BasicTransformerBlock`, `Transformer2DModel`.

Two flavours appear in checkpoints:
  SpatialAttention   GroupNorm -> one multi-head self-attention over the H*W pixels -> + x
                     (AttnDownBlock2D, UNetMidBlock2D, the VAE's mid block)
  Transformer2D      GroupNorm -> proj_in -> N x [self-attn, cross-attn on the text, GEGLU MLP]
                     -> proj_out -> + x (the cross-attention blocks of UNet2DConditionModel)
Attention on the CPU runs per head on strided views of [B, T, H*D] (BLAS scores, a numba row softmax,
BLAS weighted values: _attend_blocks); elsewhere head-major ([B*H, T, D]) on matmul + softmax.
"""
from __future__ import annotations

import numpy as np

from ..device import array_module
from ..kernels import geglu, group_norm, linear, matmul, softmax
from ..kernels.activations import matmul_rows, split_rows
from ..kernels.norms import layernorm_affine
from .fused import attend_fused, softmax_ready, softmax_rows_
from .loading import Params
from .lora import with_lora


# Score elements per chunk of heads: 1 MB of float32 stays in L2, so softmax's passes over the
# scores run from cache instead of memory (2-3x faster than one [B*H, T, T] block at 32x32).
SCORES_PER_CHUNK = 1 << 18
# Heads this small (spark-emoji: 4) take the fused numba kernel (3x faster at 16x16 than the
# matmul + softmax + matmul below); at 40+ BLAS's score products win.
FUSED_MAX_HEAD_DIM = 16
# Score elements per block of query rows on the BLAS + numba path (_attend_blocks). Fewer, bigger
# GEMMs won over cache-sized blocks: SDXL's 1024 x 1024 self-attention (bench imagine, 2 BLAS threads)
# took 1.22 s per image at 1 << 17, 1.09 s at 1 << 18, 1.00 s at 1 << 20 (a whole head per block);
# on row_threads() 1 << 18 and 1 << 20 tie (0.67 s).
BLOCK_SCORES = 1 << 20


def attend(q, k, v):
    """Head-major attention: q [BH, Tq, D], k/v [BH, Tk, D] -> [BH, Tq, D], no mask.

    Heads are processed a few at a time so the score block stays cache-sized. With one key
    (spark-emoji's single sentence-embedding token) softmax is exactly 1: the output is v.
    """
    BH, Tq, D = q.shape
    Tk = k.shape[1]
    xp = array_module(q)
    if Tk == 1:
        return xp.broadcast_to(v, (BH, Tq, v.shape[2]))
    if xp is np and D <= FUSED_MAX_HEAD_DIM:
        out = attend_fused(q, k, v)                                     # numba, one pass per row
        if out is not None:
            return out
    if xp is np:
        out = _attend_blocks(q, k, v, 1)                                # BLAS + numba softmax
        if out is not None:
            return out
    return _attend_reference(q, k, v)


def _attend_reference(q, k, v):
    """attend's array-module body (CuPy, and NumPy without numba): matmul, softmax, matmul."""
    BH, Tq, D = q.shape
    Tk = k.shape[1]
    xp = array_module(q)
    q = q * (1.0 / D ** 0.5)
    kt = xp.ascontiguousarray(k.transpose(0, 2, 1))                     # [BH, D, Tk]: BLAS-friendly
    out = xp.empty((BH, Tq, v.shape[2]), dtype=np.float32)
    step = max(1, SCORES_PER_CHUNK // (Tq * Tk))
    for s in range(0, BH, step):
        p = softmax(matmul(q[s:s + step], kt[s:s + step]), axis=-1)   # [h, Tq, Tk]
        out[s:s + step] = matmul(p, v[s:s + step])                      # [h, Tq, D]
    return out


def _attend_blocks(q, k, v, heads: int):
    """Attention on the CPU with the heads side by side in the feature dim: q [B, Tq, H*D], k [B, Tk, H*D],
    v [B, Tk, H*Dv] -> [B, Tq, H*Dv]; None without numba (or for other dtypes).

    Per head and block of query rows: scores = q_h k_h^T by BLAS on strided views (no head-major
    copies), e^(scale (s - max)) in place by a numba loop (fused.softmax_rows_), the unnormalised
    weights times v_h by BLAS, then each row times 1 / its sum while it is written out. The
    (batch, head, block) tasks are shared among row_threads() (kernels.split_rows).
    """
    if not (q.dtype == k.dtype == v.dtype == np.float32 and softmax_ready()):
        return None
    B, Tq, HD = q.shape
    Tk = k.shape[1]
    rows = max(1, min(Tq, BLOCK_SCORES // Tk))
    tasks = [(b, h, s0) for b in range(B) for h in range(heads) for s0 in range(0, Tq, rows)]
    out = np.empty((B, Tq, heads * (v.shape[2] // heads)), dtype=np.float32)
    split_rows(_attend_tasks, len(tasks), q, k, v, heads, rows, tasks, out, work=len(tasks) * rows * Tk)
    return out


def _attend_tasks(q, k, v, heads, rows, tasks, out, lo, hi):
    """_attend_blocks' tasks lo..hi-1, each (batch item, head, first query row), into out."""
    Tk = k.shape[1]
    D, Dv = q.shape[2] // heads, v.shape[2] // heads
    scale = 1.0 / D ** 0.5
    sbuf = np.empty((rows, Tk), dtype=np.float32)                       # [rows, Tk] scores
    obuf = np.empty((rows, Dv), dtype=np.float32)                       # [rows, Dv] unnormalised out
    for b, h, s0 in tasks[lo:hi]:
        n = min(rows, q.shape[1] - s0)
        sc = np.matmul(q[b, s0:s0 + n, h * D:(h + 1) * D], k[b, :, h * D:(h + 1) * D].T, out=sbuf[:n])   # [n, Tk]
        inv = softmax_rows_(sc, scale)                                     # [n]
        o = np.matmul(sc, v[b, :, h * Dv:(h + 1) * Dv], out=obuf[:n])     # [n, Dv]
        np.multiply(o, inv[:, None], out=out[b, s0:s0 + n, h * Dv:(h + 1) * Dv])


def attend_heads(q, k, v, heads: int):
    """Attention with the heads side by side: q [B, Tq, H*D], k [B, Tk, H*D], v [B, Tk, H*Dv] -> [B, Tq, H*Dv].

    The CPU takes _attend_blocks (no head-major copies); otherwise the heads go head-major
    through attend.
    """
    B, Tq, HD = q.shape
    Tk = k.shape[1]
    D = HD // heads
    xp = array_module(q)
    if xp is np and D > FUSED_MAX_HEAD_DIM and Tk > 1:
        out = _attend_blocks(q, k, v, heads)
        if out is not None:
            return out
    Dv = v.shape[2] // heads
    heads_first = lambda t, T, d: t.reshape(B, T, heads, d).transpose(0, 2, 1, 3).reshape(B * heads, T, d)  # noqa: E731
    o = attend(heads_first(q, Tq, D), heads_first(k, Tk, D), heads_first(v, Tk, Dv))   # [B*H, Tq, Dv]
    return o.reshape(B, heads, Tq, Dv).transpose(0, 2, 1, 3).reshape(B, Tq, heads * Dv)


def linear_rows(x, w, b=None):
    """linear on x [..., in] as one 2-D GEMM over all rows ([B, T, in] @ w.T would be B GEMMs, ~15% slower);
    float32 on the CPU: in shares on row_threads() (kernels.matmul_rows)."""
    x2 = x.reshape(-1, x.shape[-1])                                         # [rows, in]
    if (array_module(x2) is np and isinstance(w, np.ndarray) and x2.dtype == w.dtype == np.float32
            and w.ndim == 2 and w.shape[1] == x2.shape[1] and (b is None or b.shape == (w.shape[0],))):
        y = matmul_rows(x2, w.T, np.empty((x2.shape[0], w.shape[0]), np.float32), b)
    else:
        y = linear(x2, w, b)
    return y.reshape(x.shape[:-1] + (w.shape[0],))


def dense(p: Params, name: str, x):
    """The linear layer `name` of p on x [..., in] -> [..., out], plus any unfused LoRA on it (lora.py)."""
    return with_lora(p, name, x, linear_rows(x, p[f"{name}.weight"], p.get(f"{name}.bias")))


def multi_head_attention(p: Params, x, context, heads: int):
    """diffusers `Attention` (to_q/to_k/to_v/to_out.0): x [B, Tq, Cq], context [B, Tk, Ck] -> [B, Tq, Cout]."""
    B, Tq, _ = x.shape
    Tk = context.shape[1]
    v = dense(p, "to_v", context)                                           # [B, Tk, H*D]
    if Tk == 1:       # softmax over one key is exactly 1: every query gets to_out(v), computed once
        o = dense(p, "to_out.0", v)                                         # [B, 1, Cout]
        return array_module(o).broadcast_to(o, (B, Tq, o.shape[-1]))
    q = dense(p, "to_q", x)                                                 # [B, Tq, H*D]
    k = dense(p, "to_k", context)                                           # [B, Tk, H*D]
    o = attend_heads(q, k, v, heads)                                        # [B, Tq, H*D]
    return dense(p, "to_out.0", o)                                          # [B, Tq, Cout]


class SpatialAttention:
    """Self-attention over pixels with a GroupNorm in front and the residual added back."""

    def __init__(self, p: Params, heads: int, groups: int | None, eps: float, rescale_output_factor: float = 1.0):
        self.p, self.heads, self.groups, self.eps = p, heads, groups, eps
        self.rescale = float(rescale_output_factor)

    def __call__(self, x, context=None):
        B, C, H, W = x.shape
        h = x
        if self.groups and "group_norm.weight" in self.p:
            h = group_norm(x, self.groups, self.p["group_norm.weight"], self.p["group_norm.bias"], self.eps)
        h = h.reshape(B, C, H * W).transpose(0, 2, 1)                  # [B, HW, C]
        h = multi_head_attention(self.p, h, h, self.heads)             # [B, HW, C]
        h = h.transpose(0, 2, 1).reshape(B, C, H, W)
        out = h + x
        return out if self.rescale == 1.0 else out * (1.0 / self.rescale)


class BasicTransformerBlock:
    """LayerNorm + self-attention, LayerNorm + cross-attention, LayerNorm + GEGLU feed-forward."""

    def __init__(self, p: Params, heads: int, only_cross_attention: bool = False):
        self.p, self.heads, self.only_cross = p, heads, only_cross_attention
        self.has_attn2 = p.has_prefix("attn2")
        if "ff.net.0.proj.weight" not in p:
            raise ValueError(f"BasicTransformerBlock {p.prefix!r}: only the GEGLU feed-forward (ff.net.0.proj) is supported")

    def _ln(self, name, x):
        return layernorm_affine(x, 1e-5, self.p[f"{name}.weight"], self.p[f"{name}.bias"])

    def __call__(self, x, context=None):
        p = self.p
        h = self._ln("norm1", x)                                                         # [B, T, C]
        ctx1 = context if (self.only_cross and context is not None) else h
        x = x + multi_head_attention(p.sub("attn1"), h, ctx1, self.heads)
        if self.has_attn2:
            if context is not None and context.shape[1] == 1:   # one text token: the queries (and norm2) drop out
                x = x + multi_head_attention(p.sub("attn2"), x, context, self.heads)
            else:
                h = self._ln("norm2", x)
                x = x + multi_head_attention(p.sub("attn2"), h, h if context is None else context, self.heads)
        h = self._ln("norm3", x)
        h = geglu(dense(p, "ff.net.0.proj", h))                                         # [B, T, 4C]
        return x + dense(p, "ff.net.2", h)                                              # [B, T, C]


def _pointwise(p: Params, x):
    """A 1x1 conv or a linear (use_linear_projection) on channels-last x [B, T, Cin] -> [B, T, Cout]."""
    w = p["weight"]
    return with_lora(p, "", x, linear_rows(x, w.reshape(w.shape[0], -1), p.get("bias")))


class Transformer2D:
    """diffusers Transformer2DModel for continuous inputs: [B, C, H, W] + text [B, L, Ctx] -> [B, C, H, W]."""

    def __init__(self, p: Params, heads: int, groups: int, only_cross_attention: bool = False):
        self.p, self.groups = p, groups
        n = 0
        while p.has_prefix(f"transformer_blocks.{n}"):
            n += 1
        if n == 0:
            raise ValueError(f"Transformer2DModel {p.prefix!r} has no transformer_blocks in {p.source}")
        self.blocks = [BasicTransformerBlock(p.sub(f"transformer_blocks.{i}"), heads, only_cross_attention)
                       for i in range(n)]

    def __call__(self, x, context=None):
        B, C, H, W = x.shape
        h = group_norm(x, self.groups, self.p["norm.weight"], self.p["norm.bias"], 1e-6)
        h = h.transpose(0, 2, 3, 1).reshape(B, H * W, C)                  # [B, HW, C]
        h = _pointwise(self.p.sub("proj_in"), h)                          # [B, HW, inner]
        for blk in self.blocks:
            h = blk(h, context)
        h = _pointwise(self.p.sub("proj_out"), h)                         # [B, HW, C]
        return h.reshape(B, H, W, C).transpose(0, 3, 1, 2) + x
