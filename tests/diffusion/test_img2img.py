"""Image to image and inpainting (SD and SDXL) vs diffusers, the shared helpers, the CLI and bad input.

The references in tiny-sdxl/reference.npz come from diffusers' StableDiffusion[XL]Img2Img/Inpaint
pipelines with randn_tensor drawing from numpy's default_rng(seed) in diffusers' order (the VAE's
sample, then the noise): spark_lab's pipelines seeded the same way must give the same images.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spark_lab import cli
from spark_lab.diffusion import UNet2DConditionModel
from spark_lab.diffusion import image_inputs as ii
from spark_lab.diffusion.pipeline import TextToImagePipeline

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "diffusion"
XL = FIX / "tiny-sdxl"
REF = np.load(XL / "reference.npz")
INIT, MASK = Image.fromarray(REF["init_image"]), Image.fromarray(REF["mask_image"])
KW = dict(output_type="np", progress=False)


@pytest.fixture(scope="module")
def sd():
    return TextToImagePipeline.from_pretrained(FIX / "tiny-sd")


@pytest.fixture(scope="module")
def xl():
    return TextToImagePipeline.from_pretrained(XL)


def test_sd_img2img_matches_diffusers(sd):
    img = sd(["a photo of a cat", "a red dog"], image=INIT, strength=0.7, num_inference_steps=4,
             guidance_scale=7.5, seed=21, **KW)
    assert img.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(img, REF["sd_i2i_images"], atol=1e-3)


@pytest.mark.parametrize("strength, steps, seed, ref", [(0.75, 4, 22, "sd_inpaint_images"),
                                                         (1.0, 3, 23, "sd_inpaint_full_images")])
def test_sd_inpaint_plain_unet_matches_diffusers(sd, strength, steps, seed, ref):
    prompt = "a photo of a cat" if seed == 22 else "a red dog"
    img = sd(prompt, image=INIT, mask_image=MASK, strength=strength, num_inference_steps=steps,
             guidance_scale=7.5, seed=seed, **KW)
    np.testing.assert_allclose(img, REF[ref], atol=1e-3)


def test_sdxl_img2img_and_inpaint_match_diffusers(xl):
    img = xl("a red dog", image=INIT, strength=0.6, num_inference_steps=4, guidance_scale=5.0, seed=11, **KW)
    np.testing.assert_allclose(img, REF["xl_i2i_images"], atol=1e-3)
    img = xl("a red dog", image=INIT, mask_image=MASK, strength=0.75, num_inference_steps=4, guidance_scale=5.0,
             seed=12, **KW)
    np.testing.assert_allclose(img, REF["xl_inpaint_images"], atol=1e-3)


def test_sdxl_inpainting_unet_matches_diffusers(xl):
    """A 9-channel UNet reads the mask and the masked image's latents (strength 1: from pure noise)."""
    plain = xl.unet
    xl.unet = UNet2DConditionModel.from_pretrained(XL / "unet_inpaint")
    try:
        img = xl("a red dog", image=INIT, mask_image=MASK, strength=1.0, num_inference_steps=3, guidance_scale=5.0,
                 seed=13, **KW)
        with pytest.raises(ValueError, match="inpainting UNet .9 input channels.: give image= and mask_image="):
            xl("a red dog", num_inference_steps=2, **KW)
    finally:
        xl.unet = plain
    np.testing.assert_allclose(img, REF["xl_inpaint9_images"], atol=1e-3)


