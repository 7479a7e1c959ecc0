"""One query token against a KV cache on the CPU: a numba kernel for decoding.

One kernel serves a lone sequence (`attention_into`: one row) and a batch of decoding sequences
whose caches are slots of one pool (`attention_rows`: n rows, each over its own slot, one call per
layer instead of n). Its parallel tasks are (row, key chunk) pairs, so a row's numbers are the same
whether it runs alone or among others (the batch engine's invariance rests on it). A row of fewer
than 512 keys is one chunk; its tasks then split the KV heads, so a short chat's decode step uses
both threads too (8B shapes, 140 keys: 70 -> 52 us a layer).

`attention()`'s NumPy body is the reference; for a single query its dozen small array
operations (transposes, a mask, softmax passes) cost more than the arithmetic, so decode takes
this fused loop instead: scores, a stable softmax and the weighted sum of values, in one pass
over the visible keys. Same numbers as the reference to float32 rounding.

At long context the cache, not the weights, is what a step reads (an 8B model at 16k tokens:
64 MB of f32 keys per layer), so the loop walks the cache in memory order (a position's keys
of every KV head, then the next position: a stride of one head's row would cross a page per
key), reads each key and value row once for all the query heads that share it (grouped-query
attention), and splits long contexts into NCHUNK runs of keys on separate threads, whose partial
softmaxes are combined at the end. The chunk bounds depend on NCHUNK and the key count only
(not on the threads available) and chunks are combined in index order, so a result never depends
on timing or thread count. Rows are widened on the fly from the cache's storage type:

    f32    float32 [Tk, Hkv, D]
    f16    uint16 float16 bits [Tk, Hkv, D]
    q8_0   int8 [Tk, Hkv, D] with float32 scales [Tk, Hkv, D/32]
    q8_0 key tiles   uint8 [Tk/16, Hkv, 16 D] with scales [Tk/16, Hkv, D/32 * 16] (float16 bits as the cache
           keeps them, or float32; attn_blocks widens 16 at a time) (llm/cache.py:
           how the cache stores q8_0 keys): the scores are integer dot products, 16 keys per register
           (`_scores_tiles`, attn_blocks.q8_tile), with the query quantized to q8_0 per 32 values as
           llama.cpp does for a q8_0 key cache (`_quantize_tiles`); the scaled sum is then exact to
           float32 rounding against a query so quantized. Each whole tile's 16 scores also update a
           running max per head and lane (attn_blocks.max16), so the softmax skips its pass for the max
           (0.4 ns a score). 16k keys at Llama-3-8B shapes, q8_0 K and V, alternating with the row
           kernel: 2.9 -> 1.55-1.9 ms per layer (scores ~0.25 of it, the softmax ~0.2, the weighted sum of
           q8_0 rows ~1.1).
    q8_0 value tiles  uint8 [Tk/16, Hkv, 16 Dv] (the codes' bits) with scales [Tk/16, Hkv, Dv/32 * 16] (as the keys')
           (llm/cache.py): the weighted sum is integer dot products too (`_wsum_tiles`: the weights
           e * scale as 16-bit integers per head, 32-value block and block of keys, attn_blocks.q8_weights,
           summed against 4 keys' codes per dword, attn_blocks.q8_vsum); within 1e-4 of the largest
           |value| of widening them (2.9e-5 seen). 16k keys as above, 32 layers in turn: 1.72 -> 1.51 ms
           per layer, 3.3 -> 2.5 CPU ms (the weighted sum's compute 126 -> 72 us per 2048 keys in L2).

For head dims 64, 128 and 256, keys go 16 at a time through `attn_blocks`' register tiles, which
widen each row straight from the cache into registers (VCVTPH2PS for f16; sign-extend, convert and
times the block scale for q8_0) and feed every value loaded to several multiply-adds: scores take up
to 4 query heads of a group x 4 keys (16 FMA chains folded by one tree of adds), the weighted sum
keeps 4 heads x 4 chunks of the output in registers over the 16 values; each read of the cache asks
for the rows 32 positions ahead into L2 (without it the same kernel took twice as long). Other head
dims, and keys past the last whole 16, take `kv_rows.widen16` (16 values per step) or a scalar
loop. Scores are kept head-major so the softmax's max and exp passes read them in order. Per layer
at 16k keys, Llama-3-8B shapes, 2 threads, Zen 4 (`python -m spark_lab.benchmarks.attention`): f16
4.3 -> 2.6-2.8 ms (the tiles alone, in L1, run at ~3 G FMA/s per core; the rest is the memory:
64 MB at ~25 GB/s), q8_0 3.9 -> 2.5-2.9 (each row's block scales loaded once per block and asked for
ahead with the row: a shift and a dependent load per 16 values had held it at 3.9), f32 6.0 -> 4.3.
gpt-oss's attention sinks (a logit per query head that joins the softmax's max and denominator and
takes no value) enter where the chunks are combined, so every cache type and the pooled rows take
them (a scalar kernel over widened f16 rows had cost gpt-oss-20b 11 ms a token at 140 keys, 1.8 now).
NaN scores give NaN outputs (numba's "numpy" error model),
never a ZeroDivisionError. numba's cache entries are keyed on this file and the
modules it imports (kv_rows.py, attn_blocks.py, expf.py: `numba_cache.source_stamp`).
"""
from __future__ import annotations

