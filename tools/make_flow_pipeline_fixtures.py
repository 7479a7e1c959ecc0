"""Build tests/fixtures/diffusion/tiny-sd3-pipe/ and tiny-flux-pipe/: whole tiny SD3 and Flux pipelines,
LoRA files for them, and diffusers' images.

Dev-only (needs torch, diffusers, transformers, and peft for diffusers' load_lora_weights; spark_lab never
imports this). peft need not be in the venv: `pip install --no-deps --target /tmp/peftlib peft accelerate`,
then run with PYTHONPATH=/tmp/peftlib. Writes, with save_pretrained:

    tiny-sd3-pipe/     a StableDiffusion3Pipeline folder: transformer/ (tiny-sd3's: patch 2, 2 joint blocks,
                       width 16, joint_attention_dim 32, pooled 32), vae/ (tiny-sd3's, 16 channels, shift_factor),
                       text_encoder/ + text_encoder_2/ (CLIPTextModelWithProjection, 12 and 16 wide, both
                       projecting to 16: pooled 16 + 16 = 32; hidden 12 + 16 = 28 zero-padded to T5's 32),
                       text_encoder_3/ + tokenizer_3/ (tiny-t5's T5), tokenizer/, tokenizer_2/ (pad "!"),
                       scheduler/ (FlowMatchEuler, shift 3.0)
    tiny-sd3-pipe/lora/sd3-peft.safetensors
                       PEFT spelling (transformer. / text_encoder. / text_encoder_2. + lora_A/lora_B), alphas in
                       diffusers' lora_adapter_metadata (one alpha_pattern entry)
    tiny-flux-pipe/    a FluxPipeline folder: transformer/ (FLUX.1-dev shaped: guidance embedding, in_channels 64
                       = 16 latent channels packed 2x2, 1 double + 2 single blocks, 2 heads of 16, RoPE axes
                       (4, 6, 6)), vae/ (tiny-sd3's weights with Flux's scaling/shift factors), text_encoder/
                       (CLIPTextModel, 32 wide = pooled_projection_dim), text_encoder_2/ + tokenizer_2/
                       (tiny-t5's T5), tokenizer/, scheduler/ (FLUX.1-dev's: dynamic shifting)
                       (FLUX.1-schnell: the references run transformer/'s weights without the guidance embedder
                       under FlowMatchEulerDiscreteScheduler(shift=1.0), no dynamic shifting; the test does the same)
    tiny-flux-pipe/lora/flux-peft.safetensors     PEFT spelling, transformer. + text_encoder.
    tiny-flux-pipe/lora/flux-kohya.safetensors    kohya / sd-scripts spelling of the original (BFL) Flux names:
                       lora_unet_double_blocks_0_img_attn_qkv, single_blocks_1_linear1, final_layer_adaLN_modulation_1,
                       img_in, time_in, guidance_in, ... with .alpha, and lora_te1_ for the CLIP encoder
    tiny-flux-pipe/lora/flux-bfl.safetensors      the same layers in BFL's dotted spelling
                       (diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight, .alpha)
    reference.npz      (in each folder) inputs and diffusers' images

How each reference is made:
  * text to image: diffusers' pipelines with latents= (Flux: the same latents packed by _pack_latents).
  * image to image and inpainting: diffusers' StableDiffusion3Img2Img/Inpaint and FluxImg2Img/Inpaint pipelines
    with randn_tensor drawing from numpy's default_rng(seed) in diffusers' order (the VAE's sample, then the
    noise), which is how spark_lab's pipelines draw from `seed`.
  * StableDiffusion3InpaintPipeline decodes latents / scaling_factor without adding the VAE's shift_factor
    (every other SD3 and Flux pipeline adds it); the reference runs it with output_type="latent" and decodes
    as StableDiffusion3Pipeline does.
  * PEFT LoRAs: diffusers' pipe.load_lora_weights + set_adapters(weight) on the file; the tool checks that
    this equals W += weight * alpha / r * B @ A fused by hand at the same modules.
  * kohya/BFL Flux LoRA: diffusers' kohya converter has FLUX.1's widths built in (it cannot split a tiny
    single_blocks linear1), so the reference adds each delta to the BFL-layout checkpoint (tests/diffusion/
    test_flux_gguf.to_bfl) and converts back with diffusers' own convert_flux_transformer_checkpoint_to_diffusers:
    the fused q/k/v rows, the linear1 split and the final layer's (shift, scale) swap are diffusers'.

    PYTHONPATH=/tmp/peftlib python tools/make_flow_pipeline_fixtures.py [--out tests/fixtures/diffusion]
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from make_diffusion_fixtures import write_tiny_clip_tokenizer  # noqa: E402
from make_sdxl_fixtures import image_inputs, numpy_randn, write_safetensors  # noqa: E402

L = 12                     # CLIP tokenizer length = CLIP positions
T5_LEN = 16                # max_sequence_length of most calls (diffusers' defaults, 256 / 512, in one call each)
FLUX_TINY = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                 axes_dims_rope=(4, 6, 6))
FLUX_DEV_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096,
                          base_shift=0.5, max_shift=1.15)


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def clip_pair(tmp: Path, widths: tuple, projection: int | None, pad2: str | None = None):
    """Tiny CLIP tokenizers and text encoders of the given widths (2 layers; with projection if asked)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    write_tiny_clip_tokenizer(tmp / "tok", L)
    toks, encs = [], []
    for i, width in enumerate(widths):
        tok = CLIPTokenizer.from_pretrained(str(tmp / "tok"), **({"pad_token": pad2} if i == 1 and pad2 else {}))
        cfg = dict(bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id, vocab_size=len(tok),
                   max_position_embeddings=L, layer_norm_eps=1e-5, hidden_act="gelu", num_hidden_layers=2,
                   num_attention_heads=2, hidden_size=width, intermediate_size=width + 8,
                   eos_token_id=tok.eos_token_id if i == 0 else 2)          # 2: the legacy argmax pooling
        if projection:
            enc = CLIPTextModelWithProjection(CLIPTextConfig(**cfg, projection_dim=projection))
        else:
            enc = CLIPTextModel(CLIPTextConfig(**cfg))
        toks.append(tok)
        encs.append(enc.eval())
    return toks, encs


