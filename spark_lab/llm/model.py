"""Decoder-only transformers (llama, qwen2, qwen3, gemma3, qwen3moe, gpt-oss) as plain functions over kernels.

One `Transformer` holds the weights (placed through the allocator, quantized ones kept as
`QuantTensor`s) and a `forward(tokens, pos, cache)` that runs T tokens starting at absolute
position `pos`, writes their keys/values into the cache, and returns logits. What differs
between families (norms, biases, sinks, sliding layers, dense or MoE FFN) is the config's
`spec` (llm/archs.py), read here as data; MoE layers run through llm/moe.py.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import numpy as np
from ..ggml_types import GGMLQuantizationType as Q

from .. import kernels as K
from ..gguf import GGUFError, GGUFFile, LLMConfig
from ..memory import get_allocator
from ..device import array_module, to_host
from ..kernels.decode_attention import attention_prompt
from ..kernels.sink_attention import attention_sinks
from ..quants import QuantTensor, BLOCK_SIZES, concat_rows
from .cache import KVCache
from .moe import Experts, moe_ffn

FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)
SMALL_COPY = 1 << 20  # float tensors under this size are copied out of the file mapping at load
_AHEAD: list[threading.Thread] = []   # repack-ahead threads started by this process (ready_ahead)


def join_ready_ahead() -> None:
    """Wait until every repack-ahead thread has finished (tests: before an allocator is replaced)."""
    while _AHEAD:
        _AHEAD.pop().join()


@dataclass
class Layer:
    attn_norm: np.ndarray            # [d]
    wq: object                       # [n_head*hd, d]  float or QuantTensor
    wk: object                       # [n_kv*hd, d]
    wv: object                       # [n_kv*hd, d]
    wo: object                       # [d, n_head*hd]
    ffn_norm: np.ndarray             # [d]
    w_gate: object                   # [ff, d] (None in MoE layers)
    w_up: object                     # [ff, d]
    w_down: object                   # [d, ff]
    bq: np.ndarray | None = None     # qwen2/gpt-oss biases [n_head*hd], [n_kv*hd]
    bk: np.ndarray | None = None
    bv: np.ndarray | None = None
    bo: np.ndarray | None = None     # gpt-oss attn_output bias [d]
    sinks: np.ndarray | None = None  # gpt-oss attention sinks [n_head]
    moe: Experts | None = None       # MoE layers: router + experts (w_gate/w_up/w_down unused)
    q_norm: np.ndarray | None = None # qwen3/gemma3 per-head norms [hd]
    k_norm: np.ndarray | None = None
    post_attn_norm: np.ndarray | None = None  # gemma3 [d]
    post_ffn_norm: np.ndarray | None = None
    wqkv: object = None              # [(n_head + 2*n_kv)*hd, d]: q|k|v fused (one mat-vec per token)
    bqkv: np.ndarray | None = None
    w_gu: object = None              # [2*ff, d]: gate|up fused


def _fuse(*ws):
    """Stack weights of one kind along their rows (a copy, accounted as weights); None if mixed."""
    if any(w is None for w in ws):
        return None
    if all(isinstance(w, QuantTensor) for w in ws):
        if len({(w.qtype, w.shape[1]) for w in ws}) != 1:
            return None                 # e.g. Gemma's Q5_0 q/k beside a Q8_0 v
        fused = concat_rows(*ws)
        return QuantTensor(get_allocator().place(fused.data, tag="weights", what="fused rows"), fused.qtype, fused.shape)
    if any(isinstance(w, QuantTensor) for w in ws):
        return None
    xp = array_module(ws[0])
    return get_allocator().place(xp.concatenate(ws, axis=0), tag="weights", what="fused rows")


class Transformer:
    def __init__(self, f: GGUFFile, config: LLMConfig):
        self.config = c = config
        self.file = f
        alloc = get_allocator()

        def tensor(name: str, required: bool = True):
            t = f.tensors.get(name)
            if t is None:
                if required:
                    raise GGUFError(f"{f.path.name}: missing tensor {name!r} for a {c.arch} model")
                return None
            raw = f.raw(t)
            if t.qtype in FLOAT_TYPES:
                if t.qtype == Q.BF16:
                    raw = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(t.shape)
                elif raw.nbytes < SMALL_COPY:                 # norms: read every token; a page fault on
                    raw = np.array(raw)                       # the file would map 64 KB of neighbours
                return alloc.place(raw, tag="weights", what=name, dtype=np.float32)
            if t.qtype not in BLOCK_SIZES:
                raise GGUFError(f"{f.path.name}: tensor {name!r} uses quant type {t.qtype.name}, which spark_lab does not support")
            return QuantTensor(alloc.place(raw, tag="weights", what=name), t.qtype, t.shape)

        self._tensor = tensor
        self.tok_embd = tensor("token_embd.weight")
        self.output_norm = tensor("output_norm.weight")
        out = tensor("output.weight", required=False)
        self.output = self.tok_embd if out is None else out  # tied embeddings
        # Llama 3.1/3.2 "llama3" rope scaling: per-pair frequency divisors [rope_dim/2]
        rf = tensor("rope_freqs.weight", required=False)     # kept on the host, where rope reads it (a device
        self.rope_freqs = None if rf is None else to_host(rf)  # copy would come back for every layer on a GPU)
        spec = c.spec
        fuse = self._fusion_pays()
        self.layers = []
        for i in range(c.n_layer):
            p = f"blk.{i}."
            moe = self._experts(p) if c.is_moe else None
            self.layers.append(Layer(
                attn_norm=tensor(p + "attn_norm.weight"),
                wq=tensor(p + "attn_q.weight"), wk=tensor(p + "attn_k.weight"), wv=tensor(p + "attn_v.weight"),
                wo=tensor(p + "attn_output.weight"), ffn_norm=tensor(p + spec.ffn_norm + ".weight"),
                w_gate=None if moe else tensor(p + "ffn_gate.weight"), w_up=None if moe else tensor(p + "ffn_up.weight"),
                w_down=None if moe else tensor(p + "ffn_down.weight"),
                bq=tensor(p + "attn_q.bias", False), bk=tensor(p + "attn_k.bias", False),
                bv=tensor(p + "attn_v.bias", False), bo=tensor(p + "attn_output.bias", spec.out_bias),
                sinks=tensor(p + "attn_sinks.weight", c.attn_sinks) if c.attn_sinks else None, moe=moe,
                q_norm=tensor(p + "attn_q_norm.weight", c.qk_norm), k_norm=tensor(p + "attn_k_norm.weight", c.qk_norm),
                post_attn_norm=tensor(p + "post_attention_norm.weight", c.post_norms) if c.post_norms else None,
                post_ffn_norm=tensor(p + "post_ffw_norm.weight", c.post_norms) if c.post_norms else None,
            ))
            if fuse:
                self._fuse_layer(self.layers[-1])
        # CPU with numba: each layer is repacked the first time it runs (`_ready`), not here: loading
        # is then a file mapping (~0.2 s for 5 GB), and the first prompt's pass reads each weight
        # once, repacking it as it goes, instead of a whole pass over the file before it
        self._unready = set() if fuse else set(range(c.n_layer)) | {"output"}
        self._ready_lock = threading.Lock()
        if self._ahead_pays():
            t = threading.Thread(target=self._ready_ahead, name="spark_lab repack ahead", daemon=True)
            _AHEAD[:] = [a for a in _AHEAD if a.is_alive()] + [t]   # a server loading model after model keeps none
            t.start()

    def _experts(self, p: str) -> Experts:
        """A layer's router and experts; each expert a view of the 3-D `ffn_*_exps` tensors."""
        c, f, alloc = self.config, self.file, get_allocator()
        E, ff, d = c.n_expert, c.n_ff_exp, c.n_embd
        want = {"ffn_gate_exps": (E, ff, d), "ffn_up_exps": (E, ff, d), "ffn_down_exps": (E, d, ff)}
        stacks, views = [], {}
        for name, shape in want.items():
            t = f.tensors.get(p + name + ".weight")
            if t is None:
                raise GGUFError(f"{f.path.name}: missing expert tensor {p + name + '.weight'!r} for a {c.arch} model")
            if tuple(t.shape) != shape:
                raise GGUFError(f"{f.path.name}: expert tensor {t.name!r} has shape {t.shape}, expected {shape} "
                                f"({E} experts of [{shape[1]}, {shape[2]}])")
            raw = f.raw(t)
            rows = shape[1]
            if t.qtype in FLOAT_TYPES:
                if t.qtype == Q.BF16:
                    raw = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
                placed = alloc.place(raw.reshape(shape), tag="weights", what=t.name, dtype=np.float32)
                views[name] = [placed[e] for e in range(E)]                        # E x [rows, cols]
            else:
                if t.qtype not in BLOCK_SIZES:
                    raise GGUFError(f"{f.path.name}: tensor {t.name!r} uses quant type {t.qtype.name}, which spark_lab does not support")
                placed = alloc.place(raw, tag="weights", what=t.name)              # [E*rows, row_bytes]
                views[name] = [QuantTensor(placed[e * rows:(e + 1) * rows], t.qtype, shape[1:]) for e in range(E)]
            stacks.append(placed if t.qtype in FLOAT_TYPES else placed.reshape(E, rows, -1))   # quantized: [E, rows, row_bytes]
        spec = c.spec

        def bias(name):
            return self._tensor(p + name + ".bias", True) if spec.expert_bias else None
        return Experts(router=self._tensor(p + "ffn_gate_inp.weight"),
                       router_b=self._tensor(p + "ffn_gate_inp.bias", True) if spec.router_bias else None,
                       gate=views["ffn_gate_exps"], up=views["ffn_up_exps"], down=views["ffn_down_exps"],
                       gate_b=bias("ffn_gate_exps"), up_b=bias("ffn_up_exps"), down_b=bias("ffn_down_exps"),
                       stacks=tuple(stacks), layer=int(p.split(".")[1]))

    def weight_bytes(self) -> dict:
        """Bytes of weights: `total` in the model, `per_token` read to decode one token (MoE: the
        router and only the top-k experts, at the average expert size; dense: everything but the
        embedding table, of which one row is read)."""
        def nb(w):
            return 0 if w is None else int(w.nbytes)
        total = nb(self.tok_embd) + nb(self.output_norm) + (0 if self.output is self.tok_embd else nb(self.output))
        per_token = nb(self.output) + nb(self.output_norm)
        k = self.config.n_expert_used
        for L in self.layers:
            dense = sum(nb(getattr(L, n)) for n in ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w_gate", "w_up",
                                                    "w_down", "bq", "bk", "bv", "bo", "sinks", "q_norm", "k_norm",
                                                    "post_attn_norm", "post_ffn_norm", "wqkv", "w_gu", "bqkv"))
            total += dense
            per_token += dense
            if L.moe is not None:
                ex = L.moe
                router = nb(ex.router) + nb(ex.router_b)
                experts = sum(ex.expert_nbytes(e) for e in range(ex.n_expert))
                biases = nb(ex.gate_b) + nb(ex.up_b) + nb(ex.down_b)
                total += router + experts + biases
                per_token += router + (experts + biases) * k // ex.n_expert
        return dict(total=total, per_token=per_token)

    @staticmethod
    def _fusion_pays() -> bool:
        """Fused copies help where each product is a launch (GPU) or a NumPy call. With the CPU's
        repacked numba kernels a call costs microseconds, while the fused raw copy would stay
        resident beside its repacked twin (+44 MB for SmolLM2); unfused, the raw blocks are
        file pages that repacking hands back to the page cache."""
        from ..device import get_device
        if get_device().is_gpu:
            return True
        from ..kernels import qmatvec
        return not qmatvec.available()

    @staticmethod
    def _repack(w, what: str) -> None:
        from ..kernels import qmatvec
        if isinstance(w, QuantTensor):
            qmatvec.prepare(w, what=what)

    def _ready(self, i) -> None:
        """Repack layer i (or "output") for the numba kernels if it has not run yet (or wait for the
        repack-ahead thread to finish it)."""
        if i not in self._unready:
            return
        with self._ready_lock:
            if i not in self._unready:
                return
            if i == "output":
                self._repack(self.output, "output")
            else:
                self._repack_layer(self.layers[i], i)
            self._unready.discard(i)

    def _ahead_pays(self) -> bool:
        """Repack on a helper thread while the process loads its tokenizer and kernels: for a GGUF
        under the repack cache's size (a bigger one maps its repacked copy from disk on first use),
        where numba's threading layer takes kernel launches from two threads at once (TBB, OpenMP;
        its own workqueue aborts). SPARK_LAB_REPACK_AHEAD=0 turns it off."""
        if not self._unready or os.environ.get("SPARK_LAB_REPACK_AHEAD", "1").strip().lower() in ("0", "off", "false"):
            return False
        from ..kernels.qmatvec.repack_cache import MIN_FILE_BYTES
        from ..numba_threads import concurrent_launches
        try:
            small = self.file.path.stat().st_size < MIN_FILE_BYTES
        except (OSError, AttributeError):
            return False
        return small and concurrent_launches()

    def _ready_ahead(self) -> None:
        """Repack every layer in the order a forward pass uses them (`_ready` takes turns with it).
        A cold SmolLM2 process's first token: 0.34 -> 0.26 s (the repack, ~0.15 s of NumPy copies that
        let go of the GIL, overlaps the tokenizer's load and numba's kernel loads). An error stops the
        thread quietly: the forward pass then repacks that layer itself and reports it."""
        try:
            for i in [*range(self.config.n_layer), "output"]:
                self._ready(i)
        except Exception:   # noqa: BLE001  (reported by the forward pass, which meets it again)
            pass

    def ready_all(self) -> None:
        """Repack every layer now (what the first forward pass would do as it goes)."""
        for i in sorted(self._unready, key=str):
            self._ready(i)

    def _repack_layer(self, L: Layer, i: int) -> None:
        """CPU with numba: repack the layer's quantized weights now (raw pages dropped as it goes),
        q|k|v and gate|up each as one stack, so a decode step makes one product of each."""
        from ..kernels import qmatvec
        qmatvec.prepare_stack([L.wq, L.wk, L.wv], what=f"blk.{i} q|k|v")
        if L.moe is None:                   # experts are repacked on first use: an unused one never is
            qmatvec.prepare_stack([L.w_gate, L.w_up], what=f"blk.{i} gate|up")
        for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
            w = getattr(L, name)
            if w is not None:
                self._repack(w, f"blk.{i}.{name}")

    @staticmethod
    def _fuse_layer(L: Layer) -> None:
        """q|k|v and gate|up as one matrix each: fewer, larger products per token."""
        L.wqkv = _fuse(L.wq, L.wk, L.wv)
        if L.wqkv is not None:
            L.bqkv = None if L.bq is None else np.concatenate([L.bq, L.bk, L.bv])
            L.wq = L.wk = L.wv = L.bq = L.bk = L.bv = None   # drop the unfused views
        L.w_gu = _fuse(L.w_gate, L.w_up)
        if L.w_gu is not None:
            L.w_gate = L.w_up = None

    # ------------------------------------------------------------------ forward
    _dec = None       # decode.Decoder once built; False where it does not apply (GPU arrays, no numba)
    _rows_exact = None  # rows_exact() once asked
    _row_attn = None    # _rows_attention() once asked
    moe_stats = None  # a dict to count expert bytes read and expert hits (llm.moe.moe_ffn), None = off

    def _decoder(self):
        if self._dec is None:
            from . import decode
            self.ready_all()                        # the decoder takes the repacked arrays as they are
            self._dec = decode.Decoder(self) if decode.available(self) else False
        return self._dec or None

    def _dense_ffn(self, h, L: Layer):
        """h [T, d] -> down(act(gate(h)) * up(h)) [T, d]."""
        c = self.config
        if L.w_gu is not None:
            gu = K.linear(h, L.w_gu)                                # [T, 2*ff]
            g, u = gu[:, :c.n_ff], gu[:, c.n_ff:]
        else:
            g, u = K.linear(h, L.w_gate), K.linear(h, L.w_up)       # [T, ff]
        a = K.swiglu(g, u) if c.act == "silu" else K.gelu(g, approximate="tanh") * u
        return K.linear(a, L.w_down)                                # [T, d]

    def forward(self, tokens: np.ndarray, pos: int, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """tokens [T] at positions pos..pos+T-1 -> logits [T, vocab] (or [1, vocab], the last)."""
        if len(tokens) == 1 and not all_logits and self._decoder() is not None:   # decode: the fused one-token path
            return self._dec.step(int(tokens[0]), pos, cache)
        return self._forward([(tokens, pos, cache)], all_logits)

    def forward_many(self, prompts) -> np.ndarray:
        """Several prompts' chunks in one pass: prompts [(tokens [T_i], pos_i, cache_i)] -> the
        logits after each one's last token [n, vocab]. The rows are stacked for every weight
        product (each weight read once for all of them); RoPE, the cache writes and attention
        run per prompt over its own cache. Each prompt gets the numbers `forward` gives it alone
        when `rows_exact()` (every product computes a row the same way whatever the rows around it)."""
        return self._forward(list(prompts), False)

    def rows_exact(self) -> bool:
        """True when a prompt row's numbers depend neither on the prompts stacked beside it nor on
        how its prompt is cut into chunks: dense layers whose every weight runs on a row-exact kernel
        (`qmatvec.row_exact`: the int8 GEMM or the per-row mat-vec, not dequantized tiles + BLAS,
        whose rounding may depend on the row count) and attention row by row (`_rows_attention`)."""
        if self._rows_exact is None:
            from ..kernels.qmatvec import row_exact
            ws = [self.output] + [w for L in self.layers for w in
                                  (L.wqkv, L.wq, L.wk, L.wv, L.wo, L.w_gu, L.w_gate, L.w_up, L.w_down) if w is not None]
            self._rows_exact = (all(L.moe is None and L.sinks is None for L in self.layers)
                                and self._decoder() is not None and self._rows_attention()
                                and all(isinstance(w, QuantTensor) and row_exact(w) for w in ws))
        return self._rows_exact

    def _rows_attention(self) -> bool:
        """Prompt attention through the decode kernel, row by row (CPU, numba): a prompt's numbers
        then do not depend on its chunking (decode_attention.attention_prompt)."""
        if self._row_attn is None:
            from . import decode
            self._row_attn = decode.available(self)
        return self._row_attn

    def _forward(self, prompts, all_logits: bool) -> np.ndarray:
        c = self.config
        hd = c.head_dim
        segs, start = [], 0                                          # (first row, T, pos, cache, positions, rope tables)
        for tokens, pos, cache in prompts:
            T = len(tokens)
            if pos + T > cache.n_ctx:
                raise ValueError(f"{pos + T} tokens do not fit the context of {cache.n_ctx}")
            positions = array_module(cache.k).arange(pos, pos + T, dtype=np.int64)   # on the cache's device: no copy per layer
            tables = {th: K.rope_table(positions, c.rope_dim, th, c.rope_freq_scale, self.rope_freqs, c.rope_yarn)
                      for th in {c.rope_theta, c.rope_theta_local or c.rope_theta}}  # shared by all layers
            segs.append((start, T, pos, cache, positions, tables))
            start += T
        N = start
        rows_kernel = self._rows_attention() and all(type(p[2].k) is np.ndarray for p in prompts)
        tokens = prompts[0][0] if len(prompts) == 1 else np.concatenate([np.asarray(p[0], np.int64) for p in prompts])
        nq, nkv = c.n_head * hd, c.n_head_kv * hd
        x = K.embedding(self.tok_embd, tokens)                      # [N, d]
        if c.embed_scale != 1.0:
            x *= c.embed_scale
        for i, L in enumerate(self.layers):
            if self._unready:
                self._ready(i)
            # --- attention
            h = K.rmsnorm(x, L.attn_norm, c.rms_eps)                # [N, d]
            if L.wqkv is not None:
                qkv = K.linear(h, L.wqkv, L.bqkv)                   # [N, (H + 2*Hkv)*hd]
                q, k, v = qkv[:, :nq], qkv[:, nq:nq + nkv], qkv[:, nq + nkv:]
            else:
                q, k, v = K.linear(h, L.wq, L.bq), K.linear(h, L.wk, L.bk), K.linear(h, L.wv, L.bv)
            q = q.reshape(N, c.n_head, hd)                          # [N, H, hd]
            k = k.reshape(N, c.n_head_kv, hd)                       # [N, Hkv, hd]
            v = v.reshape(N, c.n_head_kv, hd)
            if c.qk_norm:
                q = K.rmsnorm(q, L.q_norm, c.rms_eps)
                k = K.rmsnorm(k, L.k_norm, c.rms_eps)
            sliding = c.is_sliding(i)
            theta = (c.rope_theta_local or c.rope_theta) if sliding else c.rope_theta
            window = c.sliding_window if sliding else None
            outs = []
            for r0, T, pos, cache, positions, tables in segs:      # each prompt over its own cache
                rk = dict(theta=theta, rotary_dim=c.rope_dim, neox=c.rope_neox, freq_scale=c.rope_freq_scale,
                          table=tables[theta], freq_factors=self.rope_freqs, yarn=c.rope_yarn)
                qs, ks = K.rope(q[r0:r0 + T], positions, **rk), K.rope(k[r0:r0 + T], positions, **rk)
                cache.write(i, pos, ks, v[r0:r0 + T])
                kc, vc = (None, None) if rows_kernel else cache.view(i, pos + T)   # [pos+T, Hkv, hd]
                if rows_kernel:                                     # numba is there: never None
                    outs.append(attention_prompt(qs, cache, i, pos, c.attn_scale, window, L.sinks))   # [T, H, hd], rows as decoded alone
                elif L.sinks is not None:
                    outs.append(attention_sinks(qs, kc, vc, L.sinks, q_offset=pos, window=window, scale=c.attn_scale))
                else:
                    outs.append(K.attention(qs, kc, vc, causal=True, q_offset=pos, window=window,
                                            scale=c.attn_scale))    # [T, H, hd]
            o = outs[0] if len(outs) == 1 else array_module(x).concatenate(outs)
            o = K.linear(o.reshape(N, c.n_head * hd), L.wo, L.bo)   # [N, d]
            if c.post_norms:
                o = K.rmsnorm(o, L.post_attn_norm, c.rms_eps)
            x = x + o
            # --- feed-forward
            h = K.rmsnorm(x, L.ffn_norm, c.rms_eps)
            if L.moe is not None:
                f = moe_ffn(h, L.moe, c, self.moe_stats)            # [N, d]: only the routed experts run
            else:
                f = self._dense_ffn(h, L)                           # [N, d]
            if c.post_norms:
                f = K.rmsnorm(f, L.post_ffn_norm, c.rms_eps)
            x = x + f
        if not all_logits:                                          # each prompt's last row
            x = x[-1:] if len(segs) == 1 else x[[r0 + T - 1 for r0, T, *_ in segs]]
        x = K.rmsnorm(x, self.output_norm, c.rms_eps)
        if self._unready:
            self._ready("output")
        return K.linear(x, self.output)                             # [N|n, vocab]
