"""SD3 / SD3.5 from GGUF (ComfyUI-GGUF / city96 layout) vs diffusers given the same, dequantized weights.

As test_flux_gguf.py (whose K-quant encoder, reader and int8 rounding twin this file reuses): the
GGUF files are written at test time. A random diffusers SD3Transformer2DModel (width 256 = 4
heads of 64, so every K-quant row is whole 256-blocks) is renamed to Stability's MMDiT layout
(`to_sd3`, checked against diffusers' own single-file converter), quantized, and written with
gguf-py. Two models: "sd3" (2 joint blocks, no qk-norm) and "sd35" (3 blocks, RMS qk-norm, a
second image attention in blocks 0 and 1, as SD3.5-medium). The reference is diffusers' model
loaded with the GGUF's tensors dequantized by gguf-py and converted by diffusers'
convert_sd3_transformer_checkpoint_to_diffusers.

Tolerances (max |ours - diffusers| / max |diffusers|):
  F32, Q5_K files: 1e-4 (float activations; only float32 summation order differs).
  Q8_0, Q4_K files: 3e-2 for the whole model, where the kit rounds each 32-value block of a
      layer's input to int8 (llama.cpp's Q8 activations, ~0.4% per value, compounded over the
      layers; test_flux_gguf.py says why a rounded whole-model reference is no sharper).
      Measured on the CPU (numba kernels): sd3 0.45% / 0.47%, sd35 0.61% / 0.63% (Q8_0 / Q4_K);
      F32 and Q5_K ~5e-7; each layer alone <= 9.4e-7.
      The exact check is per layer: `test_int8_layers_match_rounded_reference` runs every
      quantized linear of the loaded model against torch's F.linear on the same rounded input
      with diffusers' (dequantized) weight: 1e-5.
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
from spark_lab.diffusion.sd3 import SD3Transformer2DModel  # noqa: E402
from spark_lab.diffusion.sd3_gguf import load_sd3_gguf  # noqa: E402
from spark_lab.gguf import GGUFError  # noqa: E402
from spark_lab.kernels import linear  # noqa: E402
from spark_lab.quants import QuantTensor  # noqa: E402

from .test_flux_gguf import _patch_type, kit_rounds_x, quantize_k, read_dequantized, rel_err, round_x_q8  # noqa: E402

SD3 = dict(sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64, num_attention_heads=4,
           joint_attention_dim=256, caption_projection_dim=256, pooled_projection_dim=256, out_channels=16,
           pos_embed_max_size=16)
SD35 = dict(SD3, num_layers=3, qk_norm="rms_norm", dual_attention_layers=(0, 1))
CONFIGS = {"sd3": SD3, "sd35": SD35}
# what city96's SD3 files keep in float (its llama.cpp patch: never quantized)
CITY96_FLOAT = ("final_layer.", "context_embedder.", "t_embedder.", "y_embedder.", "x_embedder.", "pos_embed")


# ---------------------------------------------------------------------------- writing test files

def to_sd3(sd: dict) -> dict:
    """diffusers SD3Transformer2DModel state dict -> Stability's original MMDiT names (NumPy)."""
    g = {k: v.detach().numpy().astype(np.float32) for k, v in sd.items()}
    out = {}

    def pair(new, old, swap=False):
        for part in ("weight", "bias"):
            a = g.pop(f"{old}.{part}")
            if swap:                                                     # diffusers' (scale, shift) -> (shift, scale)
                scale, shift = np.split(a, 2)
                a = np.concatenate([shift, scale])
            out[f"{new}.{part}"] = a

    def qkv(new, old, names):
        for part in ("weight", "bias"):
            out[f"{new}.{part}"] = np.concatenate([g.pop(f"{old}{n}.{part}") for n in names])

    out["pos_embed"] = g.pop("pos_embed.pos_embed")
    tt = "time_text_embed."
    for new, old in [("x_embedder.proj", "pos_embed.proj"), ("context_embedder", "context_embedder"),
                     ("t_embedder.mlp.0", tt + "timestep_embedder.linear_1"),
                     ("t_embedder.mlp.2", tt + "timestep_embedder.linear_2"),
                     ("y_embedder.mlp.0", tt + "text_embedder.linear_1"),
                     ("y_embedder.mlp.2", tt + "text_embedder.linear_2"), ("final_layer.linear", "proj_out")]:
        pair(new, old)
    pair("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True)
    n = 1 + max(int(k.split(".")[1]) for k in g if k.startswith("transformer_blocks."))
    for i in range(n):
        b, d, last = f"joint_blocks.{i}.", f"transformer_blocks.{i}.", i == n - 1
        x, c = b + "x_block.", b + "context_block."
        pair(x + "adaLN_modulation.1", d + "norm1.linear")
        pair(c + "adaLN_modulation.1", d + "norm1_context.linear", swap=last)
        qkv(x + "attn.qkv", d + "attn.", ("to_q", "to_k", "to_v"))
        qkv(c + "attn.qkv", d + "attn.", ("add_q_proj", "add_k_proj", "add_v_proj"))
        pair(x + "attn.proj", d + "attn.to_out.0")
        pair(x + "mlp.fc1", d + "ff.net.0.proj")
        pair(x + "mlp.fc2", d + "ff.net.2")
        if not last:
            pair(c + "attn.proj", d + "attn.to_add_out")
            pair(c + "mlp.fc1", d + "ff_context.net.0.proj")
            pair(c + "mlp.fc2", d + "ff_context.net.2")
        for new, old in [("x_block.attn.ln_q", "attn.norm_q"), ("x_block.attn.ln_k", "attn.norm_k"),
                         ("context_block.attn.ln_q", "attn.norm_added_q"),
                         ("context_block.attn.ln_k", "attn.norm_added_k"),
                         ("x_block.attn2.ln_q", "attn2.norm_q"), ("x_block.attn2.ln_k", "attn2.norm_k")]:
            if f"{d}{old}.weight" in g:
                out[f"{b}{new}.weight"] = g.pop(f"{d}{old}.weight")
        if f"{d}attn2.to_q.weight" in g:
            qkv(x + "attn2.qkv", d + "attn2.", ("to_q", "to_k", "to_v"))
            pair(x + "attn2.proj", d + "attn2.to_out.0")
    assert not g, f"to_sd3 left {sorted(g)}"
    return out


def diffusers_from_sd3(sd3: dict, config: dict):
    """diffusers' own single-file conversion of original-named tensors, loaded into a diffusers model."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    sd3 = dict(sd3, pos_embed=np.asarray(sd3["pos_embed"]).reshape(1, -1, sd3["pos_embed"].shape[-1]))   # [1, M*M, D]
    sd = convert_sd3_transformer_checkpoint_to_diffusers({k: torch.from_numpy(np.array(v)) for k, v in sd3.items()})
    model = diffusers.SD3Transformer2DModel(**config).eval()
    model.load_state_dict(sd, strict=True)
    return model


def random_model(config: dict, seed: int):
    model = diffusers.SD3Transformer2DModel(**config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():                         # ~ default init's size
            fan_in = p[0].numel() if p.ndim > 1 else 0
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 / fan_in ** 0.5 if fan_in else 0.1))
            if ".norm_" in name:                                         # qk-norm scales: 1 +- 0.1
                p.add_(1.0)
    return model


def pick_type(name: str, a: np.ndarray, kind: str):
    """The GGML type a tensor gets in a `kind` file. Q5_K: city96's choice (embedders, final layer and
    position table in F16); Q8_0 / Q4_K quantize the final layer too (a quantized swap), with a few
    float types mixed in."""
    if kind == "F32" or a.ndim == 1 or (name == "pos_embed" and kind != "Q5_K"):
        return QT.F32
    if a.ndim != 2 or (kind == "Q5_K" and name.startswith(CITY96_FLOAT)):
        return QT.F16
    if name == "context_embedder.weight":
        return QT.BF16
    if name == "t_embedder.mlp.0.weight":
        return QT.F16
    return QT[kind]


def write_gguf(path: Path, tensors: dict, kind: str, arch: str = "sd3", prefix: str = "",
               types: dict | None = None) -> dict:
    """Write `tensors` as a GGUF; -> {name: the GGML type each tensor got}."""
    w = gguf.GGUFWriter(str(path), arch)
    chosen = {}
    for name, a in tensors.items():
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


def inputs(config: dict, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, config["in_channels"], 8, 6), dtype=np.float32)   # 4 x 3 patches of 2
    ctx = rng.standard_normal((2, 5, config["joint_attention_dim"]), dtype=np.float32)
    pooled = rng.standard_normal((2, config["pooled_projection_dim"]), dtype=np.float32)
    return x, ctx, pooled, np.array([800.0, 312.5], np.float32)


def run_diffusers(model, args) -> np.ndarray:
    x, ctx, pooled, t = (torch.from_numpy(a) for a in args)
    with torch.no_grad():
        return model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t).sample.numpy()


def n_held(types: dict) -> int:
    """Quantized tensors the model should hold for a file's types: each qkv becomes 3."""
    return sum(3 if k.endswith("qkv.weight") else 1 for k, q in types.items() if q not in (QT.F32, QT.F16, QT.BF16))


