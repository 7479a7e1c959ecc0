"""An OpenAI-compatible HTTP server on spark_lab's own engine (like llama-server or a NIM microservice).

    spark-lab serve --port 8000 [--api-key KEY] [--model smollm2-135m-instruct]

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")   # any string when no key is set
    client.chat.completions.create(model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Hi"}])

Endpoints: GET /v1/models, POST /v1/chat/completions and /v1/completions (JSON, or server-sent events
with "stream": true), POST /v1/embeddings (MiniLM), POST /v1/images/generations (base64 PNG), GET /health.

How requests share the machine: every model owns one worker thread and its jobs run there one at a
time, first come first served, so concurrent clients each get their own, unmixed answer and the event
loop never waits on a model. Each generation starts from a clean KV cache, so an answer never depends
on who came before. Tokens travel back to the event loop one by one; between tokens the worker checks
that its client is still there, so a client that hangs up frees the line within one token.
Models load on first use and stay loaded (one engine per model name).

Sampling defaults are the engine's (temperature 0.7, top_k 40, top_p 0.9, min_p 0.05, repetition
penalty 1.1 over the last 64 tokens when sampling); `top_k`, `min_p` and `repetition_penalty` may be
sent as extra fields, and temperature 0 is greedy. A request without `seed` gets a fresh one, as
OpenAI's API does (the kit's fixed default seed is for notebooks and the command line).
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import io
import json
import os
import re
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import __version__
from .models import CATALOGUE, DEFAULT_EMBEDDER, DEFAULT_IMAGE_MODEL, DEFAULT_LLM, ModelNotFound, is_present

POLL_S = 0.25                 # how often a waiting request checks that its client is still connected
FINGERPRINT = f"spark_lab-{__version__}"
KINDS = {"llm": "a language model", "embedding": "an embedding model", "diffusion": "an image model"}


@dataclass
class ServerConfig:
    default_model: str = DEFAULT_LLM      # chat/completions model when a request names none
    api_key: str | None = None            # None: no key needed; else `Authorization: Bearer <key>` on /v1
    n_ctx: int | None = None              # context of every LLM (None: the engine's default)
    max_body_bytes: int = 1 << 20         # larger request bodies get 413
    max_waiting: int = 64                 # jobs in line per model before 503
    max_images: int = 4                   # `n` limit of /v1/images/generations
    models: dict = field(default_factory=dict)  # extra served models: id -> (kind, name or path)

    def served(self) -> dict[str, tuple[str, str]]:
        """model id -> (kind, what the loader gets): the catalogue, the default model, the extras."""
        out = {name: (e.kind, name) for name, e in CATALOGUE.items()}
        if self.default_model not in out:
            out[self.default_model_id] = ("llm", self.default_model)
        out.update(self.models)
        return out

    @property
    def default_model_id(self) -> str:
        m = self.default_model
        return m if m in CATALOGUE or m in self.models else Path(m).stem


# ------------------------------------------------------------------------------ errors

class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _error_response(e: APIError):
    return JSONResponse(e.body(), status_code=e.status)


_UNION_TAG = re.compile(r"^(str|int|float|bool|none|dict|list)(\[.*\])?$")


def _validation_error(e: ValidationError) -> APIError:
    err = e.errors()[0]
    parts = []
    for p in err["loc"]:                         # ('stop', 'list[str]', 0): drop pydantic's union-member tags
        if isinstance(p, str) and _UNION_TAG.match(p):
            break
        parts.append(str(p))
    param = ".".join(parts) or None
    kind = err["type"]
    code = ("missing_required_parameter" if kind == "missing" else
            "invalid_type" if kind.endswith("_type") else "invalid_value")
    got = "" if kind == "missing" else f" (got {json.dumps(err.get('input'))[:80]})"
    return APIError(400, f"invalid '{param}': {err['msg']}{got}", param=param, code=code)


# ------------------------------------------------------------------------------ request bodies

class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)   # unknown fields are ignored; "0.5" is not a number


class _Sampling(_Body):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)                     # extra fields, as llama-server takes them
    min_p: float | None = Field(None, ge=0, lt=1)
    repetition_penalty: float | None = Field(None, gt=0)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict | None = None
    logprobs: bool | int | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list | None = None
    response_format: dict | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)                  # OpenAI's default for /v1/completions
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=1)


class EmbeddingRequest(_Body):
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)


class ImageRequest(_Body):
    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = Field(1, ge=1)
    size: str | None = None
    response_format: Literal["b64_json", "url"] | None = None
    steps: int | None = Field(None, ge=1, le=200)             # extra: denoising steps
    num_inference_steps: int | None = Field(None, ge=1, le=200)
    guidance_scale: float | None = Field(None, ge=0, le=50)
    seed: int | None = None
    negative_prompt: str | None = None


def _unsupported(param: str, why: str) -> APIError:
    return APIError(400, f"'{param}' is not supported by this server: {why}", param=param, code="unsupported_parameter")


def _sampling(r: _Sampling, max_tokens: int | None) -> dict:
    """Validated request fields -> engine arguments."""
    if r.n != 1:
        raise _unsupported("n", "one choice per request (send several requests; they are queued)")
    if r.logprobs:
        raise _unsupported("logprobs", "log-probabilities are not returned")
    for p in ("presence_penalty", "frequency_penalty"):
        if getattr(r, p):
            raise _unsupported(p, "use the extra field 'repetition_penalty' instead")
    stop = [r.stop] if isinstance(r.stop, str) else list(r.stop or [])
    if len(stop) > 4:
        raise APIError(400, f"'stop' takes up to 4 sequences, got {len(stop)}", param="stop", code="invalid_value")
    s = {"stop": stop, "max_new_tokens": max_tokens}
    for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
        if getattr(r, k) is not None:
            s[k] = float(getattr(r, k)) if k != "top_k" else int(r.top_k)
    if s.get("top_p") == 0.0:               # OpenAI allows top_p=0: only the best token survives
        s.update(temperature=0.0, top_p=1.0)
    s["seed"] = None if r.seed is None else r.seed % 2**64   # numpy seeds are non-negative; None = fresh
    return s


# ------------------------------------------------------------------------------ models and their workers

class Worker:
    """One model and the one thread its jobs run on, one at a time, in the order they came."""

    def __init__(self, model_id: str, kind: str, max_waiting: int):
        from .device import set_threads
        self.id, self.kind, self.max_waiting = model_id, kind, max_waiting
        self.model = None                    # an LLM, SentenceEncoder or TextToImagePipeline once loaded
        self.jobs = 0                        # submitted and not yet finished (running + waiting)
        self.active: set = set()             # Jobs not yet finished, so shutdown can stop them
        self.served = self.cancelled = 0     # answers delivered; requests whose client left before the end
        self.loading = asyncio.Lock()
        # SPARK_LAB_THREADS is pinned in the worker thread too: numba's thread count is per thread
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"spark-serve-{model_id}", initializer=set_threads)

    def submit(self, fn, *args):
        if self.jobs > self.max_waiting:
            raise APIError(503, f"model {self.id!r} has {self.jobs} requests in line; try again later",
                           code="server_busy")
        loop = asyncio.get_running_loop()
        self.jobs += 1
        cf = self.executor.submit(fn, *args)
        cf.add_done_callback(lambda _: self._finished(loop))
        return cf

    def _finished(self, loop):                    # on the worker thread, or the loop's when cancelled
        def one_less():
            self.jobs -= 1
        with contextlib.suppress(RuntimeError):   # the loop has closed
            loop.call_soon_threadsafe(one_less)


@dataclass
class _End:
    result: object = None
    error: BaseException | None = None


class Job:
    """fn(*args, emit=..., cancelled=...) on a model's worker thread; what it emits comes back to the
    event loop piece by piece, then its result (or its exception)."""

    def __init__(self, worker: Worker, fn, *args):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancel = threading.Event()
        self.worker = worker
        self.future = worker.submit(self._run, fn, args)
        worker.active.add(self)
        self.future.add_done_callback(lambda _: worker.active.discard(self))

    def _run(self, fn, args):                       # on the worker thread
        if self.cancel.is_set():
            return
        try:
            self._emit(_End(fn(*args, emit=self._emit, cancelled=self.cancel.is_set)))
        except BaseException as e:                  # noqa: BLE001 -- handed to the event loop
            self._emit(_End(error=e))

    def _emit(self, item):
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:                        # the event loop is gone: nobody is listening
            self.cancel.set()

    def stop(self):
        self.cancel.set()
        self.future.cancel()                        # a job still waiting in line never starts

    async def items(self, request=None):
        """Yield emitted pieces, then the _End; stop (and free the slot) if the client goes away."""
        getter, next_check, finished = None, self.loop.time() + POLL_S, False
        try:
            while True:
                getter = getter or asyncio.ensure_future(self.queue.get())
                done, _ = await asyncio.wait({getter}, timeout=POLL_S)
                if request is not None and self.loop.time() >= next_check:   # tokens may flow faster than this
                    next_check = self.loop.time() + POLL_S
                    if await request.is_disconnected():
                        return
                if not done:
                    continue
                item, getter = getter.result(), None
                if isinstance(item, _End) and item.error is not None:
                    raise _as_api_error(item.error)
                if isinstance(item, _End):
                    finished = True
                yield item
                if finished:
                    return
        finally:
            if finished:
                self.worker.served += 1
            else:
                self.worker.cancelled += 1
            self.stop()
            if getter is not None:
                getter.cancel()

    async def result(self, request=None):
        """Wait for the end; -> (pieces, result)."""
        pieces = []
        async for item in self.items(request):
            if isinstance(item, _End):
                return pieces, item.result
            pieces.append(item)
        raise APIError(499, "the client closed the connection", code="client_closed_request")


def _as_api_error(e: BaseException) -> BaseException:
    """A worker's exception -> what the client should see (APIErrors and cancellations pass through)."""
    if isinstance(e, APIError) or not isinstance(e, Exception):
        return e
    if isinstance(e, MemoryError):
        return APIError(400, f"not enough memory for this request: {e}", code="insufficient_memory")
    if isinstance(e, ValueError):                   # the engine's one-line errors about a request
        return APIError(400, str(e), code="invalid_value")
    return APIError(500, f"{type(e).__name__}: {e}")


