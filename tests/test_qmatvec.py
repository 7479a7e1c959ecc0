"""spark_lab.kernels.qmatvec: the numba fused mat-vec against quant_matmul (NumPy reference,
fast=False), the prefill tiles (bit-exact dequantize, qmatmul), on random blocks, on real tensors
of both shipped GGUFs, allocator accounting and release of the raw pages, fallbacks and errors."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from spark_lab.kernels import qmatvec as qm
from spark_lab.quants import BLOCK_SIZES, QuantTensor, quant_matmul

pytest.importorskip("numba")

F16_FIELDS = {QT.Q4_0: [0], QT.Q4_1: [0, 2], QT.Q5_0: [0], QT.Q5_1: [0, 2], QT.Q8_0: [0],
              QT.Q4_K: [0, 2], QT.Q6_K: [208]}
RTOL = 2e-6  # of max|y|: float32 sums in another order than BLAS


def random_weight(q, rows, cols, rng):
    bs, ts = BLOCK_SIZES[q]
    b = rng.integers(0, 256, (rows * cols // bs, ts), dtype=np.uint8)
    for off in F16_FIELDS.get(q, []):
        b[:, off:off + 2] = rng.uniform(-0.05, 0.05, len(b)).astype(np.float16).view(np.uint8).reshape(-1, 2)
    if q == QT.MXFP4:
        b[:, 0] = rng.integers(117, 125, len(b))                       # E8M0 scales 2^-10 .. 2^-3
    return QuantTensor(b.reshape(rows, -1), q, (rows, cols))


def close(y, ref, rtol=RTOL):
    return y.dtype == np.float32 and y.shape == ref.shape and np.max(np.abs(y - ref)) <= rtol * np.max(np.abs(ref))


@pytest.mark.parametrize("q", qm.FAST_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("rows", [64, 83])  # 83: the last group of rows is padding
def test_matches_quant_matmul(q, rows):
    rng = np.random.default_rng(int(q) + rows)
    cols = 512
    qt = random_weight(q, rows, cols, rng)
    x = rng.standard_normal((3, cols)).astype(np.float32)
    ref = qm.reference(x, qt)                                          # [3, rows]
    assert close(qm.qmatvec(x, qt), ref)
    assert close(qm.qmatvec(x[1], qt), ref[1])                         # 1-D x -> 1-D y
    out = np.full((3, rows), np.nan, np.float32)
    assert qm.qmatvec(x, qt, out=out) is out and close(out, ref)
    out1 = np.empty(rows, np.float32)
    assert qm.qmatvec(x[2], qt, out=out1) is out1 and close(out1, ref[2])


@pytest.mark.parametrize("G", [16, 32, 64])
def test_any_group_size(G):
    rng = np.random.default_rng(G)
    qt = random_weight(QT.Q4_1, 100, 256, rng)
    x = rng.standard_normal(256).astype(np.float32)
    qm.prepare(qt, G=G)
    assert qt.packed.G == G and close(qm.qmatvec(x, qt), qm.reference(x, qt))


def test_repacked_size():
    rng = np.random.default_rng(0)
    ratio = {}
    for q in qm.FAST_TYPES:
        qt = random_weight(q, 128, 512, rng)
        ratio[q] = qm.prepare(qt).nbytes / qt.nbytes
    assert ratio[QT.Q4_1] == ratio[QT.Q5_0] == ratio[QT.Q8_0] == ratio[QT.MXFP4] == 1.0
    assert max(ratio.values()) <= 4 / 3 + 1e-9


def test_fallbacks(monkeypatch):
    rng = np.random.default_rng(1)
    qt = random_weight(QT.Q5_1, 40, 256, rng)                          # no fused kernel for Q5_1
    x = rng.standard_normal((2, 256)).astype(np.float32)
    assert np.array_equal(qm.qmatvec(x, qt), quant_matmul(x, qt, fast=False))
    qt = random_weight(QT.Q4_1, 40, 256, rng)
    xb = rng.standard_normal((qm.MAX_BATCH + 1, 256)).astype(np.float32)   # a prefill-sized batch: tiles
    assert np.array_equal(qm.qmatvec(xb, qt), qm.qmatmul(xb, qt))
    monkeypatch.setattr(qm, "_JIT", False)                             # as if numba were missing
    assert not qm.available()
    out = np.empty((2, 40), np.float32)
    assert qm.qmatvec(x, qt, out=out) is out and np.array_equal(out, quant_matmul(x, qt, fast=False))


def test_errors():
    qt = random_weight(QT.Q8_0, 32, 64, np.random.default_rng(2))
    with pytest.raises(ValueError, match=r"x of shape \(2, 63\).*weight shape \(32, 64\)"):
        qm.qmatvec(np.zeros((2, 63), np.float32), qt)
    with pytest.raises(ValueError, match=r"out must be float32 C-contiguous of shape \(2, 32\)"):
        qm.qmatvec(np.zeros((2, 64), np.float32), qt, out=np.empty((2, 31), np.float32))


# ---------------------------------------------------------------------------- real weights

def _path(name):
    from spark_lab.models import ModelNotFound, resolve
    try:
        return resolve(name)
    except ModelNotFound as e:
        pytest.skip(str(e))


def test_real_tensors_of_both_models():
    from spark_lab.gguf import GGUFFile
    rng = np.random.default_rng(3)
    picks = {"smollm2-135m-instruct": ["blk.0.attn_k.weight", "blk.3.ffn_down.weight", "blk.7.ffn_up.weight"]}
    g = GGUFFile(_path("gemma3-270m"))
    by_type = {}
    for t in g.tensors.values():                                      # one tensor of each quant type
        if len(t.shape) == 2 and t.qtype in qm.FAST_TYPES and t.shape[0] <= 4096:
            by_type.setdefault(t.qtype, t.name)
    assert {QT.Q4_K, QT.Q6_K, QT.Q5_0, QT.Q8_0} <= set(by_type)
    picks["gemma3-270m"] = list(by_type.values())
    for model, names in picks.items():
        f = g if model == "gemma3-270m" else GGUFFile(_path(model))
        for name in names:
            t = f.tensors[name]
            qt = QuantTensor(f.raw(t), t.qtype, t.shape)
            x = rng.standard_normal((2, t.shape[1])).astype(np.float32)
            assert close(qm.qmatvec(x, qt), qm.reference(x, qt), rtol=5e-6), (model, name)
            if qt.qtype in qm.INT8_TYPES:                              # int8 x: llama.cpp's rounding, ~1e-2
                assert close(qm.qmatvec(x, qt), quant_matmul(x, qt, fast=False), rtol=3e-2), (model, name)


def test_kernel_that_does_not_compile_falls_back(monkeypatch):
    from numba.core.errors import NumbaError
    rng = np.random.default_rng(4)
    qt = random_weight(QT.Q8_0, 32, 64, rng)
    x = rng.standard_normal(64).astype(np.float32)
    kernels = dict(qm._jit())

    def broken(*args):
        raise NumbaError("no vector ops here")
    kernels["q8_0"] = broken
    monkeypatch.setattr(qm, "_JIT", kernels)
    with pytest.warns(RuntimeWarning, match="q8_0 kernel does not compile here"):
        y = qm.qmatvec(x, qt)
    assert kernels["q8_0"] is None and np.array_equal(y, quant_matmul(x, qt, fast=False))
    assert np.array_equal(qm.qmatvec(x, qt), y)                        # and stays on the fallback quietly


def test_quantize_x_matches_its_numpy_twin():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 256)).astype(np.float32) * np.float32(3.0)
    x[0, :32] = 0.0                                                    # an all-zero block
    x[1, 32:64] = np.arange(32, dtype=np.float32) - np.float32(15.5)   # halves: ties to even
    x[2, 64:96] = 1e-30                                                # tiny values
    qm.available()
    got, want = qm.quantize_x(x), qm.quantize_q8(x)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    xq, dx, xqs = want
    assert np.all(np.abs(xq) <= 127) and np.all(xq[0, :32] == 0) and dx[0, 0] == 0.0
    xb = x.reshape(3, -1, 32)
    d = np.abs(xb).max(-1, keepdims=True) / 127.0                      # the step before float16 rounding
    err = np.abs(xq.reshape(3, -1, 32) * dx[..., None] - xb)
    assert np.all(err <= d * 0.5 + 127 * np.abs(d - dx[..., None]) + 1e-12)   # nearest step, then the scale's rounding
    v = np.float32(10.0) ** np.linspace(-10, 4.7, 20001, dtype=np.float32)    # float16 normals, subnormals, underflow
    got = np.array([qm._round_f16(t) for t in v[::7]], np.float32)
    assert np.array_equal(got, v[::7].astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("vnni", ["1", "0"])
def test_int8_dot_with_and_without_vnni(vnni, tmp_path):
    """The portable widening-multiply code and VPDPBUSD give the same sums (run in a subprocess:
    the choice is made when the kernels compile)."""
    import subprocess, sys, os
    code = ("import numpy as np, sys; sys.path.insert(0, 'tests'); from test_qmatvec import random_weight, close;"
            "from gguf import GGMLQuantizationType as QT; from spark_lab.kernels import qmatvec as qm;"
            "rng = np.random.default_rng(5); ok = True\n"
            "for q in qm.INT8_TYPES:\n"
            "    qt = random_weight(q, 80, 512, rng); x = rng.standard_normal((2, 512)).astype(np.float32)\n"
            "    ok &= bool(close(qm.qmatvec(x, qt), qm.reference(x, qt)))\n"
            "print(ok, qm.vnni())")
    env = dict(os.environ, SPARK_LAB_VNNI=vnni, NUMBA_CACHE_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    ok, used = r.stdout.split()
    assert ok == "True" and (used == "False" if vnni == "0" else True)


# ---------------------------------------------------------------------------- prefill tiles

def same_bits(a, b):
    return a.dtype == b.dtype == np.float32 and a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("q", qm.FAST_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("rows,G,tile_kb", [(83, None, 512), (200, 16, 8), (64, 64, 1)])
def test_tile_dequantize_bit_exact(q, rows, G, tile_kb):
    # 83: a padded last group; tile_kb 8 and 1: many tiles (1 KB: one group per tile)
    rng = np.random.default_rng(int(q) + rows)
    qt = random_weight(q, rows, 512, rng)
    qm.prepare(qt, G=G)
    ref = qt.dequantize()                                               # quants.dequantize
    got = np.empty_like(ref)
    for r0, r1, tile in qm._tiles(qt, tile_kb << 10):
        got[r0:r1] = tile.T
    assert same_bits(got, ref)
    assert same_bits(qm.dequantize(qt), ref)


def test_tile_dequantize_extreme_scales():
    # large, tiny (subnormal) and negative float16 scales: still the bits of quants.dequantize
    rng = np.random.default_rng(11)
    for q in qm.FAST_TYPES:
        qt = random_weight(q, 64, 512, rng)
        bs, ts = BLOCK_SIZES[q]
        b = qt.data.reshape(-1, ts)
        scales = np.array([60000.0, -8000.0, 6e-8, -3e-5, 0.0, -0.0, 1.0, 2.0], np.float16)
        for off in F16_FIELDS.get(q, []):
            b[:, off:off + 2] = rng.choice(scales, len(b)).view(np.uint8).reshape(-1, 2)
        if q == QT.MXFP4:                                               # E8M0: subnormal, tiny, 1, huge, overflow
            b[:, 0] = rng.choice(np.array([0, 1, 2, 127, 254, 255], np.uint8), len(b))
        with np.errstate(over="ignore", invalid="ignore"):
            assert same_bits(qm.dequantize(qt), qt.dequantize()), q.name


@pytest.mark.parametrize("q", qm.FAST_TYPES, ids=lambda q: q.name)
def test_qmatmul_matches_dequantize_then_matmul(q):
    rng = np.random.default_rng(int(q) + 7)
    qt = random_weight(q, 150, 512, rng)
    x = rng.standard_normal((40, 512)).astype(np.float32)
    exact = x @ qt.dequantize().T                                       # [40, 150]
    ref = qm.reference(x, qt)                      # int8 types: x rounded to int8 blocks first, as in decode
    for tb in (qm.TILE_BYTES, 4096):
        y = qm.qmatmul(x, qt, tile_bytes=tb)
        assert close(y, ref, rtol=1e-5)
    assert close(quant_matmul(x, qt), ref, rtol=1e-5)                   # quant_matmul's fast path
    assert close(quant_matmul(x, qt, fast=False), exact, rtol=1e-5)
    assert close(qm.qmatvec(x[:4], qt), ref[:4], rtol=1e-5)             # a token's numbers: prompt == decode
    out = np.full((40, 150), np.nan, np.float32)
    assert qm.qmatmul(x, qt, out=out) is out and close(out, ref, rtol=1e-5)
    y1 = qm.qmatmul(x[3], qt)
    assert y1.shape == (150,) and close(y1, ref[3], rtol=1e-5)
    with pytest.raises(ValueError, match=r"out must be float32 of shape \(40, 150\)"):
        qm.qmatmul(x, qt, out=np.empty((40, 149), np.float32))


@pytest.mark.parametrize("q", qm.FAST_TYPES, ids=lambda q: q.name)
def test_rows_are_invariant_to_the_batch(q):
    """Row i of a product over X is bit-identical to the product of X[i] alone, for every n
    (batched decode relies on it): qmatvec always, qmatmul where the int8 GEMM runs."""
    rng = np.random.default_rng(int(q) + 31)
    qt = random_weight(q, 83, 256, rng)                                 # 83 rows: a padded last group
    X = rng.standard_normal((21, 256)).astype(np.float32)
    one = np.stack([qm.qmatvec(X[i:i + 1], qt)[0] for i in range(len(X))])
    assert close(one, qm.reference(X, qt), rtol=1e-6)
    gemm = q in qm.INT8_TYPES and qm.prepare(qt).kind in qm.GEMM_KINDS
    for n in (2, 7, 8, 9, 16, 21):
        assert same_bits(qm.qmatvec(X[:n], qt), one[:n]), n
        if gemm:
            assert same_bits(qm.qmatmul(X[:n], qt), one[:n]), n
            assert same_bits(qm.qgemm(X[n - 1:], qt), one[n - 1:]), n   # any offset into the batch
    assert gemm == (q in (QT.Q4_0, QT.Q4_1, QT.Q4_K, QT.Q8_0, QT.Q6_K, QT.MXFP4))


def test_gemm_that_does_not_compile_falls_back_to_tiles(monkeypatch):
    from numba.core.errors import NumbaError
    rng = np.random.default_rng(14)
    qt = random_weight(QT.Q4_K, 64, 256, rng)
    x = rng.standard_normal((24, 256)).astype(np.float32)
    kernels = dict(qm._jit())

    def broken(*args):
        raise NumbaError("no vector ops here")
    kernels["m_q4_k"] = broken                                         # Q4_K's own layout and GEMM
    monkeypatch.setattr(qm, "_JIT", kernels)
    with pytest.warns(RuntimeWarning, match="q4_k GEMM does not compile here"):
        y = qm.qmatmul(x, qt)
    assert kernels["m_q4_k"] is None and close(y, qm.reference(x, qt), rtol=1e-5)
    assert qm.qgemm(x, qt) is None and np.array_equal(qm.qmatmul(x, qt), y)


def test_qmatmul_fallbacks(monkeypatch):
    rng = np.random.default_rng(12)
    x = rng.standard_normal((20, 256)).astype(np.float32)
    qt = random_weight(QT.Q5_1, 40, 256, rng)                           # no tile kernel for Q5_1
    assert not qm.supports(qt) and np.array_equal(qm.qmatmul(x, qt), quant_matmul(x, qt, fast=False))
    qt = random_weight(QT.Q4_1, 40, 256, rng)
    monkeypatch.setattr(qm, "_JIT", False)                              # as if numba were missing
    assert not qm.supports(qt) and qm.dequantize(qt) is None
    assert np.array_equal(qm.qmatmul(x, qt), quant_matmul(x, qt, fast=False))
    assert np.array_equal(quant_matmul(x, qt), quant_matmul(x, qt, fast=False))


def test_tile_kernel_that_does_not_compile_falls_back(monkeypatch):
    from numba.core.errors import NumbaError
    rng = np.random.default_rng(13)
    qt = random_weight(QT.Q8_0, 32, 64, rng)
    x = rng.standard_normal((20, 64)).astype(np.float32)
    kernels = dict(qm._jit())

    def broken(*args):
        raise NumbaError("no vector ops here")
    kernels["t_q8_0"] = broken
    kernels["m_q8_0"] = None                                            # no int8 GEMM either: the tiles run
    monkeypatch.setattr(qm, "_JIT", kernels)
    with pytest.warns(RuntimeWarning, match="Q8_0 tile kernel does not compile here"):
        y = qm.qmatmul(x, qt)
    assert kernels["t_q8_0"] is None and np.array_equal(y, quant_matmul(x, qt, fast=False))
    assert np.array_equal(qm.qmatmul(x, qt), y)                         # and stays on the fallback quietly


# ---------------------------------------------------------------------------- memory

@pytest.mark.numpy_device     # host repacking (numba, CPU-only) counted by the CPU allocator
def test_repacked_arrays_are_counted_by_the_allocator():
    from spark_lab.memory import get_allocator
    alloc = get_allocator()
    before = alloc.stats().by_tag["weights"]
    qt = random_weight(QT.Q4_1, 128, 512, np.random.default_rng(14))
    p = qm.prepare(qt, what="test weight")
    assert alloc.stats().by_tag["weights"] == before + p.nbytes
    qt.packed = p = None                                                # the views die with the Packed
    assert alloc.stats().by_tag["weights"] == before


@pytest.mark.numpy_device     # host repacking (numba, CPU-only) counted by the CPU allocator
def test_release_raw_pages_of_a_file_mapping(tmp_path):
    from spark_lab.memory import get_allocator
    from spark_lab.quants import release_raw
    rng = np.random.default_rng(15)
    src = random_weight(QT.Q4_1, 256, 1024, rng)
    path = tmp_path / "w.bin"
    head = b"x" * 100                                                   # an unaligned start, as in a GGUF
    path.write_bytes(head + src.data.tobytes() + b"tail")
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    alloc = get_allocator()
    before = alloc.stats().by_tag["weights"]
    qt = QuantTensor(alloc.place(mm[100:100 + src.nbytes], tag="weights", what="raw"), QT.Q4_1, src.shape)
    assert alloc.stats().by_tag["weights"] == before + src.nbytes      # the placed view stays counted
    ref = src.dequantize()
    qm.prepare(qt, release=False)
    assert release_raw(qt)                                              # pages dropped, bytes uncounted
    assert alloc.stats().by_tag["weights"] == before + qt.packed.nbytes
    assert same_bits(qt.dequantize(), ref)                              # the file is read again on touch
    assert same_bits(qm.dequantize(qt), ref)
    assert not release_raw(random_weight(QT.Q4_1, 8, 64, rng))          # plain memory: never dropped
    cow = np.memmap(path, dtype=np.uint8, mode="c")
    assert not release_raw(QuantTensor(cow[100:100 + src.nbytes], QT.Q4_1, src.shape))


def test_prepare_releases_the_raw_mapping(tmp_path):
    import resource  # noqa: F401  (Linux: the RSS figure comes from /proc)
    rng = np.random.default_rng(16)
    src = random_weight(QT.Q8_0, 2048, 1024, rng)                       # 2.2 MB
    path = tmp_path / "w.bin"
    path.write_bytes(src.data.tobytes())
    qt = QuantTensor(np.memmap(path, dtype=np.uint8, mode="r"), QT.Q8_0, src.shape)

    def resident_kb():
        return int(next(l for l in open("/proc/self/smaps_rollup") if l.startswith("Rss:")).split()[1])
    if not __import__("os").path.exists("/proc/self/smaps_rollup"):
        pytest.skip("no /proc/self/smaps_rollup")
    qt.data.sum()                                                       # fault the pages in
    r0 = resident_kb()
    qm.prepare(qt)                                                      # repack (+2.2 MB) then drop the raw pages
    assert resident_kb() - r0 < 1200


@pytest.mark.parametrize("model", ["smollm2-135m-instruct", "gemma3-270m"])
def test_real_tensors_tile_dequantize_bit_exact(model):
    # every 2-D weight of a repackable type (the embedding tables: a sample of rows), both GGUFs
    from spark_lab.gguf import GGUFFile
    f = GGUFFile(_path(model))
    rng = np.random.default_rng(17)
    seen = {}
    for t in f.tensors.values():
        if len(t.shape) != 2 or t.qtype not in qm.FAST_TYPES:
            continue
        raw = f.raw(t)
        rows = t.shape[0]
        if rows > 4096:                                                 # token_embd: 300 random rows
            raw = raw[np.sort(rng.choice(rows, 300, replace=False))]
            rows = 300
        qt = QuantTensor(raw, t.qtype, (rows, t.shape[1]))
        assert same_bits(qm.dequantize(qt), qt.dequantize()), (model, t.name)
        seen[t.qtype.name] = seen.get(t.qtype.name, 0) + 1
    want = {"smollm2-135m-instruct": {"Q4_1": 210, "Q8_0": 1},
            "gemma3-270m": {"Q5_0": 81, "Q4_K": 27, "Q8_0": 10, "Q6_K": 9}}[model]
    assert seen == want


def test_prepare_stack_is_the_parts_side_by_side():
    rng = np.random.default_rng(8)
    parts = [random_weight(QT.Q4_1, r, 256, rng) for r in (96, 32, 32)]
    x = rng.standard_normal((2, 256)).astype(np.float32)
    refs = [qm.reference(x, w) for w in parts]
    stacked = qm.prepare_stack(parts)
    assert stacked is not None and stacked[0].shape[0] * 32 == 160
    out = np.empty((2, 160), np.float32)
    qm._jit()["nib"](*stacked, x, out)                                 # one call for all three
    for w, ref, (r0, r1) in zip(parts, refs, [(0, 96), (96, 128), (128, 160)]):
        assert w.packed.stack is stacked and close(out[:, r0:r1], ref)
        assert close(qm.qmatvec(x, w), ref)                            # each part still works alone
        assert np.array_equal(qm.dequantize(w), quant_matmul(np.eye(256, dtype=np.float32), w, fast=False).T)
    assert qm.prepare_stack(parts) is None                             # already repacked
    mixed = [random_weight(QT.Q4_1, 32, 256, rng), random_weight(QT.Q8_0, 32, 256, rng)]
    assert qm.prepare_stack(mixed) is None
    odd = [random_weight(QT.Q4_1, 40, 256, rng), random_weight(QT.Q4_1, 32, 256, rng)]
    assert qm.prepare_stack(odd) is None                               # 40 rows: padding inside the stack


@pytest.mark.parametrize("q", [QT.Q4_0, QT.Q4_1, QT.Q8_0, QT.Q4_K, QT.MXFP4], ids=lambda q: q.name)
def test_embedding_rows_from_the_repacked_copy(q):
    rng = np.random.default_rng(9)
    qt = random_weight(q, 100, 256, rng)
    raw = np.array(qt.data)
    ids = np.array([0, 99, 37, 37, 64])
    want = qt.rows(ids)
    qm.prepare(qt)
    rebuilt = qm.raw_rows(qt, ids)
    if q == QT.Q4_K:
        assert rebuilt is None                                         # scales are not kept as bytes
    else:
        assert np.array_equal(rebuilt, raw[ids])                       # byte for byte
    qt.data[...] = 0                                                   # rows now come from the repack
    if q != QT.Q4_K:
        assert np.array_equal(qt.rows(ids), want)


# ---------------------------------------------------------------------------- MXFP4 and the expert gather

def test_mxfp4_is_the_int8_product_of_its_dequantized_weight():
    # reference semantics pinned by hand: dequant(W) @ q8(x), q8 = the int8 blocks of quantize_q8
    from spark_lab.quants import dequantize
    rng = np.random.default_rng(20)
    qt = random_weight(QT.MXFP4, 100, 1024, rng)
    x = rng.standard_normal((2, 1024)).astype(np.float32)
    xq, dx, _ = qm.quantize_q8(x)
    xr = (xq.reshape(2, -1, 32).astype(np.float64) * dx[..., None]).reshape(2, 1024)
    want = xr @ dequantize(qt.data, QT.MXFP4).astype(np.float64).T       # [2, 100]
    y = qm.qmatvec(x, qt)
    assert y.dtype == np.float32 and np.max(np.abs(y - want)) <= 1e-6 * np.max(np.abs(want))
    assert np.max(np.abs(y - x @ qt.dequantize().T)) <= 3e-2 * np.max(np.abs(want))   # int8 x: ~1e-2 of f32 x


def _stack(rng, E, rows, cols):
    from spark_lab.kernels.qmatvec import ExpertStack
    parts = [random_weight(QT.MXFP4, rows, cols, rng).data for _ in range(E)]
    return ExpertStack(np.stack(parts), QT.MXFP4, (E, rows, cols))


def test_moe_matvec_reads_only_the_picked_experts():
    rng = np.random.default_rng(21)
    stack = _stack(rng, 8, 96, 256)
    ids = np.array([5, 2, 7])
    x = rng.standard_normal(256).astype(np.float32)
    y = qm.moe_matvec(x, stack, ids)                                    # one x for every expert (gate, up)
    assert y.shape == (3, 96) and y.dtype == np.float32
    for j, e in enumerate(ids):
        assert close(y[j], qm.reference(x, stack[e]), rtol=1e-6)
    assert [w.packed is not None for w in stack.experts] == [e in ids for e in range(8)]   # others untouched
    xs = rng.standard_normal((3, 256)).astype(np.float32)              # one row per expert (down)
    out = np.empty((3, 96), np.float32)
    assert qm.moe_matvec(xs, stack, ids, out=out) is out
    for j, e in enumerate(ids):
        assert close(out[j], qm.reference(xs[j], stack[e]), rtol=1e-6)
        assert same_bits(out[j], qm.qmatvec(xs[j], stack[e]))           # MXFP4: one fused call, each row qmatvec's
        assert same_bits(y[j], qm.qmatvec(x, stack[e]))
    assert close(qm.moe_matvec(xs, stack.experts, ids), out, rtol=0)   # a list of QuantTensors works the same


@pytest.mark.parametrize("qtype", [QT.MXFP4, QT.Q4_0], ids=lambda q: q.name)
def test_moe_matvec_pair_is_two_moe_matvecs(qtype):
    # gate and up of a token in one call (the fused MXFP4 kernel over 2k experts; other types: two calls)
    from spark_lab.kernels.qmatvec import ExpertStack
    rng = np.random.default_rng(24)
    stacks = [ExpertStack(np.stack([random_weight(qtype, 64, 256, rng).data for _ in range(6)]), qtype, (6, 64, 256))
              for _ in range(2)]
    ids = np.array([3, 0, 5, 1])
    x = rng.standard_normal(256).astype(np.float32)
    g, u = qm.moe_matvec_pair(x, stacks[0], stacks[1], ids)
    assert g.shape == u.shape == (4, 64)
    assert same_bits(g, qm.moe_matvec(x, stacks[0], ids)) and same_bits(u, qm.moe_matvec(x, stacks[1], ids))
    with pytest.raises(ValueError, match=r"expert ids must be integers in \[0, 6\), got \[6\]"):
        qm.moe_matvec_pair(x, stacks[0], stacks[1], [6])


def test_moe_matvec_errors():
    from spark_lab.kernels.qmatvec import ExpertStack
    rng = np.random.default_rng(22)
    stack = _stack(rng, 4, 32, 64)
    with pytest.raises(ValueError, match=r"expert ids must be integers in \[0, 4\), got \[1, 4\]"):
        qm.moe_matvec(np.zeros(64, np.float32), stack, [1, 4])
    with pytest.raises(ValueError, match=r"x of shape \(3, 64\) does not match 2 experts"):
        qm.moe_matvec(np.zeros((3, 64), np.float32), stack, [0, 1])
    with pytest.raises(ValueError, match=r"needs 4352 bytes, got 4351"):
        ExpertStack(np.zeros(4351, np.uint8), QT.MXFP4, (4, 32, 64))


@pytest.fixture
def strict_device(monkeypatch):
    """SPARK_LAB_DEVICE=strict: CuPy's rules on the CPU, CUDA kernels run as their NumPy twins."""
    from spark_lab import device, memory
    monkeypatch.setenv("SPARK_LAB_DEVICE", "strict")
    device.reset_device_cache()
    memory._ALLOCATOR = None
    yield device.get_device()
    monkeypatch.setenv("SPARK_LAB_DEVICE", "cpu")
    device.reset_device_cache()
    memory._ALLOCATOR = None


