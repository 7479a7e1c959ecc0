"""SD3Transformer2DModel: the MMDiT denoiser of Stable Diffusion 3 / 3.5 (diffusers' names and weights).

    model(hidden_states [B, C, H, W], encoder_hidden_states [B, L, joint_attention_dim],
          pooled_projections [B, pooled_projection_dim], timestep scalar or [B]) -> velocity [B, C, H, W]

H and W are latent sizes (image / 8) and must be multiples of patch_size; the timestep is
sigma * 1000 as FlowMatchEulerDiscreteScheduler gives it. The model, top to bottom:

  patches      p x p patches of the latent -> tokens [B, N, D] (N = H W / p^2, D = heads * head_dim),
               plus a fixed 2-D sin-cos position table cropped from the centre of a
               pos_embed_max_size^2 grid (so one model serves many image sizes)
  conditioning temb [B, D] = MLP(sinusoid(t)) + MLP(pooled text); the text tokens go through
               context_embedder -> [B, L, D]
  blocks       JointTransformerBlock x num_layers. Image and text each get their own AdaLN-Zero
               (shift, scale, gate from temb), their own q/k/v, and one attention over the
               concatenated [image; text] tokens; then gated MLPs per stream. The last block
               (context_pre_only) only lets the text be attended to: its text output is dropped.
               SD3.5: q/k RMSNorm per head (qk_norm="rms_norm"); SD3.5-medium adds a second,
               image-only self-attention in the `dual_attention_layers` (AdaLayerNormZeroX).
  out          AdaLayerNormContinuous -> proj_out -> unpatchify to [B, C, H, W]

`skip_layers=[i, ...]` leaves blocks out (SD3.5 skip-layer guidance). Attention runs head-major
on `diffusion.attention.attend`, a bounded number of query rows at a time (ATTN_SCORES_MAX).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from ..device import array_module, to_device
from ..kernels import gelu, layernorm, rmsnorm, silu
from .attention import attend, dense, linear_rows
from .lora import with_lora
from .loading import Params, load_model_folder, nbytes, weight_formats
from .unet_2d_condition import embed_time, mlp_embed

QK_NORMS = (None, "rms_norm", "layer_norm")
# Score elements of one attention call (per head: query rows x keys); queries go in chunks so a
# 1024-px SD3 image (4096 + 333 tokens) never holds a [heads, T, T] block: 1<<22 floats = 16 MB.
ATTN_SCORES_MAX = 1 << 22


@dataclass
class SD3TransformerConfig:
    sample_size: int = 128                # latent size it was trained at; sets the position grid's scale
    patch_size: int = 2                   # p: tokens are p x p latent patches
    in_channels: int = 16                 # latent channels
    num_layers: int = 18                  # JointTransformerBlocks
    attention_head_dim: int = 64
    num_attention_heads: int = 18         # D = heads * head_dim
    joint_attention_dim: int = 4096       # width of the text tokens (CLIP-L + CLIP-G padded, T5)
    caption_projection_dim: int = 1152    # context_embedder's output: must equal D
    pooled_projection_dim: int = 2048     # width of the pooled CLIP embeddings
    out_channels: int | None = 16
    pos_embed_max_size: int = 96          # the position table is a max_size^2 grid of patches
    dual_attention_layers: tuple = ()     # SD3.5-medium: blocks with a second image-only attention
    qk_norm: str | None = None            # SD3.5: "rms_norm" on q and k per head
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "SD3TransformerConfig":
        names = {f.name for f in fields(cls)}
        c = cls(**{k: v for k, v in d.items() if k in names and k != "extra"})
        c.extra = {k: v for k, v in d.items() if k not in names and not k.startswith("_")}
        c.dual_attention_layers = tuple(c.dual_attention_layers or ())
        if c.out_channels is None:
            c.out_channels = c.in_channels
        if c.qk_norm not in QK_NORMS:
            raise ValueError(f"config qk_norm={c.qk_norm!r} is not supported by spark_lab's SD3Transformer2DModel "
                             f"(None, 'rms_norm', 'layer_norm')")
        if c.caption_projection_dim != c.inner_dim:
            raise ValueError(f"config caption_projection_dim={c.caption_projection_dim} must equal "
                             f"num_attention_heads * attention_head_dim = {c.inner_dim}")
        if not c.pos_embed_max_size:
            raise ValueError("config pos_embed_max_size must be set (SD3's cropped position table)")
        return c

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


# ----------------------------------------------------------------------------- positions

def sincos_1d(dim: int, pos) -> np.ndarray:
    """pos [M] -> [M, dim] = [sin(pos w) | cos(pos w)], w_i = 10000^(-i / (dim/2)), in float64."""
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega                                          # [dim/2]
    out = np.outer(np.asarray(pos, np.float64).reshape(-1), omega)        # [M, dim/2]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed_2d(dim: int, grid: int, base_size: int, interpolation_scale: float = 1.0) -> np.ndarray:
    """diffusers' get_2d_sincos_pos_embed for a square grid -> [grid*grid, dim] float32, row-major.

    Coordinates are scaled so `base_size` patches span the trained range; the first half of
    the features encodes the column, the second half the row (diffusers' order)."""
    if dim % 4:
        raise ValueError(f"sincos position embedding: dim {dim} must be a multiple of 4")
    coord = np.arange(grid, dtype=np.float32) / np.float32(grid / base_size) / np.float32(interpolation_scale)
    col = np.broadcast_to(coord[None, :], (grid, grid))                   # [row, col] -> col coordinate
    row = np.broadcast_to(coord[:, None], (grid, grid))
    return np.concatenate([sincos_1d(dim // 2, col), sincos_1d(dim // 2, row)], axis=1).astype(np.float32)


def patchify(x, p: int):
    """[B, C, H, W] -> [B, (H/p)(W/p), C p p]: each row one patch, flattened like the conv weight (C, p, p)."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p).transpose(0, 2, 4, 1, 3, 5)   # [B, h, w, C, p, p]
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(x, p: int, h: int, w: int, C: int):
    """[B, h*w, p p C] (proj_out's (p, q, c) order) -> [B, C, h p, w p]."""
    B = x.shape[0]
    x = x.reshape(B, h, w, p, p, C).transpose(0, 5, 1, 3, 2, 4)           # [B, C, h, p, w, p]
    return array_module(x).ascontiguousarray(x).reshape(B, C, h * p, w * p)


# ----------------------------------------------------------------------------- building blocks

def modulate(x, shift, scale):
    """AdaLN: x [B, T, D] * (1 + scale [B, D]) + shift [B, D]."""
    return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


def ada_params(p: Params, temb_act, n: int):
    """AdaLayerNorm's linear on silu(temb) [B, D] -> n chunks of [B, D] (diffusers' chunk order)."""
    m = dense(p, "linear", temb_act)                                      # [B, n*D]
    B = m.shape[0]
    m = m.reshape(B, n, -1)
    return [m[:, i] for i in range(n)]


def plain_norm(x, p: Params | None = None, name: str = "norm"):
    """LayerNorm over the last dim, eps 1e-6, with an affine only where the checkpoint has one."""
    w = p.get(f"{name}.weight") if p is not None else None
    b = p.get(f"{name}.bias") if p is not None else None
    return layernorm(x, w, b, 1e-6)


def feed_forward(p: Params, x):
    """diffusers FeedForward "gelu-approximate": linear -> tanh-GELU -> linear; [B, T, D] -> [B, T, D]."""
    h = gelu(dense(p, "net.0.proj", x), approximate="tanh")              # [B, T, 4D]
    return dense(p, "net.2", h)


def attend_bounded(q, k, v):
    """Head-major attention q [BH, Tq, Dh], k/v [BH, Tk, Dh] -> [BH, Tq, Dh], ATTN_SCORES_MAX scores per
    head and call (queries in row chunks; `attend` then takes a cache-sized group of heads at a time)."""
    BH, Tq, Dh = q.shape
    rows = max(1, ATTN_SCORES_MAX // k.shape[1])
    if rows >= Tq:
        return attend(q, k, v)
    out = array_module(q).empty((BH, Tq, v.shape[2]), dtype=np.float32)
    for s in range(0, Tq, rows):
        out[:, s:s + rows] = attend(q[:, s:s + rows], k, v)
    return out


class SD3Transformer2DModel:
    unfused_lora = True      # every linear layer adds its unfused LoRA factors at run time (attention.dense)

    def __init__(self, config: SD3TransformerConfig, params: Params):
        self.config, self.params = config, params
        c = config
        n = 0
        while params.has_prefix(f"transformer_blocks.{n}"):
            n += 1
        if n != c.num_layers:
            raise ValueError(f"SD3Transformer2DModel: config num_layers={c.num_layers} but {params.source} "
                             f"holds {n} transformer_blocks")
        for i in range(n):
            b = params.sub(f"transformer_blocks.{i}")
            if b.has_prefix("attn2") != (i in c.dual_attention_layers):
                raise ValueError(f"SD3Transformer2DModel: block {i} {'has' if b.has_prefix('attn2') else 'lacks'} "
                                 f"attn2 weights but dual_attention_layers={list(c.dual_attention_layers)}")
        # the position table: a persistent buffer in diffusers checkpoints, computed if absent
        table = params.get("pos_embed.pos_embed")
        M = c.pos_embed_max_size
        if table is None:
            table = to_device(sincos_pos_embed_2d(c.inner_dim, M, c.sample_size // c.patch_size))
        if tuple(table.shape[-2:]) != (M * M, c.inner_dim):
            raise ValueError(f"SD3Transformer2DModel: pos_embed {tuple(table.shape)} does not fit "
                             f"pos_embed_max_size={M} and width {c.inner_dim}")
        self.pos_table = table.reshape(M, M, c.inner_dim)                 # [M, M, D]

    @classmethod
    def from_gguf(cls, path: str | Path) -> "SD3Transformer2DModel":
        """A ComfyUI-GGUF / city96 SD3 / SD3.5 file; quantized weights stay quantized (see sd3_gguf.py)."""
        from .sd3_gguf import load_sd3_gguf
        return load_sd3_gguf(path)

    def weight_formats(self) -> dict:
        """{format: number of weight tensors}: GGML type names for quantized ones, "float32" for the rest."""
        return weight_formats(self.params)

    @classmethod
    def from_pretrained(cls, path: str | Path, subfolder: str | None = None, variant: str | None = None):
        """A diffusers transformer/ folder (config.json + diffusion_pytorch_model[.fp16].safetensors)."""
        folder = Path(path) / subfolder if subfolder else Path(path)
        config, params = load_model_folder(folder, variant)
        name = config.get("_class_name", "SD3Transformer2DModel")
        if name != "SD3Transformer2DModel":
            raise ValueError(f"{folder / 'config.json'} describes a {name}, not an SD3Transformer2DModel")
        return cls(SD3TransformerConfig.from_dict(config), params)

    @property
    def nbytes(self) -> int:
        return nbytes(self.params)

    # ------------------------------------------------------------------ pieces

    def embed_patches(self, x):
        """[B, C, H, W] -> tokens [B, N, D] + the centre crop of the position table."""
        c, p = self.config, self.params
        P = c.patch_size
        h, w = x.shape[2] // P, x.shape[3] // P
        wt = p["pos_embed.proj.weight"]                                   # [D, C, p, p]
        patches = patchify(x, P)                                          # [B, N, C p p]
        tokens = linear_rows(patches, wt.reshape(wt.shape[0], -1), p["pos_embed.proj.bias"])  # [B, N, D]
        tokens = with_lora(p, "pos_embed.proj", patches, tokens)
        M = c.pos_embed_max_size
        top, left = (M - h) // 2, (M - w) // 2
        pos = self.pos_table[top:top + h, left:left + w].reshape(h * w, -1)   # [N, D]
        return tokens + pos[None]

    def conditioning(self, timestep, pooled, B: int):
        """temb [B, D] = TimestepEmbedding(sinusoid_256(t)) + PixArt text projection(pooled)."""
        p = self.params.sub("time_text_embed")
        t = mlp_embed(p.sub("timestep_embedder"), embed_time(timestep, 256, True, 0, B))   # [B, D]
        q = p.sub("text_embedder")
        y = dense(q, "linear_2", silu(dense(q, "linear_1", pooled)))
        return t + y

    def _qk(self, p: Params, name: str, t, B: int, T: int):
        """[B, T, H*Dh] -> [B, T, H, Dh], with the per-head q/k norm where the config has one."""
        c = self.config
        t = t.reshape(B, T, c.num_attention_heads, c.attention_head_dim)
        if c.qk_norm == "rms_norm" and name is not None:
            w = p.get(f"{name}.weight")
            if w is None:
                w = array_module(t).ones(c.attention_head_dim, dtype=np.float32)
            t = rmsnorm(t, w, 1e-6)
        elif c.qk_norm == "layer_norm" and name is not None:
            t = layernorm(t, p.get(f"{name}.weight"), p.get(f"{name}.bias"), 1e-6)
        return t

    def attention(self, p: Params, x, ctx=None, context_out: bool = True):
        """JointAttnProcessor: x [B, N, D] (+ ctx [B, L, D]) -> (image out [B, N, D], text out [B, L, D] or None).

        Keys and values cover [image; text]; text queries (and to_add_out) only where the text
        output is used. ctx=None is plain self-attention (the dual blocks' attn2)."""
        c = self.config
        H, Dh = c.num_attention_heads, c.attention_head_dim
        B, N, _ = x.shape
        q = self._qk(p, "norm_q", dense(p, "to_q", x), B, N)                 # [B, N, H, Dh]
        k = self._qk(p, "norm_k", dense(p, "to_k", x), B, N)
        v = dense(p, "to_v", x).reshape(B, N, H, Dh)
        xp = array_module(q)
        L = 0
        if ctx is not None:
            L = ctx.shape[1]
            ck = self._qk(p, "norm_added_k", dense(p, "add_k_proj", ctx), B, L)
            cv = dense(p, "add_v_proj", ctx).reshape(B, L, H, Dh)
            k, v = xp.concatenate([k, ck], axis=1), xp.concatenate([v, cv], axis=1)           # [B, N+L, H, Dh]
            if context_out:
                cq = self._qk(p, "norm_added_q", dense(p, "add_q_proj", ctx), B, L)
                q = xp.concatenate([q, cq], axis=1)                                            # [B, N+L, H, Dh]
        Tq, Tk = q.shape[1], k.shape[1]
        heads_first = lambda t, T: xp.ascontiguousarray(t.transpose(0, 2, 1, 3)).reshape(B * H, T, Dh)  # noqa: E731
        o = attend_bounded(heads_first(q, Tq), heads_first(k, Tk), heads_first(v, Tk))       # [B*H, Tq, Dh]
        o = o.reshape(B, H, Tq, Dh).transpose(0, 2, 1, 3).reshape(B, Tq, H * Dh)             # [B, Tq, D]
        out = dense(p, "to_out.0", o[:, :N])                                                   # [B, N, D]
        if ctx is None or not context_out:
            return out, None
        return out, dense(p, "to_add_out", o[:, N:])                                           # [B, L, D]

    def block(self, i: int, x, ctx, temb_act):
        """JointTransformerBlock i: (x [B, N, D], ctx [B, L, D]) -> (x, ctx; ctx None after the last block)."""
        p = self.params.sub(f"transformer_blocks.{i}")
        last = i == self.config.num_layers - 1                            # context_pre_only
        dual = i in self.config.dual_attention_layers
        # 1. AdaLN-Zero on the image stream (9 chunks with the dual attention), AdaLN on the text
        m = ada_params(p.sub("norm1"), temb_act, 9 if dual else 6)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = m[:6]
        hx = plain_norm(x)
        nx = modulate(hx, shift_msa, scale_msa)
        if last:                                                          # AdaLayerNormContinuous: scale first
            scale_c, shift_c = ada_params(p.sub("norm1_context"), temb_act, 2)
            nc = modulate(plain_norm(ctx, p.sub("norm1_context"), "norm"), shift_c, scale_c)
        else:
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = \
                ada_params(p.sub("norm1_context"), temb_act, 6)
            nc = modulate(plain_norm(ctx), c_shift_msa, c_scale_msa)
        # 2. joint attention over [image; text], gated residual
        a, ac = self.attention(p.sub("attn"), nx, nc, context_out=not last)
        x = x + gate_msa[:, None] * a
        if dual:                                                          # SD3.5-medium: image-only attention
            shift2, scale2, gate2 = m[6:]
            a2, _ = self.attention(p.sub("attn2"), modulate(hx, shift2, scale2))
            x = x + gate2[:, None] * a2
        # 3. gated MLP on the image stream
        x = x + gate_mlp[:, None] * feed_forward(p.sub("ff"), modulate(plain_norm(x), shift_mlp, scale_mlp))
        if last:
            return x, None
        # 4. the same for the text stream
        ctx = ctx + c_gate_msa[:, None] * ac
        h = modulate(plain_norm(ctx), c_shift_mlp, c_scale_mlp)
        ctx = ctx + c_gate_mlp[:, None] * feed_forward(p.sub("ff_context"), h)
        return x, ctx

    # ------------------------------------------------------------------ forward

    def check_inputs(self, hidden_states, encoder_hidden_states, pooled_projections) -> None:
        c = self.config
        x, ctx, pooled = hidden_states, encoder_hidden_states, pooled_projections
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"SD3Transformer2DModel: hidden_states {tuple(x.shape)} should be [B, {c.in_channels}, H, W]")
        B, _, H, W = x.shape
        P, M = c.patch_size, c.pos_embed_max_size
        if H % P or W % P:
            raise ValueError(f"SD3Transformer2DModel: latent height {H} and width {W} must be multiples of "
                             f"patch_size {P} (image sides multiples of {8 * P} px)")
        if H // P > M or W // P > M:
            raise ValueError(f"SD3Transformer2DModel: latent {H}x{W} is {H // P}x{W // P} patches, more than "
                             f"pos_embed_max_size {M} allows")
        if ctx is None or ctx.ndim != 3 or ctx.shape[0] != B or ctx.shape[2] != c.joint_attention_dim:
            shape = None if ctx is None else tuple(ctx.shape)
            raise ValueError(f"SD3Transformer2DModel: encoder_hidden_states {shape} should be "
                             f"[{B}, L, {c.joint_attention_dim}]")
        if pooled is None or tuple(pooled.shape) != (B, c.pooled_projection_dim):
            shape = None if pooled is None else tuple(pooled.shape)
            raise ValueError(f"SD3Transformer2DModel: pooled_projections {shape} should be "
                             f"[{B}, {c.pooled_projection_dim}]")

    def __call__(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, skip_layers=None):
        """hidden_states [B, C, H, W], encoder_hidden_states [B, L, joint_attention_dim],
        pooled_projections [B, pooled_projection_dim], timestep scalar or [B] (sigma * 1000)
        -> [B, out_channels, H, W] float32 on the weights' device."""
        c, p = self.config, self.params
        self.check_inputs(hidden_states, encoder_hidden_states, pooled_projections)
        B, _, H, W = hidden_states.shape
        x = to_device(hidden_states, np.float32)                          # host inputs move once, explicitly
        ctx = to_device(encoder_hidden_states, np.float32)
        pooled = to_device(pooled_projections, np.float32)
        skip = set(skip_layers or ())
        # 1. tokens, conditioning vector, text tokens
        x = self.embed_patches(x)                                         # [B, N, D]
        temb_act = silu(self.conditioning(timestep, pooled, B))           # [B, D]: every AdaLN reads silu(temb)
        ctx = dense(p, "context_embedder", ctx)                          # [B, L, D]
        # 2. the joint blocks
        for i in range(c.num_layers):
            if i not in skip:
                x, ctx = self.block(i, x, ctx, temb_act)
        # 3. final AdaLN (scale, shift), projection to patches, back to an image
        scale, shift = ada_params(p.sub("norm_out"), temb_act, 2)
        x = modulate(plain_norm(x), shift, scale)
        x = dense(p, "proj_out", x)                                       # [B, N, p*p*C]
        P = c.patch_size
        return unpatchify(x, P, H // P, W // P, c.out_channels)          # [B, C, H, W]
