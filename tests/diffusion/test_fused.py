"""The numba attention kernels (diffusion/fused.py) against the NumPy matmul + softmax reference."""
import numpy as np
import pytest

from spark_lab.diffusion import attention


def _ref64(q, k, v):
    q, k, v = (t.astype(np.float64) for t in (q, k, v))
    s = q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("BH,Tq,Tk,D,scale", [(6, 37, 29, 4, 1.0), (4, 16, 64, 8, 1.0), (3, 9, 20, 4, 12.0), (3, 9, 20, 5, 12.0)])
def test_fused_attention_matches_reference(BH, Tq, Tk, D, scale, monkeypatch):
    """D = 4 (spark-emoji's special case) and generic D; scale 12 makes the score bound loose
    enough that some rows fall back to the exact max."""
    pytest.importorskip("numba")
    from spark_lab.diffusion.fused import attend_fused
    rng = np.random.default_rng(D)
    q, k, v = (rng.standard_normal((BH, T, D), dtype=np.float32) for T in (Tq, Tk, Tk))
    q *= scale
    k *= scale
    y = attend_fused(q, k, v)
    assert y.dtype == np.float32 and y.shape == (BH, Tq, D) and np.isfinite(y).all()
    np.testing.assert_allclose(y, _ref64(q, k, v), rtol=1e-4, atol=1e-4 * scale)
    monkeypatch.setattr(attention, "FUSED_MAX_HEAD_DIM", 0)            # the NumPy body agrees
    np.testing.assert_allclose(attention.attend(q, k, v), y, rtol=1e-4, atol=1e-4 * scale)
