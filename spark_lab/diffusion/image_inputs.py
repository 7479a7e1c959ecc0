"""Image-to-image and inpainting: the init image, the mask, and the latents a denoising loop starts from.

Written once for every pipeline family: the SD 1.x / SDXL pipelines (DDPM, DDIM, Euler) use it, and
a flow-matching pipeline (SD3, Flux) reuses the same functions, since `noise_to` knows each
scheduler kind:

    init = prepare_image(image, f)                        # [n, 3, H, W] in [-1, 1]
    mask, mask_latent = prepare_mask(mask_image, init.shape[-2:], f)   # white = repaint
    timesteps, start = strength_timesteps(sched, steps, strength)      # strength in (0, 1]
    x0 = encode_latents(vae, init, rng)                   # VAE sample, scaled (shift, mean/std)
    x, noise = prepare_init_latents(sched, x0, start, B, rng)          # noised to timesteps[0]
    for i, t in enumerate(timesteps):
        ...denoise x one step...
        x = blend_known(x, noise_to(sched, x0, noise, start + i + 1), mask_latent)  # plain UNet inpainting

The draws from `rng` follow diffusers' order (VAE sample, then the noise), so a pipeline seeded
the same way as diffusers' `randn_tensor` calls gives the same images.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..device import array_module, to_device

LUMA = (0.299, 0.587, 0.114)   # PIL's "L" conversion (ITU-R 601-2), as diffusers' mask processor applies it


# ----------------------------------------------------------------------------- pixels

def open_image(path, what: str = "image"):
    """A picture file -> a loaded PIL image; one clear line when it is missing or unreadable."""
    from PIL import Image, UnidentifiedImageError
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"missing {what} file: {p}")
    try:
        image = Image.open(p)
        image.load()
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{what} {p} is not an image file Pillow can read ({e})") from None
    return image


def load_image(image, what: str = "image") -> np.ndarray:
    """A PIL image, a file path or an array [H, W, C] / [H, W] (uint8, or float in [0, 1])
    -> [H, W, C] float32 in [0, 1] on the host (C = 3 for RGB, 1 for grayscale)."""
    if isinstance(image, (str, Path)):
        image = open_image(image, what)
    if hasattr(image, "convert") and hasattr(image, "mode"):          # PIL
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        a = np.asarray(image)
    else:
        a = np.asarray(image)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4) or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"{what} of shape {a.shape} is not an image [H, W] or [H, W, 1|3|4]")
    if a.dtype == np.uint8:
        out = a.astype(np.float32) / np.float32(255.0)
    elif np.issubdtype(a.dtype, np.floating):
        out = a.astype(np.float32)
        if not np.isfinite(out).all() or out.min() < 0.0 or out.max() > 1.0:
            raise ValueError(f"{what} holds floats outside [0, 1]")
    else:
        raise ValueError(f"{what} has dtype {a.dtype}; give uint8 or floats in [0, 1]")
    return out[:, :, :3] if out.shape[2] == 4 else out


def _size_of(image, what: str):
    """(H, W) of one image without converting it."""
    if hasattr(image, "size") and hasattr(image, "mode"):
        w, h = image.size
        return h, w
    return tuple(load_image(image, what).shape[:2])


def image_size(image) -> tuple:
    """(H, W) of an init image (the first of a list) as given, before any resizing."""
    first = image[0] if isinstance(image, (list, tuple)) and image else image
    return _size_of(first, "image")


def prepare_image(image, multiple: int, height: int | None = None, width: int | None = None):
    """One image or a list of same-size images -> [n, 3, H, W] float32 in [-1, 1] (the VAE's input).

    H and W must be multiples of `multiple` (the VAE's downscale): PIL images of another size are
    resized to (height, width) or to their size rounded down (Lanczos, as diffusers does); arrays
    are refused."""
    images = list(image) if isinstance(image, (list, tuple)) else [image]
    if not images:
        raise ValueError("image is an empty list")
    out = []
    for im in images:
        h0, w0 = _size_of(im, "image")
        h = height or h0 // multiple * multiple
        w = width or w0 // multiple * multiple
        if h < multiple or w < multiple or h % multiple or w % multiple:
            raise ValueError(f"image size {w}x{h} must be a positive multiple of {multiple}")
        if (h, w) != (h0, w0):
            if not hasattr(im, "resize") or not hasattr(im, "mode"):
                raise ValueError(f"image is {w0}x{h0}; give a PIL image (resized for you) or an array "
                                 f"{w}x{h} (multiples of {multiple})")
            from PIL import Image
            im = (im if im.mode in ("RGB", "L") else im.convert("RGB")).resize((w, h), resample=Image.LANCZOS)
        a = load_image(im, "image")
        if a.shape[2] == 1:
            a = np.repeat(a, 3, axis=2)
        out.append(a)
    if len({a.shape for a in out}) > 1:
        raise ValueError(f"the init images differ in size: {sorted({a.shape[:2] for a in out})}")
    x = np.stack(out).transpose(0, 3, 1, 2)                              # [n, 3, H, W] in [0, 1]
    return np.ascontiguousarray(x * 2.0 - 1.0, dtype=np.float32)


def prepare_mask(mask_image, size: tuple, multiple: int, image_size: tuple | None = None):
    """mask (white = repaint, black = keep) -> (pixel mask [n, 1, H, W], latent mask [n, 1, H/f, W/f]),
    float32 0/1 on the host. Gray levels are binarised at 0.5 like diffusers. The mask must be
    exactly the init image's size as given (`image_size`, default `size`); when prepare_image
    resized that image to `size`, a PIL mask is resized the same way."""
    masks = list(mask_image) if isinstance(mask_image, (list, tuple)) else [mask_image]
    image_size = tuple(image_size or size)
    out = []
    for m in masks:
        h, w = _size_of(m, "mask")
        if (h, w) != image_size:
            raise ValueError(f"mask is {w}x{h} but the init image is {image_size[1]}x{image_size[0]}; "
                             "give a mask of the same size")
        if (h, w) != tuple(size):
            if not hasattr(m, "resize") or not hasattr(m, "mode"):
                raise ValueError(f"mask is {w}x{h}; the init image was resized to {size[1]}x{size[0]}: "
                                 "give the mask as a PIL image, or both at a multiple of the VAE's factor")
            from PIL import Image
            m = (m if m.mode in ("RGB", "L") else m.convert("RGB")).resize((size[1], size[0]), resample=Image.LANCZOS)
        a = load_image(m, "mask")                                        # [H, W, C] in [0, 1]
        if a.shape[2] == 3:
            g = a @ np.asarray(LUMA, np.float32)                          # [H, W]
            if hasattr(m, "mode"):                                        # PIL rounds its "L" to 8 bits
                g = np.round(g * 255.0) / 255.0
        else:
            g = a[:, :, 0]
        out.append((g >= 0.5).astype(np.float32))
    pixel = np.stack(out)[:, None]                                       # [n, 1, H, W]
    latent = np.ascontiguousarray(pixel[:, :, ::multiple, ::multiple])  # nearest, as torch's interpolate
    return pixel, latent


def repeat_to(a, batch: int, what: str):
    """[n, ...] -> [batch, ...] when n divides batch (one init image for every prompt and image)."""
    n = a.shape[0]
    if n == batch:
        return a
    if batch % n:
        raise ValueError(f"{n} {what}s cannot be shared by {batch} images (give 1 or {batch})")
    return array_module(a).concatenate([a] * (batch // n), axis=0)


# ----------------------------------------------------------------------------- latents

def check_strength(strength) -> float:
    s = float(strength)
    if not 0.0 < s <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    return s


def strength_timesteps(scheduler, num_inference_steps: int, strength: float):
    """The tail of the schedule that `strength` keeps: (timesteps, index of the first in scheduler.timesteps).

    strength 1 runs every step from pure noise; 0.5 starts half way down the noise levels, so the
    result keeps the init image's layout (diffusers' get_timesteps: int(steps * strength) steps)."""
    strength = check_strength(strength)
    n = min(int(num_inference_steps * strength), num_inference_steps)
    start = max(num_inference_steps - n, 0) * getattr(scheduler, "order", 1)
    timesteps = scheduler.timesteps[start:]
    if len(timesteps) < 1:
        raise ValueError(f"strength {strength} with {num_inference_steps} steps leaves no step to run "
                         "(raise the strength or the steps)")
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return timesteps, start


def latent_stats(vae):
    """How VAE latents map to the UNet's: (scale, shift, mean, std) with mean/std per channel or None."""
    c = vae.config
    mean, std = c.extra.get("latents_mean"), c.extra.get("latents_std")
    shift = float(c.shift_factor) if c.shift_factor else 0.0
    return float(c.scaling_factor), shift, mean, std


def encode_latents(vae, images, rng, sample: bool = True):
    """images [n, 3, H, W] in [-1, 1] -> latents [n, C, H/f, W/f] as the denoiser sees them.

    diffusers samples the VAE's Gaussian (one draw from rng of the latents' shape) and scales it:
    (z - shift) * scaling_factor, or (z - mean) * scaling_factor / std when the VAE config has
    latents_mean/latents_std (SDXL-style). sample=False takes the mean (deterministic)."""
    dist = vae.encode(to_device(images, np.float32))
    z = dist.sample(rng) if sample else dist.mode()
    scale, shift, mean, std = latent_stats(vae)
    xp = array_module(z)
    if mean is not None and std is not None:
        m = xp.asarray(np.asarray(mean, np.float32).reshape(1, -1, 1, 1))
        s = xp.asarray(np.asarray(std, np.float32).reshape(1, -1, 1, 1))
        return ((z - m) * scale / s).astype(np.float32, copy=False)
    if shift:
        z = z - shift
    return (z * scale).astype(np.float32, copy=False)


def decode_input(vae, latents):
    """The inverse of encode_latents' scaling: denoiser latents -> what vae.decode takes."""
    scale, shift, mean, std = latent_stats(vae)
    xp = array_module(latents)
    if mean is not None and std is not None:
        m = xp.asarray(np.asarray(mean, np.float32).reshape(1, -1, 1, 1))
        s = xp.asarray(np.asarray(std, np.float32).reshape(1, -1, 1, 1))
        return latents * s * (1.0 / scale) + m
    x = latents * (1.0 / scale)
    return x + shift if shift else x


def noise_to(scheduler, x0, noise, index: int):
    """x0 noised to the noise level at position `index` of scheduler.timesteps (one schedule, every kind):

        DDPM / DDIM (alphas)      sqrt(abar_t) x0 + sqrt(1 - abar_t) noise
        Euler (sigmas)            x0 + sigma noise
        flow matching (sigmas)    (1 - sigma) x0 + sigma noise
    """
    from .schedulers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    xp = array_module(x0)
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler) or getattr(scheduler, "flow_matching", False):
        s = float(scheduler.sigmas[index])
        return (x0 * (1.0 - s) + noise * s).astype(np.float32, copy=False)
    if isinstance(scheduler, EulerDiscreteScheduler):
        return (x0 + noise * float(scheduler.sigmas[index])).astype(np.float32, copy=False)
    t = scheduler.timesteps[index]
    out = scheduler.add_noise(x0, noise, np.asarray([t]))
    return xp.asarray(out).astype(np.float32, copy=False)


def draw_noise(rng, shape):
    """Standard normal noise from the pipeline's generator, placed on the device."""
    return to_device(rng.standard_normal(shape, dtype=np.float32))


def prepare_init_latents(scheduler, image_latents, start: int, batch: int, rng, from_noise: bool = False):
    """Image-to-image's starting point: (latents, noise) for a batch.

    image_latents [n, C, h, w] (encode_latents) are repeated to the batch, one noise draw of
    the batch's shape follows, and the latents are noised to timesteps[start]. from_noise
    (inpainting at strength 1) starts from the noise alone, scaled by init_noise_sigma."""
    x0 = repeat_to(image_latents, batch, "init image")
    noise = draw_noise(rng, tuple(x0.shape))
    if from_noise:
        return noise * float(scheduler.init_noise_sigma), noise
    return noise_to(scheduler, x0, noise, start), noise


def blend_known(latents, known, mask):
    """Inpainting with a UNet that never saw a mask (diffusers' legacy way): after every step the
    kept region (mask 0) is replaced by the init image's latents noised to the next level.
    latents, known [B, C, h, w]; mask [B or 1, 1, h, w] with 1 = repaint."""
    return (1.0 - mask) * known + mask * latents
