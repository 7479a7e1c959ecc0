"""`spark-lab imagine PROMPT`: generate, upscale small images for display, save one PNG (a grid for batches).

    --init IMAGE [--strength S]       image to image: start from IMAGE, change it by S in (0, 1]
    --init IMAGE --mask MASK          inpainting: repaint where MASK (same size) is white
    --lora FILE[:SCALE]               apply a LoRA (repeatable), diffusers/PEFT or kohya naming

Every option is checked (files, sizes, strength) before the model loads; a bad one is one line.
"""
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
    init, mask, strength, loras = _image_options(args)
    set_threads()
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out must be a .png file, got {out}")
    _check_out_dir(out, mkdir=getattr(args, "mkdir", False))
    pipe = TextToImagePipeline.from_pretrained(args.model or "spark-emoji", scheduler=args.scheduler)
    for path, scale in loras:
        pipe.load_lora_weights(path, scale=scale)
    kw = {}
    if init is not None:
        kw = dict(image=init, mask_image=mask, strength=strength)
    t0 = time.perf_counter()
    images = pipe(args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                  num_images_per_prompt=args.num_images, progress=sys.stderr.isatty(), **kw)
    dt = time.perf_counter() - t0
    grid = make_grid(images)
    grid.save(out)
    w, h = images[0].size
    W, H = grid.size
    shown = f" (upscaled to a {W}x{H} file)" if (W, H) != (w, h) else ""
    mode = "" if init is None else f", {'inpainting' if mask is not None else 'image to image'}" + (
        f" at strength {strength:g}" if strength is not None else "")
    lora = "".join(f", LoRA {Path(p).name} x{s:g}" for p, s in loras)
    print(f"{out}  {len(images)} image(s) {w}x{h}{shown}, {args.steps} steps, seed {args.seed}{mode}{lora}, "
          f"{dt:.2f} s ({dt / len(images):.2f} s/image)")
    return 0


def _image_options(args):
    """--init/--mask/--strength/--lora -> (init PIL image, mask PIL image, strength, [(lora, scale)]),
    every file read and every size checked before the model loads."""
    from .image_inputs import check_strength, open_image
    from .lora import parse_lora_arg

    init_path, mask_path = getattr(args, "init", None), getattr(args, "mask", None)
    strength = getattr(args, "strength", None)
    if mask_path is not None and init_path is None:
        raise ValueError("--mask needs --init (the image to inpaint)")
    if strength is not None:
        if init_path is None:
            raise ValueError("--strength needs --init (the image to start from)")
        try:
            strength = check_strength(strength)
        except ValueError:
            raise ValueError(f"--strength must be in (0, 1], got {strength}") from None
    init = mask = None
    if init_path is not None:
        init = open_image(init_path, "--init")
        if mask_path is not None:
            mask = open_image(mask_path, "--mask")
            if mask.size != init.size:
                raise ValueError(f"--mask is {mask.size[0]}x{mask.size[1]} but --init is "
                                 f"{init.size[0]}x{init.size[1]}: they must be the same size")
    loras = []
    for text in getattr(args, "lora", None) or []:
        path, scale = parse_lora_arg(text)
        if not Path(path).is_file():
            raise FileNotFoundError(f"--lora {path}: no such file")
        loras.append((path, scale))
    return init, mask, strength, loras


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
