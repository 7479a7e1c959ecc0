"""The KV cache: keys and values of every layer, in f32, f16 or q8_0 (llama.cpp's --cache-type-k/v).

    cache = KVCache(n_layer, n_ctx, n_head_kv, head_dim, type_k="f16", type_v="f16")

Layout [layer, position, kv head, head dim] for each of K and V. Storage by type:

    f32    float32 values
    f16    float16 bits as uint16 (numba reads uint16; the decode kernel widens them)
    q8_0   int8 codes + one scale per 32 values (llama.cpp's q8_0 block: scale = max|x| / 127, code =
           round(x / scale), the scale kept as float16 bits: 34 bytes per 32 values, as llama.cpp's),
           stored in tiles (below)

q8_0 keys are stored in tiles of TILE = 16 positions instead, so that the decode kernel's scores are
integer dot products with 16 keys in the lanes of a register (attn_blocks.q8_tile, VPDPBUSD):

    k        uint8 [layer, ceil(n_ctx / 16), kv head, head_dim * 16]: per (tile, head) the codes + 128
             as [head_dim / 4, 16, 4] (4 consecutive values of one key per dword, 16 keys per 64 bytes)
    k_scale  uint16 float16 bits [layer, ceil(n_ctx / 16), kv head, head_dim / 32 * 16]: [head_dim / 32, 16]

q8_0 values are tiled too, so that the weighted sum of values is an integer dot product with the
softmax weights as 16-bit integers (attn_blocks.q8_vsum, VPDPBUSD: 4 keys' codes per dword, a
value dim per lane):

    v        uint8 [layer, ceil(n_ctx / 16), kv head, head_dim * 16]: per (tile, head) the int8 codes'
             bits as [head_dim / 32, 4, 32, 4] (block b of 32 dims, 4 keys a quad, a dim, 4 keys)
    v_scale  uint16 float16 bits [layer, ceil(n_ctx / 16), kv head, head_dim / 32 * 16]: [head_dim / 32, 16]

The same numbers as the row layout (write, view and rows convert). 16k keys x 8 heads x 128 at
Llama-3-8B shapes, 2 threads, per layer: 2.9 -> 1.55-1.9 ms with the key tiles; the value tiles then
1.72 -> 1.51 ms (32 layers in turn, so that the cache comes from memory, alternating with value rows
in one process; 1.24-1.30 ms for one layer over and over), 3.3 -> 2.5 ms of CPU time.

Memory is taken as the cache fills: on the CPU the arrays live in an anonymous mapping without
transparent huge pages, so a position's pages are touched (zeroed by the kernel) only when a
token is written there; a 4096-token context costs nothing until it is used (NumPy's own
allocator asks for huge pages, where the first write to each layer maps 2 MB). On a GPU the
arrays come from the allocator's pool as before (f32 only).
"""
from __future__ import annotations

import mmap

import numpy as np

from ..memory import get_allocator

CACHE_TYPES = ("f32", "f16", "q8_0")
Q8_BLOCK = 32
TILE = 16          # q8_0 keys are stored in tiles of this many positions (module docstring)


def _lazy_empty(shape, dtype, what: str):
    """A CPU array whose pages are mapped on first write (no huge pages), counted as kv_cache."""
    alloc = get_allocator()
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if alloc.device.is_gpu or nbytes == 0:
        return alloc.empty(shape, dtype, tag="kv_cache", what=what)
    alloc.check(nbytes, "kv_cache", what)
    mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        mm.madvise(mmap.MADV_NOHUGEPAGE)
    a = np.frombuffer(mm, dtype=dtype).reshape(shape)              # zero-filled by the kernel, lazily
    return alloc.place(a, tag="kv_cache", what=what)


def quantize_q8_rows(x, f16: bool = True):
    """x f32 [..., D] (D a multiple of 32) -> (codes i8 [..., D], scales f32 [..., D/32]), as llama.cpp's
    quantize_row_q8_0: codes from the float32 scale max|x| / 127, the scale then rounded to float16
    (the value it stores; returned as float32, which holds it exactly). f16=False keeps the float32
    scale (the decode kernel's query for q8_0 key tiles)."""
    xb = np.asarray(x, np.float32).reshape(*x.shape[:-1], -1, Q8_BLOCK)
    amax = np.abs(xb).max(axis=-1)
    d = (amax / 127.0).astype(np.float32)
    inv = np.where(d > 0, 1.0 / np.where(d > 0, d, 1.0), 0.0).astype(np.float32)
    q = np.rint(xb * inv[..., None]).astype(np.int8)
    return q.reshape(x.shape), (d.astype(np.float16).astype(np.float32) if f16 else d)


