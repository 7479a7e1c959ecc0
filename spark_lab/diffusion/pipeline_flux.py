"""FLUX.1 (dev, schnell): CLIP's pooled output + T5 tokens, the Flux transformer (flux.py), no CFG.

What the family adds to the flow-matching loop (pipeline_flow.py), as diffusers' FluxPipeline:

    pooled  [P, 768]      = text_encoder(prompt).pooler_output                 CLIP-L, pooled only
    context [P, T, 4096]  = text_encoder_2(prompt_2).last_hidden_state        T5 (T = max_sequence_length, 512)
    tokens                the latents packed 2x2 -> [B, (h/2)(w/2), 4C] (flux.pack_latents), RoPE ids
                          (0, row, col) per token and zeros for the text (latent_image_ids)
    guidance              FLUX.1-dev embeds guidance_scale as an input (guidance_embeds); schnell has none.
                          Neither runs classifier-free guidance, unless true_cfg_scale > 1 and a negative
                          prompt are given: v = v_neg + true_cfg_scale (v - v_neg), one call on [neg; pos]
    schedule              sigmas linspace(1, 1/n, n), shifted by mu = calculate_shift(image tokens) when the
                          scheduler config has use_dynamic_shifting (dev), else by its fixed shift (schnell)
    timestep              the transformer takes sigma (t / 1000)

The folder is diffusers' FluxPipeline layout (transformer/, vae/, scheduler/, text_encoder/ (CLIPTextModel),
text_encoder_2/ (T5EncoderModel), tokenizer/, tokenizer_2/); the transformer may come from a city96 GGUF
instead: `FluxPipeline.from_pretrained(folder, transformer_gguf="flux1-dev-Q4_K_S.gguf")`.

LoRA files in diffusers/PEFT naming load as they are; the original (Black Forest Labs) names, in kohya's
spelling (lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight) or dotted (diffusion_model.double_blocks.
0.img_attn.qkv.lora_A.weight), are renamed to diffusers' the way diffusers' kohya converter does: a fused
q/k/v (double blocks) or q/k/v/MLP (single blocks' linear1) layer shares its down factor and splits its up
factor by rows; the final layer's up factor has its (shift, scale) halves swapped to (scale, shift).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..device import array_module, to_host
from .flux import FluxTransformer2DModel, latent_image_ids, pack_latents, unpack_latents
from .pipeline import given_embeds, sub_folder
from .pipeline_flow import FlowMatchPipeline, check_max_sequence_length, per_prompt, repeat_rows
from .vae import AutoencoderKL

DEFAULT_GUIDANCE_FLUX = 3.5      # diffusers' FluxPipeline defaults
DEFAULT_T5_TOKENS_FLUX = 512


class FluxPipeline(FlowMatchPipeline):
    family = "Flux"
    class_names = ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline")
    patch = 2                         # the pipeline packs 2x2 latent pixels into one token

    def __init__(self, transformer, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                 name: str = "", default_guidance: float = DEFAULT_GUIDANCE_FLUX, folder: Path | None = None):
        if not isinstance(transformer, FluxTransformer2DModel):
            raise ValueError(f"FluxPipeline needs a FluxTransformer2DModel, got {type(transformer).__name__}")
        if None in (text_encoder, tokenizer, text_encoder_2, tokenizer_2):
            raise ValueError("FluxPipeline needs text_encoder/, tokenizer/, text_encoder_2/ and tokenizer_2/")
        super().__init__(transformer, scheduler, vae, name, default_guidance, folder)
        c = transformer.config
        if c.in_channels != 4 * self.latent_channels:
            raise ValueError(f"the transformer takes {c.in_channels} packed channels, the VAE's {self.latent_channels} "
                             f"latent channels pack to {4 * self.latent_channels} (a Fill/Control transformer "
                             "with extra channels is not supported)")
        if text_encoder.config.hidden_size != c.pooled_projection_dim:
            raise ValueError(f"text_encoder is {text_encoder.config.hidden_size} wide, the transformer's pooled "
                             f"input is {c.pooled_projection_dim}")
        if text_encoder_2.config.d_model != c.joint_attention_dim:
            raise ValueError(f"text_encoder_2 is {text_encoder_2.config.d_model} wide, the transformer takes "
                             f"{c.joint_attention_dim}")
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.default_size = 128 * self.vae_scale_factor           # diffusers' default_sample_size: 1024 px

    @classmethod
    def _load(cls, folder: Path, index: dict, scheduler, variant, name: str, transformer_gguf=None):
        from ..text.clip import CLIPTextModel, CLIPTokenizer
        from ..text.t5 import T5EncoderModel, T5Tokenizer

        sub = lambda n: sub_folder(folder, n)  # noqa: E731
        if transformer_gguf is None:
            transformer = FluxTransformer2DModel.from_pretrained(sub("transformer"), variant=variant)
        else:
            transformer = FluxTransformer2DModel.from_gguf(transformer_gguf)
        return cls(transformer, cls._scheduler(folder, scheduler),
                   AutoencoderKL.from_pretrained(sub("vae"), variant=variant),
                   CLIPTextModel.from_pretrained(sub("text_encoder"), variant=variant),
                   CLIPTokenizer.from_pretrained(sub("tokenizer")),
                   T5EncoderModel.from_pretrained(sub("text_encoder_2"), variant=variant),
                   T5Tokenizer.from_pretrained(sub("tokenizer_2")), name=name,
                   default_guidance=float(index.get("_spark_lab_guidance_scale", DEFAULT_GUIDANCE_FLUX)), folder=folder)

    @classmethod
    def from_pretrained(cls, name_or_path, scheduler: str | None = None, variant: str | None = None,
                        transformer_gguf: str | Path | None = None):
        """A diffusers FluxPipeline folder; transformer_gguf: take the transformer from that GGUF file
        (ComfyUI-GGUF / city96 layout, its linear weights kept quantized; the folder then needs no
        transformer/)."""
        if transformer_gguf is not None and not Path(transformer_gguf).is_file():
            raise FileNotFoundError(f"missing transformer GGUF file: {transformer_gguf}")
        return super().from_pretrained(name_or_path, scheduler=scheduler, variant=variant,
                                       transformer_gguf=transformer_gguf)

    def lora_parts(self) -> dict:
        return {"transformer": self.transformer.params.tensors, "text_encoder": self.text_encoder.w}

    def convert_lora(self, weights):
        return flux_lora_to_diffusers(weights, self.transformer.config.inner_dim)

    # ------------------------------------------------------------------ text
    def encode_prompt(self, prompts: list, prompts_2: list | None = None,
                      max_sequence_length: int = DEFAULT_T5_TOKENS_FLUX):
        """prompts -> (context [P, T, J], pooled [P, D_clip]) on the device."""
        pooled = self.text_encoder(self.tokenizer(list(prompts))).pooler_output            # [P, D_clip]
        ids = self.tokenizer_2(list(prompts_2 or prompts), max_length=max_sequence_length)
        return self.text_encoder_2(ids).last_hidden_state, pooled                          # [P, T, J]

    def conditioning(self, prompts, negative_prompt, prompt_embeds, negative_prompt_embeds, n: int,
                     guidance: float, max_sequence_length: int | None, prompt_2=None, negative_prompt_2=None,
                     pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None, true_cfg_scale: float = 1.0,
                     **family_kw) -> dict:
        """-> {"context" [B or 2B, T, J], "pooled", "true_cfg"}: the negative half first when true CFG runs."""
        if family_kw:
            raise TypeError(f"FluxPipeline got unexpected arguments {sorted(family_kw)}")
        T = check_max_sequence_length(DEFAULT_T5_TOKENS_FLUX if max_sequence_length is None else max_sequence_length)
        P = len(prompts)
        if prompt_embeds is None:
            p2 = per_prompt(prompt_2, P, "prompt_2") if prompt_2 is not None else None
            cond, pooled = self.encode_prompt(prompts, p2, T)
        else:
            cond, pooled = given_embeds(prompt_embeds, pooled_prompt_embeds, "prompt_embeds")
        context, text = repeat_rows(cond, n), repeat_rows(pooled, n)
        has_negative = negative_prompt is not None or negative_prompt_embeds is not None
        true_cfg = float(true_cfg_scale) > 1.0 and has_negative               # as diffusers: both are needed
        if true_cfg:
            if negative_prompt_embeds is not None:
                neg, npooled = given_embeds(negative_prompt_embeds, negative_pooled_prompt_embeds,
                                          "negative_prompt_embeds")
            else:
                negs = per_prompt(negative_prompt, P, "negative_prompt")
                negs2 = per_prompt(negative_prompt_2, P, "negative_prompt_2") if negative_prompt_2 is not None else None
                neg, npooled = self.encode_prompt(negs, negs2, T)
            if tuple(neg.shape) != tuple(cond.shape):
                raise ValueError(f"negative_prompt_embeds {tuple(neg.shape)} should match prompt_embeds "
                                 f"{tuple(cond.shape)}")
            xp = array_module(context)
            context = xp.concatenate([repeat_rows(neg, n), context], axis=0)      # [2B, T, J]
            text = xp.concatenate([repeat_rows(npooled, n), text], axis=0)
        return {"context": context, "pooled": text, "true_cfg": float(true_cfg_scale) if true_cfg else None,
                "txt_ids": np.zeros((context.shape[1], 3), np.float32), "rows": 2 if true_cfg else 1,
                "text_tokens": int(context.shape[1])}

    # ------------------------------------------------------------------ schedule and prediction
    def set_timesteps(self, steps: int, height: int, width: int) -> None:
        dynamic = self.scheduler.config["use_dynamic_shifting"]
        self.scheduler.set_timesteps(steps, sigmas=np.linspace(1.0, 1.0 / steps, steps),
                                     mu=self.mu(height, width) if dynamic else None)

    def predict(self, x, t, cond: dict, guidance: float):
        B, C, h, w = x.shape
        xp = array_module(x)
        tokens = pack_latents(x)                                                # [B, hw/4, 4C]
        s = cond["true_cfg"]
        if s is not None:
            tokens = xp.concatenate([tokens, tokens], axis=0)                   # [2B, ...]: negative rows first
        rows = tokens.shape[0]
        ts = np.full(rows, np.float32(t) / np.float32(1000.0), dtype=np.float32)   # sigma, as diffusers divides
        g = np.full(rows, guidance, dtype=np.float32) if self.transformer.config.guidance_embeds else None
        v = self.transformer(tokens, cond["context"], cond["pooled"], ts, latent_image_ids(h // 2, w // 2),
                             cond["txt_ids"], guidance=g)                        # [rows, hw/4, 4C]
        if s is not None:
            v_n, v_p = v[:B], v[B:]
            v = v_n + s * (v_p - v_n)
        f = self.vae_scale_factor
        return unpack_latents(v, h * f, w * f, f)                               # [B, C, h, w]

    def _initial_latents(self, latents, shape: tuple, height: int, width: int):
        """[B, C, h, w], or diffusers' packed [B, hw/4, 4C] -> [B, C, h, w] float32 on the device."""
        if latents.ndim == 3:
            f = self.vae_scale_factor
            packed = (shape[0], (shape[2] // 2) * (shape[3] // 2), 4 * shape[1])
            if tuple(latents.shape) != packed:
                raise ValueError(f"packed latents {tuple(latents.shape)} should be {packed} (or unpacked {shape})")
            latents = unpack_latents(np.asarray(to_host(latents), dtype=np.float32), height, width, f)
        return super()._initial_latents(latents, shape, height, width)


# ----------------------------------------------------------------------------- LoRA names

def refuse_foreign_lora(weights, family: str, t5_part: str) -> None:
    """One clear ValueError for a LoRA that names another family's modules or the T5 encoder."""
    keys = lambda pred: [la.key for la in weights.layers if pred(la)]  # noqa: E731
    flux = keys(lambda la: _bfl_name(la) is not None or re.search(
        r"single_transformer_blocks|x_embedder|proj_mlp|guidance_embedder", la.name))
    if family != "Flux" and flux:
        raise ValueError(f"LoRA {weights.label} is a Flux LoRA (e.g. {flux[0]}), not one for this {family} model")
    sd_scripts = keys(lambda la: la.part == "unet" and la.name.startswith("joint_blocks"))
    if sd_scripts:
        raise ValueError(f"LoRA {weights.label} uses sd-scripts' original SD3 names (e.g. {sd_scripts[0]}), which "
                         f"spark_lab does not read (nor does diffusers): convert it to diffusers' transformer.* names")
    unet = keys(lambda la: la.part == "unet")
    if unet:
        raise ValueError(f"LoRA {weights.label} is for a UNet model (Stable Diffusion 1.x/2.x or SDXL: it names "
                         f"unet layers, e.g. {unet[0]}), not this {family} model")
    t5 = keys(lambda la: la.part == t5_part)
    if t5 and keys(lambda la: la.part == t5_part and re.search(r"SelfAttention|DenseReluDense|block[._]\d", la.name)):
        raise ValueError(f"LoRA {weights.label} adapts the T5 text encoder ({t5_part}); spark_lab applies LoRAs "
                         f"to the transformer and the CLIP text encoders only")
    if t5:                                                 # CLIP-like names: SD3's / SDXL's second CLIP encoder
        raise ValueError(f"LoRA {weights.label} adapts a second CLIP text encoder (e.g. {t5[0]}), which this "
                         f"{family} model does not have: it is a LoRA for another model family (SD3 or SDXL)")


_BFL_PARTS = ("diffusion_model", "model", "double_blocks", "single_blocks", "final_layer", "img_in", "txt_in",
              "time_in", "vector_in", "guidance_in")
_BFL_FLAT = re.compile(r"(double_blocks|single_blocks)_(\d+)_(.+)$|(img_in|txt_in|time_in|vector_in|guidance_in|"
                       r"final_layer)(?:_(.+))?$")


def _bfl_targets(name: str, D: int, rows: int):
    """A BFL module name (dotted) -> [(diffusers module, row slice of the up factor, swap halves?)] or None."""
    from .flux_gguf import _DOUBLE, _GUIDANCE, _SINGLE, _TOP

    m = re.match(r"(double_blocks|single_blocks)\.(\d+)\.(.+)$", name)
    if m:
        kind, i, rest = m.group(1), m.group(2), m.group(3)
        d = f"transformer_blocks.{i}." if kind == "double_blocks" else f"single_transformer_blocks.{i}."
        if kind == "double_blocks" and rest in _DOUBLE:
            return [(d + _DOUBLE[rest], slice(None), False)]
        if kind == "single_blocks" and rest in _SINGLE:
            return [(d + _SINGLE[rest], slice(None), False)]
        if kind == "double_blocks" and rest in ("img_attn.qkv", "txt_attn.qkv"):
            names = ("to_q", "to_k", "to_v") if rest.startswith("img") else ("add_q_proj", "add_k_proj", "add_v_proj")
            return [(f"{d}attn.{n}", slice(j * D, (j + 1) * D), False) for j, n in enumerate(names)]
        if kind == "single_blocks" and rest == "linear1":
            qkv = [(f"{d}attn.{n}", slice(j * D, (j + 1) * D), False) for j, n in enumerate(("to_q", "to_k", "to_v"))]
            return qkv + [(f"{d}proj_mlp", slice(3 * D, rows), False)]
        return None
    if name in _TOP or name in _GUIDANCE:
        return [({**_TOP, **_GUIDANCE}[name], slice(None), False)]
    if name == "final_layer.adaLN_modulation.1":
        return [("norm_out.linear", slice(None), True)]
    return None


def _bfl_name(layer) -> str | None:
    """The dotted BFL module a layer names (kohya's lora_unet_<flat name>, or diffusion_model.<dotted>), else None."""
    if layer.kohya and layer.part == "unet":
        m = _BFL_FLAT.match(layer.name)
        if m is None:
            return None
        if m.group(1):
            rest = m.group(3)
            for flat, dotted in (("img_attn_", "img_attn."), ("txt_attn_", "txt_attn."), ("img_mlp_", "img_mlp."),
                                 ("txt_mlp_", "txt_mlp."), ("img_mod_", "img_mod."), ("txt_mod_", "txt_mod."),
                                 ("modulation_", "modulation.")):
                if rest.startswith(flat):
                    rest = dotted + rest[len(flat):]
            return f"{m.group(1)}.{m.group(2)}.{rest}"
        head, tail = m.group(4), m.group(5)
        if head == "final_layer":
            return {"linear": "final_layer.linear", "adaLN_modulation_1": "final_layer.adaLN_modulation.1"}.get(tail)
        return f"{head}.{tail}" if tail else head
    if layer.part in _BFL_PARTS and not layer.kohya:                    # "img_in" alone: part and name agree
        if layer.part in ("diffusion_model", "model"):
            return layer.name.removeprefix("diffusion_model.")
        return layer.part if layer.name == layer.part else f"{layer.part}.{layer.name}"
    return None


def flux_lora_to_diffusers(weights, D: int):
    """LoRAWeights with Flux's original (BFL) module names, kohya-spelled or dotted -> the same LoRA in
    diffusers' names (part "transformer"); layers in other spellings pass through. Refuses a LoRA of
    another family, or one for the T5 encoder, with one ValueError."""
    from .lora import LoRALayer, LoRAWeights

    layers = []
    for layer in weights.layers:
        name = _bfl_name(layer)
        if name is None:
            layers.append(layer)
            continue
        rows = int(layer.up.shape[0])
        targets = _bfl_targets(name, D, rows)
        if targets is None:
            raise ValueError(f"LoRA {weights.label}: {layer.key!r} is not a Flux transformer layer spark_lab knows")
        for module, sl, swap in targets:
            up = layer.up[sl]
            if swap:                                    # BFL's (shift, scale) rows -> diffusers' (scale, shift)
                half = up.shape[0] // 2
                up = np.concatenate([up[half:], up[:half]])
            layers.append(LoRALayer("transformer", module, False, layer.down, np.ascontiguousarray(up),
                                    layer.alpha, f"{layer.key} ({module})"))
    out = LoRAWeights(weights.path, layers, weights.metadata)
    refuse_foreign_lora(out, "Flux", t5_part="text_encoder_2")
    return out
