"""gpt-oss, qwen3moe and RoPE scaling (llama3 rope_freqs, YaRN) against transformers.

The fixtures in tests/fixtures/spark/ are tiny random transformers models converted with
llama.cpp's own convert_hf_to_gguf.py, beside the logits transformers gives for a 20-token prompt
(tools/make_spark_fixtures.py makes both; no torch needed here). Every model must give the same
logits for the whole prompt, for cached decoding one token at a time (past gpt-oss's sliding
window of 4) and for a prompt fed in two chunks.
"""
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import gguf

from spark_lab.device import to_host
from spark_lab.gguf import GGUFError, GGUFFile, config_from_gguf
from spark_lab.llm.cache import KVCache
from spark_lab.llm.model import Transformer
from spark_lab.llm.moe import expert_hits, route, swiglu_oai
from tests.llm.gguf_edit import rewrite_gguf

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "spark"
MODELS = ["qwen3moe", "gpt-oss", "llama31", "qwen3-yarn"]


def _load(path):
    f = GGUFFile(path)
    c = config_from_gguf(f)
    return Transformer(f, c), c


def _ref(name):
    d = np.load(FIX / f"{name}.npz")
    return d["tokens"], d["logits"]


def _close(out, ref, tol=1e-3):
    """Relative to the logits' scale: |out - ref| <= tol * (|ref| + max |ref|)."""
    out, ref = to_host(out), to_host(ref)                 # GPU / strict-device logits come back explicitly
    assert out.dtype == np.float32 and out.shape == ref.shape
    err = np.abs(out - ref) / (np.abs(ref) + np.abs(ref).max())
    assert err.max() <= tol, f"max relative error {err.max():.2e}"


@pytest.mark.parametrize("name", MODELS)
def test_matches_transformers(name):
    tokens, ref = _ref(name)
    m, c = _load(FIX / f"{name}.gguf")
    T = len(tokens)
    out = m.forward(tokens, 0, KVCache(c.n_layer, 32, c.n_head_kv, c.head_dim), all_logits=True)
    _close(out, ref)
    cache = KVCache(c.n_layer, 32, c.n_head_kv, c.head_dim)          # decode, one token at a time
    m.forward(tokens[:3], 0, cache)
    for j in range(3, T):
        _close(m.forward(tokens[j:j + 1], j, cache), ref[j:j + 1])
    cache = KVCache(c.n_layer, 32, c.n_head_kv, c.head_dim)          # a prompt in two chunks
    m.forward(tokens[:7], 0, cache)
    _close(m.forward(tokens[7:], 7, cache, all_logits=True), ref[7:])


def test_configs_read_from_the_converted_files():
    _, c = _load(FIX / "gpt-oss.gguf")
    assert (c.arch, c.attn_sinks, c.act, c.expert_gating) == ("gpt-oss", True, "swiglu_oai", "softmax_weight")
    assert (c.n_expert, c.n_expert_used, c.sliding_window) == (4, 2, 4)
    assert [c.is_sliding(i) for i in range(4)] == [True, False, True, False]
    assert c.rope_yarn.orig_ctx == 128 and c.rope_freq_scale == 1 / 8 and not c.rope_yarn.truncate
    _, c = _load(FIX / "qwen3moe.gguf")
    assert (c.n_expert, c.n_expert_used, c.n_ff_exp, c.expert_weights_norm, c.qk_norm) == (8, 2, 32, True, True)
    assert c.n_active_params < c.n_params
    _, c = _load(FIX / "qwen3-yarn.gguf")
    assert c.rope_yarn.orig_ctx == 256 and c.rope_freq_scale == 0.25 and c.rope_yarn.truncate


