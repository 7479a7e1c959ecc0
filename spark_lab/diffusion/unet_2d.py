"""UNet2DModel: the unconditional (or class-conditional) denoiser of DDPM-style models.

    sample [N, Cin, H, W], timestep, class_labels [N] (optional) -> [N, Cout, H, W]

Same skeleton as UNet2DConditionModel, with self-attention over pixels (AttnDownBlock2D,
AttnUpBlock2D, UNetMidBlock2D) in place of text cross-attention.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from ..device import to_device
from .attention import SpatialAttention
from .blocks import DOWN_TYPES, UP_TYPES, DownBlock, MidBlock, UpBlock, check_block_type
from .loading import Params, load_model_folder, nbytes
from .resnet import conv, norm
from .unet_2d_condition import embed_time, mlp_embed


@dataclass
class UNet2DConfig:
    sample_size: int | None = None
    in_channels: int = 3
    out_channels: int = 3
    center_input_sample: bool = False
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    freq_shift: int = 0
    flip_sin_to_cos: bool = True
    down_block_types: tuple = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2D"
    up_block_types: tuple = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    block_out_channels: tuple = (224, 448, 672, 896)
    layers_per_block: int = 2
    mid_block_scale_factor: float = 1.0
    downsample_padding: int = 1
    downsample_type: str = "conv"
    upsample_type: str = "conv"
    act_fn: str = "silu"
    attention_head_dim: int | None = 8       # channels per head (None: one head per block)
    norm_num_groups: int = 32
    attn_norm_num_groups: int | None = None
    norm_eps: float = 1e-5
    resnet_time_scale_shift: str = "default"
    add_attention: bool = True
    class_embed_type: str | None = None
    num_class_embeds: int | None = None      # class-conditional: an embedding table added to the time embedding
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "UNet2DConfig":
        names = {f.name for f in fields(cls)}
        c = cls(**{k: v for k, v in d.items() if k in names and k != "extra"})
        c.extra = {k: v for k, v in d.items() if k not in names and not k.startswith("_")}
        for kind in c.down_block_types:
            check_block_type(kind, DOWN_TYPES[:1] + DOWN_TYPES[2:3], "down")
        for kind in c.up_block_types:
            check_block_type(kind, UP_TYPES[:1] + UP_TYPES[2:3], "up")
        if c.mid_block_type is not None:
            check_block_type(c.mid_block_type, ("UNetMidBlock2D",), "mid")
        if c.time_embedding_type != "positional":
            raise ValueError(f"config time_embedding_type={c.time_embedding_type!r} is not supported (want 'positional')")
        if c.class_embed_type is not None:
            raise ValueError(f"config class_embed_type={c.class_embed_type!r} is not supported (use num_class_embeds)")
        if c.downsample_type != "conv" or c.upsample_type != "conv":
            raise ValueError("config downsample_type/upsample_type other than 'conv' is not supported")
        return c


class UNet2DModel:
    def __init__(self, config: UNet2DConfig, params: Params):
        self.config, self.params = config, params
        c, p = config, params
        n = len(c.block_out_channels)
        rkw = dict(groups=c.norm_num_groups, eps=c.norm_eps, time_embedding_norm=c.resnet_time_scale_shift)

        def spatial(ch):
            dim = c.attention_head_dim or ch
            return lambda q: SpatialAttention(q, ch // dim, c.norm_num_groups, c.norm_eps)

        self.down = []
        for i, kind in enumerate(c.down_block_types):
            ch = c.block_out_channels[i]
            attn = spatial(ch) if kind == "AttnDownBlock2D" else None
            self.down.append(DownBlock(p.sub(f"down_blocks.{i}"), c.layers_per_block, rkw, i < n - 1,
                                       c.downsample_padding, attn))
        self.mid = None
        if c.mid_block_type is not None:
            ch = c.block_out_channels[-1]
            groups = c.attn_norm_num_groups or (c.norm_num_groups if c.resnet_time_scale_shift == "default" else None)
            dim = c.attention_head_dim or ch
            attn = (lambda q: SpatialAttention(q, ch // dim, groups, c.norm_eps, c.mid_block_scale_factor)) \
                if c.add_attention else None
            self.mid = MidBlock(p.sub("mid_block"), 1, dict(rkw, output_scale_factor=c.mid_block_scale_factor), attn)
        rch = list(c.block_out_channels)[::-1]
        self.up = []
        for i, kind in enumerate(c.up_block_types):
            attn = spatial(rch[i]) if kind == "AttnUpBlock2D" else None
            self.up.append(UpBlock(p.sub(f"up_blocks.{i}"), c.layers_per_block + 1, rkw, i < n - 1, attn))

    @classmethod
    def from_pretrained(cls, path: str | Path, subfolder: str | None = None, variant: str | None = None):
        folder = Path(path) / subfolder if subfolder else Path(path)
        config, params = load_model_folder(folder, variant)
        return cls(UNet2DConfig.from_dict(config), params)

    @property
    def nbytes(self) -> int:
        return nbytes(self.params)

    def __call__(self, sample, timestep, class_labels=None, encoder_hidden_states=None):
        """sample [N, Cin, H, W], timestep scalar or [N], class_labels [N] int -> [N, Cout, H, W]."""
        c, p = self.config, self.params
        if sample.ndim != 4 or sample.shape[1] != c.in_channels:
            raise ValueError(f"UNet2DModel: sample {tuple(sample.shape)} should be [N, {c.in_channels}, H, W]")
        sample = to_device(sample, np.float32)            # host inputs move once, explicitly (no-op on the device)
        N = sample.shape[0]
        if c.center_input_sample:
            sample = 2.0 * sample - 1.0
        emb = mlp_embed(p.sub("time_embedding"),
                        embed_time(timestep, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift, N))
        if c.num_class_embeds is not None:
            if class_labels is None:
                raise ValueError("class_labels should be provided when doing class conditioning")
            labels = np.asarray(class_labels).reshape(-1).astype(np.int64)
            if labels.min() < 0 or labels.max() >= c.num_class_embeds:
                raise ValueError(f"class label out of range [0, {c.num_class_embeds})")
            emb = emb + p["class_embedding.weight"][to_device(np.broadcast_to(labels, (N,)))]
        elif class_labels is not None:
            raise ValueError("class_labels given, but the model has no class embedding (num_class_embeds is None)")
        x = conv(p.sub("conv_in"), sample)                                  # [N, C0, H, W]
        skips = [x]
        for blk in self.down:
            x, s = blk(x, emb)
            skips += s
        if self.mid is not None:
            x = self.mid(x, emb)
        for blk in self.up:
            x = blk(x, skips, emb)
        groups = c.norm_num_groups or min(c.block_out_channels[0] // 4, 32)
        x = norm(p.sub("conv_norm_out"), x, groups, c.norm_eps, act=True)
        return conv(p.sub("conv_out"), x)                                   # [N, Cout, H, W]
