"""spark_lab.tokenizer against llama.cpp: exact token ids on the recorded strings (both shipped
GGUFs and vocab-only variants), llama.cpp's detokenization, special-token and BOS rules, the
cache, and clear errors for bad files (tiny GGUFs written with gguf.GGUFWriter)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from spark_lab import models
from spark_lab import tokenizer as T
from spark_lab.tokenizer import Tokenizer

FIX = Path(__file__).parent / "fixtures"
NAMES = {"smollm2": "smollm2-135m-instruct", "gemma3": "gemma3-270m"}


def _fixture(name: str) -> dict:
    return json.loads((FIX / name).read_text(encoding="utf-8"))


def _path(short: str) -> Path:
    try:
        return models.resolve(NAMES[short])
    except models.ModelNotFound as e:
        pytest.skip(str(e))


_TOKS: dict[str, Tokenizer] = {}


def _tok(short: str) -> Tokenizer:
    if short not in _TOKS:
        _TOKS[short] = Tokenizer.from_gguf(_path(short))  # cached in ~/.cache/spark_lab/tokenizers
    return _TOKS[short]


def _mismatches(tok: Tokenizer, facts: dict, cases: list[dict]) -> list[str]:
    """Every recorded llama.cpp result that `tok` does not reproduce, one line each."""
    prefix = [facts["bos"]] if facts["add_bos"] else []
    suffix = [facts["eos"]] if facts["add_eos"] else []
    bad = []
    for c in cases:
        text, plain = c["text"], c["ids"]
        special = c.get("ids_special", plain)
        want = {
            "plain": (tok.encode(text, add_bos=False, add_eos=False), plain),
            "parse_special": (tok.encode(text, add_bos=False, add_eos=False, parse_special=True), special),
            "add_special": (tok.encode(text), c.get("ids_add_special", prefix + plain + suffix)),
            "add_special+parse": (tok.encode(text, parse_special=True),
                                  c.get("ids_add_special_parse", prefix + special + suffix)),
        }
        for what, (got, expected) in want.items():
            if got != expected:
                bad.append(f"{what} {text!r}: got {got} want {expected}")
    return bad


def _decode_mismatches(tok: Tokenizer, cases: list[dict]) -> list[str]:
    bad = []
    for c in cases:
        plain, special = c["ids"], c.get("ids_special", c["ids"])
        decoded = c.get("decoded", c["text"])  # absent: llama.cpp gave the text back
        decoded_special = c.get("decoded_special", decoded if "ids_special" not in c else c["text"])
        pairs = [(tok.decode_bytes(plain), decoded), (tok.decode_bytes(special), decoded_special)]
        if "decoded_special_skip" in c:
            pairs.append((tok.decode_bytes(special, skip_special=True), c["decoded_special_skip"]))
        for got, expected in pairs:
            if got.decode("utf-8", "backslashreplace") != expected:
                bad.append(f"{c['text']!r}: got {got!r} want {expected!r}")
    return bad


# ------------------------------------------------------------------ the shipped GGUFs

@pytest.mark.parametrize("short", ["smollm2", "gemma3"])
def test_token_ids_match_llamacpp(short):
    fx = _fixture(f"llamacpp_tokens_{short}.json")
    tok = _tok(short)
    assert len(fx["cases"]) >= 300
    bad = _mismatches(tok, fx["facts"], fx["cases"])
    assert not bad, f"{len(bad)} mismatches, e.g.\n" + "\n".join(bad[:8])


@pytest.mark.parametrize("short", ["smollm2", "gemma3"])
def test_decode_matches_llamacpp(short):
    fx = _fixture(f"llamacpp_tokens_{short}.json")
    tok = _tok(short)
    bad = _decode_mismatches(tok, fx["cases"])
    assert not bad, f"{len(bad)} mismatches, e.g.\n" + "\n".join(bad[:8])
    # wherever llama.cpp round-trips, so do we
    trips = [c for c in fx["cases"] if "decoded" not in c]
    assert len(trips) > 250
    assert all(tok.decode(tok.encode(c["text"], add_bos=False)) == c["text"] for c in trips)


@pytest.mark.parametrize("short", ["smollm2", "gemma3"])
def test_special_ids_match_llamacpp(short):
    facts = _fixture(f"llamacpp_tokens_{short}.json")["facts"]
    tok = _tok(short)
    assert tok.vocab_size == len(tok) == facts["n_vocab"]
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.add_eos) == (facts["bos"], facts["eos"], facts["add_bos"],
                                                                   facts["add_eos"])
    assert tok.eot_ids == set(facts["eog_ids"])
    assert sum(tok.is_special(i) for i in range(tok.vocab_size)) == facts["n_control"]


@pytest.mark.parametrize("short", ["smollm2", "gemma3"])
def test_generation_fixture_prompts(short):
    """The engine's greedy references: our ids for the prompts llama.cpp was fed, the chat
    template rendered with jinja2 as llama-cpp-python does, and the generated text."""
    import jinja2

    fx = _fixture(f"llamacpp_generate_{short}.json")
    tok = _tok(short)
    assert tok.eot_ids == set(fx["eog_ids"])
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    for r in fx["runs"]:
        assert tok.encode(r["prompt"], parse_special=True) == r["prompt_token_ids"]
        if "messages" in r:
            rendered = env.from_string(tok.chat_template).render(messages=r["messages"], add_generation_prompt=True)
            assert rendered == r["prompt"]
        assert tok.decode(r["token_ids"], skip_special=True) == r["text"]
        assert (r["finish_reason"] == "stop") == (r["token_ids"][-1] in tok.eot_ids)


def test_smollm2_special_parsing_and_bos():
    tok = _tok("smollm2")
    text = "<|im_start|>user\nHi<|im_end|>"
    on = tok.encode(text, parse_special=True)
    off = tok.encode(text, parse_special=False)
    im_start, im_end = tok.special_tokens["<|im_start|>"], tok.special_tokens["<|im_end|>"]
    assert on[0] == im_start and on[-1] == im_end and len(on) == 5
    assert im_start not in off and im_end not in off and len(off) > 10
    assert tok.decode(on) == text == tok.decode(off)
    assert tok.decode(on, skip_special=True) == "user\nHi"
    assert im_end in tok.eot_ids and tok.eos_id in tok.eot_ids
    # add_bos_token is false in this GGUF: no BOS unless asked
    assert tok.encode("hi") == tok.encode("hi", add_bos=False)
    assert tok.encode("hi", add_bos=True) == [tok.bos_id] + tok.encode("hi", add_bos=False)
    assert "im_start" in tok.chat_template


def test_gemma3_bos_user_defined_and_byte_fallback():
    tok = _tok("gemma3")
    assert tok.encode("hi")[0] == tok.bos_id == 2 and tok.encode("hi", add_bos=False)[0] != 2
    # user-defined tokens (whitespace runs) are split out even without parse_special
    assert tok.encode("a\n\nb", add_bos=False) == tok.encode("a\n\nb", add_bos=False, parse_special=True)
    eot = tok.special_tokens["<end_of_turn>"]
    assert eot in tok.eot_ids
    assert tok.encode("<end_of_turn>", add_bos=False, parse_special=True) == [eot]
    assert eot not in tok.encode("x<end_of_turn>", add_bos=False)
    # a character outside the vocabulary falls back to <0xXX> byte tokens: streaming must join bytes
    text = "\U0001d518"  # MATHEMATICAL FRAKTUR CAPITAL U
    ids = tok.encode(text, add_bos=False)
    pieces = [tok.token_bytes(i) for i in ids]
    assert b"".join(pieces) == text.encode() and tok.decode(ids) == text
    assert tok.token_text(ids[0]).startswith("<0x") and len(pieces[0]) == 1


_VARIANTS = {v["label"]: v for v in _fixture("llamacpp_tokens_variants.json")["variants"]}
_METAS: dict[str, dict] = {}


@pytest.mark.parametrize("label", [pytest.param(k, marks=pytest.mark.slow) if k.startswith("add_space") else k
                                   for k in _VARIANTS])
def test_variants_match_llamacpp(label):
    """Other `tokenizer.ggml.pre` regexes (gpt2, default, llama-bpe, qwen2) and the SPM space
    prefix (Llama-2 style) on the shipped vocabularies: llama.cpp ran on vocab-only GGUFs
    written with these keys changed."""
    v = _VARIANTS[label]
    if v["base"] not in _METAS:
        _METAS[v["base"]] = T.read_gguf_metadata(_path(v["base"].split("-")[0]))
    tok = Tokenizer.from_metadata({**_METAS[v["base"]], **v["overrides"]})
    assert (tok.bos_id, tok.add_bos) == (v["facts"]["bos"], v["facts"]["add_bos"])
    bad = _mismatches(tok, v["facts"], v["cases"]) + _decode_mismatches(tok, v["cases"])
    assert not bad, f"{len(bad)} mismatches, e.g.\n" + "\n".join(bad[:8])


def test_cache_hit_is_used_and_identical(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = _path("smollm2")
    first = Tokenizer.from_gguf(path)
    files = list((tmp_path / "spark_lab" / "tokenizers").glob("*.json"))
    assert len(files) == 2  # the tokenizers JSON and its small metadata

    def no_build(*a, **k):
        raise AssertionError("a cache hit must not rebuild the tokenizer")

    monkeypatch.setattr(T, "_build_hf", no_build)
    monkeypatch.setattr(T, "read_gguf_metadata", no_build)
    second = Tokenizer.from_gguf(path)
    text = "Cache me: <|im_start|>ünïcödé 12345 🙂\n\tdone"
    for parse in (False, True):
        assert first.encode(text, parse_special=parse) == second.encode(text, parse_special=parse)
    assert second.eot_ids == first.eot_ids and second.chat_template == first.chat_template
    ids = first.encode(text, parse_special=True)
    assert second.decode(ids) == first.decode(ids) == text
    tok_json = next(f for f in files if not f.name.endswith(".meta.json"))
    merges = json.loads(tok_json.read_text(encoding="utf-8"))["model"]["merges"]
    assert all(isinstance(m, str) for m in merges) and merges[0] == "Ġ t"   # the faster "a b" form
    long = " ".join(["tokenizers", "merge", "pairs:", "Ġhello", "world"] * 50)
    assert first.encode(long) == second.encode(long)


def test_merges_with_a_space_stay_pairs():
    doc = {"model": {"type": "BPE", "merges": [["a", "b"], ["c d", "e"]]}}
    assert json.loads(T._merges_as_strings(json.dumps(doc)))["model"]["merges"] == [["a", "b"], ["c d", "e"]]
    doc["model"]["merges"] = [["a", "b"], ["ab", "c"]]
    assert json.loads(T._merges_as_strings(json.dumps(doc)))["model"]["merges"] == ["a b", "ab c"]


# ------------------------------------------------------------------ tiny GGUFs (no model needed)

_B2U = T.BYTE_TO_CHAR


def _write(path: Path, kv: dict) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in kv.items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, np.ndarray):  # int -> INT32 array, float -> FLOAT32 array
            w.add_array(key, value.tolist())
        else:
            w.add_array(key, list(value))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _tiny_bpe(tmp_path, **extra) -> Path:
    base = [_B2U[b] for b in range(256)]
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d"]
    words = ["he", "ll", "hell", "hello", "Ġw", "or", "Ġwor", "Ġworl", "Ġworld"]
    tokens = ["<|endoftext|>", "<|im_end|>"] + base + words
    types = [3, 3] + [1] * (len(tokens) - 2)
    kv = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": tokens,
          "tokenizer.ggml.token_type": np.array(types, np.int32), "tokenizer.ggml.merges": merges,
          "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 0}
    kv.update(extra)
    return _write(tmp_path / "tiny_bpe.gguf", kv)


def test_tiny_bpe_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    tok = Tokenizer.from_gguf(_tiny_bpe(tmp_path))
    hello, world = tok.hf.token_to_id("hello"), tok.hf.token_to_id("Ġworld")
    assert tok.encode("hello world") == [hello, world]
    assert tok.encode("hello world<|im_end|>", parse_special=True) == [hello, world, 1]
    assert 1 not in tok.encode("hello world<|im_end|>")
    assert tok.eot_ids == {0, 1}
    text = "hello wörld, 'tis 12 ok"
    assert tok.decode(tok.encode(text)) == text
    assert tok.token_bytes(world) == b" world"
    # a GGUFReader works as well as a path
    same = Tokenizer.from_gguf(gguf.GGUFReader(str(tmp_path / "tiny_bpe.gguf")))
    assert same.encode(text) == tok.encode(text)
    # read from a reader without a file name: through its fields (slow path)
    meta = T._reader_metadata(gguf.GGUFReader(str(tmp_path / "tiny_bpe.gguf")))
    assert Tokenizer.from_metadata(meta).encode(text) == tok.encode(text)


def test_tiny_spm_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    pieces = ["▁", "h", "e", "l", "o", "he", "ll", "hell", "hello", "▁hello", "▁h"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(pieces))]
    scores[tokens.index("▁h")] = -100.0  # the worst merge: "▁hello" must win through "hello"
    kv = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
          "tokenizer.ggml.token_type": np.array(types, np.int32), "tokenizer.ggml.scores": np.array(scores, np.float32),
          "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0}
    tok = Tokenizer.from_gguf(_write(tmp_path / "tiny_spm.gguf", kv))
    ids = {t: i for i, t in enumerate(tokens)}
    # SPM defaults: BOS on, a space in front of the text, spaces as "▁"
    assert tok.encode("hello") == [1, ids["▁hello"]]
    # "é" is not in the vocabulary: its two UTF-8 bytes
    assert tok.encode("héllo", add_bos=False) == [ids["▁h"], ids["<0xC3>"], ids["<0xA9>"], ids["ll"], ids["o"]]
    # llama.cpp's detokenize drops the prefix space of the first token only
    assert tok.decode(tok.encode("héllo hello", add_bos=False)) == "héllo hello"
    assert tok.decode(tok.encode("héllo hello")) == "<s> héllo hello"
    assert tok.decode(tok.encode("héllo hello"), skip_special=True) == " héllo hello"
    assert tok.eot_ids == {2}


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        Tokenizer.from_gguf(tmp_path / "missing.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all, just bytes" * 4)
    with pytest.raises(ValueError, match="not a GGUF file"):
        Tokenizer.from_gguf(tmp_path / "junk.gguf")
    novocab = _write(tmp_path / "novocab.gguf", {"general.name": "nothing"})
    with pytest.raises(ValueError, match="no tokenizer vocabulary"):
        Tokenizer.from_gguf(novocab, cache=False)
    t5 = _write(tmp_path / "t5.gguf", {"tokenizer.ggml.model": "t5", "tokenizer.ggml.tokens": ["a", "b"]})
    with pytest.raises(ValueError, match="unsupported tokenizer model 't5'"):
        Tokenizer.from_gguf(t5, cache=False)
    with pytest.raises(ValueError, match="unknown pre-tokenizer 'brand-new'"):
        Tokenizer.from_gguf(_tiny_bpe(tmp_path, **{"tokenizer.ggml.pre": "brand-new"}), cache=False)
    nomerges = _write(tmp_path / "nomerges.gguf", {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
                                                    "tokenizer.ggml.tokens": ["a", "b"]})
    with pytest.raises(ValueError, match="merges"):
        Tokenizer.from_gguf(nomerges, cache=False)
    tok = Tokenizer.from_gguf(_tiny_bpe(tmp_path), cache=False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.token_bytes(10**6)
    with pytest.raises(ValueError, match="takes a str"):
        tok.encode(b"bytes")
