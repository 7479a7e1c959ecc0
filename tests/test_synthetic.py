"""Synthetic real-shape GGUFs (benchmarks at real size without downloading a model)."""
import numpy as np
import pytest

from spark_lab.benchmarks import synthetic
from spark_lab.gguf import GGUFFile


def test_synthetic_file_has_the_real_shapes_and_runs(tmp_path):
    path = synthetic.write_synthetic("smollm2-135m-q4_1", tmp_path / "s.gguf")
    f = GGUFFile(path)
    s = synthetic.SHAPES["smollm2-135m-q4_1"]
    assert len(f.tensors) == 2 + 9 * s.n_layer                               # embd, norm, 9 per layer (tied output)
    assert sum(t.nbytes for t in f.tensors.values()) == synthetic.n_bytes("smollm2-135m-q4_1")
    assert f.tensors["blk.0.ffn_gate.weight"].qtype.name == "Q4_1"
    from spark_lab.llm.engine import LLM
    llm = LLM.load(str(path), n_ctx=128)
    assert llm.config.n_layer == 30 and llm.tokenizer.vocab_size == 49152
    g = llm.generate("a prompt of some bytes", max_new_tokens=3, temperature=0)
    assert len(g.token_ids) == 3 and np.isfinite(llm._prompt_logits[1]).all()


def test_real_size_files_match_their_published_sizes():
    # Meta-Llama-3-8B Q4_K_M is 4.92 GB; Qwen2.5-7B-Instruct Q4_K_M 4.68 GB (llama.cpp's mix)
    assert synthetic.n_bytes("llama3-8b-q4_k_m") / 1e9 == pytest.approx(4.91, abs=0.05)
    assert synthetic.n_bytes("qwen2.5-7b-q4_k_m") / 1e9 == pytest.approx(4.68, abs=0.1)


def test_unknown_synthetic_name_is_one_line():
    with pytest.raises(ValueError, match="unknown synthetic model 'llama-9000'"):
        synthetic.synthetic_path("llama-9000")


def test_gpt_oss_shape_loads_through_the_gpt_oss_loader(tmp_path):
    # the 20B's layout (MXFP4 experts, Q8_0 rest, sinks, biases, sliding window, YaRN) at toy size
    from dataclasses import replace
    from spark_lab.llm.engine import LLM
    big = synthetic.SHAPES["gpt-oss-20b-mxfp4"]
    assert synthetic.n_bytes("gpt-oss-20b-mxfp4") / 1e9 == pytest.approx(12.1, abs=0.1)   # ggml-org's file: 12.1 GB
    s = replace(big, n_layer=2, d=64, n_head=4, n_kv=2, head_dim=32, ff=64, vocab=300, n_expert=4, n_expert_used=2,
                sliding_window=4, n_ctx_train=1024)
    path = synthetic.write_synthetic("tiny-gpt-oss", tmp_path / "g.gguf", shape=s)
    f = GGUFFile(path)
    assert f.tensors["blk.0.ffn_gate_exps.weight"].qtype.name == "MXFP4"
    assert f.tensors["blk.0.attn_q.weight"].qtype.name == "Q8_0"
    assert sum(t.nbytes for t in f.tensors.values()) == synthetic.n_bytes("", shape=s)
    llm = LLM.load(str(path), n_ctx=64)
    c = llm.config
    assert (c.arch, c.n_expert, c.n_expert_used, c.sliding_window, c.attn_sinks) == ("gpt-oss", 4, 2, 4, True)
    assert c.rope_yarn is not None
    g = llm.generate("some bytes", max_new_tokens=3, temperature=0)
    assert len(g.token_ids) == 3 and np.isfinite(llm._prompt_logits[1]).all()
