"""FluxTransformer2DModel: the denoiser of FLUX.1 (a rectified-flow MMDiT), as diffusers has it.

    model = FluxTransformer2DModel.from_pretrained("FLUX.1-dev/transformer")     # diffusers folder
    model = FluxTransformer2DModel.from_gguf("flux1-dev-Q4_K_S.gguf")           # city96 GGUF (flux_gguf.py)
    v = model(hidden_states,          # [B, N, C_packed]  packed latents (pack_latents)
              encoder_hidden_states,  # [B, T, joint_attention_dim]  T5 token embeddings
              pooled_projections,     # [B, pooled_projection_dim]   CLIP pooled embedding
              timestep,               # [B] or scalar, sigma in [0, 1] (multiplied by 1000 inside, as diffusers)
              img_ids,                # [N, 3]  (0, row, col) of each packed latent (latent_image_ids)
              txt_ids,                # [T, 3]  zeros in FLUX.1
              guidance=None)          # [B] or scalar: FLUX.1-dev (guidance_embeds); None for schnell
    -> [B, N, patch_size^2 * out_channels] float32, the flow-matching velocity in packed form.

The network, top to bottom:
  temb    sinusoid(1000 t) -> MLP (+ sinusoid(1000 g) -> MLP) + MLP(pooled): one [B, D] vector
  x_embedder (linear on the packed 2x2 latents), context_embedder (linear on the text)
  double-stream blocks (FluxTransformerBlock): image and text keep their own weights; each is
      AdaLayerNormZero-modulated by temb (shift/scale/gate), both streams' q/k/v (RMS-normed per
      head) attend jointly over [text; image] with RoPE, then each has its own GELU MLP
  single-stream blocks (FluxSingleTransformerBlock): one sequence [text; image], AdaLayerNormZeroSingle,
      attention and MLP in parallel from the same input, proj_out on their concatenation
  norm_out (AdaLayerNormContinuous: LayerNorm, then scale/shift from temb) -> proj_out on the image tokens
RoPE: each head's features are split by `axes_dims_rope` (16, 56, 56 in FLUX.1); axis i rotates
adjacent pairs (2j, 2j+1) by ids[:, i] * 10000^(-2j / axes_dims_rope[i]).

Weights are a `Params` of diffusers names; any weight may be a `quants.QuantTensor` (the GGUF
loader's), and `kernels.linear` then runs the kit's quantized kernels on it. Attention runs one
batch item at a time through `kernels.attention`, which takes queries in chunks so the score
block stays under 64 MB whatever the image size. Pure helpers for the pipeline: `pack_latents`,
`unpack_latents`, `latent_image_ids` (diffusers' FluxPipeline._pack_latents & co).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from ..device import array_module, to_device, to_host
from ..kernels import rmsnorm, silu, timestep_embedding
from ..kernels.activations import gelu_tanh_
from ..kernels.norms import layernorm_affine
from .attention import attend_heads, dense
from .fused import rms_rope_into
from .loading import Params, load_model_folder, nbytes, weight_formats

ROPE_THETA = 10000.0     # diffusers' FluxPosEmbed and BFL's EmbedND
TIME_CHANNELS = 256      # sinusoid width of the timestep and guidance embeddings
NORM_EPS = 1e-6          # every LayerNorm and the per-head RMSNorms


@dataclass
class FluxConfig:
    patch_size: int = 1                      # output pixels per token side (FLUX.1: 1; packing is the pipeline's)
    in_channels: int = 64                    # packed latent channels (16 VAE channels x 2 x 2)
    out_channels: int | None = None          # None: in_channels
    num_layers: int = 19                     # double-stream blocks
    num_single_layers: int = 38              # single-stream blocks
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096          # width of the T5 text embeddings
    pooled_projection_dim: int = 768         # width of the pooled CLIP embedding
    guidance_embeds: bool = False            # FLUX.1-dev: a guidance-scale embedding beside the timestep
    axes_dims_rope: tuple = (16, 56, 56)     # RoPE features per id axis; sums to attention_head_dim
    extra: dict = field(default_factory=dict)  # config keys this loader does not use

    def __post_init__(self):
        self.axes_dims_rope = tuple(int(a) for a in self.axes_dims_rope)
        if self.out_channels is None:
            self.out_channels = self.in_channels
        self.inner_dim = self.num_attention_heads * self.attention_head_dim      # D, the model width
        if sum(self.axes_dims_rope) != self.attention_head_dim or any(a % 2 for a in self.axes_dims_rope):
            raise ValueError(f"config axes_dims_rope={list(self.axes_dims_rope)} must be even sizes summing to "
                             f"attention_head_dim={self.attention_head_dim}")
        if self.patch_size < 1 or self.num_layers < 0 or self.num_single_layers < 0:
            raise ValueError(f"config patch_size={self.patch_size}, num_layers={self.num_layers}, "
                             f"num_single_layers={self.num_single_layers} are out of range")

    @classmethod
    def from_dict(cls, d: dict) -> "FluxConfig":
        names = {f.name for f in fields(cls)} - {"extra"}
        c = cls(**{k: v for k, v in d.items() if k in names})
        c.extra = {k: v for k, v in d.items() if k not in names and not k.startswith("_")}
        return c


# ---------------------------------------------------------------------------- pipeline helpers (pure)

def pack_latents(latents):
    """[B, C, H, W] VAE latents -> [B, (H/2)(W/2), 4C] tokens, each a 2x2 patch (channel-major)."""
    B, C, H, W = latents.shape
    if H % 2 or W % 2:
        raise ValueError(f"pack_latents: latent height and width must be even, got {tuple(latents.shape)}")
    x = latents.reshape(B, C, H // 2, 2, W // 2, 2).transpose(0, 2, 4, 1, 3, 5)   # [B, H/2, W/2, C, 2, 2]
    return x.reshape(B, (H // 2) * (W // 2), C * 4)


def unpack_latents(latents, height: int, width: int, vae_scale_factor: int = 8):
    """pack_latents undone, as diffusers' FluxPipeline._unpack_latents: [B, N, 4C] tokens of an image
    of height x width pixels -> [B, C, h, w] latents, h = 2 * (height // (2 * vae_scale_factor))."""
    B, N, C4 = latents.shape
    h, w = 2 * (int(height) // (vae_scale_factor * 2)), 2 * (int(width) // (vae_scale_factor * 2))
    if C4 % 4 or N != (h // 2) * (w // 2):
        raise ValueError(f"unpack_latents: {N} tokens of {C4} channels do not make a {height}x{width} image "
                         f"(vae_scale_factor {vae_scale_factor}: want {(h // 2) * (w // 2)} tokens, channels % 4 == 0)")
    x = latents.reshape(B, h // 2, w // 2, C4 // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5)   # [B, C, h/2, 2, w/2, 2]
    return x.reshape(B, C4 // 4, h, w)


def latent_image_ids(height: int, width: int):
    """RoPE ids [height * width, 3] float32 of a grid of packed tokens (latent size / 2): (0, row, col)."""
    ids = np.zeros((height, width, 3), np.float32)
    ids[..., 1] = np.arange(height, dtype=np.float32)[:, None]
    ids[..., 2] = np.arange(width, dtype=np.float32)[None, :]
    return ids.reshape(height * width, 3)


# ---------------------------------------------------------------------------- building blocks

def rope_tables(ids, axes_dims, theta: float = ROPE_THETA):
    """ids [T, n_axes] -> cos, sin [T, head_dim/2] float32 on the host: pair j of axis i turns by
    ids[:, i] * theta^(-2j / axes_dims[i]); angles in float64 like diffusers' FluxPosEmbed."""
    pos = np.asarray(to_host(ids), np.float32).astype(np.float64)                  # ids.float(), then float64
    angles = []
    for i, d in enumerate(axes_dims):
        inv = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)            # [d/2]
        angles.append(pos[:, i:i + 1] * inv[None, :])                               # [T, d/2]
    a = np.concatenate(angles, axis=1)                                              # [T, head_dim/2]
    return np.cos(a).astype(np.float32), np.sin(a).astype(np.float32)


def apply_rope(x, cos, sin):
    """x [B, T, H, D] with adjacent pairs (2j, 2j+1) rotated by the angles of cos/sin [T, D/2]."""
    xp = array_module(x)
    c, s = cos[None, :, None, :], sin[None, :, None, :]                             # [1, T, 1, D/2]
    x0, x1 = x[..., 0::2], x[..., 1::2]                                             # [B, T, H, D/2]
    out = xp.empty_like(x)
    out[..., 0::2] = x0 * c - x1 * s
    out[..., 1::2] = x1 * c + x0 * s
    return out


def joint_attention(q, k, v):
    """q/k/v [B, T, H, D] -> [B, T, H*D]; full (unmasked) attention (diffusion.attention.attend_heads)."""
    B, T, H, D = q.shape
    return attend_heads(q.reshape(B, T, H * D), k.reshape(B, T, H * D), v.reshape(B, T, H * v.shape[3]), H)


def heads_qkv(p: Params, x, heads: int, q_name: str, k_name: str, v_name: str, qn: str, kn: str):
    """x [B, T, Din] -> q, k, v [B, T, H, D], q and k RMS-normed per head (the qk-norm)."""
    B, T, _ = x.shape
    q = dense(p, q_name, x).reshape(B, T, heads, -1)
    k = dense(p, k_name, x).reshape(B, T, heads, -1)
    v = dense(p, v_name, x).reshape(B, T, heads, -1)
    return rmsnorm(q, p[qn + ".weight"], NORM_EPS), rmsnorm(k, p[kn + ".weight"], NORM_EPS), v


def joint_qkv(p: Params, streams: list, heads: int, cos, sin):
    """NumPy: q, k, v [B, sum T, H, D] of the streams one after another (Flux's [txt; img]), each
    stream (x [B, T, Din], q/k/v and qk-norm names) projected, q and k RMS-normed per head and turned
    by RoPE in one numba pass straight into the joint arrays (no concatenation); heads_qkv,
    apply_rope and concatenate where numba is missing."""
    B = streams[0][0].shape[0]
    Tt = sum(s[0].shape[1] for s in streams)
    q = k = None
    parts, t0 = [], 0
    for x, qn, kn, vn, nq, nk in streams:
        T = x.shape[1]
        a, b = dense(p, qn, x).reshape(B, T, heads, -1), dense(p, kn, x).reshape(B, T, heads, -1)
        if q is None:
            q, k = (np.empty((B, Tt, heads, a.shape[-1]), np.float32) for _ in range(2))
        if not (rms_rope_into(a, p[nq + ".weight"], cos, sin, NORM_EPS, t0, q)
                and rms_rope_into(b, p[nk + ".weight"], cos, sin, NORM_EPS, t0, k)):
            q = k = None
            break
        parts.append(dense(p, vn, x).reshape(B, T, heads, -1))
        t0 += T
    if q is None:                                                                  # no numba
        done = [heads_qkv(p, *s[:1], heads, *s[1:]) for s in streams]
        q, k, v = (np.concatenate([d[i] for d in done], axis=1) for i in range(3))
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v
    return q, k, parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


def modulation(p: Params, silu_temb, n: int) -> list:
    """AdaLN's linear on SiLU(temb) [B, D] -> n vectors [B, 1, D] (shift, scale, gate, ...)."""
    m = dense(p, "linear", silu_temb)                                              # [B, n*D]
    D = m.shape[-1] // n
    return [m[:, None, i * D:(i + 1) * D] for i in range(n)]


def modulate(x, shift, scale):
    """LayerNorm (no affine) of x [B, T, D], then * (1 + scale) + shift ([B, 1, D] each)."""
    return layernorm_affine(x, NORM_EPS, 1.0 + scale, shift)


def feed_forward(p: Params, x):
    """diffusers FeedForward (gelu-approximate): net.0.proj -> GELU(tanh) -> net.2."""
    h = gelu_tanh_(dense(p, "net.0.proj", x))                                      # in place: a fresh array
    return dense(p, "net.2", h)


def double_block(p: Params, img, txt, silu_temb, cos, sin, heads: int):
    """FluxTransformerBlock: img [B, N, D], txt [B, T, D] -> (img, txt), joint attention over [txt; img]."""
    T = txt.shape[1]
    xp = array_module(img)
    sh, sc, g, sh2, sc2, g2 = modulation(p.sub("norm1"), silu_temb, 6)
    csh, csc, cg, csh2, csc2, cg2 = modulation(p.sub("norm1_context"), silu_temb, 6)
    a = p.sub("attn")
    hi, ht = modulate(img, sh, sc), modulate(txt, csh, csc)
    if xp is np:                  # the numba qk-norm + RoPE pass writes both streams into [txt; img] in place
        q, k, v = joint_qkv(a, [(ht, "add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k"),
                                (hi, "to_q", "to_k", "to_v", "norm_q", "norm_k")], heads, cos, sin)
    else:
        q, k, v = heads_qkv(a, hi, heads, "to_q", "to_k", "to_v", "norm_q", "norm_k")
        cq, ck, cv = heads_qkv(a, ht, heads, "add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k")
        q = apply_rope(xp.concatenate([cq, q], axis=1), cos, sin)                  # [B, T+N, H, Dh]
        k = apply_rope(xp.concatenate([ck, k], axis=1), cos, sin)
        v = xp.concatenate([cv, v], axis=1)
    o = joint_attention(q, k, v)                                                   # [B, T+N, D]
    img = img + g * dense(a, "to_out.0", o[:, T:])
    txt = txt + cg * dense(a, "to_add_out", o[:, :T])
    img = img + g2 * feed_forward(p.sub("ff"), modulate(img, sh2, sc2))
    txt = txt + cg2 * feed_forward(p.sub("ff_context"), modulate(txt, csh2, csc2))
    return img, txt


def single_block(p: Params, x, silu_temb, cos, sin, heads: int):
    """FluxSingleTransformerBlock on x = [txt; img] [B, T+N, D]: attention and MLP side by side."""
    xp = array_module(x)
    shift, scale, gate = modulation(p.sub("norm"), silu_temb, 3)
    h = modulate(x, shift, scale)                                                   # [B, T+N, D]
    mlp = gelu_tanh_(dense(p, "proj_mlp", h))                                         # [B, T+N, 4D]
    if xp is np:
        q, k, v = joint_qkv(p.sub("attn"), [(h, "to_q", "to_k", "to_v", "norm_q", "norm_k")], heads, cos, sin)
    else:
        q, k, v = heads_qkv(p.sub("attn"), h, heads, "to_q", "to_k", "to_v", "norm_q", "norm_k")
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    o = joint_attention(q, k, v)                                                    # [B, T+N, D]
    o = dense(p, "proj_out", xp.concatenate([o, mlp], axis=-1))
    return x + gate * o


def mlp_embed(p: Params, x):
    """TimestepEmbedding / PixArtAlphaTextProjection: linear_1 -> SiLU -> linear_2."""
    h = silu(dense(p, "linear_1", x))
    return dense(p, "linear_2", h)


def _per_batch(v, B: int, name: str):
    """A scalar or [B] (or [1]) of timesteps/guidance -> float32 [B] on the host, times 1000 (diffusers)."""
    a = np.asarray(to_host(v), np.float32).reshape(-1)
    if a.shape[0] == 1:
        a = np.repeat(a, B)
    if a.shape[0] != B:
        raise ValueError(f"FluxTransformer2DModel: {name} has {a.shape[0]} values for a batch of {B}")
    return a * np.float32(1000.0)


# ---------------------------------------------------------------------------- the model

class FluxTransformer2DModel:
    unfused_lora = True      # every linear layer adds its unfused LoRA factors at run time (attention.dense)

    def __init__(self, config: FluxConfig, params: Params):
        self.config, self.params = config, params
        c = config
        w = params["x_embedder.weight"]
        if tuple(w.shape) != (c.inner_dim, c.in_channels):
            raise ValueError(f"x_embedder.weight {tuple(w.shape)} does not match the config "
                             f"([{c.inner_dim}, {c.in_channels}] for {c.num_attention_heads} heads of "
                             f"{c.attention_head_dim}, in_channels {c.in_channels})")
        for name, n in (("transformer_blocks", c.num_layers), ("single_transformer_blocks", c.num_single_layers)):
            if n and not params.has_prefix(f"{name}.{n - 1}"):
                raise ValueError(f"config says {n} {name}, but {name}.{n - 1} is missing from {params.source}")
        if c.guidance_embeds and not params.has_prefix("time_text_embed.guidance_embedder"):
            raise ValueError(f"config guidance_embeds=True, but time_text_embed.guidance_embedder is missing "
                             f"from {params.source}")

    @classmethod
    def from_pretrained(cls, path: str | Path, subfolder: str | None = None, variant: str | None = None):
        """A diffusers folder (config.json + diffusion_pytorch_model[.fp16].safetensors) -> float32 model."""
        folder = Path(path) / subfolder if subfolder else Path(path)
        config, params = load_model_folder(folder, variant)
        return cls(FluxConfig.from_dict(config), params)

    @classmethod
    def from_gguf(cls, path: str | Path) -> "FluxTransformer2DModel":
        """A ComfyUI-GGUF / city96 Flux file; quantized weights stay quantized (see flux_gguf.py)."""
        from .flux_gguf import load_flux_gguf
        return load_flux_gguf(path)

    @property
    def nbytes(self) -> int:
        return nbytes(self.params)

    def weight_formats(self) -> dict:
        """{format: number of weight tensors}: GGML type names for quantized ones, "float32" for the rest."""
        return weight_formats(self.params)

    def time_text_embedding(self, timestep, guidance, pooled, B: int):
        """temb [B, D] = MLP(sinusoid(1000 t)) (+ MLP(sinusoid(1000 g))) + MLP(pooled)."""
        c, p = self.config, self.params.sub("time_text_embed")

        def sinusoid(v, name):
            t = to_device(_per_batch(v, B, name))                                      # [B]
            return timestep_embedding(t, TIME_CHANNELS, flip_sin_to_cos=True, downscale_freq_shift=0.0)

        temb = mlp_embed(p.sub("timestep_embedder"), sinusoid(timestep, "timestep"))   # [B, D]
        if c.guidance_embeds:
            temb = temb + mlp_embed(p.sub("guidance_embedder"), sinusoid(guidance, "guidance"))
        return temb + mlp_embed(p.sub("text_embedder"), pooled)

    def __call__(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                 guidance=None):
        """See the module docstring: packed latents [B, N, C] -> velocity [B, N, p*p*C_out]."""
        c, p = self.config, self.params
        x = to_device(hidden_states, np.float32)
        ctx = to_device(encoder_hidden_states, np.float32)
        pooled = to_device(pooled_projections, np.float32)
        if x.ndim != 3 or x.shape[-1] != c.in_channels:
            raise ValueError(f"FluxTransformer2DModel: hidden_states {tuple(x.shape)} should be "
                             f"[B, N, {c.in_channels}]")
        B, N, _ = x.shape
        if ctx.ndim != 3 or ctx.shape[0] != B or ctx.shape[-1] != c.joint_attention_dim:
            raise ValueError(f"FluxTransformer2DModel: encoder_hidden_states {tuple(ctx.shape)} should be "
                             f"[{B}, T, {c.joint_attention_dim}]")
        if pooled.shape != (B, c.pooled_projection_dim):
            raise ValueError(f"FluxTransformer2DModel: pooled_projections {tuple(pooled.shape)} should be "
                             f"[{B}, {c.pooled_projection_dim}]")
        if c.guidance_embeds and guidance is None:
            raise ValueError("FluxTransformer2DModel: this model embeds the guidance scale (guidance_embeds=True, "
                             "FLUX.1-dev style): pass guidance")
        if not c.guidance_embeds and guidance is not None:
            raise ValueError("FluxTransformer2DModel: this model has no guidance embedding (FLUX.1-schnell style): "
                             "pass guidance=None")
        T = ctx.shape[1]
        ids = []
        for name, a, n in (("txt_ids", txt_ids, T), ("img_ids", img_ids, N)):
            a = np.asarray(to_host(a), np.float32)
            if a.ndim == 3:                      # the deprecated batched form: diffusers takes the first
                a = a[0]
            if a.shape != (n, len(c.axes_dims_rope)):
                raise ValueError(f"FluxTransformer2DModel: {name} {a.shape} should be [{n}, {len(c.axes_dims_rope)}]")
            ids.append(a)
        cos, sin = (to_device(t) for t in rope_tables(np.concatenate(ids), c.axes_dims_rope))   # [T+N, Dh/2]

        temb = self.time_text_embedding(timestep, guidance, pooled, B)                 # [B, D]
        st = silu(temb)                                                                 # every AdaLN reads SiLU(temb)
        img = dense(p, "x_embedder", x)                                                 # [B, N, D]
        txt = dense(p, "context_embedder", ctx)                                         # [B, T, D]
        heads = c.num_attention_heads
        for i in range(c.num_layers):
            img, txt = double_block(p.sub(f"transformer_blocks.{i}"), img, txt, st, cos, sin, heads)
        xp = array_module(img)
        h = xp.concatenate([txt, img], axis=1)                                          # [B, T+N, D]
        for i in range(c.num_single_layers):
            h = single_block(p.sub(f"single_transformer_blocks.{i}"), h, st, cos, sin, heads)
        scale, shift = modulation(p.sub("norm_out"), st, 2)                            # diffusers' order: scale first
        h = modulate(h[:, T:], shift, scale)                                            # [B, N, D]
        return dense(p, "proj_out", h)                                                  # [B, N, p*p*C_out]
