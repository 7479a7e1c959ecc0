"""Synthetic GGUFs with the shapes and quant mixes of real models, for speed and memory at real size.

Speed and memory do not depend on weight values, so a benchmark can run an 8B model without
downloading one: each tensor is random GGML blocks whose scale fields are set to small finite
values (a forward pass stays finite: no NaN/inf slows a kernel down or stops a sampler). The
vocabulary is a byte-level one padded with control tokens to the real size, so the embedding
and output matrices have their real shapes. Files are written a tensor at a time (never the
whole model in memory) into `models.cache_dir()/synthetic/` and reused.

    path = synthetic_path("llama3-8b-q4_k_m")      # made on first use (~4.6 GB, ~1 min)
    python -m spark_lab.benchmarks.synthetic llama3-8b-q4_k_m
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

@dataclass
class Shape:
    arch: str                 # GGUF general.architecture
    n_layer: int
    d: int                    # embedding length
    n_head: int
    n_kv: int
    ff: int                   # dense FFN width (or expert FFN width for MoE)
    vocab: int
    rope_theta: float = 10000.0
    n_ctx_train: int = 8192
    head_dim: int | None = None
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_output: bool = False
    quant: str = "Q4_K"       # most matrices
    more_bits: str = "Q6_K"   # attn_v / ffn_down in llama.cpp's "use more bits" layers, and output
    embd: str = "Q4_K"
    source: str = ""          # where the real numbers come from
    n_expert: int = 0         # MoE (gpt-oss layout): experts per layer, 0 = dense FFN
    n_expert_used: int = 0
    experts: str = "MXFP4"    # the *_exps tensors' type
    sliding_window: int = 0   # gpt-oss: every other layer slides over this many tokens
    extra: dict = field(default_factory=dict)

    @property
    def hd(self) -> int:
        return self.head_dim or self.d // self.n_head


# real configs (the models' config.json / GGUF metadata); quant mixes as llama.cpp's Q4_K_M writes them
SHAPES: dict[str, Shape] = {
    "smollm2-135m-q4_1": Shape("llama", 30, 576, 9, 3, 1536, 49152, rope_theta=100000.0, tie_output=True,
                               quant="Q4_1", more_bits="Q4_1", embd="Q4_1",
                               source="HuggingFaceTB/SmolLM2-135M-Instruct config.json"),
    "llama3-8b-q4_k_m": Shape("llama", 32, 4096, 32, 8, 14336, 128256, rope_theta=500000.0,
                              source="meta-llama/Meta-Llama-3-8B config.json"),
    "qwen2.5-7b-q4_k_m": Shape("qwen2", 28, 3584, 28, 4, 18944, 152064, rope_theta=1000000.0, qkv_bias=True,
                               source="Qwen/Qwen2.5-7B-Instruct config.json"),
    # ggml-org/gpt-oss-20b-GGUF (mxfp4): experts MXFP4, attention/embeddings/output Q8_0, router,
    # biases, sinks and norms F32; attention sinks, q/k/v/o biases, sliding window 128 every other layer
    "gpt-oss-20b-mxfp4": Shape("gpt-oss", 24, 2880, 64, 8, 2880, 201088, rope_theta=150000.0, n_ctx_train=131072,
                               head_dim=64, qkv_bias=True, quant="Q8_0", more_bits="Q8_0", embd="Q8_0",
                               n_expert=32, n_expert_used=4, sliding_window=128,
                               extra=dict(add_rope_scaling_type="yarn",
                                          add_rope_scaling_factor=32.0, add_rope_scaling_orig_ctx_len=4096),
                               source="openai/gpt-oss-20b config.json"),
}


def _use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's Q4_K_M rule for attn_v / ffn_down: the first and last eighth, and every third layer between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def random_blocks(qname: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [rows, row_bytes] of random GGML blocks with small finite scales (or f32/f16 values)."""
    import gguf
    qt = gguf.GGMLQuantizationType[qname]
    if qname in ("F32", "F16"):
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float32 if qname == "F32" else np.float16)
    bs, ts = gguf.GGML_QUANT_SIZES[qt]
    nb = cols // bs
    b = rng.integers(0, 256, size=(rows * nb, ts), dtype=np.uint8)
    def f16(col, lo, hi):
        v = rng.uniform(lo, hi, size=rows * nb).astype(np.float16)
        b[:, col:col + 2] = v.view(np.uint8).reshape(-1, 2)
    if qname in ("Q4_0", "Q8_0"):
        f16(0, 1e-3, 4e-3)
    elif qname == "Q4_1":
        f16(0, 1e-3, 4e-3); f16(2, -1e-2, -5e-3)
    elif qname == "Q4_K":
        f16(0, 1e-4, 4e-4); f16(2, 1e-4, 4e-4)
    elif qname == "Q6_K":
        f16(ts - 2, 1e-4, 4e-4)
        b[:, 192:208] = rng.integers(1, 32, size=(rows * nb, 16), dtype=np.int8).view(np.uint8)
    elif qname == "MXFP4":
        b[:, 0] = rng.integers(118, 122, size=rows * nb, dtype=np.uint8)   # E8M0 scales 2^-9..2^-6
    else:
        raise ValueError(f"synthetic: no block recipe for {qname}")
    return b.reshape(rows, nb * ts)


