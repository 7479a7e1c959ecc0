"""LLM.load (config_from_gguf, the tokenizer, the weights) on a tiny model whose metadata a stranger
edited: it loads and generates, or refuses with one ValueError line; nothing else escapes."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from spark_lab.llm.engine import LLM

from ..llm.tiny import write_tiny_gguf
from .budget import budget, case_dir
from .ggufgen import V, build, entries_of

CONFIG_KEYS = ["llama.embedding_length", "llama.attention.head_count", "llama.attention.head_count_kv",
               "llama.block_count", "llama.feed_forward_length", "llama.context_length", "llama.vocab_size",
               "llama.attention.key_length", "llama.rope.dimension_count", "llama.rope.freq_base",
               "llama.attention.layer_norm_rms_epsilon", "llama.rope.scaling.type", "llama.rope.scaling.factor",
               "general.architecture", "general.alignment", "tokenizer.ggml.model", "tokenizer.ggml.pre",
               "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.tokens",
               "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.scores",
               "tokenizer.chat_template", "tokenizer.ggml.add_bos_token"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    p = write_tiny_gguf(tmp_path_factory.mktemp("load") / "tiny.gguf", n_layer=1, d=16, n_head=2, n_kv=1, ff=32)
    LLM.load(p, n_ctx=16).generate([1, 2], max_new_tokens=2, temperature=0.0)   # compile outside the cases
    return _Model(*entries_of(p))


class _Model(tuple):
    """(entries, tensors), with a short repr for Hypothesis' failure reports."""
    def __new__(cls, entries, tensors):
        return super().__new__(cls, (entries, tensors))

    def __repr__(self):
        return "tiny-llama"


values = st.one_of(
    st.tuples(st.just(V.UINT32), st.integers(0, 2**32 - 1)),
    st.tuples(st.just(V.INT32), st.integers(-2**31, 2**31 - 1)),
    st.tuples(st.just(V.UINT64), st.sampled_from([0, 1, 2, 7, 8, 16, 2**31, 2**40, 2**64 - 1])),
    st.tuples(st.just(V.FLOAT32), st.sampled_from([0.0, -1.0, 1e-30, 1e30, math.inf, -math.inf, math.nan, 0.5])),
    st.tuples(st.just(V.BOOL), st.booleans()),
    st.tuples(st.just(V.STRING), st.sampled_from(["", "llama", "gpt2", "yarn", "linear", "bogus", "qwen3moe",
                                                 "{{ x", "{% for %}"]) | st.text(max_size=8)),
    st.tuples(st.just((V.ARRAY, V.STRING)), st.lists(st.binary(max_size=4), max_size=4)),
    st.tuples(st.just((V.ARRAY, V.INT32)), st.lists(st.integers(-5, 300), max_size=4)),
    st.tuples(st.just((V.ARRAY, V.FLOAT32)), st.lists(st.floats(width=32, allow_nan=True), max_size=4)),
)


@budget(300)
@given(st.lists(st.tuples(st.sampled_from(CONFIG_KEYS), values | st.none()), min_size=1, max_size=3))
def test_edited_metadata(tiny, tmp_path_factory, edits):
    entries, tensors = tiny
    entries = {k: (k, vt, v) for k, vt, v in entries}
    for key, new in edits:
        if new is None:
            entries.pop(key, None)
        else:
            entries[key] = (key, *new)
    path = case_dir(tmp_path_factory) / "edited.gguf"
    path.write_bytes(build(list(entries.values()), tensors))
    try:
        llm = LLM.load(path, n_ctx=16)
    except ValueError as e:               # GGUFError, TemplateError, the tokenizer's ValueErrors
        assert str(e) and "\n" not in str(e), repr(str(e))
        return
    ids = llm.tokenizer.encode("hi there", add_bos=False)
    out = llm.generate(ids or [0], max_new_tokens=2, temperature=0.0)
    assert len(out.token_ids) <= 2


def test_alignment_1_reads_shifted_weights_without_an_exception(tiny, tmp_path):
    """Found by `make fuzz`: general.alignment = 1 moves the data start, the weights read as NaN, and the
    numba softmax raised ZeroDivisionError on an all-NaN row. Garbage weights give garbage tokens, not a traceback."""
    entries, tensors = tiny
    entries = list({e[0]: e for e in entries + [("general.alignment", V.UINT32, 1)]}.values())
    (tmp_path / "a1.gguf").write_bytes(build(entries, tensors))
    out = LLM.load(tmp_path / "a1.gguf", n_ctx=16).generate([1, 2], max_new_tokens=2, temperature=0.0)
    assert len(out.token_ids) <= 2


@pytest.mark.parametrize("value", [((V.ARRAY, V.STRING), []), ((V.ARRAY, V.INT32), [32]), (V.FLOAT32, 32.0),
                                   (V.BOOL, True), (V.STRING, "32")])
def test_alignment_of_the_wrong_type_is_refused(tiny, tmp_path, value):
    """Found by `make fuzz`: general.alignment as an empty string array raised TypeError comparing it to 0."""
    entries, tensors = tiny
    entries = list({e[0]: e for e in entries + [("general.alignment", *value)]}.values())
    (tmp_path / "at.gguf").write_bytes(build(entries, tensors))
    with pytest.raises(ValueError, match="general.alignment = .* is not a power of two"):
        LLM.load(tmp_path / "at.gguf", n_ctx=16)


def test_forged_head_count_cannot_ask_for_a_giant_cache(tiny, tmp_path):
    """The KV cache is sized by head_count_kv * head_dim: metadata that disagrees with the weights is refused."""
    entries, tensors = tiny
    entries = [e if e[0] != "llama.attention.key_length" else (e[0], V.UINT32, 2**20) for e in entries]
    entries.append(("llama.attention.key_length", V.UINT32, 2**20))
    entries = list({e[0]: e for e in entries}.values())
    (tmp_path / "big.gguf").write_bytes(build(entries, tensors))
    with pytest.raises(ValueError, match="attn_q.weight' has shape"):
        LLM.load(tmp_path / "big.gguf", n_ctx=16)


def test_tiny_model_still_loads(tiny, tmp_path):
    entries, tensors = tiny
    (tmp_path / "ok.gguf").write_bytes(build(entries, tensors))
    llm = LLM.load(tmp_path / "ok.gguf", n_ctx=16)
    assert llm.config.n_embd == 16 and llm.config.n_head == 2 and llm.config.n_vocab == 261
    assert np.isfinite(llm._logits([1, 2, 3], 0)).all()


def test_negative_rms_epsilon_is_refused(tiny, tmp_path):
    """Found by make fuzz: epsilon -1 made RMSNorm's square root NaN and the attention kernel divide by zero."""
    entries, tensors = tiny
    entries = [(k, vt, -1.0 if k == "llama.attention.layer_norm_rms_epsilon" else v) for k, vt, v in entries]
    (tmp_path / "e.gguf").write_bytes(build(entries, tensors))
    with pytest.raises(ValueError, match="rms_eps"):
        LLM.load(tmp_path / "e.gguf", n_ctx=16)
