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

Reasoning models (Qwen3 thinking, gpt-oss) answer with `reasoning_content` beside `content`, and stream
it as `delta.reasoning_content`, as llama-server and vLLM do; `chat_template_kwargs` (e.g.
{"enable_thinking": false}) and `reasoning_effort` reach the model's chat template. /v1/completions
returns the text as generated, markers included.

The parts, by job: config (ServerConfig), schemas (request bodies, validation, OpenAI-shaped errors),
worker (a model's thread, its jobs, the registry that loads models), jobs (what runs on that thread),
stream (one generation as JSON or server-sent events), app (the routes and the key/size guard),
run (serve, BackgroundServer, `spark-lab serve`).
"""
from .app import create_app
from .config import ServerConfig
from .run import BackgroundServer, cmd_serve, serve
from .schemas import APIError

__all__ = ["APIError", "BackgroundServer", "ServerConfig", "cmd_serve", "create_app", "serve"]
