"""attention against a per-head NumPy reference and torch's scaled_dot_product_attention."""
import math
import sys

import numpy as np
import pytest

from spark_lab.kernels import attention


def _x(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _ref(q, k, v, causal=True, q_offset=0, window=None, scale=None, add_mask=None):
    """Loop-over-heads float64 reference: query i at q_offset + i, key j at j."""
    Tq, Hq, D = q.shape
    Tk, Hkv, _ = k.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qp = np.arange(Tq)[:, None] + q_offset
    kp = np.arange(Tk)[None, :]
    keep = np.ones((Tq, Tk), bool)
    if causal:
        keep &= kp <= qp
    if window is not None:
        keep &= (qp - kp) < window
    out = np.zeros((Tq, Hq, v.shape[2]))
    for h in range(Hq):
        kh = h // (Hq // Hkv)
        s = q[:, h].astype(np.float64) @ k[:, kh].astype(np.float64).T * scale
        if add_mask is not None:
            s = s + add_mask[h] if add_mask.ndim == 3 else s + add_mask
        s = np.where(keep, s, -np.inf)
        m = s.max(-1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        p = np.exp(s - m)
        p /= np.maximum(p.sum(-1, keepdims=True), 1e-300)
        out[:, h] = p @ v[:, kh].astype(np.float64)
    return out


def test_causal_gqa_prefill_matches_torch_sdpa():
    torch = pytest.importorskip("torch")
    T, Hq, Hkv, D = 12, 9, 3, 64                        # SmolLM2's head layout
    q, k, v = _x((T, Hq, D), 0), _x((T, Hkv, D), 1), _x((T, Hkv, D), 2)
    y = attention(q, k, v)
    assert y.shape == (T, Hq, D) and y.dtype == np.float32
    tq, tk, tv = (torch.from_numpy(a).transpose(0, 1) for a in (q, k, v))      # [H, T, D]
    rep = Hq // Hkv
    ref = torch.nn.functional.scaled_dot_product_attention(
        tq, tk.repeat_interleave(rep, 0), tv.repeat_interleave(rep, 0), is_causal=True).transpose(0, 1).numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_cross_attention_non_causal_with_scale_matches_torch():
    torch = pytest.importorskip("torch")
    q, k, v = _x((16, 8, 40), 3), _x((77, 8, 40), 4), _x((77, 8, 40), 5)    # UNet cross-attention shapes
    y = attention(q, k, v, causal=False, scale=0.3)
    tq, tk, tv = (torch.from_numpy(a).transpose(0, 1) for a in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, scale=0.3).transpose(0, 1).numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_decode_and_chunked_prefill_equal_full_prefill():
    T, Hq, Hkv, D = 20, 4, 1, 32                        # Gemma3-style: one kv head
    q, k, v = _x((T, Hq, D), 6), _x((T, Hkv, D), 7), _x((T, Hkv, D), 8)
    full = attention(q, k, v)
    last = attention(q[-1:], k, v, q_offset=T - 1)      # decode against the whole cache
    np.testing.assert_allclose(last, full[-1:], rtol=1e-5, atol=1e-6)
    part = attention(q[8:13], k[:13], v[:13], q_offset=8)   # a prefill chunk against a cache view
    np.testing.assert_allclose(part, full[8:13], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(full, _ref(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_sliding_window(causal):
    T, D = 16, 8
    q, k, v = _x((T, 4, D), 9), _x((T, 2, D), 10), _x((T, 2, D), 11)
    np.testing.assert_allclose(attention(q, k, v, causal=causal, window=5),
                               _ref(q, k, v, causal=causal, window=5), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(attention(q[-1:], k, v, causal=causal, q_offset=T - 1, window=5),
                               _ref(q[-1:], k, v, causal=causal, q_offset=T - 1, window=5), rtol=1e-5, atol=1e-5)


def test_extra_masks_combine_with_causal():
    T, H, D = 6, 2, 8
    q, k, v = _x((T, H, D), 12), _x((T, H, D), 13), _x((T, H, D), 14)
    add = _x((H, T, T), 15)
    np.testing.assert_allclose(attention(q, k, v, mask=add), _ref(q, k, v, add_mask=add), rtol=1e-5, atol=1e-5)
    pad = np.array([False, True, True, True, True, True])          # key 0 is padding
    got = attention(q, k, v, causal=False, mask=pad)
    ref = _ref(q, k, v, causal=False, add_mask=np.where(pad, 0.0, -np.inf)[None, :])
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_query_chunking_gives_the_same_answer(monkeypatch):
    mod = sys.modules["spark_lab.kernels.attention"]          # the package re-binds the name to the function
    T = 24
    q, k, v = _x((T, 3, 16), 16), _x((T, 3, 16), 17), _x((T, 3, 16), 18)
    add = _x((T, T), 19)
    whole = attention(q, k, v, window=7, mask=add)
    monkeypatch.setattr(mod, "_MAX_SCORES", 3 * T * 5)        # 5 query rows per chunk
    np.testing.assert_allclose(attention(q, k, v, window=7, mask=add), whole, rtol=1e-6, atol=1e-6)


def test_attention_shape_errors():
    q, k = _x((4, 6, 8), 0), _x((4, 4, 8), 1)
    with pytest.raises(ValueError, match=r"6 query heads.*\(4, 6, 8\).*4 kv heads.*\(4, 4, 8\)"):
        attention(q, k, k)
    with pytest.raises(ValueError, match=r"\(4, 6, 8\).*\(4, 2, 7\)"):
        attention(q, _x((4, 2, 7), 2), _x((4, 2, 7), 3))


def test_key_range_cut_matches_full_masking():
    # early prefill chunks see few keys, late ones only the window: the cut must not change numbers
    T = 30
    q, k, v = _x((T, 4, 16), 20), _x((T, 2, 16), 21), _x((T, 2, 16), 22)
    np.testing.assert_allclose(attention(q[20:], k, v, q_offset=20, window=6),
                               _ref(q[20:], k, v, q_offset=20, window=6), rtol=1e-5, atol=1e-5)
    # a query whose window holds no key at all gets zeros, not NaN
    far = attention(q[:1], k[:5], v[:5], q_offset=40, window=3)
    assert np.all(far == 0.0)


@pytest.mark.parametrize("q_offset,window,tq", [(0, None, 37), (20, None, 5), (20, 7, 16), (50, 4, 3)])
def test_fused_causal_softmax_matches_the_masked_path(q_offset, window, tq):
    pytest.importorskip("numba")
    rng = np.random.default_rng(q_offset + tq)
    Tk = q_offset + tq
    q = rng.standard_normal((tq, 6, 16)).astype(np.float32)
    k = rng.standard_normal((Tk, 2, 16)).astype(np.float32)
    v = rng.standard_normal((Tk, 2, 16)).astype(np.float32)
    fused = attention(q, k, v, causal=True, q_offset=q_offset, window=window)
    keep_all = np.ones((tq, Tk), bool)                                  # a mask forces the array path
    ref = attention(q, k, v, causal=True, q_offset=q_offset, window=window, mask=keep_all)
    assert fused.dtype == np.float32
    np.testing.assert_allclose(fused, ref, rtol=1e-5, atol=1e-6)