def copy_vocab(tmp: Path, out: Path, subs):
    for sub in subs:                                  # the files SD repos ship, next to tokenizer.json
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(tmp / "tok" / name, out / sub / name)


def t5(fix: Path):
    from transformers import T5EncoderModel, T5TokenizerFast
    return (T5EncoderModel.from_pretrained(str(fix / "tiny-t5" / "text_encoder_3")).eval(),
            T5TokenizerFast.from_pretrained(str(fix / "tiny-t5" / "tokenizer_3")))


def randomize(model: torch.nn.Module, seed: int, std: float = 0.1) -> None:
    """Every parameter ~ N(0, std^2), norm scales included (see tools/make_flux_fixtures.py)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def tidy(out: Path):
    """0644 files (safetensors writes 0600), and no `_name_or_path` (where a part was loaded from) in configs."""
    for f in out.rglob("*"):
        if f.name == "config.json":
            cfg = json.loads(f.read_text())
            if cfg.pop("_name_or_path", None) is not None:
                f.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if f.is_file():
            f.chmod(0o644)


# ----------------------------------------------------------------------------- LoRA helpers

def get_module(model, name):
    """model.<name>; transformers 5's CLIPTextModel has no text_model level (its saved keys still do)."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return model.get_submodule(name.removeprefix("text_model."))


def factors(rng, shape, r, std=0.3):
    out, inp = shape
    return (rng.standard_normal((r, inp)).astype(np.float32) * std,
            rng.standard_normal((out, r)).astype(np.float32) * std)


def peft_file(rng, parts: dict, plan: list, meta: dict):
    """plan [(part, module, r, alpha)] -> (tensors, safetensors metadata, fuse list [(part, module, d, u, alpha/r)]).

    meta: each part's r / lora_alpha / alpha_pattern; the LoraConfig fields diffusers' save_lora_weights
    also writes (target_modules, ...) are added, as `lora_adapter_metadata` {"<part>.<field>": value}."""
    tensors, fuse = {}, []
    for part, module, r, alpha in plan:
        d, u = factors(rng, tuple(get_module(parts[part], module).weight.shape), r)
        tensors[f"{part}.{module}.lora_A.weight"], tensors[f"{part}.{module}.lora_B.weight"] = d, u
        fuse.append((part, module, d, u, alpha / r))
    meta = dict(meta)
    for part in sorted({p for p, *_ in plan}):
        meta[f"{part}.target_modules"] = sorted(m.removeprefix("text_model.") for p, m, *_ in plan if p == part)
        meta.setdefault(f"{part}.alpha_pattern", {})
        meta.update({f"{part}.rank_pattern": {}, f"{part}.use_dora": False, f"{part}.lora_bias": False,
                     f"{part}.use_rslora": False, f"{part}.init_lora_weights": True})
    return tensors, {"format": "pt", "lora_adapter_metadata": json.dumps(meta, sort_keys=True)}, fuse


