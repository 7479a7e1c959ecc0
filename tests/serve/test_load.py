"""The server under load: concurrent chat requests, the bounded queue (429 + Retry-After), the
per-request timeout, /metrics and /health, and a 200-request soak on a tiny model (make soak: 2,000)."""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("psutil")

from spark_lab.models import is_present  # noqa: E402
from spark_lab.serve import soak  # noqa: E402
from spark_lab.serve.engine import SerialEngine  # noqa: E402

from ..llm.thinking_model import write_thinking_gguf  # noqa: E402
from ..server_proc import server_process  # noqa: E402

SERVER = """
import sys
from spark_lab.serve import ServerConfig, serve
config = ServerConfig(default_model=sys.argv[1], parallel=int(sys.argv[2]), max_waiting=int(sys.argv[3]),
                      timeout=float(sys.argv[4]) or None, n_ctx=512)
serve(config, host="127.0.0.1", port=0, ready=lambda url: print("READY", url, flush=True))
"""
SMOL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    path = write_thinking_gguf(tmp_path_factory.mktemp("load") / "tiny-think.gguf")
    with server_process(SERVER, str(path), "4", "32", "60") as (url, pid):
        yield url, pid, "tiny-think"


def _metrics(url):
    return soak.metrics(url[: -len("/v1")])


def test_concurrent_chats_each_get_their_own_exact_answer(tiny_server):
    url, _, model = tiny_server
    client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60)
    ask = lambda i: client.chat.completions.create(   # noqa: E731
        model=model, messages=[{"role": "user", "content": f"q{i}"}], temperature=0, max_tokens=20)
    alone = ask(0)
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, range(8)))
    assert alone.choices[0].message.content == "OK" and alone.choices[0].message.reasoning_content == "Hm"
    for r in together:                       # the tiny model walks its chain whatever the question
        assert r.choices[0].message.content == "OK" and r.choices[0].finish_reason == "stop"
        assert r.usage.completion_tokens == alone.usage.completion_tokens


