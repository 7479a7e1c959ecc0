"""LoRA files (PEFT, diffusers, kohya incl. SDXL's original block names), fused and unfused, vs diffusers.

The files in tiny-sdxl/lora/ were written by tools/make_sdxl_fixtures.py; the references are diffusers'
pipelines with each LoRA fused by hand into the torch weights (W += scale * alpha / r * up @ down) at the
modules diffusers' own kohya converter names. Images must match within 1e-3.
"""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spark_lab import cli
from spark_lab.device import to_host
from spark_lab.diffusion.lora import LoRAWeights, parse_lora_arg, sgm_to_diffusers
from spark_lab.diffusion.pipeline import TextToImagePipeline

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "diffusion"
XL = FIX / "tiny-sdxl"
LORA = XL / "lora"
REF = np.load(XL / "reference.npz")
INIT, MASK = Image.fromarray(REF["init_image"]), Image.fromarray(REF["mask_image"])
KW = dict(output_type="np", progress=False)


@pytest.fixture(scope="module")
def sd():
    return TextToImagePipeline.from_pretrained(FIX / "tiny-sd")


@pytest.fixture(scope="module")
def xl():
    return TextToImagePipeline.from_pretrained(XL)


def snapshot(pipe):
    """Every weight array of every LoRA-able part, by identity and by value."""
    return {(part, k): (v, to_host(v).copy()) for part, w in pipe.lora_parts().items() for k, v in w.items()}


def assert_restored(pipe, before):
    after = {(part, k): v for part, w in pipe.lora_parts().items() for k, v in w.items()}
    assert set(after) == set(before)                                   # no ".lora" stacks left behind
    for key, (arr, values) in before.items():
        assert after[key] is arr                                       # the very same array object
        np.testing.assert_array_equal(to_host(after[key]), values)     # with the very same bits


# each case: the LoRA, its scale, the pipeline call that made the reference
CASES = {
    "sd-peft": ("sd", 0.8, dict(prompt="a photo of a cat", image=INIT, strength=0.8, num_inference_steps=3,
                                guidance_scale=7.5, seed=31), "lora_sd_peft_i2i_images"),
    "sd-kohya": ("sd", 1.0, dict(prompt="a red dog", image=INIT, mask_image=MASK, strength=0.75,
                                 num_inference_steps=3, guidance_scale=7.5, seed=32), "lora_sd_kohya_inpaint_images"),
    "sdxl-kohya": ("xl", 0.7, dict(prompt=["a photo of a cat", "a red dog"], num_inference_steps=3,
                                   guidance_scale=5.0, latents=REF["xl_latents"]), "lora_xl_kohya_images"),
    "sdxl-diffusers": ("xl", 1.0, dict(prompt="a red dog", image=INIT, mask_image=MASK, strength=0.75,
                                       num_inference_steps=3, guidance_scale=5.0, seed=41),
                       "lora_xl_diffusers_inpaint_images"),
}


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("name", list(CASES))
def test_lora_pipelines_match_diffusers_and_unload_exactly(request, name, fuse):
    which, scale, call, ref = CASES[name]
    pipe = request.getfixturevalue(which)
    before = snapshot(pipe)
    adapter = pipe.load_lora_weights(LORA / f"{name}.safetensors", scale=scale, fuse=fuse)
    try:
        assert adapter.layers == len(LoRAWeights.from_file(LORA / f"{name}.safetensors").layers)
        img = pipe(**call, **KW)
    finally:
        pipe.unload_lora_weights()
    np.testing.assert_allclose(img, REF[ref], atol=1e-3)
    assert_restored(pipe, before)
    plain = pipe(**call, **KW)
    assert np.abs(plain - REF[ref]).max() > 1e-2                       # the LoRA changed the image


