"""conv2d / upsample_nearest2d against a direct-loop NumPy definition and torch."""
import numpy as np
import pytest

from spark_lab.kernels import conv2d, upsample_nearest2d


def _x(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _conv_ref(x, w, b, stride, padding, groups):
    """out[n, o, i, j] = sum over the group's channels and the kernel window (float64 loops)."""
    N, C, H, W = x.shape
    O, Cg, kh, kw = w.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    Ho, Wo = (H + 2 * padding - kh) // stride + 1, (W + 2 * padding - kw) // stride + 1
    out = np.zeros((N, O, Ho, Wo))
    for o in range(O):
        g = o // (O // groups)
        xs = xp[:, g * Cg:(g + 1) * Cg]
        for i in range(Ho):
            for j in range(Wo):
                patch = xs[:, :, i * stride:i * stride + kh, j * stride:j * stride + kw]
                out[:, o, i, j] = (patch * w[o]).sum(axis=(1, 2, 3))
    return out + (0 if b is None else b[None, :, None, None])


@pytest.mark.parametrize("stride,padding,groups,k", [(1, 1, 1, 3), (2, 1, 1, 3), (1, 0, 2, 3), (1, 0, 1, 1), (2, 0, 4, 1)])
def test_conv2d_matches_definition(stride, padding, groups, k):
    x, w, b = _x((2, 8, 7, 9), 0), _x((12, 8 // groups, k, k), 1), _x(12, 2)
    y = conv2d(x, w, b, stride=stride, padding=padding, groups=groups)
    assert y.dtype == np.float32 and y.flags.c_contiguous
    np.testing.assert_allclose(y, _conv_ref(x, w, b, stride, padding, groups), rtol=1e-4, atol=1e-4)


def test_conv2d_matches_torch_unet_shapes():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x, w, b = _x((2, 64, 32, 32), 3), _x((64, 64, 3, 3), 4) * 0.05, _x(64, 5)
    y = conv2d(x, w, b, padding=1)
    ref = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b), padding=1).numpy()
    assert y.shape == (2, 64, 32, 32)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
    # downsampler (stride 2), 1x1 shortcut, and a depthwise conv with non-square padding pairs
    y = conv2d(x, w, None, stride=2, padding=1)
    np.testing.assert_allclose(y, F.conv2d(torch.from_numpy(x), torch.from_numpy(w), stride=2, padding=1).numpy(), rtol=1e-4, atol=1e-4)
    w1 = _x((32, 64, 1, 1), 6)
    np.testing.assert_allclose(conv2d(x, w1), F.conv2d(torch.from_numpy(x), torch.from_numpy(w1)).numpy(), rtol=1e-4, atol=1e-4)
    wd = _x((64, 1, 3, 5), 7)
    got = conv2d(x, wd, stride=(1, 2), padding=(1, 2), groups=64)
    ref = F.conv2d(torch.from_numpy(x), torch.from_numpy(wd), stride=(1, 2), padding=(1, 2), groups=64).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_conv2d_errors_name_shapes():
    x = _x((1, 6, 5, 5), 0)
    with pytest.raises(ValueError, match=r"\(1, 6, 5, 5\).*\(4, 4, 3, 3\)"):
        conv2d(x, _x((4, 4, 3, 3), 1))
    with pytest.raises(ValueError, match="bias"):
        conv2d(x, _x((4, 6, 3, 3), 1), _x(3, 2))
    with pytest.raises(ValueError, match="larger"):
        conv2d(x, _x((4, 6, 7, 7), 1))


def test_upsample_nearest2d_matches_torch():
    torch = pytest.importorskip("torch")
    x = _x((2, 3, 4, 5), 8)
    y = upsample_nearest2d(x)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x), scale_factor=2.0, mode="nearest").numpy()
    assert y.shape == (2, 3, 8, 10) and y.dtype == np.float32
    np.testing.assert_array_equal(y, ref)
    np.testing.assert_array_equal(upsample_nearest2d(x, 3), x.repeat(3, 2).repeat(3, 3))
    with pytest.raises(ValueError, match="scale"):
        upsample_nearest2d(x, 1.5)


