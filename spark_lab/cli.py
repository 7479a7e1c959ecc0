"""`spark-lab`: the command line (a stable contract: see DESIGN.md).

Argument parsing for every subcommand lives here, so the contract reads in one place; the
work is done by the capability modules, imported lazily so `spark-lab info` stays fast.
Errors exit non-zero with one clear line on stderr (SPARK_LAB_DEBUG=1 shows the traceback).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

# subcommand -> "module:function"; each function takes the parsed args and returns an exit code
HANDLERS = {
    "info": "spark_lab.cli:cmd_info",
    "models": "spark_lab.cli:cmd_models",
    "plan": "spark_lab.cli:cmd_plan",
    "generate": "spark_lab.llm.cli:cmd_generate",
    "chat": "spark_lab.llm.cli:cmd_chat",
    "summarize": "spark_lab.summarize:cmd_summarize",
    "imagine": "spark_lab.diffusion.cli:cmd_imagine",
    "bench": "spark_lab.bench:cmd_bench",
    "serve": "spark_lab.serve:cmd_serve",
    "batch": "spark_lab.batch:cmd_batch",
}


def _positive_int(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def _nonneg_float(s: str) -> float:
    v = float(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


def _sampling_options(s) -> None:
    """generate's and chat's sampling flags; unset ones take SamplingParams' defaults (llm/sampling.py)."""
    s.add_argument("--temperature", type=float, default=None, help="default 0.7; 0 is greedy")
    s.add_argument("--top-k", type=int, default=None, help="default 40; 0 is off")
    s.add_argument("--top-p", type=float, default=None, help="default 0.9; 1 is off")
    s.add_argument("--min-p", type=float, default=None, help="default 0.05; 0 is off")
    s.add_argument("--repetition-penalty", type=float, default=None,
                   help="default 1.1 over the last 64 tokens when sampling, off when greedy; 1 is off")
    s.add_argument("--seed", type=int, default=None, help="default 0 (the same answer each run); -1 draws one")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spark-lab", description="A local AI lab: chat, images and summaries on spark_lab's own kernels.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="device, memory, BLAS/threads, models present")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("models", help="the model catalogue")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("plan", help="will MODEL fit? weights + KV cache + activations")
    s.add_argument("model", help="catalogue name, .gguf path, or 'custom' with --params/--layers/...")
    s.add_argument("--context", type=_positive_int, default=None)
    s.add_argument("--batch", type=_positive_int, default=1)
    s.add_argument("--kv-dtype", default="f16", choices=["f32", "f16", "bf16", "q8_0", "q4_0"])
    s.add_argument("--params", type=float, help="parameters (e.g. 200e9) for a model given by its shape")
    s.add_argument("--bits", type=float, default=4.5, help="weight bits per parameter (with --params)")
    s.add_argument("--layers", type=int)
    s.add_argument("--kv-heads", type=int)
    s.add_argument("--head-dim", type=int)
    s.add_argument("--hidden", type=int)
    s.add_argument("--vocab", type=int, default=32000)
    s.add_argument("--size", default=None, metavar="WxH",
                   help="image models (flux-dev, sd3-medium, sdxl-base, a diffusers folder, a Flux GGUF): pixels")
    s.add_argument("--format", dest="weight_format", default=None,
                   help="image models by name: how the denoiser is stored (bf16, fp16, Q8_0, Q4_K, ...)")
    s.add_argument("--free-text-encoders", action="store_true",
                   help="image models: the text encoders are dropped once the prompt is encoded")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("generate", help="generate text from a prompt")
    s.add_argument("prompt", help="the prompt, or - to read it from stdin")
    s.add_argument("--model", default=None)
    s.add_argument("--raw", action="store_true", help="tokenize PROMPT as given (no chat template)")
    s.add_argument("--max-new-tokens", type=int, default=128)
    _sampling_options(s)
    s.add_argument("--context", type=int, default=None, help="context length (default: the model's, capped at 4096)")
    s.add_argument("--json-schema", default=None, metavar="FILE", help="constrain the answer to this JSON Schema")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("chat", help="streaming terminal chat")
    s.add_argument("--model", default=None)
    s.add_argument("--system", default=None, help="system prompt")
    s.add_argument("--max-new-tokens", type=int, default=512)
    _sampling_options(s)

    s = sub.add_parser("summarize", help="summarize a document (.txt, .md, .html) or stdin")
    s.add_argument("file", help="FILE or - for stdin")
    s.add_argument("--model", default=None)
    s.add_argument("--method", default="extractive", choices=["abstractive", "extractive", "hybrid"])
    s.add_argument("--max-words", type=_positive_int, default=150)
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("imagine", help="text to image")
    s.add_argument("prompt")
    s.add_argument("--model", default=None)
    s.add_argument("--steps", type=int, default=25)
    s.add_argument("--guidance", type=float, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--scheduler", default=None, help="ddpm, ddim, euler, flow-euler (default: the model's)")
    s.add_argument("--num-images", type=_positive_int, default=1)
    s.add_argument("--out", default="image.png")
    s.add_argument("--mkdir", action="store_true", help="create --out's folder if it does not exist")
    s.add_argument("--init", default=None, metavar="IMAGE", help="image to image: start from this picture")
    s.add_argument("--strength", type=float, default=None,
                   help="with --init: how far to move from it, in (0, 1] (default: the model's; 1 with --mask)")
    s.add_argument("--mask", default=None, metavar="MASK",
                   help="with --init: inpaint where MASK is white (the same size as --init)")
    s.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="apply a LoRA safetensors file (repeatable; SCALE default 1)")

    s = sub.add_parser("bench", help="side-by-side benchmarks against the anchors")
    s.add_argument("what", choices=["llm", "kernels", "imagine", "summarize", "questions", "constrain", "batch", "serve"])
    s.add_argument("--json", action="store_true")
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--model", default=None)
    s.add_argument("--repeats", type=_positive_int, default=3)
    s.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats (CI)")
    s.add_argument("--markdown", action="store_true", help="llm: the README's table")
    s.add_argument("--cache-type-k", default=None, choices=["f32", "f16", "q8_0"], help="llm: KV cache type (default f16)")
    s.add_argument("--cache-type-v", default=None, choices=["f32", "f16", "q8_0"])
    s.add_argument("--contexts", type=int, nargs="*", default=None, help="llm: deep contexts for decode (synthetic: 4096 16384)")
    s.add_argument("--prefill-tokens", type=int, default=512, help="llm: prompt length of the prefill measurement (0: skip)")
    s.add_argument("--spark-only", action="store_true", help="llm: without llama.cpp")
    s.add_argument("--llama-server", default=None, help="serve: the llama-server binary (or $SPARK_LAB_LLAMA_SERVER)")
    s.add_argument("--streams", type=_positive_int, nargs="*", default=None, help="serve: concurrencies (default 1 4 8 16)")
    s.add_argument("--max-tokens", type=_positive_int, default=None, help="serve: tokens per stream (default 64)")
    s.add_argument("--long", action="store_true", help="summarize: time abstractive on a 30k-word report, headed vs unheaded")

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None)
    s.add_argument("--model", default=None)
    s.add_argument("--parallel", type=_positive_int, default=None, help="chat requests decoding at once (default: cores, 4..16)")
    s.add_argument("--max-waiting", type=int, default=64, help="requests waiting beyond --parallel before 429")
    s.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take (0: no limit)")
    s.add_argument("--n-ctx", type=_positive_int, default=None, help="context per slot (default: the engine's)")

    s = sub.add_parser("batch", help="map a job over many inputs on a Dask cluster (local or remote)")
    s.add_argument("task", choices=["summarize", "embed", "generate", "imagine"])
    s.add_argument("input", help="a folder of documents, a .jsonl ({id, text|prompt}) or .parquet file")
    s.add_argument("--out", required=True, help="results: .jsonl, or .parquet (journaled to OUT.jsonl)")
    s.add_argument("--workers", type=_positive_int, default=None, help="local worker processes (default: cores)")
    s.add_argument("--threads", type=_positive_int, default=None, help="compute threads per worker (default: cores // workers)")
    s.add_argument("--scheduler", default=None, help="tcp://HOST:8786 of an existing cluster (or DASK_SCHEDULER_ADDRESS)")
    s.add_argument("--model", default=None)
    s.add_argument("--method", default=None, choices=["abstractive", "extractive", "hybrid"], help="summarize (default extractive)")
    s.add_argument("--max-words", type=_positive_int, default=None, help="summarize (default 150)")
    s.add_argument("--max-new-tokens", type=_positive_int, default=None, help="generate (default 128)")
    s.add_argument("--temperature", type=_nonneg_float, default=None, help="generate (default 0: greedy)")
    s.add_argument("--raw", action="store_true", help="generate: the prompt as given, no chat template")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--steps", type=_positive_int, default=None, help="imagine (default 25)")
    s.add_argument("--guidance", type=float, default=None, help="imagine (default: the model's)")
    s.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="skip inputs already in OUT (default on; --no-resume starts over)")
    s.add_argument("--retry-errors", action="store_true", help="with --resume: redo the inputs that failed")
    s.add_argument("--progress", action="store_true", help="a progress bar even when stderr is not a terminal")
    s.add_argument("--json", action="store_true", help="print the run's report as JSON")
    return p


