"""Build tests/fixtures/diffusion/tiny-sdxl/: a tiny random SDXL, test LoRAs and diffusers' outputs.

Dev-only (needs torch, diffusers, transformers; spark_lab never imports this). Writes:

    tiny-sdxl/                  a StableDiffusionXLPipeline folder (save_pretrained): unet/ (text_time
                                added conditioning, transformer_layers_per_block (1, 2), linear projections),
                                vae/, text_encoder/ (CLIPTextModel, 12 wide), text_encoder_2/
                                (CLIPTextModelWithProjection, 20 wide, projection 16), tokenizer/,
                                tokenizer_2/ (pad "!"), scheduler/ (Euler, leading), model_index.json
    tiny-sdxl/unet_inpaint/     a 9-channel SDXL inpainting UNet (same shape otherwise)
    tiny-sdxl/lora/             LoRA files written by hand (no peft here): sd-peft (PEFT lora_A/lora_B keys +
                                diffusers' lora_adapter_metadata), sd-kohya (lora_unet_/lora_te_ + .alpha),
                                sdxl-kohya (SGM block names input_blocks_4_1_..., lora_te1_/lora_te2_),
                                sdxl-diffusers (unet./text_encoder_2. with .lora.down/.lora.up + .alpha)
    tiny-sdxl/reference.npz     inputs and diffusers/transformers outputs

References for LoRAs: without peft, diffusers' load_lora_weights cannot run, so each LoRA is fused by
hand into a copy of the torch modules (W += scale * alpha / r * up @ down) at the module names that
diffusers' own kohya converter (_convert_non_diffusers_lora_to_diffusers, _maybe_map_sgm_blocks_to_diffusers)
gives, and diffusers' pipelines run on those. Random draws (the VAE's sample, the img2img noise) are
taken from numpy's default_rng(seed) in diffusers' order (randn_tensor patched), which is how the
spark_lab pipelines draw them.

    python tools/make_sdxl_fixtures.py [--out tests/fixtures/diffusion]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_diffusion_fixtures import write_tiny_clip_tokenizer  # noqa: E402

L = 12          # tokenizer max length = CLIP positions


# ----------------------------------------------------------------------------- models

def build_sdxl(out: Path, tmp: Path):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    unet_kw = dict(block_out_channels=(4, 8), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                   use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                   transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=64,  # 6 * 8 + 16
                   cross_attention_dim=32, norm_num_groups=2)
    unet = UNet2DConditionModel(**unet_kw).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=4, layers_per_block=1, sample_size=16, scaling_factor=0.13025).eval()
    write_tiny_clip_tokenizer(tmp / "tok", L)
    tok = CLIPTokenizer.from_pretrained(str(tmp / "tok"))
    tok2 = CLIPTokenizer.from_pretrained(str(tmp / "tok"), pad_token="!")
    base = dict(bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id, vocab_size=len(tok),
                max_position_embeddings=L, layer_norm_eps=1e-5, hidden_act="gelu", num_hidden_layers=3,
                num_attention_heads=2)
    te = CLIPTextModel(CLIPTextConfig(**base, eos_token_id=tok.eos_token_id, hidden_size=12,
                                      intermediate_size=16)).eval()
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**base, eos_token_id=2, hidden_size=20, intermediate_size=24,
                                                     projection_dim=16)).eval()    # eos 2: the legacy argmax pooling
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1, beta_schedule="scaled_linear",
                                   timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2,
                                     unet=unet, scheduler=sched, add_watermarker=False)
    pipe.save_pretrained(str(out))
    for sub in ("tokenizer", "tokenizer_2"):              # the files SDXL repos ship, next to tokenizer.json
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(tmp / "tok" / name, out / sub / name)
    torch.manual_seed(1)
    inpaint = UNet2DConditionModel(**dict(unet_kw, in_channels=9)).eval()
    inpaint.save_pretrained(str(out / "unet_inpaint"))
    pipe.set_progress_bar_config(disable=True)
    return pipe, inpaint


def image_inputs(seed: int, size=(16, 16)):
    """A random RGB init image and a mask (a white rectangle: repaint) as uint8 arrays."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, size + (3,), dtype=np.uint8)
    mask = np.zeros(size, np.uint8)
    mask[3:11, 5:14] = 255
    mask[0, 0] = 200                                       # a gray pixel above the 0.5 threshold
    return img, mask


