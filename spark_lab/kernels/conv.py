"""2-D convolution (im2col + one GEMM per call; Winograd for 3x3) and nearest-neighbour upsampling.

conv2d dominates a diffusion UNet's time, so it is one BLAS/cuBLAS matrix product: the input
patches are gathered into a [C*kh*kw, N*Ho*Wo] matrix with kh*kw strided slice copies (no
Python loop over pixels), multiplied by the weight seen as [O, C*kh*kw], and the result is
transposed back to [N, O, Ho, Wo]. One wide GEMM beats N narrow ones at the UNet's small
inner resolutions (8x8, 16x16), and the gather + transpose cost ~10% of the GEMM at 64+
channels. A 1x1 convolution skips the gather: [O, C] @ [N, C, H*W] lands in place. With numba, 3x3
stride-1 convs with 32+ channels take Winograd F(2x2, 3x3) instead (see WINOGRAD_MIN_CHANNELS);
the im2col body stays the reference and the fallback.
"""
from __future__ import annotations

import threading

import numpy as np

from ..device import array_module
from .activations import matmul_rows, split_rows

# 3x3, stride 1, padding 1 convs with at least this many input channels take
# Winograd F(2x2, 3x3) when numba is there: 16 GEMMs of [tiles, C] @ [C, O] do 4 multiply-adds
# per output pixel and channel pair instead of 9, and the input transform writes 4x the input
# where im2col writes 9x. Measured (1 thread, UNet shapes): 1.4-1.8x faster than im2col from 64
# input channels and 8x8 up; channels-last transforms made it another 1.2-1.6x (vs torch's
# oneDNN conv: 1.2-1.7x faster at 8x8 and 16x16, 0.8-0.95x at 32x32 with 32 outputs).
WINOGRAD_MIN_CHANNELS = 32
WINOGRAD_CHUNK_BYTES = 1 << 19   # transformed input tiles per chunk (L2-sized; see _winograd3x3)
_WINO = None          # (input transform, output transform) compiled on first use; False without numba
_WINO_WEIGHTS = {}    # id(w) -> (w, U [16, O, C]): transformed weights, kept with their source
_SCRATCH = threading.local()   # per thread: shape -> reused work buffer (fresh ones page-fault:
                               # ~1 ms of a 3 ms conv at 32x32 x 64 channels)


def _scratch(name, shape, zero=False):
    """A reused float32 work buffer of this shape; `zero`: zeroed when first made (borders stay 0)."""
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None:
        bufs = _SCRATCH.bufs = {}
    key = (name, shape)
    buf = bufs.get(key)
    if buf is None:
        if len(bufs) > 64:
            bufs.clear()
        buf = bufs[key] = (np.zeros if zero else np.empty)(shape, dtype=np.float32)
    return buf


def _pair(v, name):
    if isinstance(v, int):
        return v, v
    if len(v) != 2:
        raise ValueError(f"conv2d: {name} must be an int or a pair, got {v!r}")
    return int(v[0]), int(v[1])