def fused_copy(pipe, fuse, scale, parts):
    """A copy of the pipeline whose adapted modules are deep copies with W += scale * f * up @ down."""
    comps = dict(pipe.components)
    for part in parts:
        comps[part] = copy.deepcopy(comps[part])
    with torch.no_grad():
        for part, module, d, u, f in fuse:
            w = get_module(comps[part], module).weight
            w += scale * f * (torch.from_numpy(u) @ torch.from_numpy(d))
    return quiet(type(pipe)(**comps))


def diffusers_lora(pipe, path: Path, weight: float):
    """A copy of the pipeline with the LoRA file loaded by diffusers (PEFT) at adapter weight `weight`."""
    p = quiet(type(pipe)(**{k: copy.deepcopy(v) if isinstance(v, torch.nn.Module) else v
                            for k, v in pipe.components.items()}))
    p.load_lora_weights(str(path), adapter_name="test")
    p.set_adapters(["test"], adapter_weights=[weight])
    return p


# ----------------------------------------------------------------------------- SD3

def build_sd3(fix: Path, out: Path, tmp: Path):
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)

    torch.manual_seed(0)
    (tok, tok2), (te, te2) = clip_pair(tmp, (12, 16), projection=16, pad2="!")
    te3, tok3 = t5(fix)
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel.from_pretrained(str(fix / "tiny-sd3" / "transformer")).eval(),
        vae=AutoencoderKL.from_pretrained(str(fix / "tiny-sd3" / "vae")).eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=te, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok2, text_encoder_3=te3, tokenizer_3=tok3)
    pipe.save_pretrained(str(out))
    copy_vocab(tmp, out, ("tokenizer", "tokenizer_2"))
    return quiet(pipe)


