"""Stable Diffusion 3 / 3.5: three text encoders, the MMDiT (sd3.py), classifier-free guidance.

What the family adds to the flow-matching loop (pipeline_flow.py), as diffusers' StableDiffusion3Pipeline:

    clip   [P, 77, D1 + D2]  = concat(text_encoder(prompt).hidden_states[-2],         CLIP-L, penultimate layer
                                    text_encoder_2(prompt_2).hidden_states[-2])        CLIP-G
    t5     [P, T, J]         = text_encoder_3(prompt_3) (T = max_sequence_length, 256), or zeros without a T5
    context [P, 77 + T, J]   = concat(clip zero-padded to T5's width J, t5) along the tokens
    pooled  [P, P1 + P2]     = concat(both CLIPs' projected pooled outputs)
    guidance                 v = v_uncond + g (v_text - v_uncond), one transformer call on [uncond; cond]
                             rows; the unconditional half encodes negative_prompt ("" by default)
    schedule                 the scheduler's fixed shift (3.0); mu from the token count if the config asks
                             for dynamic shifting (diffusers' calculate_shift)

The folder is diffusers' StableDiffusion3Pipeline layout: transformer/, vae/, scheduler/, text_encoder/,
text_encoder_2/ (CLIPTextModelWithProjection), text_encoder_3/ (T5EncoderModel; may be absent),
tokenizer/, tokenizer_2/, tokenizer_3/, model_index.json. Img2Img and Inpaint folders load the same way.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..device import array_module
from .pipeline import given_embeds, sub_folder
from .pipeline_flow import FlowMatchPipeline, check_max_sequence_length, per_prompt, repeat_rows
from .pipeline_flux import refuse_foreign_lora
from .sd3 import SD3Transformer2DModel
from .vae import AutoencoderKL

DEFAULT_GUIDANCE_SD3 = 7.0       # diffusers' StableDiffusion3Pipeline defaults
DEFAULT_T5_TOKENS_SD3 = 256


class StableDiffusion3Pipeline(FlowMatchPipeline):
    family = "SD3"
    class_names = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline")

    def __init__(self, transformer, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                 text_encoder_3=None, tokenizer_3=None, name: str = "", default_guidance: float = DEFAULT_GUIDANCE_SD3,
                 folder: Path | None = None):
        if not isinstance(transformer, SD3Transformer2DModel):
            raise ValueError(f"StableDiffusion3Pipeline needs an SD3Transformer2DModel, "
                             f"got {type(transformer).__name__}")
        if None in (text_encoder, tokenizer, text_encoder_2, tokenizer_2):
            raise ValueError("StableDiffusion3Pipeline needs text_encoder/, tokenizer/, text_encoder_2/ and "
                             "tokenizer_2/")
        if (text_encoder_3 is None) != (tokenizer_3 is None):
            raise ValueError("StableDiffusion3Pipeline: text_encoder_3/ and tokenizer_3/ come together")
        super().__init__(transformer, scheduler, vae, name, default_guidance, folder)
        c = transformer.config
        if c.in_channels != self.latent_channels:
            raise ValueError(f"the transformer takes {c.in_channels} channels but the VAE makes {self.latent_channels} "
                             "(an inpainting transformer with mask channels is not supported)")
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.text_encoder_3, self.tokenizer_3 = text_encoder_3, tokenizer_3
        self.patch = c.patch_size
        self.default_size = c.sample_size * self.vae_scale_factor
        pooled = sum(e.config.projection_dim or e.config.hidden_size for e in (text_encoder, text_encoder_2))
        if pooled != c.pooled_projection_dim:
            raise ValueError(f"the CLIP encoders' pooled outputs are {pooled} wide together, the transformer "
                             f"takes {c.pooled_projection_dim}")
        clip = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
        if clip > c.joint_attention_dim:
            raise ValueError(f"the CLIP encoders' hidden states are {clip} wide together, more than the "
                             f"transformer's joint_attention_dim {c.joint_attention_dim}")
        if text_encoder_3 is not None and text_encoder_3.config.d_model != c.joint_attention_dim:
            raise ValueError(f"text_encoder_3 is {text_encoder_3.config.d_model} wide, the transformer takes "
                             f"{c.joint_attention_dim}")

    @classmethod
    def _load(cls, folder: Path, index: dict, scheduler, variant, name: str, transformer_gguf=None):
        from ..text.clip import CLIPTextModelWithProjection, CLIPTokenizer
        from ..text.t5 import T5EncoderModel, T5Tokenizer

        sub = lambda n: sub_folder(folder, n)  # noqa: E731
        listed = index.get("text_encoder_3")                   # [null, null]: an SD3 folder without its T5
        te3 = tok3 = None
        if (listed[0] is not None) if listed else (folder / "text_encoder_3").is_dir():
            te3 = T5EncoderModel.from_pretrained(sub("text_encoder_3"), variant=variant)
            tok3 = T5Tokenizer.from_pretrained(sub("tokenizer_3"))
        transformer = (SD3Transformer2DModel.from_pretrained(sub("transformer"), variant=variant)
                       if transformer_gguf is None else SD3Transformer2DModel.from_gguf(transformer_gguf))
        return cls(transformer, cls._scheduler(folder, scheduler), AutoencoderKL.from_pretrained(sub("vae"), variant=variant),
                   CLIPTextModelWithProjection.from_pretrained(sub("text_encoder"), variant=variant),
                   CLIPTokenizer.from_pretrained(sub("tokenizer")),
                   CLIPTextModelWithProjection.from_pretrained(sub("text_encoder_2"), variant=variant),
                   CLIPTokenizer.from_pretrained(sub("tokenizer_2")), te3, tok3, name=name,
                   default_guidance=float(index.get("_spark_lab_guidance_scale", DEFAULT_GUIDANCE_SD3)), folder=folder)

    @classmethod
    def from_pretrained(cls, name_or_path, scheduler: str | None = None, variant: str | None = None,
                        transformer_gguf: str | Path | None = None):
        """A diffusers StableDiffusion3Pipeline folder; transformer_gguf: take the transformer from that
        GGUF file (ComfyUI-GGUF / city96 layout, its linear weights kept quantized; the folder then
        needs no transformer/)."""
        if transformer_gguf is not None and not Path(transformer_gguf).is_file():
            raise FileNotFoundError(f"missing transformer GGUF file: {transformer_gguf}")
        return super().from_pretrained(name_or_path, scheduler=scheduler, variant=variant,
                                       transformer_gguf=transformer_gguf)

    def lora_parts(self) -> dict:
        return {"transformer": self.transformer.params.tensors, "text_encoder": self.text_encoder.w,
                "text_encoder_2": self.text_encoder_2.w}

    def convert_lora(self, weights):
        refuse_foreign_lora(weights, self.family, t5_part="text_encoder_3")
        return weights

    # ------------------------------------------------------------------ text
    def encode_prompt(self, prompts: list, prompts_2: list | None = None, prompts_3: list | None = None,
                      max_sequence_length: int = DEFAULT_T5_TOKENS_SD3):
        """prompts -> (context [P, 77 + T, J], pooled [P, P1 + P2]) on the device."""
        states, pooled = [], []
        for enc, tok, texts in ((self.text_encoder, self.tokenizer, prompts),
                                (self.text_encoder_2, self.tokenizer_2, prompts_2 or prompts)):
            out = enc(tok(list(texts)), output_hidden_states=True)
            states.append(out.hidden_states[-2])                               # [P, 77, Di] penultimate layer
            pooled.append(out.text_embeds)                                     # [P, Pi]
        xp = array_module(states[0])
        clip = xp.concatenate(states, axis=-1)                                 # [P, 77, D1 + D2]
        J = self.transformer.config.joint_attention_dim
        P = clip.shape[0]
        clip = xp.concatenate([clip, xp.zeros((P, clip.shape[1], J - clip.shape[2]), np.float32)], axis=-1)
        if self.text_encoder_3 is None:                                        # SD3 without its T5: zeros
            t5 = xp.zeros((P, max_sequence_length, J), np.float32)
        else:
            ids = self.tokenizer_3(list(prompts_3 or prompts), max_length=max_sequence_length)
            t5 = self.text_encoder_3(ids).last_hidden_state                    # [P, T, J]
        return xp.concatenate([clip, t5], axis=1), xp.concatenate(pooled, axis=-1)

    def conditioning(self, prompts, negative_prompt, prompt_embeds, negative_prompt_embeds, n: int,
                     guidance: float, max_sequence_length: int | None, prompt_2=None, prompt_3=None,
                     negative_prompt_2=None, negative_prompt_3=None, pooled_prompt_embeds=None,
                     negative_pooled_prompt_embeds=None, **family_kw) -> dict:
        """-> {"context" [B or 2B, L, J], "pooled" [B or 2B, P], "cfg"}: the unconditional half first."""
        if family_kw:
            raise TypeError(f"StableDiffusion3Pipeline got unexpected arguments {sorted(family_kw)}")
        T = check_max_sequence_length(DEFAULT_T5_TOKENS_SD3 if max_sequence_length is None else max_sequence_length)
        P = len(prompts)
        if prompt_embeds is None:
            p2 = per_prompt(prompt_2, P, "prompt_2") if prompt_2 is not None else None
            p3 = per_prompt(prompt_3, P, "prompt_3") if prompt_3 is not None else None
            cond, pooled = self.encode_prompt(prompts, p2, p3, T)
        else:
            cond, pooled = given_embeds(prompt_embeds, pooled_prompt_embeds, "prompt_embeds")
        cfg = guidance > 1.0
        context, text = repeat_rows(cond, n), repeat_rows(pooled, n)             # [B, L, J], [B, P]
        if cfg:
            if negative_prompt_embeds is not None:
                uncond, upooled = given_embeds(negative_prompt_embeds, negative_pooled_prompt_embeds,
                                          "negative_prompt_embeds")
            else:
                neg = per_prompt(negative_prompt if negative_prompt is not None else "", P, "negative_prompt")
                neg2 = per_prompt(negative_prompt_2, P, "negative_prompt_2") if negative_prompt_2 is not None else neg
                neg3 = per_prompt(negative_prompt_3, P, "negative_prompt_3") if negative_prompt_3 is not None else neg
                uncond, upooled = self.encode_prompt(neg, neg2, neg3, T)
            if tuple(uncond.shape) != tuple(cond.shape):
                raise ValueError(f"negative_prompt_embeds {tuple(uncond.shape)} should match prompt_embeds "
                                 f"{tuple(cond.shape)}")
            xp = array_module(context)
            context = xp.concatenate([repeat_rows(uncond, n), context], axis=0)  # [2B, L, J]
            text = xp.concatenate([repeat_rows(upooled, n), text], axis=0)      # [2B, P]
        return {"context": context, "pooled": text, "cfg": cfg, "rows": 2 if cfg else 1,
                "text_tokens": int(context.shape[1])}

    # ------------------------------------------------------------------ schedule and prediction
    def set_timesteps(self, steps: int, height: int, width: int) -> None:
        dynamic = self.scheduler.config["use_dynamic_shifting"]
        self.scheduler.set_timesteps(steps, mu=self.mu(height, width) if dynamic else None)

    def predict(self, x, t, cond: dict, guidance: float):
        B = x.shape[0]
        xp = array_module(x)
        x_in = xp.concatenate([x, x], axis=0) if cond["cfg"] else x             # [2B, C, h, w]: one call
        ts = np.full(x_in.shape[0], t, dtype=np.float32)
        v = self.transformer(x_in, cond["context"], cond["pooled"], ts)
        if cond["cfg"]:
            v_u, v_c = v[:B], v[B:]
            v = v_u + guidance * (v_c - v_u)
        return v
