"""Many sequences at once on one model: continuous batching with a prefix cache.

    be = BatchEngine(llm, parallel=8, prefix_cache_bytes=None)    # starts one stepping thread
    for tok_id, piece in be.stream_tokens(prompt_ids, max_new_tokens=64, temperature=0):
        ...                                    # any thread; same kwargs and pieces as LLM.stream_tokens
    gen = be.generate_tokens(prompt_ids, **kw) # drained: the Generation
    be.stats()   # slots, busy, waiting, kv_tokens, kv_bytes, prefix_hits, prefix_tokens_reused,
                 # prefix_entries, prefix_bytes, steps, tokens_generated
    be.close()

Each request runs LLM's own per-token loop (`LLM._token_loop`: sampling, stops, constraints,
reasoning split, detokenizing) in the caller's thread, over a slot: a KVCache of its own, one
slot of a pooled cache (`KVCache.pooled`). The stepping thread takes every pending job each step:

    decode   all sequences' next tokens in one `Decoder.step_batch` (x [n, in]: each weight read
             once per step for the n rows; norms and RoPE per row; attention of every row over its
             own slot in one kernel call per layer, `decode_attention.attention_rows`)
    prefill  waiting prompts' next chunks, FIFO, up to `prefill_chunk` tokens in all, stacked into
             one forward pass (`Transformer.forward_many`) where the model's products are row-exact,
             else each prompt its own pass; a long prompt is interleaved with the others' decode
             steps instead of stalling them

A request without a grammar hands its sampling to the stepping thread after its first token
(`sample_ahead`): the thread draws each next token from the logits with the request's own
parameters, random generator and history, feeds it at the next step and queues it for the request
thread, so steps do not wait for request threads to wake, sample and post. Requests with a grammar
post one job per token (their mask comes from their own thread). Sequences join and leave between
steps. With all slots busy, stream_tokens waits for one (FIFO). Closing the generator (a client
gone) frees its slot at once; the next step runs without it (tokens already drawn are dropped).

Batch invariance: at temperature 0 a request's tokens do not depend on what else runs. Row i of
step_batch is computed with the same operations in the same order as a lone row: the quantized
products are exact int8 dot products scaled per row (the kernels' rows of qmatvec(X) are those of
qmatvec(X[i])), float weights are applied row by row, attention runs the same kernel task per row
whatever the other rows, everything else is per row. Prompts are stacked only when every weight's
kernel is row-exact (`Transformer.rows_exact`: the int8 GEMM and the per-row mat-vec; never
dequantized tiles + BLAS) and attention runs per prompt row over its own cache.
The tokens a request draws are those its own thread would draw: same logits, same generator.

Reusing K/V. A slot keeps its last prompt's K/V when it is freed (`kept`; not the answer's: those
came from decode steps, whose rounding differs from a prompt row's); a new request takes the free
slot already holding the longest prefix of its prompt and prefills only the rest, in place (a
chat's next turn, a retried request). Besides, the prefix
cache keeps copies of the K/V of prefixes that two prompts share (a system prompt, a document
asked about twice; keyed by their tokens) under a byte budget (by default one slot's full
context), least recently used evicted first, so that a prompt on another slot starts from them;
a prompt shared with nothing is not copied (its slot keeps it), nor a shared prefix that is not
16 tokens (MIN_PREFIX) longer than the cached one it extends. Where the model is `rows_exact` (prompt rows on row-exact kernels, attention
row by row), a token's K/V do not depend on how its prompt was chunked, so a prefix of any length
is reused; elsewhere only whole chunks [0, C*k) are (the K/V a fresh prefill at positions 0, C,
2C... computes). Either way the tokens are the same with or without a hit. A slot freed while the
stepping thread is running a step that includes it (a request closed with tokens drawn ahead) is
taken again only after that step, so its K/V are never written by two sequences at once.
"""
from __future__ import annotations

import collections
import queue
import threading
import time

import numpy as np

from ..device import to_host
from .cache import KVCache
from .engine import PREFILL_CHUNK
from .sampling import sample

MAX_ROWS = 16                      # rows per batched kernel call (qmatvec takes x [n <= 16, in])
GATHER_SECONDS = 0.002             # a step waits this long at most for decoding slots still sampling
MIN_PREFIX = 16                    # a shared prefix is copied when it is this much longer than the cached one