from functools import partial

import numpy as np

_KERNEL = None  # compiled on first use; False when numba is missing
_F16 = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)   # bits -> value
_NO_SCALE = np.zeros((1, 1, 1, 1, 1), np.float32)   # scales of an f32/f16 cache: never read

exp_parts = None   # kernels.expf.exp_parts compiled for inlining, set by _compile()
prange = range     # numba.prange once compiled
load_row = None    # _load_row compiled (dtype-dispatched), set by _compile()
widen_row = None   # _widen_row compiled (dtype-dispatched, kv_rows.widen16), set by _compile()
score_group = None  # _score_group compiled, set by _compile()
row_of = None       # _row_of compiled, set by _compile()
wsum_group = None   # _wsum_group compiled, set by _compile()
score_keys = quantize_query = None   # _score_keys / _quantize_query dispatched on the K storage, set by _compile()
q8_tile4 = q8_tile2 = q8_tile1 = max16 = None   # attn_blocks' q8_0 key-tile blocks by query heads, set by _compile()
q8_vsum4 = q8_vsum2 = q8_vsum1 = q8_weights = None   # attn_blocks' q8_0 value-tile blocks, set by _compile()
wsum_block = v_tiled = None   # _wsum_block / _v_tiled dispatched on the V storage, set by _compile()
scores4 = scores2 = scores1 = wsum4 = wsum2 = wsum1 = None   # attn_blocks' tiles by query heads, set by _compile()
NCHUNK = 2         # key chunks at long context (threads; one chunk under 512 keys)
BLOCK = 256        # keys per online-softmax block: a block's scores stay in L2 (a chunk's whole
                   # [Hq, keys] scores were fresh pages every call: 6 MB cleared per layer at 16k)


def _load_row(a, s, tab, j, g, row):
    """row [D] f32 = a[j, g, :] widened (f32 copy / f16 bits via tab / q8_0 codes * scales)."""
    for d in range(row.shape[0]):
        row[d] = a[j, g, d]


def _widen_row(a, sc, j, g, row):
    """row [D] f32 = a[j, g, :] widened 16 values per step (D a multiple of 16, a C-contiguous);
    q8_0 codes times their block's scale sc[j, g, d // 32]."""
    for d in range(row.shape[0]):
        row[d] = a[j, g, d]


def _score_group(k, ks, koff, kst, qs, h0, G, s, col):
    """s[h, col:col+16] = scores of query heads h0..h0+G-1 against the 16 key rows at flat offset
    koff of k (stride kst): tiles of 4 heads, then 2, then 1 (attn_blocks)."""
    D = qs.shape[1]
    h = h0
    while h < h0 + G:
        n = h0 + G - h
        if n >= 4:
            scores4(k, ks, koff, kst, qs, h * D, s, h * s.shape[1] + col, s.shape[1], D)
            h += 4
        elif n >= 2:
            scores2(k, ks, koff, kst, qs, h * D, s, h * s.shape[1] + col, s.shape[1], D)
            h += 2
        else:
            scores1(k, ks, koff, kst, qs, h * D, s, h * s.shape[1] + col, s.shape[1], D)
            h += 1


