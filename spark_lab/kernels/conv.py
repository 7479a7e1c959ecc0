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

# 3x3, stride 1, padding 1 convs with at least this many input channels take
# Winograd F(2x2, 3x3) when numba is there: 16 GEMMs of [O, C] @ [C, tiles] do 4 multiply-adds
# per output pixel and channel pair instead of 9, and the input transform writes 4x the input
# where im2col writes 9x. Measured (1 thread, UNet shapes): 1.4-1.8x faster from 64 input
# channels and 8x8 up, 2x with 3 output channels; with 3 input channels one im2col GEMM wins.
WINOGRAD_MIN_CHANNELS = 32
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
        out = wm[0] @ x.reshape(N, C, H * W)                               # [O, C] @ [N, C, HW] -> [N, O, HW]
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
        y = wm[0] @ cols[0] if groups == 1 else wm @ cols                  # [(g,) O/g, N*Ho*Wo]
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

    @numba.njit(cache=True, nogil=True)
    def input_transform(xe, xo, th, tw, V):
        # xe/xo [N, C, 2th+2, tw+1]: the even / odd columns of the zero-bordered input xpad
        # -> V [16, C, N*th*tw] = B^T d B per 4x4 tile d. Row a of B^T is d[i0] + sign * d[i1],
        # so V[4a + b] needs 4 of the 16 inputs. One output plane at a time (16 interleaved store
        # streams ran 10x slower), and split columns make every load unit-stride (vectorized).
        pick = ((0, 2, -1.0), (1, 2, 1.0), (2, 1, -1.0), (1, 3, -1.0))
        N, C = xe.shape[0], xe.shape[1]
        for k in range(16):
            i0, i1, sa = pick[k // 4]
            j0, j1, sb = pick[k % 4]
            sa, sb = np.float32(sa), np.float32(sb)
            A0 = xe if j0 % 2 == 0 else xo                 # xpad column 2tj + j -> (xe|xo)[tj + j // 2]
            A1 = xe if j1 % 2 == 0 else xo
            o0, o1 = j0 // 2, j1 // 2
            for c in range(C):
                for n in range(N):
                    for ti in range(th):
                        p0, p1, t0 = 2 * ti + i0, 2 * ti + i1, (n * th + ti) * tw
                        for tj in range(tw):
                            V[k, c, t0 + tj] = ((A0[n, c, p0, tj + o0] + sb * A1[n, c, p0, tj + o1])
                                                + sa * (A0[n, c, p1, tj + o0] + sb * A1[n, c, p1, tj + o1]))

    @numba.njit(cache=True, nogil=True)
    def output_transform(M, bias, th, tw, out):
        # M [16, O, N*th*tw] -> out [N, O, H, W] = A^T m A per tile (+ bias), cropped at odd edges
        N, O, H, W = out.shape
        m = np.empty((2, 4), np.float32)
        for o in range(O):
            bo = bias[o]
            for n in range(N):
                for ti in range(th):
                    base = (n * th + ti) * tw
                    for tj in range(tw):
                        t = base + tj
                        for b in range(4):        # rows: A^T m
                            v1, v2 = M[4 + b, o, t], M[8 + b, o, t]
                            m[0, b] = M[b, o, t] + v1 + v2
                            m[1, b] = v1 - v2 - M[12 + b, o, t]
                        for a in range(2):
                            i = 2 * ti + a
                            if i < H:
                                j = 2 * tj
                                out[n, o, i, j] = m[a, 0] + m[a, 1] + m[a, 2] + bo
                                if j + 1 < W:
                                    out[n, o, i, j + 1] = m[a, 1] - m[a, 2] - m[a, 3] + bo

    _WINO = (input_transform, output_transform)
    return _WINO


def _winograd_weight(w):
    """w [O, C, 3, 3] -> U [16, O, C] = G g G^T per (o, c), cached per weight array."""
    hit = _WINO_WEIGHTS.get(id(w))
    if hit is not None and hit[0] is w:
        return hit[1]
    G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])
    U = np.einsum("ai,ocij,bj->abo c".replace(" ", ""), G, w.astype(np.float64), G)   # [4, 4, O, C]
    U = np.ascontiguousarray(U.reshape(16, w.shape[0], w.shape[1]), dtype=np.float32)
    if len(_WINO_WEIGHTS) > 1024:
        _WINO_WEIGHTS.clear()
    _WINO_WEIGHTS[id(w)] = (w, U)
    return U


def _winograd3x3(x, w, b):
    """conv2d for 3x3, stride 1, padding 1 by Winograd F(2x2, 3x3); None without numba."""
    kern = _WINO if _WINO is not None else _compile_winograd()
    if kern is False:
        return None
    N, C, H, W = x.shape
    O = w.shape[0]
    th, tw = (H + 1) // 2, (W + 1) // 2
    # xpad = x with a zero border, [N, C, 2th+2, 2tw+2], kept as its even and odd columns;
    # only the inside is written, so the reused buffers' zero borders stay
    xe = _scratch("xe", (N, C, 2 * th + 2, tw + 1), zero=True)             # xpad[..., 0::2]
    xo = _scratch("xo", (N, C, 2 * th + 2, tw + 1), zero=True)             # xpad[..., 1::2]
    xe[:, :, 1:H + 1, 1:1 + W // 2] = x[:, :, :, 1::2]
    xo[:, :, 1:H + 1, :(W + 1) // 2] = x[:, :, :, 0::2]
    V = _scratch("V", (16, C, N * th * tw))
    kern[0](xe, xo, th, tw, V)                                             # [16, C, tiles]
    M = np.matmul(_winograd_weight(w), V, out=_scratch("M", (16, O, N * th * tw)))  # [16, O, C] @ [16, C, tiles]
    out = np.empty((N, O, H, W), dtype=np.float32)
    bias = np.zeros(O, np.float32) if b is None else np.ascontiguousarray(b, dtype=np.float32)
    kern[1](M, bias, th, tw, out)
    return out
