"""The strict device (SPARK_LAB_DEVICE=strict): CuPy's rules on the CPU, transfers counted.

It refuses the host conversions CuPy refuses, counts the ones CuPy makes implicitly, and runs
each CUDA kernel's NumPy twin behind a RawModule stand-in; the models then run on it with the
same outputs as on NumPy and a bounded number of device-to-host copies per token and per step.
"""
from __future__ import annotations

import re
from pathlib import Path

import gguf
import numpy as np
import pytest

import spark_lab.kernels as K
from spark_lab import device, memory
from spark_lab.device import array_module, to_host
from spark_lab.kernels import cuda_kernels
from spark_lab.models import is_present
from spark_lab.quants import QuantTensor

from .llm.tiny import write_tiny_gguf

FIX = Path(__file__).resolve().parent / "fixtures" / "diffusion"


def _use(monkeypatch, kind: str):
    monkeypatch.setenv("SPARK_LAB_DEVICE", kind)
    device.reset_device_cache()
    memory._ALLOCATOR = None
    return device.get_device()


@pytest.fixture(autouse=True)
def _forget_device():
    """After each test (passed or not, once monkeypatch has restored SPARK_LAB_DEVICE): no cached
    device or allocator survives, so the next test detects its own."""
    yield
    device.reset_device_cache()
    memory._ALLOCATOR = None


@pytest.fixture
def strict(monkeypatch):
    """The strict device with fresh caches and a zeroed transfer counter."""
    dev = _use(monkeypatch, "strict")
    dev.xp.transfers.reset()
    yield dev
    dev.xp.transfers.trace = False


