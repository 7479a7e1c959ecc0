"""The "will it fit?" planner: weights + KV cache + activations, before anything is loaded.

Works from a model's shape alone (GGUF metadata or numbers typed in), so it can answer
"can a 200B model at 4 bits run on a DGX Spark?" before anyone downloads anything.

Mixture-of-experts models hold every expert in memory but a token reads only k of them, so what
fits is decided by the total parameters and how fast it decodes by the active ones: decode is
bandwidth-bound, at most bandwidth / (weight bytes one token reads + its KV cache) tokens per
second. Named shapes of the models Spark owners run (gpt-oss, Qwen3 MoE) sit in KNOWN_MODELS,
counted from their published configs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, asdict, replace

from .memory import fmt_bytes
from .quants import BLOCK_SIZES

SPARK_MEMORY = 128 * 10**9          # DGX Spark: 128 GB LPDDR5x shared by CPU and GPU
SPARK_RESERVED = 8 * 10**9          # what the OS, desktop and CUDA context keep for themselves
KV_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}  # per value (GGML blocks)
MAX_CONTEXT = 131072                # search limit for "longest context" when the model's is unknown
UBATCH = 512                        # prompt tokens processed at once (sizes the activations)
SPARK_BANDWIDTH = 273e9             # DGX Spark: 273 GB/s LPDDR5x (NVIDIA's specification)


@dataclass
class ModelShape:
    name: str
    params: float                   # parameter count
    bits_per_weight: float = 4.5    # average stored bits per parameter (Q4_K_M ~ 4.8, Q8_0 = 8.5, F16 = 16)
    layers: int | None = None       # transformer blocks (estimated from params when unknown)
    kv_heads: int | None = None     # key/value heads (grouped-query attention)
    head_dim: int | None = None     # size of one head
    hidden: int | None = None       # embedding width
    vocab: int = 32000              # vocabulary size (logits buffer)
    n_heads: int | None = None      # query heads
    context_max: int | None = None  # the model's trained context length
    weight_bytes: int | None = None # exact bytes of the weights, when read from a file
    n_expert: int = 0               # experts per MoE layer (0: a dense model)
    n_expert_used: int = 0          # experts each token runs (top-k)
    expert_params: float = 0.0      # parameters of all experts' matrices, all layers
    expert_bits: float | None = None  # their stored bits per weight when not bits_per_weight (MXFP4: 4.25)
    embed_params: float = 0.0       # the input embedding table (a decoded token reads one row of it)
    active_weight_bytes: int | None = None  # exact weight bytes one decoded token reads, when from a file
    sliding_window: int | None = None  # sliding-window layers keep only this many tokens of KV
    sliding_layers: int = 0         # how many layers slide (gpt-oss: every other one)

    def __post_init__(self):
        if not self.params > 0 or not self.bits_per_weight > 0:
            raise ValueError(f"{self.name}: params and bits_per_weight must be > 0, "
                             f"got {self.params} and {self.bits_per_weight}")
        if self.n_expert_used > self.n_expert or (self.n_expert and self.n_expert_used < 1):
            raise ValueError(f"{self.name}: expert_used_count ({self.n_expert_used}) must be between 1 and "
                             f"expert_count ({self.n_expert})")
        if not 0 <= self.expert_params <= self.params:
            raise ValueError(f"{self.name}: expert_params ({self.expert_params:g}) must be between 0 and "
                             f"params ({self.params:g})")
        # Unknown shapes are filled like a modern GQA decoder of that size (Llama-3-like ratios).
        if self.layers is None and self.hidden is None:
            # params ~ 12 * layers * hidden^2 with hidden ~ 110 * layers (Llama-like aspect ratio)
            self.layers = max(1, round((self.params / (12 * 110**2)) ** (1 / 3)))
        if self.hidden is None:
            self.hidden = max(128, round((self.params / (12 * self.layers)) ** 0.5 / 128) * 128)  # whole heads
        if self.layers is None:
            self.layers = max(1, round(self.params / (12 * self.hidden**2)))
        if self.head_dim is None:
            self.head_dim = 128 if self.hidden >= 2048 else 64
        if self.n_heads is None:
            self.n_heads = max(1, self.hidden // self.head_dim)
        if self.kv_heads is None:
            self.kv_heads = min(8, self.n_heads)

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0

    @property
    def active_params(self) -> float:
        """Parameters one token computes with: all but the experts it was not routed to and the input
        embedding table (a lookup). OpenAI counts gpt-oss's "active parameters" this way; Qwen's
        "A3B"/"A22B" include the embedding table."""
        unused = self.expert_params * (1 - self.n_expert_used / self.n_expert) if self.is_moe else 0.0
        return self.params - self.embed_params - unused


@dataclass
class Plan:
    model: str
    context: int
    batch: int
    kv_dtype: str
    weights: int                 # bytes
    kv_cache: int                # bytes
    activations: int             # bytes
    total: int                   # bytes
    available_here: int          # bytes this machine can give now
    fits_here: bool
    fits_spark: bool
    max_context_here: int        # longest context that fits here (0: not even the weights)
    max_context_spark: int       # ... on a DGX Spark
    params: float = 0.0          # parameters (all experts)
    active_params: float = 0.0   # parameters one token runs
    active_bytes: int = 0        # weight bytes one decoded token reads
    decode_tps_spark: float = 0.0  # decode ceiling on a Spark: bandwidth / (active bytes + KV at this context)
    sparks: int = 1              # DGX Sparks needed to hold it at this context (weights split between them)
    n_expert: int = 0
    n_expert_used: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def report(self) -> str:
        yes = {True: "yes", False: "no"}

        def fb(n):  # binary as memory is sized, decimal GB as machines are sold
            return f"{fmt_bytes(n):>10s} ({n / 1e9:.1f} GB)"
        return "\n".join([
            f"{self.model}: context {self.context}, batch {self.batch}, KV {self.kv_dtype}",
            f"  weights      {fb(self.weights)}",
            f"  KV cache     {fb(self.kv_cache)}",
            f"  activations  {fb(self.activations)}",
            f"  total        {fb(self.total)}",
            f"  fits here    {yes[self.fits_here]} ({fmt_bytes(self.available_here)} available; longest context {self.max_context_here})",
            f"  fits Spark   {yes[self.fits_spark]} (128 GB unified; longest context {self.max_context_spark})"
            + ("" if self.fits_spark else f"; {self.sparks} Sparks hold it"),
        ] + ([f"  experts      {self.n_expert_used} of {self.n_expert} per token: {self.params / 1e9:.1f}B parameters, "
              f"{self.active_params / 1e9:.1f}B active"] if self.n_expert else []) + [
            f"  per token    {fmt_bytes(self.active_bytes)} of weights ({self.active_bytes / 1e9:.2f} GB) read to decode one token",
            f"  decode       at most {self.decode_tps_spark:.0f} tok/s on a Spark ({SPARK_BANDWIDTH / 1e9:.0f} GB/s, "
            f"weights + KV at context {self.context})",
        ])


def weight_bytes(s: ModelShape) -> int:
    if s.weight_bytes:
        return int(s.weight_bytes)
    bits = s.expert_bits or s.bits_per_weight
    return int((s.params - s.expert_params) * s.bits_per_weight / 8 + s.expert_params * bits / 8)


def active_bytes(s: ModelShape) -> int:
    """Weight bytes one decoded token reads: all but the unrouted experts and the embedding table."""
    if s.active_weight_bytes:
        return int(s.active_weight_bytes)
    bits = s.expert_bits or s.bits_per_weight
    used = s.n_expert_used / s.n_expert if s.is_moe else 1.0
    return int((s.params - s.expert_params - s.embed_params) * s.bits_per_weight / 8
               + s.expert_params * used * bits / 8)


def kv_bytes(s: ModelShape, context: int, batch: int = 1, kv_dtype: str = "f16") -> int:
    # K and V, per layer, per token: kv_heads * head_dim values each; sliding layers keep a window
    window = min(context, s.sliding_window) if s.sliding_window else context
    tokens = (s.layers - s.sliding_layers) * context + s.sliding_layers * window
    return int(2 * tokens * s.kv_heads * s.head_dim * batch * KV_BYTES[kv_dtype])


def decode_tokens_per_second(s: ModelShape, context: int, bandwidth: float = SPARK_BANDWIDTH,
                             kv_dtype: str = "f16") -> float:
    """The bandwidth ceiling of decoding: every token streams its active weights and the KV cache once."""
    return bandwidth / (active_bytes(s) + kv_bytes(s, context, 1, kv_dtype))


def activation_bytes(s: ModelShape, context: int, batch: int = 1) -> int:
    ub = min(context, UBATCH)
    per_token = 4 * (8 * s.hidden + s.vocab)           # f32 hidden-state buffers + a logits row
    scores = 4 * ub * context * s.n_heads               # one layer's attention scores for a prompt chunk
    return int(batch * (ub * per_token + scores))


def _max_context(s: ModelShape, batch: int, kv_dtype: str, capacity: int, limit: int) -> int:
    lo, hi = 0, limit
    if weight_bytes(s) + kv_bytes(s, 1, batch, kv_dtype) + activation_bytes(s, 1, batch) > capacity:
        return 0
    while lo < hi:  # largest context whose total fits
        mid = (lo + hi + 1) // 2
        if weight_bytes(s) + kv_bytes(s, mid, batch, kv_dtype) + activation_bytes(s, mid, batch) <= capacity:
            lo = mid
        else:
            hi = mid - 1
    return lo


def plan(shape: ModelShape, context: int | None = None, batch: int = 1, kv_dtype: str = "f16",
         available: int | None = None) -> Plan:
    if kv_dtype not in KV_BYTES:
        raise ValueError(f"unknown KV dtype {kv_dtype!r}; use one of {', '.join(KV_BYTES)}")
    if context is None:
        context = min(shape.context_max or 4096, 4096)
    if context < 1 or batch < 1:
        raise ValueError(f"context and batch must be >= 1, got context={context}, batch={batch}")
    if available is None:
        from .memory import get_allocator
        st = get_allocator().stats()
        available = st.budget - st.in_use
    w, kv, act = weight_bytes(shape), kv_bytes(shape, context, batch, kv_dtype), activation_bytes(shape, context, batch)
    total = w + kv + act
    spark = SPARK_MEMORY - SPARK_RESERVED
    limit = shape.context_max or max(context, MAX_CONTEXT)  # never beyond what the model was trained for
    return Plan(shape.name, context, batch, kv_dtype, w, kv, act, total, available,
                total <= available, total <= spark,
                _max_context(shape, batch, kv_dtype, available, limit),
                _max_context(shape, batch, kv_dtype, spark, limit),
                params=shape.params, active_params=shape.active_params, active_bytes=active_bytes(shape),
                decode_tps_spark=decode_tokens_per_second(shape, context, kv_dtype=kv_dtype),
                sparks=max(1, math.ceil(total / spark)), n_expert=shape.n_expert, n_expert_used=shape.n_expert_used)


def shape_from_model(name_or_path: str) -> ModelShape:
    """A model's shape: a name in KNOWN_MODELS, or a GGUF's metadata alone (no weights read)."""
    key = str(name_or_path).lower()
    if key in KNOWN_MODELS:
        return known_shape(key)
    from .gguf import GGUFFile, read_shape
    from .models import ModelNotFound, resolve
    try:
        shape = read_shape(name_or_path)
    except ModelNotFound as e:
        raise ModelNotFound(f"{e}; the planner also knows {', '.join(KNOWN_MODELS)} by name") from None
    return replace(shape, **_gguf_moe(GGUFFile(resolve(name_or_path, "llm")), shape.layers))


def _gguf_moe(f, layers: int) -> dict:
    """MoE and sliding-window fields from a GGUF: expert counts from the metadata, exact bytes from the
    tensor table (experts are the 3-D ffn_*_exps tensors; token_embd is read a row at a time unless it
    is also the output matrix)."""
    from .llm.archs import ARCHS
    meta = f.metadata
    arch = str(meta.get("general.architecture", ""))
    n, k = int(meta.get(f"{arch}.expert_count", 0) or 0), int(meta.get(f"{arch}.expert_used_count", 0) or 0)
    if n and not 0 < k <= n:
        raise ValueError(f"{f.path.name}: {arch}.expert_used_count ({k}) must be between 1 and "
                         f"{arch}.expert_count ({n})")
    exps = [t for name, t in f.tensors.items() if "_exps." in name]
    embd = f.tensors.get("token_embd.weight")
    embd_b = embd.nbytes if embd is not None and "output.weight" in f.tensors else 0
    total = sum(t.nbytes for t in f.tensors.values())
    exp_b = sum(t.nbytes for t in exps)
    out = {"n_expert": n, "n_expert_used": k if n else 0,
           "expert_params": float(sum(t.n_elements for t in exps)),
           "embed_params": float(embd.n_elements) if embd_b else 0.0,
           "active_weight_bytes": int(total - embd_b - exp_b + (exp_b * k // n if n else 0))}
    spec, window = ARCHS.get(arch), meta.get(f"{arch}.attention.sliding_window")
    if spec is not None and spec.sliding and window:
        out.update(sliding_window=int(window), sliding_layers=layers - layers // max(1, spec.swa_pattern))
    return out


# ------------------------------------------------------------------------------ the models Spark owners run

# Bits per weight of every GGML format spark_lab reads, from its block table (quants.BLOCK_SIZES:
# Q4_K 144 bytes per 256 weights = 4.5, MXFP4 17 per 32 = 4.25, NVFP4 36 per 64 = 4.5, Q8_0 34 per
# 32 = 8.5, IQ2_XXS 66 per 256 = 2.0625, IQ1_S 50 per 256 = 1.5625, ...).
FORMAT_BITS = {q.name: 8.0 * ts / bs for q, (bs, ts) in BLOCK_SIZES.items()}


@dataclass(frozen=True)
class KnownModel:
    """The numbers of a published config.json that size a decoder (names as transformers spells them)."""
    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    num_experts: int                 # num_local_experts (gpt-oss) / num_experts (Qwen3 MoE)
    num_experts_per_tok: int
    expert_intermediate_size: int    # intermediate_size (gpt-oss) / moe_intermediate_size (Qwen3 MoE)
    max_position_embeddings: int
    attention_bias: bool = False     # q/k/v/o biases and attention sinks (gpt-oss)
    expert_bias: bool = False        # router and expert biases (gpt-oss)
    qk_norm: bool = False            # per-head q/k RMSNorm weights (Qwen3)
    sliding_window: int | None = None
    sliding_layers: int = 0
    expert_format: str = "Q4_K"      # how the experts are stored
    other_format: str = "Q4_K"       # how everything else is stored
    source: str = ""


KNOWN_MODELS: dict[str, KnownModel] = {
    # openai/gpt-oss-120b and -20b config.json: MXFP4 experts ("quant_method": "mxfp4"), attention,
    # router, embeddings and lm_head left in BF16 ("modules_to_not_convert"); every other layer
    # slides over 128 tokens ("layer_types")
    "gpt-oss-120b": KnownModel(36, 2880, 64, 8, 64, 201088, 128, 4, 2880, 131072, attention_bias=True,
                               expert_bias=True, sliding_window=128, sliding_layers=18, expert_format="MXFP4",
                               other_format="BF16", source="openai/gpt-oss-120b config.json"),
    "gpt-oss-20b": KnownModel(24, 2880, 64, 8, 64, 201088, 32, 4, 2880, 131072, attention_bias=True,
                              expert_bias=True, sliding_window=128, sliding_layers=12, expert_format="MXFP4",
                              other_format="BF16", source="openai/gpt-oss-20b config.json"),
    # Qwen/Qwen3-30B-A3B and Qwen/Qwen3-235B-A22B config.json (untied embeddings), at 4 bits (Q4_K blocks)
    "qwen3-30b-a3b": KnownModel(48, 2048, 32, 4, 128, 151936, 128, 8, 768, 40960, qk_norm=True,
                                source="Qwen/Qwen3-30B-A3B config.json"),
    "qwen3-235b-a22b": KnownModel(94, 4096, 64, 4, 128, 151936, 128, 8, 1536, 40960, qk_norm=True,
                                  source="Qwen/Qwen3-235B-A22B config.json"),
}


def count_params(m: KnownModel) -> tuple[int, int, int]:
    """-> (total, expert, embedding) parameters of a MoE decoder with untied embeddings."""
    d, hd, ff, E = m.hidden_size, m.head_dim, m.expert_intermediate_size, m.num_experts
    q, kv = m.num_attention_heads * hd, m.num_key_value_heads * hd
    attn = d * q + 2 * d * kv + q * d                                   # q, k, v, o
    if m.attention_bias:
        attn += q + 2 * kv + d + m.num_attention_heads                  # biases and one sink per head
    if m.qk_norm:
        attn += 2 * hd
    expert = 3 * d * ff                                                 # gate, up, down
    router = E * d + (E if m.expert_bias else 0)
    bias = E * (2 * ff + d) if m.expert_bias else 0
    per_layer = attn + router + bias + E * expert + 2 * d               # + the two norms
    embed = m.vocab_size * d
    total = m.num_hidden_layers * per_layer + 2 * embed + d             # embeddings, lm_head, final norm
    return total, m.num_hidden_layers * E * expert, embed


def known_shape(name: str, expert_format: str | None = None, other_format: str | None = None) -> ModelShape:
    """The ModelShape of a named model in KNOWN_MODELS (formats: keys of FORMAT_BITS)."""
    m = KNOWN_MODELS.get(name.lower())
    if m is None:
        raise ValueError(f"unknown model {name!r} (named shapes: {', '.join(KNOWN_MODELS)})")
    ef, of = expert_format or m.expert_format, other_format or m.other_format
    for f in (ef, of):
        if f not in FORMAT_BITS:
            raise ValueError(f"unknown weight format {f!r} (known: {', '.join(FORMAT_BITS)})")
    total, expert, embed = count_params(m)
    label = f"{name} ({ef} experts, {of} rest)" if ef != of else f"{name} ({ef})"
    return ModelShape(label, params=float(total), bits_per_weight=FORMAT_BITS[of], layers=m.num_hidden_layers,
                      kv_heads=m.num_key_value_heads, head_dim=m.head_dim, hidden=m.hidden_size,
                      vocab=m.vocab_size, n_heads=m.num_attention_heads, context_max=m.max_position_embeddings,
                      n_expert=m.num_experts, n_expert_used=m.num_experts_per_tok, expert_params=float(expert),
                      expert_bits=FORMAT_BITS[ef], embed_params=float(embed), sliding_window=m.sliding_window,
                      sliding_layers=m.sliding_layers)
