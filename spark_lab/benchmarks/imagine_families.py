"""The Flux and SDXL rows of `spark-lab bench imagine`: the denoising loop, spark_lab vs diffusers (torch CPU).

Each row builds a small random model with diffusers at run time (save_pretrained into a temp folder,
loaded by spark_lab from that folder), then both sides run the same loop from the same starting
latents, the same conditioning tensors and the same scheduler config, at the same thread count:

  flux   FluxTransformer2DModel, FLUX.1-dev style (guidance embedding, no CFG), 32x32 latents of 16
         channels packed 2x2 into 256 tokens + 32 text tokens; FlowMatchEulerDiscreteScheduler with
         sigmas linspace(1, 1/n, n) shifted by mu = calculate_shift(256) (diffusers' FluxPipeline)
  sdxl   UNet2DConditionModel with text_time conditioning (pooled text + 6 size/crop ids), 2 levels,
         64x64 latents, 77 text tokens; EulerDiscreteScheduler with SDXL's config, classifier-free
         guidance with both halves in one UNet call (diffusers' StableDiffusionXLPipeline)

Text encoders and the VAE are left out (they run once per image; the denoiser runs every step).
Each side returns the final latents, and the two are compared, so a fast wrong answer cannot pass.
"""
from __future__ import annotations

import numpy as np

from ..device import synchronize, to_host

# ---------------------------------------------------------------------------- sizes

# FLUX.1 has 19 double + 38 single blocks of 24 heads x 128 (width 3072); this keeps its shape at
# 2 + 4 blocks of 12 heads x 64 (width 768): 82M parameters, ~0.4 s per step on one core.
FLUX = dict(model=dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=64,
                       num_attention_heads=12, joint_attention_dim=256, pooled_projection_dim=128,
                       guidance_embeds=True, axes_dims_rope=(8, 28, 28)),
            latent=(16, 32, 32), text_tokens=32, steps=8, guidance=3.5)
FLUX_QUICK = dict(model=dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                             guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
                  latent=(4, 8, 8), text_tokens=5, steps=2, guidance=3.5)
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096)           # FLUX.1-dev's scheduler config

# SDXL's UNet is 3 levels (320, 640, 1280) with heads of 64 and 2 or 10 transformer layers; this is
# 2 levels (64, 128), heads of 64, 2 transformer layers at the attention level, 64x64 latents (8.3M
# parameters, ~0.8 s per step with CFG on one core).
SDXL = dict(model=dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(64, 128), layers_per_block=2,
                       down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(1, 2),
                       use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=32,
                       transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=128 + 6 * 32,
                       cross_attention_dim=256, norm_num_groups=32),
            pooled=128, latent=(4, 64, 64), text_tokens=77, steps=8, guidance=5.0)
SDXL_QUICK = dict(model=dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                             layers_per_block=1,
                             down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                             up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                             use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                             transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=16 + 6 * 8,
                             cross_attention_dim=32, norm_num_groups=4),
                  pooled=16, latent=(4, 8, 8), text_tokens=12, steps=2, guidance=5.0)
SDXL_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      timestep_spacing="leading", steps_offset=1)               # SDXL base's scheduler config


SIZES = {"flux": {"full": FLUX, "quick": FLUX_QUICK}, "sdxl": {"full": SDXL, "quick": SDXL_QUICK}}
SCHEDULER_NAMES = {"flux": "flow-match Euler", "sdxl": "Euler"}