def conv2d(x, w, b=None, stride=1, padding=0, groups=1):
    """x [N, C, H, W], w [O, C/groups, kh, kw], b [O] -> [N, O, Ho, Wo] (torch's conv2d)."""
    if x.ndim != 4 or w.ndim != 4:
        raise ValueError(f"conv2d: x {tuple(x.shape)} must be [N, C, H, W] and w {tuple(w.shape)} [O, C/groups, kh, kw]")
    N, C, H, W = x.shape
    O, Cg, kh, kw = w.shape
    if C % groups or O % groups or Cg * groups != C:
        raise ValueError(f"conv2d: x {tuple(x.shape)} and w {tuple(w.shape)} do not fit with groups={groups}")
    if b is not None and tuple(b.shape) != (O,):
        raise ValueError(f"conv2d: bias {tuple(b.shape)} does not match w {tuple(w.shape)}")
    (sh, sw), (ph, pw) = _pair(stride, "stride"), _pair(padding, "padding")
    Ho, Wo = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    if Ho < 1 or Wo < 1:
        raise ValueError(f"conv2d: kernel {kh}x{kw} is larger than padded input for x {tuple(x.shape)}")
    xp = array_module(x)
    if (kh == kw == 3 and sh == sw == 1 and ph == pw == 1 and groups == 1 and xp is np
            and x.dtype == w.dtype == np.float32 and C >= WINOGRAD_MIN_CHANNELS):
        out = _winograd3x3(x, w, b)
        if out is not None:
            return out
    K = Cg * kh * kw
    wm = w.reshape(groups, O // groups, K)                                 # [g, O/g, K]
    if kh == kw == 1 and sh == sw == 1 and ph == pw == 0 and groups == 1:
        if xp is np and x.dtype == np.float32:                             # [O, C] @ [N, C, HW] -> [N, O, HW]
            out = np.empty((N, O, H * W), np.float32)
            split_rows(_batched_matmul, N, np.broadcast_to(wm[0], (N, O, C)), x.reshape(N, C, H * W), out,
                       work=N * O * C * H * W // 16)                          # images on row_threads()
        else:
            out = wm[0] @ x.reshape(N, C, H * W)
        out = out.reshape(N, O, H, W)
    else:
        reuse = xp is np and x.dtype == np.float32                         # CPU: reused work buffers
        xpad = x
        if ph or pw:
            shape = (N, C, H + 2 * ph, W + 2 * pw)
            xpad = _scratch("pad", shape, zero=True) if reuse else xp.zeros(shape, dtype=x.dtype)
            xpad[:, :, ph:ph + H, pw:pw + W] = x                           # the zero border stays
        xc = xpad.transpose(1, 0, 2, 3)                                    # [C, N, Hp, Wp] (a view)
        shape = (C, kh, kw, N, Ho, Wo)
        cols = _scratch("cols", shape) if reuse else xp.empty(shape, dtype=x.dtype)
        for i in range(kh):
            for j in range(kw):
                cols[:, i, j] = xc[:, :, i:i + sh * (Ho - 1) + 1:sh, j:j + sw * (Wo - 1) + 1:sw]
        cols = cols.reshape(groups, K, N * Ho * Wo)                        # [g, Cg*kh*kw, N*Ho*Wo]
        if groups == 1 and reuse:                                          # [O, N*Ho*Wo], column shares
            y = matmul_rows(wm[0], cols[0], np.empty((O, N * Ho * Wo), np.float32))
        else:
            y = wm[0] @ cols[0] if groups == 1 else wm @ cols              # [(g,) O/g, N*Ho*Wo]
        y = y.reshape(O, N, Ho, Wo).transpose(1, 0, 2, 3)                  # [N, O, Ho, Wo] (a view)
        out = xp.ascontiguousarray(y)
    if b is not None:
        out += b.reshape(1, O, 1, 1)
    return out


def upsample_nearest2d(x, scale=2):
    """x [N, C, H, W] -> [N, C, H*scale, W*scale], each pixel repeated scale x scale times."""
    if x.ndim != 4:
        raise ValueError(f"upsample_nearest2d: x {tuple(x.shape)} must be [N, C, H, W]")
    s = int(scale)
    if s < 1 or s != scale:
        raise ValueError(f"upsample_nearest2d: scale must be a positive integer, got {scale}")
    xp = array_module(x)
    N, C, H, W = x.shape
    y = xp.broadcast_to(x[:, :, :, None, :, None], (N, C, H, s, W, s))   # a view, no copy yet
    return y.reshape(N, C, H * s, W * s)


def _compile_winograd():
    global _WINO
    try:
        import numba
    except ImportError:
        _WINO = False
        return _WINO

    # Layout: the transforms work channels-last (NHWC), so every inner loop runs over C or O
    # contiguous floats with a handful of loads and one store (LLVM vectorizes it after one
    # runtime alias check; with 16 stores in one loop it gave up: 5-10x slower). NCHW <-> NHWC
    # is a numba transpose that reads one source row and scatters it (2x NumPy's strided copy).

    @numba.njit(cache=True, nogil=True)
    def to_nhwc_padded(x, xp, lo, hi):
        # rows lo..hi-1 (n * H + h) of x [N, C, H, W] -> the inside of xp [N, Hp, Wp, C]
        # (its zero border is left alone)
        N, C, H, W = x.shape
        for task in range(lo, hi):
            n, h = task // H, task % H
            for c in range(C):
                src = x[n, c, h]
                for w in range(W):
                    xp[n, h + 1, w + 1, c] = src[w]

    @numba.njit(cache=True, nogil=True)
    def input_transform(xp, th, tw, V, lo, hi):
        # tile rows lo..hi-1 (n * th + ti) of xp [N, 2th+2, 2tw+2, C] zero-bordered -> V [16, N*th*tw, C]
        # = B^T d B per 4x4 tile d. Row a of B^T is d[i0] + sign * d[i1], so V[4a + b] needs 4 of the 16 inputs.
        pick = ((0, 2, -1.0), (1, 2, 1.0), (2, 1, -1.0), (1, 3, -1.0))
        C = xp.shape[3]
        for task in range(lo, hi):
            n, ti = task // th, task % th
            r = 2 * ti
            for tj in range(tw):
                s = 2 * tj
                t = (n * th + ti) * tw + tj
                for k in range(16):
                    i0, i1, sa = pick[k // 4]
                    j0, j1, sb = pick[k % 4]
                    sa, sb = np.float32(sa), np.float32(sb)
                    a00, a01 = xp[n, r + i0, s + j0], xp[n, r + i0, s + j1]    # [C] each
                    a10, a11 = xp[n, r + i1, s + j0], xp[n, r + i1, s + j1]
                    v = V[k, t]
                    for c in range(C):
                        v[c] = (a00[c] + sb * a01[c]) + sa * (a10[c] + sb * a11[c])

    @numba.njit(cache=True, nogil=True)
    def output_transform(M, bias, th, tw, out, lo, hi):
        # tile rows lo..hi-1 (n * th + ti) of M [16, N*th*tw, O] -> out [N, O, H, W] = A^T m A per
        # tile + bias, cropped at odd edges; the tile rows land channels-last in Y [2, 2tw, O],
        # then are transposed into out
        N, O, H, W = out.shape
        S = np.empty((2, 4, O), np.float32)
        Y = np.empty((2, 2 * tw, O), np.float32)
        for task in range(lo, hi):
            n, ti = task // th, task % th
            for tj in range(tw):
                t = (n * th + ti) * tw + tj
                for b in range(4):                   # rows: A^T m
                    m0, m1, m2, m3 = M[b, t], M[4 + b, t], M[8 + b, t], M[12 + b, t]
                    s0, s1 = S[0, b], S[1, b]
                    for o in range(O):
                        s0[o] = m0[o] + m1[o] + m2[o]
                        s1[o] = m1[o] - m2[o] - m3[o]
                for a in range(2):                   # columns: (A^T m) A, + bias
                    u0, u1, u2, u3 = S[a, 0], S[a, 1], S[a, 2], S[a, 3]
                    ya, yb = Y[a, 2 * tj], Y[a, 2 * tj + 1]
                    for o in range(O):
                        ya[o] = u0[o] + u1[o] + u2[o] + bias[o]
                    for o in range(O):
                        yb[o] = u1[o] - u2[o] - u3[o] + bias[o]
            for a in range(2):
                i = 2 * ti + a
                if i < H:
                    for o in range(O):
                        dst = out[n, o, i]
                        for w in range(W):
                            dst[w] = Y[a, w, o]

    @numba.njit(cache=True, nogil=True)
    def phases_to_nchw(Y, bias, out):
        # Y [4, N, H, W, O] (output parity 2a + b, channels-last) -> out [N, O, 2H, 2W] + bias
        N, H, W, O = Y.shape[1], Y.shape[2], Y.shape[3], Y.shape[4]
        for n in range(N):
            for o in range(O):
                bo = bias[o]
                for i in range(H):
                    for a in range(2):
                        dst = out[n, o, 2 * i + a]
                        for j in range(W):
                            dst[2 * j] = Y[2 * a, n, i, j, o] + bo
                            dst[2 * j + 1] = Y[2 * a + 1, n, i, j, o] + bo

    _WINO = (to_nhwc_padded, input_transform, output_transform, phases_to_nchw)
    return _WINO


def _winograd_weight(w):
    """w [O, C, 3, 3] -> U [16, C, O] = (G g G^T)^T per (o, c), cached per weight array."""
    hit = _WINO_WEIGHTS.get(id(w))
    if hit is not None and hit[0] is w:
        return hit[1]
    G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])
    U = np.einsum("ai,ocij,bj->abco", G, w.astype(np.float64), G)         # [4, 4, C, O]
    U = np.ascontiguousarray(U.reshape(16, w.shape[1], w.shape[0]), dtype=np.float32)
    if len(_WINO_WEIGHTS) > 1024:
        _WINO_WEIGHTS.clear()
    _WINO_WEIGHTS[id(w)] = (w, U)
    return U


def _batched_matmul(a, b, out, lo, hi):
    np.matmul(a[lo:hi], b[lo:hi], out=out[lo:hi])


def _winograd3x3(x, w, b):
    """conv2d for 3x3, stride 1, padding 1 by Winograd F(2x2, 3x3); None without numba.

    Big inputs go in chunks of tile rows (one image at a time) whose transformed tiles V stay
    in L2 between the input transform and the GEMM (WINOGRAD_CHUNK_BYTES; 12-16% faster at
    32x32 x 64-96 channels than one pass through L3).
    """
    kern = _WINO if _WINO is not None else _compile_winograd()
    if kern is False:
        return None
    N, C, H, W = x.shape
    O = w.shape[0]
    th, tw = (H + 1) // 2, (W + 1) // 2
    # xpad = x with a zero border, channels-last [N, 2th+2, 2tw+2, C]; only the inside is
    # written, so the reused buffer's zero border stays
    xpad = _scratch("xpad", (N, 2 * th + 2, 2 * tw + 2, C), zero=True)
    split_rows(kern[0], N * H, np.ascontiguousarray(x), xpad, work=x.size)   # rows on row_threads()
    U = _winograd_weight(w)                                                # [16, C, O]
    out = np.empty((N, O, H, W), dtype=np.float32)
    bias = np.zeros(O, np.float32) if b is None else np.ascontiguousarray(b, dtype=np.float32)
    if 64 * N * th * tw * C <= WINOGRAD_CHUNK_BYTES:                      # V [16, tiles, C] float32
        chunks = [(slice(None), 0, th)]                                    # small: all at once
    else:                                                                  # per image, `rows` tile rows
        rows = max(1, min(th, WINOGRAD_CHUNK_BYTES // (64 * tw * C)))
        chunks = [(slice(n, n + 1), t0, min(th, t0 + rows)) for n in range(N) for t0 in range(0, th, rows)]
    if len(chunks) > 1:                 # whole chunks on row_threads() (each thread its own buffers)
        split_rows(_winograd_chunks, len(chunks), kern, xpad, U, bias, tw, out, chunks, False,
                   work=16 * N * th * tw * C * O // 16)
    else:                               # one chunk: each step's rows shared among the threads
        _winograd_chunks(kern, xpad, U, bias, tw, out, chunks, True, 0, 1)
    return out


def _winograd_chunks(kern, xpad, U, bias, tw, out, chunks, share, lo, hi):
    """_winograd3x3's chunks lo..hi-1: input transform, 16 GEMMs, output transform; share: split
    each step's rows among row_threads() (else all on this thread)."""
    run = split_rows if share else (lambda k, n, *a, work=None: k(*a, 0, n))   # noqa: E731
    C, O, H = xpad.shape[3], U.shape[2], out.shape[2]
    for n, t0, t1 in chunks[lo:hi]:
        xs = xpad[n, 2 * t0:2 * t1 + 2]                                    # [n, 2r+2, 2tw+2, C] (contiguous)
        nr = xs.shape[0] * (t1 - t0)                                       # tile rows in this chunk
        T = nr * tw
        V = _scratch("V", (16, T, C))
        run(kern[1], nr, xs, t1 - t0, tw, V, work=V.size)                  # [16, tiles, C]
        M = _scratch("M", (16, T, O))                                      # [16, tiles, C] @ [16, C, O]
        run(_batched_matmul, 16, V, U, M, work=T * C * O)
        run(kern[2], nr, M, bias, t1 - t0, tw, out[n, :, 2 * t0:min(H, 2 * t1)], work=M.size)


# Nearest x2 then a 3x3 conv equals four 2x2 convs on the small input, one per output-pixel
# parity: an output row 2i+a sees upsampled rows 2i+a-1..2i+a+1, which are small rows
# {i-1, i} (a = 0) or {i, i+1} (a = 1), so the 3x3 taps that land on the same small row add up.
# Same result, 4/9 of the multiply-adds and no 4x-sized upsampled copy.
_TAP_GROUPS = (((0,), (1, 2)), ((0, 1), (2,)))   # parity -> the 3x3 taps summed into each of 2 taps
_PHASE_WEIGHTS = {}   # id(w) -> (w, [4, 2*2*C, O]): the four parities' 2x2 kernels, channels-last


def phase_kernels(w):
    """w [O, C, 3, 3] -> {(a, b): [O, C, 2, 2]}: the 2x2 kernel of output parity (a, b)."""
    xp = array_module(w)
    out = {}
    for a in (0, 1):
        # each group is a run of taps: a slice, not a list index (on a GPU a list is a host->device copy)
        rows = [w[:, :, g[0]:g[-1] + 1].sum(axis=2) for g in _TAP_GROUPS[a]]           # 2 x [O, C, 3]
        for b in (0, 1):
            k = [[r[:, :, g[0]:g[-1] + 1].sum(axis=2) for g in _TAP_GROUPS[b]] for r in rows]  # 2 x 2 x [O, C]
            out[a, b] = xp.stack([xp.stack(row, axis=-1) for row in k], axis=-2)
    return out


def _phase_weights(w):
    """w [O, C, 3, 3] -> [4, 4C, O]: parity 2a+b's 2x2 kernel as rows (u, v, c), cached per weight."""
    hit = _PHASE_WEIGHTS.get(id(w))
    if hit is not None and hit[0] is w:
        return hit[1]
    k = phase_kernels(w.astype(np.float64))
    O, C = w.shape[:2]
    P = np.stack([k[a, b].transpose(2, 3, 1, 0).reshape(4 * C, O) for a in (0, 1) for b in (0, 1)])
    P = np.ascontiguousarray(P, dtype=np.float32)
    if len(_PHASE_WEIGHTS) > 256:
        _PHASE_WEIGHTS.clear()
    _PHASE_WEIGHTS[id(w)] = (w, P)
    return P


def upsample2x_conv3x3(x, w, b=None):
    """conv2d(upsample_nearest2d(x, 2), w, b, padding=1) for w [O, C, 3, 3]: x [N, C, H, W] -> [N, O, 2H, 2W].

    CPU with numba: each parity kernel is one GEMM on channels-last 2x2 patches,
    [N*H*W, 4C] @ [4C, O] (no 4x upsampled copy, 4/9 of the multiply-adds); elsewhere
    four 2x2 conv2d calls on the zero-bordered input.
    """
    if x.ndim != 4 or w.ndim != 4 or w.shape[2:] != (3, 3) or w.shape[1] != x.shape[1]:
        raise ValueError(f"upsample2x_conv3x3: x {tuple(x.shape)} must be [N, C, H, W] and w {tuple(w.shape)} [O, C, 3, 3]")
    xp = array_module(x)
    N, C, H, W = x.shape
    O = w.shape[0]
    kern = None
    if xp is np and x.dtype == w.dtype == np.float32:
        kern = _WINO if _WINO is not None else _compile_winograd()
    if not kern:
        xpad = xp.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))                 # [N, C, H+2, W+2]
        out = xp.empty((N, O, 2 * H, 2 * W), dtype=x.dtype)
        for (a, c), k in phase_kernels(w).items():
            out[:, :, a::2, c::2] = conv2d(xpad[:, :, a:a + H + 1, c:c + W + 1], k, b)
        return out
    xpad = _scratch("uxpad", (N, H + 2, W + 2, C), zero=True)              # channels-last, zero border
    split_rows(kern[0], N * H, np.ascontiguousarray(x), xpad, work=x.size)
    P = _phase_weights(w)                                                  # [4, 4C, O]
    Y = _scratch("uY", (4, N * H * W, O))
    cols = _scratch("ucols", (N, H, W, 2, 2, C))                           # pixel, tap (u, v), channel
    for a in (0, 1):                                                       # one parity at a time: its
        for c in (0, 1):                                                   # patches stay in L2 for the GEMM
            for u in (0, 1):
                for v in (0, 1):
                    cols[:, :, :, u, v] = xpad[:, a + u:a + u + H, c + v:c + v + W]
            matmul_rows(cols.reshape(N * H * W, 4 * C), P[2 * a + c], Y[2 * a + c])    # [NHW, O]
    out = np.empty((N, O, 2 * H, 2 * W), dtype=np.float32)
    bias = np.zeros(O, np.float32) if b is None else np.ascontiguousarray(b, dtype=np.float32)
    kern[3](Y.reshape(4, N, H, W, O), bias, out)
    return out
