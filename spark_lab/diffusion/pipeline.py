"""Text to image, image to image and inpainting: prompts (+ an init image, + a mask) -> text embeddings
-> seeded noise -> denoising loop -> (VAE) -> PIL images.

`TextToImagePipeline.from_pretrained(path)` (or `load_pipeline`) reads model_index.json's `_class_name`
and returns the pipeline of that family (FAMILIES below): this class for Stable Diffusion 1.x/2.x and
spark-emoji, `sdxl.StableDiffusionXLPipeline` for SDXL, `pipeline_sd3` / `pipeline_flux` for SD3 and
Flux; other families are refused by name.

Two kinds of model folders load here as this class:
  * Stable Diffusion-style diffusers folders: unet/, vae/, text_encoder/ (CLIP), tokenizer/, scheduler/.
  * spark-emoji-style folders: unet/ in pixel space and scheduler/ only, with
    `"_spark_lab_text_encoder": "all-minilm-l6-v2"` in model_index.json: the prompt is one
    sentence embedding, `encoder_hidden_states = encode(prompts)[:, None, :]` ([B, 1, 384]),
    and the unconditional embedding is zeros of the same shape.

    pipe = TextToImagePipeline.from_pretrained("spark-emoji")
    images = pipe("a smiling cat", num_inference_steps=25, guidance_scale=3.0, seed=0)

Image to image and inpainting are the same call with `image=` (and `mask_image=`, white = repaint)
and `strength` in (0, 1]; the helpers live in image_inputs.py. LoRA files load with
`pipe.load_lora_weights(path, scale, fuse)` (lora.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..device import array_module, to_device, to_host
from ..memory import get_allocator
from . import image_inputs as ii
from .attention import SCORES_PER_CHUNK
from .loading import read_json
from .schedulers import load_scheduler
from .unet_2d_condition import UNet2DConditionModel
from .vae import AutoencoderKL

DEFAULT_GUIDANCE = 7.5           # diffusers' StableDiffusionPipeline default
DEFAULT_GUIDANCE_SENTENCE = 4.0  # sentence-embedding models whose model_index.json sets no _spark_lab_guidance_scale

# model_index.json `_class_name` -> "module:class" of the pipeline that runs it (a family's img2img and
# inpaint folders hold the same parts, so they load as the same pipeline)
FAMILIES = {
    "StableDiffusionPipeline": "spark_lab.diffusion.pipeline:TextToImagePipeline",
    "StableDiffusionImg2ImgPipeline": "spark_lab.diffusion.pipeline:TextToImagePipeline",
    "StableDiffusionInpaintPipeline": "spark_lab.diffusion.pipeline:TextToImagePipeline",
    "TextToImagePipeline": "spark_lab.diffusion.pipeline:TextToImagePipeline",
    "StableDiffusionXLPipeline": "spark_lab.diffusion.sdxl:StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline": "spark_lab.diffusion.sdxl:StableDiffusionXLPipeline",
    "StableDiffusionXLInpaintPipeline": "spark_lab.diffusion.sdxl:StableDiffusionXLPipeline",
    "StableDiffusion3Pipeline": "spark_lab.diffusion.pipeline_sd3:StableDiffusion3Pipeline",
    "StableDiffusion3Img2ImgPipeline": "spark_lab.diffusion.pipeline_sd3:StableDiffusion3Pipeline",
    "StableDiffusion3InpaintPipeline": "spark_lab.diffusion.pipeline_sd3:StableDiffusion3Pipeline",
    "FluxPipeline": "spark_lab.diffusion.pipeline_flux:FluxPipeline",
    "FluxImg2ImgPipeline": "spark_lab.diffusion.pipeline_flux:FluxPipeline",
    "FluxInpaintPipeline": "spark_lab.diffusion.pipeline_flux:FluxPipeline",
}


def pipeline_class(index: dict, folder: Path | str = ""):
    """model_index.json -> the pipeline class of its family (no model_index.json: Stable Diffusion)."""
    import importlib

    name = index.get("_class_name") or "StableDiffusionPipeline"
    target = FAMILIES.get(name)
    if target is None:
        runs = [k for k in FAMILIES if not k.endswith(("Img2ImgPipeline", "InpaintPipeline"))]
        raise ValueError(f"{folder}: {name!r} models are not supported yet (spark_lab runs: {', '.join(runs)}, "
                         "and their Img2Img/Inpaint folders)")
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)


def load_pipeline(name_or_path="spark-emoji", scheduler: str | None = None, variant: str | None = None):
    """Any supported diffusers folder (or catalogue name) -> the pipeline of its family."""
    return TextToImagePipeline.from_pretrained(name_or_path, scheduler=scheduler, variant=variant)


def _open_folder(name_or_path):
    from ..models import resolve

    folder = Path(resolve(name_or_path, kind="diffusion"))
    if not folder.is_dir():
        raise FileNotFoundError(f"missing diffusers folder: {folder}")
    index = read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    return folder, index


def sub_folder(folder: Path, name: str) -> Path:
    p = folder / name
    if not p.is_dir():
        raise FileNotFoundError(f"missing {name}/ folder in {folder}: {p}")
    return p


def given_embeds(embeds, pooled, what: str):
    """Precomputed text embeddings and their pooled vector -> both on the device as float32
    (SDXL, SD3 and Flux take the two together)."""
    if pooled is None:
        raise ValueError(f"{what} needs {what.replace('prompt_embeds', 'pooled_prompt_embeds')} too")
    return to_device(embeds, np.float32), to_device(pooled, np.float32)


class TextToImagePipeline:
    family = "Stable Diffusion 1.x/2.x"
    default_strength = 0.8           # diffusers' StableDiffusionImg2ImgPipeline

    def __init__(self, unet, scheduler, vae=None, text_encoder=None, tokenizer=None, sentence_encoder=None,
                 name: str = "", default_guidance: float = DEFAULT_GUIDANCE, folder: Path | None = None):
        if not isinstance(unet, UNet2DConditionModel):
            raise ValueError(f"TextToImagePipeline needs a UNet2DConditionModel, got {type(unet).__name__}")
        if sentence_encoder is None and text_encoder is None:
            raise ValueError("TextToImagePipeline needs a text encoder (text_encoder/ + tokenizer/, "
                             "or _spark_lab_text_encoder in model_index.json)")
        self.unet, self.scheduler, self.vae = unet, scheduler, vae
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self._sentence_encoder = sentence_encoder     # a SentenceEncoder, or its catalogue name (loaded lazily)
        self.name, self.default_guidance, self.folder = name, default_guidance, folder
        self.vae_scale_factor = vae.config.downscale if vae is not None else 1
        self.adapters = []            # LoRAs applied, oldest first (lora.Adapter)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, name_or_path="spark-emoji", scheduler: str | None = None, variant: str | None = None):
        """A catalogue name, a diffusers folder or (online) a Hugging Face repo id -> the pipeline of
        its family (model_index.json's _class_name: SD 1.x/2.x here, SDXL in sdxl.py)."""
        folder, index = _open_folder(name_or_path)
        target = pipeline_class(index, folder)
        if target is not cls:
            if cls is not TextToImagePipeline:
                raise ValueError(f"{folder} holds a {index.get('_class_name') or 'StableDiffusionPipeline'} model, "
                                 f"not one for {cls.__name__}")
            pipe = target.from_pretrained(folder, scheduler=scheduler, variant=variant)
            pipe.name = str(name_or_path)
            return pipe
        return cls._load(folder, index, scheduler, variant, str(name_or_path))

    @classmethod
    def _load(cls, folder: Path, index: dict, scheduler, variant, name: str):
        from ..text.clip import CLIPTextModel, CLIPTokenizer

        sub = lambda n: sub_folder(folder, n)  # noqa: E731
        unet_cls = (index.get("unet") or ["", "UNet2DConditionModel"])[1]
        if unet_cls not in ("UNet2DConditionModel", None):
            raise ValueError(f"{folder}: unet class {unet_cls!r} is not supported by TextToImagePipeline")
        unet = UNet2DConditionModel.from_pretrained(sub("unet"), variant=variant)
        sched = load_scheduler(sub("scheduler"), scheduler)
        has = lambda k: bool(index.get(k) and index[k][0]) if index else (folder / k).is_dir()  # noqa: E731
        vae = AutoencoderKL.from_pretrained(sub("vae"), variant=variant) if has("vae") else None
        text_encoder = tokenizer = None
        sentence = index.get("_spark_lab_text_encoder")
        if sentence is None:
            text_encoder = CLIPTextModel.from_pretrained(sub("text_encoder"), variant=variant)
            tokenizer = CLIPTokenizer.from_pretrained(sub("tokenizer"))
        guidance = float(index.get("_spark_lab_guidance_scale",
                                   DEFAULT_GUIDANCE if sentence is None else DEFAULT_GUIDANCE_SENTENCE))
        return cls(unet, sched, vae, text_encoder, tokenizer, sentence, name=name,
                   default_guidance=guidance, folder=folder)

    def set_scheduler(self, name: str) -> None:
        """Swap the sampler (ddpm, ddim, euler, flow-euler), keeping the model's schedule config."""
        if self.folder is None:
            raise ValueError("set_scheduler needs a pipeline loaded with from_pretrained")
        self.scheduler = load_scheduler(self.folder / "scheduler", name)

    @property
    def sentence_encoder(self):
        if isinstance(self._sentence_encoder, str):
            from spark_lab.text.bert import SentenceEncoder  # lazy: the BERT side is only needed here
            self._sentence_encoder = SentenceEncoder.load(self._sentence_encoder)
        return self._sentence_encoder

    # ------------------------------------------------------------------ pieces
    def encode_prompt(self, prompts: list[str]):
        """prompts -> encoder_hidden_states [B, L, ctx] float32 on the device."""
        if self._sentence_encoder is not None:
            e = np.asarray(to_host(self.sentence_encoder.encode(list(prompts))), dtype=np.float32)  # [B, 384]
            return to_device(e[:, None, :])                                                      # [B, 1, 384]
        ids = self.tokenizer(list(prompts))                                                      # [B, 77]
        return self.text_encoder(ids).last_hidden_state                                          # [B, 77, D]

    def unconditional(self, cond, negative_prompt):
        if negative_prompt is None and self._sentence_encoder is not None:
            return array_module(cond).zeros_like(cond)          # spark-emoji was trained with zeros as "no prompt"
        neg = negative_prompt if negative_prompt is not None else ""
        negs = [neg] * cond.shape[0] if isinstance(neg, str) else list(neg)
        if len(negs) != cond.shape[0]:
            raise ValueError(f"negative_prompt has {len(negs)} entries for {cond.shape[0]} prompts")
        return self.encode_prompt(negs)

    def conditioning(self, prompts, negative_prompt, prompt_embeds, negative_prompt_embeds,
                     num_images_per_prompt: int, cfg: bool, size: tuple, **family_kw):
        """-> (context [B or 2B, L, ctx], added_cond_kwargs or None), the unconditional half first.
        A family with more conditioning (SDXL's pooled text and size ids) overrides this."""
        if family_kw:
            raise TypeError(f"{type(self).__name__} got unexpected arguments {sorted(family_kw)}")
        cond = self.encode_prompt(prompts) if prompt_embeds is None else to_device(prompt_embeds, np.float32)
        xp = array_module(cond)                                                # cond [P, L, ctx]
        context = xp.repeat(cond, num_images_per_prompt, axis=0)              # [B, L, ctx]
        if cfg:
            uncond = (self.unconditional(cond, negative_prompt) if negative_prompt_embeds is None
                      else to_device(negative_prompt_embeds, np.float32))
            uncond = xp.repeat(uncond, num_images_per_prompt, axis=0)
            context = xp.concatenate([uncond, context], axis=0)               # [2B, L, ctx]
        return context, None

    def encode_image(self, images, rng):
        """init images [n, 3, H, W] in [-1, 1] -> the latents the loop works on (pixel-space models: as is)."""
        if self.vae is None:
            return to_device(images, np.float32)
        return ii.encode_latents(self.vae, images, rng)

    # ------------------------------------------------------------------ LoRA
    def lora_parts(self) -> dict:
        """The weights dicts a LoRA may adapt, by the names LoRA files use."""
        parts = {"unet": self.unet.params.tensors}
        if self.text_encoder is not None:
            parts["text_encoder"] = self.text_encoder.w
        return parts

    def load_lora_weights(self, lora, scale: float = 1.0, fuse: bool = True):
        """A LoRA safetensors file (diffusers/PEFT or kohya naming) or a lora.LoRAWeights -> applied.

        fuse=True adds scale * B @ A into the weights (no cost per step); fuse=False keeps the factors
        beside the weights (set_lora_scale changes the strength without reloading). Either way
        unload_lora_weights() restores the original weights bit for bit. Returns the lora.Adapter."""
        from .lora import LoRAWeights

        weights = lora if isinstance(lora, LoRAWeights) else LoRAWeights.from_file(lora)
        adapter = weights.apply(self.lora_parts(), scale, fuse, family=f"this {self.family} model",
                                unet_config=self.unet.config)
        self.adapters.append(adapter)
        return adapter

    def set_lora_scale(self, scale: float, adapter=None) -> None:
        """The strength of an unfused LoRA (the last one loaded unless `adapter` is given)."""
        if not self.adapters:
            raise ValueError("no LoRA is loaded")
        a = adapter or self.adapters[-1]
        if a.fused:
            raise ValueError(f"LoRA {a.name} is fused into the weights: load it with fuse=False to change its scale")
        a.scale = float(scale)

    def unload_lora_weights(self) -> None:
        """Take every LoRA off (newest first), restoring the original weights exactly."""
        for a in reversed(self.adapters):
            a.remove()
        self.adapters = []

    def activation_bytes(self, batch: int, height: int, width: int, cfg: bool) -> int:
        """A generous estimate of the activations one denoising step + decode needs (float32)."""
        c = self.unet.config
        B = batch * (2 if cfg else 1)
        h, w = height // self.vae_scale_factor, width // self.vae_scale_factor
        layers = c.layers_per_block if isinstance(c.layers_per_block, int) else max(c.layers_per_block)
        skips = peak = attn = 0
        for i, ch in enumerate(c.block_out_channels):
            hw = max(1, (h >> i) * (w >> i))
            skips += (layers + 1) * B * ch * hw
            peak = max(peak, B * ch * hw * 2 * 9)               # concat input of an up resnet, im2col'ed
            if "Attn" in c.down_block_types[i]:                 # scores: a cache-sized chunk of heads
                attn = max(attn, hw * hw, SCORES_PER_CHUNK)    # (at least one whole head) at a time
        if self.vae is not None:                                # the VAE's one-head attention at latent size
            attn = max(attn, (h * w) ** 2)
        total = 4 * (skips + 2 * peak + attn)
        if self.vae is not None:
            total += 4 * batch * self.vae.config.block_out_channels[0] * height * width * 2 * 9
        return int(total)

    def decode(self, latents) -> np.ndarray:
        """latents -> images [N, H, W, 3] float32 in [0, 1] on the host (the VAE, or pixel space as is)."""
        x = latents
        if self.vae is not None:
            x = self.vae.decode(ii.decode_input(self.vae, x))
        x = array_module(x).clip(x * 0.5 + 0.5, 0.0, 1.0)
        return np.ascontiguousarray(to_host(x).transpose(0, 2, 3, 1), dtype=np.float32)

    @staticmethod
    def to_pil(images: np.ndarray) -> list:
        from PIL import Image
        u8 = (images * 255.0).round().astype(np.uint8)
        return [Image.fromarray(im) for im in u8]

    # ------------------------------------------------------------------ the loop
    def __call__(self, prompt=None, num_inference_steps: int = 25, guidance_scale: float | None = None, seed=0,
                 num_images_per_prompt: int = 1, height: int | None = None, width: int | None = None,
                 latents=None, negative_prompt=None, callback=None, output_type: str = "pil",
                 progress: bool = True, eta: float = 0.0, prompt_embeds=None, negative_prompt_embeds=None,
                 image=None, mask_image=None, strength: float | None = None, **family_kw):
        """prompt(s) -> images. `prompt_embeds` [P, L, ctx] (and `negative_prompt_embeds`) skip the text
        encoder; `latents` [B, C, h, w] replaces the seeded initial noise; `callback(step, t, latents)`
        runs after every step (live previews: `pipe.decode(latents)`).

        image-to-image: `image` (PIL, path or [H, W, 3] array; one, or one per image) is encoded and
        noised to the level `strength` in (0, 1] selects (default: the family's, 0.8 for SD), and only
        the remaining steps run. Inpainting: `mask_image` too (same size, white = repaint, black =
        keep; strength default 1). A plain UNet keeps the black region by re-noising the init latents
        into it after every step; an inpainting UNet (9 input channels) reads the mask and the
        masked image's latents as extra input channels."""
        import time
        from tqdm.auto import tqdm

        if prompt_embeds is not None:
            prompts = [""] * int(prompt_embeds.shape[0])
        else:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt is empty: give a string or a list of strings")
        if not isinstance(num_inference_steps, (int, np.integer)) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        if output_type not in ("pil", "np"):
            raise ValueError(f"output_type must be 'pil' or 'np', got {output_type!r}")
        c = self.unet.config
        f = self.vae_scale_factor
        latent_ch = self.vae.config.latent_channels if self.vae is not None else c.out_channels
        inpaint_unet = c.in_channels == 2 * latent_ch + 1            # SD-inpainting: latents + mask + masked image
        if mask_image is not None and image is None:
            raise ValueError("mask_image needs an init image: pass image= as well")
        if inpaint_unet and mask_image is None:
            raise ValueError(f"this UNet is an inpainting UNet ({c.in_channels} input channels): "
                             "give image= and mask_image=")
        if image is None and strength is not None:
            raise ValueError("strength needs an init image: pass image= as well")
        if image is not None and latents is not None:
            raise ValueError("latents= replaces the initial noise of text to image; with image= the start "
                             "comes from the image")
        if image is not None:
            strength = ii.check_strength(strength if strength is not None else
                                         1.0 if mask_image is not None else self.default_strength)
            image_size = ii.image_size(image)                                  # (H, W) as given
            init = ii.prepare_image(image, f, height, width)                   # [n, 3, H, W] in [-1, 1]
            height, width = init.shape[-2:]
        height = height or (c.sample_size or 64) * f
        width = width or (c.sample_size or 64) * f
        if height % f or width % f or height < f or width < f:
            raise ValueError(f"height and width must be positive multiples of {f}, got {height}x{width}")
        if mask_image is not None:
            pixel_mask, latent_mask = ii.prepare_mask(mask_image, (height, width), f, image_size)
        g = self.default_guidance if guidance_scale is None else float(guidance_scale)
        cfg = g > 1.0
        B = len(prompts) * num_images_per_prompt
        shape = (B, latent_ch, height // f, width // f)
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents {tuple(latents.shape)} should be {shape}")
        get_allocator().check(self.activation_bytes(B, height, width, cfg), "activations",
                              what=f"{B} image(s) at {height}x{width}")
        t0 = time.perf_counter()

        # 1. text conditioning, each prompt repeated num_images_per_prompt times; unconditional first for CFG
        context, added = self.conditioning(prompts, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                           num_images_per_prompt, cfg, (height, width), **family_kw)

        # 2. timesteps: image to image runs only the tail that `strength` keeps
        sched = self.scheduler
        sched.set_timesteps(int(num_inference_steps))
        timesteps, start = sched.timesteps, 0
        if image is not None:
            timesteps, start = ii.strength_timesteps(sched, int(num_inference_steps), strength)

        # 3. the starting latents: seeded noise, or the init image noised to timesteps[0]
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        if image is None:
            if latents is None:
                latents = rng.standard_normal(shape, dtype=np.float32)
            x = to_device(np.asarray(to_host(latents), dtype=np.float32)) * float(sched.init_noise_sigma)
        else:
            from_noise = mask_image is not None and strength == 1.0             # inpainting from pure noise
            x0 = None if (from_noise and inpaint_unet) else ii.repeat_to(self.encode_image(init, rng), B, "init image")
            if x0 is None:
                noise = ii.draw_noise(rng, shape)
                x = noise * float(sched.init_noise_sigma)
            else:
                x, noise = ii.prepare_init_latents(sched, x0, start, B, rng, from_noise=from_noise)
        xp = array_module(x)
        if mask_image is not None:
            mask = to_device(ii.repeat_to(latent_mask, B, "mask"))             # [B, 1, h, w], 1 = repaint
            if inpaint_unet:
                masked = ii.repeat_to(self.encode_image(init * (pixel_mask < 0.5), rng), B, "init image")
                extra = xp.concatenate([mask, masked], axis=1)                 # [B, 1 + C, h, w]

        # 4. the denoising loop
        step_kw = {"eta": eta} if "eta" in sched.step.__code__.co_varnames else {}
        for i, t in enumerate(tqdm(timesteps, disable=not progress, desc="imagine", leave=False)):
            # 4a. one UNet call for both halves of classifier-free guidance (the same x, two contexts)
            x_in = sched.scale_model_input(x, t)
            if mask_image is not None and inpaint_unet:
                x_in = xp.concatenate([x_in, extra], axis=1)                    # [B, 2C + 1, h, w]
            out = self.unet(x_in, t, context, repeat=2 if cfg else 1, added_cond_kwargs=added)
            # 4b. guidance: push away from the unconditional prediction
            if cfg:
                out_u, out_c = out[:B], out[B:]
                out = out_u + g * (out_c - out_u)
            # 4c. the scheduler turns the prediction into x_{t-1}
            x = sched.step(out, t, x, generator=rng, **step_kw).prev_sample
            # 4d. inpainting with a plain UNet: the kept region is the init image at the next noise level
            if mask_image is not None and not inpaint_unet:
                known = ii.noise_to(sched, x0, noise, start + i + 1) if i < len(timesteps) - 1 else x0
                x = ii.blend_known(x, known, mask)
            # 4e. live previews
            if callback is not None:
                callback(i, t, x)

        # 5. latents -> pixels
        images = self.decode(x)                                                # [B, H, W, 3] in [0, 1]
        seconds = time.perf_counter() - t0
        self.last_seconds = seconds
        return images if output_type == "np" else self.to_pil(images)