@pytest.fixture(scope="module")
def originals():
    """model name -> (its original-named tensors, its diffusers state dict)."""
    out = {}
    for name, config in CONFIGS.items():
        sd = random_model(config, {"sd3": 0, "sd35": 1}[name]).state_dict()
        out[name] = to_sd3(sd), sd
    return out


@pytest.mark.parametrize("model", ["sd3", "sd35"])
def test_to_sd3_agrees_with_diffusers_converter(originals, model):
    """The test's own renaming, undone by diffusers' converter, gives back the same model."""
    tensors, ref = originals[model]
    back = diffusers_from_sd3(tensors, CONFIGS[model]).state_dict()
    assert back.keys() == ref.keys()
    for k, v in ref.items():
        np.testing.assert_array_equal(back[k].numpy(), v.numpy(), err_msg=k)
    last = CONFIGS[model]["num_layers"] - 1                              # context_pre_only: no text mlp/proj
    assert not any(k.startswith(f"joint_blocks.{last}.context_block.mlp") for k in tensors)
    assert ("joint_blocks.0.x_block.attn2.qkv.weight" in tensors) == (model == "sd35")


@pytest.fixture(scope="module")
def loaded(originals, tmp_path_factory):
    """(model, kind) -> (its GGUF's path, {name: GGML type written}, spark_lab's model, diffusers'
    model on the dequantized tensors); each file written and loaded once per module."""
    cache = {}

    def get(model, kind):
        if (model, kind) not in cache:
            path = tmp_path_factory.mktemp("sd3") / f"{model}-tiny-{kind}.gguf"
            tensors = dict(originals[model][0])
            if kind == "Q4_K":                                           # llama.cpp drops pos_embed's leading 1
                tensors["pos_embed"] = tensors["pos_embed"][0]
            prefix = "model.diffusion_model." if kind == "Q5_K" else ""    # full-checkpoint naming, once
            types = write_gguf(path, tensors, kind, prefix=prefix)
            cache[model, kind] = (path, types, load_sd3_gguf(path),
                                  diffusers_from_sd3(read_dequantized(path), CONFIGS[model]))
        return cache[model, kind]
    return get


