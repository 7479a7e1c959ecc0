"""UNets, VAE and the CLIP text encoder vs diffusers/transformers outputs on tiny random models.

The references in reference.npz were written by tools/make_diffusion_fixtures.py (float32
torch); spark_lab must match them within 1e-4. The models' weights are the committed fixtures.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from spark_lab.device import to_host
from spark_lab.diffusion import AutoencoderKL, UNet2DConditionModel, UNet2DModel
from spark_lab.text.clip import CLIPTextModel, CLIPTokenizer

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "diffusion"
REF = np.load(FIX / "reference.npz")


def close(a, b, atol=1e-4):
    a = to_host(a)                                       # GPU / strict-device outputs come back explicitly
    assert a.dtype == np.float32, a.dtype
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=atol)


@pytest.fixture(scope="module")
def unet():
    return UNet2DConditionModel.from_pretrained(FIX / "tiny-sd" / "unet")


def test_unet_condition_matches_diffusers(unet):
    close(unet(REF["unet_cond_in"], REF["unet_cond_t"], REF["unet_cond_ehs"]), REF["unet_cond_out"])


def test_unet_condition_odd_size_upsamples_to_skip(unet):
    close(unet(REF["unet_cond_odd_in"], 500, REF["unet_cond_ehs"][:1]), REF["unet_cond_odd_out"])


def test_unet_pixel_fp16_variant_linear_projection():
    m = UNet2DConditionModel.from_pretrained(FIX / "tiny-pixel" / "unet")      # only .fp16.safetensors there
    assert all(a.dtype == np.float32 for a in m.params.tensors.values())
    close(m(REF["pix_in"], 250, REF["pix_ehs"]), REF["pix_out"])


def test_unet2d_class_labels():
    m = UNet2DModel.from_pretrained(FIX / "tiny-unet2d")
    close(m(REF["u2_in"], np.array([3, 700]), class_labels=REF["u2_labels"]), REF["u2_out"])
    with pytest.raises(ValueError, match="class_labels"):
        m(REF["u2_in"], 3)
    with pytest.raises(ValueError, match="out of range"):
        m(REF["u2_in"], 3, class_labels=np.array([0, 5]))


def test_vae_encode_decode():
    vae = AutoencoderKL.from_pretrained(FIX / "tiny-sd" / "vae")
    dist = vae.encode(REF["vae_in"])
    close(dist.mean, REF["vae_mean"])
    close(dist.std, REF["vae_std"])
    close(vae.decode(REF["vae_z"]), REF["vae_decoded"])
    assert vae.config.downscale == 2


def test_clip_text_encoder_and_tokenizer(tmp_path):
    tok = CLIPTokenizer.from_pretrained(FIX / "tiny-sd" / "tokenizer")            # vocab.json + merges.txt
    prompts = ["a photo of a cat", "Happy  DOG, smiling face!", ""]
    np.testing.assert_array_equal(tok(prompts), REF["clip_ids"])
    np.testing.assert_array_equal(tok(["a photo of the red cat " * 4]), REF["clip_long_ids"])   # truncated, EOS kept
    for name in ("tokenizer.json", "tokenizer_config.json"):                       # tokenizer.json only
        shutil.copy(FIX / "tiny-sd" / "tokenizer" / name, tmp_path / name)
    np.testing.assert_array_equal(CLIPTokenizer.from_pretrained(tmp_path)(prompts), REF["clip_ids"])
    enc = CLIPTextModel.from_pretrained(FIX / "tiny-sd" / "text_encoder")
    out = enc(REF["clip_ids"])
    close(out.last_hidden_state, REF["clip_hidden"])
    close(out.pooler_output, REF["clip_pooled"])


def test_unet_live_against_diffusers(unet):
    """Random inputs this time, diffusers run in the test itself."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.UNet2DConditionModel.from_pretrained(FIX / "tiny-sd" / "unet").eval()
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 4, 8, 8), dtype=np.float32)
    ctx = rng.standard_normal((3, 5, 16), dtype=np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x), 123, encoder_hidden_states=torch.from_numpy(ctx)).sample.numpy()
    close(unet(x, 123, ctx), want)


