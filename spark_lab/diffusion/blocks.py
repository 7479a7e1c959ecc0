"""UNet / VAE stages: a down block, the mid block and an up block, for every diffusers block type.

    DownBlock2D / DownEncoderBlock2D    resnets (+ Downsample2D)
    CrossAttnDownBlock2D                resnet -> Transformer2D (text cross-attention), repeated
    AttnDownBlock2D                     resnet -> SpatialAttention, repeated
    UNetMidBlock2DCrossAttn             resnet, then [Transformer2D, resnet] x num_layers
    UNetMidBlock2D                      resnet, then [SpatialAttention or nothing, resnet] x num_layers
    UpBlock2D / CrossAttnUpBlock2D / AttnUpBlock2D / UpDecoderBlock2D
                                        like the down blocks, each resnet first concatenates
                                        the matching skip from the way down (not in the VAE)

`attn` below is a factory `(Params) -> callable(x, context)`, so one class covers the
plain, spatial-attention and cross-attention variants.
"""
from __future__ import annotations

from .resnet import Downsample2D, ResnetBlock2D, Upsample2D
from .loading import Params

DOWN_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D", "AttnDownBlock2D", "DownEncoderBlock2D")
UP_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D", "AttnUpBlock2D", "UpDecoderBlock2D")
MID_TYPES = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D")


def check_block_type(kind: str | None, allowed: tuple, where: str) -> None:
    if kind not in allowed:
        raise ValueError(f"unsupported {where} block type {kind!r} (supported: {', '.join(allowed)})")


def _concat(a, b):
    from ..device import array_module
    return array_module(a).concatenate([a, b], axis=1)


class DownBlock:
    def __init__(self, p: Params, num_layers: int, resnet_kw: dict, add_downsample: bool,
                 downsample_padding: int = 1, attn=None):
        self.resnets = [ResnetBlock2D(p.sub(f"resnets.{j}"), **resnet_kw) for j in range(num_layers)]
        self.attentions = [attn(p.sub(f"attentions.{j}")) for j in range(num_layers)] if attn else []
        self.down = Downsample2D(p.sub("downsamplers.0"), downsample_padding) if add_downsample else None

    def __call__(self, x, temb=None, context=None):
        """x [N, Cin, H, W] -> (x [N, Cout, H', W'], the skips for the up path)."""
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions:
                x = self.attentions[j](x, context)
            skips.append(x)
        if self.down is not None:
            x = self.down(x)
            skips.append(x)
        return x, skips


class MidBlock:
    def __init__(self, p: Params, num_layers: int, resnet_kw: dict, attn=None):
        self.resnets = [ResnetBlock2D(p.sub(f"resnets.{j}"), **resnet_kw) for j in range(num_layers + 1)]
        self.attentions = [attn(p.sub(f"attentions.{j}")) if attn else None for j in range(num_layers)]

    def __call__(self, x, temb=None, context=None):
        x = self.resnets[0](x, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            if attn is not None:
                x = attn(x, context)
            x = resnet(x, temb)
        return x


class UpBlock:
    def __init__(self, p: Params, num_layers: int, resnet_kw: dict, add_upsample: bool, attn=None):
        self.resnets = [ResnetBlock2D(p.sub(f"resnets.{j}"), **resnet_kw) for j in range(num_layers)]
        self.attentions = [attn(p.sub(f"attentions.{j}")) for j in range(num_layers)] if attn else []
        self.up = Upsample2D(p.sub("upsamplers.0")) if add_upsample else None

    def __call__(self, x, skips=None, temb=None, context=None, upsample_size=None):
        """skips: the down path's outputs, consumed from the end (the VAE decoder passes None)."""
        for j, resnet in enumerate(self.resnets):
            if skips is not None:
                x = _concat(x, skips.pop())                  # [N, C + Cskip, H, W]
            x = resnet(x, temb)
            if self.attentions:
                x = self.attentions[j](x, context)
        if self.up is not None:
            x = self.up(x, upsample_size)
        return x
