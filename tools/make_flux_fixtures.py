"""Build the tiny random Flux transformer and its reference outputs under tests/fixtures/diffusion/tiny-flux/.

Dev-only (needs torch and diffusers; spark_lab never imports this). Writes:

    tiny-flux/transformer/   FluxTransformer2DModel.save_pretrained (float32): patch_size 1, in_channels 16
                             (4 latent channels packed 2x2), 1 double-stream + 2 single-stream blocks,
                             2 heads of 16, joint_attention_dim 32, pooled_projection_dim 32,
                             guidance_embeds, axes_dims_rope (4, 6, 6)
    tiny-flux/reference.npz  inputs and diffusers outputs:
        fwd_*   a FluxPipeline-shaped call: B=2, 8x8 latents packed to 16 tokens, 5 text tokens,
                img_ids from _prepare_latent_image_ids, zero txt_ids, per-item timestep and guidance
        ids_*   the same model with random integer ids on all three RoPE axes, B=1
        pack_*  FluxPipeline._pack_latents / _unpack_latents / _prepare_latent_image_ids on random latents

    python tools/make_flux_fixtures.py [--out tests/fixtures/diffusion/tiny-flux]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

TINY = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6))


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter ~ N(0, 0.1^2), norm scales included (their default 1.0 would hide a missing
    norm weight). Much larger weights make the net ill-conditioned in float32: the timestep
    sinusoid at 1000 t turns NumPy's and torch's 1-ulp differences in exp() into ~6e-5 changes
    that 0.2-sized weights amplified to ~1e-4 of the output (torch float32 vs float64: 5e-7)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def run(model, x, ctx, pooled, t, img_ids, txt_ids, guidance=None) -> np.ndarray:
    f = torch.from_numpy
    with torch.no_grad():
        out = model(hidden_states=f(x), encoder_hidden_states=f(ctx), pooled_projections=f(pooled),
                    timestep=f(t), img_ids=f(img_ids), txt_ids=f(txt_ids),
                    guidance=None if guidance is None else f(guidance)).sample
    return out.numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="tests/fixtures/diffusion/tiny-flux")
    args = ap.parse_args()
    out = Path(args.out)
    from diffusers import FluxPipeline, FluxTransformer2DModel

    model = FluxTransformer2DModel(**TINY).eval()
    randomize(model, 0)
    model.save_pretrained(out / "transformer", safe_serialization=True)

    rng = np.random.default_rng(0)
    ref = {}
    # ---- a pipeline-shaped call: 2 images of 8x8 latents (4 channels), 5 text tokens
    latents = rng.standard_normal((2, 4, 8, 8), dtype=np.float32)
    packed = FluxPipeline._pack_latents(torch.from_numpy(latents), 2, 4, 8, 8).numpy()        # [2, 16, 16]
    img_ids = FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32).numpy()  # [16, 3]
    ref.update(fwd_x=packed, fwd_ctx=rng.standard_normal((2, 5, 32), dtype=np.float32),
               fwd_pooled=rng.standard_normal((2, 32), dtype=np.float32),
               fwd_t=np.array([0.7, 0.25], np.float32), fwd_guidance=np.array([3.5, 1.0], np.float32),
               fwd_img_ids=img_ids, fwd_txt_ids=np.zeros((5, 3), np.float32))
    ref["fwd_out"] = run(model, ref["fwd_x"], ref["fwd_ctx"], ref["fwd_pooled"], ref["fwd_t"], ref["fwd_img_ids"],
                         ref["fwd_txt_ids"], ref["fwd_guidance"])
    # ---- every RoPE axis in use: random integer ids, one image
    ref.update(ids_x=rng.standard_normal((1, 6, 16), dtype=np.float32),
               ids_ctx=rng.standard_normal((1, 3, 32), dtype=np.float32),
               ids_pooled=rng.standard_normal((1, 32), dtype=np.float32),
               ids_t=np.array([0.9], np.float32), ids_guidance=np.array([5.0], np.float32),
               ids_img_ids=rng.integers(0, 9, (6, 3)).astype(np.float32),
               ids_txt_ids=rng.integers(0, 9, (3, 3)).astype(np.float32))
    ref["ids_out"] = run(model, ref["ids_x"], ref["ids_ctx"], ref["ids_pooled"], ref["ids_t"], ref["ids_img_ids"],
                         ref["ids_txt_ids"], ref["ids_guidance"])
    # ---- the pipeline's pure helpers: 2 latents of 4 x 6 x 10 (an 48x80 image at vae_scale_factor 8)
    lat = rng.standard_normal((2, 4, 6, 10), dtype=np.float32)
    ref["pack_latents"] = lat
    ref["pack_packed"] = FluxPipeline._pack_latents(torch.from_numpy(lat), 2, 4, 6, 10).numpy()
    ref["pack_unpacked"] = FluxPipeline._unpack_latents(torch.from_numpy(ref["pack_packed"]), 48, 80, 8).numpy()
    ref["pack_ids"] = FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32).numpy()
    np.savez_compressed(out / "reference.npz", **ref)
    for f in out.rglob("*"):
        if f.is_file():
            f.chmod(0o644)                 # safetensors writes 0600; the other fixtures are 0644
    print(f"wrote {out}: {sum(p.numel() for p in model.parameters())} parameters, "
          f"{len(ref)} reference arrays")


if __name__ == "__main__":
    main()
