"""Text to image: prompts -> text embeddings -> seeded noise -> denoising loop -> (VAE) -> PIL images.

Two kinds of model folders load here:
  * Stable Diffusion-style diffusers folders: unet/, vae/, text_encoder/ (CLIP), tokenizer/, scheduler/.
  * spark-emoji-style folders: unet/ in pixel space and scheduler/ only, with
    `"_spark_lab_text_encoder": "all-minilm-l6-v2"` in model_index.json: the prompt is one
    sentence embedding, `encoder_hidden_states = encode(prompts)[:, None, :]` ([B, 1, 384]),
    and the unconditional embedding is zeros of the same shape.

    pipe = TextToImagePipeline.from_pretrained("spark-emoji")
    images = pipe("a smiling cat", num_inference_steps=25, guidance_scale=3.0, seed=0)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..device import array_module, to_device, to_host
from ..memory import get_allocator
from .attention import SCORES_PER_CHUNK
from .loading import read_json
from .schedulers import load_scheduler
from .unet_2d_condition import UNet2DConditionModel
from .vae import AutoencoderKL

DEFAULT_GUIDANCE = 7.5           # diffusers' StableDiffusionPipeline default
DEFAULT_GUIDANCE_SENTENCE = 4.0  # sentence-embedding models whose model_index.json sets no _spark_lab_guidance_scale


class TextToImagePipeline:
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

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, name_or_path="spark-emoji", scheduler: str | None = None, variant: str | None = None):
        """A catalogue name, a diffusers folder or (online) a Hugging Face repo id."""
        from ..models import resolve
        from ..text.clip import CLIPTextModel, CLIPTokenizer

        folder = Path(resolve(name_or_path, kind="diffusion"))
        if not folder.is_dir():
            raise FileNotFoundError(f"missing diffusers folder: {folder}")
        index = read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}

        def sub(name):
            p = folder / name
            if not p.is_dir():
                raise FileNotFoundError(f"missing {name}/ folder in {folder}: {p}")
            return p

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
        return cls(unet, sched, vae, text_encoder, tokenizer, sentence, name=str(name_or_path),
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
            vc = self.vae.config
            x = x * (1.0 / vc.scaling_factor)
            if vc.shift_factor:
                x = x + float(vc.shift_factor)
            x = self.vae.decode(x)
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
                 progress: bool = True, eta: float = 0.0, prompt_embeds=None, negative_prompt_embeds=None):
        """prompt(s) -> images. `prompt_embeds` [P, L, ctx] (and `negative_prompt_embeds`) skip the text
        encoder; `latents` [B, C, h, w] replaces the seeded initial noise; `callback(step, t, latents)`
        runs after every step (live previews: `pipe.decode(latents)`)."""
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
        height = height or (c.sample_size or 64) * f
        width = width or (c.sample_size or 64) * f
        if height % f or width % f or height < f or width < f:
            raise ValueError(f"height and width must be positive multiples of {f}, got {height}x{width}")
        g = self.default_guidance if guidance_scale is None else float(guidance_scale)
        cfg = g > 1.0
        B = len(prompts) * num_images_per_prompt
        shape = (B, c.in_channels, height // f, width // f)
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents {tuple(latents.shape)} should be {shape}")
        get_allocator().check(self.activation_bytes(B, height, width, cfg), "activations",
                              what=f"{B} image(s) at {height}x{width}")
        t0 = time.perf_counter()

        # 1. text embeddings, each prompt repeated num_images_per_prompt times; unconditional first for CFG
        cond = self.encode_prompt(prompts) if prompt_embeds is None else to_device(prompt_embeds, np.float32)
        xp = array_module(cond)                                                # cond [P, L, ctx]
        context = xp.repeat(cond, num_images_per_prompt, axis=0)              # [B, L, ctx]
        if cfg:
            uncond = (self.unconditional(cond, negative_prompt) if negative_prompt_embeds is None
                      else to_device(negative_prompt_embeds, np.float32))
            uncond = xp.repeat(uncond, num_images_per_prompt, axis=0)
            context = xp.concatenate([uncond, context], axis=0)               # [2B, L, ctx]

        # 2. timesteps
        sched = self.scheduler
        sched.set_timesteps(int(num_inference_steps))

        # 3. initial noise: standard normal from the seed (the same seed gives the same image)
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        if latents is None:
            latents = rng.standard_normal(shape, dtype=np.float32)
        x = to_device(np.asarray(to_host(latents), dtype=np.float32)) * float(sched.init_noise_sigma)
        xp = array_module(x)

        # 4. the denoising loop
        step_kw = {"eta": eta} if "eta" in sched.step.__code__.co_varnames else {}
        for i, t in enumerate(tqdm(sched.timesteps, disable=not progress, desc="imagine", leave=False)):
            # 4a. one UNet call for both halves of classifier-free guidance (the same x, two contexts)
            x_in = sched.scale_model_input(x, t)
            out = self.unet(x_in, t, context, repeat=2 if cfg else 1)           # [2B or B, C, h, w]
            # 4b. guidance: push away from the unconditional prediction
            if cfg:
                out_u, out_c = out[:B], out[B:]
                out = out_u + g * (out_c - out_u)
            # 4c. the scheduler turns the prediction into x_{t-1}
            x = sched.step(out, t, x, generator=rng, **step_kw).prev_sample
            # 4d. live previews
            if callback is not None:
                callback(i, t, x)

        # 5. latents -> pixels
        images = self.decode(x)                                                # [B, H, W, 3] in [0, 1]
        seconds = time.perf_counter() - t0
        self.last_seconds = seconds
        return images if output_type == "np" else self.to_pil(images)
