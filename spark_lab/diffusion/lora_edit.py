"""A LoRA made without training: a closed-form edit of the cross-attention, factored by SVD.

A LoRA file is only a low-rank delta per layer. One way to get a meaningful delta with no
training data is TIME's closed form (Orgad et al. 2023, "Editing Implicit Assumptions in
Text-to-Image Diffusion Models"): for a projection W that reads the text conditioning, find

    W' = argmin_W'  sum_i |W' c_i - W c_i*|^2 + ridge * |W' - W|^2      (c_i: source, c_i*: target)

which is W' = W + W M with  M = D^T X (X^T X + ridge I)^-1,  X = sources [n, d], D = targets - X.
Every prompt c then reads as c + M c to the edited layer. The delta W M is factored by SVD into
a LoRA's down [r, d] and up [out, r] and saved with diffusers/PEFT names, so any LoRA loader
(spark_lab's `pipe.load_lora_weights`, diffusers' with PEFT) takes it.

spark-emoji is conditioned on one sentence embedding ([B, 1, 384]): with one key, softmax is 1
and a cross-attention block outputs to_out(to_v(c)) whatever the queries are, so editing to_v
edits what the prompt says to the UNet (to_k has no effect and is left alone).

`style_lora` builds the edit "add a style": each caption c_i gets the target
c_i + strength * (s - mean(c)), with s the style prompt's embedding. The shift is the same
vector for every caption, so M = strength * (s - mean(c)) u^T is rank 1 (u: the ridge
least-squares direction with u . c_i ~ 1 for emoji captions): a rank-1 LoRA reproduces it exactly.

    lora = style_lora(pipe, "fire", "fire.safetensors")
    pipe.load_lora_weights(lora.path, scale=0.5, fuse=False)   # the prompts lean half way to fire
"""
from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..device import to_host

# Unicode blocks of the emoji spark-emoji draws best (faces, animals, food, vehicles): their
# names ("a dog face", "a red apple") are the captions the style is fitted on
EMOJI_BLOCKS = ((0x1F600, 0x1F637), (0x1F400, 0x1F43F), (0x1F345, 0x1F37F), (0x1F680, 0x1F6A4))


def emoji_captions() -> list[str]:
    """'a <unicode name>' for the emoji in EMOJI_BLOCKS (spark-emoji's trained wording), ~200 captions."""
    out = []
    for lo, hi in EMOJI_BLOCKS:
        for cp in range(lo, hi + 1):
            name = unicodedata.name(chr(cp), "")
            if name:
                out.append(f"a {name.lower()}")
    return out


def value_projections(weights: dict) -> list[str]:
    """The cross-attention value projections (`...attn2.to_v`) in a UNet's weights dict, by module name."""
    return sorted(k[:-len(".weight")] for k in weights if k.endswith("attn2.to_v.weight"))


def fit_edit(sources, targets, ridge: float = 0.1) -> np.ndarray:
    """TIME's closed form: sources, targets [n, d] -> M [d, d] (float64) with c + M c ~ target.

    M = D^T X (X^T X + ridge I)^-1; for a layer W the edited weight is W + W M."""
    X, Y = np.asarray(sources, np.float64), np.asarray(targets, np.float64)   # [n, d] each
    if X.ndim != 2 or X.shape != Y.shape:
        raise ValueError(f"sources {X.shape} and targets {Y.shape} must both be [n, d]")
    D = Y - X                                                              # [n, d]
    G = X.T @ X + float(ridge) * np.eye(X.shape[1])                        # [d, d]
    return np.linalg.solve(G, X.T @ D).T                                   # (G^-1 X^T D)^T = D^T X G^-1


def factor(delta, rank: int):
    """delta [out, in] -> (down [r, in], up [out, r], singular values): the rank-r SVD, split evenly."""
    U, S, Vt = np.linalg.svd(np.asarray(delta, np.float64), full_matrices=False)
    r = int(rank)
    root = np.sqrt(S[:r])
    return (root[:, None] * Vt[:r]).astype(np.float32), (U[:, :r] * root).astype(np.float32), S


def save_lora(tensors: dict, path, rank: int, description: str = "") -> Path:
    """{name: array} -> a safetensors file as diffusers' save_lora_weights writes it (alpha = rank)."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    targets = sorted({k.split(".", 1)[1].rsplit(".lora_", 1)[0] for k in tensors})
    meta = {"unet.r": int(rank), "unet.lora_alpha": int(rank), "unet.target_modules": targets}
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(path),
              metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta, indent=2, sort_keys=True),
                        "description": description})
    return path


@dataclass
class EditLoRA:
    """What style_lora wrote, and the edit it stands for."""
    path: Path
    map: np.ndarray           # M [d, d] float32: at scale s the LoRA reads a prompt c as c + s * M c
    layers: list              # the adapted modules
    singular_values: dict = field(default_factory=dict)   # module -> the delta's first singular values
    rank: int = 1

    def embeds(self, cond, scale: float = 1.0) -> np.ndarray:
        """cond [..., d] -> the conditioning the base model would need to match the LoRA at `scale`
        (exact when `rank` covers the edit, as it does for style_lora's rank-1 edit)."""
        c = np.asarray(to_host(cond), np.float32)
        return (c + float(scale) * (c @ self.map.T)).astype(np.float32)

    @property
    def nbytes(self) -> int:
        """The size of the LoRA file."""
        return self.path.stat().st_size


def style_lora(pipe, style: str, path, captions: list[str] | None = None, strength: float = 1.0,
               rank: int = 1, ridge: float = 0.1) -> EditLoRA:
    """A LoRA on every cross-attention to_v that adds `strength` * (style - the average caption) to the
    prompt, fitted on `captions` (default emoji_captions()), written to `path` (PEFT names)."""
    captions = list(captions) if captions is not None else emoji_captions()
    cond = pipe.encode_prompt(captions + [style])                          # [n + 1, L, d]
    if cond.shape[1] != 1:
        raise ValueError(f"style_lora needs a model conditioned on one sentence embedding (like spark-emoji); "
                         f"this one reads {cond.shape[1]} text tokens")
    C = np.asarray(to_host(cond), np.float64)[:, 0]                       # [n + 1, d]
    C, s = C[:-1], C[-1]
    targets = C + float(strength) * (s - C.mean(axis=0))                   # the same shift for every caption
    M = fit_edit(C, targets, ridge)                                        # [d, d], rank 1
    weights = pipe.unet.params.tensors
    tensors, spectra = {}, {}
    layers = value_projections(weights)
    if not layers:
        raise ValueError("style_lora: this UNet has no cross-attention (attn2.to_v) to edit")
    for module in layers:
        W = np.asarray(to_host(weights[f"{module}.weight"]), np.float64)  # [out, d]
        down, up, S = factor(W @ M, rank)                                   # [r, d], [out, r]
        tensors[f"unet.{module}.lora_A.weight"] = down
        tensors[f"unet.{module}.lora_B.weight"] = up
        spectra[module] = S[:4].astype(np.float32)
    about = (f"spark_lab.diffusion.lora_edit.style_lora: style {style!r}, strength {strength}, "
             f"{len(captions)} captions, ridge {ridge}, rank {rank} (TIME closed form on attn2.to_v)")
    out = save_lora(tensors, path, rank, about)
    return EditLoRA(out, M.astype(np.float32), layers, spectra, int(rank))
