"""The denoising loop of the flow-matching families (SD3 in pipeline_sd3.py, Flux in pipeline_flux.py):
prompts (+ an init image, + a mask) -> text conditioning -> seeded noise -> Euler steps along the
transformer's velocity -> VAE -> PIL images.

    pipe = StableDiffusion3Pipeline.from_pretrained("stable-diffusion-3-medium-diffusers")
    pipe = FluxPipeline.from_pretrained("FLUX.1-dev", transformer_gguf="flux1-dev-Q4_K_S.gguf")
    images = pipe("a red fox in the snow", num_inference_steps=28, seed=0)                   # text to image
    images = pipe("a red fox", image="photo.png", strength=0.6)                              # image to image
    images = pipe("a red fox", image="photo.png", mask_image="mask.png", strength=0.9)       # inpainting

The call takes TextToImagePipeline's arguments (pipeline.py) and diffusers' names for the rest
(prompt_2, max_sequence_length, ...). What a family supplies: its text conditioning, the schedule
(`set_timesteps`: SD3 a fixed shift, Flux mu from the image's token count) and one velocity
prediction (`predict`: SD3 with classifier-free guidance, Flux packing 2x2 latents into tokens).
The loop itself is the same for both, and the same as diffusers' StableDiffusion3/Flux(Img2Img|Inpaint)
pipelines:

    x_t = (1 - sigma) x_0 + sigma noise            the forward process (scheduler.scale_noise)
    x <- x + (sigma_next - sigma) v(x, sigma)       one Euler step (scheduler.step)

  text to image   x starts as noise (or the given `latents`), sigma = 1 -> 0
  image to image  x_0 = the init image's latents (one VAE sample from `seed`'s generator), noise drawn
                  next, x starts at the sigma `strength` picks (scheduler.timesteps_for_strength)
  inpainting      the same start (pure noise at strength 1), and after every step the kept (black)
                  region is replaced by x_0 noised to the next sigma with the same noise: the plain
                  transformers never see the mask (diffusers' StableDiffusion3/FluxInpaintPipeline)

Latents stay [B, C, h, w] in the loop (Flux packs them for each transformer call only). LoRA files
load with `load_lora_weights` (lora.py; Flux's original/kohya names in pipeline_flux.py).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..device import array_module, to_device, to_host
from ..memory import get_allocator
from ..planner_images import MMDIT_WIDTHS_PER_TOKEN
from . import image_inputs as ii
from .flow_match import FlowMatchEulerDiscreteScheduler, calculate_shift
from .pipeline import TextToImagePipeline, _open_folder
from .schedulers import load_scheduler

MAX_T5_TOKENS = 512           # diffusers refuses longer T5 prompts (T5's relative positions were trained to 512)
SCORES_PER_CALL = 1 << 24     # the most score elements kernels.attention holds at once (64 MB of float32)


class FlowMatchPipeline(TextToImagePipeline):
    """The shared loop; subclasses set the class attributes and implement the family hooks."""
    family = "flow-matching"
    class_names: tuple = ()          # model_index.json `_class_name`s this class loads
    default_strength = 0.6           # diffusers' SD3 / Flux Img2Img and Inpaint pipelines' default
    default_steps = 28
    default_size = 1024              # the image side when neither height/width nor an init image gives one
    patch = 2                        # latent pixels per token side (SD3: the transformer's patch_size, Flux: 2)

    def __init__(self, transformer, scheduler, vae, name: str = "", default_guidance: float = 7.0,
                 folder: Path | None = None):
        if vae is None:
            raise ValueError(f"{type(self).__name__} needs a vae/")
        self.transformer, self.vae = transformer, vae
        self.scheduler = self._check_scheduler(scheduler)
        self.name, self.default_guidance, self.folder = name, default_guidance, folder
        self.vae_scale_factor = vae.config.downscale
        self.latent_channels = vae.config.latent_channels
        self.adapters = []            # LoRAs applied, oldest first (lora.Adapter)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, name_or_path, scheduler: str | None = None, variant: str | None = None, **parts):
        """A diffusers folder of this family (model_index.json's _class_name) -> the pipeline."""
        folder, index = _open_folder(name_or_path)
        found = index.get("_class_name") or "StableDiffusionPipeline"
        if found not in cls.class_names:
            raise ValueError(f"{folder} holds a {found} model, not one for {cls.__name__}")
        return cls._load(folder, index, scheduler, variant, str(name_or_path), **parts)

    def _check_scheduler(self, scheduler):
        if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            raise ValueError(f"{self.family} models are flow-matching models: they need the "
                             f"FlowMatchEulerDiscreteScheduler ('flow-euler'), not {type(scheduler).__name__}")
        return scheduler

    @classmethod
    def _scheduler(cls, folder: Path, name: str | None):
        return load_scheduler(folder / "scheduler", name)

    def set_scheduler(self, name: str) -> None:
        if self.folder is None:
            raise ValueError("set_scheduler needs a pipeline loaded with from_pretrained")
        self.scheduler = self._check_scheduler(load_scheduler(self.folder / "scheduler", name))

    @property
    def multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's downscale times the tokens' patch size."""
        return self.vae_scale_factor * self.patch

    # ------------------------------------------------------------------ family hooks
    def conditioning(self, prompts, negative_prompt, prompt_embeds, negative_prompt_embeds, n: int,
                     guidance: float, max_sequence_length: int | None, **family_kw) -> dict:
        """-> what `predict` needs (text embeddings, ...), with "rows" (transformer rows per image: 2 with
        guidance by two predictions) and "text_tokens" (the text tokens the transformer attends over)."""
        raise NotImplementedError

    def set_timesteps(self, steps: int, height: int, width: int) -> None:
        raise NotImplementedError

    def predict(self, x, t, cond: dict, guidance: float):
        """latents x [B, C, h, w] at timestep t -> the guided velocity [B, C, h, w]."""
        raise NotImplementedError

    def mu(self, height: int, width: int) -> float:
        """Dynamic shifting's mu for an image of height x width pixels (its token count), from the
        scheduler config, as diffusers' SD3 and Flux pipelines compute it."""
        c = self.scheduler.config
        tokens = (height // self.multiple) * (width // self.multiple)
        return calculate_shift(tokens, c["base_image_seq_len"], c["max_image_seq_len"], c["base_shift"], c["max_shift"])

    # ------------------------------------------------------------------ LoRA
    def lora_parts(self) -> dict:
        raise NotImplementedError

    def convert_lora(self, weights):
        """A family's own spellings -> diffusers names (Flux: the original/kohya names); checks."""
        return weights

    def load_lora_weights(self, lora, scale: float = 1.0, fuse: bool = True):
        """A LoRA safetensors file (diffusers/PEFT or kohya naming; Flux also Black Forest Labs' own names)
        or a lora.LoRAWeights -> applied to the transformer and the CLIP text encoders.

        fuse=True adds scale * B @ A into the weights; fuse=False (and always on a GGUF-quantized
        transformer, whose weights cannot take a sum) keeps the factors beside the weights and adds them
        at run time, so set_lora_scale can change the strength. unload_lora_weights() restores the
        original weights bit for bit. Returns the lora.Adapter."""
        from .lora import LoRAWeights

        weights = lora if isinstance(lora, LoRAWeights) else LoRAWeights.from_file(lora)
        weights = self.convert_lora(weights)
        parts, family = self.lora_parts(), f"this {self.family} model"
        found = weights.resolve(parts, family)
        quantized = [f"{key} is {parts[part][key].qtype.name}" for _, part, key in found
                     if hasattr(parts[part][key], "qtype")]
        if quantized:
            fuse = False                      # a GGUF transformer: the factors run beside the quantized weights
        if not fuse and any(part == "transformer" for _, part, _ in found) and \
                not getattr(self.transformer, "unfused_lora", False):
            why = f"the transformer's weights are quantized ({quantized[0]})" if quantized else "fuse=False was asked"
            raise ValueError(f"LoRA {weights.label}: {why}, so it must be added at run time, which this "
                             f"{type(self.transformer).__name__} does not do yet")
        adapter = weights.apply(parts, scale, fuse, family=family)
        self.adapters.append(adapter)
        return adapter

    # ------------------------------------------------------------------ memory
    def activation_bytes(self, batch: int, height: int, width: int, rows: int = 1, text_tokens: int = 256) -> int:
        """A generous estimate of one step's float32 working set plus the VAE decode."""
        c = self.transformer.config
        f = self.vae_scale_factor
        tokens = (height // self.multiple) * (width // self.multiple) + text_tokens
        width_ = c.num_attention_heads * c.attention_head_dim
        scores = min(c.num_attention_heads * tokens * tokens, SCORES_PER_CALL)
        step = 4 * (batch * rows * tokens * width_ * MMDIT_WIDTHS_PER_TOKEN + 2 * scores)
        v = self.vae.config
        cin = v.block_out_channels[1 if len(v.block_out_channels) > 1 else 0]
        lat = (height // f) * (width // f)
        decode = 4 * batch * max(cin * 9 * height * width, lat * lat)
        return int(max(step, decode))

    # ------------------------------------------------------------------ the loop
    def __call__(self, prompt=None, num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 seed=0, num_images_per_prompt: int = 1, height: int | None = None, width: int | None = None,
                 latents=None, negative_prompt=None, callback=None, output_type: str = "pil", progress: bool = True,
                 prompt_embeds=None, negative_prompt_embeds=None, image=None, mask_image=None,
                 strength: float | None = None, max_sequence_length: int | None = None, **family_kw):
        """prompt(s) -> images (a list of PIL images, or [N, H, W, 3] float32 in [0, 1] with output_type="np").

        `latents` [B, C, h, w] (Flux also diffusers' packed [B, h*w/4, 4C]) replaces the seeded initial
        noise; `callback(step, t, latents)` runs after every step. image to image: `image` (PIL, path or
        [H, W, 3] array; one, or one per image) and `strength` in (0, 1]; inpainting: also `mask_image`
        (same size, white = repaint). strength defaults to 0.6 for both, as in diffusers' SD3 and Flux
        pipelines (1.0 repaints the masked region from pure noise). height and width default to the init
        image's size, else the model's; they must be multiples of `self.multiple`."""
        from tqdm.auto import tqdm

        steps = self.default_steps if num_inference_steps is None else num_inference_steps
        prompts = self._prompts(prompt, prompt_embeds, steps, num_images_per_prompt, output_type)
        if mask_image is not None and image is None:
            raise ValueError("mask_image needs an init image: pass image= as well")
        if image is None and strength is not None:
            raise ValueError("strength needs an init image: pass image= as well")
        if image is not None and latents is not None:
            raise ValueError("latents= replaces the initial noise of text to image; with image= the start "
                             "comes from the image")
        m = self.multiple
        if image is not None:
            strength = ii.check_strength(self.default_strength if strength is None else strength)
            image_size = ii.image_size(image)                                   # (H, W) as given
            init = ii.prepare_image(image, m, height, width)                    # [n, 3, H, W] in [-1, 1]
            height, width = init.shape[-2:]
        height = height or self.default_size
        width = width or self.default_size
        if height % m or width % m or height < m or width < m:
            raise ValueError(f"height and width must be positive multiples of {m} (the VAE's {self.vae_scale_factor}x "
                             f"times {self.patch}x{self.patch} patches), got {height}x{width}")
        if mask_image is not None:
            _, latent_mask = ii.prepare_mask(mask_image, (height, width), self.vae_scale_factor, image_size)
        g = self.default_guidance if guidance_scale is None else float(guidance_scale)
        B = len(prompts) * num_images_per_prompt
        f = self.vae_scale_factor
        shape = (B, self.latent_channels, height // f, width // f)
        if latents is not None:
            latents = self._initial_latents(latents, shape, height, width)
        t0 = time.perf_counter()

        # 1. text conditioning, each prompt repeated num_images_per_prompt times
        cond = self.conditioning(prompts, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                 num_images_per_prompt, g, max_sequence_length, **family_kw)
        need = self.activation_bytes(B, height, width, cond["rows"], cond["text_tokens"])
        get_allocator().check(need, "activations", what=f"{B} image(s) at {height}x{width}")

        # 2. timesteps: image to image runs only the tail that `strength` keeps
        sched = self.scheduler
        self.set_timesteps(int(steps), height, width)
        if image is None:
            timesteps = sched.timesteps
            sched.set_begin_index(0)
        else:
            timesteps = sched.timesteps_for_strength(strength)

        # 3. the starting latents: noise, or the init image's latents noised to timesteps[0]
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        if image is None:
            x = latents if latents is not None else ii.draw_noise(rng, shape)
        else:
            x0 = ii.repeat_to(ii.encode_latents(self.vae, init, rng), B, "init image")   # one VAE sample
            noise = ii.draw_noise(rng, shape)
            full = mask_image is not None and strength == 1.0                  # inpainting from pure noise
            x = noise if full else sched.scale_noise(x0, timesteps[:1], noise)
        if mask_image is not None:
            mask = to_device(ii.repeat_to(latent_mask, B, "mask"))              # [B, 1, h, w], 1 = repaint

        # 4. the denoising loop
        for i, t in enumerate(tqdm(timesteps, disable=not progress, desc="imagine", leave=False)):
            # 4a. the (guided) velocity at this noise level
            v = self.predict(x, t, cond, g)
            # 4b. one Euler step to the next sigma
            x = sched.step(v, t, x, generator=rng).prev_sample
            # 4c. inpainting: the kept region is the init image at the next noise level (the same noise)
            if mask_image is not None:
                known = sched.scale_noise(x0, timesteps[i + 1:i + 2], noise) if i < len(timesteps) - 1 else x0
                x = ii.blend_known(x, known, mask)
            # 4d. live previews
            if callback is not None:
                callback(i, t, x)

        # 5. latents -> pixels
        images = self.decode(x)                                                # [B, H, W, 3] in [0, 1]
        self.last_seconds = time.perf_counter() - t0
        return images if output_type == "np" else self.to_pil(images)

    def _prompts(self, prompt, prompt_embeds, steps, num_images_per_prompt, output_type) -> list:
        if prompt_embeds is not None:
            prompts = [""] * int(prompt_embeds.shape[0])
        else:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        if not prompts:
            raise ValueError("prompt is empty: give a string or a list of strings")
        if not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {steps!r}")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        if output_type not in ("pil", "np"):
            raise ValueError(f"output_type must be 'pil' or 'np', got {output_type!r}")
        return prompts

    def _initial_latents(self, latents, shape: tuple, height: int, width: int):
        """The caller's latents [B, C, h, w] on the device (float32)."""
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents {tuple(latents.shape)} should be {shape}")
        return to_device(np.asarray(to_host(latents), dtype=np.float32))


def check_max_sequence_length(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_T5_TOKENS:
        raise ValueError(f"max_sequence_length must be an integer in 1..{MAX_T5_TOKENS}, got {n!r}")
    return int(n)


def per_prompt(value, P: int, what: str) -> list:
    """A string (every prompt) or a list of P strings -> a list of P strings."""
    values = [value] * P if isinstance(value, str) else list(value)
    if len(values) != P:
        raise ValueError(f"{what} has {len(values)} entries for {P} prompts")
    return values


def repeat_rows(a, n: int):
    """[P, ...] -> [P * n, ...], each row n times in a row (diffusers' num_images_per_prompt order)."""
    return array_module(a).repeat(a, n, axis=0) if n > 1 else a