class _Job:
    __slots__ = ("slot", "tokens", "pos", "done", "logits", "error")

    def __init__(self, slot, tokens, pos):
        self.slot, self.tokens, self.pos = slot, tokens, pos
        self.done, self.logits, self.error = threading.Event(), None, None

    def wait(self):
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.logits


class _Slot:
    def __init__(self, i: int, cache: KVCache):
        self.i, self.cache = i, cache
        self.busy = False
        self.decoding = False      # past its prefill: will post a decode job after each token
        self.n = 0                 # positions [0, n) of cache hold this sequence's K/V
        self.ahead = None          # _Ahead: the stepping thread samples this sequence's tokens itself
        self.kept: list[int] = []  # the last prompt, whose K/V sit at positions [0, len(kept)), kept after release
        self.stepping = False      # in the step the stepping thread is running
        self.release = False       # released during that step: freed when it ends
        self.used = 0              # when it was last taken (a ticket number): the least recent is reused first


class _Ahead:
    """A sequence the stepping thread runs on its own: it feeds `tok` at the slot's next position,
    samples the next token from the logits with the request's own parameters, generator and
    history (so the same tokens as the request thread would draw), and queues it for the request
    thread; `left` more tokens, stopping after a stop id."""
    __slots__ = ("tok", "params", "rng", "recent", "generated", "stop_ids", "left", "out")

    def __init__(self, tok, params, rng, recent, generated, stop_ids, left):
        self.tok, self.params, self.rng, self.stop_ids, self.left = tok, params, rng, stop_ids, left
        self.recent, self.generated = list(recent), list(generated)     # the stepping thread's own copies
        self.out = queue.SimpleQueue()                                  # sampled tokens (or an exception)


class PrefixCache:
    """Shared prompt prefixes' K/V, LRU under a byte budget."""

    def __init__(self, budget_bytes: int):
        self.budget = int(budget_bytes)
        self.entries: collections.OrderedDict[tuple, list] = collections.OrderedDict()  # tokens -> arrays
        self.nbytes = 0

    @staticmethod
    def _common(a, b) -> int:
        n = min(len(a), len(b))
        if n == 0:
            return 0
        x, y = np.asarray(a[:n]), np.asarray(b[:n])
        diff = np.flatnonzero(x != y)
        return int(diff[0]) if diff.size else n

    @classmethod
    def usable(cls, tokens, prompt: list[int], granule: int) -> int:
        """How many positions of K/V computed for `tokens` a prompt can reuse: their common prefix, a
        multiple of granule, at most len(prompt) - 1 (the last token is always run, for its logits)."""
        return min(cls._common(tokens, prompt), len(prompt) - 1) // granule * granule

    def lookup(self, prompt: list[int], granule: int):
        """-> (key, usable length) of the entry sharing the longest prefix with prompt; (None, 0) if none."""
        best, best_n = None, 0
        for key in self.entries:
            n = self.usable(key, prompt, granule)
            if n > best_n:
                best, best_n = key, n
        return best, best_n

    def load(self, key, n: int, cache: KVCache) -> None:
        """Copy the entry's first n positions into cache (every layer)."""
        self.entries.move_to_end(key)
        for dst, src in zip(_kv_arrays(cache), self.entries[key]):
            if dst is not None:
                dst[:, :n] = src[:, :n]

    def store(self, tokens: list[int], cache: KVCache) -> None:
        n = len(tokens)
        if n == 0:
            return
        key = tuple(tokens)
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        arrays = [None if a is None else a[:, :n].copy() for a in _kv_arrays(cache)]   # stays where the cache is
        size = sum(a.nbytes for a in arrays if a is not None)
        if size > self.budget:
            return
        for old in [k for k in self.entries if len(k) <= n and key[:len(k)] == k]:   # covered by the new one
            self._drop(old)
        self.entries[key] = arrays
        self.nbytes += size
        while self.nbytes > self.budget:
            self._drop(next(iter(self.entries)))

    def _drop(self, key) -> None:
        self.nbytes -= sum(a.nbytes for a in self.entries.pop(key) if a is not None)