def sd3_references(pipe, out: Path, pil, pmask) -> dict:
    from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3InpaintPipeline

    ref = {}
    rng = np.random.default_rng(5)
    lat = rng.standard_normal((4, 16, 8, 8), dtype=np.float32)
    ref["latents"] = lat
    f = lambda a: torch.from_numpy(a.copy())  # noqa: E731
    kw = dict(height=16, width=16, output_type="np", max_sequence_length=T5_LEN)
    # ---- text to image: two prompts, CFG with the empty negative prompt
    ref["t2i"] = pipe(["a photo of a cat", "a red dog"], num_inference_steps=3, guidance_scale=5.0,
                      latents=f(lat[:2]), **kw).images
    # ---- prompt_2 / prompt_3, a negative prompt, two images per prompt
    ref["t2i_neg"] = pipe("a photo of a cat", prompt_2="blue face", prompt_3="happy dog", negative_prompt="red",
                          num_images_per_prompt=2, num_inference_steps=3, guidance_scale=4.0, latents=f(lat[:2]),
                          **kw).images
    # ---- no guidance (1 row per image), diffusers' default T5 length (256), a 16x24 image
    lat_r = rng.standard_normal((1, 16, 8, 12), dtype=np.float32)
    ref["latents_rect"] = lat_r
    ref["t2i_rect"] = pipe("smiling cat", num_inference_steps=2, guidance_scale=1.0, latents=f(lat_r), height=16,
                           width=24, output_type="np").images
    # ---- image to image and inpainting: the noise from numpy's default_rng(seed), diffusers' order
    i2i = quiet(StableDiffusion3Img2ImgPipeline(**pipe.components))
    inp = quiet(StableDiffusion3InpaintPipeline(**pipe.components))
    with numpy_randn(11):
        ref["i2i"] = i2i(["a red dog", "a photo of a cat"], image=pil, strength=0.6, num_inference_steps=4,
                         guidance_scale=5.0, **kw).images
    for key, strength, seed in (("inpaint", 0.75, 12), ("inpaint_full", 1.0, 13)):
        with numpy_randn(seed):
            z = inp("a red dog", image=pil, mask_image=pmask, strength=strength, num_inference_steps=4,
                    guidance_scale=5.0, output_type="latent", **{k: v for k, v in kw.items() if k != "output_type"})
        ref[key] = decode_sd3(pipe, z.images)
    # ---- a PEFT LoRA on the transformer and both CLIP encoders, loaded by diffusers at weight 0.7
    lrng = np.random.default_rng(3)
    parts = {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    plan = [("transformer", m, 2, 1.0 if m == "context_embedder" else 4.0) for m in (
                "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj",
                "transformer_blocks.1.attn.to_out.0", "transformer_blocks.0.attn.to_add_out",
                "transformer_blocks.0.ff.net.2", "transformer_blocks.0.ff_context.net.0.proj",
                "transformer_blocks.1.norm1.linear", "context_embedder", "proj_out",
                "time_text_embed.text_embedder.linear_1")]
    plan += [("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj", 4, 2.0),
             ("text_encoder_2", "text_model.encoder.layers.1.self_attn.k_proj", 2, 2.0),
             ("text_encoder_2", "text_model.encoder.layers.1.mlp.fc1", 2, 2.0)]   # diffusers wants an attention one
    meta = {"transformer.r": 2, "transformer.lora_alpha": 4, "transformer.alpha_pattern": {"context_embedder": 1.0},
            "text_encoder.r": 4, "text_encoder.lora_alpha": 2, "text_encoder_2.r": 2, "text_encoder_2.lora_alpha": 2}
    tensors, metadata, fuse = peft_file(lrng, parts, plan, meta)
    path = out / "lora" / "sd3-peft.safetensors"
    write_safetensors(path, tensors, metadata)
    args = (["a photo of a cat", "a red dog"],)
    call = dict(num_inference_steps=3, guidance_scale=5.0, latents=f(lat[:2]), **kw)
    ref["lora"] = diffusers_lora(pipe, path, 0.7)(*args, **call).images
    by_hand = fused_copy(pipe, fuse, 0.7, parts)(*args, **call).images
    assert np.abs(ref["lora"] - by_hand).max() < 1e-4, np.abs(ref["lora"] - by_hand).max()
    assert np.abs(ref["lora"] - ref["t2i"]).max() > 1e-2
    return ref


def decode_sd3(pipe, latents):
    """Latents -> images [N, H, W, 3] as StableDiffusion3Pipeline decodes them (with the shift_factor)."""
    with torch.no_grad():
        z = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        return pipe.image_processor.postprocess(pipe.vae.decode(z).sample, output_type="np")


# ----------------------------------------------------------------------------- Flux

def build_flux(fix: Path, out: Path, tmp: Path):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(1)
    (tok,), (te,) = clip_pair(tmp, (32,), projection=None)
    te2, tok2 = t5(fix)
    transformer = FluxTransformer2DModel(**FLUX_TINY).eval()
    randomize(transformer, 0)
    vae = AutoencoderKL.from_pretrained(str(fix / "tiny-sd3" / "vae")).eval()
    vae.register_to_config(scaling_factor=0.3611, shift_factor=0.1159)          # FLUX.1's VAE config values
    pipe = FluxPipeline(transformer=transformer, vae=vae, text_encoder=te, tokenizer=tok, text_encoder_2=te2,
                        tokenizer_2=tok2, scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER))
    pipe.save_pretrained(str(out))
    copy_vocab(tmp, out, ("tokenizer",))
    # schnell: the same weights without the guidance embedder (the test derives it from transformer/ too)
    schnell = FluxTransformer2DModel(**dict(FLUX_TINY, guidance_embeds=False)).eval()
    schnell.load_state_dict({k: v for k, v in transformer.state_dict().items() if "guidance_embedder" not in k})
    return quiet(pipe), schnell


def pack(a):
    from diffusers import FluxPipeline
    B, C, H, W = a.shape
    return FluxPipeline._pack_latents(torch.from_numpy(a.copy()), B, C, H, W)


KOHYA = [  # (BFL module, rank, alpha or None); every kind of name the conversion handles
    ("double_blocks.0.img_attn.qkv", 2, 1.0), ("double_blocks.0.txt_attn.qkv", 2, 2.0),
    ("double_blocks.0.txt_attn.proj", 2, 4.0), ("double_blocks.0.img_attn.proj", 2, None),
    ("double_blocks.0.img_mod.lin", 2, None), ("double_blocks.0.txt_mlp.0", 3, 1.5),
    ("double_blocks.0.img_mlp.2", 2, 2.0), ("single_blocks.1.linear1", 2, 2.0), ("single_blocks.0.linear2", 2, 1.0),
    ("single_blocks.0.modulation.lin", 2, 2.0), ("final_layer.adaLN_modulation.1", 2, 1.0),
    ("final_layer.linear", 2, 2.0), ("img_in", 2, 2.0), ("txt_in", 2, 1.0), ("time_in.in_layer", 2, 2.0),
    ("guidance_in.out_layer", 2, 2.0), ("vector_in.in_layer", 2, 2.0)]
