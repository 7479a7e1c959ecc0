"""T5 text encoder (Flux's text_encoder_2, SD3's text_encoder_3) and its SentencePiece tokenizer.

    ids [B, T] -> shared embedding [B, T, d] -> N x {
        h += SelfAttention(RMSNorm(h))      q k^T with NO 1/sqrt(d_kv) scaling, plus a relative
                                            position bias [H, T, T] computed once and shared
        h += FeedForward(RMSNorm(h))        v1.0: wo(relu(wi x)); v1.1 / T5-XXL ("gated-gelu"):
                                            wo(gelu_tanh(wi_0 x) * wi_1 x)
    } -> RMSNorm -> last_hidden_state [B, T, d]

T5's layer norm is an RMSNorm: x / sqrt(mean(x^2) + eps) * w, no mean subtracted, no bias.
The position bias puts each key-minus-query distance in one of `relative_attention_num_buckets`
buckets (half for keys after the query, half for keys before; within each half, small distances get
a bucket each and larger ones share logarithmically wider buckets up to `relative_attention_max_distance`),
then looks up one learned number per head. Only layer 0 holds that table; every layer adds the same bias.

The tokenizer is a `tokenizers` Unigram model read from tokenizer.json, run the way transformers'
T5Tokenizer(Fast) runs it: split on whitespace, "▁" before every word, the file's SentencePiece
"Precompiled" normalizer (nmt_nfkc) kept, `</s>` appended, truncated to max_length (EOS kept) and
padded with `<pad>` (id 0). Diffusers' Flux pipeline pads to 512 (dev) / 256 (schnell), SD3 to 256.
"""
from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from ..device import array_module, to_device, to_host
from ..kernels import embedding, gelu, linear, rmsnorm, silu, softmax

