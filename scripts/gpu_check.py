"""The GPU check: kernels, models end to end on CuPy, and speed against torch, in one JSON report.

Run by scripts/gpu_check.sh (which picks the Python and the report path). Each part runs in its
own subprocess under a timeout, and the report is rewritten after every part, so a crash, a
hang or a missing package costs that part only. Nothing is downloaded: the LLM is SmolLM2-135M
when its package is installed, else a random GGUF of SmolLM2-135M's shape (the same kernels,
sizes and speed; the tokens are compared CPU vs GPU, not against a reference text); the image
model is the repository's own spark-emoji with a fixed random conditioning vector.

    python scripts/gpu_check.py --report out/gpu_report.json [--budget 450] [--device cuda|strict]

`--device strict` runs the same parts on the CPU stand-in for CuPy (a dry run of this script).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("numpy", "cupy", "numba", "gguf", "torch", "transformers", "diffusers", "safetensors", "tokenizers",
            "pytest", "threadpoolctl", "psutil", "jinja2", "tqdm", "plotly", "PIL")
SMOL = dict(n_layer=30, d=576, n_head=9, n_kv=3, ff=1536, vocab=49152)   # SmolLM2-135M's shape
TORCH_DEV = os.environ.get("GPU_CHECK_TORCH_DEVICE", "cuda")              # "cpu" to dry-run the torch parts
PROMPT, NEW = 128, 32                                                     # prefill tokens, decoded tokens
if os.environ.get("GPU_CHECK_TINY"):                                      # a quick dry run of this script
    SMOL, PROMPT, NEW = dict(SMOL, n_layer=2, vocab=2048), 16, 6


# ---------------------------------------------------------------------------- parts (run in children)

def part_env(args) -> dict:
    out = {"python": sys.version.split()[0], "machine": platform.machine(), "packages": {}}
    for name in PACKAGES:
        try:
            out["packages"][name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception as e:  # missing, or broken (e.g. a CuPy without its CUDA libraries)
            out["packages"][name] = f"missing ({type(e).__name__})"
    from spark_lab import device
    try:
        info = device.device_info()
    except Exception as e:                                   # e.g. threadpoolctl missing: report what we can
        out["device_info_error"] = f"{type(e).__name__}: {e}"
        info = {"device": device.get_device().kind, "name": device.get_device().name,
                "cupy_extra": device.cupy_choice()}
    out["device"] = {k: info.get(k) for k in ("device", "name", "compute_capability", "memory_total", "cupy",
                                              "cuda_runtime", "cuda_driver", "unified_memory", "cupy_extra")}
    return out


def part_pytest_gpu(args) -> dict:
    import xml.etree.ElementTree as ET
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                   if "mark.gpu" in p.read_text(errors="replace"))
    xml = Path(args.work) / "pytest_gpu.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                           f"--junitxml={xml}", *files], cwd=ROOT, capture_output=True, text=True)
    out = {"files": files, "returncode": proc.returncode, "tail": proc.stdout[-3000:] + proc.stderr[-1000:]}
    if xml.exists():
        cases = ET.parse(xml).getroot().iter("testcase")
        res = {"passed": [], "failed": [], "skipped": []}
        for c in cases:
            name = f"{c.get('classname')}::{c.get('name')}"
            kind = "failed" if c.find("failure") is not None or c.find("error") is not None else \
                   "skipped" if c.find("skipped") is not None else "passed"
            res[kind].append(name)
        out.update({k: len(v) for k, v in res.items()}, failed_tests=res["failed"], skipped_tests=res["skipped"][:20])
    return out


def _write_smol_gguf(path: Path, qname: str = "Q8_0", seed: int = 0) -> Path:
    """A random GGUF of SmolLM2-135M's shape (llama arch, tied embeddings), quantized like the shipped one."""
    import gguf
    import numpy as np
    s, rng = SMOL, np.random.default_rng(seed)
    qtype = gguf.GGMLQuantizationType[qname]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(s["n_layer"])
    w.add_context_length(8192)
    w.add_embedding_length(s["d"])
    w.add_feed_forward_length(s["ff"])
    w.add_head_count(s["n_head"])
    w.add_head_count_kv(s["n_kv"])
    w.add_rope_freq_base(100000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(s["vocab"])

    def mat(name, rows, cols, scale=0.06):
        a = (rng.standard_normal((rows, cols), dtype=np.float32) * scale)
        w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)

    def vec(name, n):
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32))

    d, hd = s["d"], s["d"] // s["n_head"]
    mat("token_embd.weight", s["vocab"], d, 0.1)
    vec("output_norm.weight", d)
    for i in range(s["n_layer"]):
        b = f"blk.{i}."
        vec(b + "attn_norm.weight", d)
        mat(b + "attn_q.weight", s["n_head"] * hd, d, 0.15)
        mat(b + "attn_k.weight", s["n_kv"] * hd, d, 0.15)
        mat(b + "attn_v.weight", s["n_kv"] * hd, d)
        mat(b + "attn_output.weight", d, s["n_head"] * hd)
        vec(b + "ffn_norm.weight", d)
        mat(b + "ffn_gate.weight", s["ff"], d)
        mat(b + "ffn_up.weight", s["ff"], d)
        mat(b + "ffn_down.weight", d, s["ff"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _llm_path(args) -> tuple[Path, str]:
    if not os.environ.get("GPU_CHECK_SYNTHETIC"):           # set: the random model even where SmolLM2 is installed
        try:
            from spark_lab.models import resolve
            return resolve("smollm2-135m-instruct", "llm"), "SmolLM2-135M-Instruct (installed package)"
        except Exception:
            pass
    path = Path(args.work) / f"smollm2-shape-q8_0-{SMOL['n_layer']}x{SMOL['vocab']}.gguf"
    if not path.exists():
        _write_smol_gguf(path.with_suffix(".tmp"))
        path.with_suffix(".tmp").rename(path)
    return path, "random weights in SmolLM2-135M's shape, Q8_0 (no model package on this machine)"


def part_llm_make(args) -> dict:
    t = time.perf_counter()
    path, what = _llm_path(args)
    return {"path": str(path), "model": what, "seconds": round(time.perf_counter() - t, 1)}


def part_llm(args) -> dict:
    """Greedy tokens and speed on the current SPARK_LAB_DEVICE: prefill PROMPT tokens, decode NEW."""
    import numpy as np
    from spark_lab import device
    from spark_lab.gguf import GGUFFile, config_from_gguf
    from spark_lab.llm.cache import KVCache
    from spark_lab.llm.model import Transformer
    path, what = _llm_path(args)
    dev = device.get_device()
    t0 = time.perf_counter()
    f = GGUFFile(path)
    c = config_from_gguf(f)
    model = Transformer(f, c)
    load = time.perf_counter() - t0
    prompt = np.random.default_rng(1).integers(0, c.n_vocab, PROMPT).astype(np.int64)

    def run(n_new):
        cache = KVCache(c.n_layer, PROMPT + n_new + 1, c.n_head_kv, c.head_dim)
        device.synchronize()
        t = time.perf_counter()
        row = device.to_host(model.forward(prompt, 0, cache)[-1])          # the logits row, as the engine does
        tp = time.perf_counter() - t
        toks = [int(np.argmax(row))]
        t = time.perf_counter()
        for i in range(n_new - 1):
            row = device.to_host(model.forward(np.array([toks[-1]], np.int64), PROMPT + i, cache)[-1])
            toks.append(int(np.argmax(row)))
        device.synchronize()
        return toks, tp, time.perf_counter() - t

    run(4)                                                                  # warm-up: compiles, caches
    toks, tp, td = run(NEW)
    tr = device.transfers()
    per_token = None
    if tr is not None:                                                      # strict: copies per decoded token
        tr.reset()
        run(3)
        s = tr.snapshot()
        per_token = {"d2h": s.d2h / 3, "h2d": s.h2d / 3}
    return {"device": dev.kind, "name": dev.name, "model": what, "tokens": toks, "load_seconds": round(load, 2),
            "prefill_tokens_per_second": round(PROMPT / tp, 1), "decode_tokens_per_second": round((NEW - 1) / td, 1),
            "transfers_per_token": per_token}


def part_torch_llm(args) -> dict:
    """The same weights (dequantized) in transformers' LlamaForCausalLM on torch CUDA: prefill/decode speed."""
    import numpy as np
    import torch
    import transformers
    from spark_lab.gguf import GGUFFile, config_from_gguf
    from spark_lab.quants import dequantize
    path, what = _llm_path(args)
    f = GGUFFile(path)
    c = config_from_gguf(f)
    cfg = transformers.LlamaConfig(vocab_size=c.n_vocab, hidden_size=c.n_embd, intermediate_size=c.n_ff,
                                   num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
                                   num_key_value_heads=c.n_head_kv, rms_norm_eps=c.rms_eps, rope_theta=c.rope_theta,
                                   max_position_embeddings=4096, tie_word_embeddings="output.weight" not in f.tensors)

    def w(name):
        t = f.tensors[name]
        return torch.from_numpy(np.ascontiguousarray(dequantize(f.raw(t), t.qtype, t.shape), dtype=np.float32))

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    for i in range(c.n_layer):
        for hf, gg in (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                       ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                       ("mlp.down_proj", "ffn_down"), ("input_layernorm", "attn_norm"),
                       ("post_attention_layernorm", "ffn_norm")):
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    if "output.weight" in f.tensors:
        names["lm_head.weight"] = "output.weight"
    out = {"model": what, "transformers": transformers.__version__, "torch": torch.__version__}
    prompt = torch.from_numpy(np.random.default_rng(1).integers(0, c.n_vocab, PROMPT)).long()[None]
    for dtype in (torch.float32, torch.bfloat16):
        m = transformers.LlamaForCausalLM(cfg)
        m.load_state_dict({k: w(v) for k, v in names.items()}, strict=False)
        m = m.to(TORCH_DEV, dtype).eval()
        ids = prompt.to(TORCH_DEV)
        with torch.no_grad():
            m.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)         # warm-up
            _sync(torch)
            t = time.perf_counter()
            m(ids)
            _sync(torch)
            tp = time.perf_counter() - t
            t = time.perf_counter()
            m.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
            _sync(torch)
            tg = time.perf_counter() - t
        td = max(tg - tp, 1e-9)                                                # generate = prefill + NEW-1 steps
        out[str(dtype).split(".")[-1]] = {"prefill_tokens_per_second": round(PROMPT / tp, 1),
                                          "decode_tokens_per_second": round((NEW - 1) / td, 1)}
        del m
        _sync(torch)
    return out


def _sync(torch):
    if TORCH_DEV.startswith("cuda"):
        torch.cuda.synchronize()


def _emoji_embeds():
    import numpy as np
    e = np.random.default_rng(7).standard_normal((1, 1, 384)).astype(np.float32)
    return e / np.linalg.norm(e)


def part_image(args) -> dict:
    """spark-emoji (10 DDIM steps, guidance 2) on the current device; the image saved for comparison."""
    import numpy as np
    from spark_lab import device
    from spark_lab.diffusion import TextToImagePipeline
    pipe = TextToImagePipeline.from_pretrained("spark-emoji")
    kw = dict(prompt_embeds=_emoji_embeds(), seed=0, output_type="np", progress=False)
    pipe(num_inference_steps=2, **kw)                                         # warm-up
    snaps, tr = [], device.transfers()
    if tr is not None:
        tr.reset()
    t = time.perf_counter()
    img = pipe(num_inference_steps=10, callback=(lambda i, t_, x: snaps.append(tr.snapshot())) if tr else None, **kw)
    sec = time.perf_counter() - t
    np.save(Path(args.work) / f"emoji_{device.get_device().kind}.npy", img)
    t = time.perf_counter()
    pipe(num_inference_steps=25, **kw)
    out = {"device": device.get_device().kind, "seconds_10_steps": round(sec, 3),
           "seconds_25_steps": round(time.perf_counter() - t, 3), "shape": list(img.shape)}
    if len(snaps) > 1:
        out["d2h_per_step"] = (snaps[-1].d2h - snaps[0].d2h) / (len(snaps) - 1)
    return out


def part_diffusers_image(args) -> dict:
    """The same UNet in diffusers on torch CUDA, 25 DDIM steps with guidance (batch 2): time per image."""
    import numpy as np
    import torch
    import diffusers
    from spark_lab.models import resolve
    folder = resolve("spark-emoji", "diffusion")
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet").to(TORCH_DEV).eval()
    sched = diffusers.DDIMScheduler.from_pretrained(folder / "scheduler")
    size = unet.config.sample_size
    ctx = torch.from_numpy(np.concatenate([np.zeros_like(_emoji_embeds()), _emoji_embeds()])).to(TORCH_DEV)
    out = {"diffusers": diffusers.__version__, "torch": torch.__version__}
    for steps in (2, 25):
        x = torch.from_numpy(np.random.default_rng(0).standard_normal((1, unet.config.in_channels, size, size),
                                                                       dtype=np.float32)).to(TORCH_DEV)
        sched.set_timesteps(steps)
        _sync(torch)
        t = time.perf_counter()
        with torch.no_grad():
            for ts in sched.timesteps:
                o = unet(torch.cat([x, x]), ts, encoder_hidden_states=ctx).sample
                o = o[:1] + 2.0 * (o[1:] - o[:1])
                x = sched.step(o, ts, x).prev_sample
        _sync(torch)
        out[f"seconds_{steps}_steps"] = round(time.perf_counter() - t, 3)
    return out


def part_compare(args) -> dict:
    """CPU vs GPU: greedy tokens equal, image max |diff|, speed ratios vs torch."""
    import numpy as np
    rep = json.loads(Path(args.report).read_text())
    p = rep["parts"]
    res = lambda k: (p.get(k) or {}).get("result") or {}                     # noqa: E731
    out = {}
    g, c = res("llm_gpu"), res("llm_cpu")
    if g.get("tokens") and c.get("tokens"):
        a, b = g["tokens"], c["tokens"]
        out["llm_tokens_equal"] = a == b
        out["llm_first_difference"] = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        numba = ((p.get("env") or {}).get("result") or {}).get("packages", {}).get("numba", "")
        if str(numba).startswith("missing"):   # the CPU then multiplies exact floats, the GPU int8-rounded x
            out["llm_note"] = "numba missing: the CPU path does not round x to int8 as the GPU does; tokens may differ"
    t = res("torch_llm")
    for dt in ("float32", "bfloat16"):
        if g and dt in t:
            for k in ("prefill_tokens_per_second", "decode_tokens_per_second"):
                out[f"llm_{k.split('_')[0]}_vs_torch_{dt}"] = round(g[k] / t[dt][k], 3)
    work = Path(args.work)
    gpu_img, cpu_img = work / f"emoji_{args.device}.npy", work / "emoji_cpu.npy"
    if gpu_img.exists() and cpu_img.exists():
        out["image_max_abs_diff_vs_cpu"] = float(np.abs(np.load(gpu_img) - np.load(cpu_img)).max())
    d, im = res("diffusers_image"), res("image_gpu")
    if d and im:
        out["image_25_steps_vs_diffusers"] = round(d["seconds_25_steps"] / im["seconds_25_steps"], 3)
    return out


PARTS = {"env": part_env, "pytest_gpu": part_pytest_gpu, "llm_make": part_llm_make, "llm_gpu": part_llm,
         "llm_cpu": part_llm, "torch_llm": part_torch_llm, "image_gpu": part_image, "image_cpu": part_image,
         "diffusers_image": part_diffusers_image, "compare": part_compare}
# (part, device it runs on, its own time limit in seconds), most important first: the models end to
# end and their CPU twins, then torch, then the gpu tests (the longest; --skip pytest_gpu on a short
# budget). compare always runs last (it only reads the report).
PLAN = [("env", "gpu", 60), ("llm_make", "cpu", 90), ("llm_gpu", "gpu", 90), ("image_gpu", "gpu", 120),
        ("llm_cpu", "cpu", 150), ("image_cpu", "cpu", 90), ("torch_llm", "gpu", 120),
        ("diffusers_image", "gpu", 60), ("pytest_gpu", "gpu", 240), ("compare", "cpu", 30)]


# ---------------------------------------------------------------------------- the driver

def _child(args) -> None:
    result = PARTS[args.part](args)
    print("\n@@RESULT@@" + json.dumps(result))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", default=str(ROOT / "out" / "gpu_report.json"))
    ap.add_argument("--budget", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET", 450)))
    ap.add_argument("--device", default="cuda", choices=["cuda", "strict"])
    ap.add_argument("--only", default="", help="comma-separated part names (default: all)")
    ap.add_argument("--skip", default="", help="comma-separated part names to leave out")
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part:
        _child(args)
        return 0
    report_path = Path(args.report)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    args.work = str(report_path.parent / "gpu_check_work")
    Path(args.work).mkdir(exist_ok=True)
    t_end = time.monotonic() + args.budget
    report = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": args.device,
              "budget_seconds": args.budget, "host": platform.node(), "parts": {}}
    only = {s for s in args.only.split(",") if s}
    skip = {s for s in args.skip.split(",") if s}

    def save():
        report["seconds"] = round(args.budget - (t_end - time.monotonic()), 1)
        report_path.write_text(json.dumps(report, indent=1))

    save()
    for name, where, limit in PLAN:
        if (only and name not in only) or name in skip:
            continue
        left = t_end - time.monotonic() - (0 if name == "compare" else 8)   # keep a few seconds for compare
        if left < 5:
            report["parts"][name] = {"status": "not run: out of time"}
            continue
        env = dict(os.environ, SPARK_LAB_DEVICE=args.device if where == "gpu" else "cpu",
                   PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        cmd = [sys.executable, __file__, "--part", name, "--work", args.work, "--report", str(report_path),
               "--device", args.device]
        t = time.monotonic()
        try:
            proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=min(limit, left))
            out = proc.stdout.rsplit("@@RESULT@@", 1)
            entry = {"status": "ok" if proc.returncode == 0 and len(out) == 2 else "failed"}
            if len(out) == 2:
                entry["result"] = json.loads(out[1])
            if entry["status"] != "ok":
                entry["error"] = (proc.stderr or proc.stdout)[-2500:]
        except subprocess.TimeoutExpired as e:
            entry = {"status": f"timeout after {min(limit, left):.0f} s",
                     "error": ((e.stderr or b"")[-1500:]).decode(errors="replace") if isinstance(e.stderr, bytes) else str(e.stderr)[-1500:]}
        entry["seconds"] = round(time.monotonic() - t, 1)
        report["parts"][name] = entry
        save()
        print(f"gpu_check: {name:16s} {entry['status']:10s} {entry['seconds']:6.1f} s", flush=True)
    save()
    cmp_ = (report["parts"].get("compare") or {}).get("result") or {}
    pt = (report["parts"].get("pytest_gpu") or {}).get("result") or {}
    print(f"gpu_check: kernels/tests passed {pt.get('passed')} failed {pt.get('failed')} skipped {pt.get('skipped')}; "
          f"{json.dumps(cmp_)}")
    print(f"gpu_check: report {report_path}")
    bad = [k for k, v in report["parts"].items() if v.get("status") != "ok"]
    return 1 if bad or pt.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
