"""Reading diffusers / transformers folders: config.json + safetensors -> float32 arrays.

A model folder holds `config.json` and its weights under one of two stems,
`diffusion_pytorch_model` (diffusers) or `model` (transformers, e.g. CLIPTextModel, T5), as
    {stem}.safetensors                          one file, float32 or whatever it was saved in
    {stem}.{variant}.safetensors                a variant: "fp16", "bf16", ... (only the file name differs)
    {stem}.safetensors.index.json               sharded (FLUX.1-dev, SD3.5-large, T5-XXL): a
        + {stem}-00001-of-0000N.safetensors     weight_map {tensor name: shard file}
    {stem}.safetensors.index.{variant}.json     a sharded variant, as save_pretrained(variant=...)
        + {stem}.{variant}-00001-of-0000N.safetensors   writes it
Every tensor is cast to float32 and placed through the allocator (tag "weights"), one memory-mapped
shard at a time. `Params` is a flat name -> array dict with `sub(prefix)` views, so model code reads
`p["conv1.weight"]` inside `down_blocks.0.resnets.1` without spelling the whole key.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from ..memory import get_allocator

WEIGHT_NAMES = ("diffusion_pytorch_model", "model")


def read_json(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"missing config file: {p}")
    try:
        out = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{p} is not valid JSON: {e}") from None
    if not isinstance(out, dict):
        raise ValueError(f"{p} holds a JSON {type(out).__name__}, not an object of settings")
    return out


def _candidates(folder: Path, stem: str, variant: str | None) -> list[Path]:
    """The files that hold `stem`'s weights in `variant` (None: the plain ones), single file first.
    `{stem}.{variant}.safetensors.index.json` is an older spelling of the sharded variant's index."""
    if variant is None:
        return [folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"]
    return [folder / f"{stem}.{variant}.safetensors", folder / f"{stem}.safetensors.index.{variant}.json",
            folder / f"{stem}.{variant}.safetensors.index.json"]


def _variants(folder: Path, stem: str) -> set:
    """The variants that `stem` has weights in: "fp16" from {stem}.fp16.safetensors or an fp16 index
    (shards, {stem}.fp16-00001-of-00002.safetensors, count only through their index)."""
    s = re.escape(stem)
    pats = [rf"{s}\.([^.]+)\.safetensors", rf"{s}\.safetensors\.index\.([^.]+)\.json",
            rf"{s}\.([^.]+)\.safetensors\.index\.json"]
    out = set()
    for f in folder.iterdir():
        for pat in pats if f.is_file() else ():
            m = re.fullmatch(pat, f.name)
            if m and not re.search(r"-\d+-of-\d+$", m.group(1)):
                out.add(m.group(1))
    return out


def find_weights(folder: str | Path, variant: str | None = None) -> Path:
    """The weights of a model folder: a .safetensors file, or the .safetensors.index[.variant].json
    of a sharded checkpoint (`weight_files` lists its shards). The `variant` asked for first, then the
    plain weights, then the one variant there is (a folder saved with only variant="bf16" loads
    without naming it; everything is upcast to float32, so the variant only picks the file)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"missing model folder: {folder}")
    for stem in WEIGHT_NAMES:
        order = (_candidates(folder, stem, variant) if variant else []) + _candidates(folder, stem, None)
        for p in order:
            if p.is_file():
                return p
        others = sorted(_variants(folder, stem) - {variant})
        if len(others) > 1:
            raise ValueError(f"{folder} holds {stem} weights in variants {', '.join(others)} and no plain "
                             f"{stem}.safetensors: pass variant= to pick one")
        if others:
            return next(p for p in _candidates(folder, stem, others[0]) if p.is_file())
    shards = sorted(folder.glob("*-00001-of-*.safetensors"))
    hint = f" (shard {shards[0].name} is there, but not the .safetensors.index.json that lists the shards)" \
        if shards else ""
    raise FileNotFoundError(f"no weights in {folder}: expected {WEIGHT_NAMES[0]}[.variant].safetensors or "
                            f"{WEIGHT_NAMES[1]}[.variant].safetensors, or a sharded .safetensors.index.json{hint}")


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files behind `find_weights`' answer: [path] for one file; for an index.json
    the shard files its weight_map names, each once, in order, all checked to exist."""
    path = Path(path)
    if not path.name.endswith(".json"):
        return [path]
    wmap = read_json(path).get("weight_map")
    if not isinstance(wmap, dict) or not wmap:
        raise ValueError(f"{path} is not a safetensors index: it has no weight_map of tensor name -> shard file")
    for name, f in wmap.items():
        # a shard sits next to its index: a path ("../x", "/etc/x") is a broken or hostile index
        if not isinstance(f, str) or f in ("", ".", "..") or Path(f).name != f or "\\" in f:
            raise ValueError(f"{path}: weight_map[{name!r:.60}] is {f!r:.60}, not a shard file name in the same folder")
    files = [path.parent / f for f in dict.fromkeys(wmap.values())]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"missing weight shard {f.name} in {path.parent} (listed in {path.name})")
    return files


