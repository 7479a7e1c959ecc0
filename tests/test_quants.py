"""spark_lab.quants: bit-exact dequantization against gguf-py, on random blocks and on the
real tensors of both shipped GGUF files; quant_matmul against dequantize-then-matmul."""
import numpy as np
import pytest
import gguf
from gguf import GGMLQuantizationType as QT

from spark_lab import quants
from spark_lab.quants import BLOCK_SIZES, QuantTensor, dequantize, quant_matmul

# byte offsets of the float16 scales in each block (kept finite in the "valid" blocks)
F16_FIELDS = {
    QT.Q4_0: [0], QT.Q4_1: [0, 2], QT.Q5_0: [0], QT.Q5_1: [0, 2], QT.Q8_0: [0],
    QT.Q2_K: [80, 82], QT.Q3_K: [108], QT.Q4_K: [0, 2], QT.Q5_K: [0, 2], QT.Q6_K: [208],
    QT.IQ4_NL: [0], QT.IQ4_XS: [0], QT.IQ2_XXS: [0], QT.IQ2_XS: [0], QT.IQ2_S: [0], QT.IQ3_XXS: [0],
    QT.IQ3_S: [0], QT.IQ1_S: [0], QT.TQ1_0: [52], QT.TQ2_0: [64],
}
# NVFP4's UE4M3 scale bytes are small whatever their value; MXFP4's E8M0 byte e means 2^(e-127)
# (kept near 1 in random_blocks); IQ1_M's float16 scale is spread over the top nibbles of its
# four scale words (set in random_blocks)
HAS_REF = [q for q in BLOCK_SIZES if q != QT.Q8_K]  # gguf-py has no Q8_K dequantizer