def _wsum_group(v, vs, voff, vst, e, h0, G, col, o):
    """o[h] += sum_t e[h, col + t] V_t for query heads h0..h0+G-1 over the 16 value rows at flat
    offset voff of v (stride vst): tiles of 4 heads, then 2, then 1 (attn_blocks)."""
    D = o.shape[1]
    h = h0
    while h < h0 + G:
        n = h0 + G - h
        if n >= 4:
            wsum4(v, vs, voff, vst, e, h * e.shape[1] + col, e.shape[1], o, h * D, D)
            h += 4
        elif n >= 2:
            wsum2(v, vs, voff, vst, e, h * e.shape[1] + col, e.shape[1], o, h * D, D)
            h += 2
        else:
            wsum1(v, vs, voff, vst, e, h * e.shape[1] + col, e.shape[1], o, h * D, D)
            h += 1


def _row_of(a, sc, tab, j, g, row, vec):
    """row [D] f32 = a[j, g, :] widened: 16 values a step where the head dim allows (vec), else one by one."""
    if vec:
        widen_row(a, sc, j, g, row)
    else:
        load_row(a, sc, tab, j, g, row)


def _score_keys(k, ks, tab, b0, nk, Hkv, g0, g1, G, qs, qi, qd, qc, s, krow, tmp, blocked, vec_k, m16):
    """s[h, 0:nk] = scores of the query heads h of KV heads g0..g1-1 (qs [Hq, D], scaled) against keys
    b0..b0+nk-1 of one layer's cache k (dispatched on its storage: `_scores_rows`, or `_scores_tiles`
    for q8_0 key tiles)."""


def _scores_rows(k, ks, tab, b0, nk, Hkv, g0, g1, G, qs, qi, qd, qc, s, krow, tmp, blocked, vec_k, m16):
    """Rows [Tk, Hkv, D] (f32, f16, q8_0 values): 16 keys at a time through the tiles where the head
    dim has them, the rest a row of all KV heads at a time."""
    D = qs.shape[1]
    kst = Hkv * D                                    # a position's stride in the cache, in values
    nb16 = nk // 16 if blocked else 0
    for jb in range(nb16):
        for g in range(g0, g1):
            score_group(k, ks, ((b0 + 16 * jb) * Hkv + g) * D, kst, qs, g * G, G, s, 16 * jb)
    for j in range(16 * nb16, nk):
        for g in range(g0, g1):
            row_of(k, ks, tab, b0 + j, g, krow, vec_k)
            for hh in range(G):
                h = g * G + hh
                acc = np.float32(0.0)
                for d in range(D):
                    acc += qs[h, d] * krow[d]
                s[h, j] = acc
    for h in range(g0 * G, g1 * G):                  # the block's max per head (m16's first lane)
        mh = m16[h, 0]
        for j in range(nk):
            mh = max(mh, s[h, j])
        m16[h, 0] = mh


