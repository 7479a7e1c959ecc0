"""The decode kernel's 16-wide row widening (kv_rows.widen16) and its f16 / q8_0 paths at D % 16 == 0."""
import numpy as np
import pytest

from spark_lab.kernels.decode_attention import attention_into
from spark_lab.llm.cache import quantize_q8_rows
from tests.kernels.numpy_attention import cache_storage, kernel_query, numpy_attention, tolerance

numba = pytest.importorskip("numba")


def test_widen16_is_exact_for_every_type():
    from spark_lab.kernels.kv_rows import widen16_intrinsic
    w16 = widen16_intrinsic()

    @numba.njit
    def widen_all(a, scales, out):
        for i in range(a.size // 16):
            w16(a, 16 * i, scales[i], out, 16 * i)

    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)            # every float16, inf and NaN too
    out = np.empty(65536, np.float32)
    widen_all(bits, np.ones(4096, np.float32), out)
    want = bits.view(np.float16).astype(np.float32)
    assert np.array_equal(out, want, equal_nan=True)
    codes = np.tile(np.arange(-128, 128, dtype=np.int8), 2)                  # every code, 32 blocks of 16
    sc = np.float32(np.random.default_rng(0).random(32) + 0.5)
    out = np.empty(512, np.float32)
    widen_all(codes, sc, out)
    assert np.array_equal(out, codes.astype(np.float32) * np.repeat(sc, 16))   # one rounding: code x scale
    x = np.random.default_rng(1).standard_normal(64, dtype=np.float32)
    out = np.empty(64, np.float32)
    widen_all(x, np.ones(4, np.float32), out)
    assert np.array_equal(out, x)


def _store(x, t):
    if t == "f16":
        return x.astype(np.float16).view(np.uint16), None, x.astype(np.float16).astype(np.float32)
    c, s = quantize_q8_rows(x)
    return c, s, (c.reshape(*c.shape[:-1], -1, 32) * s[..., None]).reshape(x.shape)


@pytest.mark.parametrize("tk,tv", [("f16", "f16"), ("q8_0", "q8_0"), ("q8_0", "f16"), ("f32", "q8_0")])
@pytest.mark.parametrize("Tk,lo", [(700, 0), (700, 300), (3, 1)])          # 700 keys: two chunks (threads)
def test_long_context_paths_match_numpy_on_widened_values(tk, tv, Tk, lo):
    rng = np.random.default_rng(Tk + lo)
    Hq, Hkv, D = 8, 2, 128                                                    # Llama-3's GQA ratio of 4, D of 128
    q = rng.standard_normal((Hq, D), dtype=np.float32)
    kf = rng.standard_normal((Tk, Hkv, D), dtype=np.float32)
    vf = rng.standard_normal((Tk, Hkv, D), dtype=np.float32)
    k, ks, v, vs, kw, vw = cache_storage(kf, vf, tk, tv)                       # q8_0 keys: tiles
    out = np.full((Hq, D), np.nan, np.float32)
    assert attention_into(q, k, v, 1 / np.sqrt(D), lo, Tk, out, ks, vs)
    qw = kernel_query(q, 1 / np.sqrt(D), tk)
    want = numpy_attention(qw[None], kw[lo:], vw[lo:], causal=True, q_offset=Tk - lo - 1, scale=1.0)[0]
    np.testing.assert_allclose(out, want, **tolerance(tv, vw))
    if tk == "q8_0":                                                          # the same keys as rows (int8 [Tk, Hkv, D])
        k, ks, _ = _store(kf, "q8_0")
        assert attention_into(q, k, v, 1 / np.sqrt(D), lo, Tk, out, ks, vs)
        want = numpy_attention(q[None], kw[lo:], vw[lo:], causal=True, q_offset=Tk - lo - 1, scale=1 / np.sqrt(D))[0]
        np.testing.assert_allclose(out, want, **tolerance(tv, vw))


@pytest.mark.parametrize("D", [64, 256, 96])                                 # 96: no unrolled 16-key pair
@pytest.mark.parametrize("tk,tv", [("f32", "f32"), ("f16", "q8_0")])
def test_sixteen_key_blocks_match_numpy_for_each_head_dim(D, tk, tv):
    rng = np.random.default_rng(D)
    Hq, Hkv, Tk = 6, 2, 16 * 5 + 7                                              # 5 blocks of 16 keys, 7 after
    q = rng.standard_normal((Hq, D), dtype=np.float32)
    kf = rng.standard_normal((Tk, Hkv, D), dtype=np.float32)
    vf = rng.standard_normal((Tk, Hkv, D), dtype=np.float32)
    k, ks, kw = (kf, None, kf) if tk == "f32" else _store(kf, tk)
    v, vs, vw = (vf, None, vf) if tv == "f32" else _store(vf, tv)
    out = np.full((Hq, D), np.nan, np.float32)
    assert attention_into(q, k, v, 1 / np.sqrt(D), 0, Tk, out, ks, vs)
    want = numpy_attention(q[None], kw, vw, causal=True, q_offset=Tk - 1, scale=1 / np.sqrt(D))[0]
    np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-6)


def test_result_does_not_depend_on_thread_count():
    from spark_lab.device import num_threads, set_threads
    rng = np.random.default_rng(3)
    q = rng.standard_normal((8, 128), dtype=np.float32)
    k, ks, v, _, _, _ = cache_storage(rng.standard_normal((1500, 2, 128), dtype=np.float32),
                                      rng.standard_normal((1500, 2, 128), dtype=np.float32), "q8_0", "f16")
    n = num_threads()
    outs = []
    try:
        for t in (1, 2):
            set_threads(t)
            out = np.empty((8, 128), np.float32)
            attention_into(q, k, v, 0.088, 0, 1500, out, ks, None)
            outs.append(out)
    finally:
        set_threads(n)
    assert np.array_equal(outs[0], outs[1])


@pytest.mark.parametrize("Hq,Hkv,D", [(8, 8, 128), (7, 1, 128), (16, 2, 64), (10, 2, 256)])   # G = 1, 7, 8, 5
@pytest.mark.parametrize("tk,tv", [("f16", "f16"), ("q8_0", "q8_0")])
def test_tiles_cover_every_query_group_size(Hq, Hkv, D, tk, tv):
    # attn_blocks' tiles take 4 heads of a group, then 2, then 1: a group of 7 is 4 + 2 + 1, of 5 is 4 + 1;
    # each tile's head offset lands in its own rows of the output (a wrong one shows as another head's numbers)
    rng = np.random.default_rng(Hq * D)
    Tk = 16 * 20 + 5                                                          # two blocks of 256 keys, a 5-key tail
    q = rng.standard_normal((Hq, D), dtype=np.float32)
    k, ks, v, vs, kw, vw = cache_storage(rng.standard_normal((Tk, Hkv, D), dtype=np.float32),
                                         rng.standard_normal((Tk, Hkv, D), dtype=np.float32), tk, tv)
    out = np.full((Hq, D), np.nan, np.float32)
    assert attention_into(q, k, v, 1 / np.sqrt(D), 0, Tk, out, ks, vs)
    want = numpy_attention(kernel_query(q, 1 / np.sqrt(D), tk)[None], kw, vw, causal=True, q_offset=Tk - 1, scale=1.0)[0]
    np.testing.assert_allclose(out, want, **tolerance(tv, vw))
