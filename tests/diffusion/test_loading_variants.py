"""Sharded checkpoints and weight variants, as diffusers / transformers `save_pretrained` write them.

FLUX.1-dev, SD3.5-large and T5-XXL ship `{stem}-00001-of-0000N.safetensors` + a
`{stem}.safetensors.index.json`; a variant is `{stem}.bf16.safetensors` or, sharded,
`{stem}.fp16-00001-of-0000N.safetensors` + `{stem}.safetensors.index.fp16.json`. Tiny random models
are saved each way in the test and spark_lab's forward must match the library's within 1e-4.
The error tests need neither torch nor diffusers: they re-index the tiny-flux fixture's one file.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from spark_lab.device import to_host
from spark_lab.diffusion.flux import FluxTransformer2DModel, latent_image_ids
from spark_lab.diffusion.loading import find_weights, load_model_folder, read_safetensors, weight_files

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "diffusion"


def close(a, b, rtol=1e-4):
    a = to_host(a)
    assert a.dtype == np.float32, a.dtype
    assert a.shape == b.shape, (a.shape, b.shape)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * float(np.abs(b).max()))


def one_line(e) -> str:
    s = str(e.value)
    assert "\n" not in s, s
    return s


# --- tiny FLUX saved by diffusers ---------------------------------------------------------------

@pytest.fixture(scope="module")
def flux():
    """(diffusers model with random weights, inputs as NumPy, forward(model) -> NumPy output)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.FluxTransformer2DModel(num_layers=1, num_single_layers=1, attention_head_dim=16,
                                           num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                           axes_dims_rope=(4, 6, 6), in_channels=16).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 6, 16), dtype=np.float32)              # [B, h*w, C]
    ctx = rng.standard_normal((2, 5, 32), dtype=np.float32)            # [B, T, joint_attention_dim]
    pooled = rng.standard_normal((2, 32), dtype=np.float32)
    t = np.array([1.0, 0.3], np.float32)
    img_ids, txt_ids = latent_image_ids(2, 3), rng.integers(0, 4, (5, 3)).astype(np.float32)
    args = (x, ctx, pooled, t, img_ids, txt_ids)

    def forward(m):
        with torch.no_grad():
            return m(hidden_states=torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(ctx),
                     pooled_projections=torch.from_numpy(pooled), timestep=torch.from_numpy(t),
                     img_ids=torch.from_numpy(img_ids), txt_ids=torch.from_numpy(txt_ids)).sample.numpy()
    return ref, args, forward


def rounded(ref, dtype):
    """A float32 copy of `ref` whose weights went through `dtype` (what a bf16/fp16 file holds)."""
    import copy
    return copy.deepcopy(ref).to(dtype).float()


def test_flux_sharded(tmp_path, flux):
    ref, args, forward = flux
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    index = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    assert find_weights(tmp_path) == index
    shards = weight_files(index)
    assert len(shards) > 2 and all(s.name.startswith("diffusion_pytorch_model-000") for s in shards)
    ours = FluxTransformer2DModel.from_pretrained(tmp_path)
    assert len(ours.params.tensors) == len(ref.state_dict())
    close(ours(*args), forward(ref))


def test_flux_bf16_variant(tmp_path, flux):
    import torch
    ref, args, forward = flux
    rounded(ref, torch.bfloat16).to(torch.bfloat16).save_pretrained(tmp_path, variant="bf16")
    assert (tmp_path / "diffusion_pytorch_model.bf16.safetensors").is_file()
    assert {a["dtype"] for a in _header(tmp_path / "diffusion_pytorch_model.bf16.safetensors").values()} == {"BF16"}
    want = forward(rounded(ref, torch.bfloat16))
    # asked for by name; found without a name (the only weights there); "fp16" asked, only bf16 there
    for variant in ("bf16", None, "fp16"):
        ours = FluxTransformer2DModel.from_pretrained(tmp_path, variant=variant)
        assert all(a.dtype == np.float32 for a in ours.params.tensors.values())
        close(ours(*args), want)


def test_flux_fp16_sharded_next_to_plain_shards(tmp_path, flux):
    """A hub folder with both: the fp16 shards when variant="fp16", the float32 ones otherwise."""
    import torch
    ref, args, forward = flux
    # saved apart and merged: diffusers' save_pretrained deletes the other kind's shards in its folder
    rounded(ref, torch.float16).half().save_pretrained(tmp_path / "fp16", variant="fp16", max_shard_size="20KB")
    ref.save_pretrained(tmp_path / "fp32", max_shard_size="20KB")
    for f in [*(tmp_path / "fp16").iterdir(), *(tmp_path / "fp32").iterdir()]:
        shutil.move(f, tmp_path / f.name)
    index16 = tmp_path / "diffusion_pytorch_model.safetensors.index.fp16.json"
    assert index16.is_file() and any(tmp_path.glob("diffusion_pytorch_model.fp16-00001-of-*.safetensors"))
    assert find_weights(tmp_path, "fp16") == index16
    assert find_weights(tmp_path) == tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    close(FluxTransformer2DModel.from_pretrained(tmp_path, variant="fp16")(*args), forward(rounded(ref, torch.float16)))
    close(FluxTransformer2DModel.from_pretrained(tmp_path)(*args), forward(ref))


