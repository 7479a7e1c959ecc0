"""`spark-lab bench imagine`: seconds per image, spark_lab vs diffusers (torch CPU), same weights.

Both sides run the same thing: one 32x32 image, DDIM, classifier-free guidance with the two
halves batched into one UNet call, the same conditioning tensor (the text encoder is left out:
it runs once per prompt, the UNet once per step), the same initial noise, the same thread count.
The model is spark-emoji when it is installed, else a random UNet with its configuration.
ratio = diffusers seconds / spark_lab seconds (> 1: spark_lab is faster), in wall time and in
CPU time (time.process_time: on a shared, busy machine the steadier of the two). The two images
are compared too, so a fast wrong answer cannot pass.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from ..device import get_device, num_threads, set_threads, synchronize

# spark-emoji's shape (tools/train_spark_emoji.py defaults), for when the model is not installed
EMOJI_UNET = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(64, 128, 128), layers_per_block=1,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  cross_attention_dim=384, attention_head_dim=32, norm_num_groups=32)
SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True,
                 set_alpha_to_one=False, timestep_spacing="trailing")


def _model_folder(name: str | None, tmp: Path) -> tuple[Path, str]:
    from ..models import is_present, resolve
    if name is not None:
        return resolve(name, kind="diffusion"), str(name)
    if is_present("spark-emoji"):
        return resolve("spark-emoji", kind="diffusion"), "spark-emoji"
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel
    torch.manual_seed(0)
    UNet2DConditionModel(**EMOJI_UNET).save_pretrained(tmp / "unet")
    DDIMScheduler(**SCHEDULER).save_pretrained(tmp / "scheduler")
    (tmp / "model_index.json").write_text(json.dumps({"_class_name": "TextToImagePipeline",
                                                      "_spark_lab_text_encoder": "all-minilm-l6-v2",
                                                      "unet": ["diffusers", "UNet2DConditionModel"],
                                                      "scheduler": ["diffusers", "DDIMScheduler"]}))
    return tmp, "random UNet with spark-emoji's config (spark-emoji not installed)"


def spark_lab_runner(folder: Path, cond, noise, steps: int, guidance: float):
    """-> a function that makes the image(s) with spark_lab and returns them [N, H, W, 3]."""
    from ..diffusion import TextToImagePipeline
    pipe = TextToImagePipeline.from_pretrained(folder, scheduler="ddim")
    kw = dict(num_inference_steps=steps, guidance_scale=guidance, latents=noise, prompt_embeds=cond,
              negative_prompt_embeds=np.zeros_like(cond), output_type="np", progress=False)
    pipe(**dict(kw, num_inference_steps=1))                        # warm-up

    def run():
        img = pipe(**kw)
        synchronize()
        return img
    return run


def diffusers_runner(folder: Path, cond, noise, steps: int, guidance: float, threads: int):
    """-> the same with diffusers' UNet and DDIMScheduler on torch (CPU), the loop written as in the pipeline."""
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel
    torch.set_num_threads(threads)
    fp16_only = not (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32,
                                                variant="fp16" if fp16_only else None).eval()
    sched = DDIMScheduler.from_pretrained(folder / "scheduler")
    c = torch.from_numpy(cond)
    ctx = torch.cat([torch.zeros_like(c), c])

    @torch.inference_mode()
    def run(n=steps):
        sched.set_timesteps(n)
        x = torch.from_numpy(noise)
        for t in sched.timesteps:
            u, k = unet(torch.cat([x, x]), t, encoder_hidden_states=ctx).sample.chunk(2)
            x = sched.step(u + guidance * (k - u), t, x).prev_sample
        return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()

    run(1)                                                        # warm-up
    return run


def timed(fn):
    """-> (wall seconds, CPU seconds of this process, fn's result)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


def main(args) -> int:
    threads = args.threads or int(os.environ.get("SPARK_LAB_THREADS", "0") or 0) or num_threads()
    set_threads(threads)
    quick = bool(getattr(args, "quick", False))
    steps = 4 if quick else 25
    repeats = 1 if quick else max(1, int(getattr(args, "repeats", 3) or 3))
    guidance = 4.0
    with tempfile.TemporaryDirectory() as tmp:
        try:
            folder, label = _model_folder(getattr(args, "model", None), Path(tmp))
        except ImportError:
            raise ValueError("bench imagine needs spark-emoji installed, or torch + diffusers to build a "
                             "stand-in UNet") from None
        from ..diffusion import UNet2DConditionModel
        cfg = UNet2DConditionModel.from_pretrained(folder / "unet").config
        size, ctx_dim = cfg.sample_size or 32, cfg.cross_attention_dim
        rng = np.random.default_rng(0)
        cond = rng.standard_normal((1, 1, ctx_dim), dtype=np.float32)
        cond /= np.linalg.norm(cond)
        noise = rng.standard_normal((1, cfg.in_channels, size, size), dtype=np.float32)
        ours_fn = spark_lab_runner(folder, cond, noise, steps, guidance)
        try:
            theirs_fn = diffusers_runner(folder, cond, noise, steps, guidance, threads)
        except ImportError:
            theirs_fn = None
        # alternate the two, best of `repeats` each: a busy machine slows both alike
        ours = theirs = ours_cpu = theirs_cpu = float("inf")
        for _ in range(repeats):
            dt, dc, img_ours = timed(ours_fn)
            ours, ours_cpu = min(ours, dt), min(ours_cpu, dc)
            if theirs_fn is not None:
                dt, dc, img_theirs = timed(theirs_fn)
                theirs, theirs_cpu = min(theirs, dt), min(theirs_cpu, dc)
        n = noise.shape[0]
        row = {"benchmark": "imagine", "model": label, "device": get_device().kind, "threads": threads,
               "steps": steps, "guidance": guidance, "image": f"{size}x{size}",
               "spark_lab_s_per_image": round(ours / n, 4), "spark_lab_cpu_s_per_image": round(ours_cpu / n, 4)}
        if theirs_fn is not None:
            row.update({"diffusers_s_per_image": round(theirs / n, 4), "ratio": round(theirs / ours, 3),
                        "diffusers_cpu_s_per_image": round(theirs_cpu / n, 4),
                        "cpu_ratio": round(theirs_cpu / max(ours_cpu, 1e-9), 3),
                        "max_abs_diff": float(np.abs(img_ours - img_theirs).max())})
        else:
            row["diffusers_s_per_image"] = None
            row["note"] = "torch/diffusers not installed: no comparison"
    if getattr(args, "json", False):
        print(json.dumps(row))
    else:
        print(f"imagine  {row['model']}, {row['image']}, {steps} DDIM steps, CFG {guidance}, "
              f"{threads} thread(s), {row['device']}")
        print(f"  spark_lab  {row['spark_lab_s_per_image']:.3f} s/image wall, {row['spark_lab_cpu_s_per_image']:.3f} s CPU")
        if row.get("diffusers_s_per_image") is not None:
            print(f"  diffusers  {row['diffusers_s_per_image']:.3f} s/image wall, "
                  f"{row['diffusers_cpu_s_per_image']:.3f} s CPU (torch CPU)")
            print(f"  ratio      {row['ratio']:.2f}x wall, {row['cpu_ratio']:.2f}x CPU "
                  "(diffusers / spark_lab; >= 1 means spark_lab is as fast or faster)")
            print(f"  images differ by at most {row['max_abs_diff']:.2e}")
        else:
            print(f"  {row['note']}")
    return 0
