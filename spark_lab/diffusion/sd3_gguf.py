"""SD3 / SD3.5 transformers from GGUF files, as ComfyUI-GGUF (city96) and its converters write them.

    model = load_sd3_gguf("sd3.5_large-Q4_0.gguf")       # -> sd3.SD3Transformer2DModel

The linear layers stay in their GGML blocks (`quants.QuantTensor`) and run on the kit's quantized
kernels through `attention.dense` / `kernels.linear`, as in flux_gguf.py (which says which
kernels and how they round activations to int8). Tensors that are not 2-D (the 4-D patch
convolution, the position table) and those stored as F32/F16/BF16 become float32.

The file. `general.architecture` is "sd3"; the tensors keep Stability's MMDiT names (the original
checkpoint's keys, with or without a "model.diffusion_model." prefix). city96's files keep the
embedders, final_layer and pos_embed in F16/F32 and quantize the joint blocks; any GGML type
spark_lab reads (`quants.BLOCK_SIZES`) is accepted anywhere. The names map onto diffusers' as
diffusers' convert_sd3_transformer_checkpoint_to_diffusers does:

    pos_embed                               pos_embed.pos_embed          [1, M*M, D] (or [M*M, D])
    x_embedder.proj                         pos_embed.proj               conv [D, C, p, p]
    t_embedder.mlp.{0,2}                    time_text_embed.timestep_embedder.linear_{1,2}
    y_embedder.mlp.{0,2}                    time_text_embed.text_embedder.linear_{1,2}
    context_embedder                        context_embedder
    joint_blocks.i.x_block.attn.qkv         transformer_blocks.i.attn.to_q | to_k | to_v, rows split in 3
    joint_blocks.i.context_block.attn.qkv   attn.add_q_proj | add_k_proj | add_v_proj (the last block too)
    ...x_block.attn.ln_q / ln_k             attn.norm_q / norm_k          (context_block: norm_added_q / _k)
    ...x_block.attn.proj                    attn.to_out.0                 (context_block: to_add_out)
    ...x_block.mlp.fc{1,2}                  ff.net.0.proj / ff.net.2      (context_block: ff_context)
    ...x_block.adaLN_modulation.1           norm1.linear                  (6 D rows; 9 D with attn2)
    ...context_block.adaLN_modulation.1     norm1_context.linear          (6 D rows)
    ...x_block.attn2.{qkv,ln_q,ln_k,proj}   attn2.{to_q|to_k|to_v, norm_q, norm_k, to_out.0}   (SD3.5-medium)
    final_layer.linear                      proj_out
    final_layer.adaLN_modulation.1          norm_out.linear, its two row halves swapped: Stability's
                                            (shift, scale) is diffusers' (scale, shift)
The last block is context_pre_only: its context_block has only adaLN_modulation.1 (2 D rows,
swapped like the final layer's, -> an AdaLayerNormContinuous), attn.qkv and the qk-norms; no
attn.proj, no mlp. Splits and swaps move whole rows (flux_gguf._Reader): the q/k/v parts are
zero-copy views of the file on the CPU, a swap is one copy of the raw blocks.

The config comes from the tensor shapes: width D, in_channels and patch_size from x_embedder.proj
[D, C, p, p]; num_layers from the highest joint_blocks.N; head_dim from the qk-norm scales when
there are some (SD3.5), else SD3's 64 (heads = D / 64; SD3 makes D = 64 * depth);
pos_embed_max_size = sqrt(pos_embed rows); joint_attention_dim = context_embedder columns,
pooled_projection_dim = y_embedder.mlp.0 columns, out_channels = final_layer.linear rows / p^2;
qk_norm "rms_norm" when x_block.attn.ln_q is there; dual_attention_layers = the blocks with
x_block.attn2. Two optional metadata keys, which spark_lab defines (no converter writes them):
    sd3.attention.head_dim   int, the heads' width where no qk-norm gives it; default SD3's 64
    sd3.sample_size          int, the latent size the model was trained at (the pipeline's default
                             image is 8x that); default 128, every SD3 / SD3.5 release's
Problems (not a GGUF file, another architecture, a missing tensor, a quant type spark_lab cannot
read, shapes that disagree) raise `spark_lab.gguf.GGUFError` (a ValueError), one line naming them.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..gguf import GGUFError, GGUFFile
from ..memory import get_allocator
from ..quants import BLOCK_SIZES, dequantize
from .flux_gguf import FLOAT_TYPES, _count, _Reader
from .loading import Params
from .sd3 import SD3TransformerConfig, SD3Transformer2DModel

ARCH = "sd3"
HEAD_DIM = 64                 # SD3's heads when no qk-norm scale or metadata says otherwise
SAMPLE_SIZE = 128             # every SD3 / SD3.5 release: 1024 px images
HEAD_DIM_KEY = "sd3.attention.head_dim"
SAMPLE_SIZE_KEY = "sd3.sample_size"

_TOP = {"context_embedder": "context_embedder",
        "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
        "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
        "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
        "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
        "final_layer.linear": "proj_out"}
# per joint block: plain renames, q/k/v splits, qk-norm scales. _CONTEXT skips the last block (whose
# text stream has only its swapped AdaLN, q/k/v and norms); _DUAL* are for the attn2 blocks only
_X = {"x_block.adaLN_modulation.1": "norm1.linear", "x_block.attn.proj": "attn.to_out.0",
      "x_block.mlp.fc1": "ff.net.0.proj", "x_block.mlp.fc2": "ff.net.2"}
_CONTEXT = {"context_block.adaLN_modulation.1": "norm1_context.linear", "context_block.attn.proj": "attn.to_add_out",
            "context_block.mlp.fc1": "ff_context.net.0.proj", "context_block.mlp.fc2": "ff_context.net.2"}
_QKV = {"x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
        "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_NORMS = {"x_block.attn.ln_q": "attn.norm_q", "x_block.attn.ln_k": "attn.norm_k",
          "context_block.attn.ln_q": "attn.norm_added_q", "context_block.attn.ln_k": "attn.norm_added_k"}
_DUAL = {"x_block.attn2.proj": "attn2.to_out.0"}
_DUAL_QKV = {"x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v")}
_DUAL_NORMS = {"x_block.attn2.ln_q": "attn2.norm_q", "x_block.attn2.ln_k": "attn2.norm_k"}


class _SD3Reader(_Reader):
    """flux_gguf's reader (prefix stripping, row splits, swaps, placement) with SD3's wording."""

    def info(self, name: str):
        t = self.infos.get(name)
        if t is None:
            raise GGUFError(f"{self.name}: missing tensor {name!r} for an SD3 transformer")
        return t

    def dense(self, name: str):
        """The tensor `name` as float32 whatever its type (the position table, the patch conv)."""
        t = self.info(name)
        if len(t.shape) != 2 or t.qtype in FLOAT_TYPES or t.qtype not in BLOCK_SIZES:
            return self.get(name)                                        # float32 already (or the type's error)
        a = np.ascontiguousarray(dequantize(self.f.raw(t), t.qtype, t.shape))   # a 2-D table someone quantized
        return get_allocator().place(a, tag="weights", what=name)


def sd3_config_from_gguf(f: GGUFFile, r: _SD3Reader | None = None) -> SD3TransformerConfig:
    """The SD3TransformerConfig an SD3 GGUF describes (from its tensor shapes)."""
    r = r or _SD3Reader(f)
    name = f.path.name
    if f.arch != ARCH:
        raise GGUFError(f"{name}: architecture {f.arch or 'missing'!r} is not an SD3 transformer (want {ARCH!r})")
    if r.has("transformer_blocks.0.attn.to_q.weight"):
        raise GGUFError(f"{name}: tensors have diffusers' names (transformer_blocks.*); spark_lab reads SD3 GGUFs "
                        f"with Stability's original names (joint_blocks.*), as ComfyUI-GGUF writes them")
    conv = r.shape("x_embedder.proj.weight")
    if len(conv) != 4 or conv[2] != conv[3]:
        raise GGUFError(f"{name}: tensor 'x_embedder.proj.weight' has shape {conv}, an SD3 patch embedding is "
                        f"[width, channels, p, p]")
    D, in_ch, P, _ = conv
    n = _count(r, "joint_blocks")
    if n == 0:
        r.info("joint_blocks.0.x_block.attn.qkv.weight")                 # raises: missing tensor
    qk_norm = r.has("joint_blocks.0.x_block.attn.ln_q.weight")
    meta = f.metadata.get(HEAD_DIM_KEY)
    head_dim = r.shape("joint_blocks.0.x_block.attn.ln_q.weight")[0] if qk_norm else int(meta or HEAD_DIM)
    if meta is not None and int(meta) != head_dim:
        raise GGUFError(f"{name}: metadata {HEAD_DIM_KEY} = {int(meta)} disagrees with the qk-norm scales' "
                        f"length {head_dim}")
    if D % head_dim:
        raise GGUFError(f"{name}: width {D} (x_embedder rows) is not a whole number of heads of {head_dim}"
                        + ("" if qk_norm or meta else f" (set metadata {HEAD_DIM_KEY!r} for other heads)"))
    pos = r.shape("pos_embed")
    M = math.isqrt(math.prod(pos) // D) if pos[-1] == D else 0
    if M * M * D != math.prod(pos):
        raise GGUFError(f"{name}: tensor 'pos_embed' has shape {pos}, an SD3 position table of width {D} is "
                        f"[1, M*M, {D}]")
    out_rows = r.shape("final_layer.linear.weight")[0]
    if out_rows % (P * P):
        raise GGUFError(f"{name}: tensor 'final_layer.linear.weight' has {out_rows} rows, not a whole number of "
                        f"{P}x{P} patches")
    ctx_rows, J = r.shape("context_embedder.weight")
    dual = tuple(i for i in range(n) if r.has(f"joint_blocks.{i}.x_block.attn2.qkv.weight"))
    try:
        return SD3TransformerConfig.from_dict(dict(
            sample_size=int(f.metadata.get(SAMPLE_SIZE_KEY, SAMPLE_SIZE)), patch_size=P, in_channels=in_ch,
            num_layers=n, attention_head_dim=head_dim, num_attention_heads=D // head_dim, joint_attention_dim=J, caption_projection_dim=ctx_rows,
            pooled_projection_dim=r.shape("y_embedder.mlp.0.weight")[1], out_channels=out_rows // (P * P),
            pos_embed_max_size=M, dual_attention_layers=dual, qk_norm="rms_norm" if qk_norm else None))
    except ValueError as e:
        raise GGUFError(f"{name}: {e}") from None


def _check_shapes(r: _SD3Reader, c: SD3TransformerConfig) -> None:
    """The shapes the splits, swaps and AdaLN chunks rely on."""
    D = c.inner_dim
    want = {"t_embedder.mlp.0.weight": (D, 256), "final_layer.adaLN_modulation.1.weight": (2 * D, D)}
    for i in range(c.num_layers):
        b, last, dual = f"joint_blocks.{i}.", i == c.num_layers - 1, i in c.dual_attention_layers
        want[b + "x_block.attn.qkv.weight"] = want[b + "context_block.attn.qkv.weight"] = (3 * D, D)
        want[b + "x_block.adaLN_modulation.1.weight"] = ((9 if dual else 6) * D, D)
        want[b + "context_block.adaLN_modulation.1.weight"] = ((2 if last else 6) * D, D)
        if dual:
            want[b + "x_block.attn2.qkv.weight"] = (3 * D, D)
    for name, shape in want.items():
        if r.shape(name) != shape:
            raise GGUFError(f"{r.name}: tensor {name!r} has shape {r.shape(name)}, an SD3 transformer of width {D} "
                            f"needs {shape}")


def load_sd3_gguf(path: str | Path) -> SD3Transformer2DModel:
    """An SD3 / SD3.5 GGUF file -> SD3Transformer2DModel whose linear weights stay quantized."""
    f = GGUFFile(path)
    r = _SD3Reader(f)
    c = sd3_config_from_gguf(f, r)
    _check_shapes(r, c)
    D = c.inner_dim
    w = {"pos_embed.pos_embed": r.dense("pos_embed")}

    def put(old: str, new: str, swap: bool = False) -> None:
        for part in ("weight", "bias"):
            w[f"{new}.{part}"] = r.get(f"{old}.{part}", swap=swap)

    def split(old: str, news: tuple) -> None:
        for part in ("weight", "bias"):
            for new, t in zip(news, r.get(f"{old}.{part}", rows=[D, D, D])):
                w[f"{new}.{part}"] = t

    for old, new in _TOP.items():
        put(old, new)
    w["pos_embed.proj.weight"] = r.dense("x_embedder.proj.weight")      # [D, C, p, p] float32
    w["pos_embed.proj.bias"] = r.get("x_embedder.proj.bias")
    for i in range(c.num_layers):
        b, d = f"joint_blocks.{i}.", f"transformer_blocks.{i}."
        last, dual = i == c.num_layers - 1, i in c.dual_attention_layers
        for old, new in {**_X, **({} if last else _CONTEXT), **(_DUAL if dual else {})}.items():
            put(b + old, d + new)
        if last:                                                         # AdaLayerNormContinuous: (scale, shift)
            put(b + "context_block.adaLN_modulation.1", d + "norm1_context.linear", swap=True)
        for old, news in {**_QKV, **(_DUAL_QKV if dual else {})}.items():
            split(b + old, tuple(d + n for n in news))
        if c.qk_norm:
            for old, new in {**_NORMS, **(_DUAL_NORMS if dual else {})}.items():
                w[d + new + ".weight"] = r.get(b + old + ".weight")
    put("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True)
    return SD3Transformer2DModel(c, Params(w, source=str(f.path)))