@pytest.mark.parametrize("model", ["sd3", "sd35"])
@pytest.mark.parametrize("kind", ["F32", "Q8_0", "Q4_K", "Q5_K"])
def test_gguf_matches_diffusers_with_dequantized_weights(loaded, model, kind):
    path, types, ours, ref = loaded(model, kind)
    want = CONFIGS[model]
    c = ours.config
    for k, v in want.items():
        if k != "sample_size":
            assert getattr(c, k) == (tuple(v) if k == "dual_attention_layers" else v), k
    assert c.sample_size == 128 and c.qk_norm == want.get("qk_norm")
    # the joint blocks' linear layers stay quantized: QuantTensors of the file's type, split or swapped
    p = ours.params.tensors
    last = c.num_layers - 1
    for name in ("transformer_blocks.0.attn.to_k.weight", "transformer_blocks.0.ff_context.net.2.weight",
                 f"transformer_blocks.{last}.attn.add_v_proj.weight",
                 f"transformer_blocks.{last}.norm1_context.linear.weight", "transformer_blocks.1.norm1.linear.weight"):
        if kind == "F32":
            assert not isinstance(p[name], QuantTensor)
        else:
            assert isinstance(p[name], QuantTensor) and p[name].qtype.name == kind, name
    assert isinstance(p["norm_out.linear.weight"], QuantTensor) == (kind in ("Q8_0", "Q4_K"))
    assert not isinstance(p["pos_embed.proj.weight"], QuantTensor) and p["pos_embed.proj.weight"].ndim == 4
    held = sum(1 for t in p.values() if isinstance(t, QuantTensor))
    assert held == n_held(types)

    args = inputs(want)
    got = ours(*args)
    assert got.dtype == np.float32
    int8 = kind in ("Q8_0", "Q4_K") and kit_rounds_x()
    assert rel_err(got, run_diffusers(ref, args)) < (3e-2 if int8 else 1e-4)
    if int8 and get_device().kind == "cpu":                             # the numba kernels ran on the repacked weights
        from spark_lab.kernels import qmatvec
        packed = p["transformer_blocks.0.attn.to_q.weight"].packed
        assert packed is not None and packed.kind in qmatvec.GEMM_KINDS


