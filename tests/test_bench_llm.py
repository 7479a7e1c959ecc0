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
    res = {"model": "m", "prompt_tokens": 10, "new_tokens": 8, "threads": 2, "repeats": 3, "prefill_tokens": 512,
           "contexts": [4096], "cache_type_k": "f16", "cache_type_v": "f16", "n_ctx": 1024, "llamacpp_buffers": "plain",
           "spark_lab": {"load_s": 0.2, "prefill_tps": 300.0, "decode_tps": 90.0, "ttft_s": 1.5, "peak_rss_mb": 300.0,
                         "decode_tps_4096": 45.0},
           "llama.cpp": {"load_s": 0.1, "prefill_tps": 150.0, "decode_tps": 60.0, "ttft_s": 1.0, "peak_rss_mb": 150.0},
           "ratios": {"load": 2.0, "prefill": 2.0, "decode": 1.5, "ttft": 1.5, "peak_rss": 2.0},
           "greedy_tokens_matching_prefix": 8, "weight_bytes_per_token": 100e6, "one_core_read_gbs": 9.5,
           "decode_weight_gbs": {"spark_lab": 9.0, "llama.cpp": 6.0}}
    text = B.report(res)
    assert "decode tok/s" in text and "1.50" in text and "spark_lab 9.0 GB/s, llama.cpp 6.0 GB/s" in text
    assert "45.00 (0.50x ctx 0)" in text and "cold run wall" not in text
    md = B.markdown(res).splitlines()
    assert "| load s | 0.20 | 0.10 | 2.00 |" in md and "| decode tok/s at 4k | 45.00 (0.50x ctx 0) | not measured | - |" in md


def test_long_prompt_has_the_asked_length(tmp_path):
    from tests.llm.tiny import write_tiny_gguf
    from spark_lab.tokenizer import Tokenizer
    tok = Tokenizer.from_gguf(write_tiny_gguf(tmp_path / "m.gguf"))
    ids = B.long_prompt(tok, 512)
    assert len(ids) == 512 and ids[:5] == tok.encode(B.PROMPT, add_bos=True)[:5]
