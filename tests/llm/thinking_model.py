"""Tiny Qwen3 GGUFs that speak a reasoning format, with the real chat templates (tests/data/templates).

Random weights think nothing, so `write_thinking_gguf` gives the model a fixed walk to follow: the
residual stream stays close to the token's embedding (the attention and FFN weights are small), and
the output matrix maps each token of `CHAINS[fmt]` to the next one's logit. The engine runs it as any
Qwen3 (q/k norms, GQA, RoPE, SwiGLU) and greedy decoding walks the chain:

    think:   prompt "...assistant\\n" -> <think>Hm</think>\\n\\nOK<|im_end|>
             with enable_thinking=False the template ends the prompt in "</think>\\n\\n" -> OK<|im_end|>
    harmony: prompt "...<|start|>assistant" -> <|channel|>final<|message|>OK<|return|>
             (a walk cannot visit a token twice, so the analysis channel, which needs a second
             <|channel|>, is tested on token streams instead)
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from .tiny import byte_vocab

TEMPLATES = Path(__file__).resolve().parents[1] / "data" / "templates"
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4
SPECIALS = {   # text -> token type, as convert_hf_to_gguf writes them (special=false added tokens: USER_DEFINED)
    "think": {"<|endoftext|>": CONTROL, "<|im_start|>": CONTROL, "<|im_end|>": CONTROL,
              "<think>": USER_DEFINED, "</think>": USER_DEFINED},
    "harmony": {"<|startoftext|>": CONTROL, "<|endoftext|>": CONTROL, "<|start|>": CONTROL, "<|end|>": CONTROL,
                "<|message|>": CONTROL, "<|channel|>": CONTROL, "<|return|>": CONTROL, "<|call|>": CONTROL,
                "<|constrain|>": CONTROL, "assistant": USER_DEFINED, "final": USER_DEFINED,
                "analysis": USER_DEFINED},
}
NL, NLNL = "Ċ", "ĊĊ"             # byte-level pieces of "\n" and "\n\n" (one merge)
CHAINS = {"think": [NL, "<think>", "H", "m", "</think>", NLNL, "O", "K", "<|im_end|>"],
          "harmony": ["assistant", "<|channel|>", "final", "<|message|>", "O", "K", "<|return|>"]}
CHAIN = CHAINS["think"]


def vocab(fmt: str) -> tuple[list[str], list[int]]:
    tokens = byte_vocab() + [NLNL] + list(SPECIALS[fmt])
    types = [NORMAL] * 257 + list(SPECIALS[fmt].values())
    return tokens, types


def write_thinking_gguf(path, fmt: str = "think", d: int = 64, n_head: int = 4, n_kv: int = 2, ff: int = 64,
                        n_layer: int = 2, seed: int = 0):
    """A Qwen3 GGUF with the vocabulary and real chat template of `fmt` ('think': Qwen3, 'harmony': gpt-oss)."""
    rng = np.random.default_rng(seed)
    tokens, types = vocab(fmt)
    ids = {t: i for i, t in enumerate(tokens)}
    V, hd = len(tokens), d // n_head
    template = (TEMPLATES / ("qwen3.jinja" if fmt == "think" else "gpt-oss.jinja")).read_text()
    w = gguf.GGUFWriter(str(path), "qwen3")
    w.add_block_count(n_layer)
    w.add_context_length(512)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([f"{NL} {NL}"])
    eos = "<|im_end|>" if fmt == "think" else "<|return|>"
    w.add_bos_token_id(ids["<|endoftext|>"])
    w.add_eos_token_id(ids[eos])
    w.add_add_bos_token(False)
    w.add_chat_template(template)

    def small(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    emb = rng.standard_normal((V, d)).astype(np.float32)                  # [V, d], rms ~1
    unit = emb / np.sqrt((emb ** 2).mean(axis=1, keepdims=True))          # what the final RMSNorm makes of it
    out = small(V, d)                                                     # [V, d]
    chain = CHAINS[fmt]
    for a, b in zip(chain, chain[1:]):                                    # token a's row points at b
        out[ids[b]] += 0.5 * unit[ids[a]] / np.sqrt(d)
    w.add_tensor("token_embd.weight", emb)
    w.add_tensor("output_norm.weight", np.ones(d, np.float32))
    w.add_tensor("output.weight", out)
    for i in range(n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(d, np.float32))
        w.add_tensor(p + "attn_q.weight", small(n_head * hd, d))
        w.add_tensor(p + "attn_k.weight", small(n_kv * hd, d))
        w.add_tensor(p + "attn_v.weight", small(n_kv * hd, d))
        w.add_tensor(p + "attn_output.weight", small(d, n_head * hd))
        w.add_tensor(p + "attn_q_norm.weight", np.ones(hd, np.float32))
        w.add_tensor(p + "attn_k_norm.weight", np.ones(hd, np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(d, np.float32))
        w.add_tensor(p + "ffn_gate.weight", small(ff, d))
        w.add_tensor(p + "ffn_up.weight", small(ff, d))
        w.add_tensor(p + "ffn_down.weight", small(d, ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