KOHYA_TE = ("text_model.encoder.layers.0.mlp.fc2", 2, 2.0)


def flux_kohya_files(pipe, out: Path, rng):
    """flux-kohya / flux-bfl files of the KOHYA layers -> (fused transformer, fused CLIP) at scale 0.8."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("test_flux_gguf", ROOT / "tests" / "diffusion" / "test_flux_gguf.py")
    gguf_tests = importlib.util.module_from_spec(spec)       # not tests/ on sys.path: its kernels/ would shadow
    spec.loader.exec_module(gguf_tests)                      # the `kernels` package peft looks for
    diffusers_from_bfl, to_bfl = gguf_tests.diffusers_from_bfl, gguf_tests.to_bfl

    bfl = to_bfl(pipe.transformer.state_dict())
    kohya, dotted, scale = {}, {}, 0.8
    for module, r, alpha in KOHYA:
        w = bfl[module + ".weight"]
        d, u = factors(rng, w.shape, r)
        k = "lora_unet_" + module.replace(".", "_")
        kohya[k + ".lora_down.weight"], kohya[k + ".lora_up.weight"] = d, u
        dotted[f"diffusion_model.{module}.lora_A.weight"], dotted[f"diffusion_model.{module}.lora_B.weight"] = d, u
        if alpha is not None:
            kohya[k + ".alpha"] = dotted[f"diffusion_model.{module}.alpha"] = np.asarray(alpha, np.float32)
        bfl[module + ".weight"] = w + scale * (alpha if alpha is not None else r) / r * (u @ d)
    module, r, alpha = KOHYA_TE
    te = copy.deepcopy(pipe.text_encoder)
    w = get_module(te, module).weight
    d, u = factors(rng, tuple(w.shape), r)
    k = "lora_te1_" + module.replace(".", "_")
    kohya[k + ".lora_down.weight"], kohya[k + ".lora_up.weight"] = d, u
    kohya[k + ".alpha"] = np.asarray(alpha, np.float32)
    dotted[f"text_encoder.{module}.lora_A.weight"], dotted[f"text_encoder.{module}.lora_B.weight"] = d, u
    dotted[f"text_encoder.{module}.alpha"] = np.asarray(alpha, np.float32)
    with torch.no_grad():
        w += scale * alpha / r * (torch.from_numpy(u) @ torch.from_numpy(d))
    write_safetensors(out / "lora" / "flux-kohya.safetensors", kohya)
    write_safetensors(out / "lora" / "flux-bfl.safetensors", dotted)
    return diffusers_from_bfl(bfl, FLUX_TINY), te


def flux_references(pipe, schnell, out: Path, pil, pmask) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxImg2ImgPipeline, FluxInpaintPipeline, FluxPipeline

    ref = {}
    rng = np.random.default_rng(6)
    lat = rng.standard_normal((2, 16, 8, 8), dtype=np.float32)
    ref["latents"] = lat
    kw = dict(height=16, width=16, output_type="np", max_sequence_length=T5_LEN)
    # ---- FLUX.1-dev style: guidance embedded, no CFG; mu from the 16 image tokens (dynamic shifting)
    ref["t2i"] = pipe(["a photo of a cat", "a red dog"], num_inference_steps=3, guidance_scale=3.5,
                      latents=pack(lat), **kw).images
    # ---- prompt_2 to T5, two images per prompt, a 24x16 image (6 x 4 tokens), diffusers' default T5 length 512
    lat_r = rng.standard_normal((2, 16, 12, 8), dtype=np.float32)
    ref["latents_rect"] = lat_r
    ref["t2i_rect"] = pipe("a photo of a cat", prompt_2="happy dog", num_images_per_prompt=2, num_inference_steps=2,
                           guidance_scale=5.0, latents=pack(lat_r), height=24, width=16, output_type="np").images
    # ---- "true CFG": a negative prompt and true_cfg_scale > 1 run the model twice per step
    ref["t2i_true_cfg"] = pipe("a red dog", negative_prompt="blue face", true_cfg_scale=2.5, num_inference_steps=3,
                               guidance_scale=3.5, latents=pack(lat[:1]), **kw).images
    # ---- FLUX.1-schnell style: no guidance at all, fixed shift 1
    sc = quiet(FluxPipeline(**dict(pipe.components, transformer=schnell,
                                   scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0))))
    ref["schnell"] = sc(["a photo of a cat", "a red dog"], num_inference_steps=2, guidance_scale=0.0,
                        latents=pack(lat), **kw).images
    # ---- image to image and inpainting
    i2i = quiet(FluxImg2ImgPipeline(**pipe.components))
    inp = quiet(FluxInpaintPipeline(**pipe.components))
    with numpy_randn(21):
        ref["i2i"] = i2i(["a red dog", "a photo of a cat"], image=pil, strength=0.6, num_inference_steps=4,
                         guidance_scale=3.5, **kw).images
    for key, strength, seed in (("inpaint", 0.75, 22), ("inpaint_full", 1.0, 23)):
        with numpy_randn(seed):
            ref[key] = inp("a red dog", image=pil, mask_image=pmask, strength=strength, num_inference_steps=4,
                           guidance_scale=3.5, **kw).images
    # ---- a PEFT LoRA (transformer + CLIP) loaded by diffusers, weight 1
    lrng = np.random.default_rng(4)
    parts = {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder}
    plan = [("transformer", m, 2, 3.0) for m in (
                "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_v_proj",
                "transformer_blocks.0.ff.net.2",
                "transformer_blocks.0.norm1_context.linear", "single_transformer_blocks.1.attn.to_k",
                "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.1.proj_out", "x_embedder",
                "proj_out", "norm_out.linear", "time_text_embed.guidance_embedder.linear_2")]
    plan += [("text_encoder", "text_model.encoder.layers.1.self_attn.v_proj", 2, 2.0)]
    meta = {"transformer.r": 2, "transformer.lora_alpha": 3, "text_encoder.r": 2, "text_encoder.lora_alpha": 2}
    tensors, metadata, fuse = peft_file(lrng, parts, plan, meta)
    path = out / "lora" / "flux-peft.safetensors"
    write_safetensors(path, tensors, metadata)
    args = (["a photo of a cat", "a red dog"],)
    call = dict(num_inference_steps=3, guidance_scale=3.5, latents=pack(lat), **kw)
    ref["lora"] = diffusers_lora(pipe, path, 1.0)(*args, **call).images
    by_hand = fused_copy(pipe, fuse, 1.0, parts)(*args, **call).images
    assert np.abs(ref["lora"] - by_hand).max() < 1e-4, np.abs(ref["lora"] - by_hand).max()
    assert np.abs(ref["lora"] - ref["t2i"]).max() > 1e-2
    # ---- the kohya / BFL LoRA at scale 0.8, image to image
    transformer, te = flux_kohya_files(pipe, out, lrng)
    k_i2i = quiet(FluxImg2ImgPipeline(**dict(pipe.components, transformer=transformer, text_encoder=te)))
    with numpy_randn(24):
        ref["lora_kohya_i2i"] = k_i2i("a red dog", image=pil, strength=0.8, num_inference_steps=3,
                                      guidance_scale=3.5, **kw).images
    with numpy_randn(24):
        plain = i2i("a red dog", image=pil, strength=0.8, num_inference_steps=3, guidance_scale=3.5, **kw).images
    assert np.abs(ref["lora_kohya_i2i"] - plain).max() > 1e-2
    return ref


# ----------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="tests/fixtures/diffusion")
    args = ap.parse_args()
    fix = Path(args.out)
    img, mask = image_inputs(7)
    from PIL import Image
    pil, pmask = Image.fromarray(img), Image.fromarray(mask)
    for name, build, refs in (("tiny-sd3-pipe", build_sd3, sd3_references), ("tiny-flux-pipe", build_flux, None)):
        out = fix / name
        if out.exists():
            shutil.rmtree(out)
        tmp = fix / f"tmp-{name}"
        built = build(fix, out, tmp)
        shutil.rmtree(tmp)
        with torch.no_grad():
            if name == "tiny-sd3-pipe":
                ref = refs(built, out, pil, pmask)
            else:
                ref = flux_references(*built, out, pil, pmask)
        ref.update(init_image=img, mask_image=mask)
        np.savez_compressed(out / "reference.npz", **{k: np.asarray(v) for k, v in ref.items()})
        tidy(out)
        total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        print(f"wrote {out} ({total / 1e3:.0f} kB, {len(ref)} reference arrays)")


if __name__ == "__main__":
    main()