def random_blocks(q, n_blocks, rng):
    """Random uint8 [n_blocks, type_size] with finite scales."""
    bs, ts = BLOCK_SIZES[q]
    if q in (QT.F32, QT.F16, QT.BF16):
        x = rng.standard_normal(n_blocks).astype(np.float32)
        if q == QT.F16:
            return x.astype(np.float16).view(np.uint8).reshape(n_blocks, ts)
        if q == QT.BF16:
            return (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(n_blocks, ts)
        return x.view(np.uint8).reshape(n_blocks, ts)
    b = rng.integers(0, 256, (n_blocks, ts), dtype=np.uint8)
    for off in F16_FIELDS.get(q, []):
        s = rng.uniform(-0.1, 0.1, n_blocks).astype(np.float16)
        b[:, off:off + 2] = s.view(np.uint8).reshape(n_blocks, 2)
    if q == QT.Q8_K:
        b[:, 0:4] = rng.uniform(-0.1, 0.1, n_blocks).astype(np.float32).view(np.uint8).reshape(n_blocks, 4)
    if q == QT.MXFP4:
        b[:, 0] = rng.integers(118, 131, n_blocks)                      # scales 2^-9 .. 2^3
    if q == QT.IQ1_M:
        d = rng.uniform(-0.1, 0.1, n_blocks).astype(np.float16).view(np.uint16)
        w = b[:, 48:56].copy().view(np.uint16)                          # [n, 4]
        for k in range(4):
            w[:, k] = (w[:, k] & 0x0FFF) | (((d >> (4 * k)) & 15) << 12)
        b[:, 48:56] = w.view(np.uint8)
    return b


def same_bits(a, b):
    return a.dtype == b.dtype == np.float32 and a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def test_table_matches_gguf():
    for q, sizes in BLOCK_SIZES.items():
        assert gguf.GGML_QUANT_SIZES[q] == sizes, q.name


@pytest.mark.parametrize("q", HAS_REF, ids=lambda q: q.name)
def test_random_blocks_bit_exact(q):
    rng = np.random.default_rng(int(q))
    bs, ts = BLOCK_SIZES[q]
    rows, cols = 7, bs * 3 if bs > 1 else 96
    data = random_blocks(q, rows * cols // bs, rng).reshape(rows, -1)
    ref = gguf.quants.dequantize(data, q)
    got = dequantize(data, q)
    assert same_bits(ref, got)
    assert same_bits(got, dequantize(data, q, (rows, cols)))
    assert same_bits(got.reshape(-1), dequantize(data.reshape(-1), q, (rows * cols,)))


@pytest.mark.parametrize("q", [q for q in HAS_REF if BLOCK_SIZES[q][0] > 1], ids=lambda q: q.name)
def test_raw_random_bytes_nan_equal(q):
    # any bytes at all, NaN/inf scales included: the same bits come out (NaN payloads too)
    rng = np.random.default_rng(100 + int(q))
    data = rng.integers(0, 256, (64, BLOCK_SIZES[q][1]), dtype=np.uint8)
    with np.errstate(all="ignore"):
        assert same_bits(gguf.quants.dequantize(data, q), dequantize(data, q))


def test_q8_k_by_hand():
    rng = np.random.default_rng(1)
    b = random_blocks(QT.Q8_K, 3, rng)
    d = b[:, :4].copy().view(np.float32)                 # [3, 1]
    q = b[:, 4:260].copy().view(np.int8).astype(np.float32)
    assert same_bits(dequantize(b, QT.Q8_K), d * q)


def test_planner_bits_per_weight_of_every_format():
    from spark_lab.planner import FORMAT_BITS
    assert set(FORMAT_BITS) == {q.name for q in BLOCK_SIZES}
    assert (FORMAT_BITS["MXFP4"], FORMAT_BITS["NVFP4"], FORMAT_BITS["Q4_K"], FORMAT_BITS["Q8_0"]) == (4.25, 4.5, 4.5, 8.5)
    assert (FORMAT_BITS["IQ2_XXS"], FORMAT_BITS["IQ1_S"], FORMAT_BITS["IQ4_XS"], FORMAT_BITS["BF16"]) == (2.0625, 1.5625, 4.25, 16.0)


def test_mxfp4_and_nvfp4_by_their_definition():
    # OCP MX: E2M1 codes 0..7 are 0, 0.5, 1, 1.5, 2, 3, 4, 6 (bit 3 the sign), times 2^(e - 127)
    e2m1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    codes = np.arange(32) % 16
    b = np.zeros((3, 17), np.uint8)
    b[:, 0] = [127, 130, 0]                                             # scales 1, 8, 2^-127
    b[:, 1:] = (codes[:16] | (codes[16:] << 4)).astype(np.uint8)        # value j: low nibble, j + 16: high
    want = np.array([(-1.0 if c & 8 else 1.0) * e2m1[c & 7] for c in codes])
    got = dequantize(b, QT.MXFP4)
    assert np.array_equal(got[0], want) and np.array_equal(got[1], want * 8) and np.array_equal(got[2], want * 2.0 ** -127)
    # NVFP4: 16-value sub-blocks, each with an unsigned E4M3 scale (bias 7); 0x38 = 1.0, 0x40 = 2.0
    b = np.zeros((1, 36), np.uint8)
    b[0, :4] = [0x38, 0x40, 0x01, 0x00]                                 # 1, 2, 2^-9 (subnormal), 0
    b[0, 4:] = np.tile((codes[:8] | (codes[8:16] << 4)).astype(np.uint8), 4)
    got = dequantize(b, QT.NVFP4).reshape(4, 16)
    assert np.array_equal(got, want[:16] * np.array([[1.0], [2.0], [2.0 ** -9], [0.0]]))


def test_qtype_names_and_ints():
    data = random_blocks(QT.Q4_1, 4, np.random.default_rng(2))
    ref = dequantize(data, QT.Q4_1)
    assert same_bits(dequantize(data, "q4_1"), ref)
    assert same_bits(dequantize(data, int(QT.Q4_1)), ref)


# ---------------------------------------------------------------------------- real model files

def _path(name):
    from spark_lab.models import ModelNotFound, resolve
    try:
        return resolve(name)
    except ModelNotFound as e:
        pytest.skip(str(e))


_READERS = {}


def _reader(name):
    """gguf.GGUFReader, once per module (it parses the whole vocabulary: seconds)."""
    if name not in _READERS:
        _READERS[name] = gguf.GGUFReader(_path(name))
    return _READERS[name]


def _tensors(name):
    """[(name, qtype, raw data)] of every tensor. Gemma's 262k-token vocabulary makes
    GGUFReader take ~40 s on a busy 2-core box, so that file is indexed with spark_lab.gguf's
    header reader when present (the bytes are the same memmapped file either way)."""
    if name == "gemma3-270m":
        try:
            from spark_lab.gguf import GGUFFile
            f = GGUFFile(_path(name))
            return [(t.name, t.qtype, f.raw(t)) for t in f.tensors.values()]
        except ImportError:
            pass
    return [(t.name, t.tensor_type, t.data) for t in _reader(name).tensors]


def _check_all_tensors(tensors, max_rows=192):
    rng = np.random.default_rng(0)
    seen = {}
    for name, qtype, data in tensors:
        if data.ndim == 2 and data.shape[0] > max_rows:  # every tensor, a sample of its rows
            idx = np.unique(np.concatenate([[0, data.shape[0] - 1], rng.integers(0, data.shape[0], max_rows - 2)]))
            data = data[idx]
        ref = gguf.quants.dequantize(data, qtype)
        got = dequantize(data, qtype)
        assert same_bits(ref.astype(np.float32), got), name
        seen[qtype.name] = seen.get(qtype.name, 0) + 1
    return seen


def test_smollm2_every_tensor_bit_exact():
    seen = _check_all_tensors(_tensors("smollm2-135m-instruct"))
    assert seen == {"Q4_1": 210, "Q8_0": 1, "F32": 61}


def test_gemma3_every_tensor_bit_exact():
    seen = _check_all_tensors(_tensors("gemma3-270m"))
    assert seen == {"F32": 109, "Q5_0": 81, "Q4_K": 27, "Q8_0": 10, "Q6_K": 9}


def test_quant_tensor_from_gguf_and_rows():
    reader = _reader("smollm2-135m-instruct")
    t = next(t for t in reader.tensors if t.name == "token_embd.weight")
    qt = QuantTensor.from_gguf(t)
    assert qt.shape == (49152, 576) and qt.qtype == QT.Q8_0
    assert qt.nbytes == 49152 * 576 // 32 * 34
    ids = np.array([0, 1, 49151, 7, 7])
    got = qt.rows(ids)
    assert got.shape == (5, 576) and got.dtype == np.float32
    ref = gguf.quants.dequantize(np.asarray(t.data)[ids], QT.Q8_0)
    assert same_bits(ref, got)


# ---------------------------------------------------------------------------- quant_matmul

@pytest.mark.parametrize("q", [QT.Q4_1, QT.Q8_0, QT.Q4_K, QT.Q6_K, QT.Q5_0, QT.F16], ids=lambda q: q.name)
def test_quant_matmul_matches_dequantized(q):
    rng = np.random.default_rng(3)
    rows, cols = 70, 512
    bs = BLOCK_SIZES[q][0]
    qt = QuantTensor(random_blocks(q, rows * cols // bs, rng), q, (rows, cols))
    w = qt.dequantize()                                  # [70, 512]
    x = rng.standard_normal((3, cols)).astype(np.float32)
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    for chunk in (1 << 21, 1000):                        # one chunk, then many uneven chunks
        y = quant_matmul(x, qt, chunk_values=chunk, fast=False)
        assert y.dtype == np.float32 and y.shape == (3, rows)
        assert np.max(np.abs(y - ref)) <= 1e-4 * np.max(np.abs(ref))
    y = quant_matmul(x, qt)                              # the numba tiles where they exist
    try:                                                 # (which round x to int8 blocks for int8 types)
        from spark_lab.kernels import qmatvec as qm
        if qm.supports(qt) and q in qm.INT8_TYPES:
            ref = qm.reference(x, qt).astype(np.float64)
    except ImportError:
        pass
    assert y.dtype == np.float32 and np.max(np.abs(y - ref)) <= 1e-4 * np.max(np.abs(ref))
    y1 = quant_matmul(x[0], qt)
    assert y1.shape == (rows,) and np.allclose(y1, ref[0], rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("q", [q for q in HAS_REF if BLOCK_SIZES[q][0] > 1], ids=lambda q: q.name)
def test_quant_matmul_every_type(q):
    # tile dequantize + BLAS for every block type (MXFP4: x rounded to int8 blocks on the numba path)
    rng = np.random.default_rng(30 + int(q))
    rows, cols = 40, 512
    qt = QuantTensor(random_blocks(q, rows * cols // BLOCK_SIZES[q][0], rng), q, (rows, cols))
    x = rng.standard_normal((3, cols)).astype(np.float32)
    ref = x.astype(np.float64) @ qt.dequantize().T.astype(np.float64)
    y = quant_matmul(x, qt, chunk_values=3000, fast=False)            # several chunks of rows
    assert y.dtype == np.float32 and y.shape == (3, rows)
    assert np.max(np.abs(y - ref)) <= 1e-5 * np.max(np.abs(ref))
    try:
        from spark_lab.kernels import qmatvec as qm
        if qm.supports(qt) and q in qm.INT8_TYPES:
            ref = qm.reference(x, qt).astype(np.float64)
    except ImportError:
        pass
    y = quant_matmul(x, qt)
    assert y.dtype == np.float32 and np.max(np.abs(y - ref)) <= 1e-5 * np.max(np.abs(ref))


# ---------------------------------------------------------------------------- errors

def test_wrong_buffer_length_names_bytes():
    data = np.zeros(100, np.uint8)
    with pytest.raises(ValueError, match=r"needs 40 bytes, got 100"):
        dequantize(data, QT.Q4_1, (64,))
    with pytest.raises(ValueError, match=r"needs 360 bytes, got 100"):
        QuantTensor(data, QT.Q4_1, (1, 576))
    with pytest.raises(ValueError, match=r"not a whole number of 20-byte blocks"):
        dequantize(np.zeros((2, 30), np.uint8), QT.Q4_1)


def test_unknown_and_unsupported_types():
    with pytest.raises(ValueError, match="unknown GGML quant type 'Q9_9'"):
        dequantize(np.zeros(18, np.uint8), "Q9_9")
    with pytest.raises(ValueError, match="Q8_1 is not supported"):
        dequantize(np.zeros(36, np.uint8), QT.Q8_1)


def test_shape_errors():
    with pytest.raises(ValueError, match="multiple of its block size 256"):
        QuantTensor(np.zeros(144, np.uint8), QT.Q4_K, (1, 100))
    qt = QuantTensor(np.zeros((4, 20), np.uint8), QT.Q4_1, (4, 32))
    with pytest.raises(ValueError, match=r"x of shape \(2, 31\).*weight shape \(4, 32\)"):
        quant_matmul(np.zeros((2, 31), np.float32), qt)
    with pytest.raises(ValueError, match=r"row ids must be in \[0, 4\)"):
        qt.rows([4])


@pytest.mark.gpu
@pytest.mark.parametrize("q", HAS_REF, ids=lambda q: q.name)
def test_cupy_matches_numpy(q):
    cp = pytest.importorskip("cupy")
    rng = np.random.default_rng(5)
    bs = BLOCK_SIZES[q][0]
    data = random_blocks(q, 8 * 2 * max(bs, 32) // bs, rng).reshape(8, -1)
    host = dequantize(data, q)
    dev = dequantize(cp.asarray(data), q)
    assert isinstance(dev, cp.ndarray) and same_bits(host, cp.asnumpy(dev))
    qt = QuantTensor(cp.asarray(data), q, host.shape)
    x = rng.standard_normal((2, host.shape[1])).astype(np.float32)
    y = quant_matmul(cp.asarray(x), qt)
    np.testing.assert_allclose(cp.asnumpy(y), x @ host.T, rtol=1e-4, atol=1e-4)


def test_concat_rows():
    rng = np.random.default_rng(9)
    a = QuantTensor(random_blocks(QT.Q4_1, 3 * 2, rng), QT.Q4_1, (3, 64))
    b = QuantTensor(random_blocks(QT.Q4_1, 5 * 2, rng), QT.Q4_1, (5, 64))
    c = quants.concat_rows(a, b)
    assert c.shape == (8, 64) and same_bits(c.dequantize(), np.concatenate([a.dequantize(), b.dequantize()]))
    with pytest.raises(ValueError, match=r"Q8_0 \(2, 64\) does not stack under Q4_1 \(3, 64\)"):
        quants.concat_rows(a, QuantTensor(random_blocks(QT.Q8_0, 4, rng), QT.Q8_0, (2, 64)))


def test_quant_tensor_keeps_the_placed_view_counted():
    # the allocator counts a placed view while that object lives: QuantTensor must keep it
    from spark_lab.memory import get_allocator
    alloc = get_allocator()
    before = alloc.stats().by_tag["weights"]
    raw = random_blocks(QT.Q4_1, 8, np.random.default_rng(10))
    qt = QuantTensor(alloc.place(raw.reshape(-1), tag="weights", what="t"), QT.Q4_1, (4, 64))
    assert alloc.stats().by_tag["weights"] == before + raw.nbytes
    del qt
    assert alloc.stats().by_tag["weights"] == before


def test_concat_rows_of_file_mapped_parts(tmp_path):
    # the parts' pages are dropped after the copy (read-only memmap); their values stay readable
    rng = np.random.default_rng(19)
    a, b = random_blocks(QT.Q8_0, 4 * 3, rng), random_blocks(QT.Q8_0, 2 * 3, rng)
    path = tmp_path / "w.bin"
    path.write_bytes(a.tobytes() + b.tobytes())
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    qa = QuantTensor(mm[:a.nbytes], QT.Q8_0, (4, 96))
    qb = QuantTensor(mm[a.nbytes:], QT.Q8_0, (2, 96))
    c = quants.concat_rows(qa, qb)
    ref = np.concatenate([dequantize(a, QT.Q8_0).reshape(4, 96), dequantize(b, QT.Q8_0).reshape(2, 96)])
    assert same_bits(c.dequantize(), ref) and same_bits(qa.dequantize(), ref[:4])
