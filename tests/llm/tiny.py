"""Tiny random GGUF models for engine and CLI tests (written with gguf.GGUFWriter)."""
from __future__ import annotations

import numpy as np
import gguf


def byte_vocab() -> list[str]:
    """GPT-2's byte -> printable-character alphabet: a complete byte-level BPE vocabulary."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return [chars[b] for b in range(256)]


def write_tiny_gguf(path, arch: str = "llama", n_layer: int = 2, d: int = 32, n_head: int = 4, n_kv: int = 2,
                    ff: int = 64, qtype=gguf.GGMLQuantizationType.F32, seed: int = 0, n_ctx_train: int = 256,
                    quant_embd: bool = False):
    """A random llama-shaped model with a byte-level vocabulary (+ <s>, </s>, <|im_start|>, <|im_end|>);
    quant_embd: token_embd in `qtype` too (as SmolLM2's GGUFs have it), else float32."""
    rng = np.random.default_rng(seed)
    tokens = byte_vocab() + ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "xy"]
    types = [1] * 256 + [3, 3, 3, 3, 1]
    V, hd = len(tokens), d // n_head
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(n_layer)
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["x y"])
    w.add_bos_token_id(256)
    w.add_eos_token_id(257)
    w.add_add_bos_token(False)

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    def mat(name, rows, cols):
        a = rand(rows, cols)
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, a)
        else:
            q = gguf.quants.quantize(a, qtype)
            w.add_tensor(name, q, raw_dtype=qtype)

    if quant_embd:
        mat("token_embd.weight", V, d)
    else:
        w.add_tensor("token_embd.weight", rand(V, d))
    w.add_tensor("output_norm.weight", 1.0 + rand(d))
    for i in range(n_layer):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", 1.0 + rand(d))
        mat(b + "attn_q.weight", n_head * hd, d)
        mat(b + "attn_k.weight", n_kv * hd, d)
        mat(b + "attn_v.weight", n_kv * hd, d)
        mat(b + "attn_output.weight", d, n_head * hd)
        w.add_tensor(b + "ffn_norm.weight", 1.0 + rand(d))
        mat(b + "ffn_gate.weight", ff, d)
        mat(b + "ffn_up.weight", ff, d)
        mat(b + "ffn_down.weight", d, ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