def _tensors(s: Shape):
    """(name, rows, cols, qname) for every tensor, in file order (torch order: [out, in])."""
    hd, L = s.hd, s.n_layer
    if s.n_expert:
        return _moe_tensors(s)
    out = [("token_embd.weight", s.vocab, s.d, s.embd)]
    for i in range(L):
        b, more = f"blk.{i}.", _use_more_bits(i, L)
        out += [(b + "attn_norm.weight", 1, s.d, "F32"),
                (b + "attn_q.weight", s.n_head * hd, s.d, s.quant),
                (b + "attn_k.weight", s.n_kv * hd, s.d, s.quant),
                (b + "attn_v.weight", s.n_kv * hd, s.d, s.more_bits if more else s.quant),
                (b + "attn_output.weight", s.d, s.n_head * hd, s.quant)]
        if s.qkv_bias:
            out += [(b + "attn_q.bias", 1, s.n_head * hd, "F32"), (b + "attn_k.bias", 1, s.n_kv * hd, "F32"),
                    (b + "attn_v.bias", 1, s.n_kv * hd, "F32")]
        if s.qk_norm:
            out += [(b + "attn_q_norm.weight", 1, hd, "F32"), (b + "attn_k_norm.weight", 1, hd, "F32")]
        out += [(b + "ffn_norm.weight", 1, s.d, "F32"),
                (b + "ffn_gate.weight", s.ff, s.d, s.quant),
                (b + "ffn_up.weight", s.ff, s.d, s.quant),
                (b + "ffn_down.weight", s.d, s.ff, s.more_bits if more else s.quant)]
    out.append(("output_norm.weight", 1, s.d, "F32"))
    if not s.tie_output:
        out.append(("output.weight", s.vocab, s.d, s.more_bits))
    return out


def _moe_tensors(s: Shape):
    """gpt-oss's tensors as llama.cpp's converter names them ([E, rows, cols] experts as rows = E*rows)."""
    hd, E, ff = s.hd, s.n_expert, s.ff
    out = [("token_embd.weight", s.vocab, s.d, s.embd)]
    for i in range(s.n_layer):
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", 1, s.d, "F32"),
                (b + "attn_q.weight", s.n_head * hd, s.d, s.quant), (b + "attn_q.bias", 1, s.n_head * hd, "F32"),
                (b + "attn_k.weight", s.n_kv * hd, s.d, s.quant), (b + "attn_k.bias", 1, s.n_kv * hd, "F32"),
                (b + "attn_v.weight", s.n_kv * hd, s.d, s.quant), (b + "attn_v.bias", 1, s.n_kv * hd, "F32"),
                (b + "attn_output.weight", s.d, s.n_head * hd, s.quant), (b + "attn_output.bias", 1, s.d, "F32"),
                (b + "attn_sinks.weight", 1, s.n_head, "F32"),
                (b + "post_attention_norm.weight", 1, s.d, "F32"),
                (b + "ffn_gate_inp.weight", E, s.d, "F32"), (b + "ffn_gate_inp.bias", 1, E, "F32"),
                (b + "ffn_gate_exps.weight", (E, ff), s.d, s.experts), (b + "ffn_gate_exps.bias", E, ff, "F32"),
                (b + "ffn_up_exps.weight", (E, ff), s.d, s.experts), (b + "ffn_up_exps.bias", E, ff, "F32"),
                (b + "ffn_down_exps.weight", (E, s.d), ff, s.experts), (b + "ffn_down_exps.bias", E, s.d, "F32")]
    out += [("output_norm.weight", 1, s.d, "F32"), ("output.weight", s.vocab, s.d, s.embd)]
    return out


def _rows(rows) -> int:
    return rows[0] * rows[1] if isinstance(rows, tuple) else rows


def _nbytes(rows, cols: int, q: str) -> int:
    """Bytes of one tensor's data: rows (or (experts, rows)) x cols values of type q."""
    import gguf
    if q in ("F32", "F16"):
        return _rows(rows) * cols * (4 if q == "F32" else 2)
    bs, ts = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[q]]
    return _rows(rows) * cols // bs * ts