def test_metrics_prometheus_text_and_counts_add_up(tiny_server):
    url, _, model = tiny_server
    before = _metrics(url)
    r = httpx.post(url + "/completions", json={"model": model, "prompt": "hi", "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200
    n = r.json()["usage"]["completion_tokens"]
    bad = httpx.post(url + "/completions", json={"model": model, "prompt": "hi", "max_tokens": -1})
    assert bad.status_code == 400 and bad.json()["error"]["message"]
    text = httpx.get(url[: -len("/v1")] + "/metrics").text
    assert "# TYPE llamacpp:kv_cache_usage_ratio gauge" in text and "# TYPE vllm:num_requests_waiting gauge" in text
    after = _metrics(url)
    key = 'spark_lab:http_requests_total{endpoint="/v1/completions",status="%d"}'
    assert after[key % 200] - before.get(key % 200, 0) == 1
    assert after[key % 400] - before.get(key % 400, 0) == 1
    assert after["llamacpp:tokens_predicted_total"] - before["llamacpp:tokens_predicted_total"] == n
    assert after["vllm:generation_tokens_total"] == after["llamacpp:tokens_predicted_total"]
    answered = sum(v for k, v in after.items() if k.startswith("spark_lab:http_requests_total{"))
    assert after["spark_lab:requests_received_total"] == answered + after["spark_lab:requests_in_flight"]
    assert after["llamacpp:requests_processing"] == 0 and after["spark_lab:slots{model_name=\"tiny-think\"}"] == 4


def test_health_ready(tiny_server):
    r = httpx.get(tiny_server[0][: -len("/v1")] + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_soak_twin_200_requests(tiny_server):
    """The bounded twin of `make soak`: every request answered in full or with a JSON error, none
    hangs, hang-ups counted, /metrics adds up, and the memory does not keep growing."""
    url, pid, model = tiny_server
    report = soak.run(url, pid, 200, model, "all-minilm-l6-v2" if is_present("all-minilm-l6-v2") else model,
                      concurrency=8, max_tokens=12, request_timeout=60)
    assert report["n_failures"] == 0, report["failures"]
    assert report["left"] == 20 and report["errors"] >= 10          # 10 malformed, answered with 400 JSON
    assert report["metrics_add_up"], report
    assert report["metrics_in_flight"] == 0
    assert report["rss_growth"] <= 0.05, report


def test_serial_engine_frees_on_close_and_blocks_while_busy(tiny_server, tmp_path):
    from spark_lab.llm import LLM
    llm = LLM.load(str(write_thinking_gguf(tmp_path / "t.gguf")), n_ctx=256)
    eng = SerialEngine(llm, parallel=2)
    ids = llm.encode_chat([{"role": "user", "content": "hi"}])
    alone = eng.generate_tokens(ids, max_new_tokens=20, temperature=0)
    it = eng.stream_tokens(ids, max_new_tokens=20, temperature=0)
    next(it)
    assert eng.stats()["busy"] == 1 and eng.stats()["kv_tokens"] == len(ids) + 1
    got = []
    t = threading.Thread(target=lambda: got.append(eng.generate_tokens(ids, max_new_tokens=20, temperature=0)))
    t.start()
    time.sleep(0.3)
    assert eng.stats()["waiting"] == 1 and not got          # blocked behind the open stream
    it.close()                                               # frees the slot
    t.join(timeout=30)
    assert got and got[0].token_ids == alone.token_ids
    s = eng.stats()
    assert (s["busy"], s["waiting"], s["kv_tokens"]) == (0, 0, 0) and s["slots"] == 2


@pytest.mark.skipif(not is_present(SMOL), reason="SmolLM2 is not installed (make setup)")
def test_queue_full_429_and_timeout_504():
    with server_process(SERVER, SMOL, "1", "1", "1") as (url, _):
        long = {"model": SMOL, "messages": [{"role": "user", "content": "Tell a long story."}],
                "max_tokens": 400, "temperature": 0}
        with ThreadPoolExecutor(4) as pool:
            rs = list(pool.map(lambda _: httpx.post(url + "/chat/completions", json=long, timeout=60), range(4)))
        codes = sorted(r.status_code for r in rs)
        busy = [r for r in rs if r.status_code == 429]
        assert busy, codes                                   # 1 decoding + 1 waiting: the rest are turned away
        assert busy[0].headers["retry-after"] == "1" and busy[0].json()["error"]["code"] == "rate_limit_exceeded"
        slow = [r for r in rs if r.status_code == 504]
        assert slow and slow[0].json()["error"]["code"] == "timeout"     # the one in line waits longer than 1 s
        # a stream past the limit ends with an in-band JSON error
        with httpx.stream("POST", url + "/chat/completions", json={**long, "stream": True}, timeout=60) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert events[-1]["error"]["code"] == "timeout"
        # a client that hangs up mid-stream frees its slot (the generation is aborted, not run to the end)
        before = _metrics(url)
        with httpx.stream("POST", url + "/chat/completions", json={**long, "stream": True}, timeout=60) as r:
            got = [line for _, line in zip(range(4), r.iter_lines())]
        assert any(line.startswith("data: {") for line in got)
        t0 = time.monotonic()
        while (m := _metrics(url))["llamacpp:requests_processing"] and time.monotonic() - t0 < 30:
            time.sleep(0.05)
        # freed within a few steps, counted in tokens rather than seconds (a loaded machine or the
        # strict device steps slower): the 400-token answer stopped soon after the client left
        out = "llamacpp:tokens_predicted_total"
        assert m["llamacpp:requests_processing"] == 0 and m[out] - before[out] < 40, m[out] - before[out]
        abort = 'spark_lab:generations_total{reason="abort"}'
        assert m[abort] - before.get(abort, 0) == 1
        client = openai.OpenAI(base_url=url, api_key="x", max_retries=0)

        def call(_):
            try:
                return client.chat.completions.create(**long)
            except openai.APIStatusError as e:          # the official client maps 429 to RateLimitError
                return e
        with ThreadPoolExecutor(4) as pool:
            errors = list(pool.map(call, range(4)))
        assert any(isinstance(e, openai.RateLimitError) for e in errors), errors
