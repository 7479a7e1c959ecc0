"""lora_edit: a LoRA built from TIME's closed-form cross-attention edit, checked against the paper's
formula, against the edited prompt embeddings it stands for, against diffusers' UNet with the factors
fused by hand, and read back by diffusers' own LoRA reader."""
import numpy as np
import pytest

from spark_lab.device import to_device, to_host
from spark_lab.diffusion.lora import LoRAWeights
from spark_lab.diffusion.lora_edit import emoji_captions, factor, fit_edit, style_lora
from spark_lab.diffusion.pipeline import TextToImagePipeline
from spark_lab.models import is_present

needs_emoji = pytest.mark.skipif(not is_present("spark-emoji") or not is_present("all-minilm-l6-v2"),
                                 reason="spark-emoji or all-minilm-l6-v2 not installed")
KW = dict(num_inference_steps=3, seed=4, output_type="np", progress=False)
CAPTIONS = emoji_captions()[::4]            # ~55 captions: the fit is the same kind, the test quicker


def test_fit_edit_is_times_closed_form():
    """W + W M equals TIME's W' = (W sum c* c^T + ridge W)(sum c c^T + ridge I)^-1 (Orgad et al. 2023, eq. 4)."""
    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((12, 20)), rng.standard_normal((12, 20))
    W = rng.standard_normal((7, 20))
    for ridge in (0.1, 2.0):
        M = fit_edit(X, Y, ridge)
        want = (W @ Y.T @ X + ridge * W) @ np.linalg.inv(X.T @ X + ridge * np.eye(20))
        np.testing.assert_allclose(W + W @ M, want, rtol=1e-10, atol=1e-10)
    M = fit_edit(X, Y, 1e-9)                        # fewer sources than dimensions: every source hits its target
    np.testing.assert_allclose(X + X @ M.T, Y, atol=1e-6)
    down, up, S = factor(W @ M, 3)                  # the rank-3 SVD, split evenly between the factors
    assert down.shape == (3, 20) and up.shape == (7, 3)
    np.testing.assert_allclose(np.linalg.svd(up.astype(np.float64) @ down)[1][:3], S[:3], rtol=1e-5)
    with pytest.raises(ValueError, match=r"must both be \[n, d\]"):
        fit_edit(X, Y[:5])


@pytest.fixture(scope="module")
def emoji():
    return TextToImagePipeline.from_pretrained("spark-emoji")


@pytest.fixture(scope="module")
def fire(emoji, tmp_path_factory):
    return style_lora(emoji, "fire", tmp_path_factory.mktemp("lora") / "fire.safetensors", captions=CAPTIONS)


@needs_emoji
def test_style_lora_file_is_rank_one_and_reads_as_a_diffusers_lora(fire):
    lora = fire
    assert len(lora.layers) == 4 and all(m.endswith("attn2.to_v") for m in lora.layers)
    for S in lora.singular_values.values():            # the edit is rank 1: one singular value, then ~0
        assert S[0] > 1.0 and S[1] < 1e-9 * S[0]
    lw = LoRAWeights.from_file(lora.path)
    assert {layer.rank for layer in lw.layers} == {1} and {lw.factor(layer) for layer in lw.layers} == {1.0}
    pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    sd, _, meta = diffusers.StableDiffusionPipeline.lora_state_dict(str(lora.path), return_lora_metadata=True)
    assert sorted(sd) == sorted(f"unet.{m}.lora_{ab}.weight" for m in lora.layers for ab in "AB")
    assert meta["unet.r"] == 1 and meta["unet.lora_alpha"] == 1 and sorted(meta["unet.target_modules"]) == lora.layers


@needs_emoji
def test_lora_draws_what_the_edited_prompt_draws_and_unloads_exactly(emoji, fire):
    """At scale t the LoRA is the prompt edit c -> c + t M c: same pictures, fused or not; off again bit for bit."""
    lora = fire
    prompts = ["a dog face", "a banana"]
    plain = emoji(prompts, **KW)
    edited = {t: emoji(prompt_embeds=lora.embeds(emoji.encode_prompt(prompts), t), **KW) for t in (0.5, 1.25)}
    assert np.abs(edited[1.25] - plain).max() > 0.1                    # the edit does change the pictures
    emoji.load_lora_weights(lora.path, scale=0.5, fuse=False)
    try:
        np.testing.assert_allclose(emoji(prompts, **KW), edited[0.5], atol=1e-4)
        emoji.set_lora_scale(1.25)
        np.testing.assert_allclose(emoji(prompts, **KW), edited[1.25], atol=1e-4)
    finally:
        emoji.unload_lora_weights()
    emoji.load_lora_weights(lora.path, scale=1.25, fuse=True)
    try:
        np.testing.assert_allclose(emoji(prompts, **KW), edited[1.25], atol=1e-4)
    finally:
        emoji.unload_lora_weights()
    np.testing.assert_array_equal(emoji(prompts, **KW), plain)


@needs_emoji
def test_unet_with_the_lora_matches_diffusers(emoji, tmp_path):
    """spark_lab's UNet with the LoRA unfused vs diffusers' UNet with W += scale * B @ A fused by hand."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    lora = style_lora(emoji, "a ghost", tmp_path / "ghost.safetensors", captions=CAPTIONS, strength=0.8)
    ref = diffusers.UNet2DConditionModel.from_pretrained(emoji.folder / "unet").eval()
    lw = LoRAWeights.from_file(lora.path)
    scale = 0.7
    with torch.no_grad():
        for layer in lw.layers:
            w = ref.get_parameter(f"{layer.name}.weight")
            w += torch.from_numpy(scale * lw.factor(layer) * (layer.up @ layer.down))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 32, 32), dtype=np.float32)
    ctx = np.asarray(to_host(emoji.encode_prompt(["a cat face", "a rocket"])), np.float32)   # [2, 1, 384]
    t = 500
    with torch.no_grad():
        want = ref(torch.from_numpy(x), t, encoder_hidden_states=torch.from_numpy(ctx)).sample.numpy()
    emoji.load_lora_weights(lora.path, scale=scale, fuse=False)
    try:
        got = np.asarray(to_host(emoji.unet(to_device(x), t, to_device(ctx))))
    finally:
        emoji.unload_lora_weights()
    plain = np.asarray(to_host(emoji.unet(to_device(x), t, to_device(ctx))))
    assert np.abs(want - plain).max() > 1e-2                            # the LoRA moved the prediction
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_style_lora_refuses_token_conditioned_models(tmp_path):
    """A CLIP-token model (tiny SD) is not the one-token case the edit is built for: one clear line."""
    from pathlib import Path
    fixtures = Path(__file__).resolve().parents[1] / "fixtures" / "diffusion"
    pipe = TextToImagePipeline.from_pretrained(fixtures / "tiny-sd")
    with pytest.raises(ValueError, match="needs a model conditioned on one sentence embedding") as e:
        style_lora(pipe, "fire", tmp_path / "x.safetensors", captions=["a cat", "a dog"])
    assert "\n" not in str(e.value)