def test_cuda_mxfp4_wrappers_on_the_strict_device(strict_device):
    # the wrappers' argument packing and checks (the kernels themselves: tests/kernels/test_cuda.py on a GPU)
    from spark_lab.device import to_host
    from spark_lab.kernels import cuda_kernels as ck
    xp = strict_device.xp
    rng = np.random.default_rng(23)
    stack = _stack(rng, 6, 40, 128)
    ids = np.array([4, 0])
    x1, xk = rng.standard_normal(128).astype(np.float32), rng.standard_normal((2, 128)).astype(np.float32)
    for x in (x1, xk):
        want = qm.moe_matvec(x, stack, ids)                            # the CPU's numbers (int8-rounded x)
        got = to_host(ck.moe_matvec_mxfp4(xp.asarray(x), xp.asarray(stack.data), ids))
        assert close(got, want, rtol=1e-6)
        plain = to_host(ck.moe_matvec_mxfp4(xp.asarray(x), xp.asarray(stack.data), xp.asarray(ids), round_x=False))
        w = [stack[e].dequantize() for e in ids]
        assert close(plain, np.stack([wj @ (x if x.ndim == 1 else x[j]) for j, wj in enumerate(w)]), rtol=1e-6)
    y = to_host(ck.qmatvec(xp.asarray(xk), xp.asarray(stack[3].data), int(QT.MXFP4), 40, 128))
    assert close(y, xk @ stack[3].dequantize().T, rtol=1e-6)
    with pytest.raises(ValueError, match=r"expert ids must be integers in \[0, 6\), got \[6\]"):
        ck.moe_matvec_mxfp4(xp.asarray(x1), xp.asarray(stack.data), [6])
    with pytest.raises(ValueError, match=r"x of shape \(3, 128\) does not match 2 experts"):
        ck.moe_matvec_mxfp4(xp.asarray(np.zeros((3, 128), np.float32)), xp.asarray(stack.data), ids)


