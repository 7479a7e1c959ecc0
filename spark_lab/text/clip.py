"""CLIP text encoder (Stable Diffusion's text_encoder/) and its BPE tokenizer (tokenizer/).

    ids [B, L] -> token + position embeddings -> N x pre-LN transformer layers with a causal
    mask (quick_gelu or gelu MLP) -> final LayerNorm -> last_hidden_state [B, L, D];
    pooled [B, D] = the hidden state at each row's end-of-text token.
    hidden_states (output_hidden_states=True): the embeddings and each layer's output, N + 1
    arrays [B, L, D] before the final LayerNorm (SDXL conditions on hidden_states[-2]).
    CLIPTextModelWithProjection (SDXL's text_encoder_2): text_embeds [B, P] = pooled @ text_projection.T.

The tokenizer is a `tokenizers` byte-level BPE built from vocab.json + merges.txt (or read from
tokenizer.json): lower-cased, words split CLIP's way, '</w>' marks a word's last piece; then
<|startoftext|> ids <|endoftext|>, truncated and padded to model_max_length (77 for SD).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from ..device import to_device, to_host
from ..kernels import attention, embedding, gelu, layernorm, linear, quick_gelu

CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _token_str(v, default: str) -> str:
    if isinstance(v, dict):
        return v.get("content", default)
    return v if isinstance(v, str) else default


class CLIPTokenizer:
    """prompts -> ids [B, model_max_length] int64, padded and truncated like transformers' CLIPTokenizer."""

    def __init__(self, tokenizer, model_max_length: int = 77, bos: str = "<|startoftext|>",
                 eos: str = "<|endoftext|>", pad: str = "<|endoftext|>"):
        self.tok = tokenizer
        self.model_max_length = int(model_max_length)
        ids = [tokenizer.token_to_id(t) for t in (bos, eos, pad)]
        if None in ids:
            raise ValueError(f"CLIP tokenizer: special tokens {bos!r}, {eos!r}, {pad!r} are not all in the vocabulary")
        self.bos_token_id, self.eos_token_id, self.pad_token_id = ids

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "CLIPTokenizer":
        from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
        from tokenizers.models import BPE

        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"missing tokenizer folder: {folder}")
        cfg = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (folder / name).is_file():
                cfg.update(json.loads((folder / name).read_text()))
        vocab, merges = folder / "vocab.json", folder / "merges.txt"
        if vocab.is_file() and merges.is_file():
            bpe = BPE.from_file(str(vocab), str(merges), continuing_subword_prefix="", end_of_word_suffix="</w>",
                                unk_token=_token_str(cfg.get("unk_token"), "<|endoftext|>"), fuse_unk=False)
            tok = Tokenizer(bpe)
            tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                                   normalizers.Lowercase()])
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False)])
            tok.decoder = decoders.ByteLevel()
        elif (folder / "tokenizer.json").is_file():
            tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        else:
            raise FileNotFoundError(f"no tokenizer in {folder}: expected vocab.json + merges.txt or tokenizer.json")
        tok.no_padding()
        tok.no_truncation()
        specials = [_token_str(cfg.get(k), d) for k, d in (("bos_token", "<|startoftext|>"), ("eos_token", "<|endoftext|>"),
                                                           ("pad_token", "<|endoftext|>"), ("unk_token", "<|endoftext|>"))]
        # transformers never splits its special tokens: SDXL's tokenizer_2 pads with "!", so a "!" in a
        # prompt becomes that pad token, not "!</w>"
        tok.add_special_tokens([t for t in dict.fromkeys(specials) if tok.token_to_id(t) is not None])
        return cls(tok, cfg.get("model_max_length", 77) if cfg.get("model_max_length", 77) < 1e6 else 77, *specials[:3])

    def __call__(self, prompts: list[str] | str, max_length: int | None = None) -> np.ndarray:
        if isinstance(prompts, str):
            prompts = [prompts]
        L = max_length or self.model_max_length
        out = np.full((len(prompts), L), self.pad_token_id, dtype=np.int64)
        for i, enc in enumerate(self.tok.encode_batch(list(prompts), add_special_tokens=False)):
            ids = [self.bos_token_id] + enc.ids[:L - 2] + [self.eos_token_id]
            out[i, :len(ids)] = ids
        return out

    def decode(self, ids) -> str:
        keep = [int(i) for i in ids if int(i) not in (self.bos_token_id, self.eos_token_id, self.pad_token_id)]
        return self.tok.decode(keep).replace("</w>", " ").strip()


@dataclass
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"           # SD 1.x; SD 2.x uses "gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 2                    # 2 = the old configs: the pooled token is argmax(ids)
    projection_dim: int | None = None        # CLIPTextModelWithProjection: width of text_embeds
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPTextConfig":
        if "text_config" in d:                   # a full CLIPModel config
            d = d["text_config"]
        names = {f.name for f in fields(cls)}
        c = cls(**{k: v for k, v in d.items() if k in names and k != "extra"})
        if c.hidden_act not in ("quick_gelu", "gelu", "gelu_new"):
            raise ValueError(f"CLIP hidden_act {c.hidden_act!r} is not supported (quick_gelu, gelu)")
        if c.hidden_size % c.num_attention_heads:
            raise ValueError(f"CLIP hidden_size {c.hidden_size} is not divisible by {c.num_attention_heads} heads")
        return c


