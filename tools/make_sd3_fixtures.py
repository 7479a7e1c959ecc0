"""Build the tiny random SD3 models and reference outputs under tests/fixtures/diffusion/tiny-sd3/.

Dev-only (needs torch and diffusers; spark_lab never imports this). Writes, with save_pretrained:

    transformer/       SD3Transformer2DModel: patch 2, 2 layers, 2 heads x 8, 16 latent channels,
                       sample_size 16, joint_attention_dim 32, caption/pooled dims 16/32,
                       pos_embed_max_size 12 (a small position table, so cropping is exercised)
    transformer-sd35/  the same with qk_norm="rms_norm" and dual attention in block 0 (SD3.5-medium)
    vae/               AutoencoderKL with 16 latent channels, no quant convs, shift_factor (SD3 / Flux)
    scheduler/         FlowMatchEulerDiscreteScheduler(shift=3.0), as SD3 ships it
    reference.npz      inputs and diffusers outputs for each model, and the flow-match scheduler
                       cases of tests/diffusion/test_flow_match.py

Norm weights that diffusers initialises to ones (RMSNorm) are randomised so the test sees them.

    python tools/make_sd3_fixtures.py [--out tests/fixtures/diffusion/tiny-sd3]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

TINY = dict(sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32, out_channels=16,
            pos_embed_max_size=12)


def randomise_constant_params(model: torch.nn.Module, g: torch.Generator) -> None:
    """Parameters that start as all ones or all zeros (norm weights, biases) get random values."""
    with torch.no_grad():
        for p in model.parameters():
            if torch.all(p == p.flatten()[0]):
                p.copy_(p + 0.2 * torch.randn(p.shape, generator=g))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="tests/fixtures/diffusion/tiny-sd3")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    ref = {}

    sd3 = SD3Transformer2DModel(**TINY).eval()
    sd35 = SD3Transformer2DModel(**TINY, qk_norm="rms_norm", dual_attention_layers=(0,)).eval()
    for m in (sd3, sd35):
        randomise_constant_params(m, g)
    sd3.save_pretrained(str(out / "transformer"))
    sd35.save_pretrained(str(out / "transformer-sd35"))

    with torch.no_grad():
        x = torch.randn(2, 16, 8, 8, generator=g)
        ctx = torch.randn(2, 5, 32, generator=g)
        pooled = torch.randn(2, 32, generator=g)
        t = torch.tensor([1000.0, 312.5])
        ref.update(x=x.numpy(), ctx=ctx.numpy(), pooled=pooled.numpy(), t=t.numpy())
        ref["sd3_out"] = sd3(x, ctx, pooled, t).sample.numpy()
        ref["sd35_out"] = sd35(x, ctx, pooled, t).sample.numpy()
        # a non-square latent: a different crop of the position table, one timestep for the batch
        xr = torch.randn(1, 16, 6, 10, generator=g)
        ref["rect_x"] = xr.numpy()
        ref["sd3_rect_out"] = sd3(xr, ctx[:1], pooled[:1], torch.tensor([500.0])).sample.numpy()
        ref["sd35_rect_out"] = sd35(xr, ctx[:1], pooled[:1], torch.tensor([500.0])).sample.numpy()
        ref["sd3_skip_out"] = sd3(x, ctx, pooled, t, skip_layers=[0]).sample.numpy()
        ref["sd3_pos_table"] = sd3.pos_embed.pos_embed.numpy()

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=16,
        norm_num_groups=4, layers_per_block=1, sample_size=16, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=1.5305, shift_factor=0.0609).eval()
    randomise_constant_params(vae, g)
    vae.save_pretrained(str(out / "vae"))
    with torch.no_grad():
        img = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
        dist = vae.encode(img).latent_dist
        ref.update(vae_in=img.numpy(), vae_mean=dist.mean.numpy(), vae_std=dist.std.numpy())
        z = torch.randn(2, 16, 8, 8, generator=g)
        ref.update(vae_z=z.numpy(), vae_decoded=vae.decode(z).sample.numpy())

    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(str(out / "scheduler"))

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from diffusion.test_flow_match import CASES, diffusers_reference
    for case in CASES:
        ref[f"flow_{case[0]}_ts"], ref[f"flow_{case[0]}_sigmas"], ref[f"flow_{case[0]}_out"] = diffusers_reference(case)

    np.savez_compressed(out / "reference.npz", **{k: np.asarray(v) for k, v in ref.items()})
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({total / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