def _numpy_randn(monkeypatch, seed):
    """Make diffusers draw its noise from np.random.default_rng(seed), in its own order."""
    import sys
    import torch
    import diffusers.utils.torch_utils as tu
    rng = np.random.default_rng(seed)
    original = tu.randn_tensor

    def draw(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(rng.standard_normal(tuple(shape), dtype=np.float32))

    for m in list(sys.modules.values()):
        if getattr(m, "randn_tensor", None) is original:
            monkeypatch.setattr(m, "randn_tensor", draw)


def test_sd_inpainting_unet_euler_live(sd, tmp_path, monkeypatch):
    """SD's 9-channel inpainting UNet and the Euler scheduler, diffusers built and run in the test."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=9, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4).eval()
    unet.save_pretrained(tmp_path / "unet")
    base = diffusers.StableDiffusionPipeline.from_pretrained(FIX / "tiny-sd", safety_checker=None,
                                                             requires_safety_checker=False)
    sched = diffusers.EulerDiscreteScheduler.from_config(base.scheduler.config)
    ref = diffusers.StableDiffusionInpaintPipeline(**dict(base.components, unet=unet, scheduler=sched))
    ref.set_progress_bar_config(disable=True)
    kw = dict(strength=0.8, num_inference_steps=4, guidance_scale=6.0)
    _numpy_randn(monkeypatch, 5)
    want = ref("a cat", image=INIT, mask_image=MASK, height=16, width=16, output_type="np", **kw).images
    plain, plain_sched = sd.unet, sd.scheduler
    sd.unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    sd.set_scheduler("euler")
    try:
        got = sd("a cat", image=INIT, mask_image=MASK, seed=5, **kw, **KW)
    finally:
        sd.unet, sd.scheduler = plain, plain_sched
    np.testing.assert_allclose(got, want, atol=1e-3)


def test_image_and_mask_preprocessing_match_diffusers():
    """prepare_image / prepare_mask against diffusers' VaeImageProcessor, a PIL resize included."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from diffusers.image_processor import VaeImageProcessor
    images = VaeImageProcessor(vae_scale_factor=2)
    masks = VaeImageProcessor(vae_scale_factor=2, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    big = INIT.resize((19, 18))                                  # not a multiple of 2: resized (Lanczos)
    rgb_mask = Image.fromarray(np.stack([REF["mask_image"], REF["mask_image"] // 2, REF["mask_image"]], -1))
    np.testing.assert_allclose(ii.prepare_image(INIT, 2), images.preprocess(INIT).numpy(), atol=1e-6)
    np.testing.assert_allclose(ii.prepare_image(big, 2), images.preprocess(big).numpy(), atol=1e-6)
    np.testing.assert_allclose(ii.prepare_image(INIT, 2, 8, 12), images.preprocess(INIT, 8, 12).numpy(), atol=1e-6)
    for m in (MASK, rgb_mask):
        pixel, latent = ii.prepare_mask(m, (16, 16), 2)
        want = masks.preprocess(m, 16, 16)
        np.testing.assert_array_equal(pixel, want.numpy())
        np.testing.assert_array_equal(latent, torch_interpolate(want, (8, 8)))
    big_mask = MASK.resize((19, 18))
    pixel, _ = ii.prepare_mask(big_mask, (18, 18), 2, image_size=(18, 19))
    np.testing.assert_array_equal(pixel, masks.preprocess(big_mask, 18, 18).numpy())


def torch_interpolate(x, size):
    import torch
    return torch.nn.functional.interpolate(x, size=size).numpy()


@pytest.mark.parametrize("kind", ["ddim", "euler", "flow"])
def test_noise_to_matches_diffusers_add_noise(kind):
    """The one noising rule every family shares, at the first kept step and at a later one."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from spark_lab.diffusion import schedulers as S
    cfg = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
               timestep_spacing="leading")
    ours, ref = {"ddim": (S.DDIMScheduler, diffusers.DDIMScheduler),
                 "euler": (S.EulerDiscreteScheduler, diffusers.EulerDiscreteScheduler),
                 "flow": (S.FlowMatchEulerDiscreteScheduler, diffusers.FlowMatchEulerDiscreteScheduler)}[kind]
    ours = ours.from_config({} if kind == "flow" else cfg)
    ref = ref.from_config({"shift": 1.0} if kind == "flow" else cfg)
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    timesteps, start = ii.strength_timesteps(ours, 10, 0.55)
    assert start == 5 and len(timesteps) == 5
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((2, 2, 4, 4), dtype=np.float32), rng.standard_normal((2, 2, 4, 4), dtype=np.float32)
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(start)
    t = ref.timesteps[start:start + 1]
    x0_t, noise_t = torch.from_numpy(x0), torch.from_numpy(noise)
    want = ref.scale_noise(x0_t, t, noise_t) if kind == "flow" else ref.add_noise(x0_t, noise_t, t)
    np.testing.assert_allclose(ii.noise_to(ours, x0, noise, start), want.numpy(), rtol=1e-5, atol=1e-5)


class OnesEncoder:
    """A stand-in for the MiniLM sentence encoder (the loop only needs encode(list) -> [n, 384])."""

    def encode(self, texts):
        return np.full((len(texts), 384), 384 ** -0.5, np.float32)


def test_pixel_space_img2img_keeps_the_image_at_low_strength():
    """No VAE (spark-emoji's layout): the init image is the starting point itself."""
    pipe = TextToImagePipeline.from_pretrained(FIX / "tiny-pixel", scheduler="ddim")
    pipe._sentence_encoder = OnesEncoder()
    img = np.asarray(INIT.resize((8, 8)), np.float32) / 255.0
    low = pipe("x", image=img, strength=0.1, num_inference_steps=10, seed=0, **KW)[0]
    high = pipe("x", image=img, strength=1.0, num_inference_steps=10, seed=0, **KW)[0]
    assert np.abs(low - img).mean() < 0.5 * np.abs(high - img).mean()


@pytest.mark.parametrize("kw, msg", [
    (dict(image=INIT, strength=0.0), r"strength must be in \(0, 1\], got 0.0"),
    (dict(image=INIT, strength=1.5), r"strength must be in \(0, 1\], got 1.5"),
    (dict(mask_image=MASK), "mask_image needs an init image"),
    (dict(strength=0.5), "strength needs an init image"),
    (dict(image=INIT, mask_image=MASK.resize((16, 12))), "mask is 16x12 but the init image is 16x16"),
    (dict(image=INIT, strength=0.2, num_inference_steps=4), "leaves no step to run"),
    (dict(image=np.zeros((15, 16, 3), np.uint8)), "give a PIL image .resized for you. or an array 16x14"),
    (dict(image=np.full((16, 16, 3), 2.0, np.float32)), r"floats outside \[0, 1\]"),
    (dict(image=INIT, latents=np.zeros((1, 4, 8, 8), np.float32)), "latents= replaces the initial noise"),
])
def test_bad_input_is_one_clear_error(sd, kw, msg):
    kw = dict(dict(num_inference_steps=2), **kw)
    with pytest.raises(ValueError, match=msg):
        sd("a cat", progress=False, **kw)


# ----------------------------------------------------------------------------- CLI

def run(*argv):
    return cli.main(["imagine", *map(str, argv)])


def test_cli_img2img_and_inpaint(tmp_path, capsys, sd):
    INIT.save(tmp_path / "init.png")
    MASK.save(tmp_path / "mask.png")
    out = tmp_path / "a.png"
    assert run("a red dog", "--model", FIX / "tiny-sd", "--steps", 4, "--seed", 21, "--init", tmp_path / "init.png",
               "--strength", 0.7, "--out", out) == 0
    assert "image to image at strength 0.7" in capsys.readouterr().out
    want = sd("a red dog", image=INIT, strength=0.7, num_inference_steps=4, seed=21, output_type="pil", progress=False)
    assert Image.open(out).resize((16, 16), Image.NEAREST).tobytes() == want[0].tobytes()
    assert run("a red dog", "--model", FIX / "tiny-sd", "--steps", 3, "--init", tmp_path / "init.png",
               "--mask", tmp_path / "mask.png", "--out", out) == 0
    assert "inpainting" in capsys.readouterr().out


@pytest.mark.parametrize("argv, msg", [
    (("--mask", "{mask}"), "--mask needs --init"),
    (("--init", "{init}", "--strength", 1.5), r"--strength must be in (0, 1], got 1.5"),
    (("--init", "{init}", "--strength", 0), r"--strength must be in (0, 1], got 0.0"),
    (("--strength", 0.5), "--strength needs --init"),
    (("--init", "{init}", "--mask", "{small}"), "--mask is 8x8 but --init is 16x16: they must be the same size"),
    (("--init", "{tmp}/nope.png"), "--init"),
])
def test_cli_bad_image_options_are_one_line(tmp_path, capsys, argv, msg):
    INIT.save(tmp_path / "init.png")
    MASK.save(tmp_path / "mask.png")
    MASK.resize((8, 8)).save(tmp_path / "small.png")
    names = dict(init=tmp_path / "init.png", mask=tmp_path / "mask.png", small=tmp_path / "small.png", tmp=tmp_path)
    argv = [str(a).format(**names) for a in argv]
    assert run("a cat", "--model", FIX / "tiny-sd", "--steps", 1, "--out", tmp_path / "x.png", *argv) == 1
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def test_sdxl_folder_layout_json_is_diffusers():
    index = json.loads((XL / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    for part in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae", "scheduler"):
        assert (XL / part).is_dir() and index[part][0] is not None


def test_img2img_folder_class_names_load_as_their_family(tmp_path):
    for name, family in [("StableDiffusionInpaintPipeline", "TextToImagePipeline"),
                         ("StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLPipeline")]:
        src = FIX / "tiny-sd" if family == "TextToImagePipeline" else XL
        d = tmp_path / name
        shutil.copytree(src, d, ignore=shutil.ignore_patterns("unet_inpaint", "lora", "reference.npz"))
        index = json.loads((d / "model_index.json").read_text())
        (d / "model_index.json").write_text(json.dumps(dict(index, _class_name=name)))
        assert type(TextToImagePipeline.from_pretrained(d)).__name__ == family


def test_sdxl_refiner_aesthetic_score_ids_live(tmp_path, monkeypatch):
    """A refiner-style UNet (5 time ids: original size, crop, aesthetic score) in SDXL img2img, vs diffusers
    with requires_aesthetics_score=True."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    d = tmp_path / "refiner"
    shutil.copytree(XL, d, ignore=shutil.ignore_patterns("unet_inpaint", "lora", "reference.npz"))
    cfg = json.loads((d / "unet" / "config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    torch.manual_seed(3)
    unet = diffusers.UNet2DConditionModel(**dict(cfg, projection_class_embeddings_input_dim=5 * 8 + 16)).eval()
    shutil.rmtree(d / "unet")
    unet.save_pretrained(d / "unet")
    base = diffusers.StableDiffusionXLPipeline.from_pretrained(d, add_watermarker=False)
    ref = diffusers.StableDiffusionXLImg2ImgPipeline(**base.components, requires_aesthetics_score=True,
                                                      add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    kw = dict(strength=0.7, num_inference_steps=4, guidance_scale=5.0, aesthetic_score=7.0,
              negative_aesthetic_score=2.0, negative_prompt="blue")
    _numpy_randn(monkeypatch, 9)
    want = ref("a red dog", image=INIT, output_type="np", **kw).images
    pipe = TextToImagePipeline.from_pretrained(d)
    assert pipe.num_time_ids == 5
    got = pipe("a red dog", image=INIT, seed=9, **kw, **KW)
    np.testing.assert_allclose(got, want, atol=1e-3)
