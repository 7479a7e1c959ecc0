"""spark_lab.kernels.qmatvec: the numba fused mat-vec against quant_matmul (NumPy reference),
on random blocks, on real tensors of both shipped GGUFs, and its fallbacks and errors."""
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
    for off in F16_FIELDS[q]:
        b[:, off:off + 2] = rng.uniform(-0.05, 0.05, len(b)).astype(np.float16).view(np.uint8).reshape(-1, 2)
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
    ref = quant_matmul(x, qt)                                           # [3, rows]
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
    assert qt.packed.G == G and close(qm.qmatvec(x, qt), quant_matmul(x, qt))


def test_repacked_size():
    rng = np.random.default_rng(0)
    ratio = {}
    for q in qm.FAST_TYPES:
        qt = random_weight(q, 128, 512, rng)
        ratio[q] = qm.prepare(qt).nbytes / qt.nbytes
    assert ratio[QT.Q4_1] == ratio[QT.Q5_0] == ratio[QT.Q8_0] == 1.0
    assert max(ratio.values()) <= 4 / 3 + 1e-9


def test_fallbacks(monkeypatch):
    rng = np.random.default_rng(1)
    qt = random_weight(QT.Q5_1, 40, 256, rng)                          # no fused kernel for Q5_1
    x = rng.standard_normal((2, 256)).astype(np.float32)
    assert np.array_equal(qm.qmatvec(x, qt), quant_matmul(x, qt))
    qt = random_weight(QT.Q4_1, 40, 256, rng)
    xb = rng.standard_normal((qm.MAX_BATCH + 1, 256)).astype(np.float32)   # a prefill-sized batch
    assert np.array_equal(qm.qmatvec(xb, qt), quant_matmul(xb, qt))
    monkeypatch.setattr(qm, "_JIT", False)                             # as if numba were missing
    assert not qm.available()
    out = np.empty((2, 40), np.float32)
    assert qm.qmatvec(x, qt, out=out) is out and np.array_equal(out, quant_matmul(x, qt))


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
            assert close(qm.qmatvec(x, qt), quant_matmul(x, qt), rtol=5e-6), (model, name)


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
    assert kernels["q8_0"] is None and np.array_equal(y, quant_matmul(x, qt))
    assert np.array_equal(qm.qmatvec(x, qt), y)                        # and stays on the fallback quietly
