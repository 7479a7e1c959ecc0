"""One token through the decoder on the CPU: preallocated buffers, kernels called directly.

`Transformer.forward` is the reference and handles any T. Decoding calls it with T = 1
about 30 times a second, and there the arithmetic of a small model (~100 MB of quantized
weights) is a few milliseconds while the general path's array plumbing (shape checks,
reshapes, temporaries, a dozen NumPy calls per layer) cost as much again. `Decoder.step` runs
the same layer, operation for operation, with:

    x, h, q, k, v, att, o, g, u, a, f   one preallocated float32 row each
    mat-vecs                          straight into those rows (the repacked numba kernels)
    rmsnorm, rope, SwiGLU             small numba loops over one row, in place
    attention                         the fused decode kernel over the cache's keys/values

Same numbers as `forward` to float32 rounding (tested on tiny llama/qwen2/qwen3/gemma3 models
and on the shipped GGUFs). Used only where it applies: NumPy arrays and numba importable.
"""
from __future__ import annotations

import numpy as np

from .. import kernels as K
from ..kernels import expf
from ..kernels.decode_attention import attention_into, attention_rows
from ..quants import QuantTensor
from .moe import moe_ffn

_GLUE = None  # {name: compiled function}; False when numba is missing
prange = range  # numba.prange once compiled
exp_parts = swiglu_row = None   # expf.exp_parts and _swiglu_row compiled for inlining, set by _glue()


def _rms_row(x, w, eps, out):
    """out = x / sqrt(mean(x^2) + eps) * w; x, w, out [d]."""
    d = x.shape[0]
    s = 0.0
    for i in range(d):
        s += np.float64(x[i]) * np.float64(x[i])
    r = np.float32(np.sqrt(np.float32(s / d) + eps))
    for i in range(d):
        out[i] = x[i] / r * w[i]


def _rope_rows(x, cos, sin, rd, neox):
    """Rotate the first rd features of each row of x [H, D] in place; cos, sin [rd/2]."""
    half = rd // 2
    for h in range(x.shape[0]):
        for i in range(half):
            a, b = (i, i + half) if neox else (2 * i, 2 * i + 1)
            x0, x1 = x[h, a], x[h, b]
            x[h, a] = x0 * cos[i] - x1 * sin[i]
            x[h, b] = x0 * sin[i] + x1 * cos[i]


def _swiglu_row(g, u, out):
    """out = silu(g) * u; all [n]. e^-g by `kernels.expf` (numba's np.exp is a scalar libm call: 14336
    of them were 70 us a layer at 8B shapes); without fastmath, so vector and scalar lanes round alike."""
    n = g.shape[0]
    bits = np.empty(n, np.int32)
    for i in range(n):
        out[i], bits[i] = exp_parts(-g[i])
    two = bits.view(np.float32)
    for i in range(n):
        out[i] = g[i] / (np.float32(1.0) + out[i] * two[i]) * u[i]


def _rms_rows(x, w, eps, out):
    """_rms_row over each row of x, out [n, d] (the same arithmetic, row by row)."""
    n, d = x.shape
    for r in range(n):
        s = 0.0
        for i in range(d):
            s += np.float64(x[r, i]) * np.float64(x[r, i])
        rr = np.float32(np.sqrt(np.float32(s / d) + eps))
        for i in range(d):
            out[r, i] = x[r, i] / rr * w[i]


def _rope_batch(x, cos, sin, positions, rd, neox):
    """_rope_rows on x [n, H, D] with row r at positions[r]; cos, sin [n_ctx, rd/2]."""
    half = rd // 2
    for r in range(x.shape[0]):
        p = positions[r]
        for h in range(x.shape[1]):
            for i in range(half):
                a, b = (i, i + half) if neox else (2 * i, 2 * i + 1)
                x0, x1 = x[r, h, a], x[r, h, b]
                x[r, h, a] = x0 * cos[p, i] - x1 * sin[p, i]
                x[r, h, b] = x0 * sin[p, i] + x1 * cos[p, i]