def flux_seq_len(size: dict) -> int:
    _, h, w = size["latent"]
    return (h // 2) * (w // 2)


def describe(family: str, size: dict) -> str:
    m = size["model"]
    if family == "flux":
        return (f"random Flux transformer, {m['num_layers']} double + {m['num_single_layers']} single blocks, "
                f"{m['num_attention_heads']} heads x {m['attention_head_dim']}, {flux_seq_len(size)} image + "
                f"{size['text_tokens']} text tokens")
    return (f"random SDXL UNet (text_time), channels {tuple(m['block_out_channels'])}, "
            f"{size['text_tokens']} text tokens, CFG batched")


# ---------------------------------------------------------------------------- the models and inputs

def build(family: str, size: dict, folder) -> dict:
    """Save a random diffusers model of `family` under folder/denoiser (+ folder/scheduler) and
    return the loop's inputs (host float32 arrays, fixed seed)."""
    import torch
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    C, h, w = size["latent"]
    T = size["text_tokens"]
    if family == "flux":
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        m = size["model"]
        FluxTransformer2DModel(**m).save_pretrained(folder / "denoiser")
        FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER).save_pretrained(folder / "scheduler")
        from ..diffusion.flux import latent_image_ids, pack_latents
        noise = rng.standard_normal((1, C, h, w), dtype=np.float32)
        return dict(latents=np.ascontiguousarray(pack_latents(noise)),                     # [1, N, 4C]
                    context=rng.standard_normal((1, T, m["joint_attention_dim"]), dtype=np.float32),
                    pooled=rng.standard_normal((1, m["pooled_projection_dim"]), dtype=np.float32),
                    img_ids=latent_image_ids(h // 2, w // 2), txt_ids=np.zeros((T, 3), np.float32))
    if family == "sdxl":
        from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
        m = size["model"]
        UNet2DConditionModel(**m).save_pretrained(folder / "denoiser")
        EulerDiscreteScheduler(**SDXL_SCHEDULER).save_pretrained(folder / "scheduler")
        ctx = rng.standard_normal((1, T, m["cross_attention_dim"]), dtype=np.float32)
        pooled = rng.standard_normal((1, size["pooled"]), dtype=np.float32)
        ids = np.array([[h * 8, w * 8, 0, 0, h * 8, w * 8]], np.float32)                    # original, crop, target
        return dict(latents=rng.standard_normal((1, C, h, w), dtype=np.float32),
                    # the unconditional half first, zeros as SDXL's force_zeros_for_empty_prompt
                    context=np.concatenate([np.zeros_like(ctx), ctx]),                    # [2, T, D]
                    text_embeds=np.concatenate([np.zeros_like(pooled), pooled]),          # [2, P]
                    time_ids=np.concatenate([ids, ids]))                                    # [2, 6]
    raise ValueError(f"bench imagine: no family {family!r} (flux, sdxl)")


# ---------------------------------------------------------------------------- spark_lab's side

def spark_runner(family: str, folder, inp: dict, steps: int, guidance: float):
    """-> run() making the final latents with spark_lab (host float32), warmed up once."""
    from ..device import to_device
    from ..diffusion import calculate_shift
    from ..diffusion.schedulers import load_scheduler
    sched = load_scheduler(folder / "scheduler")
    if family == "flux":
        from ..diffusion import FluxTransformer2DModel
        model = FluxTransformer2DModel.from_pretrained(folder / "denoiser")
        ctx, pooled = to_device(inp["context"]), to_device(inp["pooled"])
        mu = calculate_shift(inp["latents"].shape[1], FLUX_SCHEDULER["base_image_seq_len"],
                             FLUX_SCHEDULER["max_image_seq_len"], FLUX_SCHEDULER["base_shift"],
                             FLUX_SCHEDULER["max_shift"])
        g = np.full((1,), guidance, np.float32)

        def run(n=steps):
            sched.set_timesteps(n, sigmas=np.linspace(1.0, 1.0 / n, n), mu=mu)
            x = to_device(inp["latents"])                                               # [1, N, 4C]
            for t in sched.timesteps:
                v = model(x, ctx, pooled, float(t) / 1000.0, inp["img_ids"], inp["txt_ids"], guidance=g)
                x = sched.step(v, t, x).prev_sample
            synchronize()
            return to_host(x)
    else:
        from ..diffusion import UNet2DConditionModel
        model = UNet2DConditionModel.from_pretrained(folder / "denoiser")
        ctx = to_device(inp["context"])
        added = {"text_embeds": to_device(inp["text_embeds"]), "time_ids": inp["time_ids"]}

        def run(n=steps):
            sched.set_timesteps(n)
            x = to_device(inp["latents"]) * float(sched.init_noise_sigma)               # [1, 4, h, w]
            for t in sched.timesteps:
                out = model(sched.scale_model_input(x, t), t, ctx, repeat=2, added_cond_kwargs=added)
                u, c = out[:1], out[1:]                                                  # [1, 4, h, w] each
                x = sched.step(u + guidance * (c - u), t, x).prev_sample
            synchronize()
            return to_host(x)
    run(1)                                                                              # warm-up
    return run


# ---------------------------------------------------------------------------- diffusers' side

def diffusers_runner(family: str, folder, inp: dict, steps: int, guidance: float):
    """-> run() making the same latents with diffusers on torch (CPU), the loop as in its pipeline."""
    import torch
    f = torch.from_numpy
    if family == "flux":
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift
        model = FluxTransformer2DModel.from_pretrained(folder / "denoiser").eval()
        sched = FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler")
        c = sched.config
        mu = calculate_shift(inp["latents"].shape[1], c.base_image_seq_len, c.max_image_seq_len, c.base_shift,
                             c.max_shift)
        ctx, pooled = f(inp["context"]), f(inp["pooled"])
        img_ids, txt_ids = f(inp["img_ids"]), f(inp["txt_ids"])
        g = torch.full([1], guidance, dtype=torch.float32)

        @torch.inference_mode()
        def run(n=steps):
            sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / n, n), mu=mu)
            x = f(inp["latents"])
            for t in sched.timesteps:
                v = model(hidden_states=x, timestep=t.expand(1).to(x.dtype) / 1000, guidance=g,
                          pooled_projections=pooled, encoder_hidden_states=ctx, txt_ids=txt_ids,
                          img_ids=img_ids, return_dict=False)[0]
                x = sched.step(v, t, x, return_dict=False)[0]
            return x.numpy()
    else:
        from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
        model = UNet2DConditionModel.from_pretrained(folder / "denoiser").eval()
        sched = EulerDiscreteScheduler.from_pretrained(folder / "scheduler")
        ctx = f(inp["context"])
        added = {"text_embeds": f(inp["text_embeds"]), "time_ids": f(inp["time_ids"])}

        @torch.inference_mode()
        def run(n=steps):
            sched.set_timesteps(n)
            x = f(inp["latents"]) * sched.init_noise_sigma
            for t in sched.timesteps:
                xin = sched.scale_model_input(torch.cat([x, x]), t)
                u, c = model(xin, t, encoder_hidden_states=ctx, added_cond_kwargs=added,
                             return_dict=False)[0].chunk(2)
                x = sched.step(u + guidance * (c - u), t, x, return_dict=False)[0]
            return x.numpy()
    run(1)                                                                              # warm-up
    return run
