"""SDXL: the UNet's added conditioning, both CLIP text encoders and the text-to-image pipeline vs diffusers.

References in tiny-sdxl/reference.npz were written by tools/make_sdxl_fixtures.py (float32 torch).
Models and pipelines must match within 1e-4 and 1e-3.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from spark_lab.device import to_host
from spark_lab.diffusion import UNet2DConditionModel
from spark_lab.diffusion.pipeline import TextToImagePipeline, load_pipeline
from spark_lab.diffusion.sdxl import StableDiffusionXLPipeline
from spark_lab.text.clip import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "diffusion"
XL = FIX / "tiny-sdxl"
REF = np.load(XL / "reference.npz")
PROMPTS = ["a photo of a cat", "Happy  DOG, smiling face!", ""]


def close(a, b, atol=1e-4):
    a = to_host(a)
    assert a.dtype == np.float32, a.dtype
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=atol)


@pytest.fixture(scope="module")
def xl():
    return TextToImagePipeline.from_pretrained(XL)


def added(n=2):
    return {"text_embeds": REF["unet_text_embeds"][:n], "time_ids": REF["unet_time_ids"][:n]}


def test_unet_text_time_matches_diffusers():
    unet = UNet2DConditionModel.from_pretrained(XL / "unet")
    assert unet.config.addition_embed_type == "text_time"
    assert unet.config.transformer_layers_per_block == [1, 2] and unet.config.use_linear_projection
    close(unet(REF["unet_in"], np.array([999, 3]), REF["unet_ehs"], added_cond_kwargs=added()), REF["unet_out"])
    # guidance's repeat=2 with the halves' own added conditioning equals the doubled batch
    x = REF["unet_in"][:1]
    both = unet(np.concatenate([x, x]), 7, REF["unet_ehs"], added_cond_kwargs=added())
    np.testing.assert_allclose(to_host(unet(x, 7, REF["unet_ehs"], repeat=2, added_cond_kwargs=added())),
                               to_host(both), atol=1e-6)


def test_inpainting_unet_nine_channels():
    unet = UNet2DConditionModel.from_pretrained(XL / "unet_inpaint")
    close(unet(REF["unet9_in"], 500, REF["unet_ehs"][:1], added_cond_kwargs=added(1)), REF["unet9_out"])


def test_unet_added_conditioning_errors():
    unet = UNet2DConditionModel.from_pretrained(XL / "unet")
    with pytest.raises(ValueError, match="needs added_cond_kwargs"):
        unet(REF["unet_in"], 3, REF["unet_ehs"])
    bad = {"text_embeds": REF["unet_text_embeds"], "time_ids": REF["unet_time_ids"][:, :5]}
    with pytest.raises(ValueError, match="!= the 64 inputs of add_embedding"):
        unet(REF["unet_in"], 3, REF["unet_ehs"], added_cond_kwargs=bad)


@pytest.mark.parametrize("key, cls, sub", [("te1", CLIPTextModel, "text_encoder"),
                                           ("te2", CLIPTextModelWithProjection, "text_encoder_2")])
def test_text_encoders_every_layer_and_projection(key, cls, sub):
    tok = CLIPTokenizer.from_pretrained(XL / sub.replace("text_encoder", "tokenizer"))
    ids = tok(PROMPTS)
    np.testing.assert_array_equal(ids, REF[f"{key}_ids"])    # te2 pads with "!": a "!" in a prompt is that token
    out = cls.from_pretrained(XL / sub)(ids, output_hidden_states=True)
    assert len(out.hidden_states) == 4                       # embeddings + 3 layers
    close(out.last_hidden_state, REF[f"{key}_hidden"])
    close(out.hidden_states[-2], REF[f"{key}_penultimate"])
    close(out.hidden_states[0], REF[f"{key}_first"])
    close(out.text_embeds if key == "te2" else out.pooler_output, REF[f"{key}_pooled"])


def test_text_encoder_with_projection_needs_the_projection():
    with pytest.raises(ValueError, match="no text_projection.weight"):
        CLIPTextModelWithProjection.from_pretrained(XL / "text_encoder")


def test_sdxl_text_to_image_matches_diffusers(xl):
    assert isinstance(xl, StableDiffusionXLPipeline) and xl.num_time_ids == 6
    img = xl(["a photo of a cat", "a red dog"], num_inference_steps=3, guidance_scale=5.0,
             latents=REF["xl_latents"], output_type="np", progress=False)
    assert img.dtype == np.float32 and img.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(img, REF["xl_images"], atol=1e-3)


def test_sdxl_negative_prompt_and_size_ids(xl):
    xl.force_zeros_for_empty_prompt = False
    try:
        img = xl("a photo of a cat", negative_prompt="blue", num_inference_steps=3, guidance_scale=4.0,
                 latents=REF["xl_latents"][:1], output_type="np", progress=False,
                 original_size=(32, 24), crops_coords_top_left=(2, 4), target_size=(16, 16))
    finally:
        xl.force_zeros_for_empty_prompt = True
    np.testing.assert_allclose(img, REF["xl_neg_images"], atol=1e-3)
    plain = xl("a photo of a cat", num_inference_steps=3, guidance_scale=4.0, latents=REF["xl_latents"][:1],
               output_type="np", progress=False)
    assert np.abs(plain - img).max() > 1e-3                   # the sizes and the negative prompt do something


def test_sdxl_live_euler_batch_and_images_per_prompt(xl):
    """diffusers run in the test: two prompts x two images, a list of negative prompts."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(XL, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    lat = np.random.default_rng(4).standard_normal((4, 4, 8, 8), dtype=np.float32)
    kw = dict(num_inference_steps=3, guidance_scale=6.0, num_images_per_prompt=2, negative_prompt=["red", "a cat"])
    want = ref(["happy cat", "a dog!"], latents=torch.from_numpy(lat), output_type="np", **kw).images
    got = xl(["happy cat", "a dog!"], latents=lat, output_type="np", progress=False, **kw)
    np.testing.assert_allclose(got, want, atol=1e-3)


