"""The "will it fit?" planner: weights + KV cache + activations, before anything is loaded.

Works from a model's shape alone (GGUF metadata or numbers typed in), so it can answer
"can a 200B model at 4 bits run on a DGX Spark?" before anyone downloads anything.
"""
from __future__ import annotations

from dataclasses import dataclass, asdict

from .memory import fmt_bytes

SPARK_MEMORY = 128 * 10**9          # DGX Spark: 128 GB LPDDR5x shared by CPU and GPU
SPARK_RESERVED = 8 * 10**9          # what the OS, desktop and CUDA context keep for themselves
KV_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}  # per value (GGML blocks)
MAX_CONTEXT = 131072                # search limit for "longest context" when the model's is unknown
UBATCH = 512                        # prompt tokens processed at once (sizes the activations)


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

    def __post_init__(self):
        if not self.params > 0 or not self.bits_per_weight > 0:
            raise ValueError(f"{self.name}: params and bits_per_weight must be > 0, "
                             f"got {self.params} and {self.bits_per_weight}")
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
            f"  fits Spark   {yes[self.fits_spark]} (128 GB unified; longest context {self.max_context_spark})",
        ])


def weight_bytes(s: ModelShape) -> int:
    return int(s.weight_bytes) if s.weight_bytes else int(s.params * s.bits_per_weight / 8)


def kv_bytes(s: ModelShape, context: int, batch: int = 1, kv_dtype: str = "f16") -> int:
    # K and V, per layer, per token: kv_heads * head_dim values each
    return int(2 * s.layers * s.kv_heads * s.head_dim * context * batch * KV_BYTES[kv_dtype])


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
                _max_context(shape, batch, kv_dtype, spark, limit))


def shape_from_model(name_or_path: str) -> ModelShape:
    """A model's shape from GGUF metadata alone (no weights read)."""
    from .gguf import read_shape
    return read_shape(name_or_path)
