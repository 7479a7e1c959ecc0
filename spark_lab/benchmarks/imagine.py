"""`spark-lab bench imagine`: seconds per image, spark_lab vs diffusers (torch CPU), same weights.

Three rows, each timing the denoising loop on both sides from the same starting noise, the same
conditioning tensors (text encoders are left out: they run once per prompt, the denoiser once per
step), the same scheduler config and the same thread count:

  emoji  spark-emoji's pixel-space UNet through spark_lab's TextToImagePipeline (a random UNet with
         its configuration when it is not installed, or the diffusers folder given with --model):
         one 32x32 image, DDIM, classifier-free guidance with both halves in one UNet call
  flux   a small random FLUX.1-dev-style transformer (guidance embedding, flow-matching Euler)
  sdxl   a small random SDXL UNet (text_time conditioning, Euler, CFG batched)
         (the last two are built with diffusers at run time: imagine_families.py)

The two sides alternate, `--repeats` times each; the row reports the median of each.
ratio = diffusers seconds / spark_lab seconds (> 1: spark_lab is faster), in wall time and in
CPU time (time.process_time: on a shared, busy machine the steadier of the two). The outputs are
compared too, so a fast wrong answer cannot pass: a row whose outputs differ by more than
1e-3 x (1 + their size) is reported and the command exits with 1.
"""
from __future__ import annotations

import json
import os
import statistics
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
FAMILIES = ("flux", "sdxl")      # the rows after the emoji one
AGREE = 1e-3                     # outputs may differ by AGREE x (1 + max |output|): float32 over a few steps


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


def diffusers_runner(folder: Path, cond, noise, steps: int, guidance: float):
    """-> the same with diffusers' UNet and DDIMScheduler on torch (CPU), the loop written as in the pipeline."""
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel
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


def race(ours_fn, theirs_fn, repeats: int) -> dict:
    """Run the two alternately `repeats` times -> medians of wall and CPU seconds, the ratios and how
    far apart the last outputs are. theirs_fn None: spark_lab's side only."""
    walls, cpus, outs = ([], []), ([], []), [None, None]
    for _ in range(repeats):                       # alternate: a busy machine slows both alike
        for i, fn in enumerate((ours_fn, theirs_fn)):
            if fn is not None:
                dt, dc, outs[i] = timed(fn)
                walls[i].append(dt)
                cpus[i].append(dc)
    ours, ours_cpu = statistics.median(walls[0]), statistics.median(cpus[0])
    r = {"spark_lab_s": ours, "spark_lab_cpu_s": ours_cpu}
    if theirs_fn is not None:
        theirs, theirs_cpu = statistics.median(walls[1]), statistics.median(cpus[1])
        a, b = np.asarray(outs[0], np.float32), np.asarray(outs[1], np.float32)
        diff, size = float(np.abs(a - b).max()), float(np.abs(b).max())
        r.update(diffusers_s=theirs, diffusers_cpu_s=theirs_cpu, ratio=theirs / ours,
                 cpu_ratio=theirs_cpu / max(ours_cpu, 1e-9), max_abs_diff=diff, max_abs=size,
                 agree=bool(diff <= AGREE * (1.0 + size)))
    return r


def _sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")          # significant digits: a quick run's seconds are milliseconds


def make_row(base: dict, r: dict, n: int = 1) -> dict:
    """A race's result, per image and rounded, into a row."""
    row = dict(base, spark_lab_s_per_image=_sig(r["spark_lab_s"] / n),
               spark_lab_cpu_s_per_image=_sig(r["spark_lab_cpu_s"] / n))
    if "diffusers_s" in r:
        row.update(diffusers_s_per_image=_sig(r["diffusers_s"] / n), ratio=round(r["ratio"], 3),
                   diffusers_cpu_s_per_image=_sig(r["diffusers_cpu_s"] / n), cpu_ratio=round(r["cpu_ratio"], 3),
                   max_abs_diff=r["max_abs_diff"], max_abs=r["max_abs"], agree=r["agree"])
    else:
        row.update(diffusers_s_per_image=None, note="torch/diffusers not installed: no comparison")
    return row