def iter_tensors(path: str | Path):
    """(name, NumPy view) over a safetensors file or every shard of an index.json, one memory-mapped
    shard at a time, so a caller that keeps only what it needs never holds all shards at once."""
    for f in weight_files(path):
        yield from read_safetensors(f).items()


def load_safetensors(path: str | Path, prefix_strip: str = "") -> dict:
    """A safetensors file, or a sharded checkpoint's index.json -> {name: float32 array on the device}
    (fp16/bf16 upcast)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing weight file: {path}")
    alloc = get_allocator()
    out = {}
    for name, a in iter_tensors(path):
        key = name[len(prefix_strip):] if prefix_strip and name.startswith(prefix_strip) else name
        out[key] = alloc.place(np.ascontiguousarray(a, dtype=np.float32), tag="weights", what=key)
    return out


_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_, "BF16": np.uint16}


def read_safetensors(path: Path) -> dict:
    """name -> NumPy view of a memory-mapped safetensors file (the format: u64 header size,
    a JSON header {name: {dtype, shape, data_offsets}}, then the raw little-endian data).
    bfloat16 has no NumPy dtype: its 16 bits are the top half of a float32."""
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n > size - 8:      # checked before reading: a forged 2^63 header size must not allocate
            raise ValueError(f"{path} is not a safetensors file (header of {n} bytes in a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise ValueError(f"{path} is not a safetensors file (bad header)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file (the header is not a JSON object)")
    n_data = size - 8 - n
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if n_data else np.zeros(0, np.uint8)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        info = info if isinstance(info, dict) else {}
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {dtype!r:.40}, which spark_lab cannot read")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
                and isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise ValueError(f"{path}: tensor {name!r} has a bad shape or data_offsets in the header")
        start, end = offsets
        want = math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize
        if not 0 <= start <= end <= n_data or end - start != want:
            raise ValueError(f"{path}: tensor {name!r} claims bytes {start}..{end} for {want} bytes of {dtype} "
                             f"{shape}; the data section has {n_data} (truncated or corrupt file)")
        a = data[start:end].view(_DTYPES[dtype]).reshape(shape)
        if info["dtype"] == "BF16":
            a = (a.astype(np.uint32) << 16).view(np.float32)
        out[name] = a
    return out


class Params:
    """Flat weights with a key prefix: `p.sub("mid_block")["resnets.0.conv1.weight"]`."""

    def __init__(self, tensors: dict, prefix: str = "", source: str = ""):
        self.tensors = tensors
        self.prefix = prefix
        self.source = source

    def sub(self, name) -> "Params":
        return Params(self.tensors, f"{self.prefix}{name}.", self.source)

    def __getitem__(self, key: str):
        full = self.prefix + key
        try:
            return self.tensors[full]
        except KeyError:
            raise ValueError(f"weight {full!r} is missing from {self.source or 'the weights'}") from None

    def get(self, key: str, default=None):
        return self.tensors.get(self.prefix + key, default)

    def __contains__(self, key: str) -> bool:
        return (self.prefix + key) in self.tensors

    def has_prefix(self, name: str) -> bool:
        full = f"{self.prefix}{name}."
        return any(k.startswith(full) for k in self.tensors)


def load_model_folder(folder: str | Path, variant: str | None = None, config_name: str = "config.json"):
    """folder -> (config dict, Params)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"missing model folder: {folder}")
    config = read_json(folder / config_name)
    wpath = find_weights(folder, variant)
    return config, Params(load_safetensors(wpath), source=str(wpath))


def nbytes(params: Params) -> int:
    return int(sum(int(a.nbytes) for a in params.tensors.values()))


def weight_formats(params: Params) -> dict:
    """{format: number of weight tensors} as a model holds them: a GGML type name for the quantized
    ones (QuantTensor, from a GGUF), "float32" for the rest."""
    out: dict = {}
    for t in params.tensors.values():
        k = t.qtype.name if hasattr(t, "qtype") else "float32"
        out[k] = out.get(k, 0) + 1
    return out