def _swiglu_rows(g, u, out):
    """_swiglu_row over each row; all [n, f]; rows on the threads (each value's arithmetic is the same)."""
    for r in prange(g.shape[0]):
        swiglu_row(g[r], u[r], out[r])


def _glue():
    global _GLUE
    if _GLUE is None:
        try:
            import numba
        except ImportError:
            _GLUE = False
            return _GLUE
        global prange, exp_parts, swiglu_row
        prange = numba.prange
        exp_parts = numba.njit(inline="always", nogil=True)(expf.exp_parts)
        swiglu_row = numba.njit(inline="always", nogil=True)(_swiglu_row)
        jit = numba.njit(cache=True, nogil=True, fastmath=False)
        _GLUE = {f.__name__[1:]: jit(f) for f in (_rms_row, _rope_rows, _swiglu_row, _rms_rows, _rope_batch)}
        _GLUE["swiglu_rows"] = numba.njit(cache=True, nogil=True, fastmath=False, parallel=True)(_swiglu_rows)
    return _GLUE


def _matvec(w):
    """fn(x [1, in], out [1, rows]) writing x @ w.T into out, for a float array or a QuantTensor."""
    if not isinstance(w, QuantTensor):
        wt = w.T

        def rows(x, out):                  # row by row: a BLAS call's rounding may depend on how many rows
            for i in range(x.shape[0]):    # it gets, and a row must not depend on its batch (llm/batch.py)
                np.matmul(x[i:i + 1], wt, out=out[i:i + 1])
        return rows
    from ..kernels import qmatvec as qm
    kern = qm._jit()
    p = qm.prepare(w) if kern else None
    if p is not None and kern.get(p.kind) is not None:
        return _rows_kernel(kern, p.kind, p.arrays)
    return lambda x, out: qm.qmatvec(x, w, out=out)


def _rows_kernel(kern, kind: str, args):
    """fn(x [n, in], out [n, rows]) running the kernel qmatvec picks for n rows: a batched step of
    8 or more sequences goes through the int8 GEMM (each weight block unpacked once per 8 rows
    instead of once per row; every row's numbers the same bit for bit)."""
    from ..kernels.qmatvec import kernel_name
    return lambda x, out: kern[kernel_name(kern, kind, x.shape[0])](*args, x, out)


def _fused(*ws):
    """x @ [w1; w2; ...].T in one kernel call where the weights were repacked as one stack
    (`qmatvec.prepare_stack`, done by Transformer at load), else None."""
    from ..kernels import qmatvec as qm
    kern = qm._jit()
    ps = [getattr(w, "packed", None) for w in ws]
    if not kern or any(p is None for p in ps) or ps[0].stack is None or any(p.stack is not ps[0].stack for p in ps):
        return None
    if kern.get(ps[0].kind) is None or sum(p.rows for p in ps) != ps[0].stack[0].shape[0] * ps[0].G:
        return None
    return _rows_kernel(kern, ps[0].kind, ps[0].stack)


def available(model) -> bool:
    """True when `Decoder` can run this model: weights in NumPy arrays and numba importable."""
    from ..device import array_module
    w = model.tok_embd.data if isinstance(model.tok_embd, QuantTensor) else model.tok_embd
    return array_module(w) is np and bool(_glue())


