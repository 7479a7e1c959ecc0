"""linear / matmul / embedding against their NumPy definitions (float and quantized weights)."""
import numpy as np
import pytest

from spark_lab.kernels import embedding, linear, matmul


def _rng():
    return np.random.default_rng(0)


def test_linear_matches_definition_and_keeps_float32():
    r = _rng()
    x = r.standard_normal((2, 5, 64), dtype=np.float32)
    w = r.standard_normal((48, 64), dtype=np.float32)
    b = r.standard_normal(48, dtype=np.float32)
    y = linear(x, w, b)
    ref = np.einsum("bti,oi->bto", x.astype(np.float64), w.astype(np.float64)) + b
    assert y.shape == (2, 5, 48) and y.dtype == np.float32
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4)
    assert linear(x[0, 0], w).shape == (48,)


def test_linear_shape_mismatch_names_both_shapes():
    x = np.zeros((3, 10), np.float32)
    w = np.zeros((4, 12), np.float32)
    with pytest.raises(ValueError, match=r"\(3, 10\).*\(4, 12\)"):
        linear(x, w)
    with pytest.raises(ValueError, match="bias"):
        linear(x, np.zeros((4, 10), np.float32), np.zeros(5, np.float32))


@pytest.mark.parametrize("qname", ["Q8_0", "Q4_1"])
def test_linear_quantized_weight_matches_dequantized(qname):
    quants = pytest.importorskip("spark_lab.quants")
    import gguf
    qtype = gguf.GGMLQuantizationType[qname]
    r = _rng()
    wf = r.standard_normal((40, 96), dtype=np.float32)
    data = gguf.quants.quantize(wf, qtype)                   # uint8 [40, row_bytes]
    qt = quants.QuantTensor(data, qtype, (40, 96))
    x = r.standard_normal((3, 96), dtype=np.float32)
    ref = x.astype(np.float64) @ gguf.quants.dequantize(data, qtype).astype(np.float64).T
    y = linear(x, qt)
    assert y.shape == (3, 40) and y.dtype == np.float32
    try:                                       # decode-sized x: the numba kernels round x to int8 blocks
        from spark_lab.kernels import qmatvec as qm
        int8 = qm.available() and qtype in qm.INT8_TYPES
    except ImportError:
        int8 = False
    if int8:
        np.testing.assert_allclose(y, qm.reference(x, qt), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(y, ref, rtol=0, atol=3e-2 * np.abs(ref).max())   # llama.cpp's rounding
    else:
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"\(3, 95\).*\(40, 96\)"):
        linear(x[:, :95], qt)


def test_matmul_batched_and_mismatch():
    r = _rng()
    a = r.standard_normal((3, 4, 5), dtype=np.float32)
    b = r.standard_normal((5, 6), dtype=np.float32)
    y = matmul(a, b)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, np.einsum("bmk,kn->bmn", a, b), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"\(3, 4, 5\).*\(6, 5\)"):
        matmul(a, b.T)


def test_embedding_float_and_f16_tables():
    r = _rng()
    table = r.standard_normal((50, 8), dtype=np.float32)
    ids = np.array([3, 0, 49, 3])
    np.testing.assert_array_equal(embedding(table, ids), table[[3, 0, 49, 3]])
    out16 = embedding(table.astype(np.float16), ids)
    assert out16.dtype == np.float32
    np.testing.assert_array_equal(out16, table.astype(np.float16)[[3, 0, 49, 3]].astype(np.float32))


def test_embedding_rejects_bad_ids():
    table = np.zeros((10, 4), np.float32)
    with pytest.raises(ValueError, match="out of range"):
        embedding(table, np.array([1, 10]))
    with pytest.raises(ValueError, match="out of range"):
        embedding(table, np.array([-1]))
    with pytest.raises(ValueError, match="integers"):
        embedding(table, np.array([1.0]))


def test_embedding_quantized_rows():
    quants = pytest.importorskip("spark_lab.quants")
    import gguf
    r = _rng()
    wf = r.standard_normal((20, 64), dtype=np.float32)
    qtype = gguf.GGMLQuantizationType.Q8_0
    data = gguf.quants.quantize(wf, qtype)
    qt = quants.QuantTensor(data, qtype, (20, 64))
    ids = np.array([19, 2, 2])
    np.testing.assert_array_equal(embedding(qt, ids), gguf.quants.dequantize(data, qtype)[ids])


def test_round_x_q8_is_the_cpu_kernels_rounding():
    """The GPU's x rounding (array-module code) equals the numba kernels' quantize_x bit for bit."""
    from spark_lab.kernels import linalg
    qm = pytest.importorskip("spark_lab.kernels.qmatvec")
    assert qm.INT8_TYPES is linalg.INT8_X_TYPES                       # one list, owned by quants
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((5, 256)) * rng.uniform(1e-6, 30, (5, 1))).astype(np.float32)
    x[1, :32] = 0.0                                                    # an all-zero block
    xq, dx, _ = qm.quantize_x(x)
    want = (xq.reshape(5, -1, 32) * dx[..., None]).reshape(5, 256)
    got = linalg.round_x_q8(x)
    assert got.dtype == np.float32 and np.array_equal(got, want)
