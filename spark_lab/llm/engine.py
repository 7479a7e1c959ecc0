"""The LLM engine: load a GGUF, prefill, decode, sample, stream text.

    llm = LLM.load("smollm2-135m-instruct")
    for piece in llm.stream("Why is the sky blue?", max_new_tokens=64):   # chat template applied
        print(piece, end="")
    g = llm.generate(ids, temperature=0)           # token ids in, Generation out

Sampling arguments are SamplingParams' fields (sampling.py): by default temperature 0.7, top-k 40,
top-p 0.9, min-p 0.05, a 1.1 repetition penalty over the last 64 tokens and seed 0, as Ollama and
llama.cpp decode; temperature=0 is plain greedy decoding.

Reasoning models (Qwen3's <think> blocks, gpt-oss's analysis channel; the format is read from the
model's chat template, llm/reasoning.py) stream their reasoning as `ReasoningPiece`s, and a
Generation carries `reasoning` apart from the answer `text`.
"""
from __future__ import annotations

import codecs
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..device import to_host
from ..gguf import GGUFFile, config_from_gguf
from ..models import resolve
from .cache import KVCache
from .model import Transformer
from .reasoning import ReasoningPiece, ReasoningSplitter, reasoning_format
from .sampling import SamplingParams, sample
from .template import render_chat

DEFAULT_CTX = 4096
PREFILL_CHUNK = 256  # prompt tokens per forward pass: bounds activation memory


class ContextOverflow(ValueError):
    """The prompt (or a single chat message) does not fit the context."""


@dataclass
class Generation:
    text: str
    token_ids: list                  # generated tokens only
    prompt_token_ids: list
    finish_reason: str               # "stop" (EOS or stop string) or "length"
    reasoning: str = ""              # the model's thinking, apart from the answer (reasoning models)
    prompt_seconds: float = 0.0
    decode_seconds: float = 0.0
    reused_prompt_tokens: int = 0    # prompt tokens served from the KV cache of the previous call
    timeline: list = field(default_factory=list)  # [(seconds since start, tokens so far)]

    @property
    def prompt_tokens_per_second(self) -> float:
        n = len(self.prompt_token_ids) - self.reused_prompt_tokens
        return n / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        n = max(0, len(self.token_ids) - 1)  # the first token comes from the prefill's logits
        return n / self.decode_seconds if self.decode_seconds > 0 else 0.0


class _Detokenizer:
    """Token ids -> text pieces, holding back bytes of a UTF-8 character split across tokens."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self.dec.decode(self.tok.token_bytes(token_id))

    def flush(self) -> str:
        return self.dec.decode(b"", final=True)


class _OwnCache:
    """The engine's single KV cache as a `_token_loop` sequence: one generation at a time (the lock)."""

    def __init__(self, llm):
        self.llm = llm

    def __enter__(self):
        self.llm.lock.acquire()
        return self

    def __exit__(self, *exc):
        self.llm.lock.release()

    def prefill(self, prompt):
        return self.llm.prefill(prompt)

    def step(self, tok: int):
        llm = self.llm
        logits = llm._logits([tok], len(llm._cached))
        llm._cached.append(tok)
        return logits


