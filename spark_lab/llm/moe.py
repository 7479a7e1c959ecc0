"""Mixture-of-experts feed-forward: the router, top-k selection and the expert gather.

A layer has E experts, each a small gated FFN (gate, up: [ff, d]; down: [d, ff]), and a router
([E, d], gpt-oss adds a bias). Each token runs only k of them:

    logits = h @ router.T (+ b)                         [T, E]
    ids, w = route(logits, k, gating, ...)              [T, k] expert ids and weights
    y[t]   = sum_j w[t, j] * expert_{ids[t, j]}(h[t])   [T, d]

Routing ("gating"), as the families define it:
    softmax         softmax over all E logits, then the top-k probabilities (qwen3moe; optionally
                    renormalised to sum to 1: `expert_weights_norm`)
    softmax_weight  top-k of the raw logits, then a softmax over those k (gpt-oss)
    sigmoid         sigmoid of each logit, then top-k (optionally renormalised)

Execution reads only the selected experts' weights: `moe_ffn` walks the experts that some token
picked, gathers those tokens' rows, and runs each expert once on its group (prefill: one matmul
per expert over all its tokens). One token with quantized experts takes the expert gather
instead (`kernels.qmatvec.moe_matvec` on the CPU; `cuda_kernels.moe_matvec_mxfp4` on the GPU,
one launch per projection, the router's picks staying on the device). Expert weights stay in their
file format (views into the GGUF's 3-D `ffn_*_exps` tensors; quantized ones are `QuantTensor`s
repacked on first use), so an expert never picked is never read.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import kernels as K
from ..device import array_module

GATINGS = ("softmax", "softmax_weight", "sigmoid")


@dataclass
class Experts:
    """One layer's router and experts."""
    router: object                   # [E, d] float (or QuantTensor)
    gate: list                       # E x [ff, d] float or QuantTensor (views of ffn_gate_exps)
    up: list                         # E x [ff, d]
    down: list                       # E x [d, ff]
    router_b: object = None          # [E] (gpt-oss)
    gate_b: object = None            # [E, ff] (gpt-oss)
    up_b: object = None              # [E, ff]
    down_b: object = None            # [E, d]
    stacks: tuple = ()               # the placed gate, up, down tensors the expert views come from
                                     # (quantized: uint8 [E, rows, row_bytes], the GPU gather reads them)
    layer: int = -1                  # block index (for stats)

    @property
    def n_expert(self) -> int:
        return len(self.gate)

    def expert_nbytes(self, e: int) -> int:
        """Bytes of weights one token reads from expert e (gate + up + down)."""
        return sum(_nbytes(w[e]) for w in (self.gate, self.up, self.down))


def _nbytes(w) -> int:
    return int(w.nbytes)


def _softmax_rows(x):
    """Stable softmax over the last axis, float32."""
    xp = array_module(x)
    e = xp.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _top_k(scores, k):
    """Indices [T, k] of the k largest scores per row, largest first (as torch.topk)."""
    xp = array_module(scores)
    E = scores.shape[-1]
    idx = xp.argpartition(-scores, k - 1, axis=-1)[:, :k] if k < E else xp.broadcast_to(xp.arange(E), scores.shape).copy()
    vals = xp.take_along_axis(scores, idx, axis=-1)
    order = xp.argsort(-vals, axis=-1, kind="stable")
    return xp.take_along_axis(idx, order, axis=-1)


def route(logits, k: int, gating: str = "softmax", norm: bool = False, scale: float = 1.0):
    """Router logits [T, E] -> (expert ids [T, k] int64, weights [T, k] float32)."""
    if gating not in GATINGS:
        raise ValueError(f"unknown expert gating function {gating!r} (known: {', '.join(GATINGS)})")
    xp = array_module(logits)
    T, E = logits.shape
    if not 0 < k <= E:
        raise ValueError(f"top-{k} experts out of {E}: k must be between 1 and the expert count")
    logits = logits.astype(xp.float32, copy=False)
    if gating == "softmax_weight":
        ids = _top_k(logits, k)
        w = _softmax_rows(xp.take_along_axis(logits, ids, axis=-1))     # [T, k]
    else:
        probs = _softmax_rows(logits) if gating == "softmax" else 1.0 / (1.0 + xp.exp(-logits))
        ids = _top_k(probs, k)
        w = xp.take_along_axis(probs, ids, axis=-1)                     # [T, k]
        if norm:
            w = w / w.sum(axis=-1, keepdims=True)
    if scale != 1.0:
        w = w * np.float32(scale)
    return ids.astype(xp.int64), w.astype(xp.float32, copy=False)


def swiglu_oai(g, u, alpha: float = 1.702, limit: float = 7.0):
    """gpt-oss's clamped SwiGLU: g' = min(g, limit), u' = clip(u, -limit, limit),
    out = (u' + 1) * g' * sigmoid(alpha * g'); all [n, ff]."""
    xp = array_module(g)
    g = xp.minimum(g, np.float32(limit))
    u = xp.clip(u, np.float32(-limit), np.float32(limit))
    return (u + np.float32(1.0)) * (g / (np.float32(1.0) + xp.exp(-np.float32(alpha) * g)))


def _expert(h, ex: Experts, e: int, act: str, spec):
    """One expert on its rows h [n, d] -> [n, d]."""
    g = K.linear(h, ex.gate[e], None if ex.gate_b is None else ex.gate_b[e])    # [n, ff]
    u = K.linear(h, ex.up[e], None if ex.up_b is None else ex.up_b[e])          # [n, ff]
    if act == "swiglu_oai":
        a = swiglu_oai(g, u, spec.swiglu_alpha, spec.swiglu_limit)
    elif act == "silu":
        a = K.swiglu(g, u)
    else:
        raise ValueError(f"unknown expert activation {act!r} (silu, swiglu_oai)")
    return K.linear(a, ex.down[e], None if ex.down_b is None else ex.down_b[e])  # [n, d]


