"""Copy a GGUF with some metadata or tensors changed (gguf-py reader -> writer), for tests that
need a variant of a fixture: experts requantized, a tensor dropped, a bad key."""
from __future__ import annotations

import numpy as np
import gguf


def rewrite_gguf(src, dst, *, tensors=None, metadata=None, arch=None):
    """tensors(name, qtype, data) -> None (drop) | (array, raw_dtype or None); metadata: {key: value}
    to set (typed like an existing key, else by gguf-py's inference) or None to delete."""
    r = gguf.GGUFReader(str(src))
    arch = arch or str(r.fields["general.architecture"].contents())
    w = gguf.GGUFWriter(str(dst), arch)
    metadata = dict(metadata or {})
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vtype = gguf.GGUFValueType(field.types[0])
        sub = gguf.GGUFValueType(field.types[-1]) if vtype == gguf.GGUFValueType.ARRAY else None
        if name in metadata:
            value = metadata.pop(name)
            if value is None:
                continue
        else:
            value = field.contents()
        w.add_key_value(name, value, vtype, sub_type=sub)
    for name, value in metadata.items():
        if value is not None:
            vtype = gguf.GGUFValueType.get_type(value)
            w.add_key_value(name, value, vtype)
    for t in r.tensors:
        qtype = gguf.GGMLQuantizationType(t.tensor_type)
        data = np.array(t.data)
        out = (data, qtype) if tensors is None else tensors(t.name, qtype, data)
        if out is None:
            continue
        arr, raw = out
        if raw in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            w.add_tensor(t.name, arr)
        else:
            w.add_tensor(t.name, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst
