"""The load-time repack of Q4_K / Q6_K (numba kernels writing the destination in place) gives,
bit for bit, the arrays of the NumPy repack: any bytes (NaN and inf scales too), padded last
groups, several PREPARE_ROWS steps, stacked weights, unaligned raw blocks, populated buffers."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from spark_lab.kernels import qmatvec as qm
from spark_lab.kernels.qmatvec import repack as R
from spark_lab.quants import BLOCK_SIZES, QuantTensor

pytest.importorskip("numba")

K_TYPES = (QT.Q4_K, QT.Q6_K)


def any_bytes(q, rows, cols, rng):
    """Rows of random blocks: every byte random, so some float16 scales are NaN or inf."""
    bs, ts = BLOCK_SIZES[q]
    return rng.integers(0, 256, (rows, cols // bs * ts), dtype=np.uint8)


def numpy_repack(q, raw, G):
    """The NumPy reference layout for raw u8 [rows, row bytes], padded to whole groups with zero rows."""
    rows = raw.shape[0]
    pad = -rows % G
    blocks = np.concatenate([raw, np.zeros((pad, raw.shape[1]), np.uint8)]).reshape(rows + pad, -1, BLOCK_SIZES[q][1])
    return R._repack(q, blocks, G, fast=False)


def same_bits(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert np.array_equal(a.view(np.uint8), b.view(np.uint8))        # NaNs compared by their bits


@pytest.mark.filterwarnings("ignore:invalid value")                    # NumPy's reference on NaN scales
@pytest.mark.parametrize("q", K_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("rows, G", [(128, 64), (83, 32), (200, 64)])
def test_prepare_is_the_numpy_repack_bit_for_bit(q, rows, G, monkeypatch):
    monkeypatch.setattr(R, "PREPARE_ROWS", 64)                          # several steps, the last one padded
    rng = np.random.default_rng(rows + G + int(q))
    raw = any_bytes(q, rows, 512, rng)
    want_kind, want = numpy_repack(q, raw, G)
    p = qm.prepare(QuantTensor(raw, q, (rows, 512)), G=G)
    assert p.kind == want_kind and p.G == G and p.rows == rows
    same_bits(p.arrays, want)


@pytest.mark.filterwarnings("ignore:invalid value")
@pytest.mark.parametrize("q", K_TYPES, ids=lambda q: q.name)
def test_unaligned_raw_blocks(q):
    # a row's words are read 4 (Q4_K) or 2 (Q6_K) bytes at a time: an unaligned start is copied first
    rng = np.random.default_rng(5)
    raw = any_bytes(q, 64, 256, rng)
    buf = np.empty(raw.nbytes + 1, np.uint8)
    shifted = buf[1:].reshape(raw.shape)
    shifted[...] = raw
    assert shifted.ctypes.data % 2 == 1
    same_bits(qm.prepare(QuantTensor(shifted, q, (64, 256)), G=32).arrays, numpy_repack(q, raw, 32)[1])


@pytest.mark.filterwarnings("ignore:invalid value")
@pytest.mark.parametrize("q", K_TYPES, ids=lambda q: q.name)
def test_prepare_stack_of_k_quants(q):
    rng = np.random.default_rng(9)
    raws = [any_bytes(q, r, 256, rng) for r in (128, 64, 64)]
    parts = [QuantTensor(r, q, (len(r), 256)) for r in raws]
    stacked = qm.prepare_stack(parts)
    assert stacked is not None
    G = parts[0].packed.G                                                # 32, chosen for 256 rows
    same_bits(stacked, numpy_repack(q, np.concatenate(raws), G)[1])
    for w, r in zip(parts, raws):
        same_bits(w.packed.arrays, numpy_repack(q, r, w.packed.G)[1])


def test_large_destinations_are_writable_arrays():
    small = R._empty((4, 8), np.float32)
    assert small.shape == (4, 8) and small.dtype == np.float32
    n = R.POPULATE_BYTES // 4
    big = R._empty((2, n), np.float32)
    assert big.shape == (2, n) and big.dtype == np.float32 and big.flags.c_contiguous and big.flags.writeable
    big[...] = 1.5
    assert float(big.sum()) == 1.5 * 2 * n