@dataclass
class CLIPTextOutput:
    last_hidden_state: object   # [B, L, D]
    pooler_output: object       # [B, D]
    hidden_states: tuple | None = None   # output_hidden_states: N + 1 x [B, L, D] (embeddings, then each layer)
    text_embeds: object = None           # CLIPTextModelWithProjection: [B, P]

    def __getitem__(self, i):   # transformers' tuple order: text_encoder(ids)[0]
        states = (self.hidden_states,) if self.hidden_states is not None else ()
        if self.text_embeds is not None:
            return (self.text_embeds, self.last_hidden_state, *states)[i]
        return (self.last_hidden_state, self.pooler_output, *states)[i]


class CLIPTextModel:
    def __init__(self, config: CLIPTextConfig, weights: dict):
        self.config, self.w = config, weights

    @classmethod
    def from_pretrained(cls, folder: str | Path, variant: str | None = None) -> "CLIPTextModel":
        from ..diffusion.loading import find_weights, load_safetensors, read_json

        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"missing text encoder folder: {folder}")
        config = CLIPTextConfig.from_dict(read_json(folder / "config.json"))
        w = load_safetensors(find_weights(folder, variant))
        w = {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in w.items()}
        need = ["embeddings.token_embedding.weight", "embeddings.position_embedding.weight", "final_layer_norm.weight"]
        for k in need:
            if k not in w:
                raise ValueError(f"CLIP text encoder in {folder} has no weight {k!r}")
        return cls(config, w)

    @property
    def nbytes(self) -> int:
        return int(sum(int(a.nbytes) for a in self.w.values()))

    def _ln(self, x, name):
        return layernorm(x, self.w[f"{name}.weight"], self.w[f"{name}.bias"], self.config.layer_norm_eps)

    def _lin(self, x, name):
        y = linear(x, self.w[f"{name}.weight"], self.w.get(f"{name}.bias"))
        stack = self.w.get(f"{name}.lora")          # unfused LoRA adapters (diffusion/lora.py)
        d = stack.linear(x) if stack is not None else None
        return y if d is None else y + d

    def _act(self, x):
        return quick_gelu(x) if self.config.hidden_act == "quick_gelu" else gelu(x)

    def layer(self, h, i: int):
        """One pre-LN block with causal self-attention: h [B, L, D] -> [B, L, D]."""
        c, p = self.config, f"encoder.layers.{i}"
        B, L, D = h.shape
        H = c.num_attention_heads
        x = self._ln(h, f"{p}.layer_norm1")
        q = self._lin(x, f"{p}.self_attn.q_proj")                       # [B, L, D]
        k = self._lin(x, f"{p}.self_attn.k_proj")
        v = self._lin(x, f"{p}.self_attn.v_proj")
        fold = lambda t: t.reshape(B, L, H, D // H).transpose(1, 0, 2, 3).reshape(L, B * H, D // H)  # noqa: E731
        o = attention(fold(q), fold(k), fold(v), causal=True)             # [L, B*H, D/H]
        o = o.reshape(L, B, D).transpose(1, 0, 2)                        # [B, L, D]
        h = h + self._lin(o, f"{p}.self_attn.out_proj")
        x = self._ln(h, f"{p}.layer_norm2")
        return h + self._lin(self._act(self._lin(x, f"{p}.mlp.fc1")), f"{p}.mlp.fc2")

    def __call__(self, input_ids, output_hidden_states: bool = False) -> CLIPTextOutput:
        """input_ids [B, L] int -> CLIPTextOutput(last_hidden_state [B, L, D], pooler_output [B, D],
        hidden_states: N + 1 x [B, L, D] when asked)."""
        c = self.config
        ids = np.asarray(to_host(input_ids) if hasattr(input_ids, "__cuda_array_interface__") else input_ids)
        if ids.ndim != 2:
            raise ValueError(f"CLIPTextModel: input_ids {ids.shape} should be [batch, length]")
        B, L = ids.shape
        if L > c.max_position_embeddings:
            raise ValueError(f"CLIPTextModel: {L} tokens is more than max_position_embeddings {c.max_position_embeddings}")
        tok = embedding(self.w["embeddings.token_embedding.weight"], to_device(ids.reshape(-1)))   # [B*L, D]
        h = tok.reshape(B, L, -1) + self.w["embeddings.position_embedding.weight"][:L][None]        # [B, L, D]
        states = [h]
        for i in range(c.num_hidden_layers):
            h = self.layer(h, i)
            states.append(h)
        h = self._ln(h, "final_layer_norm")
        if c.eos_token_id == 2:
            pos = ids.argmax(axis=-1)                                     # legacy: EOS has the largest id
        else:
            pos = (ids == c.eos_token_id).argmax(axis=-1)                 # first EOS in each row
        pooled = h[to_device(np.arange(B)), to_device(pos)]              # [B, D]
        return CLIPTextOutput(h, pooled, tuple(states) if output_hidden_states else None)


class CLIPTextModelWithProjection(CLIPTextModel):
    """CLIPTextModel + text_projection (no bias): text_embeds [B, P] from the pooled output."""

    @classmethod
    def from_pretrained(cls, folder: str | Path, variant: str | None = None) -> "CLIPTextModelWithProjection":
        m = super().from_pretrained(folder, variant)
        if "text_projection.weight" not in m.w:
            raise ValueError(f"CLIP text encoder in {folder} has no text_projection.weight "
                             "(a CLIPTextModel, not a CLIPTextModelWithProjection)")
        return m

    def __call__(self, input_ids, output_hidden_states: bool = False) -> CLIPTextOutput:
        out = super().__call__(input_ids, output_hidden_states)
        out.text_embeds = self._lin(out.pooler_output, "text_projection")                    # [B, P]
        return out
