"""Soak: many text-to-image generations in one process on the tiny pixel-space diffusion model (the
tests' fixture), varying prompt, seed, size and steps. Resident memory and the kit allocator stay flat:
every latent, noise and activation buffer goes back to the allocator.

`make test`: 20 images (SPARK_LAB_SOAK_IMAGES); `make soak`: 500."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from spark_lab.diffusion import TextToImagePipeline

from .common import check, env_count, mark, psutil

IMAGES = env_count("SPARK_LAB_SOAK_IMAGES", 20)
FIX = Path(__file__).resolve().parents[1] / "fixtures" / "diffusion"


class HashEncoder:
    """A deterministic 384-d sentence embedding (the pipeline needs only encode(list[str]) -> [n, d]),
    so the soak needs no BERT."""

    def encode(self, texts):
        e = np.stack([np.random.default_rng(sum(map(ord, t))).standard_normal(384).astype(np.float32) for t in texts])
        return e / np.linalg.norm(e, axis=1, keepdims=True)


def test_image_soak():
    pipe = TextToImagePipeline.from_pretrained(FIX / "tiny-pixel", scheduler="ddim")
    pipe._sentence_encoder = HashEncoder()
    proc = psutil.Process()
    warm = max(4, IMAGES // 10)
    base, peak, first = None, 0, None
    for i in range(IMAGES):
        size = (8, 16)[i % 2]
        img = pipe(f"a {('cat', 'dog', 'boat')[i % 3]} number {i % 6}", num_inference_steps=2 + i % 2, seed=i % 7,
                   height=size, width=size, output_type="np", progress=False)
        assert img.shape == (1, size, size, 3) and np.isfinite(img).all()
        if i == 0:
            first = img
        elif i % 42 == 0:                                # prompt, seed, steps and size of turn 0 again
            np.testing.assert_array_equal(img, first)
        if i + 1 == warm:
            base = mark()
        elif base is not None and i % 5 == 0:
            peak = max(peak, proc.memory_info().rss)
    end = mark()
    check("image soak", IMAGES, base, peak, end)
