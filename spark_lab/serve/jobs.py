"""The work done on a model's worker thread: fn(..., emit, cancelled) -> result."""
from __future__ import annotations

import base64
import io
import json
import time

import numpy as np

def decode_job(engine, prompt_ids, sampling, metrics, emit, cancelled):
    """Generate on the model's shared engine, emitting text pieces; -> Generation (None when cancelled).
    Closing the engine's generator (an early stop) frees the request's slot."""
    s = dict(sampling)
    t0 = time.perf_counter()
    ttft, reason, gen = None, "error", None
    it = engine.stream_tokens(prompt_ids, max_new_tokens=s.pop("max_new_tokens"), stop=s.pop("stop"), **s)
    try:
        while not cancelled():
            try:
                _, piece = next(it)
            except StopIteration as done:
                gen = done.value
                reason = gen.finish_reason
                return gen
            if ttft is None:
                ttft = time.perf_counter() - t0
                metrics.prompt(len(prompt_ids))
            metrics.token()
            if piece:
                emit(piece)
        reason = "abort"
        return None
    finally:
        it.close()
        if ttft is None and gen is not None:
            metrics.prompt(len(prompt_ids))
        metrics.generation_ended(reason, gen, ttft)


def embed_job(encoder, texts, model_id, encoding_format, emit, cancelled):
    """-> the response body as JSON bytes (built here: 2048 vectors would stall the event loop)."""
    vectors = np.asarray(encoder.encode(texts), dtype=np.float32)             # [n, dim]
    n_tokens = sum(encoder.count_tokens(t) for t in texts)
    data = []
    for i, v in enumerate(vectors):
        e = (base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") if encoding_format == "base64"
             else v.tolist())
        data.append({"object": "embedding", "index": i, "embedding": e})
    return json.dumps({"object": "list", "data": data, "model": model_id,
                       "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}).encode()


class _Cancelled(Exception):
    pass


def imagine_job(pipe, kwargs, emit, cancelled):
    def check(step, t, latents):
        if cancelled():
            raise _Cancelled()
    try:
        images = pipe(**kwargs, callback=check, progress=False)              # list of PIL images
    except _Cancelled:
        return None
    out = []
    for im in images:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out
