"""rope against a transformers-style rotate_half implementation and a llama.cpp-style adjacent-pair one;
timestep_embedding against diffusers' get_timestep_embedding."""
import math

import numpy as np
import pytest

from spark_lab.kernels import rope, timestep_embedding


def _x(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _rope_adjacent_ref(x, pos, theta, rd, freq_scale):
    """llama.cpp's ggml_rope "norm" mode written per scalar: pair (2i, 2i+1) turns by pos*fs*theta^(-2i/rd)."""
    T, H, D = x.shape
    out = x.astype(np.float64).copy()
    for t in range(T):
        for i in range(rd // 2):
            a = pos[t] * freq_scale * theta ** (-2.0 * i / rd)
            c, s = math.cos(a), math.sin(a)
            x0, x1 = out[t, :, 2 * i].copy(), out[t, :, 2 * i + 1].copy()
            out[t, :, 2 * i], out[t, :, 2 * i + 1] = x0 * c - x1 * s, x0 * s + x1 * c
    return out


def _rope_rotate_half_ref(torch, x, pos, theta, rd):
    """transformers' apply_rotary_pos_emb (neox layout) on the first rd features, written in torch
    (importing transformers' modeling code takes ~15 s on a busy CPU, the math is three lines)."""
    def rotate_half(t):
        h = t.shape[-1] // 2
        return torch.cat((-t[..., h:], t[..., :h]), dim=-1)
    inv_freq = 1.0 / (theta ** (torch.arange(0, rd, 2, dtype=torch.float64) / rd))
    freqs = torch.tensor(pos, dtype=torch.float64)[:, None] * inv_freq[None, :]   # [T, rd/2]
    emb = torch.cat((freqs, freqs), dim=-1)                                       # [T, rd]
    cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]                       # [T, 1, rd]
    t = torch.from_numpy(x).double()
    rot = t[..., :rd] * cos + rotate_half(t[..., :rd]) * sin
    return torch.cat((rot, t[..., rd:]), dim=-1).numpy()


def test_rope_normal_matches_llamacpp_style_reference():
    x = _x((6, 3, 64))
    pos = np.array([0, 1, 2, 7, 100, 4095])
    y = rope(x, pos, theta=10000.0)
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_allclose(y, _rope_adjacent_ref(x, pos, 10000.0, 64, 1.0), rtol=1e-5, atol=1e-5)
    # partial rotary + linear scaling: only the first 32 features turn, positions scaled by 0.25
    y = rope(x, pos, theta=500000.0, rotary_dim=32, freq_scale=0.25)
    np.testing.assert_allclose(y, _rope_adjacent_ref(x, pos, 500000.0, 32, 0.25), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(y[..., 32:], x[..., 32:])


@pytest.mark.parametrize("rd", [256, 64])
def test_rope_neox_matches_transformers_rotate_half(rd):
    torch = pytest.importorskip("torch")
    x = _x((5, 4, 256))
    pos = np.array([3, 4, 5, 6, 31999])
    y = rope(x, pos, theta=1e6, rotary_dim=rd, neox=True)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, _rope_rotate_half_ref(torch, x, pos, 1e6, rd), rtol=1e-5, atol=1e-5)


def test_gguf_permuted_normal_rope_equals_neox_rope():
    # llama.cpp's converter permutes llama q/k rows so that adjacent-pair rope on the file's
    # layout equals rotate_half rope on the HF layout: feature i <-> (i // 2) + (i % 2) * D/2
    D = 16
    perm = np.array([(i // 2) + (i % 2) * (D // 2) for i in range(D)])
    x = _x((4, 2, D))
    pos = np.arange(10, 14)
    np.testing.assert_allclose(rope(x[..., perm], pos), rope(x, pos, neox=True)[..., perm], rtol=1e-6, atol=1e-6)


def test_rope_rejects_bad_arguments():
    x = _x((4, 2, 16))
    with pytest.raises(ValueError, match=r"positions \(3,\)"):
        rope(x, np.arange(3))
    with pytest.raises(ValueError, match="rotary_dim 15"):
        rope(x, np.arange(4), rotary_dim=15)
    with pytest.raises(ValueError, match=r"\[T, H, D\]"):
        rope(x[0], np.arange(2))
    with pytest.raises(ValueError, match="integers"):
        rope(x, np.arange(4.0))


def _timestep_ref(t, dim, flip, shift, scale, max_period):
    half = dim // 2
    freqs = np.exp(-math.log(max_period) * np.arange(half) / (half - shift))
    a = scale * t.astype(np.float64)[:, None] * freqs[None, :]
    emb = np.concatenate([np.cos(a), np.sin(a)] if flip else [np.sin(a), np.cos(a)], -1)
    return np.pad(emb, ((0, 0), (0, dim % 2)))


@pytest.mark.parametrize("dim,flip,shift,scale", [(320, True, 0.0, 1.0), (64, False, 1.0, 1.0), (33, False, 1.0, 2.0)])
def test_timestep_embedding_definition(dim, flip, shift, scale):
    t = np.array([0, 1, 10, 999])
    y = timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift, scale=scale)
    assert y.shape == (4, dim) and y.dtype == np.float32
    np.testing.assert_allclose(y, _timestep_ref(t, dim, flip, shift, scale, 10000), atol=2e-4)


@pytest.mark.parametrize("dim,flip,shift", [(320, True, 0.0), (128, False, 1.0), (33, True, 1.0)])
def test_timestep_embedding_matches_diffusers(dim, flip, shift):
    torch = pytest.importorskip("torch")
    emb_mod = pytest.importorskip("diffusers.models.embeddings")
    t = np.array([0.0, 1.0, 500.5, 999.0], np.float32)
    ref = emb_mod.get_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=flip,
                                         downscale_freq_shift=shift, scale=1.0, max_period=10000).numpy()
    # float32 arguments t * freq (up to ~1000 rad) differ by an ulp between exp implementations
    np.testing.assert_allclose(timestep_embedding(t, dim, flip, shift), ref, rtol=1e-5, atol=1e-4)
