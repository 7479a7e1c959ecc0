"""Tiny random Llama-3 / Qwen3 / Gemma 3 models: transformers (torch) -> GGUF -> spark_lab logits.

Each test builds a model with random weights in transformers, writes the same weights as a GGUF
with `gguf.GGUFWriter` (as llama.cpp's converter lays them out), and checks that spark_lab's
forward pass gives the same logits to 1e-4, for a whole prompt and for cached decoding.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from spark_lab.device import to_host
from spark_lab.gguf import GGUFFile, config_from_gguf  # noqa: E402
from spark_lab.llm.cache import KVCache  # noqa: E402
from spark_lab.llm.model import Transformer  # noqa: E402

TOKENS = [1, 5, 9, 42, 7, 3, 77, 100, 12, 64, 2, 90]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's half-split q/k rows -> llama.cpp's adjacent-pair layout (what convert_hf_to_gguf does)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_theta(cfg) -> float:
    """The (global) RoPE base across transformers releases (v5 keeps it in rope_parameters)."""
    rp = getattr(cfg, "rope_parameters", None) or {}
    rp = rp.get("full_attention", rp)
    return float(rp.get("rope_theta") or getattr(cfg, "rope_theta"))


def _write_gguf(path, arch, cfg, sd, *, head_dim, permute_qk, norm_plus_one=False, extra=None):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    for k, v in (extra or {}).items():
        getattr(w, k)(v)
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads

    def t(name):
        return sd[name].detach().float().numpy().astype(np.float32)

    def norm(name):
        return t(name) + 1.0 if norm_plus_one else t(name)

    w.add_tensor("token_embd.weight", t("model.embed_tokens.weight"))
    w.add_tensor("output_norm.weight", norm("model.norm.weight"))
    if "lm_head.weight" in sd and not cfg.tie_word_embeddings:
        w.add_tensor("output.weight", t("lm_head.weight"))
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        q, k = t(p + "self_attn.q_proj.weight"), t(p + "self_attn.k_proj.weight")
        if permute_qk:
            q, k = _permute(q, nh), _permute(k, nkv)
        w.add_tensor(b + "attn_q.weight", q)
        w.add_tensor(b + "attn_k.weight", k)
        w.add_tensor(b + "attn_v.weight", t(p + "self_attn.v_proj.weight"))
        w.add_tensor(b + "attn_output.weight", t(p + "self_attn.o_proj.weight"))
        w.add_tensor(b + "attn_norm.weight", norm(p + "input_layernorm.weight"))
        w.add_tensor(b + "ffn_gate.weight", t(p + "mlp.gate_proj.weight"))
        w.add_tensor(b + "ffn_up.weight", t(p + "mlp.up_proj.weight"))
        w.add_tensor(b + "ffn_down.weight", t(p + "mlp.down_proj.weight"))
        if p + "self_attn.q_norm.weight" in sd:
            w.add_tensor(b + "attn_q_norm.weight", norm(p + "self_attn.q_norm.weight"))
            w.add_tensor(b + "attn_k_norm.weight", norm(p + "self_attn.k_norm.weight"))
        if arch == "gemma3":
            w.add_tensor(b + "ffn_norm.weight", norm(p + "pre_feedforward_layernorm.weight"))
            w.add_tensor(b + "post_attention_norm.weight", norm(p + "post_attention_layernorm.weight"))
            w.add_tensor(b + "post_ffw_norm.weight", norm(p + "post_feedforward_layernorm.weight"))
        else:
            w.add_tensor(b + "ffn_norm.weight", norm(p + "post_attention_layernorm.weight"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _check(path, hf_model, n_ctx=64):
    with torch.no_grad():
        ref = hf_model(torch.tensor([TOKENS])).logits[0].float().numpy()
    f = GGUFFile(path)
    cfg = config_from_gguf(f)
    model = Transformer(f, cfg)
    cache = KVCache(cfg.n_layer, n_ctx, cfg.n_head_kv, cfg.head_dim)
    ids = np.array(TOKENS, dtype=np.int64)
    out = to_host(model.forward(ids, 0, cache, all_logits=True))       # explicit on a GPU / the strict device
    assert out.dtype == np.float32 and out.shape == ref.shape
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)
    # the cache path: a prompt of 7, then one token at a time
    cache2 = KVCache(cfg.n_layer, n_ctx, cfg.n_head_kv, cfg.head_dim)
    model.forward(ids[:7], 0, cache2)
    for j in range(7, len(TOKENS)):
        step = to_host(model.forward(ids[j:j + 1], j, cache2))
        np.testing.assert_allclose(step[0], ref[j], atol=1e-4, rtol=1e-4)
    return cfg


def test_llama3_style_matches_transformers(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False)
    m = transformers.LlamaForCausalLM(cfg).eval()
    _write_gguf(tmp_path / "llama.gguf", "llama", cfg, m.state_dict(), head_dim=16, permute_qk=True)
    c = _check(tmp_path / "llama.gguf", m)
    assert c.arch == "llama" and not c.rope_neox and not c.tied_embeddings


def test_qwen3_matches_transformers(tmp_path):
    torch.manual_seed(1)
    cfg = transformers.Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                   max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
                                   tie_word_embeddings=True)
    m = transformers.Qwen3ForCausalLM(cfg).eval()
    _write_gguf(tmp_path / "qwen3.gguf", "qwen3", cfg, m.state_dict(), head_dim=32, permute_qk=False)
    c = _check(tmp_path / "qwen3.gguf", m)
    assert c.qk_norm and c.rope_neox and c.tied_embeddings and c.head_dim == 32


def test_gemma3_matches_transformers(tmp_path):
    torch.manual_seed(2)
    try:
        cfg = transformers.Gemma3TextConfig(
            vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=1, head_dim=32, max_position_embeddings=128, rms_norm_eps=1e-6,
            rope_theta=1000000.0, rope_local_base_freq=10000.0, query_pre_attn_scalar=32, sliding_window=4,
            final_logit_softcapping=None, attn_logit_softcapping=None, tie_word_embeddings=True,
            attn_implementation="eager")
        m = transformers.Gemma3ForCausalLM(cfg).eval()
    except Exception as e:  # pragma: no cover - depends on the transformers release
        pytest.skip(f"this transformers cannot build a tiny Gemma 3: {e}")
    for name, p in m.named_parameters():  # gemma norms start at zero (scale 1 + w): make them matter
        if "norm" in name:
            torch.nn.init.normal_(p, std=0.3)
    _write_gguf(tmp_path / "gemma3.gguf", "gemma3", cfg, m.state_dict(), head_dim=32, permute_qk=False,
                norm_plus_one=True, extra={"add_sliding_window": 4})
    c = _check(tmp_path / "gemma3.gguf", m)
    assert c.post_norms and c.is_sliding(0) and not c.is_sliding(5)