@pytest.mark.parametrize("name, drop", [("llama31", "rope_freqs"), ("qwen3-yarn", "rope_yarn")])
def test_rope_scaling_is_what_makes_them_match(name, drop):
    """Without the llama3 frequency factors (what spark_lab did before) or YaRN, the logits are off."""
    tokens, ref = _ref(name)
    m, c = _load(FIX / f"{name}.gguf")
    if drop == "rope_freqs":
        assert m.rope_freqs is not None and m.rope_freqs.shape == (c.rope_dim // 2,)
        m.rope_freqs = None
    else:
        c.rope_yarn, c.rope_freq_scale = None, 1.0
    out = to_host(m.forward(tokens, 0, KVCache(c.n_layer, 32, c.n_head_kv, c.head_dim), all_logits=True))
    assert np.abs(out - ref).max() > 1e-2 * np.abs(ref).max()


def _requantize_experts(src, dst, qtype=gguf.GGMLQuantizationType.Q8_0):
    def tensors(name, q, data):
        if name.endswith("_exps.weight"):
            a = data.astype(np.float32)
            return gguf.quants.quantize(a.reshape(-1, a.shape[-1]), qtype).reshape(*a.shape[:-1], -1), qtype
        return data, q
    return rewrite_gguf(src, dst, tensors=tensors)


def _dequantize_experts(src, dst):
    def tensors(name, q, data):
        if q not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            return gguf.quants.dequantize(data, q), gguf.GGMLQuantizationType.F32
        return data, q
    return rewrite_gguf(src, dst, tensors=tensors)


@pytest.mark.parametrize("name, qtype", [("qwen3moe", "Q8_0"), ("gpt-oss", "Q8_0"), ("gpt-oss", "MXFP4")])
def test_quantized_experts(tmp_path, name, qtype):
    """Quantized experts (Q8_0: int8-rounded activations, as llama.cpp; MXFP4 as gpt-oss ships)
    against the same experts dequantized to float32: that rounding's noise, the same greedy tokens."""
    tokens, _ = _ref(name)
    qt = gguf.GGMLQuantizationType[qtype]
    q8 = _requantize_experts(FIX / f"{name}.gguf", tmp_path / "q.gguf", qt)
    f32 = _dequantize_experts(q8, tmp_path / "f32.gguf")
    mq, c = _load(q8)
    mf, _ = _load(f32)
    assert GGUFFile(q8).tensors["blk.0.ffn_up_exps.weight"].qtype == qt
    new = lambda: KVCache(c.n_layer, 32, c.n_head_kv, c.head_dim)  # noqa: E731
    want = to_host(mf.forward(tokens, 0, new(), all_logits=True))
    got = to_host(mq.forward(tokens, 0, new(), all_logits=True))
    # int8 activations cost ~5e-3 per product (kernels/qmatvec's reference semantics), compounded over layers
    _close(got, want, tol=5e-2)
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9
    cache = new()
    mq.forward(tokens[:5], 0, cache)
    for j in range(5, 12):
        _close(mq.forward(tokens[j:j + 1], j, cache), want[j:j + 1], tol=5e-2)


def test_decode_reads_only_the_selected_experts():
    """Per token, k experts per layer run; experts no token picked can hold NaN and change nothing."""
    tokens, ref = _ref("qwen3moe")
    m, c = _load(FIX / "qwen3moe.gguf")
    new = lambda: KVCache(c.n_layer, 32, c.n_head_kv, c.head_dim)  # noqa: E731
    cache = new()
    m.forward(tokens[:4], 0, cache)
    m.moe_stats = {}
    m.forward(tokens[4:5], 4, cache)
    assert expert_hits(m.moe_stats, c.n_layer, c.n_expert).sum(axis=1).tolist() == [c.n_expert_used] * c.n_layer
    per_expert = m.layers[0].moe.expert_nbytes(0)
    assert m.moe_stats["expert_bytes"] == c.n_layer * c.n_expert_used * per_expert
    wb = m.weight_bytes()
    assert wb["per_token"] < wb["total"]

    m.moe_stats = {}                                                  # which experts does a short prompt use?
    m.forward(tokens[:3], 0, new(), all_logits=True)
    hits = expert_hits(m.moe_stats, c.n_layer, c.n_expert)
    unused = np.argwhere(hits == 0)
    assert len(unused), "the prompt used every expert: pick a shorter one"
    m2, _ = _load(FIX / "qwen3moe.gguf")
    for i, e in unused:
        ex = m2.layers[i].moe
        ex.gate[e] = np.full_like(ex.gate[e], np.nan)
        ex.down[e] = np.full_like(ex.down[e], np.nan)
    out = m2.forward(tokens[:3], 0, new(), all_logits=True)
    _close(out, ref[:3])
    cache = new()                                                     # the decode path too
    m2.forward(tokens[:2], 0, cache)
    _close(m2.forward(tokens[2:3], 2, cache), ref[2:3])


def test_route():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 8)).astype(np.float32)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want_ids = np.argsort(-p, axis=-1)[:, :3]
    ids, w = route(logits, 3, "softmax", norm=False)
    assert ids.dtype == np.int64 and w.dtype == np.float32
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(w, np.take_along_axis(p, want_ids, -1), rtol=1e-6)
    ids, w = route(logits, 3, "softmax", norm=True)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
    ids, w = route(logits, 3, "softmax_weight")                       # gpt-oss: softmax of the top-k logits
    top = np.take_along_axis(logits, want_ids, -1)
    e = np.exp(top - top.max(-1, keepdims=True))
    np.testing.assert_allclose(w, e / e.sum(-1, keepdims=True), rtol=1e-6)
    ids, w = route(logits, 2, "sigmoid")
    np.testing.assert_allclose(w, 1 / (1 + np.exp(-np.take_along_axis(logits, want_ids[:, :2], -1))), rtol=1e-6)
    with pytest.raises(ValueError, match="unknown expert gating function 'relu'"):
        route(logits, 2, "relu")
    with pytest.raises(ValueError, match="top-9 experts out of 8"):
        route(logits, 9)