def _header(path) -> dict:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return {k: v for k, v in json.loads(f.read(n)).items() if k != "__metadata__"}


# --- text encoders saved by transformers --------------------------------------------------------

@pytest.mark.parametrize("variant", [None, "fp16"])
def test_clip_text_sharded(tmp_path, variant):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from spark_lab.text.clip import CLIPTextModel

    cfg = transformers.CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                      vocab_size=99, max_position_embeddings=20, bos_token_id=0, eos_token_id=1,
                                      pad_token_id=1)
    torch.manual_seed(0)
    ref = transformers.CLIPTextModel(cfg).eval()
    ref.save_pretrained(tmp_path, max_shard_size="20KB", variant=variant)
    index = tmp_path / ("model.safetensors.index.json" if variant is None else f"model.safetensors.index.{variant}.json")
    assert index.is_file() and len(weight_files(index)) > 1
    ids = np.random.default_rng(2).integers(2, 99, (2, 12))
    ids[:, 0], ids[0, 7:], ids[1, 11] = 0, 1, 1                                  # BOS, EOS then padding
    with torch.no_grad():
        want = ref(torch.from_numpy(ids))
    out = CLIPTextModel.from_pretrained(tmp_path, variant=variant)(ids)
    close(out.last_hidden_state, want.last_hidden_state.numpy())
    close(out.pooler_output, want.pooler_output.numpy())


def test_t5_fp16_variant_sharded(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from spark_lab.text.t5 import T5EncoderModel

    ref = transformers.T5EncoderModel.from_pretrained(FIX / "tiny-t5" / "text_encoder_3").eval()
    ref.half().save_pretrained(tmp_path, max_shard_size="30KB", variant="fp16")
    assert (tmp_path / "model.safetensors.index.fp16.json").is_file()
    ref = ref.float()
    ids = np.random.default_rng(3).integers(0, 100, (2, 9))
    with torch.no_grad():
        want = ref(torch.from_numpy(ids)).last_hidden_state.numpy()
    close(T5EncoderModel.from_pretrained(tmp_path, variant="fp16")(ids).last_hidden_state, want)


# --- broken folders: one-line errors that name the file -------------------------------------------

@pytest.fixture
def sharded(tmp_path):
    """tiny-flux's transformer as a "sharded" checkpoint: its one file renamed to a shard + an index."""
    src = FIX / "tiny-flux" / "transformer"
    shutil.copy(src / "config.json", tmp_path / "config.json")
    shard = "diffusion_pytorch_model-00001-of-00001.safetensors"
    shutil.copy(src / "diffusion_pytorch_model.safetensors", tmp_path / shard)
    wmap = {k: shard for k in read_safetensors(tmp_path / shard)}
    index = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    return tmp_path, index, wmap


def test_index_without_torch(sharded):
    folder, index, wmap = sharded
    _, params = load_model_folder(folder)
    assert set(params.tensors) == set(wmap) and params.source == str(index)


def test_missing_shard_is_named(sharded):
    folder, index, wmap = sharded
    wmap[next(iter(wmap))] = "diffusion_pytorch_model-00002-of-00002.safetensors"
    index.write_text(json.dumps({"weight_map": wmap}))
    with pytest.raises(FileNotFoundError) as e:
        load_model_folder(folder)
    msg = one_line(e)
    assert "diffusion_pytorch_model-00002-of-00002.safetensors" in msg and index.name in msg


@pytest.mark.parametrize("weight_map", [None, [], {}, "x", {"a": 3}, {"a": "../x.safetensors"},
                                        {"a": "/etc/passwd"}, {"a": ".."}])
def test_malformed_weight_map_is_named(sharded, weight_map):
    folder, index, _ = sharded
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError) as e:
        load_model_folder(folder)
    assert str(index) in one_line(e)


def test_index_not_json_is_named(sharded):
    folder, index, _ = sharded
    index.write_text("{")
    with pytest.raises(ValueError) as e:
        load_model_folder(folder)
    assert str(index) in one_line(e)


def test_shards_without_index(sharded):
    folder, index, _ = sharded
    index.unlink()
    with pytest.raises(FileNotFoundError) as e:
        load_model_folder(folder)
    assert "no weights in" in one_line(e) and "diffusion_pytorch_model-00001-of-00001.safetensors" in one_line(e)


def test_two_variants_and_no_plain_weights_ask_for_one(tmp_path):
    src = FIX / "tiny-flux" / "transformer"
    shutil.copy(src / "config.json", tmp_path / "config.json")
    for v in ("fp16", "bf16"):
        shutil.copy(src / "diffusion_pytorch_model.safetensors", tmp_path / f"diffusion_pytorch_model.{v}.safetensors")
    with pytest.raises(ValueError) as e:
        load_model_folder(tmp_path)
    assert "bf16, fp16" in one_line(e) and "variant=" in one_line(e)
    assert find_weights(tmp_path, "bf16").name == "diffusion_pytorch_model.bf16.safetensors"
