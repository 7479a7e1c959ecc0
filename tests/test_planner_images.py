"""The image planner: weights + activations of Flux / SD3 / SDXL pipelines, checked by hand.

Parameter counts are derived here from the published config.json numbers, independently of the
planner's formulas, and (when torch and diffusers are installed) against the modules diffusers and
transformers build from those configs on torch's meta device.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from spark_lab.planner import SPARK_MEMORY, SPARK_RESERVED
from spark_lab.planner_images import (KNOWN_IMAGE_MODELS, TEXT_ENCODERS, VAEShape,
                                      known_image_shape, mmdit_params, plan_image, text_encoder_params, vae_params)

SPARK = SPARK_MEMORY - SPARK_RESERVED        # 120 GB
MiB64 = 1 << 24                              # kernels.attention's score chunk, in float32 values


def flux_transformer_by_hand(guidance: bool) -> int:
    D = 24 * 128                                                    # heads x head_dim = 3072
    lin = lambda i, o: i * o + o                                    # noqa: E731  Linear with bias
    # double block: 2 AdaLN-zero (D -> 6D), q k v + add_q k v + to_out + to_add_out (8 D x D),
    # 4 RMSNorm scales of 128, 2 MLPs (D -> 4D -> D)
    double = 2 * lin(D, 6 * D) + 8 * lin(D, D) + 4 * 128 + 2 * (lin(D, 4 * D) + lin(4 * D, D))
    assert double == 36 * D * D + 30 * D + 512
    # single block: AdaLN (D -> 3D), q k v, 2 RMSNorm scales, proj_mlp (D -> 4D), proj_out (5D -> D)
    single = lin(D, 3 * D) + 3 * lin(D, D) + 2 * 128 + lin(D, 4 * D) + lin(5 * D, D)
    assert single == 15 * D * D + 11 * D + 256
    time = lin(256, D) + lin(D, D)
    embeds = time * (2 if guidance else 1) + lin(768, D) + lin(D, D) + lin(4096, D) + lin(64, D)
    return 19 * double + 38 * single + embeds + lin(D, 2 * D) + lin(D, 64)


def test_flux_dev_weights_by_hand():
    n = flux_transformer_by_hand(guidance=True)
    assert n == 11_901_408_320                                      # the "12B" of FLUX.1
    assert mmdit_params(KNOWN_IMAGE_MODELS["flux-dev"].denoiser) == n
    assert mmdit_params(KNOWN_IMAGE_MODELS["flux-schnell"].denoiser) == flux_transformer_by_hand(False) \
        == n - (256 * 3072 + 3072 + 3072 * 3072 + 3072)            # schnell: no guidance embedder
    t = {c.name: c for c in known_image_shape("flux-dev", "bf16").components}["transformer"]
    assert t.file_bytes == 2 * n and round(t.file_bytes / 1e9, 1) == 23.8            # bf16 download
    assert t.resident_bytes == 4 * n and round(t.resident_bytes / 1e9, 1) == 47.6    # float32 in spark_lab
    q8 = known_image_shape("flux-dev", "Q8_0").components[0]
    assert q8.file_bytes == q8.resident_bytes == int(n * 34 / 32)                    # 34 bytes per 32 weights
    assert round(q8.file_bytes / 1e9, 1) == 12.6                                     # 12.65 GB
    q4 = known_image_shape("flux-dev", "Q4_K").components[0]
    assert q4.resident_bytes == int(n * 144 / 256) and round(q4.resident_bytes / 1e9, 2) == 6.69
    assert known_image_shape("flux-dev", "bf16", upcast=False).components[0].resident_bytes == 2 * n


def test_text_encoders_and_vae_by_hand():
    def clip(d, f, layers, proj):
        layer = 4 * d + 4 * (d * d + d) + d * f + f + f * d + d     # 2 LayerNorms, q/k/v/out, fc1, fc2
        return 49408 * d + 77 * d + layers * layer + 2 * d + d * proj
    assert text_encoder_params(TEXT_ENCODERS["clip-l"]) == clip(768, 3072, 12, 0) == 123_060_480
    assert text_encoder_params(TEXT_ENCODERS["clip-l-proj"]) == clip(768, 3072, 12, 768) == 123_650_304
    assert text_encoder_params(TEXT_ENCODERS["clip-g"]) == clip(1280, 5120, 32, 1280) == 694_659_840
    # T5-XXL encoder: embedding 32128 x 4096; 24 x (q k v o 4096^2 + wi_0 wi_1 wo 3 x 4096 x 10240 + 2 norms);
    # position table 32 buckets x 64 heads; final norm
    t5 = 32128 * 4096 + 24 * (4 * 4096**2 + 3 * 4096 * 10240 + 2 * 4096) + 32 * 64 + 4096
    assert text_encoder_params(TEXT_ENCODERS["t5-xxl"]) == t5 == 4_762_310_656
    # diffusers' AutoencoderKL with FLUX.1's / SD3's and SDXL's vae/config.json, counted on the meta
    # device (test_counts_match_diffusers_and_transformers repeats it)
    assert vae_params(VAEShape()) == 83_819_683
    assert vae_params(VAEShape(latent_channels=4, quant_convs=True)) == 83_653_863
    # a VAE small enough to count by hand: channels (4, 8), 1 resnet per level, 2 latent channels
    conv = lambda i, o, k=3: i * o * k * k + o                      # noqa: E731
    res = lambda i, o: 2 * i + conv(i, o) + 2 * o + conv(o, o) + (conv(i, o, 1) if i != o else 0)  # noqa: E731
    mid = 2 * res(8, 8) + 2 * 8 + 4 * (64 + 8)
    enc = conv(3, 4) + res(4, 4) + conv(4, 4) + res(4, 8) + mid + 2 * 8 + conv(8, 4)
    dec = conv(2, 8) + 2 * res(8, 8) + conv(8, 8) + res(8, 4) + res(4, 4) + mid + 2 * 4 + conv(4, 3)
    assert vae_params(VAEShape((4, 8), 1, 2)) == enc + dec


def test_flux_dev_1024_plan_by_hand():
    p = plan_image("flux-dev", 1024, 1024, available=200 * 10**9)
    weights = 4 * (11_901_408_320 + 123_060_480 + 4_762_310_656 + 83_819_683)      # all float32
    assert p.weights == weights and round(weights / 1e9, 1) == 67.5
    assert p.file_bytes == weights // 2                                             # all bf16 on disk
    assert (p.image_tokens, p.text_tokens) == (64 * 64, 512)                        # (1024/16)^2 + T5 512
    N, D, H = 4096 + 512, 3072, 24
    chunk = (MiB64 // (H * N)) * H * N                       # 151 query rows x 24 heads x 4608 keys
    assert chunk == 151 * 24 * 4608
    assert p.denoiser_activations == 4 * (N * D * 16 + 2 * chunk)                   # ~1.04 GB
    # VAE decode: the im2col of the first 256-channel conv at 1024x1024 (9 taps), float32
    assert p.vae_activations == 4 * 256 * 9 * 1024 * 1024 and round(p.vae_activations / 1e9, 2) == 9.66
    # T5 at 512 tokens: 6 x 4096 + 3 x 10240 values per token, 3 x 64 heads x 512^2 scores
    assert p.text_encoder_activations == 4 * (512 * (6 * 4096 + 3 * 10240) + 3 * 64 * 512**2)
    assert p.activations == p.vae_activations and p.total == weights + p.vae_activations
    assert round(p.total / 1e9, 1) == 77.1
    assert p.fits_spark and p.fits_here


def test_verdicts_against_budgets():
    p = plan_image("flux-dev", available=10**12)
    assert plan_image("flux-dev", available=p.total).fits_here                      # exactly full
    tight = plan_image("flux-dev", available=p.total - 1)
    assert not tight.fits_here and tight.fits_spark
    v = tight.verdict
    assert "\n" not in v and v.startswith("flux-dev (BF16) at 1024x1024, batch 1: needs 77.1 GB "
                                          "(67.5 GB weights + 9.7 GB activations)")
    assert "does not fit here" in v and v.endswith("fits a DGX Spark")
    d = json.loads(json.dumps(tight.to_dict()))                                     # plain data, like Plan's
    assert d["verdict"] == v and d["components"][0]["name"] == "transformer" and d["total"] == p.total
    assert tight.report().splitlines()[-1] == v
    # a 24 GB card: bf16 and Q8_0 with everything resident do not fit; Q4_K with the text encoders
    # freed after encoding does: its peak is encoding (19.5 GB of CLIP-L + T5-XXL in float32 + 0.3 GB),
    # denoising and decoding need 6.7 transformer + 0.3 VAE + 9.7 decode = 16.7 GB
    gpu = 24 * 10**9
    assert not plan_image("flux-dev", weight_format="Q8_0", available=gpu).fits_here
    q4 = plan_image("flux-dev", weight_format="Q4_K", available=gpu, free_text_encoders=True)
    assert q4.fits_here and q4.peak_weights == 4 * (123_060_480 + 4_762_310_656)  # the encoders are the peak
    assert q4.total == q4.peak_weights + q4.text_encoder_activations
    assert "fits here" in q4.verdict and "text encoders freed" in q4.verdict
    # the largest square image that fits is tight: one more step of 64 px does not
    m = p.max_side_spark
    assert m % 64 == 0 and plan_image("flux-dev", m, m, available=SPARK).fits_here
    assert not plan_image("flux-dev", m + 64, m + 64, available=SPARK).fits_here
    assert plan_image("flux-dev", 2048, 2048, available=SPARK).fits_here            # 67.5 + 38.7 GB
    # batch 2 doubles every activation; flux has no CFG, so the denoiser runs 2 rows, not 4
    b2 = plan_image("flux-dev", batch=2, available=gpu)
    assert b2.denoiser_activations == 4 * (2 * 4608 * 3072 * 16 + 2 * (MiB64 // (24 * 4608)) * 24 * 4608)
    assert b2.vae_activations == 2 * p.vae_activations


def test_sd3_and_sdxl_use_classifier_free_guidance():
    p = plan_image("sd3-medium", available=10**12)
    N, H = 4096 + 77 + 256, 24                                     # SD3 attends over CLIP 77 + T5 256 tokens
    chunk = (MiB64 // (H * N)) * H * N
    assert p.text_tokens == 333
    assert p.denoiser_activations == 4 * (2 * N * 1536 * 16 + 2 * chunk)          # 2 rows: prompt + negative
    sd3 = {c.name: c for c in p.components}
    # 2,028,328,000 parameters + the stored 192 x 192 x 1536 sin-cos position table; stored fp16
    assert sd3["transformer"].params == 2_028_328_000 + 192 * 192 * 1536
    assert sd3["transformer"].file_bytes == 2 * (2_028_328_000 + 192 * 192 * 1536)
    assert [c.name for c in p.components] == ["transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"]
    x = plan_image("sdxl-base", available=10**12)
    # UNet at 1024: latents 128x128, 2 rows; per level (320, 16384 px), (640, 4096), (1280, 1024):
    # skips (2+1) x rows x ch x px, im2col peak rows x ch x px x 2 x 9, one head of scores at 64x64
    skips = 3 * 2 * (320 * 16384 + 640 * 4096 + 1280 * 1024)
    peak = 2 * 320 * 16384 * 18
    assert x.denoiser_activations == 4 * (skips + 2 * peak + 4096 * 4096) == 1_797_259_264
    assert x.weights == 4 * (2_567_463_684 + 123_060_480 + 694_659_840 + 83_653_863)


def _write_safetensors(path, tensors: dict):
    from safetensors.numpy import save_file
    save_file(tensors, str(path))


def test_diffusers_folder_sizes_from_headers(tmp_path):
    """A tiny Flux pipeline folder: exact values and bytes from the safetensors headers (shards, the
    fp16 variant, mixed dtypes), architecture numbers from its config.json files."""
    root = tmp_path / "tiny-flux"
    (root / "transformer").mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    (root / "transformer" / "config.json").write_text(json.dumps({
        "num_layers": 1, "num_single_layers": 1, "num_attention_heads": 2, "attention_head_dim": 16,
        "in_channels": 64, "joint_attention_dim": 32, "pooled_projection_dim": 16}))
    _write_safetensors(root / "transformer" / "diffusion_pytorch_model-00001-of-00002.safetensors",
                       {"a": np.zeros((32, 64), np.float16)})
    _write_safetensors(root / "transformer" / "diffusion_pytorch_model-00002-of-00002.safetensors",
                       {"b": np.zeros((32,), np.float32)})
    (root / "text_encoder_2").mkdir()
    (root / "text_encoder_2" / "config.json").write_text(json.dumps({
        "model_type": "t5", "d_model": 8, "d_ff": 12, "num_layers": 1, "num_heads": 2, "d_kv": 4}))
    _write_safetensors(root / "text_encoder_2" / "model.fp16.safetensors", {"e": np.zeros((10, 8), np.float16)})
    (root / "vae").mkdir()
    (root / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [4, 8, 8, 8], "latent_channels": 16}))
    _write_safetensors(root / "vae" / "diffusion_pytorch_model.safetensors", {"w": np.zeros((5, 3), np.float32)})
    _write_safetensors(root / "vae" / "diffusion_pytorch_model.fp16.safetensors", {"w": np.zeros((5, 3), np.float16)})

    p = plan_image(root, 64, 64, available=10**9)
    c = {x.name: x for x in p.components}
    assert list(c) == ["transformer", "text_encoder_2", "vae"]                     # no text_encoder/ folder
    assert (c["transformer"].params, c["transformer"].file_bytes, c["transformer"].format) == \
        (32 * 64 + 32, 2 * 32 * 64 + 4 * 32, "mixed")
    assert c["text_encoder_2"].file_bytes == 2 * 80 and c["text_encoder_2"].resident_bytes == 4 * 80
    assert c["vae"].file_bytes == 4 * 15                                            # the float32 file, not fp16
    assert p.weights == 4 * (32 * 64 + 32 + 80 + 15)
    assert p.image_tokens == 16 and p.text_tokens == 512                           # 64/16 squared; diffusers' 512
    N = 16 + 512                                                                   # width 2 x 16 = 32
    assert p.denoiser_activations == 4 * (N * 32 * 16 + 2 * N * 2 * N)            # every query fits one chunk
    assert p.vae_activations == 4 * max(8 * 9 * 64 * 64, (8 * 8) ** 2)           # block_out_channels[1] = 8,
    #                                                                              8x: 4 levels in vae/config.json
    # the tiny T5 from its config: 512 tokens x (6 x 8 + 3 x 12) + 3 x 2 heads x 512^2
    assert p.text_encoder_activations == 4 * (512 * (6 * 8 + 3 * 12) + 3 * 2 * 512**2)
    assert plan_image(root, 64, 64, available=10**9, upcast=False).weights == p.file_bytes


def test_gguf_transformer_sizes(tmp_path):
    gguf = pytest.importorskip("gguf")
    from gguf import GGMLQuantizationType as QT
    path = tmp_path / "flux1-tiny-Q8_0.gguf"
    w = gguf.GGUFWriter(str(path), "flux")
    w.add_tensor("double_blocks.0.img_attn.qkv.weight",
                 gguf.quants.quantize(np.ones((4, 64), np.float32), QT.Q8_0), raw_dtype=QT.Q8_0)
    w.add_tensor("guidance_in.in_layer.bias", np.zeros(16, np.float32))
    w.add_tensor("img_in.bias", np.zeros(8, np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    p = plan_image(path, available=10**12)
    t = p.components[0]
    assert t.params == 4 * 64 + 16 + 8 and t.format == "Q8_0"
    assert t.file_bytes == 4 * 2 * 34 + 16 * 4 + 8 * 2                    # Q8_0 blocks + F32 + F16
    assert t.resident_bytes == 4 * 2 * 34 + 4 * (16 + 8)                  # blocks kept, the 1-D tensors float32
    # guidance_in is there: FLUX.1-dev's text encoders, VAE and token counts
    assert [c.name for c in p.components] == ["transformer", "text_encoder", "text_encoder_2", "vae"]
    assert p.components[2].params == 4_762_310_656 and p.text_tokens == 512


def test_bad_input_one_line(tmp_path):
    def one_line(exc, fn, *a, **k):
        with pytest.raises(exc) as e:
            fn(*a, **k)
        assert "\n" not in str(e.value)
        return str(e.value)
    assert "flux-dev, flux-schnell" in one_line(FileNotFoundError, plan_image, "flux-pro", available=1)
    assert "unknown weight format 'Q9_9'" in one_line(ValueError, plan_image, "flux-dev", weight_format="Q9_9",
                                                       available=1)
    assert "multiples of 16" in one_line(ValueError, plan_image, "flux-dev", 1000, 1024, available=1)
    assert "multiples of 8" in one_line(ValueError, plan_image, "sdxl-base", 1020, 1024, available=1)
    assert "batch >= 1" in one_line(ValueError, plan_image, "sd3-medium", batch=0, available=1)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    assert "'KandinskyPipeline' is not one" in one_line(ValueError, plan_image, tmp_path, available=1)
    assert "weight_format is for named models" in one_line(ValueError, plan_image, tmp_path, weight_format="Q8_0",
                                                           available=1)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    assert "no transformer/ folder" in one_line(FileNotFoundError, plan_image, tmp_path, available=1)
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "x.safetensors").write_bytes(b"\xff" * 16)
    assert "not a safetensors file" in one_line(ValueError, plan_image, tmp_path, available=1)
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(tmp_path / "llm.gguf"), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert "'llama' is not an image model" in one_line(ValueError, plan_image, tmp_path / "llm.gguf", available=1)


def test_counts_match_diffusers_and_transformers():
    """The planner's counts against the modules diffusers/transformers build from the published configs
    (meta device: nothing is allocated)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")

    def count(m):  # parameters + persistent buffers (SD3's position table) = what the checkpoint stores
        return sum(v.numel() for v in m.state_dict().values())
    flux = dict(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                in_channels=64, joint_attention_dim=4096, pooled_projection_dim=768)
    sd3 = dict(sample_size=128, patch_size=2, in_channels=16, attention_head_dim=64, joint_attention_dim=4096,
               pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
    vae = dict(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
               block_out_channels=[128, 256, 512, 512], layers_per_block=2)
    with torch.device("meta"):
        built = {
            "flux-dev": diffusers.FluxTransformer2DModel(**flux, guidance_embeds=True),
            "flux-schnell": diffusers.FluxTransformer2DModel(**flux, guidance_embeds=False),
            "sd3-medium": diffusers.SD3Transformer2DModel(**sd3, num_layers=24, num_attention_heads=24,
                                                          caption_projection_dim=1536),
            "sd3.5-large": diffusers.SD3Transformer2DModel(**sd3, num_layers=38, num_attention_heads=38,
                                                           caption_projection_dim=2432, qk_norm="rms_norm"),
            "sdxl-base": diffusers.UNet2DConditionModel(
                sample_size=128, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                block_out_channels=[320, 640, 1280], layers_per_block=2, attention_head_dim=[5, 10, 20],
                cross_attention_dim=2048, transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816),
        }
        for name, m in built.items():
            assert known_image_shape(name).components[0].params == count(m), name
        assert vae_params(VAEShape()) == count(diffusers.AutoencoderKL(
            **vae, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False))
        assert vae_params(VAEShape(latent_channels=4, quant_convs=True)) == count(diffusers.AutoencoderKL(
            **vae, latent_channels=4))
        assert vae_params(VAEShape((4, 8), 1, 2)) == count(diffusers.AutoencoderKL(
            down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
            block_out_channels=[4, 8], layers_per_block=1, latent_channels=2, norm_num_groups=4,
            use_quant_conv=False, use_post_quant_conv=False))
        L = transformers.CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, projection_dim=768)
        G = transformers.CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                        num_attention_heads=20, projection_dim=1280)
        t5 = transformers.T5Config(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                   feed_forward_proj="gated-gelu")
        for key, m in [("clip-l", transformers.CLIPTextModel(L)),
                       ("clip-l-proj", transformers.CLIPTextModelWithProjection(L)),
                       ("clip-g", transformers.CLIPTextModelWithProjection(G)),
                       ("t5-xxl", transformers.T5EncoderModel(t5))]:
            assert text_encoder_params(TEXT_ENCODERS[key]) == sum(p.numel() for p in m.parameters()), key


def test_plan_command_for_image_models(capsys):
    from spark_lab.cli import main
    assert main(["plan", "flux-dev", "--size", "1024x1024", "--format", "Q8_0", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["width"], d["height"]) == (1024, 1024)
    assert d["fits_spark"] is True
    assert main(["plan", "flux-dev", "--size", "1024"]) == 1
    assert "--size '1024': expected WIDTHxHEIGHT" in capsys.readouterr().err
