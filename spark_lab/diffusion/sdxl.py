"""Stable Diffusion XL: two CLIP text encoders and a UNet with size/crop micro-conditioning.

What differs from SD 1.x (everything else, the loop, img2img, inpainting and LoRA, is TextToImagePipeline's):

    context [B, 77, D1 + D2] = concat(text_encoder(ids_1).hidden_states[-2],      the penultimate layer
                                      text_encoder_2(ids_2).hidden_states[-2])    of both encoders
    text_embeds [B, P]       = text_encoder_2's pooled output, projected (CLIPTextModelWithProjection)
    time_ids [B, 6]          = original_size + crops_coords_top_left + target_size  (height, width order)
                               (a refiner UNet that wants 5: original_size + crop + aesthetic score)
    unconditional half       = zeros when there is no negative prompt and the folder says
                               force_zeros_for_empty_prompt (the default), else the encoded negative prompt

The folder is diffusers' StableDiffusionXLPipeline layout: text_encoder/, text_encoder_2/, tokenizer/,
tokenizer_2/, unet/, vae/, scheduler/, model_index.json (text_encoder/ may be absent: the refiner).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..device import array_module
from .pipeline import TextToImagePipeline, given_embeds, sub_folder
from .schedulers import load_scheduler
from .unet_2d_condition import UNet2DConditionModel
from .vae import AutoencoderKL

DEFAULT_GUIDANCE_XL = 5.0        # diffusers' StableDiffusionXLPipeline default


class StableDiffusionXLPipeline(TextToImagePipeline):
    family = "SDXL"
    default_strength = 0.3           # diffusers' StableDiffusionXLImg2ImgPipeline

    def __init__(self, unet, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                 force_zeros_for_empty_prompt: bool = True, name: str = "",
                 default_guidance: float = DEFAULT_GUIDANCE_XL, folder: Path | None = None):
        if text_encoder_2 is None or tokenizer_2 is None:
            raise ValueError("StableDiffusionXLPipeline needs text_encoder_2/ and tokenizer_2/")
        if vae is None:
            raise ValueError("StableDiffusionXLPipeline needs a vae/")
        if unet.config.addition_embed_type != "text_time":
            raise ValueError("StableDiffusionXLPipeline needs a UNet with addition_embed_type='text_time'")
        super().__init__(unet, scheduler, vae, text_encoder or text_encoder_2, tokenizer or tokenizer_2,
                         name=name, default_guidance=default_guidance, folder=folder)
        self.text_encoder, self.tokenizer = text_encoder, tokenizer        # None for the refiner
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        c = unet.config
        pooled = text_encoder_2.config.projection_dim or text_encoder_2.config.hidden_size
        k, rem = divmod(c.projection_class_embeddings_input_dim - pooled, c.addition_time_embed_dim)
        if rem or k not in (5, 6):
            raise ValueError(f"the UNet's add_embedding takes {c.projection_class_embeddings_input_dim} inputs, which "
                             f"is not a {pooled}-wide pooled text embedding + 5 or 6 time ids x {c.addition_time_embed_dim}")
        self.num_time_ids = k                                              # 6: base model, 5: refiner

    @classmethod
    def _load(cls, folder: Path, index: dict, scheduler, variant, name: str):
        from ..text.clip import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        sub = lambda n: sub_folder(folder, n)  # noqa: E731
        has = lambda k: bool(index.get(k) and index[k][0]) if index else (folder / k).is_dir()  # noqa: E731
        unet = UNet2DConditionModel.from_pretrained(sub("unet"), variant=variant)
        sched = load_scheduler(sub("scheduler"), scheduler)
        vae = AutoencoderKL.from_pretrained(sub("vae"), variant=variant)
        te = tok = None
        if has("text_encoder"):
            te = CLIPTextModel.from_pretrained(sub("text_encoder"), variant=variant)
            tok = CLIPTokenizer.from_pretrained(sub("tokenizer"))
        te2 = CLIPTextModelWithProjection.from_pretrained(sub("text_encoder_2"), variant=variant)
        tok2 = CLIPTokenizer.from_pretrained(sub("tokenizer_2"))
        guidance = float(index.get("_spark_lab_guidance_scale", DEFAULT_GUIDANCE_XL))
        return cls(unet, sched, vae, te, tok, te2, tok2,
                   force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True),
                   name=name, default_guidance=guidance, folder=folder)

    def lora_parts(self) -> dict:
        parts = {"unet": self.unet.params.tensors, "text_encoder_2": self.text_encoder_2.w}
        if self.text_encoder is not None:
            parts["text_encoder"] = self.text_encoder.w
        return parts

    # ------------------------------------------------------------------ text
    def encode_prompt(self, prompts: list[str], prompts_2: list[str] | None = None):
        """prompts -> (context [P, L, D1 + D2], pooled [P, P2]) on the device; prompts_2 go to encoder 2."""
        pairs = [(self.text_encoder, self.tokenizer, prompts)] if self.text_encoder is not None else []
        pairs.append((self.text_encoder_2, self.tokenizer_2, prompts_2 or prompts))
        states, pooled = [], None
        for enc, tok, texts in pairs:
            out = enc(tok(list(texts)), output_hidden_states=True)
            states.append(out.hidden_states[-2])                                 # [P, L, Di]: penultimate layer
            pooled = out.text_embeds if out.text_embeds is not None else pooled
        xp = array_module(states[0])
        return xp.concatenate(states, axis=-1), pooled

    def time_ids(self, original_size, crops, target_size, aesthetic_score: float):
        """The micro-conditioning numbers: 6 (original size, crop corner, target size) or 5 (refiner:
        original size, crop corner, aesthetic score), as floats [k]."""
        if self.num_time_ids == 6:
            ids = list(original_size) + list(crops) + list(target_size)
        else:
            ids = list(original_size) + list(crops) + [aesthetic_score]
        return np.asarray(ids, dtype=np.float32)

    def conditioning(self, prompts, negative_prompt, prompt_embeds, negative_prompt_embeds,
                     num_images_per_prompt: int, cfg: bool, size: tuple, prompt_2=None, negative_prompt_2=None,
                     pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None, original_size=None,
                     crops_coords_top_left=(0, 0), target_size=None, negative_original_size=None,
                     negative_crops_coords_top_left=None, negative_target_size=None,
                     aesthetic_score: float = 6.0, negative_aesthetic_score: float = 2.5, **family_kw):
        """-> (context [B or 2B, L, D1 + D2], {"text_embeds", "time_ids"}), the unconditional half first.
        Sizes are (height, width) pairs; original_size and target_size default to the image's size, the
        negative_* ones to the positive ones."""
        if family_kw:
            raise TypeError(f"StableDiffusionXLPipeline got unexpected arguments {sorted(family_kw)}")
        n = num_images_per_prompt
        P = len(prompts)
        if prompt_embeds is None:
            p2 = [prompt_2] * P if isinstance(prompt_2, str) else prompt_2
            cond, pooled = self.encode_prompt(prompts, p2)
        else:
            cond, pooled = given_embeds(prompt_embeds, pooled_prompt_embeds, "prompt_embeds")
        xp = array_module(cond)
        context = xp.repeat(cond, n, axis=0)                                      # [B, L, D]
        text = xp.repeat(pooled, n, axis=0)                                       # [B, P2]
        original_size = tuple(original_size or size)
        target_size = tuple(target_size or size)
        ids = self.time_ids(original_size, crops_coords_top_left, target_size, aesthetic_score)
        neg_ids = self.time_ids(tuple(negative_original_size or original_size),
                                negative_crops_coords_top_left or crops_coords_top_left,
                                tuple(negative_target_size or target_size), negative_aesthetic_score)
        B = P * n
        time_ids = np.tile(ids, (B, 1))                                            # [B, k]
        if cfg:
            if negative_prompt_embeds is not None:
                uncond, upooled = given_embeds(negative_prompt_embeds, negative_pooled_prompt_embeds,
                                          "negative_prompt_embeds")
            elif negative_prompt is None and self.force_zeros_for_empty_prompt:
                uncond, upooled = xp.zeros_like(cond), xp.zeros_like(pooled)      # SDXL's "no prompt"
            else:
                neg = negative_prompt if negative_prompt is not None else ""
                negs = [neg] * P if isinstance(neg, str) else list(neg)
                if len(negs) != P:
                    raise ValueError(f"negative_prompt has {len(negs)} entries for {P} prompts")
                neg2 = negative_prompt_2 if negative_prompt_2 is not None else None
                negs2 = [neg2] * P if isinstance(neg2, str) else neg2
                uncond, upooled = self.encode_prompt(negs, negs2)
            context = xp.concatenate([xp.repeat(uncond, n, axis=0), context], axis=0)     # [2B, L, D]
            text = xp.concatenate([xp.repeat(upooled, n, axis=0), text], axis=0)          # [2B, P2]
            time_ids = np.concatenate([np.tile(neg_ids, (B, 1)), time_ids], axis=0)       # [2B, k]
        return context, {"text_embeds": text, "time_ids": time_ids}
