"""The FastAPI app: the routes, and the ASGI guard for the API key and the body size."""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from .. import __version__
from ..llm import tools as toolcalls
from ..llm.reasoning import ReasoningPiece
from .config import FINGERPRINT, ServerConfig
from .jobs import embed_job, imagine_job
from .metrics import Metrics
from .schemas import (APIError, ChatRequest, CompletionRequest, EmbeddingRequest, ImageRequest, chat_messages,
                      check_context, error_response, parse_body, sampling_args, unsupported)
from .stream import generation_response, timings_of, usage_of
from .worker import Job, Registry, as_api_error

def create_app(config: ServerConfig | None = None):
    """The ASGI app (FastAPI) for `config`; `uvicorn.run(create_app(), ...)` serves it."""
    from starlette.exceptions import HTTPException as StarletteHTTPException

    config = config or ServerConfig()
    registry = Registry(config)
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        preload = None
        if config.preload:          # load the default chat model now; /health says 503 "loading" meanwhile
            preload = asyncio.ensure_future(registry.get(None, "llm"))
            preload.add_done_callback(lambda f: f.cancelled() or f.exception())   # errors come again on use
        yield
        if preload is not None:
            preload.cancel()
        registry.close()

    app = FastAPI(title="spark_lab", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible API on spark_lab's own kernels")
    app.state.registry = registry
    app.state.config = config
    app.state.metrics = metrics

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error_response(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code=code))

    @app.exception_handler(RequestValidationError)
    async def _request_error(request, e):
        return error_response(APIError(400, f"invalid request: {e.errors()[0].get('msg')}"))

    @app.exception_handler(Exception)
    async def _internal(request, e):
        return error_response(as_api_error(e))

    @app.get("/health")
    async def health():
        """200 {"status": "ok"} when ready; 503 {"status": "loading"} while a model loads (as llama-server)."""
        loading = any(w.is_loading for w in registry.workers.values())
        body = {"status": "loading" if loading else "ok", "version": __version__,
                "models": {mid: {"loaded": w.model is not None, "loading": w.is_loading, "jobs": w.jobs,
                                 "served": w.served, "cancelled": w.cancelled, "timed_out": w.timed_out,
                                 "parallel": w.parallel} for mid, w in registry.workers.items()}}
        return JSONResponse(body, status_code=503 if loading else 200)

    @app.get("/metrics")
    async def prometheus():
        engines = {}
        for mid, w in list(registry.workers.items()):
            if w.engine is not None:              # waiting: for a slot in the engine, or for a thread in line
                st = dict(w.engine.stats())
                st["waiting"] = st["waiting"] + max(0, w.jobs - w.parallel)
                engines[mid] = (st, w.model.n_ctx)
        return PlainTextResponse(metrics.text(engines), media_type="text/plain; version=0.0.4")

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
        r = await parse_body(request, ChatRequest)
        constrain, tools, forced = _constraint_request(r)
        sampling = sampling_args(r, r.max_completion_tokens or r.max_tokens)
        worker = await registry.get(r.model, "llm")
        llm = worker.model
        messages = chat_messages(r.messages)
        for m, src in zip(messages, r.messages):     # tool calls and results travel as extra fields
            for k in ("tool_calls", "tool_call_id", "name"):
                if (src.model_extra or {}).get(k) is not None:
                    m[k] = src.model_extra[k]
        fmt = toolcalls.tool_format(llm.tokenizer.chat_template)
        try:
            messages, tool_options = toolcalls.prepare(messages, tools, fmt)
            if forced:
                constrain = toolcalls.constraint_args(tools, fmt, None if forced is True else forced)
        except ValueError as e:
            raise APIError(400, str(e), param="tools", code="invalid_value") from None
        if constrain:
            from ..llm.constrain import Constraint
            try:
                sampling["constraint"] = await asyncio.to_thread(Constraint.build, llm.tokenizer, **constrain)
            except ValueError as e:
                raise APIError(400, f"'{'tools' if forced else 'response_format'}': {e}",
                               param="tools" if forced else "response_format", code="invalid_value") from None
        options = dict(r.chat_template_kwargs or {}, **tool_options)
        if r.reasoning_effort is not None:
            options["reasoning_effort"] = r.reasoning_effort
        reserved = {"messages", "add_generation_prompt", "bos_token", "eos_token"} & options.keys()
        if reserved:
            raise APIError(400, f"'chat_template_kwargs' may not set {sorted(reserved)[0]!r}",
                           param="chat_template_kwargs", code="invalid_value")
        try:
            prompt_ids = await asyncio.to_thread(llm.encode_chat, messages, **options)
        except ValueError as e:                   # the chat template refused the messages
            raise APIError(400, str(e), param="messages", code="invalid_value") from None
        check_context(llm, prompt_ids, "messages")
        sampling["max_new_tokens"] = sampling["max_new_tokens"] or llm.n_ctx - len(prompt_ids)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": worker.id,
                "system_fingerprint": FINGERPRINT}

        def chunk(piece, gen):
            if gen is not None:
                delta, finish = {}, gen.finish_reason
                if tools:                          # the answer was held back: content or calls, at once
                    content, calls = toolcalls.parse(toolcalls.raw_text(llm, gen), fmt, tools)
                    content = gen.text if fmt == "harmony" else content
                    if content:
                        delta["content"] = content
                    if calls:
                        delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(calls)]
                        finish = "tool_calls"
            elif tools and not isinstance(piece, ReasoningPiece) and piece is not None:
                return None
            elif piece is None:
                delta, finish = {"role": "assistant", "content": ""}, None
            else:                                  # reasoning beside content, as llama-server and vLLM send it
                key = "reasoning_content" if isinstance(piece, ReasoningPiece) else "content"
                delta, finish = {key: str(piece)}, None
            return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        def body(gen):
            message = {"role": "assistant", "content": gen.text, "refusal": None}
            finish = gen.finish_reason
            if tools:
                content, calls = toolcalls.parse(toolcalls.raw_text(llm, gen), fmt, tools)
                message["content"] = (gen.text if fmt == "harmony" else content) or None
                if calls:
                    message["tool_calls"], finish = calls, "tool_calls"
            if llm.reasoning_format is not None:
                message["reasoning_content"] = gen.reasoning or None
            return {"id": cid, "object": "chat.completion", "created": created, "model": worker.id,
                    "system_fingerprint": FINGERPRINT,
                    "choices": [{"index": 0, "message": message,
                                 "logprobs": None, "finish_reason": finish}],
                    "usage": usage_of(gen), "timings": timings_of(gen)}

        include_usage = bool((r.stream_options or {}).get("include_usage"))
        return await generation_response(request, worker, prompt_ids, sampling, r.stream, include_usage, chunk, body)

    @app.post("/v1/completions")
    async def completions(request: Request):
        r = await parse_body(request, CompletionRequest)
        if r.suffix:
            raise unsupported("suffix", "no fill-in-the-middle")
        prompt = r.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise unsupported("prompt", f"one prompt per request, got {len(prompt)}")
            prompt = prompt[0]
        sampling = sampling_args(r, r.max_tokens)
        sampling["reasoning"] = False            # a raw completion is text as generated, markers and all
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
        check_context(llm, prompt_ids, "prompt")
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
                    "usage": usage_of(gen), "timings": timings_of(gen)}

        include_usage = bool((r.stream_options or {}).get("include_usage"))
        return await generation_response(request, worker, prompt_ids, sampling, r.stream, include_usage, chunk, body)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        r = await parse_body(request, EmbeddingRequest)
        texts = [r.input] if isinstance(r.input, str) else list(r.input)
        if not texts:
            raise APIError(400, "'input' is empty", param="input", code="invalid_value")
        if not all(isinstance(t, str) for t in texts):
            raise unsupported("input", "token arrays; send strings")
        if any(not t for t in texts):
            raise APIError(400, "'input' contains an empty string", param="input", code="invalid_value")
        if len(texts) > 2048:
            raise APIError(400, f"'input' holds {len(texts)} strings; at most 2048", param="input", code="invalid_value")
        worker = await registry.get(r.model, "embedding")
        if r.dimensions is not None and r.dimensions != worker.model.dim:
            raise unsupported("dimensions", f"{worker.id} makes {worker.model.dim}-dimensional vectors only")
        _, body = await Job(worker, embed_job, worker.model, texts, worker.id, r.encoding_format).result(request)
        return Response(body, media_type="application/json")

    @app.post("/v1/images/generations")
    async def images(request: Request):
        r = await parse_body(request, ImageRequest)
        if r.n > config.max_images:
            raise APIError(400, f"'n' must be between 1 and {config.max_images}, got {r.n}", param="n",
                           code="invalid_value")
        if r.response_format == "url":
            raise unsupported("response_format", "images come back as b64_json only (no file hosting)")
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
        _, pngs = await Job(worker, imagine_job, pipe, kwargs).result(request)
        return {"created": int(time.time()), "data": [{"b64_json": b, "revised_prompt": None} for b in pngs],
                "model": worker.id, "size": native}

    return _Guard(app, config.api_key, config.max_body_bytes, metrics)


