"""The engine on tiny random GGUFs: loading errors, context limits, sampling, streaming, CLI errors."""
import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest

from spark_lab.gguf import GGUFError, GGUFFile
from spark_lab.llm import LLM, ContextOverflow, SamplingParams, sample
from spark_lab.llm.engine import _Detokenizer

from .tiny import write_tiny_gguf

CLI = [sys.executable, "-m", "spark_lab.cli"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


@pytest.fixture(scope="module")
def tiny_llm(tiny):
    return LLM.load(tiny, n_ctx=64)


def run_cli(*args, stdin=None):
    env = dict(os.environ, SPARK_LAB_THREADS="1")
    return subprocess.run(CLI + list(args), capture_output=True, text=True, input=stdin, env=env, timeout=300)


# ------------------------------------------------------------------ file problems

def test_reader_matches_gguf_py(tiny):
    ours, ref = GGUFFile(tiny), gguf.GGUFReader(tiny)
    assert set(ours.tensors) == {t.name for t in ref.tensors}
    for t in ref.tensors:
        np.testing.assert_array_equal(np.asarray(ours.raw(t.name)).reshape(-1), np.asarray(t.data).reshape(-1))
    assert ours.metadata["tokenizer.ggml.tokens"] == [bytes(ref.fields["tokenizer.ggml.tokens"].parts[i])
                                                      for i in ref.fields["tokenizer.ggml.tokens"].data]
    assert ours.metadata["llama.block_count"] == 2


def test_not_a_gguf(tmp_path):
    p = tmp_path / "notes.gguf"
    p.write_text("hello, this is not a model at all" * 4)
    with pytest.raises(GGUFError, match="not a GGUF file"):
        GGUFFile(p)


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated(tiny, tmp_path, keep):
    data = tiny.read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(GGUFError, match="truncated GGUF"):
        GGUFFile(p)


def test_unknown_architecture(tmp_path):
    p = write_tiny_gguf(tmp_path / "mamba.gguf", arch="mamba")
    with pytest.raises(GGUFError, match="unknown architecture 'mamba'"):
        LLM.load(p)


def test_unsupported_quant_type(tmp_path):
    p = tmp_path / "q8_1.gguf"      # Q8_1: llama.cpp's activation-only type, never a weight spark_lab runs
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_tensor("token_embd.weight", np.zeros((8, 80), np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_1)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    f = GGUFFile(p)  # the header is fine ...
    from spark_lab.llm.model import Transformer
    from spark_lab.gguf import LLMConfig
    cfg = LLMConfig("llama", 8, 256, 1, 4, 4, 64, 256, 64, 1e-5, 1e4, 64, False)
    with pytest.raises(GGUFError, match="Q8_1"):  # ... the weights are not something we can run
        Transformer(f, cfg)


# ------------------------------------------------------------------ generation

def test_prompt_longer_than_context(tiny_llm):
    with pytest.raises(ContextOverflow, match="does not fit the context of 64"):
        tiny_llm.generate(list(range(70)), max_new_tokens=4)


def test_generation_stops_at_context(tiny_llm):
    g = tiny_llm.generate(list(range(60)), max_new_tokens=50, temperature=0, stop_at_eos=False)
    assert len(g.token_ids) == 4 and g.finish_reason == "length"  # 60 + 4 = the context of 64


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(min_p=1.5)])
def test_bad_parameters(tiny_llm, bad):
    with pytest.raises(ValueError):
        tiny_llm.generate([1, 2, 3], **bad)


def test_greedy_is_deterministic_and_cached_prefix_is_reused(tiny_llm):
    a = tiny_llm.generate([10, 20, 30, 40], max_new_tokens=8, temperature=0)
    tiny_llm.reset()
    b = tiny_llm.generate([10, 20, 30, 40], max_new_tokens=8, temperature=0)
    assert a.token_ids == b.token_ids
    c = tiny_llm.generate([10, 20, 30, 40], max_new_tokens=8, temperature=0)  # same prompt, prefix reused
    assert c.reused_prompt_tokens == 4 and c.token_ids == a.token_ids          # even its last token's logits


