"""SD3 and Flux pipelines vs diffusers: text to image, image to image, inpainting, LoRA, a GGUF transformer.

References in tiny-sd3-pipe/ and tiny-flux-pipe/reference.npz were written by tools/make_flow_pipeline_fixtures.py
(float32 torch): diffusers' StableDiffusion3[Img2Img|Inpaint]Pipeline and Flux[Img2Img|Inpaint]Pipeline with the
same latents, and for image to image / inpainting with their random draws taken from numpy's default_rng(seed)
in diffusers' order (the VAE's sample, then the noise), which is how spark_lab draws from `seed`. LoRA
references: diffusers' load_lora_weights (PEFT files), and the kohya/BFL Flux file fused into the original
checkpoint layout and converted by diffusers. Whole pipelines must match within 1e-3.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spark_lab.device import to_host
from spark_lab.diffusion.flow_match import FlowMatchEulerDiscreteScheduler
from spark_lab.diffusion.flux import FluxConfig, FluxTransformer2DModel
from spark_lab.diffusion.loading import Params
from spark_lab.diffusion.lora import LoRAWeights
from spark_lab.diffusion.pipeline import TextToImagePipeline, load_pipeline
from spark_lab.diffusion.pipeline_flux import FluxPipeline
from spark_lab.diffusion.pipeline_sd3 import StableDiffusion3Pipeline

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "diffusion"
SD3, FLUX = FIX / "tiny-sd3-pipe", FIX / "tiny-flux-pipe"
RS, RF = np.load(SD3 / "reference.npz"), np.load(FLUX / "reference.npz")
INIT, MASK = Image.fromarray(RS["init_image"]), Image.fromarray(RS["mask_image"])
KW = dict(output_type="np", progress=False)
SMALL = dict(height=16, width=16, max_sequence_length=16, **KW)
TWO = ["a photo of a cat", "a red dog"]


def same(img, ref, atol=1e-3):
    assert isinstance(img, np.ndarray) and img.dtype == np.float32 and img.shape == ref.shape, (type(img), img.shape)
    np.testing.assert_allclose(img, ref, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def sd3():
    return StableDiffusion3Pipeline.from_pretrained(SD3)


@pytest.fixture(scope="module")
def flux():
    return FluxPipeline.from_pretrained(FLUX)


# ----------------------------------------------------------------------------- SD3

def test_sd3_text_to_image_matches_diffusers(sd3):
    same(sd3(TWO, num_inference_steps=3, guidance_scale=5.0, latents=RS["latents"][:2], **SMALL), RS["t2i"])
    # prompt_2 / prompt_3 to the other encoders, a negative prompt, two images per prompt
    img = sd3("a photo of a cat", prompt_2="blue face", prompt_3="happy dog", negative_prompt="red",
              num_images_per_prompt=2, num_inference_steps=3, guidance_scale=4.0, latents=RS["latents"][:2], **SMALL)
    same(img, RS["t2i_neg"])
    # no guidance (one transformer row per image), diffusers' default 256 T5 tokens, 16x24
    same(sd3("smiling cat", num_inference_steps=2, guidance_scale=1.0, latents=RS["latents_rect"], height=16,
             width=24, **KW), RS["t2i_rect"])


def test_sd3_returns_pil_images_like_text_to_image(sd3):
    images = sd3("a red dog", num_inference_steps=1, height=16, width=16, max_sequence_length=4, progress=False)
    assert isinstance(images, list) and len(images) == 1 and images[0].size == (16, 16) and images[0].mode == "RGB"


def test_sd3_img2img_matches_diffusers(sd3):
    img = sd3(["a red dog", "a photo of a cat"], image=INIT, strength=0.6, num_inference_steps=4, guidance_scale=5.0,
              seed=11, **SMALL)
    same(img, RS["i2i"])


@pytest.mark.parametrize("strength, seed, key", [(0.75, 12, "inpaint"), (1.0, 13, "inpaint_full")])
def test_sd3_inpaint_matches_diffusers(sd3, strength, seed, key):
    img = sd3("a red dog", image=INIT, mask_image=MASK, strength=strength, num_inference_steps=4,
              guidance_scale=5.0, seed=seed, **SMALL)
    same(img, RS[key])


def kohya_spelling(path: Path) -> dict:
    """sd3-peft.safetensors in kohya's spelling: lora_transformer_<module with _>.lora_down / lora_up / alpha,
    lora_te1_ / lora_te2_ for the CLIP encoders (the alphas from the file's PEFT metadata)."""
    from safetensors.numpy import load_file
    out = {}
    heads = {"transformer": "lora_transformer_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    for key, a in load_file(str(path)).items():
        part, _, rest = key.partition(".")
        module, _, factor = rest.rpartition(".lora_")
        name = heads[part] + module.replace(".", "_")
        out[f"{name}.lora_{'down' if factor.startswith('A') else 'up'}.weight"] = a
        alpha = {"transformer": 1.0 if module == "context_embedder" else 4.0, "text_encoder": 2.0}.get(part, 2.0)
        out[f"{name}.alpha"] = np.asarray(alpha, np.float32)
    return out


@pytest.mark.parametrize("spelling, fuse", [("peft", True), ("peft", False), ("kohya", True)])
def test_sd3_lora_matches_diffusers_and_unloads_exactly(sd3, spelling, fuse, tmp_path):
    before = {part: dict(w) for part, w in sd3.lora_parts().items()}
    path = SD3 / "lora" / "sd3-peft.safetensors"
    if spelling == "kohya":
        from safetensors.numpy import save_file
        save_file(kohya_spelling(path), str(tmp_path / "sd3-kohya.safetensors"))
        path = tmp_path / "sd3-kohya.safetensors"
    adapter = sd3.load_lora_weights(path, scale=0.7, fuse=fuse)
    try:
        assert adapter.layers == 13 and adapter.fused is fuse
        same(sd3(TWO, num_inference_steps=3, guidance_scale=5.0, latents=RS["latents"][:2], **SMALL), RS["lora"])
        if not fuse:                           # unfused: the strength changes without reloading; 0 = no LoRA
            sd3.set_lora_scale(0.0)
            same(sd3(TWO, num_inference_steps=3, guidance_scale=5.0, latents=RS["latents"][:2], **SMALL), RS["t2i"],
                 atol=1e-5)
    finally:
        sd3.unload_lora_weights()
    for part, w in sd3.lora_parts().items():        # the very same arrays are back, nothing extra left
        assert w.keys() == before[part].keys()
        assert all(w[k] is before[part][k] for k in w)


# ----------------------------------------------------------------------------- Flux

def test_flux_text_to_image_matches_diffusers(flux):
    same(flux(TWO, num_inference_steps=3, guidance_scale=3.5, latents=RF["latents"], **SMALL), RF["t2i"])
    # diffusers' packed latents are taken too; prompt_2 to T5; 2 per prompt; 24x16; the default 512 T5 tokens
    lat = RF["latents_rect"]                                               # [2, 16, 12, 8]
    packed = lat.reshape(2, 16, 6, 2, 4, 2).transpose(0, 2, 4, 1, 3, 5).reshape(2, 24, 64)
    img = flux("a photo of a cat", prompt_2="happy dog", num_images_per_prompt=2, num_inference_steps=2,
               guidance_scale=5.0, latents=packed, height=24, width=16, **KW)
    same(img, RF["t2i_rect"])


def test_flux_true_cfg_matches_diffusers(flux):
    img = flux("a red dog", negative_prompt="blue face", true_cfg_scale=2.5, num_inference_steps=3,
               guidance_scale=3.5, latents=RF["latents"][:1], **SMALL)
    same(img, RF["t2i_true_cfg"])
    plain = flux(TWO[0], negative_prompt="blue face", num_inference_steps=3, guidance_scale=3.5,
                 latents=RF["latents"][:1], **SMALL)             # true_cfg_scale 1: the negative prompt is unused
    same(plain, RF["t2i"][:1])


def schnell(flux):
    """FLUX.1-schnell shaped: the same weights without the guidance embedder, shift 1, no dynamic shifting."""
    c = flux.transformer.config
    cfg = FluxConfig(**{k: getattr(c, k) for k in ("patch_size", "in_channels", "num_layers", "num_single_layers",
                                                   "attention_head_dim", "num_attention_heads", "joint_attention_dim",
                                                   "pooled_projection_dim", "axes_dims_rope")})
    w = {k: v for k, v in flux.transformer.params.tensors.items() if "guidance_embedder" not in k}
    return FluxPipeline(FluxTransformer2DModel(cfg, Params(w)), FlowMatchEulerDiscreteScheduler(shift=1.0),
                        flux.vae, flux.text_encoder, flux.tokenizer, flux.text_encoder_2, flux.tokenizer_2)


def test_flux_schnell_no_guidance_matches_diffusers(flux):
    same(schnell(flux)(TWO, num_inference_steps=2, latents=RF["latents"], **SMALL), RF["schnell"])


def test_flux_img2img_matches_diffusers(flux):
    img = flux(["a red dog", "a photo of a cat"], image=INIT, strength=0.6, num_inference_steps=4,
               guidance_scale=3.5, seed=21, **SMALL)
    same(img, RF["i2i"])


@pytest.mark.parametrize("strength, seed, key", [(0.75, 22, "inpaint"), (1.0, 23, "inpaint_full")])
def test_flux_inpaint_matches_diffusers(flux, strength, seed, key):
    img = flux("a red dog", image=INIT, mask_image=MASK, strength=strength, num_inference_steps=4,
               guidance_scale=3.5, seed=seed, **SMALL)
    same(img, RF[key])


def test_flux_peft_lora_matches_diffusers(flux):
    call = dict(num_inference_steps=3, guidance_scale=3.5, latents=RF["latents"], **SMALL)
    plain = flux(TWO, **call)
    adapter = flux.load_lora_weights(FLUX / "lora" / "flux-peft.safetensors")
    try:
        assert adapter.layers == 12 and adapter.fused
        same(flux(TWO, **call), RF["lora"])
    finally:
        flux.unload_lora_weights()
    same(flux(TWO, **call), plain, atol=0)                      # unloaded: the same weights, bit for bit


@pytest.mark.parametrize("name, fuse", [("flux-kohya", True), ("flux-bfl", True), ("flux-kohya", False)])
def test_flux_original_names_lora_img2img(flux, name, fuse):
    """kohya's lora_unet_double_blocks_0_img_attn_qkv... / BFL's diffusion_model.single_blocks.1.linear1...:
    fused q/k/v and linear1 split by rows, the final layer's halves swapped, alphas; plus a lora_te1_ layer."""
    adapter = flux.load_lora_weights(FLUX / "lora" / f"{name}.safetensors", scale=0.8, fuse=fuse)
    try:
        assert adapter.layers == 17 + 2 * 2 + 3 + 1            # 17 modules, 2 qkv x 3 and linear1 x 4, CLIP
        img = flux("a red dog", image=INIT, strength=0.8, num_inference_steps=3, guidance_scale=3.5, seed=24, **SMALL)
    finally:
        flux.unload_lora_weights()
    same(img, RF["lora_kohya_i2i"])


# ----------------------------------------------------------------------------- Flux from GGUF

def _gguf(tmp_path, kind: str) -> Path:
    """tiny-flux-pipe's transformer in the original layout as a GGUF (test_flux_gguf's writer)."""
    pytest.importorskip("torch")
    pytest.importorskip("gguf")
    from safetensors.torch import load_file

    from .test_flux_gguf import to_bfl, write_gguf
    path = tmp_path / f"flux-{kind}.gguf"
    bfl = to_bfl(load_file(FLUX / "transformer" / "diffusion_pytorch_model.safetensors"))
    write_gguf(path, bfl, kind, meta={"flux.rope.axes_dims": [4, 6, 6]})
    return path


def test_flux_transformer_from_gguf(tmp_path):
    path = _gguf(tmp_path, "F32")
    d = tmp_path / "no-transformer"                                 # the folder needs no transformer/ then
    shutil.copytree(FLUX, d, ignore=shutil.ignore_patterns("transformer", "lora", "reference.npz"))
    pipe = FluxPipeline.from_pretrained(d, transformer_gguf=path)
    same(pipe(TWO, num_inference_steps=3, guidance_scale=3.5, latents=RF["latents"], **SMALL), RF["t2i"])
    pipe.load_lora_weights(FLUX / "lora" / "flux-peft.safetensors")   # float weights in an F32 file: fused
    same(pipe(TWO, num_inference_steps=3, guidance_scale=3.5, latents=RF["latents"], **SMALL), RF["lora"])


def test_flux_quantized_gguf_takes_lora_at_run_time(tmp_path):
    """Q8_0 weights cannot take a fused sum: the LoRA goes unfused on its own, and comes off exactly."""
    pipe = FluxPipeline.from_pretrained(FLUX, transformer_gguf=_gguf(tmp_path, "Q8_0"))
    assert pipe.transformer.weight_formats().get("Q8_0", 0) > 20
    w = dict(pipe.transformer.params.tensors)
    call = dict(num_inference_steps=3, guidance_scale=3.5, latents=RF["latents"], **SMALL)
    plain = pipe(TWO, **call)
    same(plain, RF["t2i"], atol=3e-2)                               # int8 activations: ~1% per layer
    adapter = pipe.load_lora_weights(FLUX / "lora" / "flux-peft.safetensors")
    assert not adapter.fused
    img = pipe(TWO, **call)
    same(img, RF["lora"], atol=3e-2)
    # the LoRA's effect is the reference's effect, well within the quantization error
    assert np.abs((img - plain) - (RF["lora"] - RF["t2i"])).max() < 0.1 * np.abs(RF["lora"] - RF["t2i"]).max()
    pipe.unload_lora_weights()
    now = pipe.transformer.params.tensors
    assert now.keys() == w.keys() and all(now[k] is w[k] for k in w)
    same(pipe(TWO, **call), plain, atol=0)


# ----------------------------------------------------------------------------- loading

def test_folders_load_as_their_family(tmp_path):
    assert type(load_pipeline(SD3)) is StableDiffusion3Pipeline
    assert type(TextToImagePipeline.from_pretrained(FLUX)) is FluxPipeline
    with pytest.raises(ValueError, match="holds a FluxPipeline model, not one for StableDiffusion3Pipeline"):
        StableDiffusion3Pipeline.from_pretrained(FLUX)
    with pytest.raises(ValueError, match="holds a StableDiffusionPipeline model, not one for FluxPipeline"):
        FluxPipeline.from_pretrained(FIX / "tiny-sd")
    d = tmp_path / "img2img"                                       # the Img2Img/Inpaint folders: the same parts
    shutil.copytree(SD3, d, ignore=shutil.ignore_patterns("lora", "reference.npz"))
    index = json.loads((d / "model_index.json").read_text())
    (d / "model_index.json").write_text(json.dumps(dict(index, _class_name="StableDiffusion3Img2ImgPipeline")))
    assert type(load_pipeline(d)) is StableDiffusion3Pipeline
    with pytest.raises(ValueError, match="flow-matching models: they need the FlowMatchEulerDiscreteScheduler"):
        StableDiffusion3Pipeline.from_pretrained(SD3, scheduler="ddim")
    with pytest.raises(FileNotFoundError, match="missing transformer GGUF file"):
        FluxPipeline.from_pretrained(FLUX, transformer_gguf=tmp_path / "none.gguf")


def test_sd3_without_t5_conditions_on_zeros(tmp_path, sd3):
    """text_encoder_3 = [null, null] in model_index.json: the T5 tokens are zeros, as in diffusers."""
    d = tmp_path / "no-t5"
    shutil.copytree(SD3, d, ignore=shutil.ignore_patterns("text_encoder_3", "tokenizer_3", "lora", "reference.npz"))
    index = json.loads((d / "model_index.json").read_text())
    (d / "model_index.json").write_text(json.dumps(dict(index, text_encoder_3=[None, None], tokenizer_3=[None, None])))
    pipe = StableDiffusion3Pipeline.from_pretrained(d)
    context, pooled = pipe.encode_prompt(["a red dog"], max_sequence_length=5)
    full, full_pooled = sd3.encode_prompt(["a red dog"], max_sequence_length=5)
    context, full = to_host(context), to_host(full)
    assert context.shape == (1, 12 + 5, 32) and not context[:, 12:].any()
    np.testing.assert_array_equal(context[:, :12], full[:, :12])
    np.testing.assert_array_equal(to_host(pooled), to_host(full_pooled))
    assert not context[:, :12, 28:].any()                        # CLIP 12 + 16 wide, zero-padded to 32


# ----------------------------------------------------------------------------- bad input

def _unet_lora(path: Path):
    from safetensors.numpy import save_file
    r = np.ones((2, 16), np.float32)
    save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": r,
               "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": r.T.copy()}, str(path))
    return path