def test_diffusers_test_suite_unet_config_live(tmp_path):
    """The tiny SDXL UNet of diffusers' own SDXL tests (32/64 channels, 2 layers, 32 groups)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64).eval()
    ref.save_pretrained(tmp_path)
    ours = UNet2DConditionModel.from_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 16, 16), dtype=np.float32)
    ctx = rng.standard_normal((2, 6, 64), dtype=np.float32)
    text = rng.standard_normal((2, 32), dtype=np.float32)
    ids = np.array([[64, 64, 0, 0, 64, 64], [128, 96, 8, 0, 64, 64]], np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x), torch.tensor([10, 700]), encoder_hidden_states=torch.from_numpy(ctx),
                   added_cond_kwargs={"text_embeds": torch.from_numpy(text), "time_ids": torch.from_numpy(ids)}).sample
    close(ours(x, np.array([10, 700]), ctx, added_cond_kwargs={"text_embeds": text, "time_ids": ids}), want.numpy())


def test_family_is_read_from_model_index(tmp_path):
    assert type(load_pipeline(FIX / "tiny-sd")) is TextToImagePipeline
    with pytest.raises(ValueError, match="holds a StableDiffusionPipeline model, not one for StableDiffusionXLPipeline"):
        StableDiffusionXLPipeline.from_pretrained(FIX / "tiny-sd")
    d = tmp_path / "other"
    shutil.copytree(FIX / "tiny-sd", d)
    index = json.loads((d / "model_index.json").read_text())
    (d / "model_index.json").write_text(json.dumps(dict(index, _class_name="KandinskyV22Pipeline")))
    with pytest.raises(ValueError, match=r"'KandinskyV22Pipeline' models are not supported yet \(spark_lab runs: "
                                         r"StableDiffusionPipeline, .*StableDiffusionXLPipeline"):
        TextToImagePipeline.from_pretrained(d)


def test_refiner_layout_without_the_first_text_encoder(tmp_path):
    """text_encoder/ absent (the SDXL refiner's layout): encoder 2 alone gives the context and the pooled."""
    d = tmp_path / "xl"
    shutil.copytree(XL, d, ignore=shutil.ignore_patterns("unet_inpaint", "lora", "reference.npz"))
    index = json.loads((d / "model_index.json").read_text())
    index["text_encoder"] = index["tokenizer"] = [None, None]
    (d / "model_index.json").write_text(json.dumps(index))
    pipe = TextToImagePipeline.from_pretrained(d)
    assert pipe.text_encoder is None
    context, pooled = pipe.encode_prompt(["a red dog"])
    want = CLIPTextModelWithProjection.from_pretrained(XL / "text_encoder_2")(
        CLIPTokenizer.from_pretrained(XL / "tokenizer_2")(["a red dog"]), output_hidden_states=True)
    close(context, to_host(want.hidden_states[-2]))
    close(pooled, to_host(want.text_embeds))
