"""A server under a crowd: N mixed requests from many threads, each checked for a full answer or a
clear JSON error; the server's memory and its /metrics checked afterwards.

    python -m spark_lab.serve.soak --requests 2000 [--model smollm2-135m-instruct] [--concurrency 24]

The mix: chat and completions, streamed and not, embeddings; 10% of streams hang up after their
first token; 5% malformed (bad JSON, a bad field). `make soak` runs 2,000; tests/serve runs a small twin.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor

KINDS = ("chat", "chat_stream", "completion", "completion_stream", "embedding", "disconnect", "malformed")


def plan(n: int, seed: int = 0) -> list[str]:
    """n request kinds: 10% disconnects, 5% malformed, the rest spread over the five normal kinds."""
    rng = random.Random(seed)
    kinds = ["disconnect"] * (n // 10) + ["malformed"] * (n // 20)
    normal = KINDS[:5]
    kinds += [normal[i % len(normal)] for i in range(n - len(kinds))]
    rng.shuffle(kinds)
    return kinds


def _error_ok(r) -> bool:
    try:
        e = r.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(e, dict) and bool(e.get("message"))


def _stream(client, url, body, key, hang_up: bool):
    """-> 'ok' | 'error' (a JSON error, in-band or not) | 'left' | a failure description."""
    with client.stream("POST", url, json=body, headers=key) as r:
        if r.status_code != 200:
            r.read()
            return "error" if _error_ok(r) else f"stream {r.status_code} without a JSON error"
        done = False
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            obj = json.loads(data)
            if "error" in obj:
                return "error" if obj["error"].get("message") else "in-band error without a message"
            if hang_up and obj.get("choices") and (obj["choices"][0].get("delta", {}).get("content")
                                                   or obj["choices"][0].get("text")):
                return "left"                 # leaving the with-block closes the connection midway
        return "ok" if done else "stream ended without [DONE]"


def one(client, base: str, kind: str, model: str, embedder: str, max_tokens: int, key: dict, i: int) -> str:
    prompt = f"Say something about the number {i}."
    chat = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0}
    comp = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    if kind == "malformed":
        if i % 2:
            r = client.post(base + "/chat/completions", content=b'{"model": "x", "messages": [', headers=
                            {**key, "content-type": "application/json"})
        else:
            r = client.post(base + "/chat/completions", json={**chat, "max_tokens": -5}, headers=key)
        return "error" if 400 <= r.status_code < 500 and _error_ok(r) else f"malformed got {r.status_code}"
    if kind in ("chat_stream", "completion_stream", "disconnect"):
        url = base + ("/completions" if kind == "completion_stream" else "/chat/completions")
        body = comp if kind == "completion_stream" else chat
        if kind == "disconnect":
            body = {**body, "max_tokens": max(max_tokens, 32)}
        return _stream(client, url, {**body, "stream": True}, key, kind == "disconnect")
    if kind == "embedding":
        r = client.post(base + "/embeddings", json={"model": embedder, "input": [prompt, "a second text"]}, headers=key)
        if r.status_code != 200:
            return "error" if _error_ok(r) else f"embedding {r.status_code} without a JSON error"
        data = r.json()["data"]
        return "ok" if len(data) == 2 and len(data[0]["embedding"]) > 0 else "embedding answer incomplete"
    url = base + ("/completions" if kind == "completion" else "/chat/completions")
    r = client.post(url, json=comp if kind == "completion" else chat, headers=key)
    if r.status_code != 200:
        return "error" if _error_ok(r) else f"{kind} {r.status_code} without a JSON error"
    c = r.json()["choices"][0]
    ok = c.get("finish_reason") in ("stop", "length") and ("message" in c or "text" in c)
    return "ok" if ok else f"{kind} answer incomplete"


def metrics(root: str) -> dict[str, float]:
    """GET /metrics -> {'name{labels}': value}."""
    import httpx
    out = {}
    for line in httpx.get(root + "/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def rss_mb(pid: int) -> float:
    import psutil
    return psutil.Process(pid).memory_info().rss / 2**20


def run(base: str, pid: int | None, n: int, model: str, embedder: str, concurrency: int = 16, max_tokens: int = 8,
        api_key: str | None = None, seed: int = 0, request_timeout: float = 300.0, log=None) -> dict:
    """n requests against the server at `base` (…/v1) -> a report (counts, failures, RSS, metrics checks)."""
    import httpx
    key = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    kinds = plan(n, seed)
    root = base[: -len("/v1")]
    results: list = [None] * n
    rss_100 = None
    t0 = time.perf_counter()
    with httpx.Client(timeout=request_timeout, limits=httpx.Limits(max_connections=concurrency * 2)) as client:
        def task(i):
            try:
                results[i] = one(client, base, kinds[i], model, embedder, max_tokens, key, i)
            except httpx.TimeoutException:
                results[i] = f"{kinds[i]} hung (no answer in {request_timeout:g} s)"
            except Exception as e:       # noqa: BLE001 -- every failure is reported, not raised
                results[i] = f"{kinds[i]}: {type(e).__name__}: {e}"

        with ThreadPoolExecutor(concurrency) as pool:
            head = min(100, n)
            list(pool.map(task, range(head)))
            rss_100 = rss_mb(pid) if pid else None
            if log:
                log(f"first {head} done in {time.perf_counter() - t0:.1f} s, RSS {rss_100 or 0:.0f} MB")
            list(pool.map(task, range(head, n)))
    seconds = time.perf_counter() - t0
    deadline = time.monotonic() + 30          # the server notices hang-ups within a poll
    while True:
        m = metrics(root)
        if m.get("spark_lab:requests_in_flight", 0) == 0 and m.get("llamacpp:requests_processing", 0) == 0 \
                or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    rss_end = rss_mb(pid) if pid else None
    answered = sum(v for k, v in m.items() if k.startswith("spark_lab:http_requests_total{"))
    by_status: dict = {}
    for k, v in m.items():
        s = re.search(r'status="(\d+)"', k)
        if k.startswith("spark_lab:http_requests_total{") and s:
            by_status[s.group(1)] = by_status.get(s.group(1), 0) + int(v)
    failures = [r for r in results if r not in ("ok", "error", "left")]
    report = {"requests": n, "seconds": round(seconds, 1), "ok": results.count("ok"), "errors": results.count("error"),
              "left": results.count("left"), "failures": failures[:20], "n_failures": len(failures),
              "rss_mb_after_100": rss_100, "rss_mb_end": rss_end,
              "rss_growth": (rss_end / rss_100 - 1) if rss_100 and rss_end else None,
              "metrics_received": m.get("spark_lab:requests_received_total"), "metrics_answered": answered,
              "metrics_in_flight": m.get("spark_lab:requests_in_flight"), "metrics_by_status": by_status,
              "generation_tokens": m.get("llamacpp:tokens_predicted_total"),
              "generations": {k: v for k, v in m.items() if k.startswith("spark_lab:generations_total")}}
    report["metrics_add_up"] = (report["metrics_received"] == answered + report["metrics_in_flight"]
                                and m.get("llamacpp:tokens_predicted_total") == m.get("vllm:generation_tokens_total"))
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m spark_lab.serve.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--embedder", default="all-minilm-l6-v2")
    p.add_argument("--concurrency", type=int, default=24)
    p.add_argument("--parallel", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--url", default=None, help="an already running server (…/v1); default: start one here")
    a = p.parse_args(argv)
    import os
    import subprocess
    proc = None
    url, pid = a.url, None
    if url is None:
        code = ("import sys\nfrom spark_lab.serve import ServerConfig, serve\n"
                "serve(ServerConfig(default_model=sys.argv[1], parallel=int(sys.argv[2]), max_waiting=16, n_ctx=1024), "
                "port=0, ready=lambda u: print('READY', u, flush=True))")
        proc = subprocess.Popen([sys.executable, "-c", code, a.model, str(a.parallel)], stdout=subprocess.PIPE,
                                text=True, env=dict(os.environ))
        line = proc.stdout.readline()
        if not line.startswith("READY"):
            proc.kill()
            print("the server did not start", file=sys.stderr)
            return 1
        url, pid = line.split()[1], proc.pid
    from .config import ServerConfig
    model_id = ServerConfig(default_model=a.model).default_model_id     # a GGUF path is served by its stem
    try:
        report = run(url, pid, a.requests, model_id, a.embedder, a.concurrency, a.max_tokens,
                     log=lambda s: print(s, flush=True))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    print(json.dumps(report, indent=1))
    good = (report["n_failures"] == 0 and report["metrics_add_up"]
            and (report["rss_growth"] is None or report["rss_growth"] <= 0.05))
    print("soak:", "PASS" if good else "FAIL", flush=True)
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