class Decoder:
    """`step(token, pos, cache)` == `model.forward([token], pos, cache)` for one token, faster."""

    def __init__(self, model):
        self.model = m = model
        c = self.c = model.config
        g = self.g = _glue()
        hd = c.head_dim
        self.nq, self.nkv = c.n_head * hd, c.n_head_kv * hd
        row = lambda n: np.zeros((1, n), np.float32)            # noqa: E731
        self.x, self.h, self.o, self.f = row(c.n_embd), row(c.n_embd), row(c.n_embd), row(c.n_embd)
        self.att, self.act = row(self.nq), row(c.n_ff)
        # q, k, v (and gate, up) are views of one row each: a stacked product fills them at once
        self.qkv, self.gu = row(self.nq + 2 * self.nkv), row(2 * c.n_ff)
        self.q, self.k, self.v = np.split(self.qkv, [self.nq, self.nq + self.nkv], axis=1)
        self.gate, self.up = np.split(self.gu, [c.n_ff], axis=1)
        self.logits = row(m.output.shape[0])
        self.layers = []
        for L in m.layers:
            mv = dict(o=_matvec(L.wo))
            qkv = _fused(L.wq, L.wk, L.wv)
            mv.update(dict(qkv=qkv) if qkv else dict(q=_matvec(L.wq), k=_matvec(L.wk), v=_matvec(L.wv)))
            if L.bq is not None:                                # q|k|v biases, added after the product
                mv["bqkv"] = np.concatenate([L.bq, L.bk, L.bv]).astype(np.float32)
            if L.moe is None:                                   # MoE layers: llm.moe picks the experts per token
                mv["down"] = _matvec(L.w_down)
                gu = _fused(L.w_gate, L.w_up)
                mv.update(dict(gu=gu) if gu else dict(gate=_matvec(L.w_gate), up=_matvec(L.w_up)))
            self.layers.append(mv)
        self.out = _matvec(m.output)
        self.rope = [(c.is_sliding(i), (c.rope_theta_local or c.rope_theta) if c.is_sliding(i) else c.rope_theta)
                     for i in range(c.n_layer)]                # per layer: sliding window?, RoPE theta
        self.eps = np.float32(c.rms_eps)
        self.tables = {}                                        # theta -> (cos, sin) [n_ctx, rd/2]
        self._bufs = {}                                         # n -> step_batch's buffers [n, ...]

    def _table(self, theta, n_ctx):
        t = self.tables.get(theta)
        if t is None or t[0].shape[0] < n_ctx:
            cos, sin = K.rope_table(np.arange(n_ctx, dtype=np.int64), self.c.rope_dim, theta, self.c.rope_freq_scale,
                                    self.model.rope_freqs, self.c.rope_yarn)
            t = self.tables[theta] = (np.ascontiguousarray(cos[:, 0]), np.ascontiguousarray(sin[:, 0]))
        return t

    def step(self, token: int, pos: int, cache) -> np.ndarray:
        """One token at absolute position pos -> logits [1, vocab] (a buffer reused by the next step)."""
        m, c, g, eps = self.model, self.c, self.g, self.eps
        if pos + 1 > cache.n_ctx:
            raise ValueError(f"{pos + 1} tokens do not fit the context of {cache.n_ctx}")
        hd, H, Hkv = c.head_dim, c.n_head, c.n_head_kv
        x, h, o, f = self.x, self.h, self.o, self.f
        x[...] = K.embedding(m.tok_embd, np.array([token], np.int64))
        if c.embed_scale != 1.0:
            x *= np.float32(c.embed_scale)
        q3, k3 = self.q.reshape(H, hd), self.k.reshape(Hkv, hd)
        for i, (L, mv) in enumerate(zip(m.layers, self.layers)):
            g["rms_row"](x[0], L.attn_norm, eps, h[0])
            if "qkv" in mv:
                mv["qkv"](h, self.qkv)
            else:
                mv["q"](h, self.q), mv["k"](h, self.k), mv["v"](h, self.v)
            if "bqkv" in mv:
                self.qkv += mv["bqkv"]
            if c.qk_norm:
                q3[...] = K.rmsnorm(q3, L.q_norm, c.rms_eps)
                k3[...] = K.rmsnorm(k3, L.k_norm, c.rms_eps)
            sliding, theta = self.rope[i]
            cos, sin = self._table(theta, cache.n_ctx)
            g["rope_rows"](q3, cos[pos], sin[pos], c.rope_dim, c.rope_neox)
            g["rope_rows"](k3, cos[pos], sin[pos], c.rope_dim, c.rope_neox)
            self._attend_each(i, L, sliding, self.q, self.k, self.v, self.att, [pos], [cache])
            mv["o"](self.att, o)
            if L.bo is not None:
                o += L.bo
            if c.post_norms:
                g["rms_row"](o[0], L.post_attn_norm, eps, o[0])
            x += o
            g["rms_row"](x[0], L.ffn_norm, eps, h[0])
            if L.moe is not None:
                f[...] = moe_ffn(h, L.moe, c, m.moe_stats)
                if c.post_norms:
                    g["rms_row"](f[0], L.post_ffn_norm, eps, f[0])
                x += f
                continue
            if "gu" in mv:
                mv["gu"](h, self.gu)
            else:
                mv["gate"](h, self.gate), mv["up"](h, self.up)
            if c.act == "silu":
                g["swiglu_row"](self.gate[0], self.up[0], self.act[0])
            else:
                self.act[...] = K.gelu(self.gate, approximate="tanh") * self.up
            mv["down"](self.act, f)
            if c.post_norms:
                g["rms_row"](f[0], L.post_ffn_norm, eps, f[0])
            x += f
        g["rms_row"](x[0], m.output_norm, eps, h[0])
        self.out(h, self.logits)
        return self.logits.copy()

    def _batch_buffers(self, n: int) -> dict:
        b = self._bufs.get(n)
        if b is None:
            c = self.c
            z = lambda k: np.zeros((n, k), np.float32)          # noqa: E731
            b = dict(x=z(c.n_embd), h=z(c.n_embd), o=z(c.n_embd), f=z(c.n_embd), att=z(self.nq), act=z(c.n_ff),
                     qkv=z(self.nq + 2 * self.nkv), q=z(self.nq), k=z(self.nkv), v=z(self.nkv), gu=z(2 * c.n_ff),
                     gate=z(c.n_ff), up=z(c.n_ff), logits=z(self.model.output.shape[0]))
            self._bufs[n] = b
        return b

    def _attend_each(self, i, L, sliding, q, k, v, att, positions, caches) -> None:
        """Write each row's K/V into its cache and attend, row by row (step; step_batch over caches
        outside one pool)."""
        c, H, Hkv, hd = self.c, self.c.n_head, self.c.n_head_kv, self.c.head_dim
        for r, (pos, cache) in enumerate(zip(positions, caches)):
            q3, k3, att3 = q[r].reshape(H, hd), k[r].reshape(Hkv, hd), att[r].reshape(H, hd)
            v3 = v[r].reshape(Hkv, hd)
            if getattr(cache, "type_k", "f32") == "f32" and getattr(cache, "type_v", "f32") == "f32":
                cache.k[i, pos], cache.v[i, pos] = k3, v3
            else:
                cache.write(i, pos, k3[None], v3[None])
            lo = max(0, pos - int(c.sliding_window) + 1) if sliding else 0
            attention_into(q3, cache.k[i], cache.v[i], c.attn_scale, lo, pos + 1, att3,
                           None if cache.k_scale is None else cache.k_scale[i],
                           None if cache.v_scale is None else cache.v_scale[i], L.sinks)

    def step_batch(self, tokens, positions, caches) -> np.ndarray:
        """n sequences one token each (token i at positions[i] in caches[i]) -> logits [n, vocab].

        Each weight is read once for all n rows (the quantized kernels take x [n, in]); norms, RoPE,
        the cache write and attention run per row over that row's own cache. Row i's numbers are
        those of `step(tokens[i], positions[i], caches[i])` bit for bit: the int8 products are exact
        and each row is scaled and summed in its own fixed order, float weights go row by row."""
        m, c, g, eps = self.model, self.c, self.g, self.eps
        n = len(tokens)
        for p, cache in zip(positions, caches):
            if p + 1 > cache.n_ctx:
                raise ValueError(f"{p + 1} tokens do not fit the context of {cache.n_ctx}")
        hd, H, Hkv = c.head_dim, c.n_head, c.n_head_kv
        b = self._batch_buffers(n)
        pos_arr = np.asarray(positions, np.int64)
        n_ctx = max(cache.n_ctx for cache in caches)
        pool = caches[0].pool                                   # all rows' caches in one pool: one attention call
        if pool is None or any(cache.pool is not pool for cache in caches):
            pool = None
        else:
            slots = np.array([cache.pool_index for cache in caches], np.int64)
            f32_pool = caches[0].type_k == "f32" and caches[0].type_v == "f32"
            zeros = np.zeros(n, np.int64)
        x, h, o, f, q, k, v, att = (b[key] for key in ("x", "h", "o", "f", "q", "k", "v", "att"))
        x[...] = K.embedding(m.tok_embd, np.asarray(tokens, np.int64))
        if c.embed_scale != 1.0:
            x *= np.float32(c.embed_scale)
        for i, (L, mv) in enumerate(zip(m.layers, self.layers)):
            g["rms_rows"](x, L.attn_norm, eps, h)
            if "qkv" in mv:
                mv["qkv"](h, b["qkv"])
                if "bqkv" in mv:
                    b["qkv"] += mv["bqkv"]
                q[...], k[...], v[...] = np.split(b["qkv"], [self.nq, self.nq + self.nkv], axis=1)
            else:
                mv["q"](h, q), mv["k"](h, k), mv["v"](h, v)
                if L.bq is not None:
                    q += L.bq
                    k += L.bk
                    v += L.bv
            sliding, theta = self.rope[i]
            if c.qk_norm:
                for r in range(n):
                    q[r] = K.rmsnorm(q[r].reshape(H, hd), L.q_norm, c.rms_eps).reshape(-1)
                    k[r] = K.rmsnorm(k[r].reshape(Hkv, hd), L.k_norm, c.rms_eps).reshape(-1)
            cos, sin = self._table(theta, n_ctx)
            g["rope_batch"](q.reshape(n, H, hd), cos, sin, pos_arr, c.rope_dim, c.rope_neox)
            g["rope_batch"](k.reshape(n, Hkv, hd), cos, sin, pos_arr, c.rope_dim, c.rope_neox)
            if pool is not None:                                 # every row in one kernel call
                if f32_pool:
                    pool[0][slots, i, pos_arr] = k.reshape(n, Hkv, hd)
                    pool[2][slots, i, pos_arr] = v.reshape(n, Hkv, hd)
                else:
                    for r, (pos, cache) in enumerate(zip(positions, caches)):
                        cache.write(i, pos, k[r].reshape(1, Hkv, hd), v[r].reshape(1, Hkv, hd))
                lo = np.maximum(0, pos_arr - int(c.sliding_window) + 1) if sliding else zeros
                attention_rows(q.reshape(n, H, hd), pool, i, slots, lo, pos_arr + 1, c.attn_scale,
                               att.reshape(n, H, hd), L.sinks)
            else:
                self._attend_each(i, L, sliding, q, k, v, att, positions, caches)
            mv["o"](att, o)
            if L.bo is not None:
                o += L.bo
            if c.post_norms:
                g["rms_rows"](o, L.post_attn_norm, eps, o)
            x += o
            g["rms_rows"](x, L.ffn_norm, eps, h)
            if L.moe is not None:
                for r in range(n):
                    f[r:r + 1] = moe_ffn(h[r:r + 1], L.moe, c, m.moe_stats)
                    if c.post_norms:
                        g["rms_row"](f[r], L.post_ffn_norm, eps, f[r])
                x += f
                continue
            if "gu" in mv:
                mv["gu"](h, b["gu"])
                b["gate"][...], b["up"][...] = np.split(b["gu"], [c.n_ff], axis=1)
            else:
                mv["gate"](h, b["gate"]), mv["up"](h, b["up"])
            if c.act == "silu":
                g["swiglu_rows"](b["gate"], b["up"], b["act"])
            else:
                for r in range(n):
                    b["act"][r] = K.gelu(b["gate"][r:r + 1], approximate="tanh")[0] * b["up"][r]
            mv["down"](b["act"], f)
            if c.post_norms:
                g["rms_rows"](f, L.post_ffn_norm, eps, f)
            x += f
        g["rms_rows"](x, m.output_norm, eps, h)
        self.out(h, b["logits"])
        return b["logits"].copy()
