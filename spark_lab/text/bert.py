"""BERT encoders on spark_lab kernels, and MiniLM sentence embeddings on top of them.

    enc = SentenceEncoder.load("all-minilm-l6-v2")
    e = enc.encode(["A cat sits.", "A kitten is sitting."])   # [2, 384] float32, unit rows
    float(e[0] @ e[1])                                          # cosine similarity

`BertModel` reads a transformers BERT folder (config.json + model.safetensors): word,
position and token-type embeddings -> LayerNorm -> N post-LN encoder layers (self-attention,
residual + LayerNorm, GELU MLP, residual + LayerNorm). `SentenceEncoder` adds what
sentence-transformers' modules.json describes for all-MiniLM-L6-v2: WordPiece tokenization
(tokenizer.json via `tokenizers`) truncated at 256 pieces, mean pooling over real tokens,
L2 normalization. Batches are sorted by length so padding stays small.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..device import array_module, to_host
from ..memory import get_allocator
from .. import kernels as K


@dataclass
class BertConfig:
    vocab_size: int = 30522             # word-piece vocabulary
    hidden_size: int = 384              # d, width of every token vector
    num_hidden_layers: int = 6          # encoder layers
    num_attention_heads: int = 12       # H; head_dim = d / H
    intermediate_size: int = 1536       # MLP width
    max_position_embeddings: int = 512  # longest input (learned absolute positions)
    type_vocab_size: int = 2            # segment A/B embeddings
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"            # "gelu" = exact erf GELU; "gelu_new"/"gelu_pytorch_tanh" = tanh
    pad_token_id: int = 0

    def __post_init__(self):
        for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "max_position_embeddings", "type_vocab_size"):
            v = getattr(self, k)
            if type(v) is not int or not 0 < v < 1 << 24:
                raise ValueError(f"BERT config: {k} = {v!r:.40} is not a positive integer")
        if not isinstance(self.layer_norm_eps, (int, float)) or not self.layer_norm_eps >= 0:
            raise ValueError(f"BERT config: layer_norm_eps = {self.layer_norm_eps!r:.40} is not a number >= 0")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        self.head_dim = self.hidden_size // self.num_attention_heads

    @classmethod
    def from_json(cls, path: str | Path) -> "BertConfig":
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ValueError(f"{path} is not valid JSON: {str(e)[:120]}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path} holds a JSON {type(raw).__name__}, not an object of settings")
        if raw.get("model_type", "bert") not in ("bert",):
            raise ValueError(f"{path}: model_type {raw.get('model_type')!r} is not a BERT model")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: position_embedding_type {raw['position_embedding_type']!r} is not supported")
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in raw.items() if k in names})


def _gelu_mode(act: str) -> str:
    if act == "gelu":
        return "none"
    if act in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return "tanh"
    raise ValueError(f"hidden_act {act!r} is not supported (gelu, gelu_new, gelu_pytorch_tanh)")


class BertModel:
    """transformers' BertModel forward (no pooler): ids [B, T] -> last_hidden_state [B, T, d]."""

    def __init__(self, config: BertConfig, weights: dict):
        self.config = config
        self.w = weights  # name (without a "bert." prefix) -> array on the device
        self._act = _gelu_mode(config.hidden_act)

    @property
    def xp(self):
        """The array module where the weights live (inputs follow them, not the current default)."""
        return array_module(self.w["embeddings.word_embeddings.weight"])

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "BertModel":
        from safetensors import safe_open
        path = Path(path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path}: no config.json (expected a transformers BERT folder)")
        if not (path / "model.safetensors").exists():
            raise FileNotFoundError(f"{path}: no model.safetensors")
        config = BertConfig.from_json(path / "config.json")
        alloc = get_allocator()
        weights = {}
        try:
            with safe_open(str(path / "model.safetensors"), framework="np") as f:
                for name in f.keys():
                    key = name[len("bert."):] if name.startswith("bert.") else name
                    if not key.startswith(("embeddings.", "encoder.")) or key.endswith("position_ids"):
                        continue  # pooler/heads are not part of the encoder output
                    weights[key] = alloc.place(f.get_tensor(name), tag="weights", what=key, dtype=np.float32)
        except Exception as e:         # safetensors' own SafetensorError on a truncated or corrupt file
            if isinstance(e, (ValueError, MemoryError)):
                raise
            raise ValueError(f"{path}/model.safetensors is not a readable safetensors file "
                             f"({type(e).__name__}: {str(e)[:120]})") from None
        missing = [k for k in cls._expected(config) if k not in weights]
        if missing:
            raise ValueError(f"{path}/model.safetensors: missing {len(missing)} tensors, e.g. {missing[0]}")
        for k, shape in cls._shapes(config).items():
            if tuple(weights[k].shape) != shape:
                raise ValueError(f"{path}/model.safetensors: {k} has shape {tuple(weights[k].shape)}, "
                                 f"config.json says {shape}")
        return cls(config, weights)

    @staticmethod
    def _shapes(c: BertConfig) -> dict:
        d, ff = c.hidden_size, c.intermediate_size
        out = {"embeddings.word_embeddings.weight": (c.vocab_size, d),
               "embeddings.position_embeddings.weight": (c.max_position_embeddings, d),
               "embeddings.token_type_embeddings.weight": (c.type_vocab_size, d), "embeddings.LayerNorm.weight": (d,)}
        for i in range(c.num_hidden_layers):
            p = f"encoder.layer.{i}."
            out.update({p + "attention.self.query.weight": (d, d), p + "attention.self.key.weight": (d, d),
                        p + "attention.self.value.weight": (d, d), p + "attention.output.dense.weight": (d, d),
                        p + "attention.output.LayerNorm.weight": (d,), p + "intermediate.dense.weight": (ff, d),
                        p + "output.dense.weight": (d, ff), p + "output.LayerNorm.weight": (d,)})
        return out

    @staticmethod
    def _expected(c: BertConfig) -> list[str]:
        names = ["embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
                 "embeddings.token_type_embeddings.weight", "embeddings.LayerNorm.weight"]
        for i in range(c.num_hidden_layers):
            p = f"encoder.layer.{i}."
            names += [p + s for s in ("attention.self.query.weight", "attention.self.key.weight",
                                      "attention.self.value.weight", "attention.output.dense.weight",
                                      "attention.output.LayerNorm.weight", "intermediate.dense.weight",
                                      "output.dense.weight", "output.LayerNorm.weight")]
        return names

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.w.values())

    # ------------------------------------------------------------------ building blocks
    def _ln(self, x, name):
        return K.layernorm(x, self.w[name + ".weight"], self.w[name + ".bias"], self.config.layer_norm_eps)

    def _lin(self, x, name):
        return K.linear(x, self.w[name + ".weight"], self.w.get(name + ".bias"))

    def embed(self, ids, token_type_ids):
        B, T = ids.shape
        w = self.w
        pos = array_module(ids).arange(T)
        x = K.embedding(w["embeddings.word_embeddings.weight"], ids.reshape(-1)).reshape(B, T, -1)  # [B, T, d]
        x = x + K.embedding(w["embeddings.position_embeddings.weight"], pos)[None]                    # + [1, T, d]
        x = x + K.embedding(w["embeddings.token_type_embeddings.weight"],
                            token_type_ids.reshape(-1)).reshape(B, T, -1)                          # + [B, T, d]
        return self._ln(x, "embeddings.LayerNorm")

    def self_attention(self, x, keep, i):
        c = self.config
        B, T, d = x.shape
        p = f"encoder.layer.{i}.attention."
        H, D = c.num_attention_heads, c.head_dim
        q = self._lin(x, p + "self.query").reshape(B, T, H, D).transpose(0, 2, 1, 3)  # [B, H, T, D]
        k = self._lin(x, p + "self.key").reshape(B, T, H, D).transpose(0, 2, 3, 1)    # [B, H, D, T]
        v = self._lin(x, p + "self.value").reshape(B, T, H, D).transpose(0, 2, 1, 3)  # [B, H, T, D]
        s = K.matmul(q, k) * (1.0 / math.sqrt(D))                                      # [B, H, T, T]
        a = K.softmax(s, axis=-1, mask=keep[:, None, None, :])                         # padding keys dropped
        o = K.matmul(a, v).transpose(0, 2, 1, 3).reshape(B, T, d)                     # [B, T, d]
        return self._ln(self._lin(o, p + "output.dense") + x, p + "output.LayerNorm")

    def mlp(self, x, i):
        p = f"encoder.layer.{i}."
        h = K.gelu(self._lin(x, p + "intermediate.dense"), approximate=self._act)     # [B, T, 4d]
        return self._ln(self._lin(h, p + "output.dense") + x, p + "output.LayerNorm")  # [B, T, d]

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
        """input_ids [B, T] int; attention_mask [B, T] (1 = token, 0 = padding) -> [B, T, d] float32."""
        xp = self.xp
        ids = xp.asarray(input_ids)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(ids.shape)}")
        if ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {ids.shape[1]} tokens is longer than "
                             f"max_position_embeddings {self.config.max_position_embeddings}")
        keep = xp.ones(ids.shape, dtype=bool) if attention_mask is None else xp.asarray(attention_mask).astype(bool)
        tt = xp.zeros_like(ids) if token_type_ids is None else xp.asarray(token_type_ids)
        x = self.embed(ids, tt)                                    # [B, T, d]
        for i in range(self.config.num_hidden_layers):
            x = self.mlp(self.self_attention(x, keep, i), i)
        return x


