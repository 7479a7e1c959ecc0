"""Attention sinks (gpt-oss) in the decode kernel: one logit per query head joins each softmax's
denominator. Checked against the formula in NumPy for every cache type, one and two key chunks, a
sliding window, a sink above every score; a pooled batch row bit for bit its lone row; the NumPy body
of `attention_sinks` (the GPU's and prefill's reference) agrees."""
import numpy as np
import pytest

from spark_lab.kernels.decode_attention import attention_into, attention_rows
from spark_lab.kernels.sink_attention import attention_sinks
from spark_lab.llm.cache import KVCache
from tests.kernels.numpy_attention import kernel_query, tolerance

pytest.importorskip("numba")

L, T, Hkv, D, Hq = 2, 700, 2, 64, 8


def _reference(q, k, v, sinks, lo, hi, type_k):
    """softmax over [scores of keys lo..hi-1, sink] per head, the sink's weight dropped."""
    qw = kernel_query(q, 0.125, type_k)                                  # [Hq, D]
    kk = np.repeat(k[lo:hi].astype(np.float64), Hq // Hkv, axis=1)      # [n, Hq, D]
    vv = np.repeat(v[lo:hi].astype(np.float64), Hq // Hkv, axis=1)
    s = np.einsum("hd,thd->ht", qw.astype(np.float64), kk)
    m = np.maximum(s.max(1), sinks)[:, None]
    w = np.exp(s - m)
    return np.einsum("ht,thd->hd", w / (w.sum(1, keepdims=True) + np.exp(sinks[:, None] - m)), vv)


@pytest.mark.parametrize("kv", ["f32", "f16", "q8_0"])
def test_sinks_join_the_denominator(kv):
    c = KVCache(L, T, Hkv, D, type_k=kv, type_v=kv)
    c.fill_random(T, seed=1)
    k, v = c.view(1, T)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((Hq, D), dtype=np.float32)
    sinks = rng.standard_normal(Hq).astype(np.float32)
    sinks[3] = 40.0                                      # above every score: that head's output near 0
    for lo, hi in ((0, T), (500, T), (0, 5), (0, 1)):   # two key chunks, a window, short, one key
        out = np.full((Hq, D), np.nan, np.float32)
        assert attention_into(q, c.k[1], c.v[1], 0.125, lo, hi, out,
                              None if c.k_scale is None else c.k_scale[1],
                              None if c.v_scale is None else c.v_scale[1], sinks)
        np.testing.assert_allclose(out, _reference(q, k, v, sinks, lo, hi, kv), **tolerance(kv, v))
        assert np.abs(out[3]).max() < 1e-10
        plain = np.empty_like(out)                       # without sinks: a different answer
        attention_into(q, c.k[1], c.v[1], 0.125, lo, hi, plain,
                       None if c.k_scale is None else c.k_scale[1], None if c.v_scale is None else c.v_scale[1])
        assert not np.allclose(out, plain, rtol=1e-3)


@pytest.mark.parametrize("kv", ["f32", "q8_0"])
def test_pooled_rows_with_sinks_equal_their_lone_rows(kv):
    caches = KVCache.pooled(3, L, T, Hkv, D, type_k=kv, type_v=kv)
    for i, c in enumerate(caches):
        c.fill_random(T, seed=i)
    rng = np.random.default_rng(1)
    q = rng.standard_normal((3, Hq, D), dtype=np.float32)
    sinks = rng.standard_normal(Hq).astype(np.float32)
    pos, lo, slots = np.array([699, 10, 600]), np.array([0, 0, 200]), np.array([2, 0, 1])
    out = np.full((3, Hq, D), np.nan, np.float32)
    assert attention_rows(q, caches[0].pool, 0, slots, lo, pos + 1, 0.125, out, sinks)
    for r, s in enumerate(slots):
        c, one = caches[s], np.empty((Hq, D), np.float32)
        attention_into(q[r], c.k[0], c.v[0], 0.125, lo[r], pos[r] + 1, one,
                       None if c.k_scale is None else c.k_scale[0], None if c.v_scale is None else c.v_scale[0], sinks)
        assert np.array_equal(out[r], one), r


def test_numpy_body_agrees_with_the_kernel():
    rng = np.random.default_rng(2)
    k, v = rng.standard_normal((2, 600, Hkv, D), dtype=np.float32)
    q = rng.standard_normal((3, Hq, D), dtype=np.float32)               # 3 queries: the NumPy body
    sinks = rng.standard_normal(Hq).astype(np.float32)
    for window in (None, 100):
        want = attention_sinks(q, k, v, sinks, q_offset=597, window=window, scale=0.125)
        for t in range(3):
            hi = 598 + t
            lo = max(0, hi - window) if window else 0
            out = np.empty((Hq, D), np.float32)
            assert attention_into(q[t], k, v, 0.125, lo, hi, out, sinks=sinks)
            np.testing.assert_allclose(out, want[t], rtol=2e-5, atol=2e-6)
