"""The KV cache: keys and values of every layer, allocated once through the allocator."""
from __future__ import annotations

import numpy as np

from ..memory import get_allocator


class KVCache:
    def __init__(self, n_layer: int, n_ctx: int, n_head_kv: int, head_dim: int, dtype=np.float32):
        self.n_layer, self.n_ctx = n_layer, n_ctx
        alloc = get_allocator()
        shape = (n_layer, n_ctx, n_head_kv, head_dim)
        # one block each for K and V: [layer, position, kv head, head dim]
        self.k = alloc.empty(shape, dtype, tag="kv_cache", what=f"K cache for {n_ctx} tokens")
        self.v = alloc.empty(shape, dtype, tag="kv_cache", what=f"V cache for {n_ctx} tokens")
        self.n_past = 0  # positions [0, n_past) hold valid entries

    @property
    def nbytes(self) -> int:
        return int(self.k.nbytes + self.v.nbytes)

    def write(self, layer: int, pos: int, k, v) -> None:
        """k, v [T, Hkv, hd] for positions pos..pos+T-1."""
        T = k.shape[0]
        self.k[layer, pos:pos + T] = k
        self.v[layer, pos:pos + T] = v

    def view(self, layer: int, n: int):
        """Keys and values of positions [0, n): zero-copy views [n, Hkv, hd]."""
        return self.k[layer, :n], self.v[layer, :n]

    def truncate(self, n: int) -> None:
        """Forget positions >= n (a shared prefix with the next prompt can be kept)."""
        self.n_past = min(self.n_past, n)
