"""Soak: the kit's main paths in a loop in one process (generate, a chat session whose history is
dropped to fit, summarize, server requests); resident memory stays flat and no round hangs.

`make test` runs it for a few seconds (SPARK_LAB_SOAK_SECONDS, default 6); `make soak` runs it for
minutes. After a warm-up third of the time, RSS must stay within 5% of where it was (plus 8 MB for
the allocator's arenas on a short run), and the kit's allocator holds the same bytes per tag at the end."""
from __future__ import annotations

import gc
import os
import time

import pytest

from spark_lab.llm.chat import ChatSession
from spark_lab.llm.engine import LLM
from spark_lab.memory import get_allocator
from spark_lab.serve import ServerConfig
from spark_lab.serve.app import create_app
from spark_lab.summarize import summarize

from ..llm.tiny import write_tiny_gguf

psutil = pytest.importorskip("psutil")
testclient = pytest.importorskip("fastapi.testclient")

SECONDS = float(os.environ.get("SPARK_LAB_SOAK_SECONDS", "6"))
ROUND_LIMIT_S = 10.0                  # one round (a few tiny generations) taking longer than this is a hang
TEXT = ("The river rose in the night. By morning the low fields were under water and the school was closed. "
        "Volunteers filled sandbags along the bank while the mayor asked for help from the county. ") * 4


def test_soak(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", n_layer=1, d=16, n_head=2, n_kv=1, ff=32, n_ctx_train=1024)
    llm = LLM.load(path, n_ctx=512)
    session = ChatSession(llm, system_prompt="Be brief.", reserve=8)
    proc = psutil.Process()
    with testclient.TestClient(create_app(ServerConfig(default_model=str(path), n_ctx=128))) as client:
        def one_round(i: int):
            g = llm.generate(f"Round {i}: tell me", max_new_tokens=6, temperature=0.8, seed=i)
            assert len(g.token_ids) <= 6
            session.send(f"question {i} " + "more words " * (i % 7), max_new_tokens=6, temperature=0.0)
            assert len(session.last.prompt_token_ids) + len(session.last.token_ids) <= llm.n_ctx   # history dropped to fit
            s = summarize(TEXT, method="abstractive", llm=llm, max_words=12, max_new_tokens=8, progress=False)
            assert isinstance(s.text, str)
            r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": f"hi {i}"}],
                                                          "max_tokens": 4, "stream": bool(i % 2)})
            assert r.status_code == 200, r.text[:200]
            assert client.post("/v1/completions", json={"prompt": "x" * (i % 50 + 1), "max_tokens": 2}).status_code == 200

        start, i, baseline, rss, slowest = time.monotonic(), 0, None, [], 0.0
        while time.monotonic() - start < SECONDS or i < 6:
            t0 = time.monotonic()
            one_round(i)
            slowest = max(slowest, time.monotonic() - t0)
            assert slowest < ROUND_LIMIT_S, f"round {i} took {slowest:.1f} s"
            i += 1
            if baseline is None and time.monotonic() - start >= SECONDS / 3 and i >= 3:
                gc.collect()
                baseline, tags = proc.memory_info().rss, dict(get_allocator().stats().by_tag)
            elif baseline is not None:
                rss.append(proc.memory_info().rss)
    gc.collect()
    assert dict(get_allocator().stats().by_tag) == tags      # the allocator's tags are back at their baseline
    grown = max(rss) - baseline
    print(f"soak: {i} rounds in {time.monotonic() - start:.0f} s, slowest {slowest:.2f} s, RSS {baseline / 2**20:.0f} MB "
          f"after warm-up, peak {max(rss) / 2**20:.0f} MB ({100 * grown / baseline:+.1f}%), "
          f"chat history {len(session.history)} messages")
    assert len(session.history) < 2 * i or i < 12      # old turns were dropped
    assert grown <= 0.05 * baseline + (8 << 20), f"RSS grew {grown / 2**20:.1f} MB over {i} rounds"
