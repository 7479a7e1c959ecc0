"""Will an image model fit? The planner for diffusion pipelines (Flux, SD3, SDXL).

    plan = plan_image("flux-dev", 1024, 1024, weight_format="Q8_0")
    print(plan.verdict)             # one line: fits here / on a Spark, or what is missing
    print(plan.report())

The LLM planner (planner.py) holds the Spark's memory figures and the GGML bits per weight.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, asdict, replace
from pathlib import Path

from .planner import FORMAT_BITS, SPARK_MEMORY, SPARK_RESERVED
#
# "Will Flux-dev at 1024x1024 fit?" An image pipeline holds a denoiser (Flux/SD3 transformer or SDXL
# UNet), one to three text encoders and a VAE. What spark_lab keeps in memory is not the download
# size: safetensors weights are cast to float32 when loaded (diffusion/loading.py, text/t5.py), GGML
# blocks from a GGUF stay quantized (flux_gguf.py; its 1-D tensors become float32). Activations are
# float32 too. The phases run one after another (encode the prompt, denoise, decode), so the peak is
# every weight plus the largest phase's activations, or, when the text encoders are dropped once the
# prompt is encoded (free_text_encoders=True), the larger of the two halves.

FORMAT_ALIASES = {"fp32": "F32", "float32": "F32", "fp16": "F16", "float16": "F16", "bf16": "BF16",
                  "bfloat16": "BF16"}
FLOAT_FORMATS = ("F32", "F16", "BF16")   # safetensors dtypes: upcast to float32 when spark_lab loads them
IMAGE_SIDE_STEP = 64                     # the "largest square image that fits" search goes in these steps
IMAGE_SIDE_MAX = 4096                    # ... up to this side (16 megapixels, past what these models were trained on)
# Float32 values per token alive at the widest point of one MMDiT block (spark_lab's flux.single_block,
# the proj_out on [attention; MLP]): the input x, the modulated h, q, k, v (3), the MLP's hidden (4 x D
# wide), the attention output, their concatenation (5), the block's output = 16 widths of D. A Flux
# double block or an SD3 joint block holds fewer (its MLP is not concatenated).
MMDIT_WIDTHS_PER_TOKEN = 16


def format_bits(fmt: str) -> tuple[str, float]:
    """'bf16' / 'Q8_0' / ... -> (canonical name, stored bits per weight)."""
    name = FORMAT_ALIASES.get(str(fmt).lower(), str(fmt).upper())
    if name not in FORMAT_BITS:
        raise ValueError(f"unknown weight format {fmt!r} (known: fp16, bf16, fp32, {', '.join(FORMAT_BITS)})")
    return name, FORMAT_BITS[name]


@dataclass(frozen=True)
class TextEncoderShape:
    """A text encoder's config.json numbers (transformers' names; T5: d_model -> hidden_size, d_ff ->
    intermediate_size, d_kv -> head_dim)."""
    kind: str                       # "clip" or "t5"
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    vocab_size: int
    max_positions: int = 77         # CLIP's position table (and prompt length); T5 has none
    projection_dim: int = 0         # CLIPTextModelWithProjection's text_projection (0: none)
    head_dim: int = 64              # T5 d_kv (CLIP: hidden_size / num_heads)
    gated: bool = False             # T5 v1.1 feed-forward: wi_0 and wi_1
    buckets: int = 32               # T5 relative_attention_num_buckets
    label: str = ""


TEXT_ENCODERS: dict[str, TextEncoderShape] = {
    # openai/clip-vit-large-patch14 text_config (FLUX.1's and SDXL's text_encoder: CLIPTextModel)
    "clip-l": TextEncoderShape("clip", 768, 3072, 12, 12, 49408, label="CLIP-L"),
    # SD3's text_encoder: the same with its 768 x 768 text_projection (CLIPTextModelWithProjection)
    "clip-l-proj": TextEncoderShape("clip", 768, 3072, 12, 12, 49408, projection_dim=768, label="CLIP-L"),
    # laion/CLIP-ViT-bigG-14-laion2B-39B-b160k text tower (SDXL's and SD3's text_encoder_2, with projection)
    "clip-g": TextEncoderShape("clip", 1280, 5120, 32, 20, 49408, projection_dim=1280, label="CLIP-G"),
    # google/t5-v1_1-xxl config.json, encoder only (FLUX.1's text_encoder_2, SD3's text_encoder_3)
    "t5-xxl": TextEncoderShape("t5", 4096, 10240, 24, 64, 32128, max_positions=0, head_dim=64, gated=True,
                               label="T5-XXL"),
}


def text_encoder_params(e: TextEncoderShape) -> int:
    d, f = e.hidden_size, e.intermediate_size
    if e.kind == "clip":
        # per layer: 2 LayerNorms (w, b), q/k/v/out with biases, fc1 and fc2 with biases;
        # + token and position tables, the final LayerNorm, the projection (no bias)
        layer = 2 * 2 * d + 4 * (d * d + d) + (d * f + f) + (f * d + d)
        return e.vocab_size * d + e.max_positions * d + e.num_layers * layer + 2 * d + d * e.projection_dim
    inner = e.num_heads * e.head_dim
    # per layer: q/k/v/o without biases, wi (or wi_0 and wi_1) and wo, two RMSNorm scales;
    # + the shared embedding, layer 0's relative-position table [buckets, heads], the final RMSNorm
    layer = 4 * d * inner + (3 if e.gated else 2) * d * f + 2 * d
    return e.vocab_size * d + e.num_layers * layer + e.buckets * e.num_heads + d


def text_encoder_activation_bytes(e: TextEncoderShape, tokens: int, batch: int) -> int:
    """One layer's float32 working set: h, normed x, q, k, v, attention output (6 widths of d), the
    feed-forward's hidden states (3 widths of d_ff), the scores, their bias and softmax copy (3 H T^2)."""
    return 4 * batch * (tokens * (6 * e.hidden_size + 3 * e.intermediate_size) + 3 * e.num_heads * tokens**2)


