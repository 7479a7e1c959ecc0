"""Flux from GGUF (ComfyUI-GGUF / city96 layout) vs diffusers given the same, dequantized weights.

The GGUF files are written at test time into a temporary folder: a random diffusers
FluxTransformer2DModel (width 256 = 2 heads of 128, so every K-quant row is whole 256-blocks) is
renamed to Black Forest Labs' layout (`to_bfl`, checked against diffusers' own single-file
converter), quantized, and written with gguf-py. gguf-py quantizes F16/BF16/Q8_0 but not the
K-quants, so `quantize_k` below encodes Q4_K/Q5_K blocks (a plain min/max fit; any valid blocks
would do). The reference is diffusers' model loaded with the GGUF's tensors dequantized by gguf-py
and converted by diffusers' convert_flux_transformer_checkpoint_to_diffusers.

Tolerances (max |ours - diffusers| / max |diffusers|):
  F32, Q5_K files: 1e-4. The products see float activations (Q5_K: `quants.quant_matmul`,
      chunked dequantize + GEMM), so only float32 summation order differs.
  Q8_0, Q4_K files: 3e-2 for the whole model (measured 0.8% / 0.9%). Their kernels (the int8
      GEMM and mat-vec of `kernels.qmatvec`; `round_x_q8` on a GPU) round each 32-value block of
      a layer's input to int8 codes times a float16 scale (max|x| / 127), llama.cpp's Q8
      activations: ~0.4% per value, compounded over the layers. A whole-model reference with
      the same rounding is no sharper: rounding is a step function, so float32-sized differences
      upstream flip the odd code and the flips cascade. So the exact check is per layer:
      `test_int8_layers_match_rounded_reference` runs every quantized linear of the loaded model
      against torch's F.linear on the rounded input with diffusers' (dequantized) weight: 1e-5.
"""
import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402

from spark_lab.device import get_device, to_device, to_host  # noqa: E402
from spark_lab.diffusion.flux import FluxTransformer2DModel, latent_image_ids  # noqa: E402
from spark_lab.diffusion.flux_gguf import load_flux_gguf  # noqa: E402
from spark_lab.gguf import GGUFError  # noqa: E402
from spark_lab.kernels import linear  # noqa: E402
from spark_lab.quants import QuantTensor  # noqa: E402

DEV = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=128,
           num_attention_heads=2, joint_attention_dim=256, pooled_projection_dim=256, guidance_embeds=True,
           axes_dims_rope=(16, 56, 56))
# schnell-shaped (no guidance), heads of 64: the RoPE split must come from the file's metadata
SCHNELL = dict(DEV, attention_head_dim=64, num_attention_heads=4, guidance_embeds=False, axes_dims_rope=(8, 28, 28))


# ---------------------------------------------------------------------------- writing test files

def quantize_k(x, qtype):
    """float32 [rows, cols] (cols % 256 == 0) -> Q4_K / Q5_K blocks uint8 [rows, cols / 256 * size].
    Per 32-value sub-block: min (<= 0) and range fitted, their scales as 6-bit multiples of two
    float16 super-block scales d and dmin, codes = rint((x + dmin*m) / (d*sc)) in 0..15 (0..31)."""
    nmax = 15 if qtype == QT.Q4_K else 31
    rows, cols = x.shape
    xb = x.reshape(-1, 8, 32).astype(np.float32)                         # [n, 8 sub-blocks, 32]
    lo = np.minimum(xb.min(-1), 0.0)                                     # [n, 8]
    scale = (xb.max(-1) - lo) / nmax
    d = (scale.max(-1) / 63).astype(np.float16)                          # [n]
    dmin = (-lo.min(-1) / 63).astype(np.float16)
    d32, dmin32 = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.clip(np.rint(np.divide(scale, d32, out=np.zeros_like(scale), where=d32 > 0)), 0, 63).astype(np.uint8)
    m = np.clip(np.rint(np.divide(-lo, dmin32, out=np.zeros_like(lo), where=dmin32 > 0)), 0, 63).astype(np.uint8)
    step, off = (d32 * sc)[..., None], (dmin32 * m)[..., None]           # value = step * q - off
    q = np.clip(np.rint(np.divide(xb + off, step, out=np.zeros_like(xb), where=step > 0)), 0, nmax).astype(np.uint8)
    a = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)                              # 12 bytes: 8 six-bit scales and mins
    b = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    c = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    low = q & 15
    qs = (low[:, 0::2] | (low[:, 1::2] << 4)).reshape(-1, 128)           # byte l of chunk j: sub-blocks 2j, 2j+1
    parts = [d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), a, b, c]
    if qtype == QT.Q5_K:                                                 # bit j of byte l: the 5th bit of sub-block j
        hi = (q >> 4).transpose(0, 2, 1)                                 # [n, 32, 8]
        parts.append((hi << np.arange(8, dtype=np.uint8)).sum(-1, dtype=np.uint8))
    parts.append(qs)
    return np.concatenate(parts, axis=1).reshape(rows, -1)