class Registry:
    """Served model ids -> workers; models load on first use and stay loaded."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.served = config.served()
        self.workers: dict[str, Worker] = {}
        self.created = int(time.time())

    def listing(self) -> list[dict]:
        rows = []
        for mid, (kind, source) in self.served.items():
            present = is_present(source) if source in CATALOGUE else Path(source).exists()
            if present:
                rows.append({"id": mid, "object": "model", "created": self.created, "owned_by": "spark_lab",
                             "kind": kind, "loaded": mid in self.workers and self.workers[mid].model is not None})
        return rows

    async def get(self, model_id: str | None, kind: str) -> Worker:
        """-> the model's worker, loading the model on first use (on its own thread)."""
        if model_id is None:
            model_id = {"llm": self.config.default_model_id, "embedding": DEFAULT_EMBEDDER,
                        "diffusion": DEFAULT_IMAGE_MODEL}[kind]
        if model_id not in self.served:
            raise APIError(404, f"The model {model_id!r} does not exist (GET /v1/models lists the served ones)",
                           param="model", code="model_not_found")
        have, source = self.served[model_id]
        if have != kind:
            raise APIError(400, f"model {model_id!r} is {KINDS[have]}; this endpoint needs {KINDS[kind]}",
                           param="model", code="model_not_supported")
        w = self.workers.get(model_id)
        if w is None:
            w = self.workers[model_id] = Worker(model_id, kind, self.config.max_waiting)
        async with w.loading:
            if w.model is None:
                loop = asyncio.get_running_loop()
                try:
                    w.model = await loop.run_in_executor(w.executor, _load, kind, source, self.config.n_ctx)
                except (ModelNotFound, FileNotFoundError) as e:
                    raise APIError(404, str(e), param="model",
                                   code="model_not_found") from None
                except MemoryError as e:
                    raise APIError(503, f"model {model_id!r} does not fit in memory: {e}", code="out_of_memory")
                except Exception as e:
                    raise APIError(500, f"model {model_id!r} failed to load: {type(e).__name__}: {e}") from None
        return w

    def close(self):
        """Stop every job (a running generation ends within a token) and let the threads go."""
        for w in self.workers.values():
            for job in list(w.active):
                job.stop()
            w.executor.shutdown(wait=False, cancel_futures=True)