@dataclass(frozen=True)
class MMDiTShape:
    """A Flux or SD3 transformer's config.json numbers (diffusers' names)."""
    kind: str                        # "flux" (FluxTransformer2DModel) or "sd3" (SD3Transformer2DModel)
    num_layers: int                  # Flux: double-stream blocks; SD3: joint blocks (the last is context_pre_only)
    num_attention_heads: int
    attention_head_dim: int
    in_channels: int                 # Flux: 64 (16 latent channels packed 2x2); SD3: 16
    joint_attention_dim: int = 4096  # the T5 width
    pooled_projection_dim: int = 768 # Flux: CLIP-L pooled (768); SD3: CLIP-L + CLIP-G pooled (2048)
    num_single_layers: int = 0       # Flux single-stream blocks
    patch_size: int = 1              # SD3: 2 (PatchEmbed); Flux: 1 (the pipeline packs 2x2 itself)
    guidance_embeds: bool = False    # FLUX.1-dev's guidance embedding
    qk_norm: bool = True             # per-head RMSNorm scales on q and k (Flux, SD3.5; not SD3-medium)
    pos_embed_max_size: int = 0      # SD3: a stored sin-cos table of pos_embed_max_size^2 x D values

    @property
    def width(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


def mmdit_params(s: MMDiTShape) -> int:
    """Parameters (+ SD3's stored position table) of diffusers' FluxTransformer2DModel / SD3Transformer2DModel."""
    D, hd = s.width, s.attention_head_dim
    lin = lambda i, o: i * o + o                                   # noqa: E731  a Linear with bias
    mlp = lin(D, 4 * D) + lin(4 * D, D)                            # FeedForward, gelu-tanh, ratio 4
    qk = 4 * hd if s.qk_norm else 0                                # norm_q, norm_k, norm_added_q, norm_added_k
    time = lin(256, D) + lin(D, D)                                 # 256-wide sinusoid -> MLP
    text = lin(s.pooled_projection_dim, D) + lin(D, D)             # pooled CLIP -> MLP
    if s.kind == "flux":
        # double block: AdaLayerNormZero x 2 (6D each), q/k/v + added q/k/v, to_out + to_add_out, 2 MLPs
        double = 2 * lin(D, 6 * D) + 6 * lin(D, D) + 2 * lin(D, D) + qk + 2 * mlp
        # single block: AdaLayerNormZeroSingle (3D), q/k/v, proj_mlp (4D), proj_out on [attn; mlp] (5D -> D)
        single = lin(D, 3 * D) + 3 * lin(D, D) + (2 * hd if s.qk_norm else 0) + lin(D, 4 * D) + lin(5 * D, D)
        embed = time * (2 if s.guidance_embeds else 1) + text + lin(s.joint_attention_dim, D) + lin(s.in_channels, D)
        out = lin(D, 2 * D) + lin(D, s.patch_size**2 * s.in_channels)   # norm_out (shift, scale), proj_out
        return s.num_layers * double + s.num_single_layers * single + embed + out
    # SD3 joint block: AdaLayerNormZero x 2, q/k/v + added q/k/v, to_out + to_add_out, 2 MLPs; the last
    # block is context_pre_only: its context norm is AdaLayerNormContinuous (2D) and it has no to_add_out
    # and no context MLP
    joint = 2 * lin(D, 6 * D) + 8 * lin(D, D) + qk + 2 * mlp
    last = lin(D, 6 * D) + lin(D, 2 * D) + 7 * lin(D, D) + qk + mlp
    p = s.patch_size
    embed = (s.in_channels * p * p * D + D) + time + text + lin(s.joint_attention_dim, D)   # PatchEmbed conv
    out = lin(D, 2 * D) + lin(D, p * p * s.in_channels)
    return (s.num_layers - 1) * joint + last + embed + out + s.pos_embed_max_size**2 * D


@dataclass(frozen=True)
class UNetShape:
    """An SDXL-style UNet2DConditionModel's config.json numbers that size its activations."""
    block_out_channels: tuple
    layers_per_block: int
    attention_levels: tuple          # levels whose down block has cross-attention (CrossAttnDownBlock2D)
    params: int                      # counted (see KNOWN_IMAGE_MODELS)


@dataclass(frozen=True)
class VAEShape:
    """An AutoencoderKL's config.json numbers."""
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 16
    quant_convs: bool = False        # use_quant_conv / use_post_quant_conv (SD 1.x/2.x and SDXL: true)

    @property
    def scale(self) -> int:          # pixels per latent side
        return 2 ** (len(self.block_out_channels) - 1)


def vae_params(v: VAEShape) -> int:
    """Parameters of diffusers' AutoencoderKL (encoder + decoder; 3x3 convs, GroupNorm w/b)."""
    conv = lambda i, o, k=3: i * o * k * k + o                    # noqa: E731
    def resnet(i, o):
        return 2 * i + conv(i, o) + 2 * o + conv(o, o) + (conv(i, o, 1) if i != o else 0)
    ch, n, lat = v.block_out_channels, v.layers_per_block, v.latent_channels
    C = ch[-1]
    mid = 2 * resnet(C, C) + 2 * C + 4 * (C * C + C)                 # 2 resnets, GroupNorm + 1-head attention
    enc, prev = conv(3, ch[0]), ch[0]
    for i, c in enumerate(ch):
        enc += resnet(prev, c) + (n - 1) * resnet(c, c) + (conv(c, c) if i < len(ch) - 1 else 0)
        prev = c
    enc += mid + 2 * C + conv(C, 2 * lat)                            # norm_out, conv_out -> mean, logvar
    dec, prev = conv(lat, C), C
    for i, c in enumerate(reversed(ch)):
        dec += resnet(prev, c) + n * resnet(c, c) + (conv(c, c) if i < len(ch) - 1 else 0)
        prev = c
    dec += mid + 2 * ch[0] + conv(ch[0], 3)
    quant = conv(2 * lat, 2 * lat, 1) + conv(lat, lat, 1) if v.quant_convs else 0
    return enc + dec + quant


@dataclass(frozen=True)
class KnownImageModel:
    family: str                      # "flux", "sd3", "sdxl"
    denoiser: object                 # MMDiTShape or UNetShape
    text_encoders: tuple             # (diffusers subfolder, TextEncoderShape), in pipeline order
    vae: VAEShape
    t5_tokens: int                   # the T5 prompt length the pipeline pads to (0: no T5)
    cfg: bool                        # classifier-free guidance: the denoiser runs 2 rows per image
    weight_format: str = "BF16"      # how the published denoiser is stored
    size: int = 1024                 # native resolution (side, pixels)
    source: str = ""

    @property
    def denoiser_name(self) -> str:
        return "unet" if self.family == "sdxl" else "transformer"

    @property
    def text_tokens(self) -> int:
        """Tokens the denoiser sees beside the image: Flux attends over the T5 tokens, SD3 over
        77 CLIP + T5 tokens (concatenated), SDXL cross-attends to 77 CLIP tokens."""
        return {"flux": self.t5_tokens, "sd3": 77 + self.t5_tokens}.get(self.family, 77)

    def denoiser_params(self) -> int:
        d = self.denoiser
        return d.params if isinstance(d, UNetShape) else mmdit_params(d)


_FLUX = dict(num_layers=19, num_single_layers=38, num_attention_heads=24, attention_head_dim=128, in_channels=64)
_SD3 = dict(kind="sd3", in_channels=16, patch_size=2, pooled_projection_dim=2048, pos_embed_max_size=192)
_TE = TEXT_ENCODERS
_FLUX_TE = (("text_encoder", _TE["clip-l"]), ("text_encoder_2", _TE["t5-xxl"]))
_SD3_TE = (("text_encoder", _TE["clip-l-proj"]), ("text_encoder_2", _TE["clip-g"]), ("text_encoder_3", _TE["t5-xxl"]))

KNOWN_IMAGE_MODELS: dict[str, KnownImageModel] = {
    # black-forest-labs/FLUX.1-dev and FLUX.1-schnell transformer/config.json (schnell: no guidance
    # embedding), vae/config.json (16 latent channels, no quant convs). T5 length: diffusers' FluxPipeline
    # pads to max_sequence_length = 512; schnell was distilled for 256 (BFL's and diffusers' examples).
    # Neither uses classifier-free guidance (dev has the guidance scale as an input instead).
    "flux-dev": KnownImageModel("flux", MMDiTShape("flux", guidance_embeds=True, **_FLUX), _FLUX_TE, VAEShape(),
                                t5_tokens=512, cfg=False, source="black-forest-labs/FLUX.1-dev"),
    "flux-schnell": KnownImageModel("flux", MMDiTShape("flux", **_FLUX), _FLUX_TE, VAEShape(), t5_tokens=256,
                                    cfg=False, source="black-forest-labs/FLUX.1-schnell"),
    # stabilityai/stable-diffusion-3-medium-diffusers and stable-diffusion-3.5-large transformer/config.json
    # (3.5 adds qk_norm "rms_norm"); StableDiffusion3Pipeline: max_sequence_length 256, guidance 7.0 (CFG)
    "sd3-medium": KnownImageModel("sd3", MMDiTShape(num_layers=24, num_attention_heads=24, attention_head_dim=64,
                                                    qk_norm=False, **_SD3), _SD3_TE, VAEShape(), t5_tokens=256,
                                  cfg=True, weight_format="F16",
                                  source="stabilityai/stable-diffusion-3-medium-diffusers"),
    "sd3.5-large": KnownImageModel("sd3", MMDiTShape(num_layers=38, num_attention_heads=38, attention_head_dim=64,
                                                     **_SD3), _SD3_TE, VAEShape(), t5_tokens=256, cfg=True,
                                   source="stabilityai/stable-diffusion-3.5-large"),
    # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json: (320, 640, 1280), 2 layers per block,
    # cross-attention at levels 1 and 2. Its 2,567,463,684 parameters were counted by building diffusers'
    # UNet2DConditionModel from that config on torch's meta device (tests/test_planner_images.py does it
    # again when diffusers is installed). VAE: 4 latent channels with quant convs; guidance 5.0 (CFG).
    "sdxl-base": KnownImageModel("sdxl", UNetShape((320, 640, 1280), 2, (1, 2), 2_567_463_684),
                                 (("text_encoder", _TE["clip-l"]), ("text_encoder_2", _TE["clip-g"])),
                                 VAEShape(latent_channels=4, quant_convs=True), t5_tokens=0, cfg=True,
                                 weight_format="F16", source="stabilityai/stable-diffusion-xl-base-1.0"),
}


@dataclass
class Component:
    name: str                        # diffusers subfolder: transformer / unet / text_encoder_2 / vae ...
    label: str                       # what it is: "FLUX.1 transformer", "T5-XXL", ...
    params: float
    file_bytes: int                  # as stored (safetensors dtype or GGML blocks)
    resident_bytes: int              # as spark_lab holds it
    format: str                      # "BF16", "Q8_0", "mixed" ...


def _component(name, label, params, fmt, upcast=True) -> Component:
    fmt, bits = format_bits(fmt)
    file_b = int(params * bits / 8)
    held = int(params * 4) if upcast and fmt in FLOAT_FORMATS else file_b
    return Component(name, label, float(params), file_b, held, fmt)


@dataclass
class ImageModelShape:
    """What plan_image needs: the architecture numbers (a KnownImageModel) and each component's bytes."""
    name: str
    arch: KnownImageModel
    components: list


def known_image_shape(name: str, weight_format: str | None = None, upcast: bool = True) -> ImageModelShape:
    """A named model of KNOWN_IMAGE_MODELS with its denoiser stored as `weight_format` (fp16, bf16,
    Q8_0, Q4_K, ...; text encoders and VAE as their 16-bit files)."""
    m = KNOWN_IMAGE_MODELS.get(str(name).lower())
    if m is None:
        raise ValueError(f"unknown image model {name!r} (named shapes: {', '.join(KNOWN_IMAGE_MODELS)})")
    fmt = format_bits(weight_format or m.weight_format)[0]
    comps = [_component(m.denoiser_name, f"{m.family} {m.denoiser_name}", m.denoiser_params(), fmt, upcast)]
    comps += [_component(sub, e.label, text_encoder_params(e), "BF16", upcast) for sub, e in m.text_encoders]
    comps.append(_component("vae", "VAE", vae_params(m.vae), "BF16", upcast))
    return ImageModelShape(f"{name.lower()} ({fmt})", m, comps)


@dataclass
class ImagePlan:
    model: str
    width: int
    height: int
    batch: int
    components: list                 # Component per part
    weights: int                     # bytes held: every component
    file_bytes: int                  # bytes to download
    peak_weights: int                # weights held at the peak (all, unless the text encoders are freed)
    activations: int                 # activations at the peak (the largest phase then)
    text_encoder_activations: int
    denoiser_activations: int
    vae_activations: int
    total: int                       # bytes at the peak
    available_here: int
    fits_here: bool
    fits_spark: bool
    max_side_here: int               # largest square image (multiple of 64 px) that fits here (0: none)
    max_side_spark: int
    image_tokens: int = 0            # Flux/SD3: tokens of the image; SDXL: latent pixels
    text_tokens: int = 0
    free_text_encoders: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        d["verdict"] = self.verdict
        return d

    @property
    def verdict(self) -> str:
        need = (f"needs {self.total / 1e9:.1f} GB ({self.peak_weights / 1e9:.1f} GB weights + "
                f"{self.activations / 1e9:.1f} GB activations"
                + (", text encoders freed after encoding)" if self.free_text_encoders else ")"))
        here = (f"fits here ({self.available_here / 1e9:.1f} GB free)" if self.fits_here else
                f"does not fit here ({self.available_here / 1e9:.1f} GB free"
                + (f"; {self.max_side_here}x{self.max_side_here} does)" if self.max_side_here else ")"))
        spark = "fits a DGX Spark" if self.fits_spark else "does not fit a DGX Spark (120 GB usable)"
        return f"{self.model} at {self.width}x{self.height}, batch {self.batch}: {need}; {here}; {spark}"

    def report(self) -> str:
        def gb(n):
            return f"{n / 1e9:6.2f} GB"
        act = max(self.text_encoder_activations, self.denoiser_activations, self.vae_activations)
        lines = [f"{self.model}: {self.width}x{self.height}, batch {self.batch}, "
                 f"{self.image_tokens} image + {self.text_tokens} text tokens"]
        for c in self.components:
            lines.append(f"  {c.name:15s} {c.label:22s} {c.params / 1e9:6.2f}B params  {c.format:5s} "
                         f"file {gb(c.file_bytes)}  held {gb(c.resident_bytes)}")
        lines += [f"  weights         {gb(self.weights)} held ({gb(self.file_bytes)} to download)",
                  f"  activations     {gb(act)} peak (text encoders {gb(self.text_encoder_activations)}, "
                  f"denoiser {gb(self.denoiser_activations)}, VAE decode {gb(self.vae_activations)})",
                  f"  total           {gb(self.total)} at the peak" + (
                      f" (text encoders freed after encoding: {gb(self.peak_weights)} weights then)"
                      if self.free_text_encoders else ""),
                  f"  largest square  {self.max_side_here or '-'} here, {self.max_side_spark or '-'} on a DGX Spark",
                  self.verdict]
        return "\n".join(lines)


def _check_size(m: KnownImageModel, width: int, height: int, batch: int):
    mult = m.vae.scale * (1 if isinstance(m.denoiser, UNetShape) else 2)     # MMDiTs patchify 2x2 latents
    if batch < 1 or width < mult or height < mult or width % mult or height % mult:
        raise ValueError(f"{m.family}: width and height must be positive multiples of {mult} and batch >= 1, "
                         f"got {width}x{height}, batch {batch}")


def image_tokens(m: KnownImageModel, width: int, height: int) -> int:
    """Flux/SD3: (H/16) * (W/16) tokens (8x VAE, 2x2 patches); SDXL: latent pixels (H/8) * (W/8)."""
    f = m.vae.scale * (1 if isinstance(m.denoiser, UNetShape) else 2)
    return (height // f) * (width // f)


def denoiser_activation_bytes(m: KnownImageModel, width: int, height: int, batch: int) -> int:
    """One denoising step's float32 working set."""
    from .kernels.attention import _MAX_SCORES
    rows = batch * (2 if m.cfg else 1)
    d = m.denoiser
    if isinstance(d, UNetShape):
        # the same estimate TextToImagePipeline.activation_bytes makes before it runs: the skip
        # connections, twice the im2col'ed input of the widest up resnet, one head's attention scores
        from .diffusion.attention import SCORES_PER_CHUNK
        h, w = height // m.vae.scale, width // m.vae.scale
        skips = peak = attn = 0
        for i, ch in enumerate(d.block_out_channels):
            hw = max(1, (h >> i) * (w >> i))
            skips += (d.layers_per_block + 1) * rows * ch * hw
            peak = max(peak, rows * ch * hw * 2 * 9)
            if i in d.attention_levels:
                attn = max(attn, hw * hw, SCORES_PER_CHUNK)
        return 4 * (skips + 2 * peak + attn)
    N = image_tokens(m, width, height) + m.text_tokens
    H = d.num_attention_heads
    # kernels.attention takes queries in chunks of at most _MAX_SCORES scores (one query row at
    # least), one batch row at a time; softmax makes one copy of a chunk
    chunk = min(N, max(1, _MAX_SCORES // (H * N))) * H * N
    return 4 * (rows * N * d.width * MMDIT_WIDTHS_PER_TOKEN + 2 * chunk)


def vae_decode_activation_bytes(v: VAEShape, width: int, height: int, batch: int) -> int:
    """The larger of the decoder's two peaks (float32), as TextToImagePipeline.activation_bytes counts
    them: the im2col matrix of the first full-resolution conv (the last up block's first resnet takes
    block_out_channels[1] = 256 channels: 9 taps x 256 x H x W values; kernels.conv's GPU path, the CPU's
    Winograd kernel works in small chunks) and the mid block's one-head attention scores over the
    (H/8) * (W/8) latent pixels (diffusion.attention runs a whole head at once)."""
    lat = (height // v.scale) * (width // v.scale)
    cin = v.block_out_channels[1 if len(v.block_out_channels) > 1 else 0]
    return 4 * batch * max(cin * 9 * height * width, lat * lat)


def _image_numbers(s: ImageModelShape, width, height, batch, free_text_encoders):
    m = s.arch
    te = {c.name: c for c in s.components if c.name.startswith("text_encoder")}
    te_rows = batch * (2 if m.cfg else 1)                                # the negative prompt too
    te_act = max([text_encoder_activation_bytes(e, m.t5_tokens if e.kind == "t5" else e.max_positions, te_rows)
                  for sub, e in m.text_encoders if sub in te] or [0])
    den_act = denoiser_activation_bytes(m, width, height, batch)
    vae_act = vae_decode_activation_bytes(m.vae, width, height, batch)
    te_w = sum(c.resident_bytes for c in te.values())
    rest_w = sum(c.resident_bytes for c in s.components) - te_w
    if not free_text_encoders:
        peak_w, peak_act = te_w + rest_w, max(te_act, den_act, vae_act)
    elif te_w + te_act > rest_w + max(den_act, vae_act):
        peak_w, peak_act = te_w, te_act                                  # encoding the prompt is the peak
    else:
        peak_w, peak_act = rest_w, max(den_act, vae_act)
    return te_w + rest_w, te_act, den_act, vae_act, peak_w, peak_act, peak_w + peak_act


def _max_side(s, batch, free_text_encoders, capacity) -> int:
    step = IMAGE_SIDE_STEP
    lo, hi = 0, IMAGE_SIDE_MAX // step                                   # in units of `step`
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _image_numbers(s, mid * step, mid * step, batch, free_text_encoders)[-1] <= capacity:
            lo = mid
        else:
            hi = mid - 1
    return lo * step


def plan_image(model, width: int | None = None, height: int | None = None, batch: int = 1,
               weight_format: str | None = None, available: int | None = None,
               free_text_encoders: bool = False, upcast: bool = True) -> ImagePlan:
    """Will this text-to-image model run at width x height (pixels), `batch` images at once?

    model: a name in KNOWN_IMAGE_MODELS (weight_format: how its denoiser is stored, default the
    published one), a diffusers pipeline folder (model_index.json + subfolders: sizes from the
    safetensors headers), a Flux/SD3/SDXL GGUF (the denoiser; the rest as the family's published
    files), or an ImageModelShape. upcast=False counts weights as stored (what a bf16 runtime holds)
    instead of spark_lab's float32 copies."""
    if isinstance(model, ImageModelShape):
        s = model
    elif str(model).lower() in KNOWN_IMAGE_MODELS:
        s = known_image_shape(str(model), weight_format, upcast)
    else:
        if weight_format is not None:
            raise ValueError("weight_format is for named models; a file's tensors say how they are stored")
        s = image_shape_from_path(model, upcast)
    m = s.arch
    width, height = int(width or m.size), int(height or m.size)
    _check_size(m, width, height, batch)
    if available is None:
        from .memory import get_allocator
        st = get_allocator().stats()
        available = st.budget - st.in_use
    weights, te_act, den_act, vae_act, peak_w, peak_act, total = _image_numbers(s, width, height, batch,
                                                                                free_text_encoders)
    spark = SPARK_MEMORY - SPARK_RESERVED
    return ImagePlan(
        s.name, width, height, batch, s.components, weights, sum(c.file_bytes for c in s.components),
        peak_w, peak_act, te_act, den_act, vae_act, total, available, total <= available,
        total <= spark, _max_side(s, batch, free_text_encoders, available),
        _max_side(s, batch, free_text_encoders, spark), image_tokens(m, width, height), m.text_tokens,
        free_text_encoders)


# ---- sizes from files (headers only: nothing is loaded)

_ST_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
             "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_PIPELINES = {"FluxPipeline": "flux-dev", "StableDiffusion3Pipeline": "sd3-medium",
              "StableDiffusionXLPipeline": "sdxl-base"}


def safetensors_sizes(path) -> tuple[int, int, str]:
    """A safetensors file's header -> (values, bytes, dtype or 'mixed'); the data is not read."""
    p = Path(path)
    size = p.stat().st_size
    with open(p, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n > size - 8:
            raise ValueError(f"{p} is not a safetensors file (header of {n} bytes in a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise ValueError(f"{p} is not a safetensors file (bad header)") from None
    values = nbytes = 0
    dtypes = set()
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or info.get("dtype") not in _ST_BYTES or not isinstance(info.get("shape"), list):
            raise ValueError(f"{p}: tensor {name!r} has a bad or unknown dtype/shape in the header")
        k = math.prod(int(d) for d in info["shape"])
        values += k
        nbytes += k * _ST_BYTES[info["dtype"]]
        dtypes.add(info["dtype"])
    return values, nbytes, (dtypes.pop() if len(dtypes) == 1 else "mixed")


def _folder_component(folder, name: str, label: str, upcast: bool) -> Component | None:
    """A diffusers/transformers subfolder's weights: every *.safetensors of one variant (shards too)."""
    sub = folder / name
    if not sub.is_dir():
        return None
    files = sorted(f for f in sub.glob("*.safetensors") if ".fp16." not in f.name)
    files = files or sorted(sub.glob("*.safetensors"))               # the fp16 variant when it is all there is
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {sub}")
    values = fbytes = 0
    fmts = set()
    for f in files:
        v, b, fmt = safetensors_sizes(f)
        values, fbytes = values + v, fbytes + b
        fmts.add(fmt)
    fmt = fmts.pop() if len(fmts) == 1 else "mixed"
    held = 4 * values if upcast else fbytes                           # every safetensors tensor -> float32
    return Component(name, label, float(values), fbytes, held, fmt)


def image_shape_from_path(path, upcast: bool = True) -> ImageModelShape:
    """A diffusers pipeline folder or a denoiser GGUF -> ImageModelShape (headers only)."""
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return _gguf_image_shape(p, upcast)
    if not (p / "model_index.json").is_file():
        raise FileNotFoundError(f"{p} is neither a known image model ({', '.join(KNOWN_IMAGE_MODELS)}), "
                                f"a diffusers folder with model_index.json, nor a .gguf file")
    from .diffusion.loading import read_json
    cls = read_json(p / "model_index.json").get("_class_name")
    if cls not in _PIPELINES:
        raise ValueError(f"{p}: pipeline {cls!r} is not one the image planner knows ({', '.join(_PIPELINES)})")
    m = _arch_from_folder(p, KNOWN_IMAGE_MODELS[_PIPELINES[cls]])
    comps = [c for c in [_folder_component(p, m.denoiser_name, f"{m.family} {m.denoiser_name}", upcast)]
             + [_folder_component(p, sub, e.label, upcast) for sub, e in m.text_encoders]
             + [_folder_component(p, "vae", "VAE", upcast)] if c is not None]
    if not comps or comps[0].name != m.denoiser_name:
        raise FileNotFoundError(f"{p}: no {m.denoiser_name}/ folder")
    return ImageModelShape(p.name, m, comps)


def _arch_from_folder(p, base: KnownImageModel) -> KnownImageModel:
    """The family's published numbers, replaced by what the folder's config.json files say."""
    from .diffusion.loading import read_json

    def cfg(sub):
        f = p / sub / "config.json"
        return read_json(f) if f.is_file() else {}
    den, c = base.denoiser, cfg(base.denoiser_name)
    if isinstance(den, MMDiTShape):
        keep = {k: c[k] for k in ("num_layers", "num_single_layers", "num_attention_heads", "attention_head_dim",
                                  "in_channels", "joint_attention_dim", "pooled_projection_dim", "patch_size",
                                  "guidance_embeds", "pos_embed_max_size") if k in c}
        if den.kind == "sd3" and "qk_norm" in c:
            keep["qk_norm"] = bool(c["qk_norm"])
        den = replace(den, **keep)
    else:
        blocks = c.get("block_out_channels", den.block_out_channels)
        types = c.get("down_block_types", [])
        levels = tuple(i for i, t in enumerate(types) if "Attn" in t) if types else den.attention_levels
        lpb = c.get("layers_per_block", den.layers_per_block)
        den = replace(den, block_out_channels=tuple(blocks), attention_levels=levels,
                      layers_per_block=lpb if isinstance(lpb, int) else max(lpb))
    v = cfg("vae")
    vae = replace(base.vae, **{k: (tuple(v[k]) if k == "block_out_channels" else v[k])
                               for k in ("block_out_channels", "layers_per_block", "latent_channels") if k in v})
    encs = []
    for sub, e in base.text_encoders:
        t = cfg(sub)
        if t.get("model_type") == "t5":
            e = replace(e, hidden_size=t.get("d_model", e.hidden_size),
                        intermediate_size=t.get("d_ff", e.intermediate_size),
                        num_layers=t.get("num_layers", e.num_layers), num_heads=t.get("num_heads", e.num_heads),
                        head_dim=t.get("d_kv", e.head_dim), gated=str(t.get("feed_forward_proj", "")).startswith("gated"))
        elif t:
            t = t.get("text_config", t)
            e = replace(e, **{k: t[k] for k in ("hidden_size", "intermediate_size", "vocab_size") if k in t},
                        num_layers=t.get("num_hidden_layers", e.num_layers),
                        num_heads=t.get("num_attention_heads", e.num_heads),
                        max_positions=t.get("max_position_embeddings", e.max_positions))
        encs.append((sub, e))
    return replace(base, denoiser=den, vae=vae, text_encoders=tuple(encs), source=str(p))


def _gguf_image_shape(p, upcast: bool) -> ImageModelShape:
    """A denoiser GGUF (city96 / ComfyUI-GGUF: general.architecture flux, sd3 or sdxl): exact bytes from
    its tensor table; text encoders and VAE as the family's published 16-bit files."""
    from .gguf import GGUFFile
    f = GGUFFile(p)
    arch = f.arch
    tensors = list(f.tensors.values())
    params = sum(t.n_elements for t in tensors)
    if arch == "flux":
        name = "flux-dev" if any(t.startswith(("guidance_in.", "model.diffusion_model.guidance_in."))
                                 for t in f.tensors) else "flux-schnell"
    elif arch == "sd3":
        name = "sd3.5-large" if params > 5e9 else "sd3-medium"      # 8.1 B and 2.0 B parameters
    elif arch == "sdxl":
        name = "sdxl-base"
    else:
        raise ValueError(f"{p}: general.architecture {arch!r} is not an image model the planner knows "
                         f"(flux, sd3, sdxl)")
    base = known_image_shape(name, upcast=upcast)
    fbytes = sum(t.nbytes for t in tensors)
    floats = {t.name for t in tensors if t.qtype.name in FLOAT_FORMATS}
    held = sum(4 * t.n_elements if upcast and t.name in floats else t.nbytes for t in tensors)
    kinds = {t.qtype.name for t in tensors if t.name not in floats}
    fmt = kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else "F32")
    name = base.arch.denoiser_name
    den = Component(name, f"{arch} {name} (GGUF)", float(params), fbytes, held, fmt)
    return ImageModelShape(p.name, base.arch, [den] + base.components[1:])
