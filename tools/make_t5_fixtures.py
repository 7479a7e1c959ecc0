"""Build the tiny random T5 encoders, their tokenizer and reference outputs under tests/fixtures/diffusion/tiny-t5/.

Dev-only (needs torch and transformers; spark_lab never imports this). Writes:

    text_encoder_3/     T5 v1.1 / T5-XXL style (feed_forward_proj "gated-gelu": tanh GELU, wi_0 * wi_1),
                        as Flux's text_encoder_2 and SD3's text_encoder_3 are: config.json + model.safetensors
    text_encoder_relu/  T5 v1.0 style (feed_forward_proj "relu", wi), layer_norm_epsilon 1e-5
    tokenizer_3/        tokenizer.json (a Unigram model built here with the `tokenizers` library, with
                        a small SentencePiece "Precompiled" charsmap) + tokenizer_config.json
    reference.npz       token ids and masks from transformers' T5TokenizerFast, and both encoders'
                        last_hidden_state from transformers' T5EncoderModel, with and without the mask

Both encoders: d_model 32, 2 layers, 4 heads, d_kv 8, d_ff 37, vocab 100, 16 position buckets up to
distance 12 (so 24-token prompts reach the capped bucket). Weights are drawn wider than transformers'
init (unit-variance projections, bias ~N(0, 1), norms ~1 +- 0.2) so attention is sharp and a missing
detail (a 1/sqrt(d) scale, a mean subtracted, a bias bucket off by one) moves the outputs well past 1e-4.

    python tools/make_t5_fixtures.py [--out tests/fixtures/diffusion/tiny-t5]
"""
from __future__ import annotations

import argparse
import base64
import json
import shutil
import string
from pathlib import Path

import numpy as np
import torch

PROMPTS = ["a photo of a cat", "  Happy  DOG,\tsmiling face!\n", "", "a red sunset over the mountains, city xyz",
           "<extra_id_0> cat<extra_id_2>", "\ufb01re\u3000on the \uff21\uff24 hill", "a cat </s> dog <pad>"]
LONG = "a red dog " * 10
MAX_LENGTH = 24
EXTRA_IDS = 3
WORDS = ["a", "photo", "of", "the", "cat", "dog", "red", "blue", "smiling", "face", "happy", "sunset", "over",
         "mountains", "city", "fire", "on", "hill"]
# What the tiny charsmap normalises, as SentencePiece's nmt_nfkc does for these characters.
NORMALISE = {"\ufb01": "fi", "\u3000": " ", "\uff21": "A", "\uff24": "D"}


def precompiled_charsmap(mapping: dict[str, str]) -> bytes:
    """A SentencePiece "precompiled_charsmap": u32 trie size in bytes, a darts double-array trie over
    the UTF-8 bytes of each source string (unit = offset << 10 | has_leaf << 8 | label; a leaf's value
    unit holds the byte index of the replacement), then the NUL-terminated replacements.
    Each trie node gets its own 256-unit block for its children, which keeps the layout trivial."""
    units = np.zeros(256 * (2 + sum(len(k.encode()) for k in mapping)), dtype=np.uint32)
    blocks = iter(range(2, len(units) // 256))
    units[0] = 256 << 10                                      # root: children in block 1
    offset_of = {0: 256}
    normalized = b""
    for key, value in mapping.items():
        pos = offset_of[0]                                    # 0 ^ root offset
        kb = key.encode()
        for i, c in enumerate(kb):
            pos ^= c
            if pos not in offset_of:                          # a new node: label c, fresh child block
                off = (pos & ~255) ^ (next(blocks) << 8)
                offset_of[pos] = off
                units[pos] = (off << 10) | c
            if i == len(kb) - 1:
                units[pos] |= 1 << 8                          # has_leaf
                units[pos ^ offset_of[pos]] = len(normalized)  # the value unit
            pos ^= offset_of[pos]
        normalized += value.encode() + b"\0"
    trie = units.tobytes()
    return len(trie).to_bytes(4, "little") + trie + normalized


def write_tokenizer(folder: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    folder.mkdir(parents=True, exist_ok=True)
    # T5's layout: <pad> 0, </s> 1, <unk> 2, pieces (log-probabilities), sentinels last in reverse order
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -6.0) for c in string.ascii_lowercase + "ACDHP,.!'-0123"]
    pieces += [("▁" + w, -3.0 - 0.1 * len(w)) for w in WORDS]
    pieces += [(s, -5.0) for s in ["ing", "▁smil", "▁s", "▁c", "▁d", "er", "s"]]
    extra = [f"<extra_id_{i}>" for i in range(EXTRA_IDS)]
    pieces += [(t, 0.0) for t in reversed(extra)]
    tok = Tokenizer(Unigram(pieces, unk_id=2, byte_fallback=False))
    charsmap = base64.b64encode(precompiled_charsmap(NORMALISE)).decode()
    tok.normalizer = normalizers.Sequence([normalizers.Precompiled(base64.b64decode(charsmap)),
                                           normalizers.Replace(" {2,}", " ")])       # as T5's tokenizer.json
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.add_special_tokens([AddedToken(t, special=True) for t in ["<pad>", "</s>", "<unk>"] + extra])
    tok.post_processor = processors.TemplateProcessing(single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"],
                                                       special_tokens=[("</s>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
        "extra_ids": EXTRA_IDS, "additional_special_tokens": extra, "model_max_length": 512, "legacy": True}, indent=2))


def tiny_encoder(feed_forward_proj: str, eps: float, vocab: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=16, relative_attention_max_distance=12,
                   feed_forward_proj=feed_forward_proj, layer_norm_epsilon=eps)
    m = T5EncoderModel(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "relative_attention_bias" in name or name == "shared.weight":
                p.copy_(torch.randn_like(p))
            else:                                              # [out, in] projections: unit variance out
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="tests/fixtures/diffusion/tiny-t5")
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    from transformers import T5TokenizerFast

    write_tokenizer(out / "tokenizer_3")
    tok = T5TokenizerFast.from_pretrained(str(out / "tokenizer_3"))
    ref = {}
    enc = tok(PROMPTS, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
    ref["ids"], ref["mask"] = enc.input_ids.numpy(), enc.attention_mask.numpy()
    long = tok([LONG, "a cat"], padding="max_length", max_length=8, truncation=True, return_tensors="pt")
    ref["long_ids"], ref["long_mask"] = long.input_ids.numpy(), long.attention_mask.numpy()
    assert ref["ids"].max() < 100

    for name, proj, eps, seed in [("text_encoder_3", "gated-gelu", 1e-6, 0), ("text_encoder_relu", "relu", 1e-5, 1)]:
        m = tiny_encoder(proj, eps, 100, seed)
        m.save_pretrained(str(out / name))
        key = "gated" if proj.startswith("gated") else "relu"
        with torch.no_grad():
            ref[f"{key}_hidden"] = m(enc.input_ids).last_hidden_state.numpy()
            ref[f"{key}_hidden_masked"] = m(enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state.numpy()

    np.savez_compressed(out / "reference.npz", **ref)
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({total / 1e3:.0f} KB)")


if __name__ == "__main__":
    main()
