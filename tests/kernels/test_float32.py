"""float32 in, float32 out for every kernel (NumPy 2 promotes on a stray float64 scalar)."""
import numpy as np

import spark_lab.kernels as K


def test_every_kernel_keeps_float32():
    r = np.random.default_rng(0)
    f = lambda *s: r.standard_normal(s).astype(np.float32)       # noqa: E731
    x, w = f(4, 16), f(16)
    img = f(1, 8, 6, 6)
    q, kv = f(5, 4, 8), f(5, 2, 8)
    outs = {
        "linear": K.linear(x, f(3, 16), f(3)), "matmul": K.matmul(x, f(16, 2)),
        "embedding": K.embedding(f(10, 4), np.array([1, 2])),
        "rmsnorm": K.rmsnorm(x, w, 1e-6, offset=1.0), "layernorm": K.layernorm(x, w, w, 1e-5),
        "group_norm": K.group_norm(img, 4, f(8), f(8), 1e-5),
        "softmax": K.softmax(x), "softmax_bool": K.softmax(x, mask=np.tril(np.ones((4, 16), bool))),
        "silu": K.silu(x), "gelu": K.gelu(x), "gelu_tanh": K.gelu(x, "tanh"), "quick_gelu": K.quick_gelu(x),
        "swiglu": K.swiglu(x, x), "geglu": K.geglu(x),
        "rope": K.rope(q, np.arange(5), 1e4), "rope_neox": K.rope(q, np.arange(5), 1e6, rotary_dim=4, neox=True, freq_scale=0.5),
        "attention": K.attention(q, kv, kv, window=3, scale=0.2),
        "attention_mask": K.attention(q, kv, kv, causal=False, mask=f(4, 5, 5)),
        "conv2d": K.conv2d(img, f(4, 8, 3, 3), f(4), stride=2, padding=1),
        "conv2d_1x1": K.conv2d(img, f(4, 8, 1, 1)), "upsample": K.upsample_nearest2d(img),
        "timestep": K.timestep_embedding(np.array([1, 500]), 33, True, 0.0, 2.0),
    }
    bad = {name: y.dtype for name, y in outs.items() if y.dtype != np.float32}
    assert not bad, bad
    assert all(np.all(np.isfinite(y)) for y in outs.values())
