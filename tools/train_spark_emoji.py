"""Train spark-emoji: a small text-conditioned pixel-space diffusion model (32x32 RGB emoji).

Dev-only tool (torch, diffusers, transformers; spark_lab never imports it). Data comes from
tools/prepare_emoji.py. The conditioning is pinned for spark_lab's TextToImagePipeline:

    encoder_hidden_states = MiniLM-L6-v2 sentence embedding of the caption  # [B, 1, 384]
        (mean over tokens with the attention mask, then L2-normalised)
    unconditional         = zeros([B, 1, 384])  (10% caption dropout -> classifier-free guidance)

Training: v-prediction (epsilon available), DDPM 1000 steps squaredcos_cap_v2, min-SNR-5 loss weights, AdamW,
EMA of the weights (the EMA copy is what ships). No flips: emoji hold text and direction. --curate
trains on the pictorial emoji only and oversamples common objects and the SEEN captions (see
curate()); --decay ends the session with a cosine lr decay. The model's default guidance (2) is
written into model_index.json.
Every --ckpt-minutes it writes <work>/ckpt-<step>/ (a full diffusers folder) and a sample grid,
and <work>/state.pt to resume. At the end <out>/ is the last EMA model.

    python tools/train_spark_emoji.py --data ~/.cache/spark_lab/emoji --minutes 70 \
        --work /work/emoji_runs/run1 --out spark_lab/assets/spark-emoji
    python tools/train_spark_emoji.py --verify spark_lab/assets/spark-emoji --grid samples.png
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SEEN = ["red apple", "grinning face", "dog face", "pizza", "red heart", "sun", "rocket", "cat face",
        "hamburger", "thumbs up sign", "ghost", "fire", "banana", "flag: japan", "snowman", "face with tears of joy"]

# guidance 2: at 3+ the samples of this small model oversaturate into full-frame texture, more so
# with more steps (seen at 10-40 DDIM steps on the 7.5k-step model)
GUIDANCE = 2.0
MODEL_INDEX = {"_class_name": "TextToImagePipeline", "_spark_lab_text_encoder": "all-minilm-l6-v2",
               "_spark_lab_guidance_scale": GUIDANCE,
               "unet": ["diffusers", "UNet2DConditionModel"], "scheduler": ["diffusers", "DDIMScheduler"]}


# ---- text conditioning ---------------------------------------------------------------------

def embed_captions(captions: list[str], batch: int = 256) -> np.ndarray:
    """captions -> [n, 384] f32, all-MiniLM-L6-v2 mean-pooled with the mask, L2-normalised."""
    from tokenizers import Tokenizer
    from transformers import BertModel
    from spark_lab.models import resolve

    folder = resolve("all-minilm-l6-v2", kind="embedding")
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(256)
    bert = BertModel.from_pretrained(str(folder)).eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(captions), batch):
            enc = tok.encode_batch(captions[i:i + batch])
            ids = torch.tensor([e.ids for e in enc])             # [b, T]
            mask = torch.tensor([e.attention_mask for e in enc])  # [b, T]
            h = bert(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state
            m = mask[..., None].float()                          # [b, T, 1]
            e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)        # [b, 384]
            out.append(F.normalize(e, dim=-1).numpy())
    return np.concatenate(out).astype(np.float32)


# ---- data curation ------------------------------------------------------------------------
# A CPU budget of a few thousand steps cannot cover 1,898 emoji, so --curate trains on the
# pictorial ones: single code points (no ZWJ families, skin tones, keycaps, flags but Japan's),
# without the text-like symbols (arrows, enclosed letters, clocks, geometric shapes, zodiac).
# Common objects are drawn --common-weight times as often, and the SEEN captions make up
# --seen-share of every batch. Every kept image also gets an "a/an <caption>" caption.

SYMBOLS = [(0x00A9, 0x00AE), (0x203C, 0x2049), (0x2122, 0x2139), (0x2190, 0x21FF), (0x2300, 0x2319),
           (0x231C, 0x23EF), (0x23F1, 0x23F2), (0x23F4, 0x23FF), (0x24C2, 0x24C2), (0x25A0, 0x25FF),
           (0x2611, 0x2611), (0x2622, 0x2623), (0x262E, 0x262F), (0x2638, 0x2638), (0x2640, 0x2642),
           (0x2648, 0x2653), (0x265F, 0x2668), (0x267B, 0x267F), (0x2695, 0x269C), (0x26A7, 0x26AB),
           (0x26CE, 0x26CE), (0x26D4, 0x26D4), (0x2702, 0x2702), (0x2705, 0x2705), (0x2714, 0x2721),
           (0x2733, 0x2734), (0x2747, 0x2757), (0x2795, 0x27BF), (0x2934, 0x2935), (0x2B05, 0x2B1C),
           (0x2B55, 0x2B55), (0x3030, 0x3299), (0x1F170, 0x1F251), (0x1F4F4, 0x1F4F6), (0x1F500, 0x1F53D),
           (0x1F550, 0x1F567), (0x1F6AB, 0x1F6AD), (0x1F6AE, 0x1F6AF), (0x1F6B1, 0x1F6B1), (0x1F6B3, 0x1F6B3),
           (0x1F6B7, 0x1F6B8), (0x1F6B9, 0x1F6BC), (0x1F6C2, 0x1F6C5), (0x1F7E0, 0x1F7F0), (0x1F3E7, 0x1F3E7),
           (0x1F4B1, 0x1F4B2), (0x1F4DB, 0x1F4DB), (0x1F51E, 0x1F51E), (0x1F6D0, 0x1F6D0), (0x1F549, 0x1F549),
           (0x1F54E, 0x1F54E), (0x1F234, 0x1F23A)]
COMMON = [(0x1F600, 0x1F637), (0x1F641, 0x1F644), (0x1F910, 0x1F92F), (0x1F970, 0x1F97A), (0x263A, 0x263A),
          (0x1F479, 0x1F480), (0x1F400, 0x1F43F), (0x1F980, 0x1F9AE), (0x1F54A, 0x1F54A), (0x1F577, 0x1F578),
          (0x1F330, 0x1F344), (0x1F490, 0x1F490), (0x1F345, 0x1F37F), (0x1F950, 0x1F96F), (0x1F9C0, 0x1F9CB),
          (0x1FAD0, 0x1FADB), (0x2600, 0x2604), (0x26C4, 0x26C8), (0x2744, 0x2744), (0x1F300, 0x1F321),
          (0x1F324, 0x1F32C), (0x2B50, 0x2B50), (0x1F525, 0x1F525), (0x1F4A7, 0x1F4A7), (0x26A1, 0x26A1),
          (0x1F680, 0x1F6A4), (0x1F6B2, 0x1F6B2), (0x1F6E9, 0x1F6FC), (0x26F5, 0x26F5), (0x2708, 0x2708),
          (0x2764, 0x2764), (0x1F493, 0x1F49F), (0x1F9E1, 0x1F9E1), (0x1F90D, 0x1F90E), (0x1FA75, 0x1FA77),
          (0x1F380, 0x1F393), (0x26BD, 0x26BE), (0x1F3C0, 0x1F3C0), (0x1F3C8, 0x1F3C8), (0x1F3BE, 0x1F3BE),
          (0x1F44D, 0x1F44E), (0x1F47B, 0x1F47B), (0x26C4, 0x26C4)]


def _in(cp: int, ranges) -> bool:
    return any(a <= cp <= b for a, b in ranges)


def with_article(c: str) -> str:
    return ("an " if c[0] in "aeiou" else "a ") + c


def curate(rows: list[dict], common_weight: float) -> tuple[list[int], list[float], list[list[str]]]:
    """rows from captions.json -> kept row indices, sampling weights, captions (+ "a/an ..." forms)."""
    keep, weights, caps = [], [], []
    for i, r in enumerate(rows):
        core = r["emoji"].replace("\ufe0f", "")
        seen = any(c in SEEN for c in r["captions"])
        if not seen and (len(core) != 1 or _in(ord(core), SYMBOLS)):
            continue
        keep.append(i)
        weights.append(common_weight if len(core) == 1 and _in(ord(core), COMMON) else 1.0)
        caps.append(list(r["captions"]) + [with_article(c) for c in r["captions"][:2]])
    return keep, weights, caps


def load_data(data: Path, curated: bool = False, common_weight: float = 3.0):
    """-> images [N, 3, 32, 32] f32 in [-1, 1], caption ids per image, embeddings [C, 384], caption index,
    sampling weights [N] (all ones unless curated)."""
    x = np.load(data / "images.npy")                              # [N, 32, 32, 3] uint8
    rows = json.loads((data / "captions.json").read_text())
    if curated:
        keep, weights, caps = curate(rows, common_weight)
        x = x[keep]
    else:
        weights, caps = [1.0] * len(rows), [r["captions"] for r in rows]
    captions = sorted({c for cs in caps for c in cs})
    cache = data / ("embeddings-curated.npz" if curated else "embeddings.npz")
    if cache.exists() and list(np.load(cache)["captions"]) == captions:
        emb = np.load(cache)["emb"]
    else:
        t0 = time.time()
        emb = embed_captions(captions)
        np.savez(cache, captions=np.array(captions), emb=emb)
        print(f"embedded {len(captions)} captions in {time.time() - t0:.0f}s", flush=True)
    index = {c: i for i, c in enumerate(captions)}
    cap_ids = [[index[c] for c in cs] for cs in caps]
    images = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    seen_rows = torch.tensor([any(c in SEEN for c in cs) for cs in caps])
    return images, cap_ids, torch.from_numpy(emb), index, torch.tensor(weights), seen_rows


# ---- model and schedulers ------------------------------------------------------------------

def make_unet(channels: tuple[int, ...], layers: int, head_dim: int, attn_levels: int):
    from diffusers import UNet2DConditionModel
    n = len(channels)
    return UNet2DConditionModel(
        sample_size=32, in_channels=3, out_channels=3,
        block_out_channels=channels, layers_per_block=layers,
        # attention (self + cross) only in the `attn_levels` lowest resolutions and the mid block:
        # on a shared CPU, attention at 16x16 doubles the step time
        down_block_types=("DownBlock2D",) * (n - attn_levels) + ("CrossAttnDownBlock2D",) * attn_levels,
        up_block_types=("CrossAttnUpBlock2D",) * attn_levels + ("UpBlock2D",) * (n - attn_levels),
        cross_attention_dim=384, attention_head_dim=head_dim, norm_num_groups=32)


def scheduler_config(prediction: str = "v_prediction") -> dict:
    from diffusers import DDIMScheduler
    s = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type=prediction,
                      clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=False, steps_offset=0,
                      timestep_spacing="trailing")
    return dict(s.config)


def save_pipeline(unet, folder: Path, meta: dict | None = None, prediction: str = "v_prediction"):
    from diffusers import DDIMScheduler
    folder.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    DDIMScheduler.from_config(scheduler_config(prediction)).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
    if meta:
        (folder / "training.json").write_text(json.dumps(meta, indent=2) + "\n")


@torch.no_grad()
def sample(unet, cond: torch.Tensor, steps: int = 25, guidance: float = GUIDANCE, seed: int = 0,
           prediction: str = "v_prediction") -> torch.Tensor:
    """cond [B, 1, 384] -> images [B, 3, 32, 32] in [-1, 1] with DDIM and classifier-free guidance."""
    from diffusers import DDIMScheduler
    sched = DDIMScheduler.from_config(scheduler_config(prediction))
    sched.set_timesteps(steps)
    dev = next(unet.parameters()).device
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(cond.shape[0], 3, 32, 32, generator=g).to(dev)
    ctx = torch.cat([torch.zeros_like(cond), cond]).to(dev)      # [2B, 1, 384]
    for t in sched.timesteps:
        eps_u, eps_c = unet(torch.cat([x, x]), t, encoder_hidden_states=ctx).sample.chunk(2)
        x = sched.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
    return x.clamp(-1, 1).cpu()


def save_grid(x: torch.Tensor, path: Path, cols: int = 8, scale: int = 2):
    from PIL import Image
    a = ((x.permute(0, 2, 3, 1).numpy() + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)  # [B, 32, 32, 3]
    rows = math.ceil(len(a) / cols)
    a = np.concatenate([a, np.full((rows * cols - len(a),) + a.shape[1:], 255, np.uint8)])
    g = a.reshape(rows, cols, 32, 32, 3).transpose(0, 2, 1, 3, 4).reshape(rows * 32, cols * 32, 3)
    Image.fromarray(g).resize((cols * 32 * scale, rows * 32 * scale), Image.NEAREST).save(path)


# ---- training ------------------------------------------------------------------------------

def train(args):
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    dev = torch.device(args.device)
    images, cap_ids, emb, index, weights, seen_rows = load_data(Path(args.data).expanduser(), args.curate,
                                                                args.common_weight)
    # per-image draw probabilities: the SEEN rows share --seen-share of each batch (curated runs only)
    if args.curate and seen_rows.any():
        w = weights * ~seen_rows
        probs = (1 - args.seen_share) * w / w.sum() + args.seen_share * seen_rows.float() / seen_rows.sum()
    else:
        probs = weights / weights.sum()
    print(f"{len(images)} images, {len(emb)} captions, device {dev}, curated {args.curate}", flush=True)
    images, emb = images.to(dev), emb.to(dev)
    seen_cond = torch.stack([emb[index[c]] for c in SEEN if c in index])[:, None]  # [16, 1, 384]

    from diffusers import DDPMScheduler
    ddpm = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    abar = ddpm.alphas_cumprod.to(dev)                                  # [1000]
    snr = abar / (1 - abar)
    # min-SNR-gamma loss weights (Hang et al. 2023), written for each target
    w_t = torch.clamp(snr, max=args.min_snr) / (snr if args.prediction == "epsilon" else snr + 1)

    unet = make_unet(tuple(args.channels), args.layers, args.head_dim, args.attn_levels).to(dev)
    ema = make_unet(tuple(args.channels), args.layers, args.head_dim, args.attn_levels).to(dev)
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"unet: {n_params / 1e6:.2f} M params ({n_params * 4 / 2**20:.1f} MiB f32)", flush=True)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.01)

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    step, train_seconds = 0, 0.0
    if (work / "state.pt").exists() and not args.fresh:
        st = torch.load(work / "state.pt", map_location=dev)
        unet.load_state_dict(st["unet"]); ema.load_state_dict(st["ema"]); opt.load_state_dict(st["opt"])
        step, train_seconds = st["step"], st["train_seconds"]
        torch.set_rng_state(st["rng"])
        print(f"resumed at step {step} ({train_seconds / 60:.1f} min trained)", flush=True)
    elif args.init:  # warm start from another run's weights (e.g. switching the prediction target)
        st = torch.load(args.init, map_location=dev)
        unet.load_state_dict(st["unet"]); ema.load_state_dict(st["unet"])
        print(f"initialised from {args.init} (its step {st['step']}, {st['train_seconds'] / 60:.1f} min)", flush=True)

    gen = torch.Generator(device="cpu").manual_seed(args.seed + step)
    n_caps = torch.tensor([len(c) for c in cap_ids])
    cap_table = torch.full((len(cap_ids), int(n_caps.max())), -1, dtype=torch.long)
    for i, c in enumerate(cap_ids):
        cap_table[i, :len(c)] = torch.tensor(c)

    lr_now = [args.lr]

    def checkpoint(loss_avg):
        tag = work / f"ckpt-{step:06d}"
        meta = {"step": step, "train_minutes": round(train_seconds / 60, 1), "loss_ema": round(loss_avg, 5),
                "batch": args.batch, "lr": args.lr, "lr_now": lr_now[0], "ema": args.ema, "curated": args.curate,
                "images": len(images), "captions": len(emb), "seen_share": args.seen_share if args.curate else None,
                "threads": args.threads, "prediction": args.prediction, "init": args.init, "seed": args.seed, "device": str(dev), "params": n_params}
        save_pipeline(ema, tag, meta, args.prediction)
        torch.save({"unet": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
                    "train_seconds": train_seconds, "rng": torch.get_rng_state()}, work / "state.pt.tmp")
        (work / "state.pt.tmp").replace(work / "state.pt")
        ema.eval()
        save_grid(sample(ema, seen_cond, steps=25, prediction=args.prediction), work / f"samples-{step:06d}.png")
        print(f"checkpoint {tag.name}", flush=True)

    loss_avg, t_last_ckpt, t_start = None, time.time(), time.time()
    # --minutes is this session's wall-clock budget (pauses by other users count: the box is shared)
    session, step0 = args.minutes * 60.0, step
    unet.train()
    while step < args.steps and time.time() - t_start < session:
        t0 = time.time()
        idx = torch.multinomial(probs, args.batch, replacement=True, generator=gen)  # [B]
        pick = (torch.rand(args.batch, generator=gen) * n_caps[idx]).long()
        cond = emb[cap_table[idx, pick].to(dev)]                                    # [B, 384]
        drop = (torch.rand(args.batch, generator=gen) < args.cond_drop).to(dev)
        cond = torch.where(drop[:, None], torch.zeros_like(cond), cond)[:, None]    # [B, 1, 384]
        x0 = images[idx.to(dev)]                                                    # [B, 3, 32, 32]
        t = torch.randint(0, 1000, (args.batch,), generator=gen).to(dev)
        noise = torch.randn(x0.shape, generator=gen).to(dev)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = unet(xt, t, encoder_hidden_states=cond).sample
        target = noise if args.prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
        loss = ((pred - target) ** 2).mean(dim=(1, 2, 3))
        loss = (loss * w_t[t]).mean()
        frac = max((time.time() - t_start) / session, (step - step0) / max(1, args.steps - step0))  # session progress
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        if args.decay > 0 and frac > 1 - args.decay:
            u = min(1.0, (frac - 1 + args.decay) / args.decay)
            lr = args.lr_final + (lr - args.lr_final) * 0.5 * (1 + math.cos(math.pi * u))
        for g_ in opt.param_groups:
            g_["lr"] = lr
        lr_now[0] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        step += 1
        dt = time.time() - t0
        train_seconds += dt
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        if step % args.log_every == 0:
            print(f"step {step} loss {loss.item():.4f} avg {loss_avg:.4f} lr {lr:.2e} {dt:.3f}s/step "
                  f"{train_seconds / 60:.1f} min", flush=True)
        if time.time() - t_last_ckpt > args.ckpt_minutes * 60:
            checkpoint(loss_avg)
            t_last_ckpt = time.time()
    checkpoint(loss_avg)
    if args.out:
        out = Path(args.out)
        for sub in ("unet", "scheduler"):
            shutil.rmtree(out / sub, ignore_errors=True)
        save_pipeline(ema, out, json.loads((work / f"ckpt-{step:06d}" / "training.json").read_text()), args.prediction)
    print(f"done: {step} steps, {train_seconds / 60:.1f} min training, {(time.time() - t_start) / 60:.1f} min wall, "
          f"loss avg {loss_avg:.4f}", flush=True)


def verify(args):
    """Load a saved folder with diffusers and sample the seen captions to a grid."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    folder = Path(args.verify)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    sched = DDIMScheduler.from_pretrained(folder / "scheduler")
    captions = args.captions or SEEN
    cond = torch.from_numpy(embed_captions(captions))[:, None]               # [n, 1, 384]
    sched.set_timesteps(args.sample_steps)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(len(captions), 3, 32, 32, generator=g)
    ctx = torch.cat([torch.zeros_like(cond), cond])
    with torch.no_grad():
        for t in sched.timesteps:
            eps_u, eps_c = unet(torch.cat([x, x]), t, encoder_hidden_states=ctx).sample.chunk(2)
            x = sched.step(eps_u + args.guidance * (eps_c - eps_u), t, x).prev_sample
    save_grid(x.clamp(-1, 1), Path(args.grid), cols=args.cols, scale=args.scale)
    print(f"{len(captions)} samples, {args.sample_steps} DDIM steps, guidance {args.guidance} -> {args.grid}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="train spark-emoji (dev-only: torch + diffusers + transformers)")
    ap.add_argument("--data", default="~/.cache/spark_lab/emoji", help="folder from tools/prepare_emoji.py")
    ap.add_argument("--work", default="/tmp/spark_emoji_run", help="checkpoints, sample grids, state.pt")
    ap.add_argument("--out", default=None, help="write the final EMA model here (e.g. spark_lab/assets/spark-emoji)")
    ap.add_argument("--steps", type=int, default=100_000, help="stop after this many steps")
    ap.add_argument("--minutes", type=float, default=70.0, help="... or after this much wall time (this session)")
    ap.add_argument("--curate", action="store_true", help="pictorial single-code-point emoji only, see curate()")
    ap.add_argument("--common-weight", type=float, default=3.0, help="draw weight of common objects (curated)")
    ap.add_argument("--seen-share", type=float, default=0.25, help="share of each batch from SEEN (curated)")
    ap.add_argument("--decay", type=float, default=0.0, help="cosine lr decay over this last share of the session")
    ap.add_argument("--lr-final", type=float, default=3e-5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--ema", type=float, default=0.995)
    ap.add_argument("--prediction", default="v_prediction", choices=["epsilon", "v_prediction"])
    ap.add_argument("--init", default=None, help="start from the weights in another run's state.pt")
    ap.add_argument("--min-snr", type=float, default=5.0)
    ap.add_argument("--cond-drop", type=float, default=0.1, help="caption dropout to zeros (for CFG)")
    ap.add_argument("--channels", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--attn-levels", type=int, default=1, help="lowest-resolution levels with attention")
    ap.add_argument("--layers", type=int, default=1, help="layers_per_block")
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the dev box is shared)")
    ap.add_argument("--ckpt-minutes", type=float, default=10.0)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--fresh", action="store_true", help="ignore <work>/state.pt")
    ap.add_argument("--verify", default=None, help="a saved folder: load with diffusers and sample a grid")
    ap.add_argument("--grid", default="samples.png")
    ap.add_argument("--captions", nargs="*", default=None)
    ap.add_argument("--sample-steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=GUIDANCE)
    ap.add_argument("--cols", type=int, default=8)
    ap.add_argument("--scale", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    verify(args) if args.verify else train(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