def test_bad_input_is_one_clear_line(sd3, flux, tmp_path):
    def one_line(match, fn, *a, **k):
        with pytest.raises(ValueError, match=match) as e:
            fn(*a, **k)
        assert "\n" not in str(e.value)

    small_mask = MASK.resize((8, 8))
    for pipe in (sd3, flux):
        one_line(r"mask is 8x8 but the init image is 16x16", pipe, "a", image=INIT, mask_image=small_mask, **SMALL)
        for s in (0.0, 1.5, -0.2):
            one_line(r"strength must be in \(0, 1\]", pipe, "a", image=INIT, strength=s, **SMALL)
        one_line(r"height and width must be positive multiples of 4", pipe, "a", height=18, width=16, **KW)
        one_line(r"latents \(1, 16, 8, 8\) should be \(2, 16, 8, 8\)", pipe, TWO, latents=RF["latents"][:1], **SMALL)
        one_line(r"max_sequence_length must be an integer in 1..512", pipe, "a", max_sequence_length=600, **KW)
        one_line("mask_image needs an init image", pipe, "a", mask_image=MASK, **SMALL)
        one_line(r"LoRA unet\.safetensors is for a UNet model", pipe.load_lora_weights,
                 _unet_lora(tmp_path / "unet.safetensors"))
    one_line(r"LoRA flux-kohya.safetensors is a Flux LoRA \(e.g. lora_unet_double_blocks_0_\w+\), not one for "
             r"this SD3 model", sd3.load_lora_weights, FLUX / "lora" / "flux-kohya.safetensors")
    one_line(r"LoRA flux-peft.safetensors is a Flux LoRA", sd3.load_lora_weights,
             FLUX / "lora" / "flux-peft.safetensors")
    one_line(r"LoRA sd3-peft.safetensors adapts a second CLIP text encoder .* another model family \(SD3 or SDXL\)",
             flux.load_lora_weights, SD3 / "lora" / "sd3-peft.safetensors")
    transformer_only = LoRAWeights.from_file(SD3 / "lora" / "sd3-peft.safetensors")
    transformer_only.layers = [la for la in transformer_only.layers if la.part == "transformer"]
    one_line(r"LoRA sd3-peft.safetensors does not fit this Flux model: .* likely a LoRA for another model family",
             flux.load_lora_weights, transformer_only)
    from safetensors.numpy import save_file
    t5 = tmp_path / "t5.safetensors"
    save_file({"text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight": np.ones((2, 32), np.float32),
               "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_B.weight": np.ones((32, 2), np.float32)},
              str(t5))
    one_line(r"adapts the T5 text encoder \(text_encoder_2\)", flux.load_lora_weights, t5)
    sd_scripts = tmp_path / "sd3-sd-scripts.safetensors"
    save_file({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": np.ones((2, 16), np.float32),
               "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": np.ones((48, 2), np.float32)},
              str(sd_scripts))
    one_line(r"uses sd-scripts' original SD3 names \(e.g. lora_unet_joint_blocks_0_x_block_attn_qkv\)",
             sd3.load_lora_weights, sd_scripts)
    assert not sd3.adapters and not flux.adapters
    one_line(r"prompt_embeds needs pooled_prompt_embeds too", flux, prompt_embeds=np.zeros((1, 4, 32), np.float32),
             **SMALL)
    one_line(r"negative_prompt has 1 entries for 2 prompts", sd3, TWO, negative_prompt=["x"], **SMALL)