def _kv_arrays(cache: KVCache):
    return (cache.k, cache.v, cache.k_scale, cache.v_scale)


class _Sequence:
    """One request's hold on a slot, as `LLM._token_loop` wants it (context manager, prefill, step)."""

    def __init__(self, engine: "BatchEngine"):
        self.engine, self.slot = engine, None

    def __enter__(self):                  # the slot is taken by prefill, which knows the prompt
        return self

    def __exit__(self, *exc):
        if self.slot is not None:
            self.engine._release(self.slot)
        self.slot = None

    def prefill(self, prompt: list[int]):
        e, C, G = self.engine, self.engine.prefill_chunk, self.engine.granule
        slot, reuse = e._acquire(prompt)      # a free slot, the one already holding most of the prompt
        self.slot = slot
        cached = 0                            # how much of the prompt the prefix cache already holds
        if e.prefix is not None:
            with e._cond:
                key, n = e.prefix.lookup(prompt, G)
                cached = n
                if key is not None and n > reuse:
                    e.prefix.load(key, n, slot.cache)
                    reuse = n
        with e._cond:
            e._hits += reuse > 0
            e._reused += reuse
        slot.kept = list(prompt[:reuse])
        logits = None
        for s in range(reuse, len(prompt), C):
            logits = e._submit(_Job(slot, prompt[s:s + C], s))
            slot.kept.extend(prompt[s:s + C])
        slot.n = len(prompt)
        if e.prefix is not None:
            with e._cond:                     # a prefix this prompt shares with another one: keep a copy
                others = [s.kept for s in e.slots if s is not slot] + list(e.prefix.entries)
                keep = max((PrefixCache._common(o, prompt) for o in others), default=0) // G * G
                if keep >= cached + min(C, MIN_PREFIX):     # worth a copy: 16 tokens past what it holds
                    e.prefix.store(prompt[:keep], slot.cache)
        with e._cond:
            slot.decoding = True
            e._tokens += 1
        return logits, reuse

    def step(self, tok: int):
        slot = self.slot
        logits = self.engine._submit(_Job(slot, [tok], slot.n))
        slot.n += 1
        return logits

    def sample_ahead(self, tok, params, rng, recent, generated, stop_ids, left: int) -> None:
        """From now on the stepping thread feeds `tok`, samples the next `left` tokens itself
        (fewer after a stop id) and `next_token` hands them over: no round trip through this
        thread between steps (requests without a grammar: their next token needs only logits)."""
        e = self.engine
        with e._cond:
            if e._closed:
                raise RuntimeError("the batch engine is closed")
            self.slot.ahead = _Ahead(tok, params, rng, recent, generated, stop_ids, left)
            e._cond.notify_all()

    def next_token(self) -> int:
        got = self.slot.ahead.out.get()
        if isinstance(got, BaseException):
            raise got
        return got