class KVCache:
    pool = None        # (k, k_scale, v, v_scale) [S, L, ...] when this cache is slot `pool_index` of a pool
    pool_index = 0

    def __init__(self, n_layer: int, n_ctx: int, n_head_kv: int, head_dim: int, dtype=np.float32,
                 type_k: str | None = None, type_v: str | None = None, _slots: int = 0):
        self.n_layer, self.n_ctx, self.n_head_kv, self.head_dim = n_layer, n_ctx, n_head_kv, head_dim
        default = {np.dtype(np.float32): "f32", np.dtype(np.float16): "f16"}.get(np.dtype(dtype))
        if default is None:
            raise ValueError(f"KV cache dtype {np.dtype(dtype).name} is not supported (float32, float16)")
        self.type_k, self.type_v = type_k or default, type_v or default
        for which, t in (("K", self.type_k), ("V", self.type_v)):
            if t not in CACHE_TYPES:
                raise ValueError(f"unknown {which} cache type {t!r}; choose from {', '.join(CACHE_TYPES)}")
            if t == "q8_0" and head_dim % Q8_BLOCK:
                raise ValueError(f"a q8_0 {which} cache needs head_dim a multiple of {Q8_BLOCK}, got {head_dim}")
        if get_allocator().device.is_gpu and (self.type_k, self.type_v) != ("f32", "f32"):
            raise ValueError("the GPU path keeps its KV cache in f32 (--cache-type-k/v f16 and q8_0 are CPU options)")
        shape = (_slots, n_layer, n_ctx, n_head_kv, head_dim) if _slots else (n_layer, n_ctx, n_head_kv, head_dim)
        many = f"{_slots} x " if _slots else ""
        self.k, self.k_scale = self._alloc(self.type_k, shape, f"K cache for {many}{n_ctx} tokens")
        self.v, self.v_scale = self._alloc(self.type_v, shape, f"V cache for {many}{n_ctx} tokens")
        self.n_past = 0  # positions [0, n_past) hold valid entries

    @classmethod
    def pooled(cls, count: int, n_layer: int, n_ctx: int, n_head_kv: int, head_dim: int, dtype=np.float32,
               type_k: str | None = None, type_v: str | None = None) -> list["KVCache"]:
        """`count` caches whose arrays are slots of one pool [count, layer, position, head, dim]
        (each slot's own pages mapped as it fills): the batched decoder attends all of them in one
        kernel call per layer (`decode_attention.attention_rows`). Each behaves as a KVCache."""
        whole = cls(n_layer, n_ctx, n_head_kv, head_dim, dtype, type_k, type_v, _slots=int(count))
        pool = (whole.k, whole.k_scale, whole.v, whole.v_scale)
        out = []
        for s in range(int(count)):
            c = object.__new__(cls)
            c.__dict__.update(whole.__dict__)
            c.k, c.v = whole.k[s], whole.v[s]
            c.k_scale = None if whole.k_scale is None else whole.k_scale[s]
            c.v_scale = None if whole.v_scale is None else whole.v_scale[s]
            c.pool, c.pool_index = pool, s
            out.append(c)
        return out

    @staticmethod
    def _alloc(t: str, shape, what: str):
        if t == "f32":
            return _lazy_empty(shape, np.float32, what), None
        if t == "f16":
            return _lazy_empty(shape, np.uint16, what + " (f16)"), None
        *lead, n_ctx, H, D = shape                  # q8_0: tiles of TILE positions (module docstring)
        n = -(-n_ctx // TILE)
        return (_lazy_empty((*lead, n, H, D * TILE), np.uint8, what + " (q8_0 tiles)"),
                _lazy_empty((*lead, n, H, D // Q8_BLOCK * TILE), np.uint16, what + " (q8_0 scales, f16)"))

    def _tiles(self, arr, scale, layer, values: bool):
        """A layer's q8_0 tiles as bytes indexed [tile, head, D/4, TILE, 4] (keys) or
        [tile, head, D/32, TILE/4, 32, 4] (values), and scales [tile, head, D/32, TILE]."""
        D = self.head_dim
        a, sc = arr[layer], scale[layer]
        shape = (D // Q8_BLOCK, TILE // 4, Q8_BLOCK, 4) if values else (D // 4, TILE, 4)
        return a.reshape(a.shape[0], a.shape[1], *shape), sc.reshape(sc.shape[0], sc.shape[1], D // Q8_BLOCK, TILE)

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in (self.k, self.v, self.k_scale, self.v_scale) if a is not None))

    def _put(self, t, arr, scale, layer, pos, x, values=False):
        T = x.shape[0]
        if arr.dtype == np.uint8:                                           # q8_0 tiles
            q, d = quantize_q8_rows(np.asarray(x, np.float32))             # [T, H, D], [T, H, D/32]
            p = np.arange(pos, pos + T)
            a, sc = self._tiles(arr, scale, layer, values)
            if values:                                                      # the codes' bits
                a[p // TILE, :, :, p % TILE // 4, :, p % 4] = q.view(np.uint8).reshape(T, q.shape[1], -1, Q8_BLOCK)
            else:                                                           # codes + 128
                a[p // TILE, :, :, p % TILE, :] = (q.view(np.uint8) ^ np.uint8(128)).reshape(T, q.shape[1], -1, 4)
            sc[p // TILE, :, :, p % TILE] = d.astype(np.float16).view(np.uint16)
        elif t == "f32":
            arr[layer, pos:pos + T] = x
        elif t == "f16":
            arr[layer, pos:pos + T] = np.asarray(x, np.float32).astype(np.float16).view(np.uint16)

    def _get(self, t, arr, scale, layer, lo, hi, values=False):
        if arr.dtype == np.uint8:                                           # q8_0 tiles
            p = np.arange(lo, hi)
            a, sc = self._tiles(arr, scale, layer, values)
            if values:
                q = a[p // TILE, :, :, p % TILE // 4, :, p % 4].view(np.int8)   # [n, H, D/32, 32]
            else:
                q = (a[p // TILE, :, :, p % TILE, :] ^ np.uint8(128)).view(np.int8)   # [n, H, D/4, 4]
            d = sc[p // TILE, :, :, p % TILE].view(np.float16).astype(np.float32)   # [n, H, D/32]
            q = q.reshape(hi - lo, self.n_head_kv, -1, Q8_BLOCK).astype(np.float32)
            return (q * d[..., None]).reshape(hi - lo, self.n_head_kv, self.head_dim)
        if t == "f32":
            return arr[layer, lo:hi]
        return arr[layer, lo:hi].view(np.float16).astype(np.float32)   # f16

    def write(self, layer: int, pos: int, k, v) -> None:
        """k, v [T, Hkv, hd] for positions pos..pos+T-1."""
        self._put(self.type_k, self.k, self.k_scale, layer, pos, k)
        self._put(self.type_v, self.v, self.v_scale, layer, pos, v, values=True)

    def view(self, layer: int, n: int):
        """Keys and values of positions [0, n) as float32 [n, Hkv, hd] (f32: zero-copy views;
        f16/q8_0: widened copies)."""
        return (self._get(self.type_k, self.k, self.k_scale, layer, 0, n),
                self._get(self.type_v, self.v, self.v_scale, layer, 0, n, values=True))

    def rows(self, layer: int, lo: int, hi: int):
        """Keys and values of positions [lo, hi) as float32 [hi - lo, Hkv, hd]."""
        return (self._get(self.type_k, self.k, self.k_scale, layer, lo, hi),
                self._get(self.type_v, self.v, self.v_scale, layer, lo, hi, values=True))

    def fill_random(self, n: int, seed: int = 0) -> None:
        """Positions [0, n) of every layer set to random keys/values (standard normal): a deep
        context for benchmarks without running its prefill (speed does not depend on the values)."""
        rng = np.random.default_rng(seed)
        tile = rng.standard_normal((min(n, 256), self.n_head_kv, self.head_dim), dtype=np.float32)
        for layer in range(self.n_layer):
            for p in range(0, n, len(tile)):
                m = min(len(tile), n - p)
                self.write(layer, p, tile[:m], tile[:m])

    def truncate(self, n: int) -> None:
        """Forget positions >= n (a shared prefix with the next prompt can be kept)."""
        self.n_past = min(self.n_past, n)
