"""spark_lab.serve through the official `openai` client, against a real server process on a free
loopback port (SmolLM2 with a 1024-token context; answers at temperature 0 are exact)."""
from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
psutil = pytest.importorskip("psutil")

from spark_lab.models import is_present  # noqa: E402

from .llm.thinking_model import write_thinking_gguf  # noqa: E402
from .server_proc import server_process  # noqa: E402

pytestmark = pytest.mark.skipif(not is_present("smollm2-135m-instruct"),
                                reason="SmolLM2 is not installed (make setup)")

KEY = "test-key-123"
CHAT = "smollm2-135m-instruct"
N_CTX = 1024
TINY_SD = Path(__file__).parent / "fixtures" / "diffusion" / "tiny-sd"   # a full diffusers folder (CLIP + VAE)
SERVER = """
import sys
from spark_lab.serve import ServerConfig, serve
config = ServerConfig(api_key=sys.argv[1], n_ctx=int(sys.argv[2]),
                      models={"tiny-sd": ("diffusion", sys.argv[3]), "tiny-think": ("llm", sys.argv[4])})
serve(config, host="127.0.0.1", port=0, ready=lambda url: print("READY", url, flush=True))
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """-> (base url, server pid). A subprocess, so its memory can be measured on its own."""
    think = write_thinking_gguf(tmp_path_factory.mktemp("serve") / "tiny-think.gguf")   # a Qwen3 that thinks
    with server_process(SERVER, KEY, str(N_CTX), str(TINY_SD), str(think)) as (url, pid):
        yield url, pid


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0], api_key=KEY, max_retries=0, timeout=300)


def _root(server) -> str:
    return server[0][: -len("/v1")]


def _chat(client, content, max_tokens, stream=False, **kw):
    return client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": content}],
                                          max_tokens=max_tokens, temperature=0, stream=stream, **kw)


def _streamed(client, content, max_tokens, **kw) -> tuple[str, str | None, dict | None]:
    """-> (concatenated deltas, finish_reason, usage) of one streamed chat completion."""
    text, finish, usage = [], None, None
    for chunk in _chat(client, content, max_tokens, stream=True, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(text), finish, usage


def _rss_mb(pid) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


# ------------------------------------------------------------------------------ the happy paths

def test_models_list(client):
    ids = [m.id for m in client.models.list().data]
    assert CHAT in ids and "all-minilm-l6-v2" in ids and "tiny-sd" in ids
    assert ("spark-emoji" in ids) == is_present("spark-emoji")   # listed only when installed
    assert client.models.retrieve(CHAT).id == CHAT


def test_chat_and_stream_agree(client):
    r = _chat(client, "Name a primary colour.", 8)
    text = r.choices[0].message.content
    assert r.model == CHAT and r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert text and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 8 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    streamed, finish, usage = _streamed(client, "Name a primary colour.", 8, stream_options={"include_usage": True})
    assert streamed == text                                       # greedy: the same tokens, streamed
    assert finish == r.choices[0].finish_reason
    assert usage.prompt_tokens == r.usage.prompt_tokens and usage.completion_tokens == r.usage.completion_tokens


def test_reasoning_content(client, server):
    """A reasoning model's thinking comes back as `reasoning_content` beside `content` (llama-server
    and vLLM's field), streamed as delta.reasoning_content; the tiny Qwen3 walks <think>Hm</think>OK."""
    msgs = [{"role": "user", "content": "Hi?"}]
    m = client.chat.completions.create(model="tiny-think", messages=msgs, max_tokens=16, temperature=0).choices[0].message
    assert (m.content, m.reasoning_content) == ("OK", "Hm")
    deltas = []
    for chunk in client.chat.completions.create(model="tiny-think", messages=msgs, max_tokens=16, temperature=0,
                                                stream=True):
        for c in chunk.choices:
            deltas += [(k, getattr(c.delta, k, None)) for k in ("reasoning_content", "content")
                       if getattr(c.delta, k, None)]
    assert deltas == [("reasoning_content", "H"), ("reasoning_content", "m"), ("content", "O"), ("content", "K")]
    off = client.chat.completions.create(model="tiny-think", messages=msgs, max_tokens=16, temperature=0,
                                         extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert (off.choices[0].message.content, off.choices[0].message.reasoning_content) == ("OK", None)
    raw = client.completions.create(model="tiny-think", prompt="<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n",
                                    max_tokens=16, temperature=0)
    assert raw.choices[0].text == "<think>Hm</think>\n\nOK"            # /v1/completions: the text as generated
    plain = httpx.post(server[0] + "/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                       json={"model": CHAT, "messages": msgs, "max_tokens": 2, "temperature": 0}).json()
    assert "reasoning_content" not in plain["choices"][0]["message"]       # a model that does not reason: no field
    bad = httpx.post(server[0] + "/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                     json={"model": "tiny-think", "messages": msgs, "chat_template_kwargs": {"messages": []}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "chat_template_kwargs"


def test_stop_and_seed(client):
    text = _chat(client, "Name a primary colour.", 8).choices[0].message.content    # served from the same engine
    stop = text.split()[1]                                        # cut at the answer's second word
    r = _chat(client, "Name a primary colour.", 8, stop=[stop, "zzz-never"])
    assert r.choices[0].message.content == text[:text.index(stop)] and r.choices[0].finish_reason == "stop"
    kw = dict(model=CHAT, messages=[{"role": "user", "content": "Write a word."}], max_tokens=4, temperature=1.0,
              seed=1234)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True)
                if c.choices)
    assert a == b                                                 # same seed, same sample, streamed or not


def test_completion_equals_engine(client):
    """/v1/completions on a raw prompt gives exactly what the engine gives in-process."""
    from spark_lab.device import set_threads
    from spark_lab.llm import LLM
    set_threads()                 # SPARK_LAB_THREADS, as the server's worker does (numba's default can crawl here)
    prompt = "<|im_start|>user\nThe capital of France is<|im_end|>\n<|im_start|>assistant\n"
    r = client.completions.create(model=CHAT, prompt=prompt, max_tokens=5, temperature=0)
    llm = LLM.load(CHAT, n_ctx=N_CTX)
    ids = llm.tokenizer.encode(prompt, parse_special=True)
    g = llm.generate(ids, max_new_tokens=5, temperature=0)
    assert r.choices[0].text == g.text
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(g.token_ids)
    assert r.choices[0].finish_reason == g.finish_reason


def test_embeddings_equal_encoder(client):
    from spark_lab.text.bert import SentenceEncoder
    texts = ["A cat sits on the mat.", "GPUs multiply matrices."]
    ref = SentenceEncoder.load("all-minilm-l6-v2").encode(texts)                       # [2, 384]
    r = client.embeddings.create(model="all-minilm-l6-v2", input=texts)
    got = np.array([d.embedding for d in r.data], dtype=np.float32)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
    assert r.usage.prompt_tokens > 0
    one = client.embeddings.create(model="all-minilm-l6-v2", input=texts[0], encoding_format="base64")
    raw = one.data[0].embedding
    vec = np.frombuffer(base64.b64decode(raw), dtype="<f4") if isinstance(raw, str) else np.asarray(raw, np.float32)
    np.testing.assert_array_equal(vec, got[0])


def test_image_equals_pipeline(client):
    from PIL import Image
    from spark_lab.diffusion import TextToImagePipeline
    r = client.images.generate(model="tiny-sd", prompt="a red square", n=2, response_format="b64_json",
                               extra_body={"steps": 2, "seed": 7})
    pipe = TextToImagePipeline.from_pretrained(TINY_SD)
    ref = pipe("a red square", num_inference_steps=2, seed=7, num_images_per_prompt=2, progress=False)
    assert len(r.data) == 2
    for d, im in zip(r.data, ref):
        got = Image.open(io.BytesIO(base64.b64decode(d.b64_json)))
        assert got.format == "PNG" and got.size == im.size
        np.testing.assert_array_equal(np.asarray(got.convert("RGB")), np.asarray(im))


# ------------------------------------------------------------------------------ many clients at once

@pytest.mark.slow
def test_sixteen_concurrent_streams(client, server):
    prompts = ["Say hello.", "Count to three.", "Name a fruit.", "What is 2+2?"]
    # the same requests one at a time: the reference answers
    alone = {p: _streamed(client, p, 4)[0] for p in prompts}

    def sixteen():
        with ThreadPoolExecutor(16) as pool:                      # 16 clients, loopback, bounded
            return [f.result() for f in [pool.submit(_streamed, client, prompts[i % 4], 4) for i in range(16)]]

    if os.environ.get("SPARK_LAB_DEVICE", "").strip().lower() == "strict":
        # the strict stand-in's device memory is host memory: the parallel slots' device state (KV
        # caches, made on first use) lands in RSS, where a GPU keeps it off the host. One round first
        # so that the check below measures growth per round (a leak), not the slots coming up.
        sixteen()
    warm = _rss_mb(server[1])
    results = sixteen()
    for i, (text, finish, _) in enumerate(results):
        assert text == alone[prompts[i % 4]], f"client {i} got {text!r}"
        assert finish in ("stop", "length")
    health = httpx.get(_root(server) + "/health").json()
    assert health["status"] == "ok" and health["models"][CHAT]["jobs"] == 0
    time.sleep(0.5)
    after = _rss_mb(server[1])
    print(f"\nserver RSS: {warm:.1f} MiB after warm requests, {after:.1f} MiB after 16 concurrent streams")
    assert after - warm < 50, f"RSS grew from {warm:.1f} to {after:.1f} MiB"


def test_disconnect_frees_the_line(client, server):
    health = lambda: httpx.get(_root(server) + "/health").json()["models"].get(CHAT, {})   # noqa: E731
    cancelled = health().get("cancelled", 0)
    http = httpx.Client(base_url=server[0], headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    body = {"model": CHAT, "messages": [{"role": "user", "content": "Tell me a very long story."}],
            "max_tokens": 900, "temperature": 0, "stream": True}
    with http.stream("POST", "/chat/completions", json=body) as running:     # would take minutes to finish
        lines = running.iter_lines()
        assert next(lines).startswith("data: ")                              # the role chunk
        with http.stream("POST", "/chat/completions", json=body) as waiting:  # queued behind it
            assert waiting.status_code == 200
        for line in lines:                                                    # wait for a real token
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                break
        else:
            pytest.fail("the stream ended before its first token")
    with pytest.raises(httpx.TimeoutException):                               # a non-streaming client gives up
        http.post("/chat/completions", json={**body, "stream": False}, timeout=1.5)
    http.close()
    # all three are gone: the next request is served now, not after 900-token stories (client timeout 120 s)
    quick = openai.OpenAI(base_url=server[0], api_key=KEY, max_retries=0, timeout=120)
    r = _chat(quick, "Hi", 2)
    assert r.usage.completion_tokens >= 1
    h = health()
    assert h["jobs"] == 0 and h["cancelled"] - cancelled == 3


# ------------------------------------------------------------------------------ bad requests

def _post(server, path, content, key=KEY):
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.post(server[0] + path, content=content, headers=headers, timeout=120)


BAD = [
    # (name, path, body, status, code, param)
    ("malformed json", "/chat/completions", b'{"model": "x", "messages": [', 400, "invalid_json", None),
    ("not an object", "/chat/completions", b"[1, 2]", 400, "invalid_json", None),
    ("unknown model", "/chat/completions", b'{"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}',
     404, "model_not_found", "model"),
    ("missing messages", "/chat/completions", b'{"model": "%s"}' % CHAT.encode(), 400,
     "missing_required_parameter", "messages"),
    ("wrong type", "/chat/completions",
     b'{"model": "%s", "messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"}' % CHAT.encode(),
     400, "invalid_type", "max_tokens"),
    ("bad role", "/chat/completions", b'{"model": "%s", "messages": [{"role": "robot", "content": "x"}]}'
     % CHAT.encode(), 400, "invalid_value", "messages.0.role"),
    ("temperature out of range", "/chat/completions",
     b'{"model": "%s", "messages": [{"role": "user", "content": "x"}], "temperature": 3}' % CHAT.encode(),
     400, "invalid_value", "temperature"),
    ("max_tokens zero", "/completions", b'{"model": "%s", "prompt": "x", "max_tokens": 0}' % CHAT.encode(),
     400, "invalid_value", "max_tokens"),
    ("n=2", "/chat/completions", b'{"model": "%s", "messages": [{"role": "user", "content": "x"}], "n": 2}'
     % CHAT.encode(), 400, "unsupported_parameter", "n"),
    ("context exceeded", "/chat/completions",
     b'{"model": "%s", "messages": [{"role": "user", "content": "%s"}]}' % (CHAT.encode(), b"word " * 1500),
     400, "context_length_exceeded", "messages"),
    ("embedding model for chat", "/chat/completions",
     b'{"model": "all-minilm-l6-v2", "messages": [{"role": "user", "content": "x"}]}', 400, "model_not_supported",
     "model"),
    ("empty embedding input", "/embeddings", b'{"model": "all-minilm-l6-v2", "input": []}', 400, "invalid_value",
     "input"),
    ("too many images", "/images/generations", b'{"model": "tiny-sd", "prompt": "x", "n": 9}', 400,
     "invalid_value", "n"),
    ("wrong image size", "/images/generations", b'{"model": "tiny-sd", "prompt": "x", "size": "1024x1024"}', 400,
     "invalid_value", "size"),
    ("too large", "/chat/completions", b'{"model": "%s", "messages": [{"role": "user", "content": "%s"}]}'
     % (CHAT.encode(), b"a" * (2 << 20)), 413, "request_too_large", None),
]


@pytest.mark.parametrize("name,path,body,status,code,param", BAD, ids=[b[0] for b in BAD])
def test_bad_request(server, name, path, body, status, code, param):
    r = _post(server, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["code"] == code and err["param"] == param
    assert err["type"] == "invalid_request_error"


def test_api_key(server):
    body = b'{"model": "%s", "messages": [{"role": "user", "content": "x"}]}' % CHAT.encode()
    for key in (None, "wrong-key"):
        r = _post(server, "/chat/completions", body, key=key)
        assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server[0], api_key="nope", max_retries=0).models.list()
    assert httpx.get(_root(server) + "/health").status_code == 200       # health needs no key


def test_unknown_model_through_client(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"] == "model_not_found"


def test_still_serving_after_bad_requests(client, server):
    r = client.completions.create(model=CHAT, prompt="Hello", max_tokens=1, temperature=0)
    assert r.usage.completion_tokens == 1
    assert httpx.get(_root(server) + "/health").json()["status"] == "ok"


# ------------------------------------------------------------------------------ the command and the app

def test_cli_serve_takes_key_from_env():
    env = dict(os.environ, SPARK_LAB_API_KEY="env-key", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "spark_lab.cli", "serve", "--port", "0"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, line
        url = line.split("listening on ")[1].split()[0]
        assert httpx.get(url + "/models").status_code == 401
        models = httpx.get(url + "/models", headers={"Authorization": "Bearer env-key"}).json()
        assert CHAT in [m["id"] for m in models["data"]]
        # `spark-lab serve` loads the default model at start: /health says 503 "loading", then 200 "ok"
        t0 = time.monotonic()
        while (h := httpx.get(url[: -len("/v1")] + "/health")).status_code == 503 and time.monotonic() - t0 < 120:
            assert h.json()["status"] == "loading"
            time.sleep(0.1)
        assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["models"][CHAT]["loaded"]
    finally:
        proc.terminate()
        # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status tells why it stopped
        assert proc.wait(timeout=30) in (0, -15)


def test_cli_serve_port_in_use(capsys):
    import socket
    from spark_lab import cli
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        assert cli.main(["serve", "--port", str(busy.getsockname()[1])]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("spark-lab serve: error: cannot listen on 127.0.0.1:") and "\n" not in err
    assert cli.main(["serve", "--model", "all-minilm-l6-v2"]) == 1
    assert "is an embedding model" in capsys.readouterr().err


def test_no_key_configured_means_open():
    from starlette.testclient import TestClient
    from spark_lab.serve import ServerConfig, create_app
    with TestClient(create_app(ServerConfig())) as http:
        assert http.get("/v1/models").status_code == 200
        r = http.get("/v1/nothing-here")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = http.post("/v1/embeddings", json={"model": CHAT, "input": "x"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_supported"