def to_bfl(sd: dict) -> dict:
    """diffusers FluxTransformer2DModel state dict -> Black Forest Labs' checkpoint names (NumPy)."""
    g = {k: v.detach().numpy().astype(np.float32) for k, v in sd.items()}
    out = {}

    def pair(new, old):
        for part in ("weight", "bias"):
            if f"{old}.{part}" in g:
                out[f"{new}.{part}"] = g.pop(f"{old}.{part}")

    tt = "time_text_embed."
    for new, old in [("img_in", "x_embedder"), ("txt_in", "context_embedder"), ("final_layer.linear", "proj_out"),
                     ("time_in.in_layer", tt + "timestep_embedder.linear_1"),
                     ("time_in.out_layer", tt + "timestep_embedder.linear_2"),
                     ("vector_in.in_layer", tt + "text_embedder.linear_1"),
                     ("vector_in.out_layer", tt + "text_embedder.linear_2"),
                     ("guidance_in.in_layer", tt + "guidance_embedder.linear_1"),
                     ("guidance_in.out_layer", tt + "guidance_embedder.linear_2")]:
        pair(new, old)
    for part in ("weight", "bias"):                                      # diffusers' (scale, shift) -> (shift, scale)
        scale, shift = np.split(g.pop(f"norm_out.linear.{part}"), 2)
        out[f"final_layer.adaLN_modulation.1.{part}"] = np.concatenate([shift, scale])
    i = 0
    while f"transformer_blocks.{i}.norm1.linear.weight" in g:
        b, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for new, old in [("img_mod.lin", "norm1.linear"), ("txt_mod.lin", "norm1_context.linear"),
                         ("img_attn.proj", "attn.to_out.0"), ("txt_attn.proj", "attn.to_add_out"),
                         ("img_mlp.0", "ff.net.0.proj"), ("img_mlp.2", "ff.net.2"),
                         ("txt_mlp.0", "ff_context.net.0.proj"), ("txt_mlp.2", "ff_context.net.2")]:
            pair(b + new, d + old)
        for s, (q, k, v) in (("img", ("to_q", "to_k", "to_v")), ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"))):
            for part in ("weight", "bias"):
                out[f"{b}{s}_attn.qkv.{part}"] = np.concatenate([g.pop(f"{d}attn.{n}.{part}") for n in (q, k, v)])
        for new, old in [("img_attn.norm.query_norm", "norm_q"), ("img_attn.norm.key_norm", "norm_k"),
                         ("txt_attn.norm.query_norm", "norm_added_q"), ("txt_attn.norm.key_norm", "norm_added_k")]:
            out[f"{b}{new}.scale"] = g.pop(f"{d}attn.{old}.weight")
        i += 1
    i = 0
    while f"single_transformer_blocks.{i}.norm.linear.weight" in g:
        b, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        pair(b + "modulation.lin", d + "norm.linear")
        pair(b + "linear2", d + "proj_out")
        for part in ("weight", "bias"):
            out[f"{b}linear1.{part}"] = np.concatenate([g.pop(f"{d}{n}.{part}") for n in
                                                        ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")])
        out[b + "norm.query_norm.scale"] = g.pop(d + "attn.norm_q.weight")
        out[b + "norm.key_norm.scale"] = g.pop(d + "attn.norm_k.weight")
        i += 1
    assert not g, f"to_bfl left {sorted(g)}"
    return out


def diffusers_from_bfl(bfl: dict, config: dict):
    """diffusers' own single-file conversion of BFL tensors, loaded into a diffusers model."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
    D = config["attention_head_dim"] * config["num_attention_heads"]
    split = torch.split

    def split_at_width(t, sizes, dim=0):           # the converter assumes FLUX.1's width (3072) for linear1
        if isinstance(sizes, (tuple, list)) and sum(sizes) != t.shape[dim]:
            sizes = (D, D, D, t.shape[dim] - 3 * D)
        return split(t, sizes, dim)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "split", split_at_width)
        sd = convert_flux_transformer_checkpoint_to_diffusers({k: torch.from_numpy(np.array(v))
                                                               for k, v in bfl.items()})
    model = diffusers.FluxTransformer2DModel(**config).eval()
    model.load_state_dict(sd, strict=True)
    return model


def random_model(config: dict, seed: int):
    model = diffusers.FluxTransformer2DModel(**config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():                                     # ~ default init's size, norm scales random
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 / p.shape[-1] ** 0.5 if p.ndim == 2 else 0.1))
    return model


def pick_type(name: str, a: np.ndarray, kind: str):
    """The GGML type a tensor gets in a `kind` file: city96-like, with a few float/other types mixed in."""
    if kind == "F32":
        return QT.F32
    if a.ndim == 1:
        return QT.F16 if name == "img_in.bias" else QT.F32
    if name == "txt_in.weight":
        return QT.BF16
    if name == "time_in.in_layer.weight":
        return QT.F16
    q = QT[kind]
    if a.shape[1] % gguf.GGML_QUANT_SIZES[q][0]:                         # img_in (64 columns) under a K-quant:
        return QT.F16                                                    # F32 in city96's files
    return q


def write_gguf(path: Path, bfl: dict, kind: str, arch: str = "flux", meta: dict | None = None,
               prefix: str = "", types: dict | None = None) -> dict:
    """Write `bfl` as a GGUF; -> {name: the GGML type each tensor got}."""
    w = gguf.GGUFWriter(str(path), arch)
    for k, v in (meta or {}).items():
        w.add_array(k, v)
    chosen = {}
    for name, a in bfl.items():
        q = (types or {}).get(name) or pick_type(name, a, kind)
        chosen[name] = q
        if q == QT.F32:
            w.add_tensor(prefix + name, a)
        elif q in (QT.Q4_K, QT.Q5_K):
            w.add_tensor(prefix + name, quantize_k(a, q), raw_dtype=q)
        else:
            w.add_tensor(prefix + name, gguf.quants.quantize(a, q), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return chosen


def read_dequantized(path: Path) -> dict:
    """Every tensor of a GGUF as float32 through gguf-py's reader and dequantizer (BFL names)."""
    r = gguf.GGUFReader(str(path))
    out = {}
    for t in r.tensors:
        a = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
        out[t.name.removeprefix("model.diffusion_model.")] = a.reshape(tuple(int(s) for s in reversed(t.shape)))
    return out


def inputs(config: dict, seed: int = 0):
    rng = np.random.default_rng(seed)
    N, T = 12, 5                                                         # a 3 x 4 grid of packed latents
    x = rng.standard_normal((2, N, config["in_channels"]), dtype=np.float32)
    ctx = rng.standard_normal((2, T, config["joint_attention_dim"]), dtype=np.float32)
    pooled = rng.standard_normal((2, config["pooled_projection_dim"]), dtype=np.float32)
    t = np.array([0.8, 0.3], np.float32)
    img_ids, txt_ids = latent_image_ids(3, 4), np.zeros((T, 3), np.float32)
    g = np.array([3.5, 2.0], np.float32) if config["guidance_embeds"] else None
    return x, ctx, pooled, t, img_ids, txt_ids, g


def run_diffusers(model, args) -> np.ndarray:
    f = torch.from_numpy
    x, ctx, pooled, t, img_ids, txt_ids, g = args
    with torch.no_grad():
        return model(hidden_states=f(x), encoder_hidden_states=f(ctx), pooled_projections=f(pooled), timestep=f(t),
                     img_ids=f(img_ids), txt_ids=f(txt_ids), guidance=None if g is None else f(g)).sample.numpy()


def round_x_q8(x):
    """torch twin of kernels.linalg.round_x_q8: each 32-block of x as int8 codes times a float16 scale."""
    xb = x.reshape(*x.shape[:-1], -1, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    dx = (amax / 127.0).half().float()
    inv = torch.where(amax > 0, 127.0 / torch.where(amax > 0, amax, torch.ones_like(amax)), torch.zeros_like(amax))
    return (torch.round(xb * inv) * dx).reshape(x.shape)


def kit_rounds_x() -> bool:
    """The kit rounds activations to int8 for INT8_X_TYPES on a device, and on the CPU where numba runs."""
    from spark_lab.kernels import qmatvec
    return get_device().is_gpu or qmatvec.available()


def rel_err(a, b) -> float:
    return float(np.abs(to_host(a) - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def dev_bfl():
    return to_bfl(random_model(DEV, 0).state_dict())


def test_to_bfl_agrees_with_diffusers_converter(dev_bfl):
    """The test's own renaming, undone by diffusers' converter, gives back the same model."""
    ref = random_model(DEV, 0).state_dict()
    back = diffusers_from_bfl(dev_bfl, DEV).state_dict()
    for k, v in ref.items():
        np.testing.assert_array_equal(back[k].numpy(), v.numpy(), err_msg=k)


@pytest.mark.parametrize("kind", ["Q4_K", "Q5_K"])
def test_k_quant_writer_round_trips(dev_bfl, kind):
    w = dev_bfl["double_blocks.0.img_mlp.0.weight"]                      # [1024, 256]
    q = QT[kind]
    back = gguf.quants.dequantize(quantize_k(w, q), q)
    step = np.abs(w).max() / (15 if kind == "Q4_K" else 31)
    assert back.shape == w.shape and np.abs(back - w).max() < 1.2 * step


@pytest.fixture(scope="module")
def loaded(dev_bfl, tmp_path_factory):
    """kind -> (its GGUF's path, {name: GGML type written}, spark_lab's model, diffusers' model on
    the dequantized tensors); each file written and loaded once per module."""
    cache = {}

    def get(kind):
        if kind not in cache:
            path = tmp_path_factory.mktemp("flux") / f"flux-tiny-{kind}.gguf"
            prefix = "model.diffusion_model." if kind == "Q5_K" else ""    # full-checkpoint naming, once
            types = write_gguf(path, dev_bfl, kind, prefix=prefix)
            cache[kind] = path, types, load_flux_gguf(path), diffusers_from_bfl(read_dequantized(path), DEV)
        return cache[kind]
    return get


@pytest.mark.parametrize("kind", ["F32", "Q8_0", "Q4_K", "Q5_K"])
def test_gguf_matches_diffusers_with_dequantized_weights(loaded, kind):
    path, types, ours, ref = loaded(kind)
    c = ours.config
    assert (c.inner_dim, c.num_attention_heads, c.attention_head_dim) == (256, 2, 128)
    assert (c.num_layers, c.num_single_layers) == (1, 2)
    assert (c.in_channels, c.out_channels, c.joint_attention_dim, c.pooled_projection_dim) == (64, 64, 256, 256)
    assert c.guidance_embeds and c.axes_dims_rope == (16, 56, 56)
    # the big linear layers stay quantized: QuantTensors of the file's type, split or swapped as views/copies
    p = ours.params.tensors
    for name in ("transformer_blocks.0.attn.to_k.weight", "transformer_blocks.0.ff_context.net.2.weight",
                 "single_transformer_blocks.1.proj_mlp.weight", "single_transformer_blocks.0.proj_out.weight",
                 "norm_out.linear.weight"):
        if kind == "F32":
            assert not isinstance(p[name], QuantTensor)
        else:
            assert isinstance(p[name], QuantTensor) and p[name].qtype.name == kind, name
    n_quant = sum(1 for q in types.values() if q not in (QT.F32, QT.F16, QT.BF16))
    held = sum(n for f, n in ours.weight_formats().items() if f != "float32")
    if kind != "F32":   # each qkv becomes 3 tensors (2 per double block), each linear1 4
        n_quant += 4 * c.num_layers + 3 * c.num_single_layers
    assert held == n_quant

    args = inputs(DEV)
    got = ours(*args)
    int8 = kind in ("Q8_0", "Q4_K") and kit_rounds_x()
    assert rel_err(got, run_diffusers(ref, args)) < (3e-2 if int8 else 1e-4)
    if int8 and get_device().kind == "cpu":                             # the numba kernels ran on the repacked weights
        from spark_lab.kernels import qmatvec
        packed = p["transformer_blocks.0.attn.to_q.weight"].packed
        assert packed is not None and packed.kind in qmatvec.GEMM_KINDS   # Q8_0 / Q4_K: the int8 GEMM's layouts


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_K"])
def test_int8_layers_match_rounded_reference(loaded, kind):
    """Every quantized linear of the model, alone: the kit's product on 2 rows (mat-vec) and 20
    rows (int8 GEMM) vs F.linear(rounded x, diffusers' dequantized weight), 1e-5. This also checks
    each split/swapped weight against diffusers' conversion of the same file."""
    _, _, ours, ref = loaded(kind)
    rng = np.random.default_rng(0)
    n_checked = 0
    for name, w in ours.params.tensors.items():
        if not isinstance(w, QuantTensor):
            continue
        W = ref.get_submodule(name.removesuffix(".weight")).weight
        for n in (2, 20):
            x = rng.standard_normal((n, w.shape[1]), dtype=np.float32)
            xt = torch.from_numpy(x)
            with torch.no_grad():
                want = torch.nn.functional.linear(round_x_q8(xt) if kit_rounds_x() else xt, W).numpy()
            assert rel_err(linear(to_device(x), w), want) < 1e-5, (name, n)
        n_checked += 1
    # Q8_0: 8 top-level (img_in, time_in.out, vector_in, guidance_in, final_layer) + 14 per double block
    # (qkv -> 3 each) + 6 per single block (linear1 -> 4); K-quants: img_in is F16
    assert n_checked == (34 if kind == "Q8_0" else 33)


def test_schnell_shape_with_axes_metadata(tmp_path):
    """No guidance embedder; heads of 64 need flux.rope.axes_dims (and fail without it)."""
    bfl = to_bfl(random_model(SCHNELL, 1).state_dict())
    path = tmp_path / "schnell.gguf"
    write_gguf(path, bfl, "Q5_K", meta={"flux.rope.axes_dims": [8, 28, 28]})
    ours = FluxTransformer2DModel.from_gguf(path)
    assert not ours.config.guidance_embeds and ours.config.num_attention_heads == 4
    args = inputs(SCHNELL, 1)
    ref = run_diffusers(diffusers_from_bfl(read_dequantized(path), SCHNELL), args)
    assert rel_err(ours(*args), ref) < 1e-4
    write_gguf(path, bfl, "F32")
    with pytest.raises(GGUFError, match=r"heads of 64 need metadata 'flux.rope.axes_dims'"):
        load_flux_gguf(path)


def _one_line_error(path, match):
    with pytest.raises(ValueError, match=match) as e:
        load_flux_gguf(path)
    assert "\n" not in str(e.value)


def _patch_type(path: Path, name: str, qtype_id: int) -> None:
    """Rewrite the type field of tensor `name` in a GGUF header (after its name, n_dims and dims)."""
    data = bytearray(path.read_bytes())
    key = len(name).to_bytes(8, "little") + name.encode()
    at = data.index(key) + len(key)
    n_dims = int.from_bytes(data[at:at + 4], "little")
    at += 4 + 8 * n_dims
    data[at:at + 4] = qtype_id.to_bytes(4, "little")
    path.write_bytes(bytes(data))


def test_bad_files_are_one_line(tmp_path, dev_bfl):
    small = {k: v for k, v in dev_bfl.items()}
    p = tmp_path / "x.gguf"
    write_gguf(p, small, "Q8_0", arch="llama")
    _one_line_error(p, "architecture 'llama' is not a Flux transformer")
    write_gguf(p, {k: v for k, v in small.items() if k != "single_blocks.1.linear2.weight"}, "Q8_0")
    _one_line_error(p, "missing tensor 'single_blocks.1.linear2.weight' for a Flux transformer")
    write_gguf(p, {k: v for k, v in small.items() if k != "txt_in.weight"}, "Q8_0")
    _one_line_error(p, "missing tensor 'txt_in.weight'")
    write_gguf(p, small, "Q8_0")
    _patch_type(p, "double_blocks.0.img_mlp.2.weight", 99)
    _one_line_error(p, "tensor 'double_blocks.0.img_mlp.2.weight' has unknown quant type 99")
    bs, ts = gguf.GGML_QUANT_SIZES[QT.Q8_1]                              # a GGML type spark_lab cannot read
    q81 = np.zeros((3 * 256, 256 // bs * ts), np.uint8)
    w = gguf.GGUFWriter(str(p), "flux")
    for name, a in small.items():
        if name == "double_blocks.0.txt_attn.qkv.weight":
            w.add_tensor(name, q81, raw_dtype=QT.Q8_1)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _one_line_error(p, "tensor 'double_blocks.0.txt_attn.qkv.weight' uses quant type Q8_1, which spark_lab does "
                       "not support")
    bad = dict(small, **{"double_blocks.0.img_attn.qkv.weight": small["double_blocks.0.img_attn.qkv.weight"][:512]})
    write_gguf(p, bad, "F32")
    _one_line_error(p, re.escape("tensor 'double_blocks.0.img_attn.qkv.weight' has shape (512, 256), a Flux "
                                 "transformer of width 256 needs (768, 256)"))
    p.write_bytes(b"not a gguf file at all, just some bytes")
    _one_line_error(p, "is not a GGUF file")