@contextlib.contextmanager
def numpy_randn(seed: int):
    """diffusers' randn_tensor -> draws from np.random.default_rng(seed), in call order."""
    import diffusers.utils.torch_utils as tu

    rng = np.random.default_rng(seed)
    original = tu.randn_tensor

    def draw(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(rng.standard_normal(tuple(shape), dtype=np.float32))

    patched = [m for m in list(sys.modules.values()) if getattr(m, "randn_tensor", None) is original]
    for m in patched:
        m.randn_tensor = draw
    try:
        yield
    finally:
        for m in patched:
            m.randn_tensor = original


# ----------------------------------------------------------------------------- LoRA files

def factors(rng, out_in: tuple, r: int, conv_k: int | None = None, conv_out1x1: bool = False):
    """Random (down, up) with visible effect: [r, in(, k, k)] and [out, r(, 1, 1)]."""
    o, i = out_in
    if conv_k is not None:
        down = rng.standard_normal((r, i, conv_k, conv_k)).astype(np.float32) * 0.3
        up = rng.standard_normal((o, r, 1, 1)).astype(np.float32) * 0.3
    else:
        down = rng.standard_normal((r, i)).astype(np.float32) * 0.3
        up = rng.standard_normal((o, r)).astype(np.float32) * 0.3
    return down, up


def get_module(model, name):
    """model.<name>; transformers 5's CLIPTextModel has no text_model level (its saved keys still do)."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return model.get_submodule(name.removeprefix("text_model."))


def module_shape(model, name):
    return tuple(get_module(model, name).weight.shape)


def make_layer(rng, model, name, r):
    """Factors that fit model.<name> (linear, 1x1 conv or k x k conv)."""
    shape = module_shape(model, name)
    if len(shape) == 4:
        return factors(rng, shape[:2], r, conv_k=shape[2])
    return factors(rng, shape, r)


def write_safetensors(path: Path, tensors: dict, metadata: dict | None = None):
    from safetensors.numpy import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=metadata)


def sd_peft_lora(sd, rng):
    """PEFT spelling for tiny-sd: unet.<module>.lora_A/.lora_B, alphas in diffusers' metadata."""
    unet_mods = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                 "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
                 "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
                 "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
                 "down_blocks.0.attentions.0.proj_in",                  # 1x1 conv
                 "up_blocks.1.resnets.0.conv1",                         # 3x3 conv
                 "down_blocks.1.resnets.0.time_emb_proj",
                 "conv_in"]
    te_mods = ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.mlp.fc1"]
    tensors, fuse = {}, []
    for name in unet_mods:
        d, u = make_layer(rng, sd.unet, name, 2)
        tensors[f"unet.{name}.lora_A.weight"], tensors[f"unet.{name}.lora_B.weight"] = d, u
        alpha = 1.0 if name.endswith("to_k") else 3.0
        fuse.append(("unet", name, d, u, alpha / 2))
    for name in te_mods:
        d, u = make_layer(rng, sd.text_encoder, name, 4)
        tensors[f"text_encoder.{name}.lora_A.weight"], tensors[f"text_encoder.{name}.lora_B.weight"] = d, u
        fuse.append(("text_encoder", name, d, u, 2.0 / 4))
    meta = {"unet.r": 2, "unet.lora_alpha": 3, "unet.alpha_pattern": {"to_k": 1.0}, "unet.use_rslora": False,
            "text_encoder.r": 4, "text_encoder.lora_alpha": 2}
    return tensors, {"format": "pt", "lora_adapter_metadata": json.dumps(meta)}, fuse


