"""The numba decode-attention kernel against attention()'s NumPy body."""
import numpy as np
import pytest

from spark_lab.kernels import attention
from spark_lab.kernels import attention as attention_mod  # noqa: F401
from spark_lab.kernels.decode_attention import attention_one
from tests.kernels.numpy_attention import numpy_attention as _reference

pytest.importorskip("numba")


@pytest.mark.parametrize("Hq,Hkv,D,Tk,window", [(9, 3, 64, 37, None), (4, 1, 256, 20, 8), (4, 4, 16, 1, None)])
def test_decode_attention_matches_numpy(Hq, Hkv, D, Tk, window):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, Hq, D), dtype=np.float32)
    k = rng.standard_normal((Tk, Hkv, D), dtype=np.float32)
    v = rng.standard_normal((Tk, Hkv, D), dtype=np.float32)
    fast = attention(q, k, v, causal=True, q_offset=Tk - 1, window=window, scale=0.125)
    ref = _reference(q, k, v, causal=True, q_offset=Tk - 1, window=window, scale=0.125)
    assert fast.dtype == np.float32 and fast.shape == (1, Hq, D)
    np.testing.assert_allclose(fast, ref, rtol=2e-5, atol=2e-6)


def test_kernel_on_cache_views():
    rng = np.random.default_rng(1)
    cache = rng.standard_normal((2, 50, 3, 64), dtype=np.float32)   # [layer, pos, kv head, dim]
    q = rng.standard_normal((1, 9, 64), dtype=np.float32)
    out = attention_one(q, cache[1, :20], cache[0, :20], 0.125, 0, 20)
    ref = _reference(q, cache[1, :20], cache[0, :20], causal=True, q_offset=19, scale=0.125)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-6)
