"""GGUF vocabulary -> a `tokenizers.Tokenizer` that splits text exactly as llama.cpp does.

A GGUF file carries its tokenizer as metadata: `tokenizer.ggml.model` names the algorithm,
`.tokens`/`.token_type`/`.scores`/`.merges` the vocabulary, `.pre` the pre-tokenizer. Two
models cover the kit's models and most GGUFs in the wild:

  gpt2   byte-level BPE (SmolLM2, Llama 3, Qwen2/3): text is cut by the regexes llama.cpp
         uses for `.pre`, every byte is mapped to a printable character, then the GGUF's merge
         list is applied by rank.
  llama  SentencePiece-style BPE (Gemma, Llama 2): spaces become "▁", then adjacent symbols
         merge greedily, highest-scoring vocabulary entry first; characters that never become
         a token fall back to `<0xXX>` byte tokens. llama.cpp merges any pair whose
         concatenation is in the vocabulary, so the merge list handed to `tokenizers` is every
         split of every token into two tokens, ranked by the merged token's score.

Control/unknown tokens (`<|im_start|>`, `<end_of_turn>`) are split out of the text only when
`parse_special=True`; user-defined tokens (Gemma's whitespace runs, `<div>`) always are, as in
llama.cpp's `tokenize(text, add_special, parse_special)`. Decoding mirrors llama.cpp's
`token_to_piece`/`detokenize` byte for byte, so the engine's streaming decoder can work on
`token_bytes(id)`.

Building the Gemma 3 tokenizer (262k tokens) takes seconds; the result is cached as JSON in
`models.cache_dir()/tokenizers/`, keyed by the file's path, size and mtime.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import numpy as np

from .ggml_types import GGUFValueType

CACHE_VERSION = 3  # bump when the way a tokenizer is built changes: old cache entries are then ignored

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# ------------------------------------------------------------------ pre-tokenizer regexes
# llama.cpp applies a list of regexes one after the other: each splits every piece into its
# matches and the gaps between them (both kept), which is `tokenizers`' Split(..., "isolated").

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN35 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# name -> (regexes, ignore_merges, add_bos default, clean_spaces on decode)
_PRE_FAMILIES = {
    "default": ([r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"], False, False, True),
    "gpt2": ([_GPT2], False, False, True),
    "starcoder": ([r"\p{N}", _GPT2], False, False, True),
    "llama3": ([_LLAMA3], True, True, True),
    "dbrx": ([_LLAMA3], False, False, True),
    "qwen2": ([_QWEN2], False, False, False),
    "qwen35": ([_QWEN35], False, False, False),
    "falcon": ([r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"], False, False, True),
}
# `tokenizer.ggml.pre` value -> (family, clean_spaces override or None), as llama.cpp reads it
PRE_ALIASES = {
    "default": ("default", None),
    **{k: ("gpt2", None) for k in ["gpt-2", "gpt2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es",
                                   "jina-v2-de", "a.x-4.0", "mellum", "modern-bert", "mpt", "olmo", "jais",
                                   "exaone4", "jina-v1-en", "jina-v2-code", "roberta-bpe"]},
    **{k: ("gpt2", False) for k in ["trillion", "granite-docling"]},
    **{k: ("starcoder", None) for k in ["starcoder", "refact", "codeshell", "exaone", "minerva-7b", "mellum2"]},
    **{k: ("starcoder", False) for k in ["smollm", "command-r"]},
    **{k: ("llama3", None) for k in ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                                     "midm-2.0", "lfm2", "jina-v5-nano"]},
    **{k: ("dbrx", None) for k in ["dbrx", "smaug-bpe"]},
    **{k: ("qwen2", None) for k in ["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "hunyuan",
                                    "solar-open"]},
    "stablelm2": ("qwen2", True),
    "qwen35": ("qwen35", None),
    "falcon": ("falcon", None),
}

# Token texts llama.cpp treats as end-of-generation (and forces to CONTROL), and FIM tokens
# it also stops on (llama-vocab.cpp, "special_eog_ids").
_EOG_TEXTS = {"<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
              "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
              "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
              "<｜end▁of▁sentence｜>", "[e~["}
_FIM_EOG_TEXTS = {"<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]",   # fim_pad
                  "<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>",  # fim_rep
                  "<|file_sep|>"}                                                # fim_sep
_FIM_OTHER_TEXTS = {"<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                    "<|code_prefix|>", "<|prefix|>", "<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>",
                    "<｜fim▁hole｜>", "<SUF>", "▁<SUF>", "<|code_suffix|>", "<|suffix|>", "<|fim_middle|>",
                    "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>", "<|code_middle|>",
                    "<|middle|>"}
_FORCED_CONTROL = _EOG_TEXTS | _FIM_EOG_TEXTS | _FIM_OTHER_TEXTS

# ------------------------------------------------------------------ reading GGUF metadata fast
def read_gguf_metadata(path: str | os.PathLike, prefixes: tuple[str, ...] = ("tokenizer.", "general.")) -> dict:
    """The key/value metadata of a GGUF file whose key starts with one of `prefixes`.

    Strings come back as str, string arrays as lists of bytes (token texts need not be valid
    UTF-8), numeric arrays as numpy arrays, scalars as Python numbers (spark_lab.gguf's reader:
    gguf.GGUFReader builds a numpy view per array element, ~40 s for Gemma's 262k tokens).
    """
    from .gguf import GGUFFile
    return {k: v for k, v in GGUFFile(path).metadata.items() if k.startswith(prefixes)}


# ------------------------------------------------------------------ vocabulary -> tokenizers

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable Latin-1 bytes stand for themselves,
    the other 68 bytes are shifted to U+0100 onwards."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shift = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shift)
            shift += 1
    return table


BYTE_TO_CHAR = _bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def _settings(meta: dict, where: str) -> dict:
    """Everything the tokenizer needs besides the big arrays, resolved the way llama.cpp does."""
    model = meta.get("tokenizer.ggml.model")
    if model is None or "tokenizer.ggml.tokens" not in meta:
        raise ValueError(f"{where} has no tokenizer vocabulary (tokenizer.ggml.model/tokens missing)")
    if model not in ("gpt2", "llama"):
        raise ValueError(f"{where}: unsupported tokenizer model {model!r} (spark_lab supports 'gpt2' "
                         "byte-level BPE and 'llama' SentencePiece-style BPE)")
    s = {"model": model, "pre": None, "family": None, "ignore_merges": False, "clean_spaces": False}
    if model == "gpt2":
        pre = meta.get("tokenizer.ggml.pre") or "default"  # llama.cpp: missing -> 'default' (with a warning)
        if pre not in PRE_ALIASES:
            raise ValueError(f"{where}: unknown pre-tokenizer {pre!r} (tokenizer.ggml.pre); known: "
                             f"{', '.join(sorted(PRE_ALIASES))}")
        family, clean = PRE_ALIASES[pre]
        _, ignore_merges, add_bos, family_clean = _PRE_FAMILIES[family]
        s.update(pre=pre, family=family, ignore_merges=ignore_merges,
                 clean_spaces=family_clean if clean is None else clean, add_space_prefix=False)
        s["add_bos"], s["add_eos"] = add_bos, False
        if "tokenizer.ggml.merges" not in meta:
            raise ValueError(f"{where}: gpt2 tokenizer without tokenizer.ggml.merges")
    else:
        s.update(pre=meta.get("tokenizer.ggml.pre") or "default", add_space_prefix=True, add_bos=True, add_eos=False)
        if meta.get("tokenizer.ggml.remove_extra_whitespaces"):
            raise ValueError(f"{where}: tokenizer.ggml.remove_extra_whitespaces is not supported")
    s["add_space_prefix"] = bool(meta.get("tokenizer.ggml.add_space_prefix", s["add_space_prefix"]))
    for k in ("add_bos", "add_eos"):
        if f"tokenizer.ggml.{k}_token" in meta:
            s[k] = bool(meta[f"tokenizer.ggml.{k}_token"])
    n = len(meta["tokenizer.ggml.tokens"])
    for k in ("bos", "eos", "eot", "eom", "unknown", "padding"):
        v = meta.get(f"tokenizer.ggml.{k}_token_id")
        s[f"{k}_id"] = int(v) if v is not None and 0 <= int(v) < n else None
    s["chat_template"] = meta.get("tokenizer.chat_template")
    if not isinstance(s["chat_template"], (str, type(None))):
        raise ValueError(f"{where}: tokenizer.chat_template is a {type(s['chat_template']).__name__}, not a string")
    s["name"] = meta.get("general.name", "")
    return s


def _token_texts(raw: list[bytes]) -> list[str]:
    texts = [t.decode("utf-8", "replace") for t in raw]
    for i, t in enumerate(texts):
        if not t:  # llama.cpp renames empty tokens
            texts[i] = f"[EMPTY_{i}]"
    return texts


def _resolve_types(texts: list[str], types: np.ndarray, s: dict) -> tuple[dict[int, int], list[int]]:
    """Non-normal token types after llama.cpp's fix-ups, and its end-of-generation ids."""
    out = {int(i): int(types[i]) for i in np.nonzero(types != NORMAL)[0]}
    eog = set()
    for i, t in enumerate(texts):
        if t in _FORCED_CONTROL:
            out[i] = CONTROL  # llama.cpp forces these to CONTROL whatever the file says
            if t not in _FIM_OTHER_TEXTS:
                eog.add(i)
    for k in ("eos_id", "eot_id", "eom_id"):
        if s[k] is not None:
            eog.add(s[k])
    # gpt-oss (harmony): <|end|> closes a message, not the answer, when <|return|> and <|call|> exist
    # (llama.cpp drops it from the end-of-generation set the same way and renders it as user-defined)
    eog_texts = {texts[i]: i for i in eog}
    if {"<|return|>", "<|call|>", "<|end|>"} <= eog_texts.keys():
        eog.discard(eog_texts["<|end|>"])
        out[eog_texts["<|end|>"]] = USER_DEFINED
    return out, sorted(eog)


def _merges_as_strings(doc: str) -> str:
    """A saved BPE tokenizer (JSON text) with its merges as "a b" strings instead of [a, b] pairs, the
    older form that tokenizers reads faster (SmolLM2's 48k merges: a cold load 77 -> 63 ms); unchanged
    where a token of a merge holds a space (the string would split in the wrong place)."""
    d = json.loads(doc)
    merges = (d.get("model") or {}).get("merges")
    if not merges or not all(isinstance(m, list) and len(m) == 2 and " " not in m[0] + m[1] for m in merges):
        return doc
    d["model"]["merges"] = [f"{a} {b}" for a, b in merges]
    return json.dumps(d, ensure_ascii=False, separators=(",", ":"))


def _spm_merges(texts: list[str], vocab: dict[str, int], scores: np.ndarray) -> list[tuple[str, str]]:
    """Every (left, right) split of every token into two tokens, best merged score first.

    llama.cpp's SPM tokenizer merges the adjacent pair whose concatenation has the highest
    score; ranking the pairs by that score gives `tokenizers`' BPE the same order."""
    order = np.lexsort((np.arange(len(texts)), -np.asarray(scores, np.float64)))  # score desc, then id
    merges = []
    add = merges.append
    for tid in order.tolist():
        tok = texts[tid]
        if len(tok) < 2 or vocab[tok] != tid:
            continue
        for i in range(1, len(tok)):
            left = tok[:i]
            if left in vocab:
                right = tok[i:]
                if right in vocab:
                    add((left, right))
    return merges


def _build_hf(meta: dict, s: dict, texts: list[str], types: dict[int, int]):
    """The `tokenizers.Tokenizer` for the text between special tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = {t: i for i, t in enumerate(texts)}  # duplicates: the last id wins, as in llama.cpp
    if s["model"] == "gpt2":
        merges = []
        for m in meta["tokenizer.ggml.merges"]:
            m = m.decode("utf-8", "replace")
            cut = m.find(" ", 1)
            if cut > 0:
                merges.append((m[:cut], m[cut + 1:]))
        model = models.BPE(vocab, merges, ignore_merges=s["ignore_merges"], fuse_unk=False)
        hf = HFTokenizer(model)
        regexes = _PRE_FAMILIES[s["family"]][0]
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        hf.decoder = decoders.ByteLevel()
    else:
        scores = meta.get("tokenizer.ggml.scores")
        scores = np.zeros(len(texts), np.float32) if scores is None else np.asarray(scores, np.float32)
        unk = texts[s["unknown_id"]] if s["unknown_id"] is not None else None
        model = models.BPE(vocab, _spm_merges(texts, vocab, scores), unk_token=unk, byte_fallback=True, fuse_unk=False)
        hf = HFTokenizer(model)
        norm = [normalizers.Replace(" ", "▁")]
        if s["add_space_prefix"]:
            norm.insert(0, normalizers.Prepend("▁"))  # every text piece, as llama.cpp after each special
        hf.normalizer = normalizers.Sequence(norm)
        hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    # llama.cpp cuts CONTROL, UNKNOWN and USER_DEFINED tokens out of the raw text before the
    # model runs; CONTROL/UNKNOWN only with parse_special (= tokenizers' "special" tokens).
    added = [AddedToken(texts[i], special=(t != USER_DEFINED), normalized=False)
             for i, t in sorted(types.items()) if t in (CONTROL, UNKNOWN, USER_DEFINED)]
    hf.add_tokens(added)
    return hf


# ------------------------------------------------------------------ the tokenizer

class Tokenizer:
    """A GGUF model's tokenizer: `encode`/`decode` that agree with llama.cpp token for token.

    Attributes: `bos_id`, `eos_id`, `eot_ids` (llama.cpp's end-of-generation set: eos, eot and
    e.g. `<|im_end|>`, `<end_of_turn>`), `chat_template` (Jinja string or None), `vocab_size`,
    `special_tokens` ({text: id} of control and user-defined tokens), `hf` (the wrapped
    `tokenizers.Tokenizer`), `model` ("gpt2" | "llama"), `pre`.
    """

    def __init__(self, hf, settings: dict, types: dict[int, int], eog_ids: list[int], vocab_size: int,
                 extra_texts: dict[int, str] | None = None):
        self.hf = hf
        self.model: str = settings["model"]
        self.pre: str | None = settings["pre"]
        self.bos_id: int | None = settings["bos_id"]
        self.eos_id: int | None = settings["eos_id"]
        self.eot_id: int | None = settings["eot_id"]
        self.unk_id: int | None = settings["unknown_id"]
        self.pad_id: int | None = settings["padding_id"]
        self.add_bos: bool = settings["add_bos"]
        self.add_eos: bool = settings["add_eos"]
        self.add_space_prefix: bool = settings["add_space_prefix"]
        self.clean_spaces: bool = settings["clean_spaces"]
        self.chat_template: str | None = settings["chat_template"]
        self.vocab_size = vocab_size
        self.token_types = types                    # {id: type} for every non-NORMAL token
        self.eot_ids: frozenset[int] = frozenset(eog_ids)
        self._settings = settings
        self._extra_texts = extra_texts or {}       # ids whose text is a duplicate (absent from hf)
        self._pieces: dict[int, bytes] = {}
        self._lock = threading.Lock()
        self.special_tokens = {self.token_text(i): i for i, t in types.items() if t in (CONTROL, USER_DEFINED, UNKNOWN)}

    # ------------------------------------------------------------ loading

    @classmethod
    def from_gguf(cls, path_or_reader, cache: bool = True) -> "Tokenizer":
        """Build from a `.gguf` path (or a `gguf.GGUFReader`); cached in models.cache_dir()."""
        path = _path_of(path_or_reader)
        cache_file = _cache_path(path) if cache and path is not None else None
        if cache_file is not None and cache_file.exists():
            try:
                return cls._from_cache(cache_file)
            except Exception:  # a stale or corrupt cache entry is rebuilt
                pass
        meta = read_gguf_metadata(path) if path is not None else _reader_metadata(path_or_reader)
        tok = cls.from_metadata(meta, where=str(path or "GGUF reader"))
        if cache_file is not None:
            tok._save(cache_file)
        return tok

    @classmethod
    def from_metadata(cls, meta: dict, where: str = "GGUF metadata") -> "Tokenizer":
        """Build from a {key: value} dict as `read_gguf_metadata` returns it (no cache); metadata of the
        wrong type (a number where a list belongs, merges naming unknown tokens) -> one ValueError line."""
        try:
            return cls._from_metadata(meta, where)
        except ValueError:
            raise
        except Exception as e:      # TypeError, IndexError, tokenizers' own Exception from a bad vocabulary
            raise ValueError(f"{where}: bad tokenizer metadata ({type(e).__name__}: {str(e)[:160]})") from None

    @classmethod
    def _from_metadata(cls, meta: dict, where: str) -> "Tokenizer":
        s = _settings(meta, where)
        texts = _token_texts(meta["tokenizer.ggml.tokens"])
        raw_types = meta.get("tokenizer.ggml.token_type")
        raw_types = np.full(len(texts), NORMAL, np.int32) if raw_types is None else np.asarray(raw_types, np.int32)
        if len(raw_types) < len(texts):
            raise ValueError(f"{where}: {len(raw_types)} token types for {len(texts)} tokens")
        types, eog = _resolve_types(texts, raw_types[:len(texts)], s)
        hf = _build_hf(meta, s, texts, types)
        last = {t: i for i, t in enumerate(texts)}
        extra = {i: t for i, t in enumerate(texts) if last[t] != i}
        return cls(hf, s, types, eog, len(texts), extra)

    def _save(self, cache_file: Path) -> None:
        small = {"version": CACHE_VERSION, "settings": self._settings, "vocab_size": self.vocab_size,
                 "types": {str(k): v for k, v in self.token_types.items()}, "eog": sorted(self.eot_ids),
                 "extra": {str(k): v for k, v in self._extra_texts.items()}}
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        try:
            tmp.write_text(_merges_as_strings(self.hf.to_str()), encoding="utf-8")
            meta_tmp = tmp.with_suffix(".meta")
            meta_tmp.write_text(json.dumps(small))
            meta_tmp.replace(cache_file.with_suffix(".meta.json"))
            tmp.replace(cache_file)  # the tokenizer file last: it marks the cache entry complete
        except OSError:
            pass  # a read-only cache only costs speed

    @classmethod
    def _from_cache(cls, cache_file: Path) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        small = json.loads(cache_file.with_suffix(".meta.json").read_text())
        if small.get("version") != CACHE_VERSION:
            raise ValueError("old cache")
        hf = HFTokenizer.from_file(str(cache_file))
        return cls(hf, small["settings"], {int(k): v for k, v in small["types"].items()}, small["eog"],
                   small["vocab_size"], {int(k): v for k, v in small["extra"].items()})

    # ------------------------------------------------------------ encode / decode

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = False,
               add_eos: bool | None = None) -> list[int]:
        """Text -> token ids, as llama.cpp's `tokenize(text, add_special, parse_special)`.

        add_bos/add_eos None follow the GGUF (`tokenizer.ggml.add_bos_token`, ...), which is
        llama.cpp's add_special=True; True/False force them. parse_special=True turns the text
        of control tokens (`<|im_start|>`) into those tokens; False encodes it as plain text.
        """
        if not isinstance(text, str):
            raise ValueError(f"encode() takes a str, got {type(text).__name__}")
        add_bos = self.add_bos if add_bos is None else add_bos
        add_eos = self.add_eos if add_eos is None else add_eos
        if (add_bos and self.bos_id is None) or (add_eos and self.eos_id is None):
            raise ValueError("this tokenizer has no BOS/EOS token to add")
        with self._lock:
            self.hf.encode_special_tokens = not parse_special
            ids = self.hf.encode(text, add_special_tokens=False).ids if text else []
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def token_text(self, token_id: int) -> str:
        """The vocabulary entry itself (e.g. 'Ġhello', '▁hello', '<0x0A>')."""
        if token_id in self._extra_texts:
            return self._extra_texts[token_id]
        t = self.hf.id_to_token(int(token_id))
        if t is None:
            raise ValueError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        return t

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (llama.cpp's token_to_piece with special=True).

        A token may be part of a UTF-8 character (`<0xE2>`, or a byte-level piece): join the
        bytes of consecutive tokens before decoding them."""
        piece = self._pieces.get(token_id)
        if piece is None:
            piece = self._pieces[token_id] = self._piece(int(token_id))
        return piece

    def _piece(self, i: int) -> bytes:
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
        text, kind = self.token_text(i), self.token_types.get(i, NORMAL)
        if kind in (CONTROL, UNKNOWN, USER_DEFINED):
            return text.encode("utf-8")
        if kind == BYTE:
            return bytes([int(text[3:5], 16)]) if self.model == "llama" else bytes([CHAR_TO_BYTE.get(text, 0)])
        if kind != NORMAL:  # UNUSED / undefined: llama.cpp prints nothing
            return b""
        if self.model == "llama":
            return text.replace("▁", " ").encode("utf-8")
        return b"".join(bytes([CHAR_TO_BYTE[c]]) if c in CHAR_TO_BYTE else c.encode("utf-8") for c in text)

    def is_special(self, token_id: int) -> bool:
        """Control/unknown tokens: hidden by decode(skip_special=True)."""
        return self.token_types.get(int(token_id), NORMAL) in (CONTROL, UNKNOWN)

    def decode_bytes(self, ids, skip_special: bool = False) -> bytes:
        """Token ids -> bytes, as llama.cpp's detokenize(remove_special=False, unparse_special=not skip_special)."""
        out = bytearray()
        for k, i in enumerate(ids):
            i = int(i)
            if skip_special and self.is_special(i):
                continue
            piece = self.token_bytes(i)
            if k == 0 and self.add_space_prefix and piece.startswith(b" "):
                piece = piece[1:]  # the space the encoder put in front of the text
            out += piece
        if self.clean_spaces:
            out = _clean_spaces(bytes(out))
        return bytes(out)

    def decode(self, ids, skip_special: bool = False) -> str:
        """Token ids -> text (invalid UTF-8 from a cut-off byte sequence becomes U+FFFD)."""
        return self.decode_bytes(ids, skip_special).decode("utf-8", "replace")

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer(model={self.model!r}, pre={self.pre!r}, vocab_size={self.vocab_size}, "
                f"bos={self.bos_id}, eos={self.eos_id}, eot_ids={sorted(self.eot_ids)})")


def _clean_spaces(b: bytes) -> bytes:
    """llama.cpp's clean_up_tokenization_spaces, pass for pass: " ?" -> "?", " ' " -> "'",
    " 's" -> "'s" (in place over a byte buffer, as the C++ does)."""
    t = bytearray(b)
    n = len(t)
    total = 1 if n else 0
    for i in range(1, n):                       # " ?", " !", " .", " ,"
        x = t[i]
        if t[i - 1] == 0x20 and x in b"?!.,":
            total -= 1
        t[total] = x
        total += 1
    n, total, i = total, (1 if total else 0), 1
    while i < n:                                # " ' " -> "'"
        x = t[i]
        if x == 0x27 and i + 1 < n and t[i - 1] == 0x20 and t[i + 1] == 0x20:
            total -= 1
            i += 1
            t[i] = 0
        t[total] = x
        total += 1
        i += 1
    n, total = total, (1 if total else 0)
    for i in range(1, n):                       # " 's", " 'm", " 're", " 've" (not " 't", " 'd", " 'll")
        x = t[i]
        if t[i - 1] == 0x20 and x == 0x27 and i + 1 < n:
            x1 = t[i + 1]
            if x1 in b"sm":
                total -= 1
            elif x1 not in b"td" and i + 2 < n and bytes(t[i + 1:i + 3]) in (b"re", b"ve"):
                total -= 1
        t[total] = x
        total += 1
    return bytes(t[:total])


# ------------------------------------------------------------------ helpers

def _path_of(path_or_reader) -> Path | None:
    if isinstance(path_or_reader, (str, os.PathLike)):
        p = Path(path_or_reader).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"no GGUF file at {p}")
        return p.resolve()
    data = getattr(path_or_reader, "data", None)  # gguf.GGUFReader keeps an np.memmap of the file
    name = getattr(data, "filename", None)
    return Path(name).resolve() if name else None


def _reader_metadata(reader) -> dict:
    """A GGUFReader's fields as read_gguf_metadata would return them (slow, for readers of
    files that no longer have a path)."""
    out = {}
    for key, field in reader.fields.items():
        if not key.startswith(("tokenizer.", "general.")):
            continue
        if len(field.types) > 1 and field.types[0] == GGUFValueType.ARRAY and field.types[1] == GGUFValueType.STRING:
            out[key] = [bytes(field.parts[i]) for i in field.data]
        elif field.types and field.types[0] == GGUFValueType.ARRAY:
            out[key] = np.asarray(field.contents())
        else:
            out[key] = field.contents()
    return out


def _cache_path(path: Path) -> Path:
    from .models import cache_dir

    import tokenizers

    st = path.stat()
    key = f"{CACHE_VERSION}|{tokenizers.__version__}|{path}|{st.st_size}|{st.st_mtime_ns}"
    key = hashlib.sha256(key.encode()).hexdigest()[:32]
    return cache_dir() / "tokenizers" / f"{key}.json"


def load(name_or_path) -> Tokenizer:
    """The tokenizer of a catalogue model name or a .gguf path."""
    from .models import resolve

    return Tokenizer.from_gguf(resolve(name_or_path, kind="llm"))