def _load(kind: str, source: str, n_ctx: int | None):
    if kind == "llm":
        from .llm import LLM
        return LLM.load(source, n_ctx=n_ctx)
    if kind == "embedding":
        from .text.bert import SentenceEncoder
        return SentenceEncoder.load(source)
    from .diffusion import TextToImagePipeline
    return TextToImagePipeline.from_pretrained(source)


# ------------------------------------------------------------------------------ work done on worker threads

def _decode(llm, prompt_ids, sampling, emit, cancelled):
    """Generate, emitting text pieces; -> Generation (None when cancelled)."""
    llm.reset()                  # a clean cache: the answer does not depend on earlier requests
    s = dict(sampling)
    it = llm.stream_tokens(prompt_ids, s.pop("max_new_tokens"), stop=s.pop("stop"), **s)
    try:
        while not cancelled():
            try:
                _, piece = next(it)
            except StopIteration as done:
                return done.value
            if piece:
                emit(piece)
        return None
    finally:
        it.close()               # an early stop releases the engine's lock here


def _embed(encoder, texts, model_id, encoding_format, emit, cancelled):
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


def _imagine(pipe, kwargs, emit, cancelled):
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


# ------------------------------------------------------------------------------ endpoint helpers

async def _parse(request, cls):
    """Request body -> a validated `cls`, or 400 in OpenAI's shape."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"could not parse the JSON body: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the JSON body must be an object, got {type(data).__name__}", code="invalid_json")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e) from None


def _chat_messages(messages: list[ChatMessage]) -> list[dict]:
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(400, f"messages.{i}.content: only text parts are supported, got "
                                        f"{part.get('type')!r}", param=f"messages.{i}.content", code="invalid_value")
                texts.append(part["text"])
            content = "\n".join(texts)
        role = "system" if m.role == "developer" else m.role
        out.append({"role": role, "content": content or ""})
    return out


def _check_context(llm, prompt_ids: list[int], param: str):
    if not prompt_ids:
        raise APIError(400, "the prompt is empty", param=param, code="invalid_value")
    if len(prompt_ids) >= llm.n_ctx:
        raise APIError(400, f"This model's maximum context length is {llm.n_ctx} tokens, but the prompt has "
                            f"{len(prompt_ids)} tokens (at least one must be left for the answer).",
                       param=param, code="context_length_exceeded")


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(g) -> dict:
    p, c = len(g.prompt_token_ids), len(g.token_ids)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _timings(g) -> dict:
    return {"prompt_n": len(g.prompt_token_ids), "prompt_per_second": round(g.prompt_tokens_per_second, 2),
            "predicted_n": len(g.token_ids), "predicted_per_second": round(g.tokens_per_second, 2)}


async def _generation_response(request, worker, prompt_ids, sampling, stream, include_usage, make_chunk, make_body):
    """Run one generation; answer JSON (make_body(gen)) or SSE (make_chunk(piece|None, gen|None))."""
    job = Job(worker, _decode, worker.model, prompt_ids, sampling)
    if not stream:
        _, gen = await job.result(request)
        return JSONResponse(make_body(gen))

    async def events():
        try:
            first = make_chunk(None, None)                   # the role announcement, before any token
            if first is not None:
                yield _sse(first)
            async for item in job.items(request):
                if isinstance(item, _End):
                    gen = item.result
                    yield _sse(make_chunk(None, gen))
                    if include_usage:
                        u = make_chunk(None, gen)
                        u.update(choices=[], usage=_usage(gen))
                        yield _sse(u)
                    yield "data: [DONE]\n\n"
                else:
                    yield _sse(make_chunk(item, None))
        except Exception as e:                                # headers are gone: report in-band
            err = e if isinstance(e, APIError) else APIError(500, f"{type(e).__name__}: {e}")
            yield _sse(err.body())

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ------------------------------------------------------------------------------ the app

def create_app(config: ServerConfig | None = None):
    """The ASGI app (FastAPI) for `config`; `uvicorn.run(create_app(), ...)` serves it."""
    from starlette.exceptions import HTTPException as StarletteHTTPException

    config = config or ServerConfig()
    registry = Registry(config)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        registry.close()

    app = FastAPI(title="spark_lab", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible API on spark_lab's own kernels")
    app.state.registry = registry
    app.state.config = config

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return _error_response(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code=code))

    @app.exception_handler(RequestValidationError)
    async def _request_error(request, e):
        return _error_response(APIError(400, f"invalid request: {e.errors()[0].get('msg')}"))

    @app.exception_handler(Exception)
    async def _internal(request, e):
        return _error_response(_as_api_error(e))

    @app.get("/health")
    async def health():
        return {"status": "ok", "version": __version__,
                "models": {mid: {"loaded": w.model is not None, "jobs": w.jobs, "served": w.served,
                                 "cancelled": w.cancelled} for mid, w in registry.workers.items()}}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": registry.listing()}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        for row in registry.listing():
            if row["id"] == model_id:
                return row
        raise APIError(404, f"The model {model_id!r} does not exist", param="model", code="model_not_found")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        r = await _parse(request, ChatRequest)
        if r.tools:
            raise _unsupported("tools", "tool calling is not implemented")
        if r.response_format and r.response_format.get("type", "text") != "text":
            raise _unsupported("response_format", "only plain text answers")
        sampling = _sampling(r, r.max_completion_tokens or r.max_tokens)
        worker = await registry.get(r.model, "llm")
        llm = worker.model
        messages = _chat_messages(r.messages)
        try:
            prompt_ids = await asyncio.to_thread(llm.encode_chat, messages)
        except ValueError as e:                   # the chat template refused the messages
            raise APIError(400, str(e), param="messages", code="invalid_value") from None
        _check_context(llm, prompt_ids, "messages")
        sampling["max_new_tokens"] = sampling["max_new_tokens"] or llm.n_ctx - len(prompt_ids)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": worker.id,
                "system_fingerprint": FINGERPRINT}

        def chunk(piece, gen):
            if gen is not None:
                delta, finish = {}, gen.finish_reason
            elif piece is None:
                delta, finish = {"role": "assistant", "content": ""}, None
            else:
                delta, finish = {"content": piece}, None
            return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        def body(gen):
            return {"id": cid, "object": "chat.completion", "created": created, "model": worker.id,
                    "system_fingerprint": FINGERPRINT,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": gen.text, "refusal": None},
                                 "logprobs": None, "finish_reason": gen.finish_reason}],
                    "usage": _usage(gen), "timings": _timings(gen)}

        include_usage = bool((r.stream_options or {}).get("include_usage"))
        return await _generation_response(request, worker, prompt_ids, sampling, r.stream, include_usage, chunk, body)

    @app.post("/v1/completions")
    async def completions(request: Request):
        r = await _parse(request, CompletionRequest)
        if r.suffix:
            raise _unsupported("suffix", "no fill-in-the-middle")
        prompt = r.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise _unsupported("prompt", f"one prompt per request, got {len(prompt)}")
            prompt = prompt[0]
        sampling = _sampling(r, r.max_tokens)
        worker = await registry.get(r.model, "llm")
        llm = worker.model
        if isinstance(prompt, str):    # raw text: special tokens such as <|im_start|> are parsed
            prompt_ids = await asyncio.to_thread(llm.tokenizer.encode, prompt, None, True)
        else:
            prompt_ids = list(prompt)
            bad = [t for t in prompt_ids if not 0 <= t < llm.config.n_vocab]
            if bad:
                raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{llm.config.n_vocab - 1})",
                               param="prompt", code="invalid_value")
        _check_context(llm, prompt_ids, "prompt")
        sampling["max_new_tokens"] = sampling["max_new_tokens"] or llm.n_ctx - len(prompt_ids)
        echo = (prompt if isinstance(prompt, str) else llm.tokenizer.decode(prompt_ids)) if r.echo else ""
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": cid, "object": "text_completion", "created": created, "model": worker.id,
                "system_fingerprint": FINGERPRINT}

        def chunk(piece, gen):
            if piece is None and gen is None:
                if not echo:
                    return None
                piece = echo
            text, finish = ("", gen.finish_reason) if gen is not None else (piece, None)
            return {**head, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

        def body(gen):
            return {**head, "choices": [{"index": 0, "text": echo + gen.text, "logprobs": None,
                                         "finish_reason": gen.finish_reason}],
                    "usage": _usage(gen), "timings": _timings(gen)}

        include_usage = bool((r.stream_options or {}).get("include_usage"))
        return await _generation_response(request, worker, prompt_ids, sampling, r.stream, include_usage, chunk, body)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        r = await _parse(request, EmbeddingRequest)
        texts = [r.input] if isinstance(r.input, str) else list(r.input)
        if not texts:
            raise APIError(400, "'input' is empty", param="input", code="invalid_value")
        if not all(isinstance(t, str) for t in texts):
            raise _unsupported("input", "token arrays; send strings")
        if any(not t for t in texts):
            raise APIError(400, "'input' contains an empty string", param="input", code="invalid_value")
        if len(texts) > 2048:
            raise APIError(400, f"'input' holds {len(texts)} strings; at most 2048", param="input", code="invalid_value")
        worker = await registry.get(r.model, "embedding")
        if r.dimensions is not None and r.dimensions != worker.model.dim:
            raise _unsupported("dimensions", f"{worker.id} makes {worker.model.dim}-dimensional vectors only")
        _, body = await Job(worker, _embed, worker.model, texts, worker.id, r.encoding_format).result(request)
        return Response(body, media_type="application/json")

    @app.post("/v1/images/generations")
    async def images(request: Request):
        r = await _parse(request, ImageRequest)
        if r.n > config.max_images:
            raise APIError(400, f"'n' must be between 1 and {config.max_images}, got {r.n}", param="n",
                           code="invalid_value")
        if r.response_format == "url":
            raise _unsupported("response_format", "images come back as b64_json only (no file hosting)")
        worker = await registry.get(r.model, "diffusion")
        pipe = worker.model
        side = (pipe.unet.config.sample_size or 64) * pipe.vae_scale_factor
        native = f"{side}x{side}"
        if r.size not in (None, "auto", native):
            raise APIError(400, f"'size' must be {native!r} for {worker.id} (the size it was made for), got {r.size!r}",
                           param="size", code="invalid_value")
        kwargs = {"prompt": r.prompt, "num_inference_steps": r.steps or r.num_inference_steps or 25,
                  "guidance_scale": r.guidance_scale, "num_images_per_prompt": r.n,
                  "seed": None if r.seed is None else r.seed % 2**64, "negative_prompt": r.negative_prompt,
                  "height": side, "width": side}
        _, pngs = await Job(worker, _imagine, pipe, kwargs).result(request)
        return {"created": int(time.time()), "data": [{"b64_json": b, "revised_prompt": None} for b in pngs],
                "model": worker.id, "size": native}

    return _Guard(app, config.api_key, config.max_body_bytes)


class _Guard:
    """ASGI middleware: the API key on /v1 (401) and the body size limit (413), before any route runs."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body = app, api_key, int(max_body_bytes)
        self.state = app.state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key and scope["path"].startswith("/v1"):
            auth = headers.get("authorization", "")
            token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not token:
                return await _send(send, APIError(401, "You didn't provide an API key: send 'Authorization: Bearer "
                                                       "<key>' (the key given to spark-lab serve)."))
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                return await _send(send, APIError(401, "Incorrect API key provided.", code="invalid_api_key"))
        declared = headers.get("content-length", "")
        too_big = APIError(413, f"request body is larger than the limit of {self.max_body} bytes",
                           code="request_too_large")
        if declared.isdigit() and int(declared) > 8 * self.max_body:
            return await _send(send, too_big)         # not worth reading: answer and close
        chunks, size = [], 0
        while True:                                   # read the whole body (bounded) before the app sees it
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            size += len(body)
            if size <= self.max_body:
                chunks.append(body)
            elif size > 8 * self.max_body:
                break
            if not msg.get("more_body"):
                break
        if size > self.max_body:
            return await _send(send, too_big)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()                    # afterwards: http.disconnect, when it comes

        return await self.app(scope, replay, send)


