"""GGUF file -> metadata dict, config dataclass, and zero-copy tensor views.

The `gguf` package defines the format's constants (value types, quant types, block sizes)
and is the reference our reader is tested against. We parse the header ourselves because
`gguf.GGUFReader` builds one NumPy array per vocabulary entry: 25-60 s for SmolLM2's 49k or
Gemma's 262k tokens on a small CPU, against well under a second here. Tensor data is a
`np.memmap` view: nothing is read until a kernel touches it.

    f = GGUFFile(path)                 # header only; raises GGUFError on a bad/truncated file
    f.metadata["llama.block_count"]    # plain Python values; numeric arrays as NumPy arrays,
                                       # string arrays (token texts) as lists of bytes
    t = f.tensors["blk.0.attn_q.weight"]   # TensorInfo(name, shape (out, in), qtype, offset, nbytes)
    raw = f.raw(t)                     # uint8 memmap [rows, row_bytes] (or typed for F32/F16)
"""
from __future__ import annotations

import math
import mmap
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from .ggml_types import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4            # ggml tensors have at most 4 dimensions
MAX_NESTING = 4         # arrays of arrays: deeper nesting is refused (no real file nests at all)


class GGUFError(ValueError):
    """A file that is not GGUF, is truncated, or holds something we cannot run (one line)."""


_SCALAR = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_NUMPY = {k: np.dtype(v) for k, v in _SCALAR.items()}
_U64 = struct.Struct("<Q")   # a string's length prefix
# the fewest bytes one value of a type takes: a claimed count is checked against the bytes left
# before anything is allocated (a header that claims 2^40 entries fails at once, not after a long loop)
_MIN_BYTES = {**{k: d.itemsize for k, d in _NUMPY.items()}, GGUFValueType.STRING: 8, GGUFValueType.ARRAY: 12}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple        # torch order: (rows, cols) = (out, in) for matrices; GGUF stores it reversed
    qtype: GGMLQuantizationType
    offset: int         # absolute byte offset of the data in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class _Cursor:
    """Little-endian reads over a bytes-like buffer, with truncation reported as GGUFError."""

    def __init__(self, buf, path: str):
        self.buf, self.pos, self.path = buf, 0, path

    def need(self, n: int, what: str):
        if self.pos + n > len(self.buf):
            raise GGUFError(f"truncated GGUF {self.path}: {what} runs past the end of the file "
                            f"({len(self.buf)} bytes)")

    def count(self, n: int, each: int, what: str):
        """A claimed number of entries of at least `each` bytes: must fit in the bytes left."""
        left = len(self.buf) - self.pos
        if n * each > left:
            raise GGUFError(f"bad GGUF {self.path}: {what} claims {n} entries, more than the {left} bytes "
                            f"left in the file can hold")

    def scalar(self, fmt: str, what: str = "header"):
        n = struct.calcsize(fmt)
        self.need(n, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def string(self, what: str = "string") -> str:
        n = self.scalar("<Q", what)
        self.need(n, what)
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int, key: str, depth: int = 0):
        if vtype == GGUFValueType.STRING:
            return self.string(f"the string {key!r}")
        if vtype == GGUFValueType.ARRAY:
            itype = self.scalar("<I", key)
            count = self.scalar("<Q", key)
            if itype not in _MIN_BYTES:
                raise GGUFError(f"bad GGUF {self.path}: unknown value type {itype} in the array {key!r}")
            if itype == GGUFValueType.ARRAY and depth >= MAX_NESTING:
                raise GGUFError(f"bad GGUF {self.path}: arrays nested more than {MAX_NESTING} deep in {key!r}")
            self.count(count, _MIN_BYTES[itype], f"the array {key!r}")
            if itype == GGUFValueType.STRING:
                start, buf, pos, end = self.pos, self.buf, self.pos, len(self.buf)
                u64 = _U64.unpack_from
                for _ in range(count):  # the one hot loop of header parsing (~100k strings): keep it tight
                    if pos + 8 > end:
                        self.pos = pos
                        self.need(8, key)
                    n, = u64(buf, pos)
                    pos += 8 + n
                    if pos > end:
                        self.pos = pos - n
                        self.need(n, key)
                self.pos = pos
                strings = StringArray(count, start, pos)
                if count <= LAZY_STRINGS:
                    strings.read(buf)
                return strings
            if itype in _NUMPY:
                dt = _NUMPY[itype]
                self.need(dt.itemsize * count, key)
                arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos)
                self.pos += dt.itemsize * count
                return arr
            return [self.value(itype, key, depth + 1) for _ in range(count)]
        if vtype in _SCALAR:
            return self.scalar(_SCALAR[vtype], key)
        raise GGUFError(f"bad GGUF {self.path}: unknown value type {vtype} for key {key!r}")