def kohya_reference_names(tensors: dict, unet_config):
    """kohya keys -> diffusers module names, by diffusers' own converter (SGM block names included)."""
    from diffusers.loaders.lora_conversion_utils import (_convert_non_diffusers_lora_to_diffusers,
                                                         _maybe_map_sgm_blocks_to_diffusers)

    sd = {k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}
    sd = _maybe_map_sgm_blocks_to_diffusers(sd, unet_config)
    converted, _ = _convert_non_diffusers_lora_to_diffusers(sd)
    out = {}
    for key, v in converted.items():
        if ".down." not in key and "lora_linear_layer.down" not in key:
            continue
        name = key.replace(".processor.", ".")
        for suffix in (".lora.down.weight", "_lora.down.weight", ".lora_linear_layer.down.weight"):
            if name.endswith(suffix):
                name = name[:-len(suffix)]
                break
        part, _, module = name.partition(".")
        if part.startswith("text_encoder"):               # diffusers' CLIP attention-processor names
            for a, b in (("to_q", "q_proj"), ("to_k", "k_proj"), ("to_v", "v_proj"), ("to_out", "out_proj")):
                if module.endswith("self_attn." + a):
                    module = module[:-len(a)] + b
        elif module.endswith("to_out"):                    # the UNet's to_out_lora is to_out.0
            module += ".0"
        out[v.numpy().tobytes()] = (part, module)          # matched back by the down factor's bytes
    return out


def kohya_lora(tensors_spec, models, rng):
    """[(kohya name, part, the diffusers module it should adapt, rank, alpha or None)] -> (file tensors,
    fuse list); diffusers' converter must name the same modules."""
    tensors, plan = {}, []
    for kname, part, module, r, alpha in tensors_spec:
        d, u = make_layer(rng, models[part], module, r)
        tensors[f"{kname}.lora_down.weight"], tensors[f"{kname}.lora_up.weight"] = d, u
        if alpha is not None:
            tensors[f"{kname}.alpha"] = np.asarray(alpha, np.float32)
        plan.append((part, module, d, u, (alpha if alpha is not None else r) / r))
    names = kohya_reference_names(tensors, models["unet"].config)
    for part, module, d, u, f in plan:
        got = names[d.tobytes()]
        assert got == (part, module), (got, part, module)
    return tensors, plan


def fused_copy(pipe, fuse, scale, parts=("unet", "text_encoder", "text_encoder_2")):
    """A shallow pipeline copy whose adapted modules are deep copies with W += scale * f * up @ down."""
    p2 = copy.copy(pipe)
    for part in parts:
        if getattr(pipe, part, None) is not None:
            setattr(p2, part, copy.deepcopy(getattr(pipe, part)))
    with torch.no_grad():
        for part, module, d, u, f in fuse:
            w = get_module(getattr(p2, part), module).weight
            delta = (torch.from_numpy(u).reshape(u.shape[0], -1) @ torch.from_numpy(d).reshape(d.shape[0], -1))
            w += scale * f * delta.reshape(w.shape)
    # the copy's components dict must point at the new modules
    p2.register_modules(**{k: getattr(p2, k) for k in parts if getattr(pipe, k, None) is not None})
    return p2


