"""An OpenAI-compatible HTTP server on spark_lab's own engine (like llama-server or a NIM microservice).

    spark-lab serve --port 8000 [--api-key KEY] [--model smollm2-135m-instruct]

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")   # any string when no key is set
    client.chat.completions.create(model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Hi"}])

Endpoints: GET /v1/models, POST /v1/chat/completions and /v1/completions (JSON, or server-sent events
with "stream": true), POST /v1/embeddings (MiniLM), POST /v1/images/generations (base64 PNG), GET /health.

How requests share the machine: a chat model's requests decode together, up to `parallel` at once
(`spark-lab serve --parallel N`; default: the cores, 4..16), each on its own thread feeding the model's
engine (engine.py: llm.batch.BatchEngine, continuous batching; SPARK_LAB_SERVE_ENGINE=serial picks the
one-at-a-time engine). Up to `max_waiting` more wait in line; beyond that a request gets 429 with
Retry-After. A request that outlives `timeout` seconds gets 504 (in-band for a stream). A client that
hangs up frees its slot within a step. Embedding and image models keep one thread, one job at a time.
Models load on first use and stay loaded; `spark-lab serve` loads the default one at start, and
GET /health says 503 "loading" until it is ready. GET /metrics: Prometheus text under the names
llama-server (llamacpp:) and vLLM (vllm:) users grep for. Load: `python -m spark_lab.serve.soak`.

Sampling defaults are the engine's (temperature 0.7, top_k 40, top_p 0.9, min_p 0.05, repetition
penalty 1.1 over the last 64 tokens when sampling); `top_k`, `min_p` and `repetition_penalty` may be
sent as extra fields, and temperature 0 is greedy. A request without `seed` gets a fresh one, as
OpenAI's API does (the kit's fixed default seed is for notebooks and the command line).

Reasoning models (Qwen3 thinking, gpt-oss) answer with `reasoning_content` beside `content`, and stream
it as `delta.reasoning_content`, as llama-server and vLLM do; `chat_template_kwargs` (e.g.
{"enable_thinking": false}) and `reasoning_effort` reach the model's chat template. /v1/completions
returns the text as generated, markers included.

The parts, by job: config (ServerConfig), schemas (request bodies, validation, OpenAI-shaped errors),
worker (a model's threads, its jobs, the registry that loads models), jobs (what runs on those threads),
engine (the shared engine of a chat model), metrics (/metrics), soak (a crowd of mixed requests),
stream (one generation as JSON or server-sent events), app (the routes and the key/size guard),
run (serve, BackgroundServer, `spark-lab serve`).
"""
from .app import create_app
from .config import ServerConfig
from .run import BackgroundServer, cmd_serve, serve
from .schemas import APIError

__all__ = ["APIError", "BackgroundServer", "ServerConfig", "cmd_serve", "create_app", "serve"]
