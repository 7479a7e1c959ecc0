"""Architectures as data: one small spec per GGUF `general.architecture`.

`Transformer` (llm/model.py) is one decoder; what differs between model families is read from
here, never branched on by name. A spec holds what is fixed for the family; what varies from
file to file (sizes, RoPE base and scaling, expert counts, gating when the file says it) comes
from the GGUF metadata in `gguf.config_from_gguf`.

    norm placement   pre-norms always; gemma3 adds norms after attention and after the FFN
    biases           q/k/v biases when the file has them (qwen2, gpt-oss), the output projection's (gpt-oss)
    q/k norms        RMSNorm per head on q and k (qwen3, qwen3moe, gemma3)
    rope             pairing (adjacent for llama GGUFs, half-split otherwise); scaling from the file
    attention extras sinks (gpt-oss: one learned logit per head in the softmax denominator),
                     sliding-window layers (every swa_pattern-th layer global, the rest slide)
    ffn              dense, or MoE (router -> top-k experts, llm/moe.py) with its gating and activation
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchSpec:
    name: str                        # GGUF general.architecture
    rope_neox: bool = False          # half-split rotary pairs (transformers' rotate_half)
    qk_norm: bool = False            # RMSNorm on q and k per head
    post_norms: bool = False         # gemma3: norms on the attention and FFN outputs before the residual
    ffn_norm: str = "ffn_norm"       # tensor name of the pre-FFN norm (gpt-oss calls it post_attention_norm)
    embed_scale_sqrt: bool = False   # gemma: embeddings * sqrt(n_embd)
    act: str = "silu"                # silu (SwiGLU) | gelu_tanh (GeGLU) | swiglu_oai (gpt-oss clamped SwiGLU)
    out_bias: bool = False           # attn_output has a bias
    sinks: bool = False              # attention sinks blk.N.attn_sinks.weight [n_head]
    sliding: bool = False            # has sliding-window layers (window size from the file)
    swa_pattern: int = 0             # every swa_pattern-th layer is global, the others slide
    rope_theta_local: float = 0.0    # sliding layers' own RoPE base (gemma3), 0 = the global one
    yarn_truncate: bool = True       # YaRN's correction range rounded to whole dims (gpt-oss: False)
    ffn: str = "dense"               # dense | moe
    gating: str = "softmax"          # moe routing when the file does not say, see moe.GATINGS
    expert_weights_norm: bool = False  # moe: renormalise the top-k weights when the file does not say
    router_bias: bool = False        # moe: ffn_gate_inp has a bias
    expert_bias: bool = False        # moe: each expert's gate/up/down have biases
    swiglu_alpha: float = 1.702      # swiglu_oai: out = (clamp(up) + 1) * g * sigmoid(alpha * g), g = min(gate, limit)
    swiglu_limit: float = 7.0


ARCHS: dict[str, ArchSpec] = {s.name: s for s in (
    ArchSpec("llama"),
    ArchSpec("qwen2", rope_neox=True),
    ArchSpec("qwen3", rope_neox=True, qk_norm=True),
    ArchSpec("gemma3", rope_neox=True, qk_norm=True, post_norms=True, embed_scale_sqrt=True, act="gelu_tanh",
             sliding=True, swa_pattern=6, rope_theta_local=10000.0),
    # llama.cpp's qwen3moe always renormalises the top-k (norm_topk_prob is true in every release)
    ArchSpec("qwen3moe", rope_neox=True, qk_norm=True, ffn="moe", gating="softmax", expert_weights_norm=True),
    # transformers' GptOss: YaRN with truncate=False (llama.cpp rounds the range; the difference is
    # in the last bits of a few mid-frequency pairs)
    ArchSpec("gpt-oss", rope_neox=True, ffn_norm="post_attention_norm", act="swiglu_oai", out_bias=True,
             sinks=True, sliding=True, swa_pattern=2, yarn_truncate=False, ffn="moe", gating="softmax_weight",
             router_bias=True, expert_bias=True),
)}


def arch_spec(arch: str, where: str = "") -> ArchSpec:
    """The spec of a GGUF architecture; ValueError (one line) for one spark_lab does not run."""
    spec = ARCHS.get(arch)
    if spec is None:
        raise ValueError(f"{where + ': ' if where else ''}unknown architecture {arch!r} "
                         f"(supported: {', '.join(ARCHS)})")
    return spec