def _constraint_request(r: ChatRequest):
    """-> (constraint kwargs from response_format, the tools to render, forced: False | True | a name)."""
    constrain, rf = {}, r.response_format
    if rf:
        kind = rf.get("type", "text")
        if kind == "json_schema":
            js = rf.get("json_schema")
            schema = js.get("schema") if isinstance(js, dict) else None
            if not isinstance(schema, (dict, bool)):
                raise APIError(400, "'response_format.json_schema.schema' must be a JSON Schema object",
                               param="response_format", code="invalid_value")
            constrain = {"json_schema": schema}
        elif kind == "json_object":
            constrain = {"json_schema": {"type": "object"}}
        elif kind != "text":
            raise APIError(400, f"'response_format.type' must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                           param="response_format", code="invalid_value")
    choice = r.tool_choice if r.tool_choice is not None else "auto"
    if not r.tools:
        if choice not in ("auto", "none"):
            raise APIError(400, "'tool_choice' needs 'tools'", param="tool_choice", code="invalid_value")
        return constrain, None, False
    if choice == "none":
        return constrain, None, False
    if choice == "auto":
        forced = False
    elif choice == "required":
        forced = True
    elif isinstance(choice, dict) and isinstance((choice.get("function") or {}).get("name"), str):
        forced = choice["function"]["name"]
        if forced not in {(t.get("function") or {}).get("name") for t in r.tools if isinstance(t, dict)}:
            raise APIError(400, f"'tool_choice' names {forced!r}, which is not in 'tools'", param="tool_choice",
                           code="invalid_value")
    else:
        raise APIError(400, f"'tool_choice' must be 'auto', 'none', 'required' or a named function, got {choice!r}",
                       param="tool_choice", code="invalid_value")
    if forced and constrain:
        raise APIError(400, "'response_format' and a required tool call cannot both constrain the answer",
                       param="response_format", code="invalid_value")
    return constrain, list(r.tools), forced


class _Guard:
    """ASGI middleware: the API key on /v1 (401) and the body size limit (413), before any route runs."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, metrics: Metrics | None = None):
        self.app, self.api_key, self.max_body = app, api_key, int(max_body_bytes)
        self.state = app.state
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.metrics is None or not scope["path"].startswith("/v1"):
            return await self._call(scope, receive, send)
        status = 499                                  # no answer started: the client left first

        async def counted(msg):
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        self.metrics.request_started()
        try:
            return await self._call(scope, receive, counted)
        finally:
            self.metrics.request_finished(scope["path"], status)

    async def _call(self, scope, receive, send):
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