def _scores_tiles(k, ks, tab, b0, nk, Hkv, g0, g1, G, qs, qi, qd, qc, s, krow, tmp, blocked, vec_k, m16):
    """q8_0 key tiles [Tk/16, Hkv, 16 D] bytes, scales [Tk/16, Hkv, D/32 * 16] (llm/cache.py): every
    16-position tile the keys touch, a KV head's query group at a time (attn_blocks.q8_tile: 4, 2, 1
    heads; the query quantized in qi, qd, qc); a tile that sticks out of b0..b0+nk-1 is computed in
    tmp and only its positions inside are kept."""
    D = qs.shape[1]
    nb = D // 32
    for t in range(b0 // 16, (b0 + nk - 1) // 16 + 1):
        whole = 16 * t >= b0 and 16 * t + 16 <= b0 + nk
        for g in range(g0, g1):
            kb, sb = (t * Hkv + g) * 16 * D, (t * Hkv + g) * 16 * nb
            o, r0, c0 = (s, g * G, 16 * t - b0) if whole else (tmp, 0, 0)
            ost = o.shape[1]
            ooff = r0 * ost + c0
            for hh in range(G):
                for x in range(16):
                    o[r0 + hh, c0 + x] = 0.0
            h = 0
            while h < G:
                n = G - h
                for b in range(nb):
                    args = (k, ks, kb + 512 * b, sb + 16 * b, qi, (g * G + h) * D + 32 * b, D, qc, qd,
                            (g * G + h) * nb + b, nb, o, ooff + h * ost, ost)
                    if n >= 4:
                        q8_tile4(*args)
                    elif n >= 2:
                        q8_tile2(*args)
                    else:
                        q8_tile1(*args)
                h += 4 if n >= 4 else (2 if n >= 2 else 1)
            if whole:
                for hh in range(G):
                    max16(s, (g * G + hh) * ost + c0, m16, (g * G + hh) * 16)
            else:
                for hh in range(G):
                    for p in range(max(16 * t, b0), min(16 * t + 16, b0 + nk)):
                        x = tmp[hh, p - 16 * t]
                        s[g * G + hh, p - b0] = x
                        m16[g * G + hh, 0] = max(m16[g * G + hh, 0], x)


def _quantize_query(k, qs, qi, qd, qc):
    """For q8_0 key tiles: qs [Hq, D] -> int8 codes qi, a scale qd per 32 values (max|x| / 127, as the
    cache's own blocks) and qc = 128 * the codes' sum per block (the tiles' key bias). Else nothing."""


def _quantize_tiles(k, qs, qi, qd, qc):
    Hq, D = qs.shape
    for h in range(Hq):
        for b in range(D // 32):
            amax = np.float32(0.0)
            for j in range(32):
                a = abs(qs[h, 32 * b + j])
                if a > amax or a != a:               # a NaN makes the scale NaN: NaN scores, as for floats
                    amax = a
            d = np.float32(amax / np.float32(127.0))
            inv = np.float32(1.0) / d if d > 0 else np.float32(0.0)
            tot = 0
            for j in range(32):
                x = qs[h, 32 * b + j] * inv
                c = int(np.rint(x)) if x == x else 0
                qi[h, 32 * b + j] = c
                tot += c
            qd[h, b] = d
            qc[h, b] = 128 * tot


def _no_query(k, qs, qi, qd, qc):
    pass


def _v_tiled(v):
    """True for q8_0 value tiles (uint8), else False: a constant once compiled."""


def _wsum_block(v, vs, tab, b0, nk, Hkv, g0, g1, G, e, o, vrow, blocked, vec_v, wq, sb, rr):
    """o[h] += sum_j e[h, eo + j] V_{b0 + j} for the query heads h of KV heads g0..g1-1 over keys
    b0..b0+nk-1 of one layer's cache v (dispatched on its storage: `_wsum_rows`, or `_wsum_tiles`
    for q8_0 value tiles, where eo = b0 % 16 and e is zero around the keys; else eo = 0)."""


def _wsum_rows(v, vs, tab, b0, nk, Hkv, g0, g1, G, e, o, vrow, blocked, vec_v, wq, sb, rr):
    """Rows [Tk, Hkv, Dv]: 16 keys at a time through the tiles where the head dim has them, the rest
    one key at a time."""
    Dv = o.shape[1]
    nb16 = nk // 16 if blocked else 0
    for jb in range(nb16):
        for g in range(g0, g1):
            wsum_group(v, vs, ((b0 + 16 * jb) * Hkv + g) * Dv, Hkv * Dv, e, g * G, G, 16 * jb, o)
    for j in range(16 * nb16, nk):
        for g in range(g0, g1):
            row_of(v, vs, tab, b0 + j, g, vrow, vec_v)
            for hh in range(G):
                h = g * G + hh
                w = e[h, j]
                for d in range(Dv):
                    o[h, d] += w * vrow[d]


def _wsum_tiles(v, vs, tab, b0, nk, Hkv, g0, g1, G, e, o, vrow, blocked, vec_v, wq, sb, rr):
    """q8_0 value tiles [Tk/16, Hkv, 16 Dv] (llm/cache.py), scales [Tk/16, Hkv, Dv/32 * 16]: per query
    head and 32-value block b, the weights w = e * scale (each key's q8_0 scale for the block) become
    16-bit integers round(w * 65535 / M), M the largest w (attn_blocks.q8_weights), so that
    sum_t w_t code_t is an exact integer dot product (attn_blocks.q8_vsum), scaled back by M / 65535.
    Each weight is off by at most half a step, 2^-17 of M (the q8_0 codes themselves are off by up to
    2^-8 of their block's largest)."""
    Dv = o.shape[1]
    nb = Dv // 32
    npw = wq.shape[3]                                 # wq [G, nb, 2, positions]: high and low bytes
    t0 = b0 // 16
    eo = b0 - 16 * t0                                 # the block's first key in its tile
    nt = (eo + nk - 1) // 16 + 1                      # tiles the keys touch
    row = Hkv * nb * 16                               # a tile's scales, all KV heads
    for g in range(g0, g1):
        for hh in range(G):                           # each head's weights as 16-bit integers, per block b
            for b in range(nb):
                q8_weights(e, (g * G + hh) * e.shape[1], vs, (t0 * Hkv + g) * nb * 16 + 16 * b, row, nt,
                           wq, (hh * nb + b) * 2 * npw, npw, sb, hh * nb + b)
        hh = 0
        while hh < G:
            n = G - hh
            H = 4 if n >= 4 else (2 if n >= 2 else 1)
            for b in range(nb):
                args = (v, (t0 * Hkv + g) * 16 * Dv, Hkv * 16 * Dv, nt, b, wq, (hh * nb + b) * 2 * npw, nb * 2 * npw, npw, rr)
                if H == 4:
                    q8_vsum4(*args)
                elif H == 2:
                    q8_vsum2(*args)
                else:
                    q8_vsum1(*args)
                for x in range(H):
                    f = sb[(hh + x) * nb + b] / np.float32(65535.0)
                    h = g * G + hh + x
                    for d in range(32):
                        o[h, 32 * b + d] += (np.float32(rr[x, 0, d]) * np.float32(256.0) + np.float32(rr[x, 1, d])) * f
            hh += H


def _attend(Q, K, KS, V, VS, tab, layer, slots, scale, lo, hi, sinks, out):
    # Q [n, Hq, D]: n query rows; K/V [S, L, Tk, Hkv, D]: S caches of L layers (storage above; tiles [S, L, Tk/16, Hkv, 16 D]),
    # KS/VS their q8_0 scales [S, L, Tk, Hkv, D/32] (or a 1-element stand-in); row r reads cache
    # slots[r], `layer`, keys lo[r]..hi[r]-1 -> out [n, Hq, Dv]. Tasks are (row, key chunk) pairs
    # on the threads; a row's numbers depend on its own keys only (never on n or the other rows).
    # Under 512 keys a row is one chunk, and its tasks split the KV heads instead (same numbers).
    # sinks [Hq] (gpt-oss) or empty: one more logit per head in each softmax's denominator only.
    n_rows, Hq, D = Q.shape
    tiled_v = v_tiled(V)
    Hkv, Dv = K.shape[3], V.shape[4] // 16 if tiled_v else V.shape[4]   # value tiles: 16 positions a row
    G = Hq // Hkv
    vec_k, vec_v = D % 16 == 0, Dv % 16 == 0
    cm = np.empty((n_rows, NCHUNK, Hq), np.float32)  # each chunk's max score, sum of exps, weighted values
    cl = np.empty((n_rows, NCHUNK, Hq), np.float32)
    co = np.empty((n_rows, NCHUNK, Hq, Dv), np.float32)
    for task in prange(n_rows * NCHUNK):
        r, c = task // NCHUNK, task % NCHUNK
        n = hi[r] - lo[r]
        nc = min(NCHUNK, max(1, n // 256))           # key chunks, one per thread: memory read in order
        g0, g1 = (0, Hkv) if nc > 1 else (c * Hkv // NCHUNK, (c + 1) * Hkv // NCHUNK)   # else heads
        if g0 == g1:
            continue
        h0, h1 = g0 * G, g1 * G
        cc = c if nc > 1 else 0
        sl = slots[r]
        k, v = K[sl, layer], V[sl, layer]
        ks = KS[min(sl, KS.shape[0] - 1), min(layer, KS.shape[1] - 1)]
        vs = VS[min(sl, VS.shape[0] - 1), min(layer, VS.shape[1] - 1)]
        j0, j1 = lo[r] + cc * n // nc, lo[r] + (cc + 1) * n // nc
        s = np.empty((Hq, BLOCK), np.float32)        # a block's scores, head-major: the softmax reads them in order
        e = np.empty((Hq, BLOCK + 32), np.float32)   # their exponentials (from eo on: value tiles start at a tile)
        bits = np.empty((Hq, BLOCK + 32), np.int32)  # 2^n factors of the exponentials
        two = bits.view(np.float32)
        krow = np.empty(D, np.float32)
        vrow = np.empty(Dv, np.float32)
        nbv = max(1, Dv // 32)                       # q8_0 value tiles: weights as 16-bit integers (_wsum_tiles)
        wq = np.empty((G, nbv, 2, BLOCK + 32) if tiled_v else (1, 1, 1, 1), np.uint8)
        sb = np.empty(G * nbv, np.float32)           # the largest weight of each (head, value block)
        rr = np.empty((4, 2, 32), np.int32)
        qs = np.empty((Hq, D), np.float32)           # q * scale: the score needs no multiply per key
        for h in range(Hq):
            for d in range(D):
                qs[h, d] = Q[r, h, d] * scale
        qi = np.empty((Hq, D), np.int8)              # q8_0 key tiles: qs quantized per 32 values
        qd = np.empty((Hq, max(1, D // 32)), np.float32)
        qc = np.empty((Hq, max(1, D // 32)), np.int64)
        tmp = np.empty((G, 16), np.float32)          # a tile sticking out of a block: its scores
        m16 = np.empty((Hq, 16), np.float32)         # each head's running max of a block's scores, by lane
        quantize_query(k, qs, qi, qd, qc)
        # 16 keys at a time where the head dim has tiles (attn_blocks): rows read straight from the cache
        blocked = vec_k and vec_v and D == Dv and (D == 64 or D == 128 or D == 256)
        run_m, run_l, o = cm[r, cc], cl[r, cc], co[r, cc]   # the running max, sum of exps, weighted values
        run_m[h0:h1] = -np.inf
        run_l[h0:h1] = 0.0
        o[h0:h1] = 0.0
        for b0 in range(j0, j1, BLOCK):              # online softmax over blocks of keys
            nk = min(BLOCK, j1 - b0)
            eo = b0 % 16 if tiled_v else 0
            m16[...] = -np.inf
            score_keys(k, ks, tab, b0, nk, Hkv, g0, g1, G, qs, qi, qd, qc, s, krow, tmp, blocked, vec_k, m16)
            for h in range(h0, h1):
                mh = run_m[h]
                for x in range(16):
                    mh = max(mh, m16[h, x])
                if mh != run_m[h]:                   # a new max: rescale what was summed so far
                    f = np.float32(np.exp(run_m[h] - mh))
                    run_l[h] *= f
                    for d in range(Dv):
                        o[h, d] *= f
                    run_m[h] = mh
                for j in range(nk):                  # exp(s - m): a polynomial, vectorized
                    e[h, eo + j], bits[h, eo + j] = exp_parts(s[h, j] - mh)
                tot = np.float32(0.0)
                for j in range(eo, eo + nk):
                    x = e[h, j] * two[h, j]
                    e[h, j] = x
                    tot += x
                run_l[h] += tot
                if tiled_v:                          # zeros around the keys, to the tiles' bounds
                    for j in range(eo):
                        e[h, j] = 0.0
                    for j in range(eo + nk, BLOCK + 32):
                        e[h, j] = 0.0
            wsum_block(v, vs, tab, b0, nk, Hkv, g0, g1, G, e, o, vrow, blocked, vec_v, wq, sb, rr)
    for r in range(n_rows):                          # chunks combined: rescaled to the global max
        nc = min(NCHUNK, max(1, (hi[r] - lo[r]) // 256))
        for h in range(Hq):
            M = cm[r, 0, h]
            for c in range(1, nc):
                M = max(M, cm[r, c, h])
            tot = np.float32(0.0)
            sink = sinks.shape[0] > 0                # the sink joins the max and the denominator
            if sink:
                M = max(M, sinks[h])
                tot = np.float32(np.exp(sinks[h] - M))
            for d in range(Dv):
                out[r, h, d] = 0.0
            for c in range(nc):
                f = np.float32(np.exp(cm[r, c, h] - M)) if nc > 1 or sink else np.float32(1.0)
                tot += f * cl[r, c, h]
                for d in range(Dv):
                    out[r, h, d] += f * co[r, c, h, d]
            inv = np.float32(1.0) / tot
            for d in range(Dv):
                out[r, h, d] *= inv


def _compile():
    """Compile (or load from numba's cache) the kernel; False without numba."""
    global _KERNEL, prange, load_row, widen_row, row_of, score_group, wsum_group
    try:
        import numba
        from numba import types
        from numba.extending import overload
    except ImportError:
        _KERNEL = False
        return _KERNEL
    from .expf import njit_with_exp

    def _ov(a, s, tab, j, g, row):
        if a.dtype == types.uint16:
            def f16(a, s, tab, j, g, row):
                # exponent and mantissa moved to float32's places, times 2^112 (rebias: exact for
                # normals and subnormals), then the sign; three loops that vectorize
                bits = row.view(np.uint32)
                for d in range(row.shape[0]):
                    bits[d] = (np.uint32(a[j, g, d]) & np.uint32(0x7fff)) << np.uint32(13)
                for d in range(row.shape[0]):
                    row[d] *= np.float32(5.192296858534828e+33)
                for d in range(row.shape[0]):
                    bits[d] |= (np.uint32(a[j, g, d]) & np.uint32(0x8000)) << np.uint32(16)
            return f16
        if a.dtype == types.int8:
            def q8(a, s, tab, j, g, row):
                for d in range(row.shape[0]):
                    row[d] = np.float32(a[j, g, d]) * s[j, g, d // 32]
            return q8
        def f32(a, s, tab, j, g, row):
            for d in range(row.shape[0]):
                row[d] = a[j, g, d]
        return f32
    if load_row is None:
        overload(_load_row, inline="always")(_ov)
        load_row = _load_row
    if widen_row is None:
        from .kv_rows import widen16_intrinsic
        overload(_widen_row, inline="always")(partial(_widen_ov, widen16_intrinsic()))
        widen_row = _widen_row
    from . import attn_blocks
    for H in attn_blocks.HEADS:
        globals()[f"scores{H}"], globals()[f"wsum{H}"] = attn_blocks.build()[H]
    global score_keys, quantize_query
    global max16
    for H, f in attn_blocks.build()["q8_tile"].items():
        globals()[f"q8_tile{H}"] = f
    max16 = attn_blocks.build()["max16"]
    for H, f in attn_blocks.build()["q8_vsum"].items():
        globals()[f"q8_vsum{H}"] = f
    global q8_weights
    q8_weights = attn_blocks.build()["q8_weights"]
    global wsum_block, v_tiled
    if wsum_block is None:
        def wsum_ov(v, vs, tab, b0, nk, Hkv, g0, g1, G, e, o, vrow, blocked, vec_v, wq, sb, rr):
            return _wsum_tiles if v.dtype == types.uint8 else _wsum_rows

        def tiled_ov(v):
            tiles = v.dtype == types.uint8
            return lambda v: tiles
        overload(_wsum_block, inline="always")(wsum_ov)
        overload(_v_tiled, inline="always")(tiled_ov)
        wsum_block, v_tiled = _wsum_block, _v_tiled
    if score_keys is None:
        def scores_ov(k, ks, tab, b0, nk, Hkv, g0, g1, G, qs, qi, qd, qc, s, krow, tmp, blocked, vec_k, m16):
            return _scores_tiles if k.dtype == types.uint8 else _scores_rows

        def query_ov(k, qs, qi, qd, qc):
            return _quantize_tiles if k.dtype == types.uint8 else _no_query
        overload(_score_keys, inline="always")(scores_ov)
        overload(_quantize_query, inline="always")(query_ov)
        score_keys, quantize_query = _score_keys, _quantize_query
    row_of = numba.njit(inline="always", nogil=True)(_row_of)
    score_group = numba.njit(inline="always", nogil=True)(_score_group)
    wsum_group = numba.njit(inline="always", nogil=True)(_wsum_group)
    prange = numba.prange
    _KERNEL = njit_with_exp(_attend, parallel=True)   # reassociated sums vectorize; ~1e-7 relative
    return _KERNEL


def _widen_ov(widen16, a, sc, j, g, row):
    from numba import types
    if a.dtype == types.int8:
        def q8(a, sc, j, g, row):
            D = row.shape[0]
            base = (j * a.shape[1] + g) * D
            for b in range(D // 16):
                widen16(a, base + 16 * b, sc[j, g, b // 2], row, 16 * b)
        return q8

    def flt(a, sc, j, g, row):
        D = row.shape[0]
        base = (j * a.shape[1] + g) * D
        for b in range(D // 16):
            widen16(a, base + 16 * b, np.float32(1.0), row, 16 * b)
    return flt


_ONE_SLOT = np.zeros(1, np.int64)
_NO_SINKS = np.zeros(0, np.float32)


def _sinks(sinks):
    return _NO_SINKS if sinks is None else np.ascontiguousarray(sinks, dtype=np.float32)


def _scales(sc):
    return _NO_SCALE if sc is None else np.ascontiguousarray(sc)[None, None]


def _run_one(kern, q, k, v, scale, lo, hi, out, k_scale, v_scale, sinks=None):
    """One query row over one layer's k/v [Tk, Hkv, D]: the rows kernel with n = 1 (the same
    machine code as a batched row, hence the same numbers)."""
    k, v = np.ascontiguousarray(k), np.ascontiguousarray(v)         # rows are read 16 values at a flat offset
    kern(np.ascontiguousarray(q)[None], k[None, None], _scales(k_scale), v[None, None], _scales(v_scale), _F16,
         0, _ONE_SLOT, np.float32(scale), np.array([lo], np.int64), np.array([hi], np.int64), _sinks(sinks), out[None])


def attention_one(q, k, v, scale: float, lo: int, hi: int, k_scale=None, v_scale=None):
    """q [1, Hq, D] f32, k/v [Tk, Hkv, D] -> [1, Hq, Dv], or None when numba is unavailable."""
    kern = _KERNEL if _KERNEL is not None else _compile()
    if kern is False or hi <= lo:
        return None
    out = np.empty((1, q.shape[1], v.shape[2]), np.float32)
    _run_one(kern, q[0], k, v, scale, lo, hi, out[0], k_scale, v_scale)
    return out


def attention_into(q, k, v, scale: float, lo: int, hi: int, out, k_scale=None, v_scale=None, sinks=None) -> bool:
    """q [Hq, D], k/v [Tk, Hkv, D] (keys lo..hi-1 visible; f32, f16 bits as uint16, or int8
    with k_scale/v_scale [Tk, Hkv, D/32]) -> out [Hq, Dv], in place. sinks [Hq]: gpt-oss's
    attention sinks (a logit per head in the softmax's denominator, `sink_attention`).
    False (out untouched) when numba is unavailable."""
    kern = _KERNEL if _KERNEL is not None else _compile()
    if kern is False or hi <= lo:
        return False
    _run_one(kern, q, k, v, scale, lo, hi, out, k_scale, v_scale, sinks)
    return True


def attention_rows(q, pool, layer: int, slots, lo, hi, scale: float, out, sinks=None) -> bool:
    """n decoding sequences at once, each over its own cache in a pool: q [n, Hq, D]; pool the
    (k, k_scale, v, v_scale) arrays of `KVCache.pooled` ([S, L, Tk, Hkv, D], scales or None);
    row r attends to keys lo[r]..hi[r]-1 of cache slots[r] at `layer` -> out [n, Hq, Dv], in place.
    Row r's numbers are attention_into's for that row alone, bit for bit (one kernel, one task per
    (row, key chunk)). False (out untouched) when numba is unavailable."""
    kern = _KERNEL if _KERNEL is not None else _compile()
    if kern is False:
        return False
    k, ks, v, vs = pool
    kern(q, k, _NO_SCALE if ks is None else ks, v, _NO_SCALE if vs is None else vs, _F16, int(layer),
         np.asarray(slots, np.int64), np.float32(scale), np.asarray(lo, np.int64), np.asarray(hi, np.int64), _sinks(sinks), out)
    return True


def attention_prompt(q, cache, layer: int, pos: int, scale: float, window: int | None = None, sinks=None):
    """A prompt chunk's queries q [T, Hq, D] at positions pos..pos+T-1 over `cache` (a KVCache whose
    positions [0, pos+T) are written) -> [T, Hq, Dv], each row by the decode kernel over the keys
    it sees (a sliding window: the last `window`); None when numba is unavailable.

    Row t gets the numbers of decoding that token alone, whatever the chunk around it: a prompt's
    K/V and logits do not depend on how it was cut into chunks (so a cached prefix of any length
    is the one a fresh prefill computes), nor on the prompts stacked beside it."""
    kern = _KERNEL if _KERNEL is not None else _compile()
    if kern is False:
        return None
    T, Hq = q.shape[0], q.shape[1]
    if cache.pool is not None:
        pool, slot = cache.pool, cache.pool_index
    else:
        pool = tuple(None if a is None else a[None] for a in (cache.k, cache.k_scale, cache.v, cache.v_scale))
        slot = 0
    hi = np.arange(pos + 1, pos + T + 1, dtype=np.int64)
    lo = np.maximum(0, hi - int(window)) if window else np.zeros(T, np.int64)
    out = np.empty((T, Hq, cache.head_dim), np.float32)
    attention_rows(np.ascontiguousarray(q, dtype=np.float32), pool, layer, np.full(T, slot, np.int64), lo, hi, scale, out, sinks)
    return out