def write_synthetic(name: str, path: Path, seed: int = 0, shape: Shape | None = None) -> Path:
    """Write the synthetic GGUF `name` (a key of SHAPES, or any name with `shape` given) to `path`,
    one tensor at a time."""
    import gguf
    from ..tokenizer import _bytes_to_unicode
    if shape is None and name not in SHAPES:
        raise ValueError(f"unknown synthetic model {name!r}; choose from {', '.join(SHAPES)}")
    s = shape or SHAPES[name]
    rng = np.random.default_rng(seed)
    path = Path(path)
    tmp = path.with_suffix(".part")
    w = gguf.GGUFWriter(str(tmp), s.arch)
    w.add_name(f"synthetic {name}")
    w.add_block_count(s.n_layer)
    w.add_context_length(s.n_ctx_train)
    w.add_embedding_length(s.d)
    w.add_feed_forward_length(s.ff)
    w.add_head_count(s.n_head)
    w.add_head_count_kv(s.n_kv)
    if s.head_dim:
        w.add_key_length(s.head_dim)
        w.add_value_length(s.head_dim)
    w.add_rope_freq_base(s.rope_theta)
    w.add_layer_norm_rms_eps(1e-5)
    if s.n_expert:
        w.add_expert_count(s.n_expert)
        w.add_expert_used_count(s.n_expert_used)
        w.add_expert_feed_forward_length(s.ff)
        w.add_sliding_window(s.sliding_window)
    for k, v in s.extra.items():
        getattr(w, k)(gguf.RopeScalingType(v) if k == "add_rope_scaling_type" else v)
    # a byte-level vocabulary (every text encodes), padded with control tokens to the real size
    b2u = _bytes_to_unicode()
    tokens = [b2u[b] for b in range(256)] + ["<s>", "</s>", "xy"]
    tokens += [f"<|synthetic_{i}|>" for i in range(s.vocab - len(tokens))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * 256 + [3, 3, 1] + [3] * (len(tokens) - 259))
    w.add_token_merges(["x y"])
    w.add_bos_token_id(256)
    w.add_eos_token_id(257)
    w.add_add_bos_token(True)
    plan = _tensors(s)
    for tname, rows, cols, q in plan:
        lead = rows if isinstance(rows, tuple) else (rows,)        # experts: (E, rows)
        if q in ("F32", "F16"):
            dims = (cols,) if rows == 1 else (*lead, cols)
            w.add_tensor_info(tname, dims, np.dtype(np.float32 if q == "F32" else np.float16), _nbytes(rows, cols, q))
        else:
            qt = gguf.GGMLQuantizationType[q]
            bs, ts = gguf.GGML_QUANT_SIZES[qt]
            w.add_tensor_info(tname, (*lead, cols * ts // bs), np.dtype(np.uint8), _nbytes(rows, cols, q), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for tname, rows, cols, q in plan:
        n = _rows(rows)
        if tname.endswith("norm.weight"):
            a = (1.0 + 0.1 * rng.standard_normal(cols)).astype(np.float32)
        elif tname.endswith(".bias") or tname.endswith("sinks.weight"):
            a = (0.02 * rng.standard_normal((n, cols))).astype(np.float32)
        else:
            a = random_blocks(q, n, cols, rng)
        if isinstance(rows, tuple):
            a = a.reshape(*rows, -1)
        w.write_tensor_data(a.reshape(-1) if rows == 1 else a)
    w.close()
    tmp.replace(path)
    return path


def synthetic_path(name: str) -> Path:
    """The synthetic GGUF `name`, written on first use under models.cache_dir()/synthetic/."""
    from ..models import cache_dir
    if name not in SHAPES:
        raise ValueError(f"unknown synthetic model {name!r}; choose from {', '.join(SHAPES)}")
    d = cache_dir() / "synthetic"
    d.mkdir(exist_ok=True)
    path = d / f"{name}.gguf"
    if not path.exists():
        print(f"writing synthetic {name} to {path} (random weights, real shapes)...", file=sys.stderr)
        write_synthetic(name, path)
    return path


def n_bytes(name: str, shape: Shape | None = None) -> int:
    """Bytes of tensor data the synthetic file holds (without writing it)."""
    return sum(_nbytes(rows, cols, q) for _, rows, cols, q in _tensors(shape or SHAPES[name]))

if __name__ == "__main__":
    for n in sys.argv[1:] or list(SHAPES):
        print(synthetic_path(n))
