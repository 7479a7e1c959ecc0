"""softmax and the pointwise activations against NumPy definitions and torch."""
import math

import numpy as np
import pytest

from spark_lab.kernels import geglu, gelu, quick_gelu, silu, softmax, swiglu


def _x(shape, seed=0, scale=3.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _softmax64(x, axis=-1):
    x = x.astype(np.float64)
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def test_softmax_stable_and_float32():
    x = _x((4, 1000), scale=50.0)
    x[0, 0] = 1e4                                      # would overflow exp without the max shift
    y = softmax(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, _softmax64(x), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(softmax(x, axis=0), _softmax64(x, 0), rtol=1e-5, atol=1e-7)


def test_softmax_bool_and_additive_masks():
    x = _x((2, 3, 5))
    keep = np.tril(np.ones((3, 5), bool), k=1)         # broadcast over the leading dim
    y = softmax(x, mask=keep)
    ref = _softmax64(np.where(keep, x, -np.inf))
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-7)
    add = np.where(keep, 0.0, -np.inf).astype(np.float32)
    np.testing.assert_allclose(softmax(x, mask=add), ref, rtol=1e-5, atol=1e-7)
    assert softmax(x, mask=add).dtype == np.float32


def test_softmax_fully_masked_row_is_zero_not_nan():
    x = _x((2, 4))
    keep = np.array([[True, False, True, False], [False] * 4])
    y = softmax(x, mask=keep)
    assert np.all(np.isfinite(y)) and np.all(y[1] == 0.0)
    np.testing.assert_allclose(y[0].sum(), 1.0, rtol=1e-6)


def test_silu_and_swiglu():
    x = _x(2000, scale=30.0)
    x64 = x.astype(np.float64)
    y = silu(x)
    assert y.dtype == np.float32 and np.all(np.isfinite(y))
    np.testing.assert_allclose(y, x64 / (1 + np.exp(-x64)), rtol=1e-5, atol=1e-30)
    up = _x(2000, 1)
    np.testing.assert_allclose(swiglu(x, up), x64 / (1 + np.exp(-x64)) * up, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"\(2000,\).*\(1999,\)"):
        swiglu(x, up[:-1])


def test_gelu_exact_against_math_erf():
    x = np.concatenate([_x(3000, scale=4.0), np.array([-12.0, -6.0, -0.0, 0.0, 6.0, 12.0], np.float32)])
    ref = np.array([v * 0.5 * math.erfc(-v / math.sqrt(2.0)) for v in x.astype(np.float64)])
    y = gelu(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-30)   # relative accuracy even in the far tail


def test_gelu_matches_torch_both_modes():
    torch = pytest.importorskip("torch")
    x = _x((64, 128))
    t = torch.from_numpy(x)
    np.testing.assert_allclose(gelu(x), torch.nn.functional.gelu(t).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gelu(x, "tanh"), torch.nn.functional.gelu(t, approximate="tanh").numpy(), rtol=1e-5, atol=1e-6)
    assert gelu(x, "tanh").dtype == np.float32
    with pytest.raises(ValueError, match="approximate"):
        gelu(x, "fast")


def test_quick_gelu_and_geglu():
    x = _x((3, 16))
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(quick_gelu(x), x64 / (1 + np.exp(-1.702 * x64)), rtol=1e-5, atol=1e-6)
    h, g = x[:, :8], x[:, 8:]
    np.testing.assert_allclose(geglu(x), h * gelu(g), rtol=1e-6)
    assert geglu(x).shape == (3, 8) and geglu(x).dtype == np.float32
    with pytest.raises(ValueError, match="odd"):
        geglu(x[:, :15])


def test_geglu_fused_path_matches_exact_gelu(monkeypatch):
    """Large float32 inputs take the numba kernel (polynomial exp): relative accuracy like gelu's,
    tails included, and the same numbers as the NumPy body within float32 rounding."""
    pytest.importorskip("numba")
    from spark_lab.kernels import activations
    g = np.concatenate([_x(4090, scale=4.0), np.array([-12.0, -6.0, -0.0, 0.0, 6.0, 12.0], np.float32)])
    h = _x(4096, seed=5)
    x = np.concatenate([h, g]).reshape(1, 8192)
    monkeypatch.setattr(activations, "GEGLU_FUSED_MIN", 1)
    y = geglu(x)
    assert y.dtype == np.float32 and y.shape == (1, 4096)
    g64, h64 = g.astype(np.float64), h.astype(np.float64)
    ref = np.array([hv * v * 0.5 * math.erfc(-v / math.sqrt(2.0)) for hv, v in zip(h64, g64)])
    np.testing.assert_allclose(y[0], ref, rtol=1e-5, atol=1e-30)
    monkeypatch.setattr(activations, "GEGLU_FUSED_MIN", 1 << 62)
    np.testing.assert_allclose(y, geglu(x), rtol=1e-5, atol=1e-30)
