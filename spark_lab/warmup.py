"""Compile the numba kernels ahead: `python -m spark_lab.warmup` (run by `make setup` and Binder).

Every kernel is `numba.njit(cache=True)`: its first call in a process compiles it (seconds to
tens of seconds each) unless numba's on-disk cache already holds it, and then it loads in
milliseconds. This module calls the hot paths once on tiny inputs, with the same argument types
the notebooks use, so that the cache files exist before anyone opens a notebook. For an editable
install the cache lives next to the sources in `spark_lab/**/__pycache__/` (ignored by git);
for an installed package in site-packages' `__pycache__`, else numba's user cache
(`NUMBA_CACHE_DIR` overrides both).

Measured on the 2-core CI machine (CI=1 notebook 04, first process after a fresh clone): the
first image took 29.7 s with a cold cache and 3.3 s with a warm one.

`compile_note()` prints, in a notebook, whether the kernels were compiled ahead or are about to
be compiled by the next cell (first run only).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
STAMP_NAME = "spark_lab-warmup.json"
PARTS = ("kernels", "llm", "images", "text")


# ----------------------------------------------------------------------------- the stamp

def fingerprint() -> str:
    """What numba's cache depends on: numba and Python versions, and the size and modification time
    of every source file that uses numba (numba drops a cached kernel when its file's stat changes)."""
    import numba
    h = hashlib.sha256(f"{numba.__version__} {sys.version} {platform.machine()}".encode())
    for p in sorted(PACKAGE.rglob("*.py")):
        if "numba" not in p.read_text(encoding="utf-8", errors="replace"):
            continue
        st = p.stat()
        h.update(f"{p.relative_to(PACKAGE)} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def stamp_path() -> Path:
    """Where the warm-up records what it compiled: beside numba's cache for this package."""
    from numba.core import config
    if config.CACHE_DIR:
        return Path(config.CACHE_DIR) / STAMP_NAME
    here = PACKAGE / "__pycache__"
    if os.access(PACKAGE, os.W_OK) and (not here.exists() or os.access(here, os.W_OK)):
        return here / STAMP_NAME
    from .models import cache_dir
    return cache_dir() / STAMP_NAME


def is_warm(parts=PARTS) -> bool:
    """True when a warm-up of these parts ran against the sources and numba now installed."""
    try:
        stamp = json.loads(stamp_path().read_text())
    except (OSError, ValueError):
        return False
    return stamp.get("fingerprint") == fingerprint() and set(parts) <= set(stamp.get("parts", ()))


def compile_note(part: str = "images") -> str:
    """Print (and return) one line for a notebook: compiled ahead, or compiling now (first run only)."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
    if is_warm([part]):
        note = "numba kernels: compiled ahead by `python -m spark_lab.warmup`, loading them from the cache."
    else:
        note = ("compiling kernels (first run only): numba compiles each kernel on its first call and caches "
                "it on disk, so the next cell is slow once (`python -m spark_lab.warmup` does this ahead)…")
    print(note, flush=True)
    return note


# ----------------------------------------------------------------------------- the parts

def warm_kernels() -> str:
    """Every kernel of `bench kernels` (norms, rope, attention, softmax, activations, conv2d, qmatvec)."""
    import numpy as np

    from .benchmarks.kernels import kernel_cases
    cases = kernel_cases(np, quick=True)
    for _name, _shape, fn, *_ in cases:
        fn()
    return f"{len(cases)} kernels"


def warm_llm() -> str:
    """Prefill and decode (greedy and sampled) of each catalogue LLM that is present."""
    from .llm import LLM
    from .models import CATALOGUE, is_present
    done = []
    for name, entry in CATALOGUE.items():
        if entry.kind != "llm" or not is_present(name):
            continue
        llm = LLM.load(name, n_ctx=256)
        llm.generate("Hello, warm-up.", max_new_tokens=3, temperature=0.0)
        llm.reset()
        llm.chat([{"role": "user", "content": "Hi"}], max_new_tokens=3, temperature=0.7, top_k=40, top_p=0.9,
                 seed=0)
        done.append(name)
        del llm
    return ", ".join(done) or "no LLM present"


def warm_images() -> str:
    """The default image model, two steps with each scheduler the notebooks use."""
    from .diffusion import TextToImagePipeline
    from .models import DEFAULT_IMAGE_MODEL, is_present
    if not is_present(DEFAULT_IMAGE_MODEL):
        return f"{DEFAULT_IMAGE_MODEL} not present"
    pipe = TextToImagePipeline.from_pretrained(DEFAULT_IMAGE_MODEL)
    names = ("ddpm", "ddim", "euler")
    for name in names:
        pipe.set_scheduler(name)
        pipe("a warm-up", num_inference_steps=2, seed=0, progress=False)
    return f"{DEFAULT_IMAGE_MODEL}, schedulers {', '.join(names)}"


def warm_text() -> str:
    """Sentence embeddings and an extractive summary (MiniLM)."""
    from .models import DEFAULT_EMBEDDER, is_present
    from .summarize import summarize
    from .text import SentenceEncoder
    if not is_present(DEFAULT_EMBEDDER):
        return f"{DEFAULT_EMBEDDER} not present"
    enc = SentenceEncoder.load(DEFAULT_EMBEDDER)
    text = ("Bees live in colonies. The workers gather nectar. The queen lays eggs. "
            "Drones mate with queens. Honey is made from nectar. Colonies swarm in spring.")
    summarize(text, "extractive", max_words=12, encoder=enc, progress=False)
    return DEFAULT_EMBEDDER


WARMERS = {"kernels": warm_kernels, "llm": warm_llm, "images": warm_images, "text": warm_text}


def warmup(parts=PARTS, verbose: bool = True) -> dict:
    """Run the warm-ups; {part: seconds}. A part that fails is reported and left out of the stamp."""
    os.environ.setdefault("SPARK_LAB_THREADS", "1")
    from .device import set_threads
    set_threads(int(os.environ["SPARK_LAB_THREADS"]))
    seconds, done = {}, []
    for part in parts:
        if part not in WARMERS:
            raise ValueError(f"no warm-up part {part!r} (choose from {', '.join(PARTS)})")
        if verbose:
            print(f"numba warm-up: {part}…", end=" ", flush=True)
        t0 = time.perf_counter()
        try:
            what = WARMERS[part]()
            done.append(part)
        except Exception as e:          # the warm-up only saves time: never block set-up on it
            what = f"FAILED ({type(e).__name__}: {e}); its kernels will compile on first use"
        seconds[part] = time.perf_counter() - t0
        if verbose:
            print(f"{seconds[part]:.1f} s ({what})", flush=True)
    path = stamp_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"fingerprint": fingerprint(), "parts": done, "seconds": seconds}, indent=1))
    return seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m spark_lab.warmup", description=__doc__.split("\n")[0])
    ap.add_argument("parts", nargs="*", default=list(PARTS), help=f"what to compile (default: all of {', '.join(PARTS)})")
    ap.add_argument("--check", action="store_true", help="only say whether the cache is warm (exit 1 if not)")
    args = ap.parse_args(argv)
    bad = [p for p in args.parts if p not in PARTS]
    if bad:
        print(f"spark_lab.warmup: no part named {bad[0]!r} (choose from {', '.join(PARTS)})", file=sys.stderr)
        return 2
    if args.check:
        warm = is_warm(args.parts)
        print(f"numba cache {'warm' if warm else 'cold'} for {', '.join(args.parts)} ({stamp_path()})")
        return 0 if warm else 1
    t0 = time.perf_counter()
    warmup(args.parts)
    print(f"warm-up done in {time.perf_counter() - t0:.1f} s; numba's cache is beside the sources "
          f"(stamp: {stamp_path()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