def test_unfused_scale_changes_without_reloading(sd):
    call = dict(CASES["sd-peft"][2])
    pipe = sd
    plain = pipe(**call, **KW)
    pipe.load_lora_weights(LORA / "sd-peft.safetensors", scale=0.3, fuse=False)
    try:
        pipe.set_lora_scale(0.8)
        np.testing.assert_allclose(pipe(**call, **KW), REF["lora_sd_peft_i2i_images"], atol=1e-3)
        pipe.set_lora_scale(0.0)
        np.testing.assert_allclose(pipe(**call, **KW), plain, atol=1e-6)
    finally:
        pipe.unload_lora_weights()


def test_fused_and_unfused_agree_with_two_loras_stacked(sd):
    """Two files on one model: fused on top of fused, and fused + unfused, give the same pictures."""
    call = dict(prompt="a red dog", image=INIT, strength=0.9, num_inference_steps=3, seed=3)
    before = snapshot(sd)
    outs = []
    for fuse_second in (True, False):
        sd.load_lora_weights(LORA / "sd-peft.safetensors", scale=0.5)
        sd.load_lora_weights(LORA / "sd-kohya.safetensors", scale=1.5, fuse=fuse_second)
        try:
            outs.append(sd(**call, **KW))
        finally:
            sd.unload_lora_weights()
        assert_restored(sd, before)
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-4)
    with pytest.raises(ValueError, match="is fused into the weights"):
        sd.load_lora_weights(LORA / "sd-kohya.safetensors")
        try:
            sd.set_lora_scale(0.5)
        finally:
            sd.unload_lora_weights()


@pytest.mark.parametrize("which, name, msg", [
    ("sd", "sdxl-kohya", r"LoRA sdxl-kohya.safetensors does not fit this Stable Diffusion 1.x/2.x model: 10 of "
                         r"its 15 layers match no module here \(e.g. lora_te2_text_model_encoder_layers_0_mlp_fc1\); "
                         r"it is likely a LoRA for another model family \(it looks like an SDXL LoRA\)"),
    ("sd", "sdxl-diffusers", r"LoRA sdxl-diffusers.safetensors does not fit this Stable Diffusion 1.x/2.x model"),
    ("xl", "sd-kohya", r"LoRA sd-kohya.safetensors does not fit this SDXL model: 3 of its 5 layers match no module"),
    ("xl", "sd-peft", r"LoRA sd-peft.safetensors does not fit this SDXL model"),
])
def test_lora_of_another_family_is_one_clear_error(request, which, name, msg):
    pipe = request.getfixturevalue(which)
    before = snapshot(pipe)
    with pytest.raises(ValueError, match=msg) as e:
        pipe.load_lora_weights(LORA / f"{name}.safetensors")
    assert "\n" not in str(e.value)
    assert_restored(pipe, before)                          # refused before anything was touched
    assert pipe.adapters == []


def test_shapes_that_do_not_fit_and_other_families(sd):
    w = sd.unet.params.tensors["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"]
    out_, in_ = to_host(w).shape
    wrong = LoRAWeights.from_tensors({
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": np.ones((2, in_ + 3), np.float32),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": np.ones((out_, 2), np.float32),
    }, "wide.safetensors")
    with pytest.raises(ValueError, match=rf"LoRA wide.safetensors does not fit .* 1 of its 1 layers do not fit "
                                         rf"\(down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q is \[{out_}, {in_}\]"):
        sd.load_lora_weights(wrong)
    flux = LoRAWeights.from_tensors({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": np.ones((2, 8), np.float32),
                                     "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": np.ones((8, 2), np.float32)},
                                    "flux.safetensors")
    with pytest.raises(ValueError, match=r"it looks like an SD3/Flux LoRA"):
        sd.load_lora_weights(flux)


@pytest.mark.parametrize("tensors, msg", [
    ({"unet.conv_in.lora_A.weight": np.ones((2, 4, 3, 3), np.float32)}, "has only the down factor"),
    ({"lora_unet_conv_in.lora_down.weight": np.ones((2, 4), np.float32),
      "lora_unet_conv_in.dora_scale": np.ones((1, 4), np.float32)}, "a DoRA tensor, which spark_lab does not read"),
    ({"lora_unet_conv_in.hada_w1_a": np.ones((2, 4), np.float32)}, "LoHa/LoKr"),
    ({"unet.conv_in.weight": np.ones((2, 4), np.float32)}, "is not a LoRA factor"),
    ({"unet.conv_in.lora_A.weight": np.ones((2, 4), np.float32),
      "unet.conv_in.lora_B.weight": np.ones((4, 3), np.float32)}, r"not \[r, in\] and \[out, r\]"),
])
def test_malformed_files(tensors, msg):
    with pytest.raises(ValueError, match=msg):
        LoRAWeights.from_tensors(tensors, "bad.safetensors")


