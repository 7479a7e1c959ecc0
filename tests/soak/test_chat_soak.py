"""Soak: one chat session of many turns on a tiny llama in one process. The context fills again and
again, so the oldest turns are dropped (once full, about one pair a turn); a turn that drops nothing
reuses the whole previous prompt from the KV cache.
Resident memory and the kit allocator stay flat (tests/soak/common.py has the bound).

`make test`: 100 turns (SPARK_LAB_SOAK_TURNS); `make soak`: 2,000."""
from __future__ import annotations

from spark_lab.llm.chat import ChatSession
from spark_lab.llm.engine import LLM

from ..llm.tiny import write_tiny_gguf
from .common import check, env_count, mark, psutil

TURNS = env_count("SPARK_LAB_SOAK_TURNS", 100)


def test_chat_soak(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", n_layer=1, d=16, n_head=2, n_kv=1, ff=32, n_ctx_train=1024)
    llm = LLM.load(path, n_ctx=512)
    session = ChatSession(llm, system_prompt="Be brief.", reserve=8)
    proc = psutil.Process()
    warm = max(10, TURNS // 10)
    base, peak, drops, reused, prev_len = None, 0, 0, 0, 0
    for i in range(TURNS):
        user = f"turn {i}: " + "tell me more " * (i % 5)
        before = len(session.history)
        session.send(user, max_new_tokens=8, temperature=0.8 if i % 3 else 0.0, seed=i)
        g = session.last
        assert len(g.prompt_token_ids) + len(g.token_ids) <= llm.n_ctx
        assert len(g.token_ids) <= 8
        if len(session.history) < before + 2:          # the oldest turns were dropped to fit
            drops += 1
        elif before:                                   # nothing dropped: the last prompt came from the KV cache
            assert g.reused_prompt_tokens >= prev_len, (i, g.reused_prompt_tokens, prev_len)
            reused += 1
        prev_len = len(g.prompt_token_ids)
        if i + 1 == warm:
            base = mark()
        elif base is not None and i % 10 == 0:
            peak = max(peak, proc.memory_info().rss)
    end = mark()
    peak = max(peak, end.rss)
    check(f"chat soak ({drops} turns dropped history, {reused} reused the cached prefix)", TURNS, base, peak, end)
    assert drops >= TURNS // 4 and reused >= TURNS // 10, (drops, reused)   # both paths ran, often
