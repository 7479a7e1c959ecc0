"""The reference the decode-kernel tests compare with: attention()'s NumPy body.

attention() sends one float32 query row to the numba decode kernel, the code under test; a mask that
keeps every key turns that fast path off."""
import numpy as np

from spark_lab.kernels.attention import attention
from spark_lab.llm.cache import KVCache, quantize_q8_rows


def numpy_attention(q, k, v, **kw):
    """q [Tq, Hq, D], k/v [Tk, Hkv, D] -> [Tq, Hq, Dv] by the NumPy body (kw: causal, q_offset, ...)."""
    return attention(q, k, v, mask=np.ones((1, 1, k.shape[0]), bool), **kw)


def kernel_query(q, scale: float, type_k: str):
    """The query the kernel scores with: q * scale, for q8_0 key tiles quantized to q8_0 per 32 values
    (as llama.cpp does for a q8_0 key cache) and widened back. Give numpy_attention scale=1 with it."""
    qs = np.asarray(q, np.float32) * np.float32(scale)
    if type_k != "q8_0":
        return qs
    c, d = quantize_q8_rows(qs, f16=False)                                # the kernel keeps its float32 scale
    return (c.reshape(*c.shape[:-1], -1, 32).astype(np.float32) * d[..., None]).reshape(qs.shape)


def cache_storage(k, v, type_k: str, type_v: str):
    """k, v f32 [Tk, Hkv, D] stored as a one-layer KVCache stores them -> (k, k scales, v, v scales,
    k widened, v widened): q8_0 keys as tiles (llm/cache.py), the widened values as the cache reads them."""
    c = KVCache(1, k.shape[0], k.shape[1], k.shape[2], type_k=type_k, type_v=type_v)
    c.write(0, 0, k, v)
    kw, vw = c.rows(0, 0, k.shape[0])
    return (c.k[0], None if c.k_scale is None else c.k_scale[0], c.v[0], None if c.v_scale is None else c.v_scale[0],
            np.array(kw), np.array(vw))


def tolerance(type_v: str, v_widened, rtol: float = 2e-5, atol: float = 2e-6) -> dict:
    """assert_allclose's rtol/atol for the kernel against numpy_attention on the widened values. A q8_0
    value cache's weighted sum takes the softmax weights as 16-bit integers per (head, 32 values, 256
    keys) (decode_attention._wsum_tiles): within 1e-4 of the largest |value| (2.9e-5 seen over 40
    random shapes and scales; the q8_0 codes themselves are off by up to 3.9e-3 of it)."""
    if type_v != "q8_0":
        return dict(rtol=rtol, atol=atol)
    return dict(rtol=rtol, atol=max(atol, 1e-4 * float(np.abs(v_widened).max())))