def _gather(h, ex: Experts, ids, w, config):
    """One token, quantized experts: each projection as one gather over its k picked experts.
    h [1, d], ids/w [1, k] -> [1, d], or None where no gather kernel applies (float experts,
    no numba, a GPU type without one)."""
    from ..quants import QuantTensor
    xp = array_module(h)
    if not all(isinstance(t[0], QuantTensor) for t in (ex.gate, ex.up, ex.down)):
        return None
    if xp is np:
        from ..kernels import qmatvec as qm
        if not qm.available():
            return None
        picks = ids[0]
        mats = (ex.gate, ex.up, ex.down)
        mv = qm.moe_matvec                                                   # (x, experts, ids) -> [k, rows]
    else:
        from gguf import GGMLQuantizationType as QT
        if len(ex.stacks) != 3 or any(t[0].qtype != QT.MXFP4 for t in (ex.gate, ex.up, ex.down)):
            return None
        from ..kernels import cuda_kernels as ck
        picks = ids[0]                                                       # stays on the device
        mats = ex.stacks
        mv = ck.moe_matvec_mxfp4
    if xp is np:
        g, u = qm.moe_matvec_pair(h[0], mats[0], mats[1], picks)             # [k, ff] each, one kernel call
    else:
        g, u = mv(h[0], mats[0], picks), mv(h[0], mats[1], picks)
    if ex.gate_b is not None:
        g = g + ex.gate_b[picks]
        u = u + ex.up_b[picks]
    a = swiglu_oai(g, u, config.spec.swiglu_alpha, config.spec.swiglu_limit) if config.act == "swiglu_oai" else K.swiglu(g, u)
    y = mv(xp.ascontiguousarray(a, dtype=xp.float32), mats[2], picks)      # [k, d]: row j through expert picks[j]
    if ex.down_b is not None:
        y = y + ex.down_b[picks]
    return (w[0][:, None] * y).sum(axis=0, keepdims=True)                    # [1, d]


def moe_ffn(h, ex: Experts, config, stats: dict | None = None):
    """h [T, d] (after the FFN norm) -> the experts' weighted sum [T, d].

    stats: optional dict; `expert_bytes` grows by the expert weight bytes read, and `routes`
    gets (layer, expert ids [T, k]) appended (the bench and an expert heatmap read them)."""
    xp = array_module(h)
    T = h.shape[0]
    logits = K.linear(h, ex.router, ex.router_b)                              # [T, E]
    ids, w = route(logits, config.n_expert_used, config.expert_gating, config.expert_weights_norm,
                   config.expert_weights_scale)                                # [T, k]
    if T == 1 and config.act in ("silu", "swiglu_oai"):
        out = _gather(h, ex, ids, w, config)
        if out is not None:
            if stats is not None:
                stats["expert_bytes"] = stats.get("expert_bytes", 0) + ex.expert_nbytes(0) * ids.shape[1]
                host = ids.copy() if array_module(ids) is np else array_module(ids).asnumpy(ids)   # stats only
                stats.setdefault("routes", []).append((ex.layer, host))
            return out
    out = xp.zeros((T, h.shape[1]), dtype=xp.float32)
    ids_h = ids if xp is np else xp.asnumpy(ids)                               # the grouping is host work
    flat = ids_h.reshape(-1)
    order = np.argsort(flat, kind="stable")                                   # (token, slot) pairs by expert
    experts, starts = np.unique(flat[order], return_index=True)
    bounds = list(starts[1:]) + [flat.size]
    wf = w.reshape(-1)
    for e, s0, s1 in zip(experts.tolist(), starts.tolist(), bounds):
        pairs = order[s0:s1]                                                   # flat (t * k + j) of expert e
        rows = pairs // ids.shape[1]                                           # its tokens (each once: top-k ids differ)
        r = xp.asarray(rows)
        y = _expert(h[r] if T > 1 else h, ex, e, config.act, config.spec)      # [n, d]
        out[r] += y * wf[xp.asarray(pairs)][:, None]
        if stats is not None:
            stats["expert_bytes"] = stats.get("expert_bytes", 0) + ex.expert_nbytes(e)
    if stats is not None:
        stats.setdefault("routes", []).append((ex.layer, ids_h.copy()))
    return out


def expert_hits(stats: dict, n_layer: int, n_expert: int) -> np.ndarray:
    """[n_layer, n_expert] rows each expert ran, from the `routes` that moe_ffn recorded."""
    hits = np.zeros((n_layer, n_expert), np.int64)
    for layer, ids in stats.get("routes", []):
        np.add.at(hits[layer], ids.reshape(-1), 1)
    return hits


def expert_choices(stats: dict, n_layer: int, n_expert: int) -> np.ndarray:
    """[n_layer, n_tokens, n_expert] bool: which experts each token ran in each layer, from the `routes`
    that moe_ffn recorded (tokens in the order they went through: the prompt, then each decoded one)."""
    per_layer = [[] for _ in range(n_layer)]
    for layer, ids in stats.get("routes", []):
        per_layer[layer].append(ids)                                          # [T_call, k]
    n_tokens = max((sum(len(i) for i in parts) for parts in per_layer), default=0)
    out = np.zeros((n_layer, n_tokens, n_expert), bool)
    for layer, parts in enumerate(per_layer):
        if parts:
            ids = np.concatenate(parts)                                       # [T, k]
            out[layer, np.arange(len(ids))[:, None], ids] = True
    return out
