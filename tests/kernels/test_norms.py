"""rmsnorm / layernorm / group_norm against NumPy definitions and torch."""
import numpy as np
import pytest

from spark_lab.kernels import group_norm, layernorm, rmsnorm


def _x(shape, seed=0, loc=0.0):
    return (np.random.default_rng(seed).standard_normal(shape) + loc).astype(np.float32)


def test_rmsnorm_definition_and_gemma_offset():
    x, w = _x((3, 7, 64)), _x(64, 1)
    eps = 1e-6
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + eps) * w
    y = rmsnorm(x, w, eps)
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    # Gemma checkpoints store w - 1: offset=1.0 must equal passing w + 1 directly
    np.testing.assert_allclose(rmsnorm(x, w, eps, offset=1.0), rmsnorm(x, w + 1.0, eps), rtol=1e-6, atol=1e-6)
    assert rmsnorm(x, w, eps, offset=1.0).dtype == np.float32


def test_rmsnorm_matches_torch():
    torch = pytest.importorskip("torch")
    x, w = _x((5, 576)), _x(576, 2)
    ref = torch.nn.functional.rms_norm(torch.from_numpy(x), (576,), torch.from_numpy(w), eps=1e-5).numpy()
    np.testing.assert_allclose(rmsnorm(x, w, 1e-5), ref, rtol=1e-5, atol=1e-5)


def test_norm_shape_errors_name_both_shapes():
    with pytest.raises(ValueError, match=r"\(32,\).*\(2, 64\)"):
        rmsnorm(_x((2, 64)), _x(32), 1e-6)
    with pytest.raises(ValueError, match=r"\(2, 6, 4, 4\).*5 groups"):
        group_norm(_x((2, 6, 4, 4)), 5, None, None, 1e-5)
    with pytest.raises(ValueError, match="bias"):
        layernorm(_x((2, 8)), _x(8), _x(7), 1e-5)


def test_layernorm_matches_torch_with_offset_mean():
    torch = pytest.importorskip("torch")
    x, w, b = _x((4, 9, 384), loc=30.0), _x(384, 1), _x(384, 2)   # |mean| >> std: two-pass variance
    ref = torch.nn.functional.layer_norm(torch.from_numpy(x), (384,), torch.from_numpy(w), torch.from_numpy(b), 1e-12).numpy()
    y = layernorm(x, w, b, 1e-12)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
    x64 = x.astype(np.float64)
    ref64 = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-12)
    np.testing.assert_allclose(layernorm(x, None, None, 1e-12), ref64, rtol=1e-4, atol=1e-4)


def test_group_norm_matches_torch():
    torch = pytest.importorskip("torch")
    x, w, b = _x((2, 64, 8, 8)), _x(64, 1), _x(64, 2)
    ref = torch.nn.functional.group_norm(torch.from_numpy(x), 32, torch.from_numpy(w), torch.from_numpy(b), 1e-6).numpy()
    y = group_norm(x, 32, w, b, 1e-6)
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_group_norm_definition_without_affine():
    x = _x((1, 6, 3, 5), loc=2.0)
    g = x.astype(np.float64).reshape(1, 3, -1)
    ref = ((g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-5)).reshape(x.shape)
    np.testing.assert_allclose(group_norm(x, 3, None, None, 1e-5), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_group_norm_silu_both_paths(fused, monkeypatch):
    """The numba kernel (large float32 inputs) and the NumPy body give the definition, with and
    without the fused SiLU, affine or not, and |mean| >> std."""
    from spark_lab.kernels import norms
    if fused:
        pytest.importorskip("numba")
    monkeypatch.setattr(norms, "GROUP_NORM_FUSED_MIN", 1 if fused else 1 << 62)
    x, w, b = _x((2, 12, 5, 7), 3, loc=50.0), _x(12, 4), _x(12, 5)
    g = x.astype(np.float64).reshape(2, 4, -1)
    ref = ((g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-5)).reshape(x.shape)
    np.testing.assert_allclose(group_norm(x, 4, None, None, 1e-5), ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(group_norm(x, 4, w, b, 1e-5), ref * w[None, :, None, None] + b[None, :, None, None],
                               rtol=1e-4, atol=1e-4)
    x = _x((2, 12, 5, 7), 6)
    g = x.astype(np.float64).reshape(2, 4, -1)
    r = ((g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-5)).reshape(x.shape)
    r = r * (w * 40.0)[None, :, None, None] + b[None, :, None, None]
    y = group_norm(x, 4, w * 40.0, b, 1e-5, silu=True)                # far tails of the sigmoid too
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_allclose(y, r / (1.0 + np.exp(-r)), rtol=1e-4, atol=1e-4)