def _x(shape, seed=0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


# ---------------------------------------------------------------------------- the rules

def test_strict_device_is_selected_by_name_only(monkeypatch, strict):
    assert strict.kind == "strict" and strict.is_gpu and strict.xp.__name__ == "cupy"
    assert "strict" in strict.name
    _use(monkeypatch, "auto")
    assert device.get_device().kind in ("cpu", "cuda") and device.transfers() is None


def test_refuses_implicit_host_conversions_as_cupy_does(strict):
    xp = strict.xp
    x = xp.asarray(_x((4, 8)))
    host = _x((4, 8), 1)
    for bad in (lambda: np.asarray(x), lambda: np.array(x), lambda: x + host, lambda: host * x,
                lambda: xp.concatenate([x, host]), lambda: np.exp(host) + x, lambda: float(x)):
        with pytest.raises(TypeError):
            bad()
    with pytest.raises(TypeError):
        x[0] = host[0]                                       # assignment from a host array
    numba = pytest.importorskip("numba")
    with pytest.raises(numba.core.errors.TypingError):       # a CPU kernel cannot take a device array
        numba.njit(lambda a: a.sum())(x)
    # what CuPy does allow: NumPy functions dispatch to the device, scalars mix in, results stay there
    y = np.exp(x) * np.float32(2.0) + 1.0
    assert array_module(y) is xp and y.dtype == np.float32
    np.testing.assert_array_equal(xp.asnumpy(y), np.exp(_x((4, 8))) * np.float32(2.0) + 1.0)


def test_counts_every_transfer_with_its_size(strict):
    xp, tr = strict.xp, device.transfers()
    x = xp.asarray(_x((4, 8)))                               # 128 bytes up
    s = x.sum()                                              # a reduction stays on the device (0-d)
    assert array_module(s) is xp and s.shape == ()
    assert tr.snapshot().d2h == 0
    float(s), int(x[0, 0] > 0), x[1].tolist(), x.get(), xp.asnumpy(x[:2])     # CuPy's implicit syncs count too
    snap = tr.snapshot()
    assert (snap.h2d, snap.h2d_bytes) == (1, 128)
    assert (snap.d2h, snap.d2h_bytes) == (5, 4 + 1 + 32 + 128 + 64)
    tr.reset()
    assert tr.snapshot().d2h == tr.snapshot().h2d == 0


def _normalise_rows_wrong(x):
    """Rows scaled to unit length, with the mistake a GPU path must not make: the norms are
    computed on a host copy made implicitly (np.asarray), then sent back."""
    xp = array_module(x)
    norms = np.sqrt((np.asarray(x) ** 2).sum(axis=-1, keepdims=True))
    return x / xp.asarray(norms)


def _normalise_rows(x):
    xp = array_module(x)
    return x / xp.sqrt((x * x).sum(axis=-1, keepdims=True))


def test_a_host_conversion_passes_on_numpy_and_fails_on_strict(monkeypatch, strict):
    x = _x((3, 16))
    want = x / np.linalg.norm(x, axis=-1, keepdims=True)
    np.testing.assert_allclose(_normalise_rows_wrong(x), want, rtol=1e-6)      # NumPy cannot tell
    dx = strict.xp.asarray(x)
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array"):
        _normalise_rows_wrong(dx)
    np.testing.assert_allclose(to_host(_normalise_rows(dx)), want, rtol=1e-6)


# ---------------------------------------------------------------------------- CUDA kernels -> twins

def test_every_cuda_kernel_has_a_numpy_twin():
    names = set()
    for src in cuda_kernels.CUDA_DIR.glob("*.cu"):
        names |= set(re.findall(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(', src.read_text()))
    assert names and names <= set(cuda_kernels.TWINS), f"kernels without a twin: {sorted(names - set(cuda_kernels.TWINS))}"


def test_cuda_wrappers_on_strict_match_the_numpy_kernels(strict):
    xp, tr = strict.xp, device.transfers()
    g = xp.asarray
    x, w = _x((7, 640)), _x(640, 1)
    np.testing.assert_allclose(to_host(K.rmsnorm(g(x), g(w), 1e-6, offset=1.0)), K.rmsnorm(x, w, 1e-6, offset=1.0), rtol=1e-6)
    s = _x((3, 1000), 2, 10.0)
    np.testing.assert_allclose(to_host(K.softmax(g(s))), K.softmax(s), atol=1e-7)
    q3, pos = _x((5, 3, 64), 3), np.array([0, 1, 7, 500, 4095])
    for neox, rd in ((False, 64), (True, 32)):
        np.testing.assert_allclose(to_host(K.rope(g(q3), g(pos), theta=1e4, rotary_dim=rd, neox=neox)),
                                   K.rope(q3, pos, theta=1e4, rotary_dim=rd, neox=neox), atol=1e-6)
    # one decode query against a KV cache view (strided), with and without a sliding window
    q, k, v = _x((1, 6, 64), 4), _x((50, 2, 64), 5), _x((50, 2, 64), 6)
    cache_k, cache_v = xp.zeros((128, 2, 64), np.float32), xp.zeros((128, 2, 64), np.float32)
    cache_k[:50], cache_v[:50] = g(k), g(v)
    for window in (None, 16):
        got = K.attention(g(q), cache_k[:50], cache_v[:50], q_offset=49, window=window)
        np.testing.assert_allclose(to_host(got), K.attention(q, k, v, q_offset=49, window=window), atol=1e-6)
    for qname in ("Q8_0", "Q4_1"):
        qtype = gguf.GGMLQuantizationType[qname]
        data = gguf.quants.quantize(_x((96, 64), 8), qtype)
        xs = _x((2, 64), 9)
        want = K.linear(xs, QuantTensor(data, qtype, (96, 64)))      # the CPU's numbers (int8-rounded x)
        got = K.linear(g(xs), QuantTensor(g(data), qtype, (96, 64)))
        np.testing.assert_allclose(to_host(got), want, rtol=1e-5, atol=1e-5)
    launches = tr.snapshot().launches
    assert {"rmsnorm_f32", "softmax_f32", "rope_f32", "attn_decode_f32", "qmatvec_q8_0", "qmatvec_q4_1"} <= set(launches)


def test_a_kernel_refuses_host_arrays(strict):
    xp = strict.xp
    kern = xp.RawModule(code=(cuda_kernels.CUDA_DIR / "softmax.cu").read_text()).get_function("softmax_f32")
    y = xp.empty((2, 8), np.float32)
    with pytest.raises(TypeError, match="unsupported argument type ndarray"):
        kern((2,), (32,), (_x((2, 8)), y, np.int32(8)))
    with pytest.raises(RuntimeError, match="no extern"):
        xp.RawModule(code="").get_function("softmax_f32")


# ---------------------------------------------------------------------------- models

@pytest.mark.parametrize("qname, quant_embd", [("Q8_0", True), ("Q4_1", False), ("F32", False)])
def test_llm_greedy_tokens_equal_numpy_one_copy_per_token(monkeypatch, tmp_path, qname, quant_embd):
    """SmolLM2-shaped tiny GGUF: greedy tokens equal to NumPy's; exactly one device-to-host copy
    per generated token (the logits row the host sampler reads), none per layer."""
    from spark_lab.llm.engine import LLM
    path = write_tiny_gguf(tmp_path / "tiny.gguf", qtype=gguf.GGMLQuantizationType[qname], d=64, n_head=4, n_kv=2, ff=128,
                           quant_embd=quant_embd)
    prompt, n_new = list(range(1, 21)), 6                    # 20 prompt tokens: the batched (prefill) path too
    _use(monkeypatch, "cpu")
    want = LLM(path, n_ctx=64).generate(prompt, max_new_tokens=n_new, temperature=0, stop_at_eos=False).token_ids
    dev = _use(monkeypatch, "strict")
    llm = LLM(path, n_ctx=64)
    assert array_module(llm.cache.k) is dev.xp
    tr = device.transfers()
    calls, logits = [], llm._logits

    def counted(tokens, pos):                                # one forward pass + its logits row to the host
        before = tr.snapshot()
        out = logits(tokens, pos)
        calls.append((len(tokens), tr.snapshot() - before))
        return out

    llm._logits = counted
    cuda_kernels._CONSTANTS.clear()                          # rope's table goes over in the prefill
    tr.reset()
    g = llm.generate(prompt, max_new_tokens=n_new, temperature=0, stop_at_eos=False)
    assert [int(t) for t in g.token_ids] == [int(t) for t in want]
    V, L = llm.config.n_vocab, llm.config.n_layer
    assert tr.snapshot().d2h == n_new                        # one copy per generated token, in all
    assert [n for n, _ in calls] == [len(prompt)] + [1] * (n_new - 1)
    print("per forward (tokens, d2h, d2h bytes, h2d, h2d bytes):", [(n, d.d2h, d.d2h_bytes, d.h2d, d.h2d_bytes) for n, d in calls])
    for n, d in calls:
        assert (d.d2h, d.d2h_bytes) == (1, V * 4)            # the logits row, nothing per layer
        assert d.h2d == (3 if n > 1 else 2)                  # the token ids, rope's frequencies (+ the kernel's
    if qname != "F32":                                       # frequency table, once); nothing per layer
        assert tr.snapshot().launches[f"qmatvec_{qname.lower()}"] == (n_new - 1) * 4 * L + n_new * quant_embd   # q|k|v, o, gate|up, down; tied output


def test_tiny_sd_pipeline_on_strict_equals_numpy(monkeypatch):
    """UNet + VAE + CLIP text encoder: images within 1e-5 of NumPy's, no device-to-host copy in a step."""
    from spark_lab.diffusion import TextToImagePipeline
    lat = np.random.default_rng(3).standard_normal((2, 4, 8, 8), dtype=np.float32)
    kw = dict(num_inference_steps=3, guidance_scale=7.5, latents=lat, output_type="np", progress=False)
    _use(monkeypatch, "cpu")
    want = TextToImagePipeline.from_pretrained(FIX / "tiny-sd")(["a photo of a cat", "a red dog"], **kw)
    _use(monkeypatch, "strict")
    pipe = TextToImagePipeline.from_pretrained(FIX / "tiny-sd")
    tr = device.transfers()
    tr.reset()
    snaps = []
    got = pipe(["a photo of a cat", "a red dog"], callback=lambda i, t, x: snaps.append(tr.snapshot()), **kw)
    np.testing.assert_allclose(got, want, atol=1e-5)
    steps = [b - a for a, b in zip(snaps, snaps[1:])]
    assert len(steps) == 2 and all((d.d2h, d.h2d) == (0, 1) for d in steps), steps   # up: the timesteps
    assert tr.snapshot().d2h - snaps[-1].d2h == 1            # the decoded images, once


@pytest.mark.skipif(not is_present("spark-emoji") or not is_present("all-minilm-l6-v2"),
                    reason="spark-emoji or all-minilm-l6-v2 not installed")
def test_spark_emoji_on_strict_equals_numpy(monkeypatch):
    """The shipped image model with its MiniLM conditioning: within 1e-5 of NumPy, no
    device-to-host copy inside a denoising step, one for the image at the end."""
    from spark_lab.diffusion import TextToImagePipeline
    kw = dict(num_inference_steps=3, seed=0, output_type="np", progress=False)
    _use(monkeypatch, "cpu")
    want = TextToImagePipeline.from_pretrained("spark-emoji")(["a red apple"], **kw)
    _use(monkeypatch, "strict")
    pipe = TextToImagePipeline.from_pretrained("spark-emoji")
    pipe.sentence_encoder                                    # loaded (and placed) before counting
    tr = device.transfers()
    tr.reset()
    snaps = []
    got = pipe(["a red apple"], callback=lambda i, t, x: snaps.append(tr.snapshot()), **kw)
    np.testing.assert_allclose(got, want, atol=1e-5)
    steps = [b - a for a, b in zip(snaps, snaps[1:])]
    assert len(steps) == 2 and all((d.d2h, d.h2d) == (0, 1) for d in steps), steps   # up: the timesteps
    assert tr.snapshot().d2h - snaps[-1].d2h == 1


@pytest.mark.slow
@pytest.mark.skipif(not is_present("smollm2-135m-instruct"), reason="smollm2-135m-instruct not installed")
def test_smollm2_on_strict_same_tokens_one_copy_per_token(monkeypatch):
    """The shipped SmolLM2-135M (Q4_1, quantized embedding): the same greedy tokens as NumPy, one
    device-to-host copy per generated token (its 49152 logits), two small host-to-device copies
    (the token id, rope's frequencies). About 15 s: each stand-in mat-vec dequantizes in NumPy."""
    from spark_lab.llm.engine import LLM
    kw = dict(max_new_tokens=3, temperature=0, stop_at_eos=False)
    _use(monkeypatch, "cpu")
    want = LLM.load("smollm2-135m-instruct", n_ctx=64).generate("Hi", **kw).token_ids
    _use(monkeypatch, "strict")
    llm = LLM.load("smollm2-135m-instruct", n_ctx=64)
    tr = device.transfers()
    tr.reset()
    got = llm.generate("Hi", **kw).token_ids
    snap = tr.snapshot()
    assert got == want
    assert (snap.d2h, snap.d2h_bytes) == (3, 3 * llm.config.n_vocab * 4)
    assert snap.h2d <= 2 * 3 + 1                             # + rope's kernel table, once


def test_strict_qmatvec_caches_the_dequantized_weight_same_bits(strict):
    """The twin dequantizes a weight once (cached per buffer) and gives quant_matmul(fast=False)'s bits."""
    from spark_lab.quants import quant_matmul
    xp = strict.xp
    qtype = gguf.GGMLQuantizationType.Q8_0
    data = gguf.quants.quantize(_x((300, 128), 10), qtype)           # [300, 136] bytes
    want = quant_matmul(_x((3, 128), 11), QuantTensor(data, qtype, (300, 128)), fast=False)
    cuda_kernels._DEQUANT_CACHE.clear()
    d = xp.asarray(data)
    for _ in range(2):
        got = to_host(cuda_kernels.qmatvec(xp.asarray(_x((3, 128), 11)), d, int(qtype), 300, 128))
        np.testing.assert_array_equal(got, want)
        assert len(cuda_kernels._DEQUANT_CACHE) == 1
    del d
    import gc
    gc.collect()
    assert len(cuda_kernels._DEQUANT_CACHE) == 0                      # the entry goes with the weight
