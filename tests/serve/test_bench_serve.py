"""`spark-lab bench serve` on a tiny model without the anchor: the rounds run, the counts are real, the
table says the anchor is missing; a wrong --llama-server is one clear line."""
from __future__ import annotations

import pytest

pytest.importorskip("httpx")

from spark_lab.benchmarks import serve as bench  # noqa: E402

from ..llm.thinking_model import write_thinking_gguf  # noqa: E402


def test_bench_serve_spark_only_on_a_tiny_model(tmp_path):
    path = write_thinking_gguf(tmp_path / "tiny-think.gguf")
    res = bench.measure(str(path), path, threads=1, streams=(1, 2), repeats=1, max_tokens=6, llama=None,
                        log=lambda s: None)
    assert [r["streams"] for r in res["rows"]] == [1, 2] and res["anchor"] is None
    for r in res["rows"]:
        s = r["spark_lab"]
        assert s["tok_s"] > 0 and 0 < s["ttft_p50_ms"] <= s["ttft_p95_ms"]
        assert "llama-server" not in r
    assert res["rows"][0]["scaling"] == 1.0
    table = bench.markdown(res)
    assert table.startswith("| streams | spark_lab tok/s") and "llama-server not found" in table
    assert table.count("\n| ") == 2          # two rows below the separator


def test_bench_serve_anchor_rows_and_bad_path(tmp_path):
    res = {"model": "m", "threads": 2, "max_tokens": 8, "repeats": 3, "slot_ctx": 512, "parallel": 4, "anchor": "x",
           "rows": [{"streams": 1, "scaling": 1.0, "ratio": 2.0,
                     "spark_lab": {"tok_s": 20.0, "ttft_p50_ms": 10, "ttft_p95_ms": 12},
                     "llama-server": {"tok_s": 10.0, "ttft_p50_ms": 30, "ttft_p95_ms": 31}}]}
    assert "| 1 | 20.0 | 10 / 12 | 1.00 | 10.0 | 30 / 31 | 2.00 |" in bench.markdown(res)
    with pytest.raises(ValueError, match="--llama-server .*no executable"):
        bench.find_llama_server(str(tmp_path / "nope"))
