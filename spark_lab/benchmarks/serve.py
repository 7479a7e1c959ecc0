"""`spark-lab bench serve`: many users at once. Aggregate decode tokens/s and p50/p95 time to first
token at 1, 4, 8 and 16 concurrent streamed chat requests, spark_lab's server beside llama-server on
the same GGUF, threads and context per slot.

Both servers run as subprocesses with `parallel` slots (the largest concurrency); rounds alternate
spark_lab, llama-server, spark_lab, ... and each figure is the median over `--repeats` rounds. A round
at concurrency c starts c streams at once (different prompts, temperature 0, `max_tokens` each);
aggregate tok/s = completion tokens of all c / the round's wall time; TTFT = request sent -> first
content chunk. llama-server comes from `--llama-server PATH` or $SPARK_LAB_LLAMA_SERVER; without it
the table holds spark_lab alone, and says so.

    spark-lab bench serve [--threads 2] [--repeats 3] [--markdown] [--llama-server PATH] [--quick]
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

STREAMS = (1, 4, 8, 16)
QUICK_STREAMS = (1, 4)
SLOT_CTX = 512                     # context per slot for both servers
TOPICS = ["the sea", "a lighthouse", "mountains", "a city at night", "an old library", "the desert", "a forest",
          "a train journey", "winter", "a garden", "the moon", "a market", "a river", "a storm", "a small boat",
          "a bakery"]
LLAMA_SERVER_GUESSES = ["/work/llama_src/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-server"]


def find_llama_server(given: str | None) -> str | None:
    """--llama-server PATH (must be there), else $SPARK_LAB_LLAMA_SERVER, PATH, the local build; None: none."""
    if given and not (Path(given).is_file() and os.access(given, os.X_OK)):
        raise ValueError(f"--llama-server {given}: no executable there")
    for p in [given, os.environ.get("SPARK_LAB_LLAMA_SERVER"), shutil.which("llama-server"), *LLAMA_SERVER_GUESSES]:
        if p and Path(p).is_file() and os.access(p, os.X_OK):
            return str(p)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(root: str, proc, timeout: float = 300) -> None:
    import httpx
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}) before it was ready")
        try:
            if httpx.get(root + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the server at {root} was not ready within {timeout:g} s")


def start_spark(model: str, threads: int, parallel: int):
    port = _free_port()
    env = dict(os.environ, SPARK_LAB_THREADS=str(threads), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "spark_lab.cli", "serve", "--port", str(port), "--model", model,
           "--parallel", str(parallel), "--n-ctx", str(SLOT_CTX)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = f"http://127.0.0.1:{port}"
    _wait_ready(root, proc)
    return proc, root


def start_llama(binary: str, gguf: Path, threads: int, parallel: int):
    port = _free_port()
    cmd = [binary, "-m", str(gguf), "--port", str(port), "--host", "127.0.0.1", "--parallel", str(parallel),
           "--cont-batching", "-t", str(threads), "-tb", str(threads), "-c", str(SLOT_CTX * parallel)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = f"http://127.0.0.1:{port}"
    _wait_ready(root, proc)
    return proc, root


def one_stream(client, root: str, model: str, i: int, max_tokens: int) -> tuple[float | None, int]:
    """One streamed chat request on an open httpx.Client -> (seconds to the first content chunk,
    completion tokens). The client is made before the clock starts: building one (an SSL context
    with the CA bundle, ~25 ms of CPU under the GIL) for 8 streams at once took ~0.25 s of the
    measured time to first token, for either server."""
    body = {"model": model, "messages": [{"role": "user", "content": f"Write a long story about {TOPICS[i % len(TOPICS)]}."}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, chunks, usage = None, 0, None
    with client.stream("POST", root + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("usage"):
                usage = obj["usage"].get("completion_tokens")
            for c in obj.get("choices") or []:
                if (c.get("delta") or {}).get("content"):
                    chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - t0
    return ttft, usage if usage is not None else chunks


def round_at(root: str, model: str, c: int, max_tokens: int) -> dict:
    import httpx
    clients = [httpx.Client() for _ in range(c)]
    try:
        with ThreadPoolExecutor(c) as pool:
            list(pool.map(lambda cl: cl.get(root + "/health"), clients))     # threads up, connections open
            t0 = time.perf_counter()
            res = list(pool.map(lambda i: one_stream(clients[i], root, model, i, max_tokens), range(c)))
            wall = time.perf_counter() - t0
    finally:
        for cl in clients:
            cl.close()
    tokens = sum(n for _, n in res)
    ttfts = sorted(t for t, _ in res if t is not None)
    return {"tok_s": tokens / wall, "ttfts": ttfts, "tokens": tokens, "wall": wall}


def _pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]


def measure(model_name: str, gguf: Path, threads: int, streams, repeats: int, max_tokens: int,
            llama: str | None, log=print) -> dict:
    parallel = max(streams)
    servers = {}
    try:
        servers["spark_lab"] = start_spark(model_name, threads, parallel)
        if llama:
            servers["llama-server"] = start_llama(llama, gguf, threads, parallel)
        names = list(servers)
        from ..serve import ServerConfig
        model_id = ServerConfig(default_model=model_name).default_model_id   # a path is served by its stem
        raw = {n: {c: [] for c in streams} for n in names}
        for name in names:                                   # warm-up: load, compile, first touch
            round_at(servers[name][1], model_id, 1, 4)
        for rep in range(repeats):
            for c in streams:
                order = names if rep % 2 == 0 else names[::-1]
                for name in order:
                    r = round_at(servers[name][1], model_id, c, max_tokens)
                    raw[name][c].append(r)
                    log(f"  {name:12s} streams={c:2d} rep {rep + 1}: {r['tok_s']:7.1f} tok/s, "
                        f"TTFT p50 {_pct(r['ttfts'], 0.5) * 1e3:.0f} ms p95 {_pct(r['ttfts'], 0.95) * 1e3:.0f} ms")
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    out = {"model": model_name, "threads": threads, "max_tokens": max_tokens, "repeats": repeats,
           "slot_ctx": SLOT_CTX, "parallel": parallel, "anchor": llama, "rows": []}
    for c in streams:
        row = {"streams": c}
        for name in raw:
            rs = raw[name][c]
            row[name] = {"tok_s": statistics.median(r["tok_s"] for r in rs),
                         "ttft_p50_ms": statistics.median(_pct(r["ttfts"], 0.5) for r in rs) * 1e3,
                         "ttft_p95_ms": statistics.median(_pct(r["ttfts"], 0.95) for r in rs) * 1e3}
        if "llama-server" in row:
            row["ratio"] = row["spark_lab"]["tok_s"] / row["llama-server"]["tok_s"]
        out["rows"].append(row)
    single = out["rows"][0]["spark_lab"]["tok_s"]
    for row in out["rows"]:
        row["scaling"] = row["spark_lab"]["tok_s"] / single
    return out


def markdown(res: dict) -> str:
    anchor = res["anchor"] is not None
    head = "| streams | spark_lab tok/s | TTFT p50 / p95 ms | x single |"
    sep = "|---:|---:|---:|---:|"
    if anchor:
        head += " llama-server tok/s | TTFT p50 / p95 ms | spark / llama |"
        sep += "---:|---:|---:|"
    lines = [head, sep]
    for r in res["rows"]:
        s = r["spark_lab"]
        line = (f"| {r['streams']} | {s['tok_s']:.1f} | {s['ttft_p50_ms']:.0f} / {s['ttft_p95_ms']:.0f} | "
                f"{r['scaling']:.2f} |")
        if anchor:
            ll = r["llama-server"]
            line += f" {ll['tok_s']:.1f} | {ll['ttft_p50_ms']:.0f} / {ll['ttft_p95_ms']:.0f} | {r['ratio']:.2f} |"
        lines.append(line)
    note = (f"{res['model']}, {res['threads']} threads, {res['parallel']} slots of {res['slot_ctx']} tokens, "
            f"{res['max_tokens']} tokens per stream, median of {res['repeats']}")
    note += "" if anchor else "; llama-server not found (--llama-server PATH): spark_lab alone, no anchor"
    return "\n".join(lines) + f"\n\n{note}\n"


def main(args) -> int:
    from ..models import DEFAULT_LLM, resolve
    model = args.model or DEFAULT_LLM
    gguf = resolve(model, "llm")
    threads = args.threads or int(os.environ.get("SPARK_LAB_THREADS") or os.cpu_count() or 1)
    quick = getattr(args, "quick", False)
    streams = tuple(getattr(args, "streams", None) or (QUICK_STREAMS if quick else STREAMS))
    repeats = 1 if quick else args.repeats
    max_tokens = getattr(args, "max_tokens", None) or (16 if quick else 64)
    llama = None if getattr(args, "spark_only", False) else find_llama_server(getattr(args, "llama_server", None))
    if llama is None:
        print("llama-server not found (--llama-server PATH or $SPARK_LAB_LLAMA_SERVER): measuring spark_lab alone",
              flush=True)
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if args.json else (lambda s: print(s, flush=True))
    res = measure(model, gguf, threads, streams, repeats, max_tokens, llama, log)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print(markdown(res))
    return 0