class BatchEngine:
    def __init__(self, llm, parallel: int = 4, prefix_cache_bytes: int | None = None,
                 prefill_chunk: int = PREFILL_CHUNK):
        """parallel: sequences decoded together (slots, each a KVCache of llm.n_ctx tokens, mapped as
        it fills); prefix_cache_bytes: the prefix cache's budget (None: one slot's full K/V, 0: no prefix cache);
        prefill_chunk: prompt tokens per prefill forward pass."""
        if int(parallel) < 1:
            raise ValueError(f"parallel must be >= 1, got {parallel}")
        if int(prefill_chunk) < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.llm, self.parallel, self.prefill_chunk = llm, int(parallel), int(prefill_chunk)
        c = llm.config
        cache = llm.cache
        caches = KVCache.pooled(self.parallel, c.n_layer, llm.n_ctx, c.n_head_kv, c.head_dim, np.float32,
                                cache.type_k, cache.type_v)         # one pool: one attention call per layer
        self.slots = [_Slot(i, kv) for i, kv in enumerate(caches)]
        budget = self.slots[0].cache.nbytes if prefix_cache_bytes is None else int(prefix_cache_bytes)
        self.prefix = PrefixCache(budget) if budget > 0 else None
        self._dec = llm.model._decoder()
        # prefix reuse at any length where a prompt's K/V do not depend on its chunking, else whole chunks
        self.granule = 1 if llm.model.rows_exact() else self.prefill_chunk
        self._cond = threading.Condition()
        self._jobs: list[_Job] = []
        self._queue: collections.deque = collections.deque()   # tickets of requests waiting for a slot
        self._ticket = 0
        self._closed = False
        self._steps = 0
        self._tokens = 0
        self._hits = self._reused = 0           # requests that reused K/V (a slot's own or the prefix cache's), tokens
        self._thread = threading.Thread(target=self._run, name="spark-lab-batch", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ requests
    def stream_tokens(self, prompt_ids, **gen):
        """Yield (token_id, piece) like LLM.stream_tokens (same keyword arguments); returns the Generation."""
        return (yield from self.llm._token_loop(_Sequence(self), prompt_ids, **gen))

    def generate_tokens(self, prompt_ids, **gen):
        it = self.stream_tokens(prompt_ids, **gen)
        while True:
            try:
                next(it)
            except StopIteration as done:
                return done.value

    def stats(self) -> dict:
        with self._cond:
            busy = [s for s in self.slots if s.busy and not s.release]
            kv_tokens = sum(s.n for s in busy)
            per_token = self.slots[0].cache.nbytes // max(1, self.llm.n_ctx)
            prefix_bytes = self.prefix.nbytes if self.prefix is not None else 0
            return dict(slots=self.parallel, busy=len(busy), waiting=len(self._queue), kv_tokens=kv_tokens,
                        kv_bytes=kv_tokens * per_token + prefix_bytes,
                        prefix_hits=self._hits, prefix_tokens_reused=self._reused,
                        prefix_entries=len(self.prefix.entries) if self.prefix is not None else 0,
                        prefix_bytes=prefix_bytes, steps=self._steps, tokens_generated=self._tokens)

    def close(self) -> None:
        """Stop the stepping thread; waiting and running requests get RuntimeError."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ slots
    def _acquire(self, prompt: list[int]) -> tuple[_Slot, int]:
        """FIFO: wait for a free slot -> (the free slot whose kept K/V share the longest prefix with
        prompt, else the one taken least recently; how many of its positions the prompt reuses in place)."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the batch engine is closed")
            ticket = self._ticket
            self._ticket += 1
            self._queue.append(ticket)
            try:
                while True:
                    if self._closed:
                        raise RuntimeError("the batch engine is closed")
                    free = [s for s in self.slots if not s.busy]
                    if free and self._queue[0] == ticket:
                        break
                    self._cond.wait()
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()
            reuse = [PrefixCache.usable(s.kept, prompt, self.granule) for s in free]
            best = max(range(len(free)), key=lambda i: (reuse[i], -free[i].used))   # else the least recent
            slot = free[best]
            slot.busy, slot.decoding, slot.n, slot.used = True, False, 0, ticket + 1
            return slot, reuse[best]

    def _release(self, slot: _Slot) -> None:
        with self._cond:
            slot.ahead = None          # the stepping thread drops it before its next step
            if slot.stepping:          # its K/V may still be written: free it when that step ends
                slot.release = True
                return
            slot.busy = slot.decoding = False
            slot.n = 0
            self._cond.notify_all()

    def _submit(self, job: _Job):
        with self._cond:
            if self._closed:
                raise RuntimeError("the batch engine is closed")
            self._jobs.append(job)
            if len(job.tokens) == 1:
                self._tokens += 1 if job.slot.decoding else 0
            self._cond.notify_all()
        return job.wait()

    # ------------------------------------------------------------------ the stepping thread
    def _ahead_slots(self):
        return [s for s in self.slots if s.busy and s.ahead is not None and s.ahead.left > 0]

    def _take(self):
        """Wait for work -> (decode jobs, sampled-ahead slots, prefill jobs); None when closed."""
        with self._cond:
            while not self._jobs and not self._closed and not self._ahead_slots():
                self._cond.wait()
            if self._closed:
                for j in self._jobs:
                    j.error = RuntimeError("the batch engine is closed")
                    j.done.set()
                self._jobs.clear()
                for s in self.slots:
                    if s.ahead is not None:
                        s.ahead.left = 0
                        s.ahead.out.put(RuntimeError("the batch engine is closed"))
                return None
            # let slots about to post (a decoding slot sampling its last token, a prompt that has just
            # taken its slot: requests arriving together get one stacked prefill) join this step,
            # briefly; sampled-ahead slots are always ready
            deadline = time.monotonic() + GATHER_SECONDS
            while not self._closed:
                posted = {id(j.slot) for j in self._jobs}
                if all(id(s) in posted for s in self.slots if s.busy and s.ahead is None):
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            decode = [j for j in self._jobs if j.slot.decoding]
            prefill, budget = [], self.prefill_chunk       # FIFO prompt chunks, up to one chunk's tokens in all
            for j in self._jobs:
                if not j.slot.decoding and (not prefill or len(j.tokens) <= budget):
                    prefill.append(j)
                    budget -= len(j.tokens)
                    if budget <= 0:
                        break
            taken = {id(j) for j in decode + prefill}
            self._jobs = [j for j in self._jobs if id(j) not in taken]
            ahead = [(s, s.ahead, s.n) for s in self._ahead_slots()]
            for slot in [j.slot for j in decode + prefill] + [a[0] for a in ahead]:
                slot.stepping = True
            return decode, ahead, prefill

    def _logits(self, rows):
        """rows [(token, position, cache)] -> logits [n, vocab] (host f32), one batched step."""
        if self._dec:
            return self._dec.step_batch([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
        model = self.llm.model
        return [to_host(model.forward(np.asarray([t], np.int64), pos, cache)[-1]).astype(np.float32, copy=False)
                for t, pos, cache in rows]

    def _run(self):
        model = self.llm.model
        while True:
            work = self._take()
            if work is None:
                return
            decode, ahead, prefill = work
            rows = [(j.tokens[0], j.pos, j.slot.cache) for j in decode] + [(a.tok, n, s.cache) for s, a, n in ahead]
            owners = decode + ahead
            for i in range(0, len(rows), MAX_ROWS):
                group = owners[i:i + MAX_ROWS]
                try:
                    out, err = self._logits(rows[i:i + MAX_ROWS]), None
                except Exception as e:            # every row of the group gets the error
                    out, err = None, e
                for r, o in enumerate(group):
                    if isinstance(o, _Job):
                        o.logits, o.error = (None, err) if err else (out[r], None)
                        o.done.set()
                    else:
                        self._advance(*o, None if err else out[r], err)
            # prompts' chunks in one pass (weights read once), a 1-token chunk too where it continues a
            # prompt (the one-token decode path's rounding differs from a prompt row's); a whole 1-token
            # prompt runs as LLM.generate runs it
            stack = [j for j in prefill if len(j.tokens) > 1 or j.pos > 0] if model.rows_exact() else []
            if stack:
                try:
                    out = to_host(model.forward_many([(np.asarray(j.tokens, np.int64), j.pos, j.slot.cache)
                                                      for j in stack]))
                    for r, j in enumerate(stack):
                        j.logits = out[r].astype(np.float32, copy=True)
                except Exception as err:
                    for j in stack:
                        j.error = err
                for j in stack:
                    j.done.set()
            for job in prefill:                           # the rest, each prompt alone
                if job.done.is_set():
                    continue
                try:
                    out = model.forward(np.asarray(job.tokens, np.int64), job.pos, job.slot.cache)
                    job.logits = to_host(out[-1]).astype(np.float32, copy=True)
                except Exception as err:
                    job.error = err
                job.done.set()
            with self._cond:
                self._steps += 1
                for slot in self.slots:
                    slot.stepping = False
                    if slot.release:              # released during the step: free now
                        slot.release = slot.busy = slot.decoding = False
                        slot.n = 0
                        self._cond.notify_all()

    def _advance(self, slot, a: _Ahead, n: int, logits, err) -> None:
        """A sampled-ahead sequence after its step: draw its next token and queue it."""
        if err is not None:
            a.left = 0
            a.out.put(err)
            return
        tok = sample(logits, a.params, a.rng, a.recent, a.generated)
        a.left = 0 if tok in a.stop_ids else a.left - 1
        a.tok = tok
        a.recent.append(tok)
        a.generated.append(tok)
        with self._cond:
            if slot.ahead is a:                   # still this request's slot
                slot.n = n + 1
                self._tokens += 1
        a.out.put(tok)