# ----------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="tests/fixtures/diffusion")
    args = ap.parse_args()
    root = Path(args.out)
    out = root / "tiny-sdxl"
    if out.exists():
        shutil.rmtree(out)
    tmp = root / "tmp-sdxl"
    from diffusers import (StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline,
                           StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline)

    xl, unet9 = build_sdxl(out, tmp)
    shutil.rmtree(tmp)
    ref = {}
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        # ---- the UNet with added conditioning, both text encoders
        x = torch.randn(2, 4, 8, 8, generator=g)
        ehs = torch.randn(2, 5, 32, generator=g)
        te = torch.randn(2, 16, generator=g)
        ids = torch.tensor([[16.0, 16, 0, 0, 16, 16], [32, 24, 4, 2, 16, 16]])
        ref.update(unet_in=x.numpy(), unet_ehs=ehs.numpy(), unet_text_embeds=te.numpy(), unet_time_ids=ids.numpy(),
                   unet_out=xl.unet(x, torch.tensor([999, 3]), encoder_hidden_states=ehs,
                                    added_cond_kwargs={"text_embeds": te, "time_ids": ids}).sample.numpy())
        x9 = torch.randn(1, 9, 8, 8, generator=g)
        ref.update(unet9_in=x9.numpy(), unet9_out=unet9(x9, 500, encoder_hidden_states=ehs[:1], added_cond_kwargs={
            "text_embeds": te[:1], "time_ids": ids[:1]}).sample.numpy())
        prompts = ["a photo of a cat", "Happy  DOG, smiling face!", ""]
        for k, (tok, enc) in {"te1": (xl.tokenizer, xl.text_encoder), "te2": (xl.tokenizer_2, xl.text_encoder_2)}.items():
            t = tok(prompts, padding="max_length", max_length=L, truncation=True, return_tensors="pt").input_ids
            o = enc(t, output_hidden_states=True)
            ref[f"{k}_ids"] = t.numpy()
            ref[f"{k}_hidden"] = o.last_hidden_state.numpy()
            ref[f"{k}_penultimate"] = o.hidden_states[-2].numpy()
            ref[f"{k}_first"] = o.hidden_states[0].numpy()
            ref[f"{k}_pooled"] = (o.text_embeds if k == "te2" else o.pooler_output).numpy()

        # ---- SDXL text to image: zeros as the unconditional half; then a negative prompt and size ids
        lat = torch.randn(2, 4, 8, 8, generator=g)
        ref["xl_latents"] = lat.numpy()
        ref["xl_images"] = xl(["a photo of a cat", "a red dog"], num_inference_steps=3, guidance_scale=5.0,
                              latents=lat.clone(), output_type="np").images
        xl.register_to_config(force_zeros_for_empty_prompt=False)
        ref["xl_neg_images"] = xl("a photo of a cat", negative_prompt="blue", num_inference_steps=3,
                                  guidance_scale=4.0, latents=lat[:1].clone(), output_type="np",
                                  original_size=(32, 24), crops_coords_top_left=(2, 4), target_size=(16, 16)).images
        xl.register_to_config(force_zeros_for_empty_prompt=True)

        # ---- image to image and inpainting, SDXL (Euler) and SD (DDIM)
        img, mask = image_inputs(7)
        ref["init_image"], ref["mask_image"] = img, mask
        from PIL import Image
        pil, pmask = Image.fromarray(img), Image.fromarray(mask)
        xl_i2i = StableDiffusionXLImg2ImgPipeline(**xl.components, requires_aesthetics_score=False, add_watermarker=False)
        xl_inp = StableDiffusionXLInpaintPipeline(**xl.components, requires_aesthetics_score=False, add_watermarker=False)
        for p in (xl_i2i, xl_inp):
            p.set_progress_bar_config(disable=True)
        with numpy_randn(11):
            ref["xl_i2i_images"] = xl_i2i("a red dog", image=pil, strength=0.6, num_inference_steps=4,
                                          guidance_scale=5.0, output_type="np").images
        with numpy_randn(12):
            ref["xl_inpaint_images"] = xl_inp("a red dog", image=pil, mask_image=pmask, strength=0.75, height=16,
                                              width=16, num_inference_steps=4, guidance_scale=5.0,
                                              output_type="np").images
        comps9 = dict(xl.components, unet=unet9)
        xl_inp9 = StableDiffusionXLInpaintPipeline(**comps9, requires_aesthetics_score=False, add_watermarker=False)
        xl_inp9.set_progress_bar_config(disable=True)
        with numpy_randn(13):
            ref["xl_inpaint9_images"] = xl_inp9("a red dog", image=pil, mask_image=pmask, strength=1.0, height=16,
                                                width=16, num_inference_steps=3, guidance_scale=5.0,
                                                output_type="np").images

        sd = StableDiffusionPipeline.from_pretrained(str(root / "tiny-sd"), safety_checker=None,
                                                     requires_safety_checker=False)
        sd_i2i = StableDiffusionImg2ImgPipeline(**sd.components)
        sd_inp = StableDiffusionInpaintPipeline(**sd.components)
        for p in (sd, sd_i2i, sd_inp):
            p.set_progress_bar_config(disable=True)
        with numpy_randn(21):
            ref["sd_i2i_images"] = sd_i2i(["a photo of a cat", "a red dog"], image=pil, strength=0.7,
                                          num_inference_steps=4, guidance_scale=7.5, output_type="np").images
        with numpy_randn(22):
            ref["sd_inpaint_images"] = sd_inp("a photo of a cat", image=pil, mask_image=pmask, strength=0.75,
                                              height=16, width=16, num_inference_steps=4, guidance_scale=7.5,
                                              output_type="np").images
        with numpy_randn(23):
            ref["sd_inpaint_full_images"] = sd_inp("a red dog", image=pil, mask_image=pmask, strength=1.0,
                                                   height=16, width=16, num_inference_steps=3, guidance_scale=7.5,
                                                   output_type="np").images

        # ---- LoRAs: files by hand, references fused by hand into copies of the torch modules
        rng = np.random.default_rng(3)
        lora_dir = out / "lora"
        tensors, meta, fuse = sd_peft_lora(sd, rng)
        write_safetensors(lora_dir / "sd-peft.safetensors", tensors, meta)
        with numpy_randn(31):
            ref["lora_sd_peft_i2i_images"] = fused_copy(sd_i2i, fuse, 0.8)(
                "a photo of a cat", image=pil, strength=0.8, num_inference_steps=3, guidance_scale=7.5,
                output_type="np").images
        sd_models = {"unet": sd.unet, "text_encoder": sd.text_encoder}
        spec = [("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v", "unet",
                 "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v", 2, 1.0),
                ("lora_unet_up_blocks_1_attentions_0_proj_out", "unet", "up_blocks.1.attentions.0.proj_out", 2, 4.0),
                ("lora_unet_mid_block_resnets_1_conv2", "unet", "mid_block.resnets.1.conv2", 3, 1.5),
                ("lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_2", "unet",
                 "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2", 2, None),
                ("lora_te_text_model_encoder_layers_1_self_attn_out_proj", "text_encoder",
                 "text_model.encoder.layers.1.self_attn.out_proj", 2, 2.0)]
        tensors, fuse = kohya_lora(spec, sd_models, rng)
        write_safetensors(lora_dir / "sd-kohya.safetensors", tensors)
        with numpy_randn(32):
            ref["lora_sd_kohya_inpaint_images"] = fused_copy(sd_inp, fuse, 1.0)(
                "a red dog", image=pil, mask_image=pmask, strength=0.75, height=16, width=16,
                num_inference_steps=3, guidance_scale=7.5, output_type="np").images

        xl_models = {"unet": xl.unet, "text_encoder": xl.text_encoder, "text_encoder_2": xl.text_encoder_2}
        spec = [("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "unet",
                 "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 2, 1.0),
                ("lora_unet_input_blocks_5_1_proj_in", "unet", "down_blocks.1.attentions.1.proj_in", 2, 2.0),
                ("lora_unet_input_blocks_1_0_in_layers_2", "unet", "down_blocks.0.resnets.0.conv1", 2, 2.0),
                ("lora_unet_input_blocks_1_0_emb_layers_1", "unet", "down_blocks.0.resnets.0.time_emb_proj", 2, 2.0),
                ("lora_unet_input_blocks_3_0_op", "unet", "down_blocks.0.downsamplers.0.conv", 2, 2.0),
                ("lora_unet_middle_block_1_transformer_blocks_1_attn2_to_k", "unet",
                 "mid_block.attentions.0.transformer_blocks.1.attn2.to_k", 2, 1.0),
                ("lora_unet_middle_block_2_out_layers_3", "unet", "mid_block.resnets.1.conv2", 2, 2.0),
                ("lora_unet_output_blocks_0_1_transformer_blocks_0_ff_net_2", "unet",
                 "up_blocks.0.attentions.0.transformer_blocks.0.ff.net.2", 2, 2.0),
                ("lora_unet_output_blocks_2_2_conv", "unet", "up_blocks.0.upsamplers.0.conv", 2, 2.0),
                ("lora_unet_output_blocks_4_0_skip_connection", "unet", "up_blocks.1.resnets.1.conv_shortcut", 2, 2.0),
                ("lora_unet_label_emb_0_0", "unet", "add_embedding.linear_1", 2, 2.0),
                ("lora_unet_time_embed_2", "unet", "time_embedding.linear_2", 2, 2.0),
                ("lora_te1_text_model_encoder_layers_1_self_attn_q_proj", "text_encoder",
                 "text_model.encoder.layers.1.self_attn.q_proj", 2, 2.0),
                ("lora_te2_text_model_encoder_layers_0_mlp_fc1", "text_encoder_2",
                 "text_model.encoder.layers.0.mlp.fc1", 4, 4.0),
                ("lora_te2_text_model_encoder_layers_1_self_attn_v_proj", "text_encoder_2",
                 "text_model.encoder.layers.1.self_attn.v_proj", 2, 1.0)]
        tensors, fuse = kohya_lora(spec, xl_models, rng)
        write_safetensors(lora_dir / "sdxl-kohya.safetensors", tensors)
        ref["lora_xl_kohya_images"] = fused_copy(xl, fuse, 0.7)(
            ["a photo of a cat", "a red dog"], num_inference_steps=3, guidance_scale=5.0, latents=lat.clone(),
            output_type="np").images

        # diffusers' older spelling: unet.<module>.lora.down/up + <module>.alpha, attn processors, te2 only
        tensors, fuse = {}, []
        for part, name, key, r, alpha in [
                ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v",
                 "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_v_lora", 2, 1.0),
                ("unet", "up_blocks.0.attentions.1.transformer_blocks.1.attn1.to_out.0",
                 "unet.up_blocks.0.attentions.1.transformer_blocks.1.attn1.processor.to_out_lora", 2, None),
                ("unet", "up_blocks.0.attentions.2.proj_out", "unet.up_blocks.0.attentions.2.proj_out.lora", 4, 2.0),
                ("text_encoder_2", "text_model.encoder.layers.2.self_attn.k_proj",
                 "text_encoder_2.text_model.encoder.layers.2.self_attn.to_k_lora", 2, 1.0),
                ("text_encoder_2", "text_model.encoder.layers.2.mlp.fc2",
                 "text_encoder_2.text_model.encoder.layers.2.mlp.fc2.lora_linear_layer", 2, 1.0)]:
            d, u = make_layer(rng, xl_models[part], name, r)
            tensors[f"{key}.down.weight"], tensors[f"{key}.up.weight"] = d, u
            if alpha is not None:                           # "<module>.alpha", or "...to_k_lora.alpha"
                base = key.replace(".lora_linear_layer", "").replace(".lora", "")
                tensors[f"{base}.alpha"] = np.asarray(alpha, np.float32)
            fuse.append((part, name, d, u, (alpha if alpha is not None else r) / r))
        write_safetensors(lora_dir / "sdxl-diffusers.safetensors", tensors)
        with numpy_randn(41):
            ref["lora_xl_diffusers_inpaint_images"] = fused_copy(xl_inp, fuse, 1.0)(
                "a red dog", image=pil, mask_image=pmask, strength=0.75, height=16, width=16, num_inference_steps=3,
                guidance_scale=5.0, output_type="np").images

    np.savez_compressed(out / "reference.npz", **{k: np.asarray(v) for k, v in ref.items()})
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
