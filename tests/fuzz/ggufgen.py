"""GGUF bytes built by hand, for fuzzing: every count, length, type and offset is ours to forge.

    entries = [("general.architecture", STRING, "llama"), ("x.tokens", (ARRAY, STRING), [b"a", b"b"])]
    data = build(entries, [("w", np.ones((2, 32), np.float32))])     # a valid file
    data = build(entries, tensors, n_tensors=2**40)                   # the same, with a forged count
"""
from __future__ import annotations

import struct

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

V = GGUFValueType
FMT = {V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
       V.FLOAT32: "<f", V.BOOL: "<?", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d"}


def string(s) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else bytes(s)
    return struct.pack("<Q", len(b)) + b


def value(vtype, v) -> bytes:
    """vtype: a GGUFValueType, or (ARRAY, item type) / (ARRAY, (ARRAY, item type)) for arrays."""
    if isinstance(vtype, tuple):
        _, item = vtype
        code = item[0] if isinstance(item, tuple) else item
        return struct.pack("<IQ", int(code), len(v)) + b"".join(value(item, x) for x in v)
    if vtype == V.STRING:
        return string(v)
    return struct.pack(FMT[vtype], v)


def entry(key, vtype, v) -> bytes:
    code = vtype[0] if isinstance(vtype, tuple) else vtype
    return string(key) + struct.pack("<I", int(code)) + value(vtype, v)


def tensor_info(name, shape, qtype, offset) -> bytes:
    dims = list(reversed(shape))          # GGUF stores ggml order (innermost first)
    return string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + \
        struct.pack("<IQ", int(qtype), offset)


def build(entries, tensors=(), *, alignment: int = 32, version: int = 3, n_tensors=None, n_kv=None) -> bytes:
    """entries [(key, vtype, value)], tensors [(name, float32 array)] -> the bytes of a GGUF file."""
    blobs, infos, off = [], [], 0
    for name, a in tensors:
        a = np.ascontiguousarray(a, np.float32)
        infos.append(tensor_info(name, a.shape, GGMLQuantizationType.F32, off))
        pad = -a.nbytes % alignment
        blobs.append(a.tobytes() + b"\0" * pad)
        off += a.nbytes + pad
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                 len(entries) if n_kv is None else n_kv)
    head += b"".join(entry(*e) for e in entries) + b"".join(infos)
    head += b"\0" * (-len(head) % alignment)
    return head + b"".join(blobs)


def entries_of(path) -> tuple[list, list]:
    """A real file's (entries, tensors) through gguf-py, to mutate and build() again (F32 tensors only)."""
    r = GGUFReader(str(path))
    entries = []
    for name, f in r.fields.items():
        if name.startswith("GGUF."):
            continue
        t = V(f.types[0])
        vt = (V.ARRAY, V(f.types[1])) if t == V.ARRAY else t
        v = f.contents()
        if vt == (V.ARRAY, V.STRING):
            v = [s.encode("utf-8") for s in v]
        entries.append((name, vt, v))
    tensors = [(t.name, np.array(t.data, np.float32).reshape(tuple(int(d) for d in reversed(t.shape))))
               for t in r.tensors]
    return entries, tensors
