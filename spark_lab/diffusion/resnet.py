"""The convolutional pieces of a UNet / VAE: ResnetBlock2D, Downsample2D, Upsample2D.

Weight names follow diffusers (`norm1`, `conv1`, `time_emb_proj`, `norm2`, `conv2`,
`conv_shortcut`; `downsamplers.0.conv`, `upsamplers.0.conv`), so a diffusers checkpoint
loads without renaming. All activations are float32 [N, C, H, W].
"""
from __future__ import annotations

import numpy as np

from ..device import array_module
from ..kernels import conv2d, group_norm, linear, silu, upsample_nearest2d
from ..kernels.conv import upsample2x_conv3x3
from .loading import Params
from .lora import with_lora, with_lora_conv


def conv(p: Params, x, stride=1, padding=None):
    """A diffusers Conv2d by name; `same` padding (k // 2) unless given; plus any unfused LoRA on it."""
    w = p["weight"]
    pad = w.shape[-1] // 2 if padding is None else padding
    return with_lora_conv(p, x, conv2d(x, w, p.get("bias"), stride=stride, padding=pad), stride, pad)


def norm(p: Params, x, groups: int, eps: float, act: bool = False):
    """GroupNorm by name; act=True: followed by SiLU, in the same pass."""
    return group_norm(x, groups, p["weight"], p["bias"], eps, silu=act)


class ResnetBlock2D:
    """GroupNorm -> SiLU -> conv -> (+ time embedding) -> GroupNorm -> SiLU -> conv, plus a skip."""

    def __init__(self, p: Params, groups: int, eps: float, output_scale_factor: float = 1.0,
                 time_embedding_norm: str = "default", groups_out: int | None = None):
        if time_embedding_norm not in ("default", "scale_shift"):
            raise ValueError(f"ResnetBlock2D: time_embedding_norm {time_embedding_norm!r} is not supported "
                             "(want 'default' or 'scale_shift')")
        self.p, self.groups, self.eps = p, groups, eps
        self.groups_out = groups_out or groups
        self.scale = float(output_scale_factor)
        self.time_norm = time_embedding_norm
        self.has_temb = "time_emb_proj.weight" in p
        self.has_shortcut = "conv_shortcut.weight" in p

    def __call__(self, x, temb=None):
        p = self.p
        h = norm(p.sub("norm1"), x, self.groups, self.eps, act=True)      # [N, Cin, H, W] (GroupNorm -> SiLU)
        h = conv(p.sub("conv1"), h)                                        # [N, Cout, H, W]
        scale = shift = None
        if self.has_temb and temb is not None:
            e = silu(temb)
            t = with_lora(p, "time_emb_proj", e, linear(e, p["time_emb_proj.weight"], p["time_emb_proj.bias"]))
            # t: [N, Cout] (x2 for scale_shift)
            t = t[:, :, None, None]
            if self.time_norm == "default":
                h = h + t
            else:
                c = t.shape[1] // 2
                scale, shift = t[:, :c], t[:, c:]
        if scale is None:
            h = norm(p.sub("norm2"), h, self.groups_out, self.eps, act=True)
        else:
            h = silu(norm(p.sub("norm2"), h, self.groups_out, self.eps) * (1.0 + scale) + shift)
        h = conv(p.sub("conv2"), h)                                        # [N, Cout, H, W]
        skip = conv(p.sub("conv_shortcut"), x) if self.has_shortcut else x
        out = skip + h
        return out if self.scale == 1.0 else out * (1.0 / self.scale)


class Downsample2D:
    """Stride-2 3x3 conv; diffusers' padding=0 variant pads right/bottom by one first (VAE encoder)."""

    def __init__(self, p: Params, padding: int = 1):
        self.p, self.padding = p, padding

    def __call__(self, x):
        if "conv.weight" not in self.p:   # use_conv=False: 2x2 average pool
            N, C, H, W = x.shape
            return x[:, :, :H // 2 * 2, :W // 2 * 2].reshape(N, C, H // 2, 2, W // 2, 2).mean(axis=(3, 5))
        if self.padding == 0:
            x = array_module(x).pad(x, ((0, 0), (0, 0), (0, 1), (0, 1)))
        return conv(self.p.sub("conv"), x, stride=2, padding=self.padding)   # [N, C, H/2, W/2]


class Upsample2D:
    """Nearest x2 (or to an explicit size), then a 3x3 conv."""

    def __init__(self, p: Params):
        self.p = p

    def __call__(self, x, size=None):
        has_conv = "conv.weight" in self.p
        if size is None or tuple(size) == (x.shape[2] * 2, x.shape[3] * 2):
            if has_conv and self.p["conv.weight"].shape[-2:] == (3, 3) and "conv.lora" not in self.p:
                return upsample2x_conv3x3(x, self.p["conv.weight"], self.p.get("conv.bias"))  # [N, O, 2H, 2W]
            x = upsample_nearest2d(x, 2)                                   # [N, C, 2H, 2W]
        else:                                                              # odd sizes: nearest to `size`
            H, W = x.shape[2:]
            xp = array_module(x)
            hi = xp.arange(size[0]) * H // size[0]
            wi = xp.arange(size[1]) * W // size[1]
            x = x[:, :, hi][:, :, :, wi]
        if has_conv:
            x = conv(self.p.sub("conv"), x)
        return x