@pytest.mark.parametrize("shape,O", [((2, 32, 8, 8), 32), ((1, 40, 7, 9), 36), ((2, 64, 5, 4), 48)])
def test_conv2d_winograd_path_matches_definition_and_im2col(shape, O, monkeypatch):
    """3x3 / stride 1 / padding 1 with >= 32 channels takes Winograd F(2x2, 3x3) (numba): same
    numbers as the definition (odd sizes crop the last tile), and as the im2col GEMM path."""
    pytest.importorskip("numba")
    from spark_lab.kernels import conv as conv_mod
    x, w, b = _x(shape, 10), _x((O, shape[1], 3, 3), 11) * 0.1, _x(O, 12)
    y = conv2d(x, w, b, padding=1)
    assert y.dtype == np.float32 and y.flags.c_contiguous and y.shape == (shape[0], O) + shape[2:]
    np.testing.assert_allclose(y, _conv_ref(x, w, b, 1, 1, 1), rtol=1e-4, atol=1e-4)
    y2 = conv2d(x * 2.0, w, None, padding=1)          # reused work buffers: no state leaks between calls
    np.testing.assert_allclose(y2, _conv_ref(x * 2.0, w, None, 1, 1, 1), rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(conv_mod, "WINOGRAD_MIN_CHANNELS", 10 ** 9)
    np.testing.assert_allclose(conv2d(x, w, b, padding=1), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,O", [((2, 32, 8, 8), 32), ((1, 5, 7, 3), 4), ((2, 64, 4, 6), 48)])
def test_upsample2x_conv3x3_matches_upsample_then_conv(shape, O, monkeypatch):
    """Nearest x2 + 3x3 conv as four parity 2x2 kernels (a batched GEMM on channels-last
    patches with numba, four conv2d calls without): the definition on the upsampled input."""
    from spark_lab.kernels import conv as conv_mod
    x, w, b = _x(shape, 13), _x((O, shape[1], 3, 3), 14) * 0.1, _x(O, 15)
    ref = _conv_ref(upsample_nearest2d(x), w, b, 1, 1, 1)
    y = conv_mod.upsample2x_conv3x3(x, w, b)
    assert y.dtype == np.float32 and y.flags.c_contiguous and y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
    y2 = conv_mod.upsample2x_conv3x3(x * 2.0, w, None)        # reused work buffers: no state leaks
    np.testing.assert_allclose(y2, _conv_ref(upsample_nearest2d(x * 2.0), w, None, 1, 1, 1), rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(conv_mod, "_WINO", False)              # the fallback without numba
    np.testing.assert_allclose(conv_mod.upsample2x_conv3x3(x, w, b), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="upsample2x_conv3x3"):
        conv_mod.upsample2x_conv3x3(x, w[:, :1])


def test_conv2d_winograd_chunks_give_the_same_numbers(monkeypatch):
    """Big inputs run in chunks of tile rows per image (L2-sized): the numbers of one pass, and
    of the definition, also when the last chunk is short and the size is odd. Each chunk's
    products are a BLAS GEMM of its own size, and BLAS may pick another kernel (another summation
    order) by size: bit-identical on an AVX-512 OpenBLAS, 1.7e-6 apart on Zen 3's (AVX2)."""
    pytest.importorskip("numba")
    from spark_lab.kernels import conv as conv_mod
    x, w, b = _x((2, 32, 11, 10), 16), _x((24, 32, 3, 3), 17) * 0.1, _x(24, 18)
    monkeypatch.setattr(conv_mod, "WINOGRAD_CHUNK_BYTES", 1 << 30)
    whole = conv2d(x, w, b, padding=1)
    monkeypatch.setattr(conv_mod, "WINOGRAD_CHUNK_BYTES", 64 * 5 * 32 * 2)   # 2 tile rows per chunk
    chunked = conv2d(x, w, b, padding=1)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(chunked, _conv_ref(x, w, b, 1, 1, 1), rtol=1e-4, atol=1e-4)
