"""spark_lab's math kernels: pure functions over NumPy or CuPy arrays (float32 in, float32 out).

Each function takes `xp = array_module(x)` from its inputs, so one body serves both backends;
with CuPy arrays, rmsnorm, softmax, rope, decode attention and the Q4_1/Q8_0 mat-vec run
hand-written CUDA kernels (cuda/*.cu) instead. Signatures are pinned in docs/interfaces.md.
"""
from .activations import geglu, gelu, quick_gelu, silu, softmax, swiglu
from .attention import attention
from .conv import conv2d, upsample_nearest2d
from .linalg import embedding, linear, matmul
from .norms import group_norm, layernorm, rmsnorm
from .rope import rope, rope_table, timestep_embedding

__all__ = [
    "linear", "matmul", "embedding",
    "rmsnorm", "layernorm", "group_norm",
    "softmax", "silu", "gelu", "quick_gelu", "swiglu", "geglu",
    "rope", "rope_table", "timestep_embedding",
    "attention",
    "conv2d", "upsample_nearest2d",
]
