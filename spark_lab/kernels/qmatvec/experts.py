"""The expert gather of a mixture-of-experts layer: a token's mat-vecs against only the k experts
its router picked, out of a stack of n_expert weights of one type and shape (a GGUF's 3-D
`ffn_{gate,up,down}_exps` tensor).

    stack = ExpertStack(data, qtype, (n_expert, rows, cols))   # data uint8 [n_expert, rows, row_bytes]
    y = moe_matvec(x, stack, expert_ids)                       # x [cols] or [k, cols] -> [k, rows]

Each expert is a `QuantTensor` view of its slice of the stack, repacked for the fused kernels
the first time the router picks it (and its raw pages then dropped, as `prepare` does), so an
expert that is never picked is never read nor copied. Any type works; MXFP4 (gpt-oss) and the
other FAST_TYPES take the fused int8 kernels, so the result is `reference` semantics per expert:
dequant(W_e) @ q8(x) for INT8_TYPES.
"""
from __future__ import annotations

import numpy as np

from ...device import array_module
from ...ggml_types import GGMLQuantizationType as QT
from ...quants import BLOCK_SIZES, QuantTensor, as_qtype


class ExpertStack:
    """n_expert weights [rows, cols] of one GGML type, stacked: data uint8 [n_expert, rows, row_bytes].

    experts[e] is a QuantTensor view of expert e (zero-copy over `data`, e.g. a GGUF memmap)."""

    def __init__(self, data, qtype, shape):
        self.qtype = as_qtype(qtype)
        self.shape = tuple(int(s) for s in shape)                    # (n_expert, rows, cols)
        if len(self.shape) != 3:
            raise ValueError(f"ExpertStack shape must be (n_expert, rows, cols), got {self.shape}")
        E, rows, cols = self.shape
        bs, ts = BLOCK_SIZES[self.qtype]
        if cols % bs:
            raise ValueError(f"{self.qtype.name} expert shape {self.shape}: cols must be a multiple of its block size {bs}")
        xp = array_module(data)
        raw = xp.ascontiguousarray(data)
        raw = raw if raw.dtype == xp.uint8 else raw.view(xp.uint8)
        if raw.size != E * rows * (cols // bs * ts):
            raise ValueError(f"{self.qtype.name} expert stack of shape {self.shape} needs "
                             f"{E * rows * (cols // bs * ts)} bytes, got {raw.size}")
        self.data = raw.reshape(E, rows, cols // bs * ts)             # [E, rows, row_bytes]
        self.experts = [QuantTensor(self.data[e], self.qtype, (rows, cols)) for e in range(E)]

    @classmethod
    def from_gguf(cls, tensor) -> "ExpertStack":
        """A 3-D `gguf.ReaderTensor` (GGUF dims fastest-first: cols, rows, n_expert) -> ExpertStack."""
        cols, rows, E = (int(s) for s in tensor.shape)
        return cls(tensor.data, tensor.tensor_type, (E, rows, cols))

    @property
    def n_expert(self) -> int:
        return self.shape[0]

    def expert_nbytes(self) -> int:
        """Bytes of raw blocks one expert holds (what a token reads from it)."""
        return int(self.data[0].nbytes)

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, e) -> QuantTensor:
        return self.experts[e]


def moe_matvec(x, experts, expert_ids, out=None):
    """Rows of x through the selected experts: -> float32 [k, rows].

    x:          float32 [cols] (one input for every selected expert: gate, up) or [k, cols]
                (row j goes to expert expert_ids[j]: down, whose inputs differ per expert)
    experts:    an ExpertStack, or a sequence of QuantTensors of one type and shape [rows, cols]
    expert_ids: k ints in [0, n_expert), the router's picks for this token
    out:        optional float32 C-contiguous [k, rows]

    out[j] = qmatvec(x or x[j], experts[expert_ids[j]]): the fused kernel of the type, which
    reads only the selected experts' weights (NumPy arrays; CuPy stacks: `cuda_kernels.moe_matvec_mxfp4`).
    """
    from . import qmatvec                                              # the package's entry point
    x, picked, rows = _pick(x, experts, expert_ids)
    k = len(picked)
    if out is None:
        out = np.empty((k, rows), np.float32)
    elif out.shape != (k, rows) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"moe_matvec: out must be float32 C-contiguous of shape {(k, rows)}, got {out.dtype} {tuple(out.shape)}")
    if _fused(x, picked, out):
        return out
    for j, w in enumerate(picked):
        qmatvec(x if x.ndim == 1 else x[j], w, out=out[j])            # [cols] -> [rows], only expert e read
    return out