def test_expert_stack_from_a_gguf_tensor(tmp_path):
    import gguf
    from spark_lab.kernels.qmatvec import ExpertStack
    rng = np.random.default_rng(24)
    stack = _stack(rng, 3, 32, 64)                                      # [3, 32, 34] bytes
    w = gguf.GGUFWriter(tmp_path / "e.gguf", "test")
    w.add_tensor("blk.0.ffn_up_exps.weight", stack.data, raw_dtype=QT.MXFP4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    t = gguf.GGUFReader(tmp_path / "e.gguf").tensors[0]
    got = ExpertStack.from_gguf(t)
    assert got.shape == (3, 32, 64) and got.qtype == QT.MXFP4 and got.expert_nbytes() == 32 * 34
    assert all(np.array_equal(got[e].dequantize(), stack[e].dequantize()) for e in range(3))


@pytest.mark.parametrize("qname", ["Q4_K", "Q6_K"])
def test_numba_repack_of_k_quants_is_the_numpy_layout(qname):
    # the load-time byte shuffle (numba) writes exactly the arrays of the NumPy repack
    from spark_lab.benchmarks.synthetic import random_blocks
    from spark_lab.kernels.qmatvec import repack as R
    q = QT[qname]
    blocks = random_blocks(qname, 128, 512, np.random.default_rng(3)).reshape(128, 2, -1)
    k1, a1 = R._repack(q, blocks, 64, fast=False)
    k2, a2 = R._repack(q, blocks, 64, fast=True)
    assert k1 == k2 and len(a1) == len(a2)
    for x, y in zip(a1, a2):
        assert x.shape == y.shape and x.dtype == y.dtype and np.array_equal(x, y)
