"""The CPU fast paths the diffusion models take (bench imagine, #19) against NumPy / torch references:
attend_heads (BLAS on strided head views + the numba row softmax), gelu_tanh_, layernorm_affine,
and the Winograd kernels' row ranges."""
import threading

import numpy as np
import pytest

from spark_lab.diffusion import attention
from spark_lab.kernels import gelu, layernorm
from spark_lab.kernels.activations import gelu_tanh_
from spark_lab.kernels.norms import layernorm_affine


def _ref_heads(q, k, v, heads):
    """float64 softmax(q k^T / sqrt D) v per head, heads side by side in the last dim."""
    B, Tq, HD = q.shape
    D, Dv = HD // heads, v.shape[2] // heads
    out = np.empty((B, Tq, heads * Dv))
    for b in range(B):
        for h in range(heads):
            s = q[b, :, h * D:(h + 1) * D].astype(np.float64) @ k[b, :, h * D:(h + 1) * D].T.astype(np.float64)
            s /= np.sqrt(D)
            p = np.exp(s - s.max(-1, keepdims=True))
            out[b, :, h * Dv:(h + 1) * Dv] = (p / p.sum(-1, keepdims=True)) @ v[b, :, h * Dv:(h + 1) * Dv]
    return out


@pytest.mark.parametrize("B,H,Tq,Tk,D,scale", [(2, 2, 300, 77, 64, 1.0), (1, 3, 70, 70, 40, 6.0), (2, 1, 33, 5, 24, 1.0)])
def test_attend_heads_matches_reference(B, H, Tq, Tk, D, scale, monkeypatch):
    """Query blocks smaller than Tq (BLOCK_SCORES), head dims not a multiple of 16, large scores."""
    pytest.importorskip("numba")
    monkeypatch.setattr(attention, "BLOCK_SCORES", 64 * Tk)              # several query blocks
    rng = np.random.default_rng(Tq)
    q, k, v = (rng.standard_normal((B, T, H * D), dtype=np.float32) * s for T, s in ((Tq, scale), (Tk, scale), (Tk, 1.0)))
    y = attention.attend_heads(q, k, v, H)
    assert y.dtype == np.float32 and y.shape == (B, Tq, H * D)
    np.testing.assert_allclose(y, _ref_heads(q, k, v, H), rtol=1e-4, atol=1e-5)
    # the head-major entry point takes the same path, and the NumPy reference body agrees
    hf = lambda t: t.reshape(B, -1, H, D).transpose(0, 2, 1, 3).reshape(B * H, -1, D)  # noqa: E731
    ref = attention._attend_reference(hf(q), hf(k), hf(v)).reshape(B, H, Tq, D).transpose(0, 2, 1, 3).reshape(B, Tq, H * D)
    np.testing.assert_allclose(ref, y, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(attention.attend(hf(q), hf(k), hf(v)), hf(y), rtol=1e-6, atol=1e-6)


def test_softmax_rows_in_place():
    pytest.importorskip("numba")
    from spark_lab.diffusion.fused import softmax_rows_
    rng = np.random.default_rng(1)
    for n in (1, 15, 16, 77, 1024):
        s = rng.standard_normal((9, n), dtype=np.float32) * 20
        ref = np.exp(0.3 * (s.astype(np.float64) - s.max(-1, keepdims=True)))
        e = s.copy()
        inv = softmax_rows_(e, 0.3)
        np.testing.assert_allclose(e, ref, rtol=1e-5, atol=1e-30)             # float32 arguments up to ~40
        np.testing.assert_allclose(inv, 1.0 / ref.sum(-1), rtol=2e-6)


def test_gelu_tanh_in_place_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    for shape in ((3, 7), (2, 100, 300)):                                  # NumPy body, then numba
        x = rng.standard_normal(shape, dtype=np.float32) * 4
        x[..., 0] = [-30.0] * x.shape[0] if x.ndim == 2 else -30.0         # deep negative tail
        ref = torch.nn.functional.gelu(torch.from_numpy(x).double(), approximate="tanh").numpy()
        y = x.copy()
        out = gelu_tanh_(y)
        assert out is y
        np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(y, gelu(x, approximate="tanh"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("T", [3, 200])                                   # NumPy body, then numba
def test_layernorm_affine_matches_torch(T):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(T)
    B, D = 2, 96
    x = rng.standard_normal((B, T, D), dtype=np.float32) * 3 + 50          # |mean| >> std
    w, b = rng.standard_normal(D, dtype=np.float32), rng.standard_normal(D, dtype=np.float32)
    tx = torch.from_numpy(x).double()
    ref = torch.nn.functional.layer_norm(tx, (D,), torch.from_numpy(w).double(), torch.from_numpy(b).double(), 1e-5).numpy()
    np.testing.assert_allclose(layernorm_affine(x, 1e-5, w, b), ref, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(layernorm_affine(x, 1e-5, w, b), layernorm(x, w, b, 1e-5), rtol=1e-4, atol=2e-5)
    scale, shift = (rng.standard_normal((B, 1, D), dtype=np.float32) for _ in range(2))   # AdaLN
    ref = torch.nn.functional.layer_norm(tx, (D,), eps=1e-6).numpy() * (1 + scale) + shift
    np.testing.assert_allclose(layernorm_affine(x, 1e-6, 1.0 + scale, shift), ref, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(layernorm_affine(x, 1e-6, None, shift), ref - torch.nn.functional.layer_norm(
        tx, (D,), eps=1e-6).numpy() * scale, rtol=1e-4, atol=2e-5)
    with pytest.raises(ValueError, match="layernorm_affine: w"):
        layernorm_affine(x, 1e-6, np.ones((B, 2, D), np.float32))


def test_row_threads_shares_and_restores():
    """Inside row_threads(2): split_rows covers every row once (nested calls from a helper thread run
    inline), matmul_rows matches NumPy in row and column shares, and OpenBLAS gets its count back."""
    from spark_lab.kernels import activations as act
    threadpoolctl = pytest.importorskip("threadpoolctl")
    blas = [c for c in threadpoolctl.ThreadpoolController().lib_controllers if c.internal_api == "openblas"]
    before = [c.num_threads for c in blas]
    rng = np.random.default_rng(3)
    hits = np.zeros(100_000, np.int64)

    def mark(h, lo, hi):
        act.split_rows(lambda h2, a, b: h2.__setitem__(slice(lo + a, lo + b), h2[lo + a:lo + b] + 1), hi - lo, h)

    x, w, b = (rng.standard_normal(s, dtype=np.float32) for s in ((300, 64), (64, 700), (700,)))
    with act.row_threads(2):
        assert act._SPLIT == 2 and all(c.num_threads == 1 for c in blas)
        act.split_rows(mark, hits.size, hits)
        tall = act.matmul_rows(np.repeat(x, 4, axis=0), w[:, :100], np.empty((1200, 100), np.float32), b[:100])
        wide = act.matmul_rows(x, w, np.empty((300, 700), np.float32), b)                 # column shares
    assert (hits == 1).all()
    np.testing.assert_allclose(tall, np.repeat(x, 4, axis=0) @ w[:, :100] + b[:100], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(wide, x @ w + b, rtol=1e-5, atol=1e-5)
    assert act._SPLIT == 1 and [c.num_threads for c in blas] == before


def test_share_items_runs_each_item_whole_on_one_thread():
    """share_items inside row_threads(2): every item once, in order in the result, the items spread
    over 2 threads, and split_rows inside an item stays on that item's thread; outside: in order here."""
    from spark_lab.kernels import activations as act
    min_work, act.SPLIT_MIN_WORK = act.SPLIT_MIN_WORK, 1
    try:
        other = threading.Event()                               # set by an item on a helper thread
        main = threading.get_ident()

        def item(i):
            where = set()
            act.split_rows(lambda lo, hi: where.add(threading.get_ident()), 1000)
            if threading.get_ident() != main:
                other.set()
            elif i == 0:
                other.wait(10)                                  # item 0 holds this thread: a helper takes the next
            return i * i, threading.get_ident(), where
        with act.row_threads(2):
            got = act.share_items(item, 6)
        assert [g[0] for g in got] == [i * i for i in range(6)]
        assert all(g[2] == {g[1]} for g in got)                 # nested split_rows: on the item's thread
        assert len({g[1] for g in got}) == 2
        assert [g[0] for g in act.share_items(item, 3)] == [0, 1, 4]
        assert act.row_share_count(5) == 1
    finally:
        act.SPLIT_MIN_WORK = min_work


@pytest.mark.parametrize("split_batch", [False, True])
def test_unet_on_row_threads_matches_one_thread(split_batch, monkeypatch):
    """The SDXL-style UNet (bench imagine's quick size, CFG batched) gives the same numbers with its
    kernels shared among 2 threads (split_batch=False) or its two CFG rows on a thread each
    (split_batch=True: each thread's kernels stay on it) as on 1."""
    pytest.importorskip("numba")
    from spark_lab.device import array_module, to_device
    if array_module(to_device(np.zeros(1, np.float32))) is not np:
        pytest.skip("row_threads are the CPU's (NumPy) paths; this device has its own")
    pytest.importorskip("diffusers")
    from spark_lab.benchmarks import imagine_families as fam
    from spark_lab.diffusion import UNet2DConditionModel
    from spark_lab.kernels import activations as act
    import tempfile
    from pathlib import Path
    size = fam.SIZES["sdxl"]["quick"]
    with tempfile.TemporaryDirectory() as tmp:
        inp = fam.build("sdxl", size, Path(tmp))
        model = UNet2DConditionModel.from_pretrained(Path(tmp) / "denoiser")
    from spark_lab.diffusion import unet_2d_condition
    monkeypatch.setattr(unet_2d_condition, "ROW_THREADS_MIN_PIXELS", 0)      # share even these tiny maps
    monkeypatch.setattr(act, "SPLIT_MIN_WORK", 1)
    monkeypatch.setattr(unet_2d_condition, "SPLIT_BATCH", split_batch)
    forward, threads = model._forward, []
    monkeypatch.setattr(model, "_forward", lambda x, *a: (threads.append((threading.get_ident(), x.shape[0] * a[3])),
                                                          forward(x, *a))[1])
    added = {"text_embeds": inp["text_embeds"], "time_ids": inp["time_ids"]}
    run = lambda: model(inp["latents"], 500, inp["context"], repeat=2, added_cond_kwargs=added)  # noqa: E731
    monkeypatch.setattr(act, "num_threads", lambda: 1)
    one = run()
    monkeypatch.setattr(act, "num_threads", lambda: 2)
    seen = []
    split = act.split_rows
    monkeypatch.setattr(act, "split_rows", lambda *a, **k: (seen.append(act._SPLIT), split(*a, **k))[1])
    threads.clear()
    two = run()
    assert seen and max(seen) == 2
    # split: one forward per row (sample x repeat), each whole on whichever thread took it (a helper
    # that wakes late finds both taken by the caller: share_items hands nothing out); else one of both
    assert sorted(n for _, n in threads) == ([1, 1] if split_batch else [2])
    assert len({t for t, _ in threads}) in ((1, 2) if split_batch else (1,))
    np.testing.assert_allclose(two, one, rtol=1e-5, atol=1e-5 * float(np.abs(one).max()))


def test_rms_rope_into_matches_rmsnorm_then_rope():
    pytest.importorskip("numba")
    from spark_lab.diffusion.flux import apply_rope, latent_image_ids, rope_tables
    from spark_lab.diffusion.fused import rms_rope_into
    from spark_lab.kernels import rmsnorm
    rng = np.random.default_rng(4)
    B, T, H, D = 2, 12, 3, 16
    x = rng.standard_normal((B, T, H, D), dtype=np.float32) * 5
    w = rng.standard_normal(D, dtype=np.float32)
    cos, sin = rope_tables(np.concatenate([np.zeros((4, 3), np.float32), latent_image_ids(3, 4)]), (4, 6, 6))
    out = np.full((B, T + 4, H, D), np.nan, np.float32)
    assert rms_rope_into(x, w, cos, sin, 1e-6, 4, out)                   # rows 4.. of a [txt; img] array
    ref = apply_rope(rmsnorm(x, w, 1e-6), cos[4:], sin[4:])
    np.testing.assert_allclose(out[:, 4:], ref, rtol=1e-5, atol=1e-5)
    assert np.isnan(out[:, :4]).all()                                     # the other rows untouched