LAZY_STRINGS = 1024   # string arrays longer than this are read from the file when first used


class StringArray(Sequence):
    """A GGUF array of strings (bytes: token texts need not be valid UTF-8), read from the file's map
    when first used: a model's 50-260k token texts and merges are ~5-30 MB of Python objects that
    an engine whose tokenizer comes from its cache never reads. len() is known without reading.
    Compares equal to a list of the same bytes; pickles as that list."""

    def __init__(self, count: int, start: int, stop: int):
        self._count, self._start, self._stop = count, start, stop
        self._items: list[bytes] | None = None
        self._source = None      # the file's map, once the header is parsed

    def read(self, buf) -> list[bytes]:
        """The strings, split out of buf (the header map while parsing, else the file's map)."""
        if self._items is None:
            out, pos, u64 = [], self._start, _U64.unpack_from
            for _ in range(self._count):
                n, = u64(buf, pos)
                pos += 8
                out.append(bytes(buf[pos:pos + n]))
                pos += n
            self._items, self._source = out, None
        return self._items

    def _list(self) -> list[bytes]:
        if self._items is None:
            return self.read(memoryview(self._source))
        return self._items

    def __len__(self):
        return self._count

    def __getitem__(self, i):
        return self._list()[i]

    def __iter__(self):
        return iter(self._list())

    def __eq__(self, other):
        if isinstance(other, StringArray):
            other = other._list()
        return self._list() == other if isinstance(other, list) else NotImplemented

    __hash__ = None

    def __repr__(self):
        return f"StringArray({self._count} strings)" if self._items is None else repr(self._items)

    def __reduce__(self):
        return list, (self._list(),)


def _owned(v, source):
    """A metadata value with its NumPy arrays copied out of the header map (arrays of arrays too)
    and its unread string arrays pointed at the file's map."""
    if isinstance(v, np.ndarray):
        return v.copy()
    if isinstance(v, StringArray):
        if v._items is None:
            v._source = source
        return v
    if isinstance(v, list) and v and isinstance(v[0], (np.ndarray, list, StringArray)):
        return [_owned(x, source) for x in v]
    return v