def moe_matvec_pair(x, first, second, expert_ids):
    """One x [cols] through the same picked experts of two stacks (gate and up) -> ([k, rows],
    [k, rows']), each moe_matvec(x, stack, expert_ids) bit for bit; one kernel call for both where
    the fused MXFP4 kernel applies (a token's gate and up: 2k mat-vecs shared by the threads)."""
    x, pa, rows = _pick(x, first, expert_ids)
    _, pb, rows_b = _pick(x, second, expert_ids)
    if x.ndim == 1 and rows == rows_b and pa[0].shape == pb[0].shape and pa[0].qtype == pb[0].qtype:
        out = np.empty((2 * len(pa), rows), np.float32)
        if _fused(x, pa + pb, out):
            return out[:len(pa)], out[len(pa):]
    return moe_matvec(x, first, expert_ids), moe_matvec(x, second, expert_ids)


def _pick(x, experts, expert_ids):
    """Checked arguments of moe_matvec -> (x as float32, the picked experts, their rows)."""
    ids = np.asarray(expert_ids).reshape(-1)
    E = len(experts)
    if ids.size == 0 or not np.issubdtype(ids.dtype, np.integer) or int(ids.min()) < 0 or int(ids.max()) >= E:
        raise ValueError(f"moe_matvec: expert ids must be integers in [0, {E}), got {ids.tolist()}")
    first = experts[int(ids[0])]
    rows, cols = first.shape
    k = int(ids.size)
    x = np.asarray(x, np.float32)
    if x.shape not in ((cols,), (k, cols)):
        raise ValueError(f"moe_matvec: x of shape {tuple(x.shape)} does not match {k} experts of shape "
                         f"{first.shape} (needs [{cols}] or [{k}, {cols}])")
    picked = [experts[e] for e in ids.tolist()]
    for e, w in zip(ids.tolist(), picked):
        if w.shape != first.shape or w.qtype != first.qtype:
            raise ValueError(f"moe_matvec: expert {e} is {w.qtype.name} {w.shape}, expert {int(ids[0])} "
                             f"{first.qtype.name} {first.shape}: one stack holds one type and shape")
    return x, picked, rows


def _fused(x, picked, out) -> bool:
    """MXFP4 experts (gpt-oss): all k mat-vecs in one parallel kernel call, x quantized once. One call
    per expert ran 4.4 MB each (gpt-oss-20b), too short for two threads to stream at full rate. Rows
    are those of qmatvec per expert, bit for bit. False where it does not apply (then one call each)."""
    from . import _jit, _numba_error, prepare                         # the package imports this module
    k = _jit()
    if not k or k.get("mxfp4_experts") is None or picked[0].qtype != QT.MXFP4 or type(x) is not np.ndarray \
            or any(array_module(w.data) is not np for w in picked):
        return False
    packs = [w.packed or prepare(w) for w in picked]
    if any(p is None or p.kind != "mxfp4" for p in packs) or len({p.arrays[0].shape for p in packs}) != 1:
        return False
    x2 = np.ascontiguousarray(x.reshape(-1, x.shape[-1]))
    try:
        k["mxfp4_experts"](tuple(p.arrays[0] for p in packs), tuple(p.arrays[1] for p in packs), x2, out)
    except _numba_error():                                             # e.g. a numba without tuple indexing
        k["mxfp4_experts"] = None
        return False
    return True
