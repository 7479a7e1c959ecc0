"""Random request bodies at every endpoint of the server (in-process, FastAPI's TestClient, a tiny
llama as the chat model): each answer is 200 or a 4xx JSON error in OpenAI's shape, never a 5xx,
and the server still answers a good request afterwards."""
from __future__ import annotations

import json

import pytest
from hypothesis import event, given, strategies as st

from spark_lab.models import is_present
from spark_lab.serve import ServerConfig
from spark_lab.serve.app import create_app

from ..llm.tiny import write_tiny_gguf
from .budget import budget

testclient = pytest.importorskip("fastapi.testclient")


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    path = write_tiny_gguf(tmp_path_factory.mktemp("serve") / "tiny.gguf", n_layer=1, d=16, n_head=2, n_kv=1, ff=32)
    app = create_app(ServerConfig(default_model=str(path), n_ctx=48, max_body_bytes=1 << 16))
    with testclient.TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 200, r.text               # the model loads (and compiles) outside the cases
        yield c


json_leaf = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=10)
json_any = st.recursive(json_leaf, lambda k: st.lists(k, max_size=3) | st.dictionaries(st.text(max_size=8), k, max_size=3),
                        max_leaves=10)
roles = st.sampled_from(["system", "developer", "user", "assistant", "tool", "bogus"]) | json_leaf
message = st.fixed_dictionaries({}, optional={
    "role": roles, "content": st.text(max_size=40) | json_any |
    st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]) | json_leaf, "text": json_leaf}),
             max_size=2)})
sampling = {"max_tokens": st.integers(-2, 8) | json_leaf, "temperature": st.floats(-1, 3) | json_leaf,
            "top_p": st.floats(-1, 2) | json_leaf, "top_k": st.integers(-2, 50) | json_leaf,
            "min_p": st.floats(-1, 2), "repetition_penalty": st.floats(-1, 3), "seed": st.integers(-2**70, 2**70),
            "stop": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=6) | json_leaf,
            "stream": st.booleans() | json_leaf, "n": st.integers(-1, 3), "logprobs": json_leaf,
            "presence_penalty": st.floats(-3, 3), "stream_options": json_any,
            "model": st.sampled_from(["tiny", "nope", "all-minilm-l6-v2", "spark-emoji"]) | json_leaf}
CHAT = st.fixed_dictionaries({}, optional={
    "messages": st.lists(message, max_size=3) | json_any, **sampling,
    "max_completion_tokens": st.integers(-1, 8), "response_format": json_any, "tools": json_any,
    "tool_choice": json_any, "reasoning_effort": st.sampled_from(["low", "high", "x"]) | json_leaf,
    "chat_template_kwargs": st.dictionaries(st.sampled_from(["enable_thinking", "messages", "x", "tools"]),
                                            json_any, max_size=2) | json_any})
COMPLETION = st.fixed_dictionaries({}, optional={
    "prompt": st.text(max_size=40) | st.lists(st.integers(-5, 300), max_size=8) |
    st.lists(st.lists(st.integers(-5, 300), max_size=4), max_size=2) | json_any,
    **sampling, "echo": json_leaf, "suffix": json_leaf, "best_of": json_leaf})
EMBED = st.fixed_dictionaries({}, optional={
    "input": st.text(max_size=30) | st.lists(st.text(max_size=20), max_size=3) | json_any,
    "model": st.sampled_from(["tiny", "nope", "all-minilm-l6-v2"]) | json_leaf,
    "encoding_format": st.sampled_from(["float", "base64", "x"]) | json_leaf, "dimensions": json_leaf})
IMAGE = st.fixed_dictionaries({"model": st.sampled_from(["tiny", "nope", "all-minilm-l6-v2"])}, optional={
    "prompt": st.text(max_size=20) | json_leaf,      # never a diffusion model: one would take seconds a case
    "n": st.integers(-1, 9) | json_leaf, "size": json_leaf, "response_format": json_leaf, "steps": json_leaf,
    "seed": json_leaf, "guidance_scale": json_leaf})
# near-valid bodies, so that many cases get past validation into the template, tokenizer and sampler
good = {"temperature": st.floats(0, 2), "top_p": st.floats(0, 1),
        "top_k": st.integers(0, 50), "min_p": st.floats(0, 0.99), "repetition_penalty": st.floats(0.5, 2),
        "seed": st.integers(-2**70, 2**70), "stop": st.lists(st.text(min_size=1, max_size=3), max_size=4),
        "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()})}
GOOD_CHAT = st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries({
    "role": st.sampled_from(["system", "developer", "user", "assistant"]), "content": st.text(max_size=30)}),
    min_size=1, max_size=3), "max_tokens": st.integers(1, 4)}, optional=good)
GOOD_COMPLETION = st.fixed_dictionaries({"prompt": st.text(min_size=1, max_size=30) | st.lists(
    st.integers(0, 260), min_size=1, max_size=8), "max_tokens": st.integers(1, 4)},
    optional={**good, "echo": st.booleans()})
CHAT, COMPLETION = GOOD_CHAT | CHAT, GOOD_COMPLETION | COMPLETION
ENDPOINTS = {"/v1/chat/completions": CHAT, "/v1/completions": COMPLETION, "/v1/embeddings": EMBED,
             "/v1/images/generations": IMAGE}


def check(r):
    event(f"HTTP {r.status_code}")           # pytest --hypothesis-show-statistics: how many got through
    assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code != 200:
        err = r.json()["error"]
        assert err["message"] and "\n" not in err["message"], err
        assert "Traceback" not in err["message"]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@budget(300)
@given(data=st.data())
def test_random_bodies(client, endpoint, data):
    body = data.draw(ENDPOINTS[endpoint] | json_any)
    if endpoint == "/v1/embeddings" and not is_present("all-minilm-l6-v2") and isinstance(body, dict):
        body["model"] = "nope"
    check(client.post(endpoint, content=json.dumps(body)))


@budget(800)
@given(raw=st.binary(max_size=80) | st.text(max_size=80).map(str.encode),
       endpoint=st.sampled_from(list(ENDPOINTS)), ctype=st.sampled_from(["application/json", "text/plain", ""]))
def test_random_bytes(client, raw, endpoint, ctype):
    check(client.post(endpoint, content=raw, headers={"content-type": ctype} if ctype else {}))


def test_oversized_body_is_413(client):
    r = client.post("/v1/chat/completions", content=b"{" + b" " * (1 << 17) + b"}")
    assert r.status_code == 413 and "error" in r.json()


def test_still_serving(client):
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hello"}],
                                                  "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")
    assert client.get("/health").json()["status"] == "ok"