async def _send(send, e: APIError):
    body = json.dumps(e.body()).encode()
    await send({"type": "http.response.start", "status": e.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


# ------------------------------------------------------------------------------ running it

def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(config: ServerConfig | None = None, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "warning", ready=None) -> None:
    """Serve until interrupted. port=0 takes a free port; `ready(url)` (or a print) says which."""
    import uvicorn

    config = config or ServerConfig()
    sock = _listen(host, port)
    bound = sock.getsockname()[1]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{bound}/v1"
    server = uvicorn.Server(uvicorn.Config(create_app(config), log_level=log_level, timeout_graceful_shutdown=3,
                                           timeout_keep_alive=30))
    (ready or (lambda u: print(f"spark-lab serve: listening on {u} (Ctrl-C stops)", flush=True)))(url)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


class BackgroundServer:
    """A server on a thread of this process (notebooks): `with BackgroundServer() as srv: srv.url`."""

    def __init__(self, config: ServerConfig | None = None, host: str = "127.0.0.1", port: int = 0):
        import uvicorn
        self.sock = _listen(host, port)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}/v1"
        self.server = uvicorn.Server(uvicorn.Config(create_app(config or ServerConfig()), log_level="warning",
                                                    timeout_graceful_shutdown=3))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="spark-serve")

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > timeout:
                raise RuntimeError(f"the server at {self.url} did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def cmd_serve(args) -> int:
    from .models import resolve
    api_key = args.api_key or os.environ.get("SPARK_LAB_API_KEY") or None
    model = args.model or DEFAULT_LLM
    if model in CATALOGUE and CATALOGUE[model].kind != "llm":
        raise ValueError(f"--model {model} is {KINDS[CATALOGUE[model].kind]}; give a chat model (e.g. {DEFAULT_LLM})")
    resolve(model, "llm")                         # a missing default model is one clear line now, not a 404 later
    config = ServerConfig(default_model=model, api_key=api_key)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: serving on {args.host} without an API key: anyone who can reach this port can use it",
              flush=True)
    try:
        serve(config, args.host, args.port, log_level="info")
    except KeyboardInterrupt:
        pass
    return 0