def _copy_unet(tmp_path, **changes):
    d = tmp_path / "unet"
    shutil.copytree(FIX / "tiny-sd" / "unet", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_bad_inputs(tmp_path, unet):
    with pytest.raises(ValueError, match="unsupported down block type 'SimpleCrossAttnDownBlock2D'"):
        UNet2DConditionModel.from_pretrained(_copy_unet(tmp_path, down_block_types=["SimpleCrossAttnDownBlock2D", "DownBlock2D"]))
    with pytest.raises(FileNotFoundError, match="missing model folder"):
        UNet2DConditionModel.from_pretrained(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no weights in"):
        UNet2DConditionModel.from_pretrained(empty)
    with pytest.raises(ValueError, match=r"should be \[N, 4, H, W\]"):
        unet(np.zeros((1, 3, 8, 8), np.float32), 1, np.zeros((1, 2, 16), np.float32))
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        unet(np.zeros((1, 4, 8, 8), np.float32), 1, None)


def test_unsupported_config_values_are_named(tmp_path):
    with pytest.raises(ValueError, match="attention_type='gated'"):
        UNet2DConditionModel.from_pretrained(_copy_unet(tmp_path, attention_type="gated"))


def test_safetensors_bf16_and_fp16_read_as_float32(tmp_path):
    from spark_lab.diffusion.loading import load_safetensors
    vals = np.array([1.5, -2.0, 0.15625, 3.0], np.float32)           # exact in bfloat16
    bf16 = (vals.view(np.uint32) >> 16).astype(np.uint16).tobytes()
    f16 = vals.astype(np.float16).tobytes()
    header = {"a": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]},
              "b": {"dtype": "F16", "shape": [4], "data_offsets": [8, 16]}}
    h = json.dumps(header).encode()
    (tmp_path / "w.safetensors").write_bytes(len(h).to_bytes(8, "little") + h + bf16 + f16)
    w = load_safetensors(tmp_path / "w.safetensors")
    assert w["a"].dtype == np.float32 and w["a"].shape == (2, 2)
    np.testing.assert_array_equal(to_host(w["a"]).reshape(-1), vals)
    np.testing.assert_array_equal(to_host(w["b"]), vals)


@pytest.mark.parametrize("kw", [
    dict(num_class_embeds=3, attention_head_dim=(1, 2),
         resnet_time_scale_shift="scale_shift", only_cross_attention=True),
    dict(class_embed_type="timestep", transformer_layers_per_block=2, use_linear_projection=True,
         mid_block_type="UNetMidBlock2D", flip_sin_to_cos=False, freq_shift=1),
], ids=["class-table-heads-scale-shift", "class-timestep-2-layers-plain-mid"])
def test_unet_condition_variants_live(tmp_path, kw):
    """Config paths the fixtures do not cover, built and run by diffusers in the test."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    base = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=6, attention_head_dim=2, norm_num_groups=4)
    ref = diffusers.UNet2DConditionModel(**dict(base, **kw)).eval()
    ref.save_pretrained(tmp_path)
    ours = UNet2DConditionModel.from_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 8, 8), dtype=np.float32)
    ctx = rng.standard_normal((2, 3, 6), dtype=np.float32)
    labels = np.array([2, 0]) if "num_class_embeds" in kw else np.array([10.0, 600.0], np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x), torch.tensor([5, 900]), encoder_hidden_states=torch.from_numpy(ctx),
                   class_labels=torch.from_numpy(labels)).sample.numpy()
    close(ours(x, np.array([5, 900]), ctx, class_labels=labels), want)
    with pytest.raises(ValueError, match="class_labels"):
        ours(x, 5, ctx)


def test_repeat_for_guidance_equals_the_doubled_batch():
    m = UNet2DConditionModel.from_pretrained(FIX / "tiny-pixel" / "unet")   # DownBlock2D first: shared prefix
    x, ctx = REF["pix_in"][:1], REF["pix_ehs"]
    full = m(np.concatenate([x, x]), 250, ctx)
    np.testing.assert_allclose(to_host(m(x, 250, ctx, repeat=2)), to_host(full), atol=1e-6)
    with pytest.raises(ValueError, match="should be \\[2, L, ctx\\]"):
        m(x, 250, ctx[:1], repeat=2)
