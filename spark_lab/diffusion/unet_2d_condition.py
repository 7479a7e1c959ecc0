"""UNet2DConditionModel: the text-conditioned denoiser of Stable Diffusion-style models.

    sample [N, Cin, H, W], timestep t, encoder_hidden_states [N, L, Ctx] -> noise/velocity [N, Cout, H, W]

time embedding: sinusoid(t) -> linear -> SiLU -> linear  (+ class embedding when configured)
SDXL's added conditioning (addition_embed_type="text_time"): each of the k micro-conditioning
numbers (original size, crop corner, target size) -> sinusoid [addition_time_embed_dim], then
concat(pooled text embedding, those) -> linear -> SiLU -> linear, added to the time embedding.
conv_in -> down blocks (keep every output as a skip) -> mid block -> up blocks (eat skips)
-> GroupNorm -> SiLU -> conv_out. Reads a diffusers `config.json` + safetensors folder.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from ..device import array_module, to_device, to_host
from ..kernels import linear, silu, timestep_embedding
from ..kernels.activations import row_share_count, row_threads, share_items
from .attention import Transformer2D
from .blocks import DOWN_TYPES, MID_TYPES, UP_TYPES, DownBlock, MidBlock, UpBlock, check_block_type
from .loading import Params, load_model_folder, nbytes
from .lora import with_lora
from .resnet import conv, norm

# A forward over at least this many pixels (batch x repeat x H x W) runs on row_threads(): GEMM
# shares and kernels on the kit's own threads (kernels.activations). It pays for big feature maps
# and costs on small ones (bench imagine, 2 threads: the SDXL row's 2 x 64 x 64 went 3.2 -> 2.4 s
# per image, spark-emoji's 2 x 32 x 32 0.50 -> 0.70 s, its ops too short to share).
ROW_THREADS_MIN_PIXELS = 4096
# On row_threads(), a batch of rows (CFG's two halves) is split among the threads, each running the
# whole forward on its rows (kernels.share_items) instead of every GEMM and kernel being shared:
# no hand-off per op, so neither thread waits on the other until the end. Off: per-op shares.
SPLIT_BATCH = True


def _per_block(v, n: int, name: str) -> list:
    """diffusers lets many settings be one value or one per down block."""
    if isinstance(v, (list, tuple)):
        if len(v) != n:
            raise ValueError(f"config {name} has {len(v)} entries for {n} down blocks")
        return list(v)
    return [v] * n


@dataclass
class UNet2DConditionConfig:
    sample_size: int | None = None           # latent (or pixel) height = width the model was trained at
    in_channels: int = 4                     # channels of the sample it denoises
    out_channels: int = 4
    center_input_sample: bool = False        # map [0, 1] input to [-1, 1] first
    flip_sin_to_cos: bool = True             # timestep sinusoid order: cos first
    freq_shift: int = 0                      # downscale_freq_shift of the sinusoid
    down_block_types: tuple = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    only_cross_attention: bool | list = False
    block_out_channels: tuple = (320, 640, 1280, 1280)   # channels per resolution level
    layers_per_block: int | list = 2         # resnets per down block (up blocks have one more)
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int | None = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | list = 1280   # width of the text embeddings
    transformer_layers_per_block: int | list = 1
    attention_head_dim: int | list = 8       # diffusers' historic name: really the number of heads
    num_attention_heads: int | list | None = None
    use_linear_projection: bool = False      # proj_in/out as linear (SD2) instead of 1x1 conv
    class_embed_type: str | None = None      # None (+ num_class_embeds), "timestep", "identity", "projection"
    num_class_embeds: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    class_embeddings_concat: bool = False
    resnet_time_scale_shift: str = "default"
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    addition_embed_type: str | None = None   # None, or "text_time" (SDXL: pooled text + size/crop ids)
    addition_time_embed_dim: int | None = None  # text_time: sinusoid width per micro-conditioning number
    encoder_hid_dim: int | None = None
    dual_cross_attention: bool = False
    time_cond_proj_dim: int | None = None
    extra: dict = field(default_factory=dict)  # config keys this loader does not use

    @classmethod
    def from_dict(cls, d: dict) -> "UNet2DConditionConfig":
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names and k != "extra"}
        c = cls(**kw)
        c.extra = {k: v for k, v in d.items() if k not in names and not k.startswith("_")}
        c.validate()
        return c

    def validate(self) -> None:
        for kind in self.down_block_types:
            check_block_type(kind, DOWN_TYPES[:3], "down")
        for kind in self.up_block_types:
            check_block_type(kind, UP_TYPES[:3], "up")
        if self.mid_block_type is not None:
            check_block_type(self.mid_block_type, MID_TYPES, "mid")
        if len(self.down_block_types) != len(self.up_block_types) or len(self.down_block_types) != len(self.block_out_channels):
            raise ValueError("config: down_block_types, up_block_types and block_out_channels differ in length")
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"config addition_embed_type={self.addition_embed_type!r} is not supported by "
                             "spark_lab's UNet2DConditionModel (None or 'text_time')")
        if self.addition_embed_type == "text_time" and not (self.addition_time_embed_dim and
                                                            self.projection_class_embeddings_input_dim):
            raise ValueError("config addition_embed_type='text_time' needs addition_time_embed_dim and "
                             "projection_class_embeddings_input_dim")
        unsupported = {"encoder_hid_dim": self.encoder_hid_dim, "time_cond_proj_dim": self.time_cond_proj_dim}
        for k, v in unsupported.items():
            if v is not None:
                raise ValueError(f"config {k}={v!r} is not supported by spark_lab's UNet2DConditionModel")
        if self.num_attention_heads is not None:   # diffusers refuses it too (its naming issue #2011)
            raise ValueError("config num_attention_heads is not supported: diffusers' UNet2DConditionModel reads "
                             "the head count from attention_head_dim")
        if self.dual_cross_attention:
            raise ValueError("config dual_cross_attention=True is not supported")
        # settings this implementation leaves at diffusers' defaults: anything else is refused by name
        plain = {"time_embedding_act_fn": None, "timestep_post_act": None, "resnet_skip_time_act": False,
                 "resnet_out_scale_factor": 1.0, "mid_block_only_cross_attention": None, "cross_attention_norm": None,
                 "attention_type": "default", "encoder_hid_dim_type": None,
                 "reverse_transformer_layers_per_block": None}
        for k, want in plain.items():
            v = self.extra.get(k, want)
            if v != want and not (k == "mid_block_only_cross_attention" and v is False):
                raise ValueError(f"config {k}={v!r} is not supported by spark_lab's UNet2DConditionModel")
        if self.time_embedding_type != "positional":
            raise ValueError(f"config time_embedding_type={self.time_embedding_type!r} is not supported (want 'positional')")
        if self.act_fn != "silu":
            raise ValueError(f"config act_fn={self.act_fn!r} is not supported (want 'silu')")
        if self.class_embed_type not in (None, "timestep", "identity", "projection"):
            raise ValueError(f"config class_embed_type={self.class_embed_type!r} is not supported")


def embed_time(t, dim: int, flip: bool, shift: float, n: int):
    """Timesteps (scalar or [N]) -> sinusoidal features [N, dim], broadcast to the batch n."""
    t = to_host(t) if hasattr(t, "__cuda_array_interface__") else t
    t = np.asarray(t, dtype=np.float32).reshape(-1)
    if t.shape[0] == 1 and n > 1:
        t = np.repeat(t, n)
    e = timestep_embedding(to_device(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=float(shift))
    return e.astype(np.float32, copy=False)                                # [N, dim]


def mlp_embed(p: Params, e):
    """diffusers TimestepEmbedding: linear_1 -> SiLU -> linear_2 (plus any unfused LoRA on either)."""
    h = silu(with_lora(p, "linear_1", e, linear(e, p["linear_1.weight"], p["linear_1.bias"])))
    return with_lora(p, "linear_2", h, linear(h, p["linear_2.weight"], p["linear_2.bias"]))


class UNet2DConditionModel:
    def __init__(self, config: UNet2DConditionConfig, params: Params):
        self.config, self.params = config, params
        c, p = config, params
        n = len(c.down_block_types)
        heads = _per_block(c.attention_head_dim, n, "attention_head_dim")   # diffusers' name; really heads
        layers = _per_block(c.layers_per_block, n, "layers_per_block")
        _per_block(c.transformer_layers_per_block, n, "transformer_layers_per_block")  # layers: read from the weights
        only_cross = _per_block(c.only_cross_attention, n, "only_cross_attention")
        _per_block(c.cross_attention_dim, n, "cross_attention_dim")
        groups, eps = c.norm_num_groups, c.norm_eps
        rkw = dict(groups=groups, eps=eps, time_embedding_norm=c.resnet_time_scale_shift)

        def xattn(h, oc):
            return lambda q: Transformer2D(q, h, groups, oc)

        self.down = []
        for i, kind in enumerate(c.down_block_types):
            attn = xattn(heads[i], only_cross[i]) if kind == "CrossAttnDownBlock2D" else None
            self.down.append(DownBlock(p.sub(f"down_blocks.{i}"), layers[i], rkw, i < n - 1,
                                       c.downsample_padding, attn))
        mid_kw = dict(rkw, output_scale_factor=c.mid_block_scale_factor)
        if c.mid_block_type == "UNetMidBlock2DCrossAttn":
            self.mid = MidBlock(p.sub("mid_block"), 1, mid_kw, xattn(heads[-1], False))
        elif c.mid_block_type == "UNetMidBlock2D":
            self.mid = MidBlock(p.sub("mid_block"), 0, mid_kw)
        else:
            self.mid = None
        rheads, rlayers, ronly = heads[::-1], layers[::-1], only_cross[::-1]
        self.up = []
        for i, kind in enumerate(c.up_block_types):
            attn = xattn(rheads[i], ronly[i]) if kind == "CrossAttnUpBlock2D" else None
            self.up.append(UpBlock(p.sub(f"up_blocks.{i}"), rlayers[i] + 1, rkw, i < n - 1, attn))
        self.num_upsamplers = n - 1

    @classmethod
    def from_pretrained(cls, path: str | Path, subfolder: str | None = None, variant: str | None = None):
        folder = Path(path) / subfolder if subfolder else Path(path)
        config, params = load_model_folder(folder, variant)
        return cls(UNet2DConditionConfig.from_dict(config), params)

    @property
    def nbytes(self) -> int:
        return nbytes(self.params)

    def time_embedding(self, timestep, n: int, class_labels=None):
        c, p = self.config, self.params
        emb = mlp_embed(p.sub("time_embedding"),
                        embed_time(timestep, c.block_out_channels[0], c.flip_sin_to_cos,
                                   c.freq_shift, n))                                    # [N, 4 * C0]
        has_class = c.num_class_embeds is not None or c.class_embed_type is not None
        if has_class:
            if class_labels is None:
                raise ValueError("class_labels should be provided when the model is class-conditional")
            if c.class_embed_type is None:
                labels = np.asarray(class_labels).reshape(-1).astype(np.int64)
                if labels.min() < 0 or labels.max() >= c.num_class_embeds:
                    raise ValueError(f"class label out of range [0, {c.num_class_embeds})")
                cemb = p["class_embedding.weight"][to_device(labels)]               # [N, D]
            elif c.class_embed_type == "timestep":
                cemb = mlp_embed(p.sub("class_embedding"),
                                 embed_time(class_labels, c.block_out_channels[0],
                                            c.flip_sin_to_cos, c.freq_shift, n))
            elif c.class_embed_type == "identity":
                cemb = to_device(class_labels, np.float32)
            else:  # projection
                cemb = mlp_embed(p.sub("class_embedding"), to_device(class_labels, np.float32))
            if cemb.shape[0] == 1 and n > 1:
                cemb = array_module(cemb).repeat(cemb, n, axis=0)
            emb = array_module(emb).concatenate([emb, cemb], axis=-1) if c.class_embeddings_concat else emb + cemb
        return emb

    def added_embedding(self, added_cond_kwargs, n: int):
        """SDXL's micro-conditioning: {"text_embeds" [n, P], "time_ids" [n, k]} -> [n, 4 * C0] (None if unused)."""
        c = self.config
        if c.addition_embed_type is None:
            return None
        kw = added_cond_kwargs or {}
        if kw.get("text_embeds") is None or kw.get("time_ids") is None:
            raise ValueError("UNet2DConditionModel: this SDXL-style UNet (addition_embed_type='text_time') needs "
                             "added_cond_kwargs={'text_embeds': [N, P], 'time_ids': [N, k]}")
        text = to_device(kw["text_embeds"], np.float32)
        ids = to_host(kw["time_ids"]) if hasattr(kw["time_ids"], "__cuda_array_interface__") else kw["time_ids"]
        ids = np.asarray(ids, dtype=np.float32)
        if text.ndim != 2 or ids.ndim != 2 or text.shape[0] != n or ids.shape[0] != n:
            raise ValueError(f"UNet2DConditionModel: text_embeds {tuple(text.shape)} and time_ids {ids.shape} "
                             f"should be [{n}, P] and [{n}, k]")
        want = c.projection_class_embeddings_input_dim
        if text.shape[1] + ids.shape[1] * c.addition_time_embed_dim != want:
            raise ValueError(f"UNet2DConditionModel: text_embeds width {text.shape[1]} + {ids.shape[1]} time ids x "
                             f"{c.addition_time_embed_dim} != the {want} inputs of add_embedding")
        t = embed_time(ids.reshape(-1), c.addition_time_embed_dim, c.flip_sin_to_cos, c.freq_shift,
                       ids.size).reshape(n, -1)                                     # [n, k * dim]
        xp = array_module(text)
        return mlp_embed(self.params.sub("add_embedding"), xp.concatenate([text, t], axis=-1))   # [n, 4 * C0]

    def __call__(self, sample, timestep, encoder_hidden_states, class_labels=None, repeat: int = 1,
                 added_cond_kwargs: dict | None = None):
        """sample [N, Cin, H, W], timestep scalar or [N], encoder_hidden_states [N*repeat, L, Ctx] -> [N*repeat, Cout, H, W].

        repeat=2 is classifier-free guidance with one sample and two contexts (unconditional
        first): the leading blocks that never look at the text (conv_in, plain down blocks) run
        once on N rows and their outputs are tiled, instead of computing the same rows twice.
        added_cond_kwargs (SDXL): {"text_embeds": [N*repeat, P], "time_ids": [N*repeat, k]}; these
        differ between the two halves, so with them every block runs on N*repeat rows.
        Big inputs on the CPU with 2+ threads run the rows in groups side by side (SPLIT_BATCH).
        """
        pixels = sample.shape[0] * repeat * sample.shape[2] * sample.shape[3] if getattr(sample, "ndim", 0) == 4 else 0
        big = pixels >= ROW_THREADS_MIN_PIXELS
        with row_threads() if big else nullcontext():
            groups = self._row_groups(sample, timestep, encoder_hidden_states, class_labels, repeat,
                                      added_cond_kwargs) if big else 1
            if groups > 1:
                return self._forward_groups(groups, sample, timestep, encoder_hidden_states, repeat, added_cond_kwargs)
            return self._forward(sample, timestep, encoder_hidden_states, class_labels, repeat, added_cond_kwargs)

    def _row_groups(self, sample, timestep, context, class_labels, repeat, added_cond_kwargs) -> int:
        """How many groups of rows __call__ runs side by side on the threads (1: one forward on all)."""
        rows = sample.shape[0] * repeat
        if not SPLIT_BATCH or rows < 2 or class_labels is not None or np.size(timestep) > 1:
            return 1
        if not (isinstance(sample, np.ndarray) and array_module(context) is np and getattr(context, "ndim", 0) == 3
                and context.shape[0] == rows):
            return 1                                       # (the device, or a shape _forward will refuse)
        if any(getattr(v, "ndim", 0) < 1 or v.shape[0] != rows for v in (added_cond_kwargs or {}).values()):
            return 1                                       # (_forward checks these on all rows)
        if repeat > 1 and self.config.addition_embed_type is None and not (self.down and self.down[0].attentions):
            return 1                                       # its text-free leading blocks run once on N rows
        return row_share_count(rows)

    def _forward_groups(self, groups, sample, timestep, context, repeat, added_cond_kwargs):
        """_forward on `groups` contiguous slices of the N * repeat rows, one per thread (share_items)
        -> [N*repeat, Cout, H, W]. Row j is sample[j % N] with context[j] (repeat-major, as _forward tiles)."""
        N, rows = sample.shape[0], sample.shape[0] * repeat
        cuts = [rows * g // groups for g in range(groups + 1)]
        kw = added_cond_kwargs or {}

        def run(g):
            lo, hi = cuts[g], cuts[g + 1]
            take = np.arange(lo, hi) % N
            x = sample[lo:hi] if repeat == 1 else sample[take]
            added = {k: v[lo:hi] for k, v in kw.items()}                               # [hi - lo, ...] each
            return self._forward(x, timestep, context[lo:hi], None, 1, added or added_cond_kwargs)
        return np.concatenate(share_items(run, groups), axis=0)

    def _forward(self, sample, timestep, encoder_hidden_states, class_labels, repeat, added_cond_kwargs):
        c, p = self.config, self.params
        if sample.ndim != 4 or sample.shape[1] != c.in_channels:
            raise ValueError(f"UNet2DConditionModel: sample {tuple(sample.shape)} should be [N, {c.in_channels}, H, W]")
        N = sample.shape[0]
        if encoder_hidden_states is None or encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != N * repeat:
            shape = None if encoder_hidden_states is None else tuple(encoder_hidden_states.shape)
            raise ValueError(f"UNet2DConditionModel: encoder_hidden_states {shape} should be [{N * repeat}, L, ctx]")
        if repeat > 1 and (class_labels is not None or np.ndim(timestep) > 0 and np.size(timestep) > 1):
            raise ValueError("UNet2DConditionModel: repeat > 1 needs one shared timestep and no class labels")
        sample = to_device(sample, np.float32)            # host inputs move once, explicitly (no-op on the device)
        context = to_device(encoder_hidden_states, np.float32)
        xp = array_module(sample)
        tile = (lambda a: xp.concatenate([a] * repeat, axis=0)) if repeat > 1 else (lambda a: a)  # noqa: E731
        # upsample to the skip's size when H or W is not a multiple of 2**num_upsamplers
        factor = 2 ** self.num_upsamplers
        odd = any(s % factor for s in sample.shape[-2:])
        if c.center_input_sample:
            sample = 2.0 * sample - 1.0
        emb = self.time_embedding(timestep, N, class_labels)                        # [N, 4 * C0]
        aug = self.added_embedding(added_cond_kwargs, N * repeat)                   # [N*repeat, 4 * C0] or None
        x = conv(p.sub("conv_in"), sample)                                          # [N, C0, H, W]
        shared = repeat > 1                                                         # rows not yet tiled
        if aug is not None:                                                         # the halves' embeddings differ
            if shared:
                x, emb, shared = tile(x), tile(emb), False
            emb = emb + aug
        skips = [x]
        for blk in self.down:
            if shared and blk.attentions:                                           # the text comes in here
                x, skips, emb, shared = tile(x), [tile(s) for s in skips], tile(emb), False
            x, s = blk(x, emb, context)
            skips += s
        if shared:
            x, skips, emb = tile(x), [tile(s) for s in skips], tile(emb)
        if self.mid is not None:
            x = self.mid(x, emb, context)
        for i, blk in enumerate(self.up):
            size = None
            if odd and blk.up is not None:
                size = skips[-len(blk.resnets) - 1].shape[-2:]                      # the next level's skip
            x = blk(x, skips, emb, context, size)
        if c.norm_num_groups is not None:
            x = norm(p.sub("conv_norm_out"), x, c.norm_num_groups, c.norm_eps, act=True)
        return conv(p.sub("conv_out"), x)                                           # [N*repeat, Cout, H, W]