# feed_forward_proj's activation (the part after "gated-") -> how transformers' ACT2FN computes it
ACTIVATIONS = ("relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "silu", "swish")


def _token_str(v, default: str) -> str:
    if isinstance(v, dict):
        return v.get("content", default)
    return v if isinstance(v, str) else default


# ------------------------------------------------------------------------------------- tokenizer

class T5Tokenizer:
    """prompts -> ids [B, max_length] int64 (and the attention mask), like transformers' T5TokenizerFast
    called with padding="max_length", truncation=True."""

    def __init__(self, tokenizer, model_max_length: int = 512, eos: str = "</s>", pad: str = "<pad>"):
        self.tok = tokenizer
        self.model_max_length = int(model_max_length)
        ids = [tokenizer.token_to_id(t) for t in (eos, pad)]
        if None in ids:
            raise ValueError(f"T5 tokenizer: special tokens {eos!r} and {pad!r} are not both in the vocabulary")
        self.eos_token_id, self.pad_token_id = ids

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "T5Tokenizer":
        from tokenizers import Tokenizer, normalizers, pre_tokenizers

        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"missing tokenizer folder: {folder}")
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {folder} (a T5 tokenizer folder needs one; "
                                    f"spiece.model alone is not read)")
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
            model = spec["model"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise ValueError(f"{path} is not a tokenizers JSON file") from None
        if not isinstance(model, dict) or model.get("type") != "Unigram":
            kind = model.get("type") if isinstance(model, dict) else None
            raise ValueError(f"{path}: a T5 tokenizer is a Unigram (SentencePiece) model, this one is {kind!r}")
        cfg = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (folder / name).is_file():
                cfg.update(json.loads((folder / name).read_text(encoding="utf-8")))
        charsmap = _precompiled_charsmap(spec.get("normalizer"))
        # Truncation, padding and the EOS are done in __call__; the rest of the pipeline is T5's own
        # (as transformers rebuilds it from the file): SentencePiece's character normalisation
        # (the "Precompiled" charsmap, when the file has one; other normalizers are dropped), runs of
        # whitespace are one separator, and every word starts with "▁".
        spec.update(normalizer=None, pre_tokenizer=None, post_processor=None, truncation=None, padding=None)
        tok = Tokenizer.from_str(json.dumps(spec))
        if charsmap is not None:
            tok.normalizer = normalizers.Precompiled(charsmap)
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)])
        n = cfg.get("model_max_length", 512)
        return cls(tok, n if isinstance(n, int) and 0 < n < 10**6 else 512,
                   _token_str(cfg.get("eos_token"), "</s>"), _token_str(cfg.get("pad_token"), "<pad>"))

    def __call__(self, prompts: list[str] | str, max_length: int | None = None, return_attention_mask: bool = False):
        """-> input_ids [B, max_length] int64, or (input_ids, attention_mask [B, max_length] int64)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        L = self.model_max_length if max_length is None else int(max_length)
        if L < 1:
            raise ValueError(f"T5 tokenizer: max_length must be >= 1, got {max_length}")
        ids = np.full((len(prompts), L), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(prompts), L), dtype=np.int64)
        for i, enc in enumerate(self.tok.encode_batch(list(prompts), add_special_tokens=False)):
            row = enc.ids[:L - 1] + [self.eos_token_id]          # truncation keeps room for </s>
            ids[i, :len(row)] = row
            mask[i, :len(row)] = 1
        return (ids, mask) if return_attention_mask else ids

    def decode(self, ids) -> str:
        keep = [int(i) for i in ids if int(i) not in (self.eos_token_id, self.pad_token_id)]
        return self.tok.decode(keep)


T5TokenizerFast = T5Tokenizer   # the name diffusers' Flux/SD3 pipelines use for the same thing


def _precompiled_charsmap(normalizer) -> bytes | None:
    """The SentencePiece charsmap of a tokenizer.json "normalizer" entry (alone or in a Sequence)."""
    if not isinstance(normalizer, dict):
        return None
    parts = normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else [normalizer]
    for p in parts:
        if isinstance(p, dict) and p.get("type") == "Precompiled" and p.get("precompiled_charsmap"):
            return base64.b64decode(p["precompiled_charsmap"])
    return None


# ----------------------------------------------------------------------------------------- model

@dataclass
class T5Config:
    vocab_size: int = 32128
    d_model: int = 512                         # hidden width
    d_kv: int = 64                             # size of one head (d_model need not be num_heads * d_kv)
    d_ff: int = 2048                           # feed-forward width
    num_layers: int = 6                        # encoder blocks
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"            # "relu" (T5 v1.0), "gated-gelu" (v1.1, T5-XXL of Flux/SD3)

    def __post_init__(self):
        parts = self.feed_forward_proj.split("-")
        self.gated = parts[0] == "gated" and len(parts) == 2
        act = parts[-1]
        if self.feed_forward_proj == "gated-gelu":
            act = "gelu_new"                       # transformers' T5Config: gated-gelu means the tanh GELU
        if (len(parts) == 2 and not self.gated) or len(parts) > 2 or act not in ACTIVATIONS:
            raise ValueError(f"T5 feed_forward_proj {self.feed_forward_proj!r} is not supported "
                             f"(relu, gated-gelu, or [gated-]{'/'.join(ACTIVATIONS)})")
        self.act = act
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                     "relative_attention_num_buckets"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"T5 config {name} must be a positive integer, got {getattr(self, name)!r}")
        exact = self.relative_attention_num_buckets // 4          # distances below this get a bucket each
        if exact < 1 or self.relative_attention_max_distance <= exact:
            raise ValueError(f"T5 config: relative_attention_num_buckets {self.relative_attention_num_buckets} and "
                             f"max_distance {self.relative_attention_max_distance} do not make buckets")

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "T5Config":
        kind = d.get("model_type")
        if kind != "t5":
            raise ValueError(f"{source}: model_type {kind!r} is not 't5' (a T5EncoderModel folder is needed)")
        if d.get("is_decoder"):
            raise ValueError(f"{source}: is_decoder is true; spark_lab reads the T5 encoder only")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv


@dataclass
class T5EncoderOutput:
    last_hidden_state: object     # [B, T, d_model] float32

    def __getitem__(self, i):     # transformers style: text_encoder(ids)[0]
        return (self.last_hidden_state,)[i]


def relative_position_bucket(rel: np.ndarray, num_buckets: int, max_distance: int) -> np.ndarray:
    """rel [...] int (key position - query position) -> bucket [...] in [0, num_buckets), bidirectional.

    Keys after the query use the upper half of the buckets. In each half, distances below n/2
    (n = buckets per half) get their own bucket; larger ones go to n/2 + log(dist / (n/2)) /
    log(max_distance / (n/2)) * n/2, capped at n - 1. Computed in float32 like mesh TensorFlow and
    transformers, so a distance at a bucket edge lands where theirs does."""
    n = num_buckets // 2
    exact = n // 2
    a = np.abs(rel)
    lg = np.log(np.maximum(a, 1).astype(np.float32) / np.float32(exact))
    lg = lg / np.float32(math.log(max_distance / exact)) * np.float32(n - exact)
    far = np.minimum(exact + lg.astype(np.int64), n - 1)
    return (rel > 0).astype(np.int64) * n + np.where(a < exact, a, far)


class T5EncoderModel:
    def __init__(self, config: T5Config, weights: dict, source: str = ""):
        self.config, self.w, self.source = config, weights, source
        self._check()

    @classmethod
    def from_pretrained(cls, folder: str | Path, variant: str | None = None) -> "T5EncoderModel":
        from ..diffusion.loading import read_json
        from ..memory import get_allocator

        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"missing text encoder folder: {folder}")
        config = T5Config.from_dict(read_json(folder / "config.json"), str(folder / "config.json"))
        alloc = get_allocator()
        w = {}
        for name, a in _read_encoder_tensors(folder, variant).items():
            w[name] = alloc.place(np.ascontiguousarray(a, dtype=np.float32), tag="weights", what=name)
        return cls(config, w, str(folder))

    def _check(self):
        c, w = self.config, self.w
        if "encoder.embed_tokens.weight" not in w and "shared.weight" in w:
            w["encoder.embed_tokens.weight"] = w["shared.weight"]      # tied: one table, two names
        w.pop("shared.weight", None)
        ff = ["wi_0", "wi_1", "wo"] if c.gated else ["wi", "wo"]
        need = {"encoder.embed_tokens.weight": (None, c.d_model),
                "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
                    (c.relative_attention_num_buckets, c.num_heads),
                "encoder.final_layer_norm.weight": (c.d_model,)}
        for i in range(c.num_layers):
            p = f"encoder.block.{i}.layer"
            need.update({f"{p}.0.SelfAttention.{m}.weight": (c.inner_dim, c.d_model) for m in "qkv"})
            need[f"{p}.0.SelfAttention.o.weight"] = (c.d_model, c.inner_dim)
            need.update({f"{p}.{j}.layer_norm.weight": (c.d_model,) for j in (0, 1)})
            need.update({f"{p}.1.DenseReluDense.{m}.weight": (c.d_ff, c.d_model) for m in ff if m != "wo"})
            need[f"{p}.1.DenseReluDense.wo.weight"] = (c.d_model, c.d_ff)
        where = self.source or "the weights"
        for k, shape in need.items():
            if k not in w:
                kind = "gated (wi_0, wi_1)" if c.gated else "ungated (wi)"
                raise ValueError(f"T5 encoder in {where} has no weight {k!r} (config: {c.num_layers} layers, "
                                 f"{c.feed_forward_proj!r} = {kind} feed-forward)")
            got = tuple(w[k].shape)
            if len(got) != len(shape) or any(s is not None and s != g for s, g in zip(shape, got)):
                raise ValueError(f"T5 encoder in {where}: weight {k!r} is {got}, config.json says "
                                 f"{tuple('*' if s is None else s for s in shape)}")

    @property
    def nbytes(self) -> int:
        return int(sum(int(a.nbytes) for a in self.w.values()))

    def position_bias(self, T: int):
        """[H, T, T] float32: the learned bias of every (query, key) distance, shared by all layers."""
        c = self.config
        rel = np.arange(T)[None, :] - np.arange(T)[:, None]                         # [T, T] key - query
        buckets = relative_position_bucket(rel, c.relative_attention_num_buckets, c.relative_attention_max_distance)
        table = self.w["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]   # [buckets, H]
        return table[to_device(buckets)].transpose(2, 0, 1)                         # [T, T, H] -> [H, T, T]

    def _ff(self, x, p: str):
        c, w = self.config, self.w
        if c.gated:
            h = self._act(linear(x, w[f"{p}.wi_0.weight"])) * linear(x, w[f"{p}.wi_1.weight"])   # [B, T, d_ff]
            return linear(h, w[f"{p}.wo.weight"])                                   # [B, T, d]
        return linear(self._act(linear(x, w[f"{p}.wi.weight"])), w[f"{p}.wo.weight"])

    def _act(self, x):
        a = self.config.act
        if a == "relu":
            return array_module(x).maximum(x, 0.0, out=x)                          # in place: x is a fresh product
        if a == "gelu":
            return gelu(x)
        if a in ("gelu_new", "gelu_pytorch_tanh"):
            return gelu(x, approximate="tanh")
        return silu(x)

    def layer(self, h, bias, i: int):
        """One block: h [B, T, d], bias [B or 1, H, T, T] (positions + padding mask) -> [B, T, d]."""
        c, w, p = self.config, self.w, f"encoder.block.{i}.layer"
        B, T, _ = h.shape
        H, Dh = c.num_heads, c.d_kv
        x = rmsnorm(h, w[f"{p}.0.layer_norm.weight"], c.layer_norm_epsilon)
        heads = lambda t: t.reshape(B, T, H, Dh).transpose(0, 2, 1, 3)             # noqa: E731  -> [B, H, T, Dh]
        q = heads(linear(x, w[f"{p}.0.SelfAttention.q.weight"]))
        k = heads(linear(x, w[f"{p}.0.SelfAttention.k.weight"]))
        v = heads(linear(x, w[f"{p}.0.SelfAttention.v.weight"]))
        scores = q @ k.transpose(0, 1, 3, 2)                                        # [B, H, T, T], no 1/sqrt(Dh)
        o = softmax(scores, axis=-1, mask=bias) @ v                                 # [B, H, T, Dh]
        o = o.transpose(0, 2, 1, 3).reshape(B, T, H * Dh)
        h = h + linear(o, w[f"{p}.0.SelfAttention.o.weight"])
        x = rmsnorm(h, w[f"{p}.1.layer_norm.weight"], c.layer_norm_epsilon)
        return h + self._ff(x, f"{p}.1.DenseReluDense")

    def __call__(self, input_ids, attention_mask=None) -> T5EncoderOutput:
        """input_ids [B, T] int, attention_mask [B, T] (1 = token, 0 = padding; None = all tokens)
        -> T5EncoderOutput(last_hidden_state [B, T, d_model] float32)."""
        c = self.config
        ids = to_host(input_ids)                                                    # lists, NumPy or device arrays
        if ids.ndim != 2 or ids.dtype.kind not in "iu":
            raise ValueError(f"T5EncoderModel: input_ids {ids.shape} {ids.dtype} should be integer [batch, length]")
        B, T = ids.shape
        emb = embedding(self.w["encoder.embed_tokens.weight"], to_device(ids.reshape(-1)))   # [B*T, d]
        h = emb.reshape(B, T, c.d_model)
        bias = self.position_bias(T)[None]                                          # [1, H, T, T]
        if attention_mask is not None:
            m = to_host(attention_mask)
            if m.shape != (B, T):
                raise ValueError(f"T5EncoderModel: attention_mask {m.shape} does not match input_ids {ids.shape}")
            add = np.where(m != 0, np.float32(0.0), np.float32(-np.inf)).astype(np.float32)  # padded keys: -inf
            bias = bias + to_device(add)[:, None, None, :]                          # [B, H, T, T]
        for i in range(c.num_layers):
            h = self.layer(h, bias, i)
        return T5EncoderOutput(rmsnorm(h, self.w["encoder.final_layer_norm.weight"], c.layer_norm_epsilon))


def _read_encoder_tensors(folder: Path, variant: str | None) -> dict:
    """name -> host array (memory-mapped) of the encoder's tensors: one safetensors file, or the
    shards a `model.safetensors.index[.fp16].json` lists (T5-XXL checkpoints are sharded). A full
    T5 (encoder + decoder) checkpoint works too: decoder.* and lm_head are not read."""
    from ..diffusion.loading import find_weights, iter_tensors

    path = find_weights(folder, variant)
    out = {name: a for name, a in iter_tensors(path) if name.startswith(("encoder.", "shared."))}
    if not out:
        raise ValueError(f"no T5 encoder weights (encoder.*, shared.weight) in {path}")
    return out
