"""FluxTransformer2DModel vs diffusers on tiny random models, and the Flux pipeline's packing helpers.

tests/fixtures/diffusion/tiny-flux/ was written by tools/make_flux_fixtures.py (float32 torch,
guidance embeds, RoPE axes (4, 6, 6)); spark_lab must match its outputs within 1e-4. The model
without guidance embeds (FLUX.1-schnell's shape) is built and run by diffusers in the test.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from spark_lab.device import to_host
from spark_lab.diffusion.flux import (FluxConfig, FluxTransformer2DModel, latent_image_ids, pack_latents,
                                      unpack_latents)

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "diffusion" / "tiny-flux"
REF = np.load(FIX / "reference.npz")


def close(a, b, rtol=1e-4):
    a = to_host(a)
    assert a.dtype == np.float32, a.dtype
    assert a.shape == b.shape, (a.shape, b.shape)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * float(np.abs(b).max()))


def inputs(k):
    return [REF[f"{k}_{n}"] for n in ("x", "ctx", "pooled", "t", "img_ids", "txt_ids", "guidance")]


@pytest.fixture(scope="module")
def model():
    return FluxTransformer2DModel.from_pretrained(FIX, subfolder="transformer")


def test_forward_matches_diffusers(model):
    assert model.config.guidance_embeds and model.config.axes_dims_rope == (4, 6, 6)
    assert model.weight_formats() == {"float32": len(model.params.tensors)}
    close(model(*inputs("fwd")), REF["fwd_out"])


def test_every_rope_axis_matches_diffusers(model):
    """Random integer ids on all three axes (the pipeline's zeros and (0, row, col) leave axis 0 idle)."""
    close(model(*inputs("ids")), REF["ids_out"])


def test_scalar_timestep_and_guidance_broadcast(model):
    x, ctx, pooled, t, img_ids, txt_ids, g = inputs("fwd")
    both = to_host(model(x, ctx, pooled, np.float32(0.5), img_ids, txt_ids, 2.0))
    one = to_host(model(x[1:], ctx[1:], pooled[1:], np.array([0.5], np.float32), img_ids, txt_ids, np.array([2.0])))
    np.testing.assert_allclose(both[1:], one, rtol=1e-5, atol=1e-6)


def test_pipeline_helpers_match_diffusers():
    np.testing.assert_array_equal(pack_latents(REF["pack_latents"]), REF["pack_packed"])
    np.testing.assert_array_equal(unpack_latents(REF["pack_packed"], 48, 80, 8), REF["pack_unpacked"])
    np.testing.assert_array_equal(unpack_latents(REF["pack_packed"], 48, 80, 8), REF["pack_latents"])
    ids = latent_image_ids(3, 5)
    assert ids.dtype == np.float32
    np.testing.assert_array_equal(ids, REF["pack_ids"])
    with pytest.raises(ValueError, match="must be even"):
        pack_latents(np.zeros((1, 4, 5, 6), np.float32))
    with pytest.raises(ValueError, match="do not make a 64x80 image"):
        unpack_latents(REF["pack_packed"], 64, 80, 8)


def test_without_guidance_embeds_live(tmp_path):
    """FLUX.1-schnell's shape (no guidance embedder), other widths; diffusers runs in the test."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=8, out_channels=12, num_layers=2,
                                           num_single_layers=1, attention_head_dim=8, num_attention_heads=3,
                                           joint_attention_dim=20, pooled_projection_dim=12, guidance_embeds=False,
                                           axes_dims_rope=(2, 2, 4)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ref.save_pretrained(tmp_path)
    ours = FluxTransformer2DModel.from_pretrained(tmp_path)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 9, 8), dtype=np.float32)
    ctx = rng.standard_normal((2, 4, 20), dtype=np.float32)
    pooled = rng.standard_normal((2, 12), dtype=np.float32)
    t = np.array([1.0, 0.05], np.float32)
    img_ids, txt_ids = latent_image_ids(3, 3), rng.integers(0, 4, (4, 3)).astype(np.float32)
    with torch.no_grad():
        want = ref(hidden_states=torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(ctx),
                   pooled_projections=torch.from_numpy(pooled), timestep=torch.from_numpy(t),
                   img_ids=torch.from_numpy(img_ids), txt_ids=torch.from_numpy(txt_ids)).sample.numpy()
    close(ours(x, ctx, pooled, t, img_ids, txt_ids), want)
    with pytest.raises(ValueError, match="no guidance embedding"):
        ours(x, ctx, pooled, t, img_ids, txt_ids, guidance=3.5)


def test_bad_inputs_are_one_line(model, tmp_path):
    x, ctx, pooled, t, img_ids, txt_ids, g = inputs("fwd")
    cases = [
        (dict(hidden_states=x[..., :8]), r"hidden_states \(2, 16, 8\) should be \[B, N, 16\]"),
        (dict(encoder_hidden_states=ctx[:1]), r"encoder_hidden_states \(1, 5, 32\) should be \[2, T, 32\]"),
        (dict(pooled_projections=pooled[:, :4]), r"pooled_projections \(2, 4\) should be \[2, 32\]"),
        (dict(img_ids=img_ids[:3]), r"img_ids \(3, 3\) should be \[16, 3\]"),
        (dict(txt_ids=txt_ids[:, :2]), r"txt_ids \(5, 2\) should be \[5, 3\]"),
        (dict(timestep=np.array([0.1, 0.2, 0.3], np.float32)), "timestep has 3 values for a batch of 2"),
        (dict(guidance=None), "pass guidance"),
    ]
    base = dict(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t, img_ids=img_ids,
                txt_ids=txt_ids, guidance=g)
    for change, msg in cases:
        with pytest.raises(ValueError, match=msg) as e:
            model(**dict(base, **change))
        assert "\n" not in str(e.value)
    d = tmp_path / "transformer"
    shutil.copytree(FIX / "transformer", d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, axes_dims_rope=[4, 6, 8])))
    with pytest.raises(ValueError, match=r"axes_dims_rope=\[4, 6, 8\] must be even sizes summing to "
                                         r"attention_head_dim=16"):
        FluxTransformer2DModel.from_pretrained(d)
    (d / "config.json").write_text(json.dumps(dict(cfg, num_single_layers=3)))
    with pytest.raises(ValueError, match="config says 3 single_transformer_blocks"):
        FluxTransformer2DModel.from_pretrained(d)
    (d / "config.json").write_text(json.dumps(dict(cfg, num_attention_heads=4)))
    with pytest.raises(ValueError, match=r"x_embedder.weight \(32, 16\) does not match the config"):
        FluxTransformer2DModel.from_pretrained(d)
    assert FluxConfig.from_dict(dict(cfg, some_new_key=1)).extra == {"some_new_key": 1}