class LLM:
    def __init__(self, path: Path, n_ctx: int | None = None, name: str | None = None, kv_dtype=np.float32,
                 cache_type_k: str | None = None, cache_type_v: str | None = None):
        """cache_type_k/v: the KV cache's storage, "f32" (default), "f16" or "q8_0" (llm/cache.py)."""
        from ..tokenizer import Tokenizer
        self.path = Path(path)
        self.name = name or self.path.stem
        self.file = GGUFFile(self.path)
        self.config = config_from_gguf(self.file)
        self.n_ctx = int(n_ctx or min(self.config.n_ctx_train, DEFAULT_CTX))
        if self.n_ctx < 8:
            raise ValueError(f"context must be at least 8 tokens, got {self.n_ctx}")
        self.model = Transformer(self.file, self.config)   # first: its repack-ahead thread overlaps the tokenizer's load
        self.tokenizer = Tokenizer.from_gguf(self.path)
        c = self.config
        self.cache = KVCache(c.n_layer, self.n_ctx, c.n_head_kv, c.head_dim, kv_dtype, cache_type_k, cache_type_v)
        self._cached: list[int] = []       # the tokens whose K/V sit in the cache, in order
        self._prompt_logits = None         # (prompt, logits after it) of the last prefill
        self.lock = threading.Lock()       # one generation at a time per engine
        self.reasoning_format = reasoning_format(self.tokenizer.chat_template)  # "think" | "harmony" | None

    @classmethod
    def load(cls, name_or_path=None, n_ctx: int | None = None, **kw) -> "LLM":
        path = resolve(name_or_path, "llm")
        if path.is_dir():
            raise ValueError(f"{path} is a folder; an LLM is one .gguf file")
        from ..models import DEFAULT_LLM
        return cls(path, n_ctx=n_ctx, name=str(name_or_path or DEFAULT_LLM), **kw)

    # ------------------------------------------------------------------ text helpers
    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_bos=False))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **options) -> str:
        """options: template variables such as enable_thinking=False (Qwen3), reasoning_effort="low" (gpt-oss)."""
        return render_chat(self.tokenizer, messages, add_generation_prompt, **options)

    def encode_chat(self, messages: list[dict], **options) -> list[int]:
        return self.tokenizer.encode(self.apply_chat_template(messages, **options), add_bos=None, parse_special=True)

    def reasoning_splitter(self, prompt_ids: list[int]) -> ReasoningSplitter | None:
        """A splitter for a generation after prompt_ids (None: the model does not reason); the prompt's
        last tokens say whether it starts inside a thinking block."""
        if self.reasoning_format is None:
            return None
        return ReasoningSplitter(self.reasoning_format, self.tokenizer.decode(list(prompt_ids[-32:])))

    # ------------------------------------------------------------------ core loop
    def _logits(self, tokens: list[int], pos: int) -> np.ndarray:
        out = self.model.forward(np.asarray(tokens, dtype=np.int64), pos, self.cache)
        return to_host(out[-1]).astype(np.float32, copy=False)

    def prefill(self, prompt: list[int]) -> tuple[np.ndarray, int]:
        """Run the prompt through the model, reusing the cached prefix; -> (last logits, reused)."""
        n = len(prompt)
        last = self._prompt_logits
        if last is not None and last[0] == prompt and self._cached[:n] == prompt:
            # the same prompt again (a retry, generate after stream): its logits as they came out of
            # its prefill; recomputing the last token alone takes other kernels, whose rounding can
            # pick another token at a near-tie, and the same request must give the same answer
            self._cached = self._cached[:n]
            return last[1].copy(), n
        reuse = 0
        for a, b in zip(self._cached, prompt[:-1]):  # keep at least one token to produce logits
            if a != b:
                break
            reuse += 1
        self._cached = self._cached[:reuse]
        logits = None
        for s in range(reuse, n, PREFILL_CHUNK):
            chunk = prompt[s:s + PREFILL_CHUNK]
            logits = self._logits(chunk, s)
            self._cached.extend(chunk)
        self._prompt_logits = (list(prompt), logits.copy())
        return logits, reuse

    def stream_tokens(self, prompt_ids: list[int], max_new_tokens: int = 128, stop=None,
                      stop_at_eos: bool = True, reasoning: bool = True, json_schema=None, grammar=None,
                      regex=None, constraint=None, **sampling):
        """Yield (token_id, text_piece) as tokens are produced; the return value is a Generation.

        For a reasoning model (and reasoning=True) pieces of thinking come as ReasoningPiece and the
        markers around it are not yielded; reasoning=False yields the raw text, markers and all.
        json_schema (dict or JSON text) / grammar (Lark or GBNF) / regex constrain the output token by
        token (llm/constrain.py; or pass a built `constraint`); it stops when the grammar is complete."""
        return (yield from self._token_loop(_OwnCache(self), prompt_ids, max_new_tokens, stop, stop_at_eos, reasoning,
                                            json_schema, grammar, regex, constraint, **sampling))

    def _token_loop(self, seq, prompt_ids, max_new_tokens=128, stop=None, stop_at_eos=True, reasoning=True,
                    json_schema=None, grammar=None, regex=None, constraint=None, **sampling):
        """stream_tokens' per-token logic (sampling, stops, constraints, reasoning split, detokenizing)
        over `seq`, which holds the sequence's KV: a context manager (entered around the whole
        generation) with prefill(prompt) -> (logits [vocab], reused tokens) and step(token) -> logits
        of the next position. `_OwnCache` is this engine's one cache; llm/batch.py gives slots, which
        may also offer sample_ahead(...) / next_token(): the stepping thread then draws the tokens of
        a request without a grammar itself (same generator, history and parameters)."""
        if max_new_tokens is None or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        params = SamplingParams(**sampling)
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) >= self.n_ctx:
            raise ContextOverflow(f"prompt of {len(prompt)} tokens does not fit the context of {self.n_ctx} tokens")
        bad = [t for t in prompt if not 0 <= t < self.config.n_vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{self.config.n_vocab - 1})")
        budget = min(max_new_tokens, self.n_ctx - len(prompt))
        stops = [s for s in (stop or []) if s]
        stop_ids = set(self.tokenizer.eot_ids or [self.tokenizer.eos_id]) if stop_at_eos else set()
        rng = np.random.default_rng(params.seed)
        if constraint is None and (json_schema is not None or grammar is not None or regex is not None):
            from .constrain import Constraint
            constraint = Constraint.build(self.tokenizer, json_schema=json_schema, grammar=grammar, regex=regex)
        gen = Generation("", [], prompt, "length")
        detok, text, emitted = _Detokenizer(self.tokenizer), "", 0
        splitter = self.reasoning_splitter(prompt) if reasoning else None

        def parts(s):                               # raw text -> (kind-tagged) pieces
            if splitter is None:
                return [s]
            return [ReasoningPiece(p) if kind == "reasoning" else p for kind, p in splitter.push(s)]
        t0 = time.perf_counter()
        with seq:
            logits, gen.reused_prompt_tokens = seq.prefill(prompt)
            gen.prompt_seconds = time.perf_counter() - t0
            t1 = time.perf_counter()
            recent = list(prompt)
            ahead = constraint is None and hasattr(seq, "sample_ahead")   # the batch engine samples for us
            for step in range(budget):
                if ahead and step:
                    tok = seq.next_token()
                else:
                    allowed = constraint.mask() if constraint is not None else None   # bool [vocab]
                    tok = sample(logits, params, rng, recent, gen.token_ids, allowed)
                if tok in stop_ids:
                    gen.finish_reason = "stop"
                    break
                gen.token_ids.append(tok)
                recent.append(tok)
                if constraint is not None:
                    constraint.advance(tok)            # the next mask is computed during the forward pass
                text += detok.push(tok)
                gen.timeline.append((time.perf_counter() - t0, len(gen.token_ids)))
                hit = next((s for s in stops if s in text), None) if stops else None
                if hit:
                    text = text[:text.index(hit)]
                    gen.finish_reason = "stop"
                    if len(text) > emitted:
                        for p in parts(text[emitted:]):
                            yield tok, p
                        emitted = len(text)
                    break
                # hold back a tail that could still become a stop string
                hold = max((len(s) - 1 for s in stops), default=0)
                safe = len(text) - hold if hold else len(text)
                if safe > emitted:
                    for p in parts(text[emitted:safe]):
                        yield tok, p
                    emitted = safe
                if constraint is not None and constraint.done:
                    gen.finish_reason = "stop"         # the grammar is complete: nothing may follow
                    break
                if step + 1 < budget and not ahead:
                    logits = seq.step(tok)
                elif ahead and step == 0 and budget > 1:      # same draws: our generator, history and parameters
                    seq.sample_ahead(tok, params, rng, recent, gen.token_ids, stop_ids, budget - 1)
            gen.decode_seconds = time.perf_counter() - t1
        if gen.finish_reason != "stop" or not stops or not any(s in text for s in stops):
            text += detok.flush()
        rest = parts(text[emitted:]) if len(text) > emitted else []
        if splitter is not None:
            rest += [ReasoningPiece(p) if kind == "reasoning" else p for kind, p in splitter.flush()]
        for p in rest:
            yield None, p
        gen.reasoning, gen.text = splitter.result if splitter is not None else ("", text)
        return gen

    # ------------------------------------------------------------------ public API
    def _prompt_ids(self, prompt, options=None) -> list[int]:
        if isinstance(prompt, str):
            return self.encode_chat([{"role": "user", "content": prompt}], **(options or {}))
        if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
            return self.encode_chat(list(prompt), **(options or {}))
        return [int(t) for t in prompt]

    def generate(self, prompt, max_new_tokens: int = 128, stop=None, template_options: dict | None = None,
                 **sampling) -> Generation:
        """prompt: token ids, a user message (str, chat template applied) or a list of messages;
        template_options: chat template variables ({"enable_thinking": False} for Qwen3)."""
        it = self.stream_tokens(self._prompt_ids(prompt, template_options), max_new_tokens, stop, **sampling)
        while True:
            try:
                next(it)
            except StopIteration as done:
                return done.value

    def stream(self, prompt, max_new_tokens: int = 128, stop=None, template_options: dict | None = None,
               **sampling):
        """Yield text pieces as they form (same prompt forms as generate; reasoning as ReasoningPiece)."""
        for _, piece in self.stream_tokens(self._prompt_ids(prompt, template_options), max_new_tokens, stop,
                                           **sampling):
            if piece:
                yield piece

    def chat(self, messages: list[dict], **gen) -> Generation:
        return self.generate(list(messages), **gen)

    def chat_stream(self, messages: list[dict], **gen):
        return self.stream(list(messages), **gen)

    def reset(self) -> None:
        """Forget the cached prefix (the next prompt is processed from scratch)."""
        self._cached = []