class GGUFFile:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"no such GGUF file: {self.path}")
        if self.path.is_dir():
            raise GGUFError(f"{self.path} is a folder, not a GGUF file")
        size = self.path.stat().st_size
        if size < 24:
            raise GGUFError(f"{self.path} is not a GGUF file ({size} bytes, too short for a header)")
        self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        with open(self.path, "rb") as fh:  # header parsing: mmap slices are plain bytes (fast)
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._parse(buf, size)
        finally:
            try:
                buf.close()
            except BufferError:       # a metadata view still points into the map (an error path): the GC closes it
                pass

    def _parse(self, buf, size: int):
        if bytes(buf[:4]) != GGUF_MAGIC:
            raise GGUFError(f"{self.path} is not a GGUF file (magic {bytes(buf[:4])!r}, expected b'GGUF')")
        c = _Cursor(buf, str(self.path))
        c.pos = 4
        self.version = c.scalar("<I")
        if self.version not in (2, 3):
            raise GGUFError(f"{self.path}: GGUF version {self.version} is not supported (2 or 3)")
        n_tensors, n_kv = c.scalar("<Q"), c.scalar("<Q")
        # every key takes >= 13 bytes (name length, type, one byte of value), every tensor >= 24
        if n_kv * 13 + n_tensors * 24 > size - c.pos:
            raise GGUFError(f"bad GGUF {self.path}: the header claims {n_tensors} tensors and {n_kv} keys, "
                            f"more than a {size}-byte file can hold")
        self.metadata: dict = {}
        for _ in range(n_kv):
            key = c.string("metadata key")
            vtype = c.scalar("<I", key)
            if key in self.metadata:
                raise GGUFError(f"bad GGUF {self.path}: metadata key {key!r} appears twice")
            self.metadata[key] = c.value(vtype, key)
        infos = []
        for _ in range(n_tensors):
            name = c.string("tensor name")
            n_dims = c.scalar("<I", name)
            if n_dims > MAX_DIMS:
                raise GGUFError(f"bad GGUF {self.path}: tensor {name!r} has {n_dims} dimensions (at most {MAX_DIMS})")
            dims = [c.scalar("<Q", name) for _ in range(n_dims)]
            qtype = c.scalar("<I", name)
            offset = c.scalar("<Q", name)
            infos.append((name, dims, qtype, offset))
        align = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if (not isinstance(align, (int, np.integer)) or isinstance(align, bool)   # a string array, a float, ...
                or not 0 < align <= 1 << 20 or align & (align - 1)):
            raise GGUFError(f"bad GGUF {self.path}: general.alignment = {align!r:.40} is not a power of two "
                            f"up to 1 MiB")
        align = int(align)
        data_start = (c.pos + align - 1) // align * align
        self.tensors: dict[str, TensorInfo] = {}
        spans = []
        for name, dims, qtype, offset in infos:
            if name in self.tensors:
                raise GGUFError(f"bad GGUF {self.path}: tensor {name!r} appears twice")
            try:
                qt = GGMLQuantizationType(qtype)
                block, type_size = GGML_QUANT_SIZES[qt]
            except (ValueError, KeyError):
                raise GGUFError(f"{self.path}: tensor {name!r} has unknown quant type {qtype}") from None
            shape = tuple(int(d) for d in reversed(dims))
            n = math.prod(dims)       # Python ints: a forged 2^63 dimension cannot overflow into a small size
            if n == 0:
                raise GGUFError(f"bad GGUF {self.path}: tensor {name!r} has an empty dimension {dims}")
            if dims and dims[0] % block:
                raise GGUFError(f"{self.path}: tensor {name!r} row of {dims[0]} is not a multiple of the {qt.name} block ({block})")
            if offset % align:
                raise GGUFError(f"bad GGUF {self.path}: tensor {name!r} data offset {offset} is not a multiple "
                                f"of the alignment ({align})")
            nbytes = n // block * type_size
            start = data_start + offset
            if start + nbytes > size:
                raise GGUFError(f"truncated GGUF {self.path}: tensor {name!r} needs bytes up to {start + nbytes}, "
                                f"the file has {size}")
            self.tensors[name] = TensorInfo(name, shape, qt, start, nbytes)
            spans.append((start, nbytes, name))
        spans.sort()
        for (a, na, an), (b, nb, bn) in zip(spans, spans[1:]):
            if na and nb and b < a + na:
                raise GGUFError(f"bad GGUF {self.path}: tensors {an!r} and {bn!r} overlap "
                                f"(bytes {a}..{a + na} and {b}..{b + nb})")
        # metadata arrays were views into the header map: copy the numeric ones out before it closes
        for k, v in self.metadata.items():
            self.metadata[k] = _owned(v, self._mm)

    @property
    def arch(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def get(self, key: str, default=None):
        """`key` with the architecture prefix filled in: get("{arch}.block_count")."""
        return self.metadata.get(key.format(arch=self.arch), default)

    def raw(self, t: TensorInfo | str) -> np.ndarray:
        """Zero-copy view of a tensor's bytes: typed [shape] for F32/F16, uint8 [rows, row_bytes] otherwise."""
        if isinstance(t, str):
            t = self.tensors[t]
        data = self._mm[t.offset:t.offset + t.nbytes]
        if t.qtype == GGMLQuantizationType.F32:
            return data.view(np.float32).reshape(t.shape)
        if t.qtype == GGMLQuantizationType.F16:
            return data.view(np.float16).reshape(t.shape)
        rows = int(np.prod(t.shape[:-1], dtype=np.int64)) if len(t.shape) > 1 else 1
        return data.reshape(rows, -1)


# ------------------------------------------------------------------------- config

@dataclass
class LLMConfig:
    arch: str                      # GGUF architecture: llama | qwen2 | qwen3 | gemma3 | qwen3moe | gpt-oss
    n_vocab: int                   # vocabulary size
    n_embd: int                    # hidden width
    n_layer: int                   # transformer blocks
    n_head: int                    # query heads
    n_head_kv: int                 # key/value heads (GQA groups = n_head // n_head_kv)
    head_dim: int                  # size of one head (q/k); v uses the same here
    n_ff: int                      # feed-forward width (dense layers)
    n_ctx_train: int               # trained context length
    rms_eps: float                 # RMSNorm epsilon
    rope_theta: float              # RoPE base (global layers)
    rope_dim: int                  # rotated dims per head (partial rotary when < head_dim)
    rope_neox: bool                # half-split layout (qwen, gemma) vs adjacent pairs (llama)
    rope_theta_local: float = 0.0  # gemma3 sliding-window layers use their own base
    rope_freq_scale: float = 1.0   # linear RoPE scaling (positions / factor); YaRN's 1 / factor
    rope_yarn: object = None       # kernels.rope.YaRN when the file asks for YaRN scaling
    sliding_window: int = 0        # 0 = none
    swa_pattern: int = 0           # every swa_pattern-th layer is global, the rest slide
    qk_norm: bool = False          # qwen3, gemma3: RMSNorm on q and k per head
    post_norms: bool = False       # gemma3: norms after attention and after the FFN
    embed_scale: float = 1.0       # gemma: embeddings * sqrt(n_embd)
    attn_scale: float = 0.0        # 0 = 1/sqrt(head_dim)
    act: str = "silu"              # silu (SwiGLU) | gelu_tanh (GeGLU) | swiglu_oai (gpt-oss experts)
    qkv_bias: bool = False         # qwen2, gpt-oss
    attn_sinks: bool = False       # gpt-oss: a learned logit per head in the softmax denominator
    tied_embeddings: bool = False  # no output.weight: logits use token_embd
    n_expert: int = 0              # MoE: experts per layer (0 = dense FFN)
    n_expert_used: int = 0         # MoE: experts each token runs (top-k)
    n_ff_exp: int = 0              # MoE: one expert's feed-forward width
    expert_gating: str = "softmax"  # MoE router: softmax | softmax_weight | sigmoid (llm.moe.GATINGS)
    expert_weights_norm: bool = False  # MoE: top-k weights renormalised to sum to 1
    expert_weights_scale: float = 1.0  # MoE: top-k weights multiplied by this
    spec: object = None            # llm.archs.ArchSpec of `arch` (filled in from ARCHS when None)

    def __post_init__(self):
        for k in ("n_vocab", "n_embd", "n_layer", "n_head", "n_head_kv", "head_dim", "n_ctx_train"):
            if not 0 < getattr(self, k) < 1 << 31:
                raise GGUFError(f"{self.arch} model: {k} = {getattr(self, k)} is out of range")
        if not 0 < self.rope_dim <= self.head_dim or self.rope_dim % 2:
            raise GGUFError(f"{self.arch} model: rope_dim = {self.rope_dim} must be even and in 1..head_dim ({self.head_dim})")
        if not all(map(math.isfinite, (self.rms_eps, self.rope_theta, self.rope_freq_scale))) or self.rope_theta <= 0 \
                or self.rms_eps < 0:
            raise GGUFError(f"{self.arch} model: rms_eps, rope_theta or the RoPE scale is not a finite positive number")
        if self.attn_scale == 0.0:
            self.attn_scale = self.head_dim ** -0.5
        if self.n_head % self.n_head_kv:
            raise GGUFError(f"{self.n_head} query heads are not a multiple of {self.n_head_kv} KV heads")
        if self.spec is None:
            from .llm.archs import ARCHS, ArchSpec
            self.spec = ARCHS.get(self.arch, ArchSpec(self.arch))

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0

    def is_sliding(self, layer: int) -> bool:
        return bool(self.sliding_window) and bool(self.swa_pattern) and (layer + 1) % self.swa_pattern != 0

    def _param_counts(self):
        """(attention + norms per layer, one expert or the dense FFN, router per layer, embeddings)."""
        attn = self.n_embd * self.head_dim * (2 * self.n_head + 2 * self.n_head_kv)
        ffn = 3 * self.n_embd * (self.n_ff_exp if self.is_moe else self.n_ff)
        router = self.n_embd * self.n_expert
        emb = self.n_vocab * self.n_embd * (1 if self.tied_embeddings else 2)
        return attn, ffn, router, emb

    @property
    def n_params(self) -> int:
        attn, ffn, router, emb = self._param_counts()
        return self.n_layer * (attn + ffn * max(1, self.n_expert) + router) + emb

    @property
    def n_active_params(self) -> int:
        """Parameters one token multiplies by (MoE: only its top-k experts; dense: all)."""
        attn, ffn, router, emb = self._param_counts()
        return self.n_layer * (attn + ffn * max(1, self.n_expert_used) + router) + emb


SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "gemma3", "qwen3moe", "gpt-oss")
GATING_FUNCS = {1: "softmax", 2: "sigmoid", 3: "softmax_weight"}   # {arch}.expert_gating_func (llama.cpp's enum)