def mean_pool(h, mask):
    """h [B, T, d], mask [B, T] 0/1 -> [B, d]: the average of the real (unpadded) token vectors."""
    xp = array_module(h)
    m = xp.asarray(mask).astype(h.dtype)[..., None]                  # [B, T, 1]
    return (h * m).sum(axis=1) / xp.maximum(m.sum(axis=1), 1e-9)     # [B, d]


def l2_normalize(x):
    xp = array_module(x)
    return x / xp.maximum(xp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class SentenceEncoder:
    """A sentence-transformers style encoder: BERT -> pooling -> (L2 normalize)."""

    def __init__(self, model: BertModel, tokenizer, max_seq_length: int = 256,
                 pooling: str = "mean", normalize: bool = True, name: str = ""):
        self.model = model
        self.tokenizer = tokenizer
        self.max_seq_length = int(max_seq_length)
        self.pooling = pooling
        self.normalize = normalize
        self.name = name
        self.dim = model.config.hidden_size
        tokenizer.enable_truncation(max_length=self.max_seq_length)
        tokenizer.enable_padding(pad_id=model.config.pad_token_id, pad_token="[PAD]")  # to the batch's longest

    @classmethod
    def load(cls, name_or_path: str = "all-minilm-l6-v2") -> "SentenceEncoder":
        from tokenizers import Tokenizer
        from ..models import resolve
        path = Path(resolve(name_or_path, kind="embedding"))
        if not (path / "tokenizer.json").exists():
            raise FileNotFoundError(f"{path}: no tokenizer.json")
        st = {}
        if (path / "sentence_bert_config.json").exists():
            st = json.loads((path / "sentence_bert_config.json").read_text())
        pooling, normalize = "mean", True
        pool_cfg = path / "1_Pooling" / "config.json"
        if pool_cfg.exists():
            pc = json.loads(pool_cfg.read_text())
            pooling = "cls" if pc.get("pooling_mode_cls_token") else "mean"
        if (path / "modules.json").exists():
            mods = json.loads((path / "modules.json").read_text())
            normalize = any(m.get("type", "").endswith("Normalize") for m in mods)
        model = BertModel.from_pretrained(path)
        max_len = min(int(st.get("max_seq_length", 256)), model.config.max_position_embeddings)
        return cls(model, Tokenizer.from_file(str(path / "tokenizer.json")), max_len, pooling, normalize,
                   name=str(name_or_path))

    def tokenize(self, texts: list[str]):
        """-> ids [B, T] int64, mask [B, T] int64 (host arrays, padded to the longest in the batch)."""
        encs = self.tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encs], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encs], dtype=np.int64)
        return ids, mask

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text).ids)

    def encode(self, sentences, batch_size: int = 32, normalize: bool = True,
               progress: bool = False):
        """list of str -> float32 [n, dim] on the host (one str -> [dim]); normalize=True gives
        unit rows (sentence-transformers' Normalize module), so dot products are cosines."""
        single = isinstance(sentences, str)
        texts = [sentences] if single else list(sentences)
        if any(not isinstance(t, str) for t in texts):
            raise ValueError("encode() takes a string or a list of strings")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        # longest first: each batch pads only to its own longest member
        lengths = [len(t) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])
        starts = range(0, len(texts), batch_size)
        if progress:
            from tqdm.auto import tqdm
            starts = tqdm(starts, desc="embedding", unit="batch")
        xp = self.model.xp
        for s in starts:
            idx = order[s:s + batch_size]
            ids, mask = self.tokenize([texts[i] for i in idx])
            h = self.model(ids, mask)                                   # [b, T, d]
            if self.pooling == "cls":
                e = h[:, 0]
            else:
                e = mean_pool(h, xp.asarray(mask))                      # [b, d]
            if normalize:
                e = l2_normalize(e)
            out[idx] = to_host(e).astype(np.float32, copy=False)
        return out[0] if single else out
