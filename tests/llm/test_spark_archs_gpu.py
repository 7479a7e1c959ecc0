"""The gpt-oss/qwen3moe/rope-scaling paths on CuPy (scripts/gpu_check.sh runs these on a GPU):
rope.cu with llama3 frequency factors and YaRN, sink attention's xp body, MoE routing and the
expert gather with CuPy arrays, and the converted fixtures end to end against transformers."""
from pathlib import Path

import numpy as np
import pytest

import spark_lab.kernels as K
from spark_lab.kernels.rope import YaRN
from spark_lab.kernels.sink_attention import attention_sinks
from spark_lab.llm.moe import route

pytestmark = pytest.mark.gpu
FIX = Path(__file__).resolve().parents[1] / "fixtures" / "spark"


@pytest.fixture(scope="module")
def cp():
    cupy = pytest.importorskip("cupy")
    if not cupy.cuda.is_available():
        pytest.skip("no CUDA device")
    return cupy


def _x(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("scaling", ["factors", "yarn", "yarn-untruncated"])
def test_rope_scaling_kernel(cp, scaling):
    x, pos = _x((9, 3, 32)), np.array([0, 1, 2, 5, 17, 100, 1000, 4095, 70000], np.int64)
    kw = dict(theta=150000.0, rotary_dim=32, neox=True)
    if scaling == "factors":
        kw.update(freq_factors=np.linspace(1.0, 8.0, 16).astype(np.float32))
    else:
        kw.update(freq_scale=1 / 8, yarn=YaRN(orig_ctx=4096, truncate=scaling == "yarn"))
    want = K.rope(x, pos, **kw)
    got = K.rope(cp.asarray(x), cp.asarray(pos), **kw).get()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("Tq, q_offset, window", [(1, 11, None), (1, 11, 4), (5, 7, 4), (12, 0, None)])
def test_sink_attention(cp, Tq, q_offset, window):
    q, k, v, s = _x((Tq, 4, 16), 1), _x((q_offset + Tq, 2, 16), 2), _x((q_offset + Tq, 2, 16), 3), _x((4,), 4)
    want = attention_sinks(q, k, v, s, q_offset=q_offset, window=window)
    got = attention_sinks(cp.asarray(q), cp.asarray(k), cp.asarray(v), cp.asarray(s), q_offset=q_offset, window=window)
    np.testing.assert_allclose(got.get(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gating", ["softmax", "softmax_weight", "sigmoid"])
def test_route(cp, gating):
    logits = _x((6, 8), 5)
    ids, w = route(logits, 3, gating, norm=True)
    gi, gw = route(cp.asarray(logits), 3, gating, norm=True)
    np.testing.assert_array_equal(gi.get(), ids)
    np.testing.assert_allclose(gw.get(), w, rtol=1e-6)


@pytest.mark.parametrize("name", ["qwen3moe", "gpt-oss", "llama31", "qwen3-yarn"])
def test_fixture_on_gpu(cp, name):
    from spark_lab.device import get_device
    from spark_lab.gguf import GGUFFile, config_from_gguf
    from spark_lab.llm.cache import KVCache
    from spark_lab.llm.model import Transformer
    if not get_device().is_gpu:
        pytest.skip("SPARK_LAB_DEVICE is not cuda")
    d = np.load(FIX / f"{name}.npz")
    tokens, ref = d["tokens"], d["logits"]
    f = GGUFFile(FIX / f"{name}.gguf")
    c = config_from_gguf(f)
    m = Transformer(f, c)
    out = m.forward(tokens, 0, KVCache(c.n_layer, 32, c.n_head_kv, c.head_dim), all_logits=True)
    scale = np.abs(ref).max()
    assert np.abs(out.get() - ref).max() <= 1e-3 * scale
    cache = KVCache(c.n_layer, 32, c.n_head_kv, c.head_dim)
    m.forward(tokens[:3], 0, cache)
    for j in range(3, len(tokens)):
        step = m.forward(tokens[j:j + 1], j, cache)
        assert np.abs(step.get()[0] - ref[j]).max() <= 1e-3 * scale


@pytest.mark.parametrize("qtype", ["Q8_0", "MXFP4"])
def test_quantized_experts_on_gpu(cp, tmp_path, qtype):
    """gpt-oss with its experts requantized, on the GPU, against the same experts dequantized."""
    import gguf
    from spark_lab.device import get_device
    from spark_lab.gguf import GGUFFile, config_from_gguf
    from spark_lab.llm.cache import KVCache
    from spark_lab.llm.model import Transformer
    from tests.llm.test_spark_archs import _dequantize_experts, _requantize_experts
    if not get_device().is_gpu:
        pytest.skip("SPARK_LAB_DEVICE is not cuda")
    tokens = np.load(FIX / "gpt-oss.npz")["tokens"]
    q = _requantize_experts(FIX / "gpt-oss.gguf", tmp_path / "q.gguf", gguf.GGMLQuantizationType[qtype])
    f32 = _dequantize_experts(q, tmp_path / "f32.gguf")
    outs, steps = [], []
    for path in (q, f32):
        f = GGUFFile(path)
        c = config_from_gguf(f)
        m = Transformer(f, c)
        outs.append(m.forward(tokens, 0, KVCache(c.n_layer, 32, c.n_head_kv, c.head_dim), all_logits=True).get())
        cache = KVCache(c.n_layer, 32, c.n_head_kv, c.head_dim)     # decode: MXFP4 takes the one-launch gather
        m.forward(tokens[:5], 0, cache)
        steps.append(np.stack([m.forward(tokens[j:j + 1], j, cache).get()[0] for j in range(5, 12)]))
    for got, want in (outs, steps):
        assert np.abs(got - want).max() <= 5e-2 * np.abs(want).max()
        assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9
