"""The same tiny-model parity on CuPy arrays (run by scripts/gpu_check.sh on a GPU machine)."""
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gpu
FIX = Path(__file__).resolve().parents[1] / "fixtures" / "diffusion"


@pytest.fixture(scope="module")
def cp():
    cupy = pytest.importorskip("cupy")
    from spark_lab.device import get_device
    if not get_device().is_gpu:
        pytest.skip("no usable CUDA device")
    return cupy


def test_unet_vae_clip_on_gpu(cp):
    from spark_lab.diffusion import AutoencoderKL, UNet2DConditionModel
    from spark_lab.text.clip import CLIPTextModel
    ref = np.load(FIX / "reference.npz")
    unet = UNet2DConditionModel.from_pretrained(FIX / "tiny-sd" / "unet")
    out = unet(cp.asarray(ref["unet_cond_in"]), ref["unet_cond_t"], cp.asarray(ref["unet_cond_ehs"]))
    assert isinstance(out, cp.ndarray) and out.dtype == np.float32
    np.testing.assert_allclose(cp.asnumpy(out), ref["unet_cond_out"], atol=1e-4, rtol=1e-4)
    vae = AutoencoderKL.from_pretrained(FIX / "tiny-sd" / "vae")
    np.testing.assert_allclose(cp.asnumpy(vae.decode(cp.asarray(ref["vae_z"]))), ref["vae_decoded"], atol=1e-4)
    enc = CLIPTextModel.from_pretrained(FIX / "tiny-sd" / "text_encoder")
    np.testing.assert_allclose(cp.asnumpy(enc(ref["clip_ids"]).last_hidden_state), ref["clip_hidden"], atol=1e-4)


def test_pipeline_on_gpu_matches_reference(cp):
    from spark_lab.diffusion import TextToImagePipeline
    ref = np.load(FIX / "reference.npz")
    pipe = TextToImagePipeline.from_pretrained(FIX / "tiny-sd")
    img = pipe(["a photo of a cat", "a red dog"], num_inference_steps=3, guidance_scale=7.5,
               latents=ref["pipe_latents"], output_type="np", progress=False)
    np.testing.assert_allclose(img, ref["pipe_images"], atol=1e-3)