def config_from_gguf(f: GGUFFile) -> LLMConfig:
    """The LLMConfig a GGUF describes; GGUFError (one line) for metadata of the wrong type or out of
    range, and for attention/embedding tensors whose shapes disagree with it."""
    try:
        c = _config_from_gguf(f)
    except GGUFError:
        raise
    except (TypeError, ValueError, ZeroDivisionError, OverflowError, KeyError) as e:
        raise GGUFError(f"{f.path.name}: bad model metadata ({type(e).__name__}: {str(e)[:120]})") from None
    _check_shapes(f, c)
    return c


def _check_shapes(f: GGUFFile, c: LLMConfig) -> None:
    """The sizes the engine allocates by (KV cache, activations) must match the tensors in the file,
    so a forged head count cannot ask for more memory than the weights justify."""
    if f"blk.{c.n_layer - 1}.attn_norm.weight" not in f.tensors:
        raise GGUFError(f"{f.path.name}: block_count = {c.n_layer}, but there is no tensor "
                        f"'blk.{c.n_layer - 1}.attn_norm.weight'")
    want = {"token_embd.weight": (c.n_vocab, c.n_embd), "output.weight": (c.n_vocab, c.n_embd),
            "output_norm.weight": (c.n_embd,)}
    for i in range(c.n_layer):
        p = f"blk.{i}."
        want.update({p + "attn_q.weight": (c.n_head * c.head_dim, c.n_embd),
                     p + "attn_k.weight": (c.n_head_kv * c.head_dim, c.n_embd),
                     p + "attn_v.weight": (c.n_head_kv * c.head_dim, c.n_embd),
                     p + "attn_output.weight": (c.n_embd, c.n_head * c.head_dim),
                     p + "attn_norm.weight": (c.n_embd,)})
        if not c.is_moe:
            want.update({p + "ffn_gate.weight": (c.n_ff, c.n_embd), p + "ffn_up.weight": (c.n_ff, c.n_embd),
                         p + "ffn_down.weight": (c.n_embd, c.n_ff)})
    for name, shape in want.items():
        t = f.tensors.get(name)
        if t is not None and tuple(t.shape) != shape:
            raise GGUFError(f"{f.path.name}: tensor {name!r} has shape {tuple(t.shape)}, the metadata says {shape}")


