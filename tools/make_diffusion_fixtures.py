"""Build the tiny random diffusion models and reference outputs under tests/fixtures/diffusion/.

Dev-only (needs torch, diffusers, transformers; spark_lab never imports this). Writes:

    tiny-sd/          a StableDiffusionPipeline folder (save_pretrained): unet/ (cross-attention),
                      vae/, text_encoder/ (CLIPTextModel), tokenizer/ (vocab.json + merges.txt),
                      scheduler/ (DDIM), model_index.json
    tiny-pixel/       a spark-emoji-shaped folder: pixel-space UNet2DConditionModel (3 channels,
                      linear projections, fp16 variant only) + DDPM scheduler config
    tiny-unet2d/      UNet2DModel with class labels (AttnDownBlock2D / AttnUpBlock2D)
    reference.npz     inputs and diffusers/transformers outputs for each model and the pipeline

    python tools/make_diffusion_fixtures.py [--out tests/fixtures/diffusion]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

WORDS = ["a", "photo", "of", "the", "cat", "dog", "red", "blue", "smiling", "face", "emoji", "happy"]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level alphabet: printable bytes map to themselves, the rest above 255."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


def write_tiny_clip_tokenizer(folder: Path, max_length: int) -> None:
    """vocab.json + merges.txt in CLIP's format: byte symbols, the same with '</w>', a few merged words."""
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = list(bytes_to_unicode().values())
    vocab = alphabet + [a + "</w>" for a in alphabet]
    merges = []
    for w in WORDS:
        syms = list(w[:-1]) + [w[-1] + "</w>"]
        while len(syms) > 1:                      # merge left to right: ((c a) t</w>)
            pair = (syms[0], syms[1])
            if " ".join(pair) not in merges:
                merges.append(" ".join(pair))
                vocab.append(pair[0] + pair[1])
            syms = [pair[0] + pair[1]] + syms[2:]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    vocab = list(dict.fromkeys(vocab))
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    from transformers import CLIPTokenizer
    tok = CLIPTokenizer.from_pretrained(str(folder), model_max_length=max_length)
    tok.save_pretrained(str(folder))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="tests/fixtures/diffusion")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel, UNet2DModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    ref = {}
    L = 12  # tokenizer max length = CLIP positions

    # ---- tiny Stable Diffusion: UNet (latent, cross-attention), VAE, CLIP text encoder
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
        norm_num_groups=4, layers_per_block=1, sample_size=16).eval()
    write_tiny_clip_tokenizer(out / "tmp-tokenizer", L)
    tokenizer = CLIPTokenizer.from_pretrained(str(out / "tmp-tokenizer"))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        hidden_size=16, intermediate_size=24, num_attention_heads=2, num_hidden_layers=2,
        vocab_size=len(tokenizer), max_position_embeddings=L, layer_norm_eps=1e-5)).eval()
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(out / "tiny-sd"))
    import shutil
    for name in ("vocab.json", "merges.txt"):   # the files SD repos ship, next to tokenizer.json
        shutil.copy(out / "tmp-tokenizer" / name, out / "tiny-sd" / "tokenizer" / name)
    shutil.rmtree(out / "tmp-tokenizer")

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        x = torch.randn(2, 4, 8, 8, generator=g)
        ehs = torch.randn(2, L, 16, generator=g)
        t = torch.tensor([999, 10])
        ref["unet_cond_in"] = x.numpy(); ref["unet_cond_ehs"] = ehs.numpy(); ref["unet_cond_t"] = t.numpy()
        ref["unet_cond_out"] = unet(x, t, encoder_hidden_states=ehs).sample.numpy()
        x7 = torch.randn(1, 4, 7, 6, generator=g)     # odd size: upsample to the skip's size
        ref["unet_cond_odd_in"] = x7.numpy()
        ref["unet_cond_odd_out"] = unet(x7, 500, encoder_hidden_states=ehs[:1]).sample.numpy()

        img = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
        dist = vae.encode(img).latent_dist
        ref["vae_in"] = img.numpy(); ref["vae_mean"] = dist.mean.numpy(); ref["vae_std"] = dist.std.numpy()
        z = torch.randn(2, 4, 8, 8, generator=g)
        ref["vae_z"] = z.numpy(); ref["vae_decoded"] = vae.decode(z).sample.numpy()

        prompts = ["a photo of a cat", "Happy  DOG, smiling face!", ""]
        ids = tokenizer(prompts, padding="max_length", max_length=L, truncation=True, return_tensors="pt").input_ids
        ref["clip_ids"] = ids.numpy()
        enc = text_encoder(ids)
        ref["clip_hidden"] = enc.last_hidden_state.numpy(); ref["clip_pooled"] = enc.pooler_output.numpy()
        long_ids = tokenizer(["a photo of the red cat " * 4], padding="max_length", max_length=L, truncation=True,
                             return_tensors="pt").input_ids
        ref["clip_long_ids"] = long_ids.numpy()

        # the whole pipeline: given initial latents, DDIM 3 steps, guidance 7.5
        lat = torch.randn(2, 4, 8, 8, generator=g)
        ref["pipe_latents"] = lat.numpy()
        ref["pipe_images"] = pipe(["a photo of a cat", "a red dog"], num_inference_steps=3, guidance_scale=7.5,
                                  latents=lat.clone(), output_type="np").images

    # ---- spark-emoji-shaped: pixel space, one sentence-embedding token, fp16 variant
    pix = UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=384, attention_head_dim=4, norm_num_groups=4,
        use_linear_projection=True).eval()
    pd = out / "tiny-pixel"
    pix.half().save_pretrained(str(pd / "unet"), variant="fp16")
    pix = pix.float()
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True).save_pretrained(
        str(pd / "scheduler"))
    (pd / "model_index.json").write_text(json.dumps({
        "_class_name": "TextToImagePipeline", "_spark_lab_text_encoder": "all-minilm-l6-v2",
        "unet": ["diffusers", "UNet2DConditionModel"], "scheduler": ["diffusers", "DDPMScheduler"]}, indent=2))
    with torch.no_grad():
        x = torch.randn(2, 3, 8, 8, generator=g)
        ehs = torch.randn(2, 1, 384, generator=g)
        ref["pix_in"] = x.numpy(); ref["pix_ehs"] = ehs.numpy()
        ref["pix_out"] = pix(x, 250, encoder_hidden_states=ehs).sample.numpy()

    # ---- class-conditional UNet2DModel
    u2 = UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=4, norm_num_groups=4, num_class_embeds=5).eval()
    u2.save_pretrained(str(out / "tiny-unet2d"))
    with torch.no_grad():
        x = torch.randn(2, 3, 8, 8, generator=g)
        ref["u2_in"] = x.numpy(); ref["u2_labels"] = np.array([1, 4])
        ref["u2_out"] = u2(x, torch.tensor([3, 700]), class_labels=torch.tensor([1, 4])).sample.numpy()

    # ---- scheduler loops (the same cases tests/diffusion/test_schedulers.py runs live)
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from diffusion.scheduler_cases import CASES
    from diffusion.test_schedulers import diffusers_reference
    for case in CASES:
        ts, sigma, final = diffusers_reference(*case)
        ref[f"sched_{case[0]}_ts"], ref[f"sched_{case[0]}_sigma"], ref[f"sched_{case[0]}_out"] = ts, sigma, final

    np.savez_compressed(out / "reference.npz", **{k: np.asarray(v) for k, v in ref.items()})
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
