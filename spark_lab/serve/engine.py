"""The engine a chat model's requests share: llm.batch.BatchEngine (continuous batching) when it is
there, else SerialEngine, the same interface over the one-at-a-time LLM (a lock, first come first served)."""
from __future__ import annotations

import os
import threading


def make_engine(llm, parallel: int):
    """-> BatchEngine(llm, parallel) when spark_lab.llm.batch provides it, else SerialEngine(llm, parallel).
    SPARK_LAB_SERVE_ENGINE=serial picks SerialEngine anyway (an A/B, or a fallback)."""
    if os.environ.get("SPARK_LAB_SERVE_ENGINE", "").lower() == "serial":
        return SerialEngine(llm, parallel)
    try:
        from ..llm.batch import BatchEngine
    except ImportError:
        return SerialEngine(llm, parallel)
    return BatchEngine(llm, parallel=parallel)


class SerialEngine:
    """BatchEngine's interface with one sequence at a time: `parallel` requests may hold a slot, but
    they decode in turn (a lock), each from a clean KV cache."""

    def __init__(self, llm, parallel: int = 1, prefix_cache_bytes=None):
        if parallel < 1:
            raise ValueError(f"parallel must be >= 1, got {parallel}")
        self.llm, self.parallel = llm, int(parallel)
        self._lock = threading.Lock()              # the one decoding sequence
        self._count = threading.Lock()             # guards the counters below
        self.busy = self.waiting = self.kv_tokens = self.steps = self.tokens_generated = 0
        self.closed = False

    def _add(self, **kw):
        with self._count:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    def stream_tokens(self, prompt_ids, *, max_new_tokens: int = 128, **kw):
        """Yield (token_id, piece) like LLM.stream_tokens; returns its Generation. Blocks while another
        sequence decodes; closing the generator frees the engine."""
        if self.closed:
            raise RuntimeError("the engine is closed")
        self._add(waiting=1)
        try:
            self._lock.acquire()
        finally:
            self._add(waiting=-1)
        held = 0
        try:
            self._add(busy=1)
            self.llm.reset()                         # the answer does not depend on earlier requests
            it = self.llm.stream_tokens(prompt_ids, max_new_tokens=max_new_tokens, **kw)
            held = len(prompt_ids)
            self._add(kv_tokens=held)
            try:
                while True:
                    try:
                        tok, piece = next(it)
                    except StopIteration as done:
                        return done.value
                    self._add(kv_tokens=1, steps=1, tokens_generated=1)
                    held += 1
                    yield tok, piece
            finally:
                it.close()
        finally:
            self._add(busy=-1, kv_tokens=-held)
            self._lock.release()

    def generate_tokens(self, prompt_ids, **kw):
        it = self.stream_tokens(prompt_ids, **kw)
        while True:
            try:
                next(it)
            except StopIteration as done:
                return done.value

    def stats(self) -> dict:
        cache = getattr(self.llm, "cache", None)
        nbytes = getattr(cache, "nbytes", 0)
        nbytes = nbytes() if callable(nbytes) else nbytes
        per_token = nbytes / max(getattr(cache, "n_ctx", 1), 1)
        with self._count:
            return {"slots": self.parallel, "busy": self.busy, "waiting": self.waiting, "kv_tokens": self.kv_tokens,
                    "kv_bytes": int(self.kv_tokens * per_token), "prefix_hits": 0, "prefix_tokens_reused": 0,
                    "steps": self.steps, "tokens_generated": self.tokens_generated}

    def close(self):
        self.closed = True

