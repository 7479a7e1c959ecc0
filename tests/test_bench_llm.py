"""spark_lab.benchmarks.llm without llama.cpp: the weight-bytes count and the report's arithmetic."""
import pytest

from spark_lab.benchmarks import llm as B


def test_weight_bytes_counts_every_tensor_once(tmp_path):
    import gguf
    from tests.llm.tiny import write_tiny_gguf
    p = write_tiny_gguf(tmp_path / "m.gguf", qtype=gguf.GGMLQuantizationType.Q8_0)
    from spark_lab.gguf import GGUFFile
    t = GGUFFile(p).tensors
    assert "output.weight" not in t                                    # tied: the table is the output matrix
    assert B.weight_bytes(p) == sum(v.nbytes for v in t.values())


def test_report_lines():
    res = {"model": "m", "prompt_tokens": 10, "new_tokens": 8, "threads": 2, "repeats": 3,
           "spark_lab": {"prefill_tps": 300.0, "decode_tps": 90.0, "ttft_s": 1.5, "peak_rss_mb": 300.0},
           "llama.cpp": {"prefill_tps": 150.0, "decode_tps": 60.0, "ttft_s": 1.0, "peak_rss_mb": 150.0},
           "ratios": {"prefill": 2.0, "decode": 1.5, "ttft": 1.5, "peak_rss": 2.0},
           "greedy_tokens_matching_prefix": 8, "weight_bytes_per_token": 100e6, "one_core_read_gbs": 9.5,
           "decode_weight_gbs": {"spark_lab": 9.0, "llama.cpp": 6.0}}
    text = B.report(res)
    assert "decode tok/s" in text and "1.50" in text and "spark_lab 9.0 GB/s, llama.cpp 6.0 GB/s" in text
