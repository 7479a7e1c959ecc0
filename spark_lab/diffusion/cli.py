"""`spark-lab imagine PROMPT`: generate, upscale small images for display, save one PNG (a grid for batches)."""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path


def make_grid(images, display_size: int = 256, cols: int | None = None):
    """Upscale each image by a whole factor (nearest: keeps a 32x32 emoji crisp) and tile them."""
    from PIL import Image

    w, h = images[0].size
    k = max(1, display_size // max(w, h))
    tiles = [im.resize((w * k, h * k), Image.NEAREST) for im in images]
    cols = cols or math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    W, H = tiles[0].size
    grid = Image.new("RGB", (cols * W, rows * H), "white")
    for i, t in enumerate(tiles):
        grid.paste(t, ((i % cols) * W, (i // cols) * H))
    return grid


def cmd_imagine(args) -> int:
    from ..device import set_threads
    from .pipeline import TextToImagePipeline

    if args.steps < 1:
        raise ValueError(f"--steps must be a positive integer, got {args.steps}")
    if not args.prompt or not args.prompt.strip():
        raise ValueError("the prompt is empty")
    set_threads()
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out must be a .png file, got {out}")
    _check_out_dir(out, mkdir=getattr(args, "mkdir", False))
    pipe = TextToImagePipeline.from_pretrained(args.model or "spark-emoji", scheduler=args.scheduler)
    t0 = time.perf_counter()
    images = pipe(args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                  num_images_per_prompt=args.num_images, progress=sys.stderr.isatty())
    dt = time.perf_counter() - t0
    grid = make_grid(images)
    grid.save(out)
    w, h = images[0].size
    W, H = grid.size
    shown = f" (upscaled to a {W}x{H} file)" if (W, H) != (w, h) else ""
    print(f"{out}  {len(images)} image(s) {w}x{h}{shown}, {args.steps} steps, seed {args.seed}, "
          f"{dt:.2f} s ({dt / len(images):.2f} s/image)")
    return 0


def _check_out_dir(out: Path, mkdir: bool) -> None:
    """Fail before generating if the image could not be written; create the folder only when asked."""
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.exists():
        if not mkdir:
            raise FileNotFoundError(f"--out folder {parent} does not exist (create it, or pass --mkdir)")
        parent.mkdir(parents=True)
    if not parent.is_dir():
        raise NotADirectoryError(f"--out folder {parent} is not a folder")
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a folder; give a .png file name")
