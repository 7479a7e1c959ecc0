"""The server's counters and their Prometheus text (GET /metrics), under the names llama-server
(`llamacpp:`) and vLLM (`vllm:`) users already grep for, plus spark_lab's own per-endpoint counts."""
from __future__ import annotations

import threading
import time
from collections import Counter, deque

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/images/generations", "/v1/models")
RATE_WINDOW_S = 10.0           # tokens per second: over the last this many seconds


class Metrics:
    """Counters shared by the event loop and the model threads (one lock)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.received = 0                      # /v1 requests seen
        self.in_flight = 0                     # seen, response not finished
        self.by_status: Counter = Counter()    # (endpoint, status) -> finished requests
        self.finished: Counter = Counter()     # generation finish reason (stop, length, abort, timeout, error)
        self.prompt_tokens = self.generation_tokens = 0
        self.prompt_seconds = self.decode_seconds = 0.0
        self.ttft: deque = deque(maxlen=1000)  # seconds to first token, recent generations
        self.recent: deque = deque()           # (monotonic time, 1) per generated token in the window

    # -- the HTTP side (the ASGI guard) --
    def request_started(self):
        with self.lock:
            self.received += 1
            self.in_flight += 1

    def request_finished(self, path: str, status: int):
        endpoint = path if path in ENDPOINTS else ("/v1/models" if path.startswith("/v1/models/") else "other")
        with self.lock:
            self.in_flight -= 1
            self.by_status[endpoint, int(status)] += 1

    # -- the generation side (a model thread) --
    def prompt(self, n: int):
        with self.lock:
            self.prompt_tokens += n

    def token(self):
        t = time.monotonic()
        with self.lock:
            self.generation_tokens += 1
            self.recent.append(t)
            while self.recent and self.recent[0] < t - RATE_WINDOW_S:
                self.recent.popleft()

    def generation_ended(self, reason: str, gen=None, ttft: float | None = None):
        with self.lock:
            self.finished[reason] += 1
            if gen is not None:
                self.prompt_seconds += gen.prompt_seconds
                self.decode_seconds += gen.decode_seconds
            if ttft is not None:
                self.ttft.append(ttft)

    def tokens_per_second(self) -> float:
        t = time.monotonic()
        with self.lock:
            while self.recent and self.recent[0] < t - RATE_WINDOW_S:
                self.recent.popleft()
            n = len(self.recent)
        return n / RATE_WINDOW_S

    def text(self, engines: dict) -> str:
        """Prometheus exposition format; engines: model id -> (engine.stats(), n_ctx)."""
        out = []

        def metric(name, kind, help_, rows):
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            for labels, v in rows:
                lab = ",".join(f'{k}="{val}"' for k, val in labels.items())
                out.append(f"{name}{{{lab}}} {v}" if lab else f"{name} {v}")

        rate = self.tokens_per_second()
        with self.lock:
            received, in_flight, by_status = self.received, self.in_flight, dict(self.by_status)
            finished, prompt, generated = dict(self.finished), self.prompt_tokens, self.generation_tokens
            p_s, d_s, ttft = self.prompt_seconds, self.decode_seconds, sorted(self.ttft)
        busy = sum(s["busy"] for s, _ in engines.values())
        waiting = sum(s["waiting"] for s, _ in engines.values())
        kv_tokens = sum(s["kv_tokens"] for s, _ in engines.values())
        capacity = sum(s["slots"] * n_ctx for s, n_ctx in engines.values())
        kv_ratio = kv_tokens / capacity if capacity else 0.0
        metric("spark_lab:requests_received_total", "counter", "HTTP requests to /v1 received.", [({}, received)])
        metric("spark_lab:requests_in_flight", "gauge", "HTTP requests to /v1 not yet answered.", [({}, in_flight)])
        metric("spark_lab:http_requests_total", "counter", "HTTP requests to /v1 answered, by endpoint and status.",
               [({"endpoint": e, "status": s}, n) for (e, s), n in sorted(by_status.items())])
        metric("spark_lab:generations_total", "counter", "Generations ended, by reason (stop, length, abort: the "
               "client left or the request timed out, error).", [({"reason": r}, n) for r, n in sorted(finished.items())])
        for prefix in ("llamacpp:", "vllm:"):
            tokens_in = "prompt_tokens_total"
            tokens_out = "tokens_predicted_total" if prefix == "llamacpp:" else "generation_tokens_total"
            metric(prefix + tokens_in, "counter", "Prompt tokens processed.", [({}, prompt)])
            metric(prefix + tokens_out, "counter", "Tokens generated.", [({}, generated)])
        metric("llamacpp:predicted_tokens_seconds", "gauge",
               f"Generated tokens per second, all requests together, over the last {RATE_WINDOW_S:g} s.",
               [({}, round(rate, 3))])
        metric("llamacpp:prompt_seconds_total", "counter", "Seconds spent on prompts.", [({}, round(p_s, 4))])
        metric("llamacpp:tokens_predicted_seconds_total", "counter", "Seconds spent decoding.", [({}, round(d_s, 4))])
        metric("llamacpp:requests_processing", "gauge", "Requests holding a slot.", [({}, busy)])
        metric("llamacpp:requests_deferred", "gauge", "Requests waiting for a slot.", [({}, waiting)])
        metric("vllm:num_requests_running", "gauge", "Requests holding a slot.", [({}, busy)])
        metric("vllm:num_requests_waiting", "gauge", "Requests waiting for a slot.", [({}, waiting)])
        metric("llamacpp:kv_cache_tokens", "gauge", "KV cache positions in use.", [({}, kv_tokens)])
        metric("llamacpp:kv_cache_usage_ratio", "gauge", "KV cache use, 0..1.", [({}, round(kv_ratio, 6))])
        metric("vllm:gpu_cache_usage_perc", "gauge", "KV cache use, 0..1 (vLLM's name; CPU or GPU).",
               [({}, round(kv_ratio, 6))])
        metric("spark_lab:slots", "gauge", "Sequences the chat models can decode at once, by model.",
               [({"model_name": m}, s["slots"]) for m, (s, _) in sorted(engines.items())])
        metric("spark_lab:prefix_cache_hits_total", "counter", "Requests that reused a cached prefix.",
               [({}, sum(s["prefix_hits"] for s, _ in engines.values()))])
        if ttft:
            q = lambda p: ttft[min(len(ttft) - 1, int(p * len(ttft)))]   # noqa: E731
            metric("spark_lab:time_to_first_token_seconds", "gauge", "Time to first token, recent generations.",
                   [({"quantile": "0.5"}, round(q(0.5), 4)), ({"quantile": "0.95"}, round(q(0.95), 4))])
        return "\n".join(out) + "\n"