def _config_from_gguf(f: GGUFFile) -> LLMConfig:
    from .kernels.rope import YaRN
    from .llm.archs import ARCHS
    arch = f.arch
    if arch not in ARCHS:
        raise GGUFError(f"{f.path.name}: unknown architecture {arch!r} (supported: {', '.join(ARCHS)})")
    spec = ARCHS[arch]

    def need(key):
        v = f.get(key)
        if v is None:
            raise GGUFError(f"{f.path.name}: missing metadata {key.format(arch=arch)!r}")
        return v

    n_embd, n_head = int(need("{arch}.embedding_length")), int(need("{arch}.attention.head_count"))
    head_dim = int(f.get("{arch}.attention.key_length", n_embd // n_head))
    tokens = f.metadata.get("tokenizer.ggml.tokens")
    n_vocab = int(f.get("{arch}.vocab_size", len(tokens) if tokens is not None else f.tensors["token_embd.weight"].shape[0]))
    scaling = f.get("{arch}.rope.scaling.type", "none") or "none"
    factor = float(f.get("{arch}.rope.scaling.factor", 1.0) or 1.0)
    n_ctx_train = int(f.get("{arch}.context_length", 2048))
    if scaling not in ("none", "linear", "yarn"):
        raise GGUFError(f"{f.path.name}: RoPE scaling {scaling!r} is not supported (none, linear, yarn)")
    yarn = None
    if scaling == "yarn" and factor != 1.0:
        yarn = YaRN(orig_ctx=int(f.get("{arch}.rope.scaling.original_context_length", n_ctx_train)),
                    beta_fast=float(f.get("{arch}.rope.scaling.yarn_beta_fast", 32.0)),
                    beta_slow=float(f.get("{arch}.rope.scaling.yarn_beta_slow", 1.0)),
                    attn_factor=float(f.get("{arch}.rope.scaling.yarn_attn_factor", f.get("{arch}.rope.scaling.attn_factor", 0.0)) or 0.0),
                    ext_factor=float(f.get("{arch}.rope.scaling.yarn_ext_factor", 1.0)),
                    truncate=spec.yarn_truncate)
    cfg = dict(
        arch=arch, spec=spec, n_vocab=n_vocab, n_embd=n_embd, n_layer=int(need("{arch}.block_count")),
        n_head=n_head, n_head_kv=int(f.get("{arch}.attention.head_count_kv", n_head)), head_dim=head_dim,
        n_ff=int(f.get("{arch}.feed_forward_length", 0) if spec.ffn == "moe" else need("{arch}.feed_forward_length")),
        n_ctx_train=n_ctx_train,
        rms_eps=float(f.get("{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(f.get("{arch}.rope.freq_base", 10000.0)),
        rope_dim=int(f.get("{arch}.rope.dimension_count", head_dim)),
        rope_neox=spec.rope_neox,
        rope_freq_scale=1.0 / factor if scaling in ("linear", "yarn") else 1.0,
        rope_yarn=yarn,
        rope_theta_local=spec.rope_theta_local,
        qk_norm=spec.qk_norm, post_norms=spec.post_norms, act=spec.act, attn_sinks=spec.sinks,
        embed_scale=float(np.sqrt(np.float32(n_embd))) if spec.embed_scale_sqrt else 1.0,
        qkv_bias="blk.0.attn_q.bias" in f.tensors,
        tied_embeddings="output.weight" not in f.tensors,
    )
    if spec.sliding:
        cfg.update(sliding_window=int(f.get("{arch}.attention.sliding_window", 0)), swa_pattern=spec.swa_pattern)
    if spec.ffn == "moe":
        cfg.update(_moe_config(f, spec))
    return LLMConfig(**cfg)


def _moe_config(f: GGUFFile, spec) -> dict:
    """Expert counts and routing of an MoE architecture, checked (one line per problem)."""
    name = f.path.name
    n_expert, n_used = f.get("{arch}.expert_count"), f.get("{arch}.expert_used_count")
    if n_expert is None or n_used is None:
        missing = f"{f.arch}.expert_count" if n_expert is None else f"{f.arch}.expert_used_count"
        raise GGUFError(f"{name}: missing metadata {missing!r} for a {f.arch} (mixture-of-experts) model")
    n_expert, n_used = int(n_expert), int(n_used)
    if not 0 < n_used <= n_expert:
        raise GGUFError(f"{name}: {f.arch}.expert_used_count = {n_used} must be between 1 and "
                        f"{f.arch}.expert_count = {n_expert}")
    gating = spec.gating
    code = f.get("{arch}.expert_gating_func")
    if code is not None:
        gating = GATING_FUNCS.get(int(code))
        if gating is None:
            known = ", ".join(f"{k} ({v})" for k, v in GATING_FUNCS.items())
            raise GGUFError(f"{name}: unknown expert gating function {f.arch}.expert_gating_func = {int(code)} "
                            f"(spark_lab knows {known})")
    n_ff_exp = f.get("{arch}.expert_feed_forward_length")
    if n_ff_exp is None:
        t = f.tensors.get("blk.0.ffn_gate_exps.weight")
        if t is None:
            raise GGUFError(f"{name}: missing metadata {f.arch + '.expert_feed_forward_length'!r}")
        n_ff_exp = t.shape[1]
    scale = float(f.get("{arch}.expert_weights_scale", 0.0) or 0.0)
    return dict(n_expert=n_expert, n_expert_used=n_used, n_ff_exp=int(n_ff_exp), expert_gating=gating,
                expert_weights_norm=bool(f.get("{arch}.expert_weights_norm", spec.expert_weights_norm)),
                expert_weights_scale=scale or 1.0)


def read_shape(name_or_path):
    """A planner ModelShape from GGUF metadata alone (no weights read)."""
    from .models import resolve
    from .planner import ModelShape
    f = GGUFFile(resolve(name_or_path, "llm"))
    c = config_from_gguf(f)
    w = sum(t.nbytes for t in f.tensors.values())
    return ModelShape(name=str(name_or_path), params=float(sum(t.n_elements for t in f.tensors.values())),
                      bits_per_weight=8.0 * w / max(1, sum(t.n_elements for t in f.tensors.values())),
                      layers=c.n_layer, kv_heads=c.n_head_kv, head_dim=c.head_dim, hidden=c.n_embd,
                      vocab=c.n_vocab, n_heads=c.n_head, context_max=c.n_ctx_train, weight_bytes=w)
