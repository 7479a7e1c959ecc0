"""decode_attention.attention_rows: many sequences' decode attention in one call, each row bit for bit
the single-row kernel's (attention_into) over its own cache, for every cache type and context length."""
import numpy as np
import pytest

from spark_lab.kernels.decode_attention import attention_into, attention_rows
from spark_lab.llm.cache import KVCache
from tests.kernels.numpy_attention import kernel_query, tolerance

pytest.importorskip("numba")


@pytest.mark.parametrize("kv", ["f32", "f16", "q8_0"])
def test_rows_equal_single_row_kernel(kv):
    L, T, Hkv, D, Hq = 2, 1200, 2, 64, 6
    caches = KVCache.pooled(5, L, T, Hkv, D, type_k=kv, type_v=kv)
    rng = np.random.default_rng(0)
    for i, c in enumerate(caches):
        c.fill_random(T, seed=i)
    pos = np.array([3, 700, 1199, 0, 300])              # short, two key chunks (>= 512 keys), one key
    lo = np.array([0, 0, 400, 0, 100])                  # a sliding window on two rows
    q = rng.standard_normal((len(caches), Hq, D), dtype=np.float32)
    slots = np.array([4, 0, 2, 1, 3])                   # rows need not follow slot order
    out = np.full((len(caches), Hq, D), np.nan, np.float32)
    assert attention_rows(q, caches[0].pool, 1, slots, lo, pos + 1, 0.125, out)
    for r, s in enumerate(slots):
        c = caches[s]
        one = np.empty((Hq, D), np.float32)
        attention_into(q[r], c.k[1], c.v[1], 0.125, lo[r], pos[r] + 1, one,
                       None if c.k_scale is None else c.k_scale[1], None if c.v_scale is None else c.v_scale[1])
        assert np.array_equal(out[r], one), r
    k, v = caches[slots[1]].view(1, 701)                 # and the numbers are attention's
    qw = kernel_query(q[1], 0.125, kv)                   # q8_0 keys: the query quantized as llama.cpp does
    s = np.einsum("hd,thd->ht", qw, np.repeat(k, Hq // Hkv, axis=1))     # query head h reads KV head h // 3
    w = np.exp(s - s.max(1, keepdims=True))
    ref = np.einsum("ht,thd->hd", w / w.sum(1, keepdims=True), np.repeat(v, Hq // Hkv, axis=1))
    np.testing.assert_allclose(out[1], ref, **tolerance(kv, v))


def test_pooled_caches_are_views_of_one_pool():
    caches = KVCache.pooled(3, 2, 16, 1, 32, type_k="q8_0", type_v="f16")
    caches[1].write(0, 5, np.ones((1, 1, 32), np.float32), np.full((1, 1, 32), 2, np.float32))
    k, v = caches[1].view(0, 6)
    assert k[5].max() == 127 * np.float32(np.float16(1 / 127)) and v[5].min() == 2   # q8_0: code 127 x the f16 scale
    assert caches[0].pool[2][1, 0, 5].any() and not caches[0].pool[2][0].any()      # V [slot, layer, position, ...]
    assert caches[0].pool[0][1, 0].any() and not caches[0].pool[0][0].any()         # q8_0 K tiles [slot, layer, tile, ...]
    assert caches[1].nbytes == caches[0].nbytes == KVCache(2, 16, 1, 32, type_k="q8_0", type_v="f16").nbytes


@pytest.mark.parametrize("Hkv", [1, 3])
def test_short_rows_split_by_kv_heads_match_numpy(Hkv):
    """Under 512 keys a row's tasks split its KV heads (one KV head: one task idles); every head's
    numbers are attention's, and the same as the row among others."""
    Hq, D, T = 2 * Hkv, 64, 300
    caches = KVCache.pooled(2, 1, T, Hkv, D)
    for i, c in enumerate(caches):
        c.fill_random(T, seed=10 + i)
    q = np.random.default_rng(3).standard_normal((2, Hq, D), dtype=np.float32)
    out = np.full((2, Hq, D), np.nan, np.float32)
    assert attention_rows(q, caches[0].pool, 0, np.array([1, 0]), np.array([0, 50]), np.array([300, 200]), 0.125, out)
    k, v = caches[1].view(0, 300)
    s = np.einsum("hd,thd->ht", q[0] * np.float32(0.125), np.repeat(k, 2, axis=1))
    w = np.exp(s - s.max(1, keepdims=True))
    ref = np.einsum("ht,thd->hd", w / w.sum(1, keepdims=True), np.repeat(v, 2, axis=1))
    np.testing.assert_allclose(out[0], ref, rtol=2e-5, atol=2e-6)
    one = np.empty((Hq, D), np.float32)
    attention_into(q[1], caches[0].k[0], caches[0].v[0], 0.125, 50, 200, one)
    assert np.array_equal(out[1], one)