@pytest.mark.parametrize("model", ["sd3", "sd35"])
@pytest.mark.parametrize("kind", ["Q8_0", "Q4_K"])
def test_int8_layers_match_rounded_reference(loaded, model, kind):
    """Every quantized linear of the model, alone: the kit's product on 2 rows (mat-vec) and 20
    rows (int8 GEMM) vs F.linear(rounded x, diffusers' dequantized weight), 1e-5. This also checks
    each split/swapped weight against diffusers' conversion of the same file."""
    _, _, ours, ref = loaded(model, kind)
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
    # 4 top-level (t_embedder.mlp.2, y_embedder.mlp.0/2, final_layer.linear; adaLN: 5 with norm_out)
    # + per block: x (adaLN, q, k, v, proj, fc1, fc2) 7, context 7 (last block: adaLN, q, k, v = 4),
    # attn2 (q, k, v, proj) 4
    assert n_checked == {"sd3": 5 + 14 + 11, "sd35": 5 + 18 + 18 + 11}[model]


def test_non_square_latent_against_diffusers(loaded):
    """A larger, non-square latent (the position crop) and one timestep for the batch."""
    _, _, ours, ref = loaded("sd35", "Q5_K")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 16, 12, 20), dtype=np.float32)
    ctx = rng.standard_normal((1, 7, 256), dtype=np.float32)
    pooled = rng.standard_normal((1, 256), dtype=np.float32)
    t = np.array([500.0], np.float32)
    assert rel_err(ours(x, ctx, pooled, t), run_diffusers(ref, (x, ctx, pooled, t))) < 1e-4


def test_quantized_position_table_is_dequantized(originals, tmp_path):
    """A [M*M, D] table in a quantized type still becomes a float32 table (not a QuantTensor)."""
    tensors = dict(originals["sd3"][0], pos_embed=originals["sd3"][0]["pos_embed"][0])
    path = tmp_path / "q8-table.gguf"
    write_gguf(path, tensors, "F32", types={"pos_embed": QT.Q8_0})
    ours = load_sd3_gguf(path)
    table = ours.params.tensors["pos_embed.pos_embed"]
    assert not isinstance(table, QuantTensor) and table.dtype == np.float32
    args = inputs(SD3)
    assert rel_err(ours(*args), run_diffusers(diffusers_from_sd3(read_dequantized(path), SD3), args)) < 1e-4


def _one_line_error(path, match):
    with pytest.raises(GGUFError, match=match) as e:       # a ValueError
        load_sd3_gguf(path)
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)


