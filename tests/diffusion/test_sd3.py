"""SD3 / SD3.5 transformer and the 16-channel VAE vs diffusers on tiny random models.

tiny-sd3/ and its reference.npz were written by tools/make_sd3_fixtures.py (float32 torch);
spark_lab must match within 1e-4 relative. One test runs diffusers live on fresh inputs.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from spark_lab.device import to_host
from spark_lab.diffusion.sd3 import SD3Transformer2DModel, sincos_pos_embed_2d
from spark_lab.diffusion.vae import AutoencoderKL

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "diffusion" / "tiny-sd3"
REF = np.load(FIX / "reference.npz")


def close(a, b, rtol=1e-4, atol=1e-4):
    a = to_host(a)
    assert a.dtype == np.float32, a.dtype
    assert a.shape == b.shape, (a.shape, b.shape)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def sd3():
    return SD3Transformer2DModel.from_pretrained(FIX / "transformer")


@pytest.fixture(scope="module")
def sd35():
    return SD3Transformer2DModel.from_pretrained(FIX, subfolder="transformer-sd35")


def test_sd3_forward_matches_diffusers(sd3):
    close(sd3(REF["x"], REF["ctx"], REF["pooled"], REF["t"]), REF["sd3_out"])


def test_sd3_non_square_latent_crops_positions(sd3):
    close(sd3(REF["rect_x"], REF["ctx"][:1], REF["pooled"][:1], 500.0), REF["sd3_rect_out"])


def test_sd3_skip_layers(sd3):
    close(sd3(REF["x"], REF["ctx"], REF["pooled"], REF["t"], skip_layers=[0]), REF["sd3_skip_out"])


def test_sd35_qk_norm_and_dual_attention(sd35):
    assert sd35.config.qk_norm == "rms_norm" and sd35.config.dual_attention_layers == (0,)
    close(sd35(REF["x"], REF["ctx"], REF["pooled"], REF["t"]), REF["sd35_out"])
    close(sd35(REF["rect_x"], REF["ctx"][:1], REF["pooled"][:1], np.array([500.0], np.float32)), REF["sd35_rect_out"])


def test_position_table_is_computed_like_diffusers(sd3):
    c = sd3.config
    mine = sincos_pos_embed_2d(c.inner_dim, c.pos_embed_max_size, c.sample_size // c.patch_size)
    np.testing.assert_allclose(mine, REF["sd3_pos_table"][0], rtol=1e-6, atol=1e-6)


def test_without_stored_position_table(tmp_path, sd3):
    """A checkpoint without the pos_embed buffer gets the table computed (same numbers)."""
    from safetensors.numpy import load_file, save_file
    d = tmp_path / "transformer"
    shutil.copytree(FIX / "transformer", d)
    w = load_file(d / "diffusion_pytorch_model.safetensors")
    del w["pos_embed.pos_embed"]
    save_file(w, d / "diffusion_pytorch_model.safetensors")
    close(SD3Transformer2DModel.from_pretrained(d)(REF["x"], REF["ctx"], REF["pooled"], REF["t"]), REF["sd3_out"])


def test_sd3_live_against_diffusers(sd35):
    """Fresh random inputs (a longer text, a larger latent), diffusers run in the test itself."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.SD3Transformer2DModel.from_pretrained(FIX / "transformer-sd35").eval()
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 16, 12, 14), dtype=np.float32)
    ctx = rng.standard_normal((3, 9, 32), dtype=np.float32)
    pooled = rng.standard_normal((3, 32), dtype=np.float32)
    t = np.array([999.0, 10.0, 640.25], np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x), torch.from_numpy(ctx), torch.from_numpy(pooled), torch.from_numpy(t)).sample.numpy()
    close(sd35(x, ctx, pooled, t), want)