def test_swiglu_oai():
    g = np.array([[-9.0, -1.0, 0.5, 8.0]], np.float32)
    u = np.array([[-9.0, 2.0, 0.0, 9.0]], np.float32)
    gc = np.minimum(g, 7.0)
    want = (np.clip(u, -7, 7) + 1) * gc / (1 + np.exp(-1.702 * gc))
    np.testing.assert_allclose(swiglu_oai(g, u), want, rtol=1e-6)


# ---------------------------------------------------------------- bad input: one line naming the problem

def _one_line(exc_info, *words):
    msg = str(exc_info.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_missing_expert_tensor(tmp_path):
    bad = rewrite_gguf(FIX / "qwen3moe.gguf", tmp_path / "bad.gguf",
                       tensors=lambda n, q, d: None if n == "blk.1.ffn_up_exps.weight" else (d, q))
    f = GGUFFile(bad)
    with pytest.raises(GGUFError) as e:
        Transformer(f, config_from_gguf(f))
    _one_line(e, "missing expert tensor", "blk.1.ffn_up_exps.weight")


def test_unknown_gating_function(tmp_path):
    bad = rewrite_gguf(FIX / "qwen3moe.gguf", tmp_path / "bad.gguf", metadata={"qwen3moe.expert_gating_func": 7})
    with pytest.raises(GGUFError) as e:
        config_from_gguf(GGUFFile(bad))
    _one_line(e, "unknown expert gating function", "= 7")


def test_expert_used_count_above_expert_count(tmp_path):
    bad = rewrite_gguf(FIX / "qwen3moe.gguf", tmp_path / "bad.gguf", metadata={"qwen3moe.expert_used_count": 9})
    with pytest.raises(GGUFError) as e:
        config_from_gguf(GGUFFile(bad))
    _one_line(e, "expert_used_count = 9", "expert_count = 8")


def test_unknown_architecture(tmp_path):
    bad = rewrite_gguf(FIX / "llama31.gguf", tmp_path / "bad.gguf", arch="mamba9")
    with pytest.raises(GGUFError) as e:
        config_from_gguf(GGUFFile(bad))
    _one_line(e, "unknown architecture 'mamba9'", "gpt-oss", "qwen3moe")


@pytest.mark.parametrize("name", ["gpt-oss", "qwen3moe"])
def test_engine_generates_greedy_token_of_transformers(name):
    """LLM.load on a converted file (its tokenizer and all): the greedy next token is transformers' argmax."""
    from spark_lab.llm import LLM
    tokens, ref = _ref(name)
    llm = LLM.load(str(FIX / f"{name}.gguf"), n_ctx=64)
    assert llm.config.arch == name and llm.tokenizer.decode(llm.tokenizer.encode("in the")) == "in the"
    j = int(np.argmax(np.sort(ref, -1)[:, -1] - np.sort(ref, -1)[:, -2]))   # the clearest next token
    g = llm.generate([int(t) for t in tokens[:j + 1]], max_new_tokens=1, temperature=0)
    assert g.token_ids[0] == int(ref[j].argmax())


def test_bench_counts_active_expert_bytes():
    """bench llm's bytes per token: top-k of E experts per MoE layer, everything once for dense."""
    from spark_lab.benchmarks.llm import weight_bytes
    path = FIX / "qwen3moe.gguf"
    t = GGUFFile(path).tensors
    experts = sum(v.nbytes for k, v in t.items() if "_exps." in k)
    total = sum(v.nbytes for v in t.values())
    assert weight_bytes(path, total=True) == total
    assert weight_bytes(path) == total - t["token_embd.weight"].nbytes - experts + experts * 2 // 8
    dense = GGUFFile(FIX / "llama31.gguf").tensors
    assert weight_bytes(FIX / "llama31.gguf") == sum(v.nbytes for k, v in dense.items() if k != "token_embd.weight")


def test_prefill_runs_each_picked_expert_once_per_layer():
    """Prefill groups tokens by expert: one product per picked expert per layer, whatever T is."""
    tokens, ref = _ref("qwen3moe")
    m, c = _load(FIX / "qwen3moe.gguf")
    m.moe_stats = {}
    _close(m.forward(tokens, 0, KVCache(c.n_layer, 32, c.n_head_kv, c.head_dim), all_logits=True), ref)
    hits = expert_hits(m.moe_stats, c.n_layer, c.n_expert)
    assert hits.sum() == len(tokens) * c.n_layer * c.n_expert_used
    assert m.moe_stats["expert_bytes"] == (hits > 0).sum() * m.layers[0].moe.expert_nbytes(0)


def test_expert_weights_norm_from_the_file(tmp_path):
    """qwen3moe renormalises its top-k unless the file says expert_weights_norm = false."""
    tokens, ref = _ref("qwen3moe")
    plain = rewrite_gguf(FIX / "qwen3moe.gguf", tmp_path / "plain.gguf", metadata={"qwen3moe.expert_weights_norm": False})
    m, c = _load(plain)
    assert not c.expert_weights_norm
    out = to_host(m.forward(tokens, 0, KVCache(c.n_layer, 32, c.n_head_kv, c.head_dim), all_logits=True))
    assert np.abs(out - ref).max() > 1e-2 * np.abs(ref).max()       # transformers' norm_topk_prob=True no longer


@pytest.mark.parametrize("truncate", [True, False])
def test_yarn_frequencies_match_transformers(truncate):
    """gpt-oss-120b's YaRN (theta 150000, factor 32, 4096 original context) against transformers'
    own inv_freq and attention factor, with and without the rounded correction range."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from spark_lab.kernels.rope import YaRN, rope_freqs
    cfg = transformers.Qwen3Config(head_dim=64, hidden_size=64, num_attention_heads=1, rope_theta=150000.0,
                                   max_position_embeddings=131072,
                                   rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                                 "original_max_position_embeddings": 4096, "truncate": truncate})
    inv, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    mine, mscale = rope_freqs(64, 150000.0, 1 / 32, yarn=YaRN(orig_ctx=4096, truncate=truncate))
    np.testing.assert_allclose(mine, inv.double().numpy(), rtol=1e-6)
    assert mscale == pytest.approx(attention_factor, rel=1e-7)
    plain, _ = rope_freqs(64, 150000.0)
    assert mine[0] == plain[0] and mine[-1] == pytest.approx(plain[-1] / 32)   # fast pairs kept, slow ones / factor


def _llamacpp():
    path = FIX / "llamacpp_greedy.json"
    if not path.exists():
        pytest.skip("no llama.cpp record (tools/make_spark_fixtures.py --llamacpp-greedy)")
    import json
    return json.loads(path.read_text())["models"]


@pytest.mark.parametrize("name", MODELS)
def test_greedy_tokens_match_llamacpp(name):
    """llama.cpp's own greedy run on the same GGUF (recorded with llama-cpp-python): fed its tokens,
    our argmax is its token at every step whose top-2 margin is >= 0.3; free-running, our tokens
    equal its tokens up to the first step below that margin."""
    rec = _llamacpp()[name]
    prompt, toks, steps = rec["prompt_token_ids"], rec["token_ids"], rec["steps"]
    f = GGUFFile(FIX / f"{name}.gguf")
    c = config_from_gguf(f)
    if c.rope_yarn is not None and not c.rope_yarn.truncate:
        # llama.cpp rounds YaRN's correction range to whole dims for every model; gpt-oss (and
        # transformers, which the tests above hold us to) do not. Held to llama.cpp, use its rounding.
        c.rope_yarn = dataclasses.replace(c.rope_yarn, truncate=True)
    m = Transformer(f, c)
    ids = np.array(prompt + toks[:-1], np.int64)
    out = to_host(m.forward(ids, 0, KVCache(c.n_layer, 64, c.n_head_kv, c.head_dim), all_logits=True))
    ours = out[len(prompt) - 1:].argmax(-1)
    clear = [j for j, s in enumerate(steps) if s["gap"] >= 0.3]
    assert len(clear) >= len(steps) // 2
    assert [int(ours[j]) for j in clear] == [toks[j] for j in clear]
    cache = KVCache(c.n_layer, 64, c.n_head_kv, c.head_dim)
    logits = to_host(m.forward(np.array(prompt, np.int64), 0, cache))
    last = np.array(rec["last_prompt_logits"], np.float32)
    assert np.abs(logits[0] - last).max() < 2e-3 * np.abs(last).max()     # llama.cpp rounds activations to f16
    for j, s in enumerate(steps):
        if s["gap"] < 0.3:
            assert int(logits[0].argmax()) in (s["id"], s["second_id"])
            break
        assert int(logits[0].argmax()) == s["id"]
        logits = m.forward(np.array([s["id"]], np.int64), len(prompt) + j, cache)