def emoji_row(args, threads: int, steps: int, repeats: int) -> dict:
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
            theirs_fn = diffusers_runner(folder, cond, noise, steps, guidance)
        except ImportError:
            theirs_fn = None
        r = race(ours_fn, theirs_fn, repeats)
    base = {"benchmark": "imagine", "family": "emoji", "model": label, "device": get_device().kind,
            "threads": threads, "steps": steps, "guidance": guidance, "scheduler": "DDIM", "image": f"{size}x{size}",
            "compared": "images"}
    return make_row(base, r, noise.shape[0])


def family_row(family: str, threads: int, quick: bool, repeats: int) -> dict:
    from . import imagine_families as fam
    size = fam.SIZES[family]["quick" if quick else "full"]
    base = {"benchmark": "imagine", "family": family, "model": fam.describe(family, size),
            "device": get_device().kind, "threads": threads, "steps": size["steps"], "guidance": size["guidance"],
            "scheduler": fam.SCHEDULER_NAMES[family], "image": "{}x{} latents".format(*size["latent"][1:]),
            "compared": "final latents"}
    import importlib.util
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("diffusers") is None:
        return dict(base, spark_lab_s_per_image=None, diffusers_s_per_image=None,
                    note="torch/diffusers not installed: no stand-in model to run")
    with tempfile.TemporaryDirectory() as tmp:
        inp = fam.build(family, size, Path(tmp))
        ours_fn = fam.spark_runner(family, Path(tmp), inp, size["steps"], size["guidance"])
        theirs_fn = fam.diffusers_runner(family, Path(tmp), inp, size["steps"], size["guidance"])
        return make_row(base, race(ours_fn, theirs_fn, repeats))


def print_row(row: dict) -> None:
    print(f"imagine {row['family']}: {row['model']}, {row['image']}, {row['steps']} {row['scheduler']} steps, "
          f"guidance {row['guidance']}, {row['threads']} thread(s), {row['device']}")
    if row.get("spark_lab_s_per_image") is None:
        print(f"  {row['note']}")
        return
    print(f"  spark_lab  {row['spark_lab_s_per_image']:.3f} s/image wall, "
          f"{row['spark_lab_cpu_s_per_image']:.3f} s CPU")
    if row.get("diffusers_s_per_image") is None:
        print(f"  {row['note']}")
        return
    print(f"  diffusers  {row['diffusers_s_per_image']:.3f} s/image wall, "
          f"{row['diffusers_cpu_s_per_image']:.3f} s CPU (torch CPU)")
    print(f"  ratio      {row['ratio']:.2f}x wall, {row['cpu_ratio']:.2f}x CPU "
          "(diffusers / spark_lab; >= 1 means spark_lab is as fast or faster)")
    verdict = "" if row["agree"] else f"  <- DISAGREE (more than {AGREE:g} x (1 + {row['max_abs']:.3g}))"
    print(f"  {row['compared']} differ by at most {row['max_abs_diff']:.2e} "
          f"(largest |value| {row['max_abs']:.3g}){verdict}")


def main(args) -> int:
    threads = args.threads or int(os.environ.get("SPARK_LAB_THREADS", "0") or 0) or num_threads()
    set_threads(threads)
    try:
        import torch
        torch.set_num_threads(threads)              # the same count on diffusers' side
    except ImportError:
        pass
    quick = bool(getattr(args, "quick", False))
    repeats = 1 if quick else max(1, int(getattr(args, "repeats", 3) or 3))
    rows = [emoji_row(args, threads, 4 if quick else 25, repeats)]
    for family in getattr(args, "families", FAMILIES):
        rows.append(family_row(family, threads, quick, repeats))
    for row in rows:
        if getattr(args, "json", False):
            print(json.dumps(row))
        else:
            print_row(row)
    bad = [r["family"] for r in rows if r.get("agree") is False]
    if bad:
        print(f"bench imagine: spark_lab and diffusers disagree on {', '.join(bad)} (see max_abs_diff)")
        return 1
    return 0
