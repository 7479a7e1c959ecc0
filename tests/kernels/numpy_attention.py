"""The reference the decode-kernel tests compare with: attention()'s NumPy body.

attention() sends one float32 query row to the numba decode kernel, the code under test; a mask that
keeps every key turns that fast path off."""
import numpy as np

from spark_lab.kernels.attention import attention


def numpy_attention(q, k, v, **kw):
    """q [Tq, Hq, D], k/v [Tk, Hkv, D] -> [Tq, Hq, Dv] by the NumPy body (kw: causal, q_offset, ...)."""
    return attention(q, k, v, mask=np.ones((1, 1, k.shape[0]), bool), **kw)
