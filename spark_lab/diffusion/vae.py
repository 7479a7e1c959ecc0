"""AutoencoderKL: images [N, 3, H, W] in [-1, 1] <-> latents [N, C, H/f, W/f], f = 2**(levels-1).

encode: conv_in -> DownEncoderBlock2D x levels -> mid (resnet, attention, resnet) -> GroupNorm,
        SiLU, conv_out -> quant_conv -> (mean, logvar): a diagonal Gaussian over latents.
decode: post_quant_conv -> conv_in -> mid -> UpDecoderBlock2D x levels -> GroupNorm, SiLU, conv_out.
The pipeline scales latents by `scaling_factor` (and `shift_factor`) around the UNet.
SD3 and Flux VAEs have 16 latent channels, no quant_conv / post_quant_conv (use_quant_conv and
use_post_quant_conv false) and a shift_factor: denoiser latents = (z - shift_factor) * scaling_factor.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from ..device import array_module, to_device
from ..kernels import silu
from .attention import SpatialAttention
from .blocks import DownBlock, MidBlock, UpBlock, check_block_type
from .loading import Params, load_model_folder, nbytes
from .resnet import conv, norm


@dataclass
class AutoencoderKLConfig:
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = ("DownEncoderBlock2D",)
    up_block_types: tuple = ("UpDecoderBlock2D",)
    block_out_channels: tuple = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215             # latents are multiplied by this before the UNet
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "AutoencoderKLConfig":
        names = {f.name for f in fields(cls)}
        c = cls(**{k: v for k, v in d.items() if k in names and k != "extra"})
        c.extra = {k: v for k, v in d.items() if k not in names and not k.startswith("_")}
        for kind in c.down_block_types:
            check_block_type(kind, ("DownEncoderBlock2D",), "VAE down")
        for kind in c.up_block_types:
            check_block_type(kind, ("UpDecoderBlock2D",), "VAE up")
        return c

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass
class DiagonalGaussian:
    mean: object     # [N, C, h, w]
    logvar: object   # [N, C, h, w], clamped to [-30, 20] like diffusers
    std: object

    def mode(self):
        return self.mean

    def sample(self, seed=None):
        xp = array_module(self.mean)
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        eps = xp.asarray(rng.standard_normal(self.mean.shape, dtype=np.float32))
        return self.mean + self.std * eps


class AutoencoderKL:
    def __init__(self, config: AutoencoderKLConfig, params: Params):
        self.config, self.params = config, params
        c, p = config, params
        g, eps = c.norm_num_groups, 1e-6
        rkw = dict(groups=g, eps=eps)
        n = len(c.block_out_channels)

        def mid(q):
            attn = (lambda a: SpatialAttention(a, 1, g, eps)) if c.mid_block_add_attention else None
            return MidBlock(q.sub("mid_block"), 1, rkw, attn)

        e = p.sub("encoder")
        self.enc_down = [DownBlock(e.sub(f"down_blocks.{i}"), c.layers_per_block, rkw, i < n - 1, 0)
                         for i in range(n)]
        self.enc_mid = mid(e)
        d = p.sub("decoder")
        self.dec_mid = mid(d)
        self.dec_up = [UpBlock(d.sub(f"up_blocks.{i}"), c.layers_per_block + 1, rkw, i < n - 1) for i in range(n)]

    @classmethod
    def from_pretrained(cls, path: str | Path, subfolder: str | None = None, variant: str | None = None):
        folder = Path(path) / subfolder if subfolder else Path(path)
        config, params = load_model_folder(folder, variant)
        return cls(AutoencoderKLConfig.from_dict(config), params)

    @property
    def nbytes(self) -> int:
        return nbytes(self.params)

    def encode(self, x) -> DiagonalGaussian:
        """images [N, 3, H, W] in [-1, 1] -> latent distribution over [N, C, H/f, W/f]."""
        c, e = self.config, self.params.sub("encoder")
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"AutoencoderKL.encode: x {tuple(x.shape)} should be [N, {c.in_channels}, H, W]")
        h = conv(e.sub("conv_in"), to_device(x, np.float32))             # host images move once, explicitly
        for blk in self.enc_down:
            h, _ = blk(h)
        h = self.enc_mid(h)
        h = conv(e.sub("conv_out"), silu(norm(e.sub("conv_norm_out"), h, c.norm_num_groups, 1e-6)))  # [N, 2C, h, w]
        if c.use_quant_conv and "quant_conv.weight" in self.params:
            h = conv(self.params.sub("quant_conv"), h)
        k = h.shape[1] // 2
        xp = array_module(h)
        logvar = xp.clip(h[:, k:], -30.0, 20.0)
        return DiagonalGaussian(h[:, :k], logvar, xp.exp(0.5 * logvar))

    def decode(self, z):
        """latents [N, C, h, w] (already divided by scaling_factor) -> images [N, 3, H, W] (about [-1, 1])."""
        c, d = self.config, self.params.sub("decoder")
        if z.ndim != 4 or z.shape[1] != c.latent_channels:
            raise ValueError(f"AutoencoderKL.decode: z {tuple(z.shape)} should be [N, {c.latent_channels}, h, w]")
        z = to_device(z, np.float32)
        if c.use_post_quant_conv and "post_quant_conv.weight" in self.params:
            z = conv(self.params.sub("post_quant_conv"), z)
        h = conv(d.sub("conv_in"), z)
        h = self.dec_mid(h)
        for blk in self.dec_up:
            h = blk(h)
        h = silu(norm(d.sub("conv_norm_out"), h, c.norm_num_groups, 1e-6))
        return conv(d.sub("conv_out"), h)