def test_seeded_sampling_reproducible(tiny_llm):
    kw = dict(max_new_tokens=12, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    a = tiny_llm.generate([5, 6, 7], seed=123, **kw)
    b = tiny_llm.generate([5, 6, 7], seed=123, **kw)
    c = tiny_llm.generate([5, 6, 7], seed=124, **kw)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids


def test_stream_pieces_equal_text(tiny_llm):
    pieces = list(tiny_llm.stream([65, 66, 67], max_new_tokens=16, temperature=0))
    g = tiny_llm.generate([65, 66, 67], max_new_tokens=16, temperature=0)
    assert "".join(pieces) == g.text


def test_stop_string(tiny_llm):
    g = tiny_llm.generate([65, 66, 67], max_new_tokens=16, temperature=0)
    if len(g.text) < 3:
        pytest.skip("greedy text too short to cut")
    stop = g.text[2:4]
    h = tiny_llm.generate([65, 66, 67], max_new_tokens=16, temperature=0, stop=[stop])
    assert h.text == g.text[: g.text.index(stop)] and h.finish_reason == "stop"
    assert "".join(tiny_llm.stream([65, 66, 67], max_new_tokens=16, temperature=0, stop=[stop])) == h.text


# ------------------------------------------------------------------ samplers

def test_sampler_rules():
    rng = np.random.default_rng(0)
    logits = np.array([1.0, 3.0, 2.0, 3.0, -5.0], np.float32)
    assert sample(logits, SamplingParams(temperature=0), rng) == 1           # ties -> lowest id
    assert all(sample(logits, SamplingParams(temperature=1.0, top_k=1), rng) in (1, 3) for _ in range(20))
    # min_p keeps only tokens with p >= 0.5 * p(best): ids 1 and 3
    seen = {sample(logits, SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.5), rng) for _ in range(200)}
    assert seen == {1, 3}
    # top_p: the two best (equal) tokens already hold > 0.6 of the mass
    seen = {sample(logits, SamplingParams(temperature=1.0, top_k=0, top_p=0.6, min_p=0.0), rng) for _ in range(200)}
    assert seen <= {1, 3}
    # repetition penalty: a seen positive logit is divided, a seen negative one multiplied
    from spark_lab.llm.sampling import apply_repetition_penalty
    out = apply_repetition_penalty(logits, [1, 4], 2.0)
    assert out[1] == 1.5 and out[4] == -10.0 and out[2] == 2.0


def test_sampling_distribution_matches_softmax():
    rng = np.random.default_rng(1)
    logits = np.log(np.array([0.5, 0.3, 0.2], np.float32))
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    counts = np.bincount([sample(logits, p, rng) for _ in range(4000)], minlength=3) / 4000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.2], atol=0.03)


# ------------------------------------------------------------------ UTF-8 streaming

class _ByteTok:
    def __init__(self, pieces):
        self.pieces = pieces

    def token_bytes(self, i):
        return self.pieces[i]


def test_detokenizer_holds_split_utf8():
    emoji = "🙂".encode()  # 4 bytes, one token each
    d = _Detokenizer(_ByteTok([bytes([b]) for b in emoji] + [b" ok"]))
    out = [d.push(i) for i in range(5)]
    assert out == ["", "", "", "🙂", " ok"]


# ------------------------------------------------------------------ CLI errors: one line, exit 1

def _one_line_error(r):
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_cli_errors(tiny, tmp_path):
    notgguf = tmp_path / "x.gguf"
    notgguf.write_bytes(b"\x00" * 100)
    assert "not a GGUF file" in _one_line_error(run_cli("generate", "--model", str(notgguf), "hi"))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny.read_bytes()[:3000])
    assert "truncated" in _one_line_error(run_cli("generate", "--model", str(cut), "hi"))
    assert "max-new-tokens" in _one_line_error(run_cli("generate", "--model", str(tiny), "--max-new-tokens", "0", "hi"))
    assert "temperature" in _one_line_error(run_cli("generate", "--model", str(tiny), "--temperature", "-1", "hi"))
    long_prompt = "a" * 300  # one byte token each: > the 256-token trained context
    assert "context" in _one_line_error(run_cli("generate", "--model", str(tiny), "--raw", long_prompt))
    assert "no model" in _one_line_error(run_cli("generate", "--model", "no-such-model", "hi"))


def test_cli_generate_json(tiny):
    r = run_cli("generate", "--model", str(tiny), "--raw", "--temperature", "0", "--max-new-tokens", "5", "--json", "abc")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ("model", "prompt_token_ids", "token_ids", "text", "prompt_tokens_per_second", "tokens_per_second"):
        assert key in out
    assert out["prompt_token_ids"] == [97, 98, 99]  # one byte token each in the tiny vocabulary
    assert 1 <= len(out["token_ids"]) <= 5


def test_cli_chat_streams_and_quits(tiny):
    r = run_cli("chat", "--model", str(tiny), "--temperature", "0", "--max-new-tokens", "4", stdin="hello\n/reset\nagain\n\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("bot> ") == 2 and "tok/s" in r.stderr


def test_cli_plan_reads_gguf_metadata(tiny):
    r = run_cli("plan", str(tiny), "--context", "128", "--json")
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)
    # 2 layers x (K + V) x 2 kv heads x head dim 8 x 128 positions x 2 bytes (f16)
    assert p["kv_cache"] == 2 * 2 * 2 * 8 * 128 * 2 and p["fits_here"]


def test_the_same_prompt_again_reuses_its_prefill_logits(tiny_llm):
    llm = tiny_llm
    llm.reset()
    prompt = list(range(70, 90))
    first, reused = llm.prefill(prompt)
    assert reused == 0
    list(llm.stream_tokens(prompt, 5, temperature=0, stop_at_eos=False))   # the cache now runs past the prompt
    again, reused = llm.prefill(prompt)
    assert reused == len(prompt) and np.array_equal(again, first) and llm._cached == prompt
    longer, reused = llm.prefill(prompt + [91])                         # a longer prompt is computed
    assert reused == len(prompt) and longer.shape == first.shape
    llm.reset()
    fresh, reused = llm.prefill(prompt)                                 # after reset: from scratch
    assert reused == 0 and np.allclose(fresh, first, atol=1e-5)
    a = llm.generate(prompt, max_new_tokens=6, temperature=0, stop_at_eos=False).token_ids
    b = llm.generate(prompt, max_new_tokens=6, temperature=0, stop_at_eos=False).token_ids
    assert a == b
