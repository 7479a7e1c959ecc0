"""Flux transformers from GGUF files, as ComfyUI-GGUF (city96) and its converters write them.

    model = load_flux_gguf("flux1-dev-Q4_K_S.gguf")      # -> flux.FluxTransformer2DModel
    model.weight_formats()                                # {GGML type or "float32": number of tensors}

This is what makes FLUX.1 (12 B parameters, 24 GB in bfloat16) fit a small machine: its
linear layers stay in their GGML blocks (`quants.QuantTensor`), and `kernels.linear` multiplies
by them through the kit's quantized kernels: on the CPU the int8 GEMM of `kernels.qmatvec`
(`qmatvec.qmatmul` -> `qgemm`, "m_" kernels) for Q4_0/Q4_1/Q4_K/Q8_0, the repacked tiles for
Q5_0/Q6_K, chunked dequantize + GEMM for the other types (Q5_K, ...); never a whole float32
copy of a weight. Those int8 kernels round each row of activations to int8 per 32 values
(llama.cpp's Q8 activations, `kernels.linear.round_x_q8` on a GPU), ~0.4% per value.
Small tensors (1-D biases and norm scales, anything stored as F32/F16/BF16) become float32.

The file. `general.architecture` is "flux"; the tensors keep Black Forest Labs' names (the
original checkpoint's keys, with or without a "model.diffusion_model." prefix), any 2-D one in
any GGML type spark_lab reads (`quants.BLOCK_SIZES`), 1-D ones in any type. They map onto
diffusers' names (what diffusers' convert_flux_transformer_checkpoint_to_diffusers does):

    img_in / txt_in                         x_embedder / context_embedder
    time_in.{in,out}_layer                  time_text_embed.timestep_embedder.linear_{1,2}
    guidance_in.{in,out}_layer              time_text_embed.guidance_embedder.linear_{1,2}   (dev only)
    vector_in.{in,out}_layer                time_text_embed.text_embedder.linear_{1,2}
    double_blocks.i.img_mod.lin             transformer_blocks.i.norm1.linear            (txt_mod: norm1_context)
    double_blocks.i.img_attn.qkv            attn.to_q | to_k | to_v, rows split in 3     (txt_attn: add_{q,k,v}_proj)
    double_blocks.i.img_attn.norm.{query,key}_norm.scale   attn.norm_q / norm_k          (txt: norm_added_q / _k)
    double_blocks.i.img_attn.proj           attn.to_out.0                                (txt_attn.proj: to_add_out)
    double_blocks.i.img_mlp.{0,2}           ff.net.0.proj / ff.net.2                     (txt_mlp: ff_context)
    single_blocks.i.linear1                 attn.to_q | to_k | to_v | proj_mlp (rows D, D, D, the rest)
    single_blocks.i.linear2 / modulation.lin / norm.*_norm.scale   proj_out / norm.linear / attn.norm_q, norm_k
    final_layer.linear                      proj_out
    final_layer.adaLN_modulation.1          norm_out.linear, its two row halves swapped: BFL's
                                            (shift, scale) is diffusers' (scale, shift)
A split or swap of a quantized weight moves whole rows, which never share a block: the q/k/v
parts are zero-copy views of the file (on the CPU); the swap is one copy of the raw blocks.

The config comes from the tensor shapes: the width D = img_in rows, in_channels = img_in
columns, joint_attention_dim = txt_in columns, pooled_projection_dim = vector_in columns,
head_dim = the length of the qk-norm scales (128 in FLUX.1; heads = D / head_dim), the block
counts from the highest double_blocks.N / single_blocks.N, guidance_embeds from guidance_in.
One optional metadata key, which spark_lab defines (no converter writes it):
    flux.rope.axes_dims   array of ints, RoPE features per id axis (sum = head_dim); default
                          (16, 56, 56), FLUX.1's, and required when head_dim is not 128
Problems (not a GGUF file, another architecture, a missing tensor, a quant type spark_lab cannot
read, shapes that disagree) raise `spark_lab.gguf.GGUFError` (a ValueError), one line naming them.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..ggml_types import GGMLQuantizationType as QT
from ..gguf import GGUFError, GGUFFile
from ..memory import get_allocator
from ..quants import BLOCK_SIZES, QuantTensor, dequantize
from .flux import FluxConfig, FluxTransformer2DModel
from .loading import Params

ARCH = "flux"
PREFIX = "model.diffusion_model."     # full-checkpoint files keep the transformer under this
AXES_KEY = "flux.rope.axes_dims"
FLUX1_AXES = (16, 56, 56)
FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16)

# plain renames (one BFL tensor -> one diffusers tensor), per double block, single block and the rest
_TOP = {"img_in": "x_embedder", "txt_in": "context_embedder",
        "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
        "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
        "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
        "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
        "final_layer.linear": "proj_out"}
_GUIDANCE = {"guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
             "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2"}
_DOUBLE = {"img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
           "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
           "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
           "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2"}
_DOUBLE_NORMS = {"img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
                 "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k"}
_SINGLE = {"modulation.lin": "norm.linear", "linear2": "proj_out"}
_SINGLE_NORMS = {"norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k"}


class _Reader:
    """A Flux GGUF's tensors by BFL name, placed through the allocator as they are taken: float32
    arrays for float and 1-D tensors, QuantTensors (raw blocks) for quantized 2-D ones."""

    def __init__(self, f: GGUFFile):
        self.f, self.name = f, f.path.name
        self.infos = {k[len(PREFIX):] if k.startswith(PREFIX) else k: t for k, t in f.tensors.items()}

    def has(self, name: str) -> bool:
        return name in self.infos

    def info(self, name: str):
        t = self.infos.get(name)
        if t is None:
            raise GGUFError(f"{self.name}: missing tensor {name!r} for a Flux transformer")
        return t

    def shape(self, name: str) -> tuple:
        return tuple(self.info(name).shape)

    def get(self, name: str, rows: list | None = None, swap: bool = False):
        """The tensor `name`; rows: split into consecutive blocks of that many rows (-> a list);
        swap: its two row halves exchanged. Splits and swaps are done on the host, each part
        placed on its own, so a quantized part is its own QuantTensor (a view of the file on the
        CPU) that the kernels repack and release like any other weight."""
        t = self.info(name)
        if t.qtype not in BLOCK_SIZES:
            raise GGUFError(f"{self.name}: tensor {name!r} uses quant type {t.qtype.name}, which spark_lab "
                            f"does not support")
        quantized = t.qtype not in FLOAT_TYPES and len(t.shape) == 2
        a = self.f.raw(t)                                                # uint8 [rows, row_bytes] when quantized
        if not quantized:                                                # norms, biases, float weights: float32
            a = np.ascontiguousarray(dequantize(a, t.qtype, t.shape), dtype=np.float32)
        if swap:
            h = a.shape[0] // 2
            a = np.concatenate([a[h:], a[:h]])
        parts = [a] if rows is None else np.split(a, np.cumsum(rows)[:-1])
        alloc = get_allocator()
        out = [alloc.place(b, tag="weights", what=name) for b in parts]
        if quantized:                                                    # rows never share a block: whole blocks
            out = [QuantTensor(b, t.qtype, (b.shape[0], t.shape[1])) for b in out]
        return out if rows is not None else out[0]


def _count(r: _Reader, prefix: str) -> int:
    """1 + the highest N of `prefix`.N.* tensors (0 when there are none)."""
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    ns = [int(m.group(1)) for k in r.infos if (m := pat.match(k))]
    return max(ns) + 1 if ns else 0


def flux_config_from_gguf(f: GGUFFile, r: _Reader | None = None) -> FluxConfig:
    """The FluxConfig a Flux GGUF describes (from tensor shapes and `flux.rope.axes_dims`)."""
    r = r or _Reader(f)
    name = f.path.name
    if f.arch != ARCH:
        raise GGUFError(f"{name}: architecture {f.arch or 'missing'!r} is not a Flux transformer (want {ARCH!r})")
    D, in_ch = r.shape("img_in.weight")
    n_double, n_single = _count(r, "double_blocks"), _count(r, "single_blocks")
    norm = "double_blocks.0.img_attn.norm.query_norm.scale" if n_double else "single_blocks.0.norm.query_norm.scale"
    head_dim = r.shape(norm)[0]
    if D % head_dim:
        raise GGUFError(f"{name}: width {D} (img_in rows) is not a whole number of heads of {head_dim} "
                        f"(the qk-norm scale's length)")
    axes = f.metadata.get(AXES_KEY)
    if axes is None:
        if head_dim != 128:
            raise GGUFError(f"{name}: heads of {head_dim} need metadata {AXES_KEY!r} (RoPE features per axis); "
                            f"only FLUX.1's head_dim 128 has a default {FLUX1_AXES}")
        axes = FLUX1_AXES
    axes = tuple(int(a) for a in np.asarray(axes).reshape(-1))
    out_rows = r.shape("final_layer.linear.weight")[0]
    try:
        return FluxConfig(patch_size=1, in_channels=in_ch, out_channels=out_rows, num_layers=n_double,
                          num_single_layers=n_single, attention_head_dim=head_dim, num_attention_heads=D // head_dim,
                          joint_attention_dim=r.shape("txt_in.weight")[1],
                          pooled_projection_dim=r.shape("vector_in.in_layer.weight")[1],
                          guidance_embeds=r.has("guidance_in.in_layer.weight"), axes_dims_rope=axes)
    except ValueError as e:
        raise GGUFError(f"{name}: {e}") from None


def load_flux_gguf(path: str | Path) -> FluxTransformer2DModel:
    """A Flux GGUF file -> FluxTransformer2DModel whose linear weights stay quantized."""
    f = GGUFFile(path)
    r = _Reader(f)
    c = flux_config_from_gguf(f, r)
    D = c.inner_dim
    want = {"img_in.weight": (D, c.in_channels), "txt_in.weight": (D, c.joint_attention_dim),
            "vector_in.in_layer.weight": (D, c.pooled_projection_dim), "time_in.in_layer.weight": (D, 256),
            "final_layer.adaLN_modulation.1.weight": (2 * D, D)}
    for i in range(c.num_layers):
        want.update({f"double_blocks.{i}.{s}_attn.qkv.weight": (3 * D, D) for s in ("img", "txt")})
    for i in range(c.num_single_layers):
        rows, cols = r.shape(f"single_blocks.{i}.linear1.weight")
        if rows <= 3 * D or cols != D:
            raise GGUFError(f"{r.name}: tensor 'single_blocks.{i}.linear1.weight' has shape {(rows, cols)}, "
                            f"a Flux transformer of width {D} needs [3 x {D} + MLP width, {D}]")
    for name, shape in want.items():
        if r.shape(name) != shape:
            raise GGUFError(f"{r.name}: tensor {name!r} has shape {r.shape(name)}, a Flux transformer of width "
                            f"{D} needs {shape}")
    w = {}

    def put(bfl: str, new: str) -> None:
        w[new + ".weight"], w[new + ".bias"] = r.get(bfl + ".weight"), r.get(bfl + ".bias")

    def split(bfl: str, news: tuple, rows: list) -> None:
        for part in ("weight", "bias"):
            for new, t in zip(news, r.get(f"{bfl}.{part}", rows=rows)):
                w[f"{new}.{part}"] = t

    for bfl, new in {**_TOP, **(_GUIDANCE if c.guidance_embeds else {})}.items():
        put(bfl, new)
    for i in range(c.num_layers):
        b, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for bfl, new in _DOUBLE.items():
            put(b + bfl, d + new)
        for bfl, new in _DOUBLE_NORMS.items():
            w[d + new + ".weight"] = r.get(b + bfl + ".scale")
        split(b + "img_attn.qkv", (d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"), [D, D, D])
        split(b + "txt_attn.qkv", (d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"), [D, D, D])
    for i in range(c.num_single_layers):
        b, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        for bfl, new in _SINGLE.items():
            put(b + bfl, d + new)
        for bfl, new in _SINGLE_NORMS.items():
            w[d + new + ".weight"] = r.get(b + bfl + ".scale")
        mlp = r.shape(b + "linear1.weight")[0] - 3 * D
        split(b + "linear1", tuple(d + n for n in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")), [D, D, D, mlp])
    for part in ("weight", "bias"):
        w[f"norm_out.linear.{part}"] = r.get(f"final_layer.adaLN_modulation.1.{part}", swap=True)
    return FluxTransformer2DModel(c, Params(w, source=str(f.path)))