# ------------------------------------------------------------------------------ handlers

def cmd_info(args) -> int:
    from . import device, memory, models
    device.set_threads()
    info = device.device_info()
    st = memory.get_allocator().stats()
    info["budget"] = st.budget
    info["models"] = {r["name"]: r["present"] for r in models.list_models()}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    fb = memory.fmt_bytes
    print(f"device     {info['device']} ({info['name']})")
    print(f"memory     {fb(info['memory_available'])} available of {fb(info['memory_total'])}"
          f"{' (unified with the GPU)' if info['device'] == 'cuda' and info.get('unified_memory') else ''}; budget {fb(st.budget)}")
    if info["device"] == "cuda":
        print(f"gpu        compute {info['compute_capability']}, CuPy {info['cupy']}, CUDA runtime {info['cuda_runtime']}")
    cx = info["cupy_extra"]
    print(f"cupy       {cx['extra'] or 'none'} ({cx['source']}: {cx['reason']})"
          f"{'' if cx['cupy_installed'] or not cx['extra'] else '; CuPy is not installed: make setup installs it'}")
    print(f"cpu        {info['cpu_cores']} cores, {info['threads']} thread{'s' if info['threads'] != 1 else ''} for the kit")
    for b in info["blas"]:
        print(f"blas       {b['library']} {b['version']} ({b['threads']} threads)")
    for name, present in info["models"].items():
        print(f"model      {name:24s} {'present' if present else 'missing'}")
    return 0