def test_layer_norm_qk_and_dual_last_block_live(tmp_path):
    """Config paths the fixtures do not cover: qk_norm="layer_norm", a dual-attention last block,
    heads of 32 (BLAS attention rather than the fused small-head kernel); built by diffusers here."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=8, num_layers=3, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=64, pooled_projection_dim=12,
        pos_embed_max_size=16, qk_norm="layer_norm", dual_attention_layers=(0, 2)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            if torch.all(p == p.flatten()[0]):
                p.add_(0.2 * torch.randn(p.shape))
    ref.save_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 10, 6), dtype=np.float32)
    ctx = rng.standard_normal((2, 7, 24), dtype=np.float32)
    pooled = rng.standard_normal((2, 12), dtype=np.float32)
    t = np.array([900.0, 1.5], np.float32)
    with torch.no_grad():
        want = ref(*map(torch.from_numpy, (x, ctx, pooled, t))).sample.numpy()
    close(SD3Transformer2DModel.from_pretrained(tmp_path)(x, ctx, pooled, t), want)


def test_attention_in_query_chunks_is_the_same(sd3, monkeypatch):
    import spark_lab.diffusion.sd3 as mod
    full = to_host(sd3(REF["x"], REF["ctx"], REF["pooled"], REF["t"]))
    monkeypatch.setattr(mod, "ATTN_SCORES_MAX", 7 * 21)        # 21 keys: 7 query rows per call
    np.testing.assert_allclose(to_host(sd3(REF["x"], REF["ctx"], REF["pooled"], REF["t"])), full, rtol=1e-5, atol=1e-6)


def test_vae_16_channels_with_shift_factor():
    vae = AutoencoderKL.from_pretrained(FIX / "vae")
    c = vae.config
    assert (c.latent_channels, c.use_quant_conv, c.use_post_quant_conv) == (16, False, False)
    assert c.scaling_factor == 1.5305 and c.shift_factor == 0.0609
    dist = vae.encode(REF["vae_in"])
    close(dist.mean, REF["vae_mean"])
    close(dist.std, REF["vae_std"])
    close(vae.decode(REF["vae_z"]), REF["vae_decoded"])


def test_bad_inputs(sd3):
    x, ctx, pooled = REF["x"], REF["ctx"], REF["pooled"]
    with pytest.raises(ValueError, match="latent height 7 and width 8 must be multiples of patch_size 2"):
        sd3(np.zeros((2, 16, 7, 8), np.float32), ctx, pooled, 1.0)
    with pytest.raises(ValueError, match="more than pos_embed_max_size 12"):
        sd3(np.zeros((1, 16, 26, 8), np.float32), ctx[:1], pooled[:1], 1.0)
    with pytest.raises(ValueError, match=r"hidden_states \(2, 4, 8, 8\) should be \[B, 16, H, W\]"):
        sd3(x[:, :4], ctx, pooled, 1.0)
    with pytest.raises(ValueError, match=r"encoder_hidden_states \(2, 5, 31\) should be \[2, L, 32\]"):
        sd3(x, ctx[..., :31], pooled, 1.0)
    with pytest.raises(ValueError, match=r"pooled_projections \(1, 32\) should be \[2, 32\]"):
        sd3(x, ctx, pooled[:1], 1.0)


def _copy_config(tmp_path, **changes):
    d = tmp_path / "t"
    shutil.copytree(FIX / "transformer", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_bad_configs(tmp_path):
    with pytest.raises(ValueError, match="qk_norm='l2' is not supported"):
        SD3Transformer2DModel.from_pretrained(_copy_config(tmp_path / "a", qk_norm="l2"))
    with pytest.raises(ValueError, match="num_layers=3 but"):
        SD3Transformer2DModel.from_pretrained(_copy_config(tmp_path / "b", num_layers=3))
    with pytest.raises(ValueError, match="lacks attn2 weights but dual_attention_layers=\\[1\\]"):
        SD3Transformer2DModel.from_pretrained(_copy_config(tmp_path / "c", dual_attention_layers=[1]))
    with pytest.raises(ValueError, match="describes a FluxTransformer2DModel, not an SD3Transformer2DModel"):
        SD3Transformer2DModel.from_pretrained(_copy_config(tmp_path / "d", _class_name="FluxTransformer2DModel"))
    with pytest.raises(FileNotFoundError, match="missing model folder"):
        SD3Transformer2DModel.from_pretrained(tmp_path / "nope")