def test_bad_files_are_one_line(tmp_path, originals):
    good = originals["sd35"][0]
    p = tmp_path / "x.gguf"
    write_gguf(p, good, "Q8_0", arch="flux")
    _one_line_error(p, "architecture 'flux' is not an SD3 transformer")
    for missing in ("joint_blocks.2.x_block.mlp.fc2.weight", "pos_embed", "joint_blocks.1.x_block.attn2.ln_k.weight",
                    "joint_blocks.2.context_block.adaLN_modulation.1.bias", "y_embedder.mlp.0.weight"):
        write_gguf(p, {k: v for k, v in good.items() if k != missing}, "Q8_0")
        _one_line_error(p, f"missing tensor '{re.escape(missing)}' for an SD3 transformer")
    write_gguf(p, good, "Q8_0")
    _patch_type(p, "joint_blocks.0.x_block.mlp.fc1.weight", 99)
    _one_line_error(p, "tensor 'joint_blocks.0.x_block.mlp.fc1.weight' has unknown quant type 99")
    bs, ts = gguf.GGML_QUANT_SIZES[QT.Q8_1]                              # a GGML type spark_lab cannot read
    w = gguf.GGUFWriter(str(p), "sd3")
    for name, a in good.items():
        if name == "joint_blocks.1.context_block.attn.qkv.weight":
            w.add_tensor(name, np.zeros((3 * 256, 256 // bs * ts), np.uint8), raw_dtype=QT.Q8_1)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _one_line_error(p, "tensor 'joint_blocks.1.context_block.attn.qkv.weight' uses quant type Q8_1, which "
                       "spark_lab does not support")
    # a 6-chunk modulation where attn2 needs 9: the AdaLN chunks would silently misalign
    bad = dict(good, **{"joint_blocks.0.x_block.adaLN_modulation.1.weight":
                        good["joint_blocks.0.x_block.adaLN_modulation.1.weight"][:6 * 256]})
    write_gguf(p, bad, "F32")
    _one_line_error(p, re.escape("tensor 'joint_blocks.0.x_block.adaLN_modulation.1.weight' has shape (1536, 256), "
                                 "an SD3 transformer of width 256 needs (2304, 256)"))
    bad = dict(good, **{"joint_blocks.1.x_block.attn.qkv.weight": good["joint_blocks.1.x_block.attn.qkv.weight"][:512]})
    write_gguf(p, bad, "F32")
    _one_line_error(p, re.escape("tensor 'joint_blocks.1.x_block.attn.qkv.weight' has shape (512, 256), an SD3 "
                                 "transformer of width 256 needs (768, 256)"))
    write_gguf(p, dict(good, pos_embed=good["pos_embed"][:, :250]), "F32")
    _one_line_error(p, re.escape("tensor 'pos_embed' has shape (1, 250, 256), an SD3 position table of width 256"))
    diffusers_named = {k: v.numpy() for k, v in originals["sd3"][1].items()}
    write_gguf(p, diffusers_named, "F32")
    _one_line_error(p, "tensors have diffusers' names")
    p.write_bytes(b"not a gguf file at all, just some bytes")
    _one_line_error(p, "is not a GGUF file")


def test_loads_as_sd3_transformer(loaded):
    _, _, ours, _ = loaded("sd3", "F32")
    assert isinstance(ours, SD3Transformer2DModel) and ours.config.dual_attention_layers == ()


# ----------------------------------------------------------------------------- in the SD3 pipeline

PIPE = Path(__file__).resolve().parents[1] / "fixtures" / "diffusion" / "tiny-sd3-pipe"


def test_tiny_pipe_transformer_from_gguf_in_the_pipeline(tmp_path):
    """tiny-sd3-pipe's transformer (heads of 8, sample_size 16: both from spark_lab's metadata keys) as an F32
    GGUF in the original layout: the same model as its diffusers folder, and the SD3 pipeline with it in
    place matches diffusers' pipeline (reference.npz) within 1e-3, a LoRA too."""
    from safetensors.torch import load_file

    from spark_lab.diffusion.pipeline_sd3 import StableDiffusion3Pipeline

    path = tmp_path / "tiny-sd3-pipe.gguf"
    tensors = to_sd3(load_file(PIPE / "transformer" / "diffusion_pytorch_model.safetensors"))
    w = gguf.GGUFWriter(str(path), "sd3")
    w.add_uint32("sd3.attention.head_dim", 8)
    w.add_uint32("sd3.sample_size", 16)
    for name, a in tensors.items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours, folder = load_sd3_gguf(path), SD3Transformer2DModel.from_pretrained(PIPE / "transformer")
    for k, v in vars(folder.config).items():
        assert getattr(ours.config, k) == v, k
    assert ours.params.tensors.keys() == folder.params.tensors.keys()
    for k, v in folder.params.tensors.items():
        np.testing.assert_array_equal(to_host(ours.params.tensors[k]), to_host(v), err_msg=k)

    ref = np.load(PIPE / "reference.npz")
    pipe = StableDiffusion3Pipeline.from_pretrained(PIPE, transformer_gguf=path)   # the folder's own, from the GGUF
    assert pipe.transformer.weight_formats() == ours.weight_formats()
    call = dict(num_inference_steps=3, guidance_scale=5.0, latents=ref["latents"][:2], height=16, width=16,
                max_sequence_length=16, output_type="np", progress=False)
    two = ["a photo of a cat", "a red dog"]
    np.testing.assert_allclose(pipe(two, **call), ref["t2i"], atol=1e-3, rtol=0)
    pipe.load_lora_weights(PIPE / "lora" / "sd3-peft.safetensors", scale=0.7, fuse=False)
    np.testing.assert_allclose(pipe(two, **call), ref["lora"], atol=1e-3, rtol=0)
    pipe.unload_lora_weights()


def test_head_dim_metadata_is_checked(originals, tmp_path):
    p = tmp_path / "x.gguf"
    w = gguf.GGUFWriter(str(p), "sd3")
    w.add_uint32("sd3.attention.head_dim", 32)
    for name, a in originals["sd35"][0].items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _one_line_error(p, "metadata sd3.attention.head_dim = 32 disagrees with the qk-norm scales' length 64")
    small = tmp_path / "small.gguf"                                     # no qk-norm, no metadata: heads of 64
    write_gguf(small, dict(originals["sd3"][0], **{"x_embedder.proj.weight": np.zeros((96, 16, 2, 2), np.float32)}),
               "F32")
    _one_line_error(small, "width 96 \\(x_embedder rows\\) is not a whole number of heads of 64 \\(set metadata "
                           "'sd3.attention.head_dim' for other heads\\)")