def test_missing_file_and_cli_scale_syntax(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing LoRA file"):
        LoRAWeights.from_file(tmp_path / "nope.safetensors")
    assert parse_lora_arg("style.safetensors") == ("style.safetensors", 1.0)
    assert parse_lora_arg("a/b.safetensors:0.6") == ("a/b.safetensors", 0.6)
    assert parse_lora_arg("C:/x.safetensors") == ("C:/x.safetensors", 1.0)


def test_peft_metadata_alphas_are_read():
    lw = LoRAWeights.from_file(LORA / "sd-peft.safetensors")
    by = {layer.name: lw.factor(layer) for layer in lw.layers}
    assert by["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"] == 0.5      # alpha_pattern 1 / r 2
    assert by["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"] == 1.5      # lora_alpha 3 / r 2
    assert by["text_model.encoder.layers.0.self_attn.q_proj"] == 0.5                     # 2 / 4


def test_sgm_block_names_follow_the_unet_config(xl):
    c = xl.unet.config
    assert sgm_to_diffusers("input_blocks_0_0", c) == "conv_in"
    assert sgm_to_diffusers("input_blocks_7_1_proj_out", c) == "down_blocks_2_attentions_0_proj_out"
    assert sgm_to_diffusers("input_blocks_6_0_op", c) == "down_blocks_1_downsamplers_0_conv"
    assert sgm_to_diffusers("middle_block_0_emb_layers_1", c) == "mid_block_resnets_0_time_emb_proj"
    assert sgm_to_diffusers("output_blocks_5_1_conv", c) == "up_blocks_1_upsamplers_0_conv"   # up block 1: no attention
    assert sgm_to_diffusers("output_blocks_1_1_proj_in", c) == "up_blocks_0_attentions_1_proj_in"
    assert sgm_to_diffusers("down_blocks_0_resnets_0_conv1", c) == "down_blocks_0_resnets_0_conv1"


def test_cli_lora_and_wrong_family(tmp_path, capsys, sd):
    out = tmp_path / "a.png"
    assert cli.main(["imagine", "a red dog", "--model", str(FIX / "tiny-sd"), "--steps", "3", "--seed", "5",
                     "--lora", f"{LORA / 'sd-peft.safetensors'}:0.8", "--lora", str(LORA / "sd-kohya.safetensors"),
                     "--out", str(out)]) == 0
    assert "LoRA sd-peft.safetensors x0.8, LoRA sd-kohya.safetensors x1" in capsys.readouterr().out
    sd.load_lora_weights(LORA / "sd-peft.safetensors", scale=0.8)
    sd.load_lora_weights(LORA / "sd-kohya.safetensors")
    try:
        want = sd("a red dog", num_inference_steps=3, seed=5, progress=False)[0]
    finally:
        sd.unload_lora_weights()
    assert Image.open(out).resize((16, 16), Image.NEAREST).tobytes() == want.tobytes()
    assert cli.main(["imagine", "a cat", "--model", str(FIX / "tiny-sd"), "--steps", "1", "--out", str(out),
                     "--lora", str(LORA / "sdxl-kohya.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "LoRA sdxl-kohya.safetensors does not fit this Stable Diffusion 1.x/2.x model" in err
    assert len(err.strip().splitlines()) == 1
    assert cli.main(["imagine", "a cat", "--model", str(FIX / "tiny-sd"), "--out", str(out),
                     "--lora", str(tmp_path / "nope.safetensors:0.5")]) == 1
    assert "--lora" in capsys.readouterr().err