def cmd_models(args) -> int:
    from .models import list_models
    rows = list_models()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':24s} {'kind':10s} {'arch':18s} {'size':6s} present  source")
    for r in rows:
        print(f"{r['name']:24s} {r['kind']:10s} {r['arch']:18s} {r['params']:6s} {'yes' if r['present'] else 'no ':7s}  {r['source']}")
    return 0


def _image_size(text: str | None):
    if text is None:
        return None, None
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size {text!r}: expected WIDTHxHEIGHT in pixels, e.g. 1024x1024") from None
    return w, h


def _is_image_model(model: str) -> bool:
    from .planner_images import KNOWN_IMAGE_MODELS
    p = Path(model)
    if model.lower() in KNOWN_IMAGE_MODELS or (p / "model_index.json").is_file():
        return True
    if p.is_file() and p.suffix == ".gguf":
        from .gguf import GGUFFile
        return GGUFFile(p).arch in ("flux", "sd3", "sdxl")
    return False


def cmd_plan(args) -> int:
    from . import planner
    if args.params is None and _is_image_model(args.model):
        from .planner_images import plan_image
        w, h = _image_size(args.size)
        p = plan_image(args.model, w, h, batch=args.batch, weight_format=args.weight_format,
                       free_text_encoders=args.free_text_encoders)
        print(json.dumps(p.to_dict(), indent=2) if args.json else p.report())
        return 0
    if args.size or args.weight_format or args.free_text_encoders:
        raise ValueError(f"--size/--format/--free-text-encoders are for image models; {args.model} is a language model")
    if args.params is not None:
        shape = planner.ModelShape(
            name=args.model, params=args.params, bits_per_weight=args.bits,
            layers=args.layers, kv_heads=args.kv_heads, head_dim=args.head_dim,
            hidden=args.hidden, vocab=args.vocab)
    else:
        shape = planner.shape_from_model(args.model)
    p = planner.plan(shape, context=args.context, batch=args.batch, kv_dtype=args.kv_dtype)
    if args.json:
        print(json.dumps(p.to_dict(), indent=2))
    else:
        print(p.report())
    return 0


# ------------------------------------------------------------------------------ entry

def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    mod_name, fn_name = HANDLERS[args.command].split(":")
    try:
        from .device import set_threads
        set_threads(getattr(args, "threads", None))
        fn = getattr(importlib.import_module(mod_name), fn_name)
        return int(fn(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:
        if os.environ.get("SPARK_LAB_DEBUG"):
            raise
        print(f"spark-lab {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
