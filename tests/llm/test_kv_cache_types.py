"""KV cache storage types (llama.cpp's --cache-type-k/v): f32, f16, q8_0; lazily touched memory."""
import numpy as np
import pytest

from spark_lab.kernels.decode_attention import attention_into
from spark_lab.llm.cache import KVCache
from spark_lab.llm.engine import LLM
from tests.kernels.numpy_attention import kernel_query, numpy_attention, tolerance
from tests.llm.tiny import write_tiny_gguf


def _kv(seed=0, T=40, Hkv=2, D=64):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((T, Hkv, D), dtype=np.float32), rng.standard_normal((T, Hkv, D), dtype=np.float32)


def test_stored_values_round_as_their_type():
    k, v = _kv()
    for t in ("f32", "f16", "q8_0"):
        c = KVCache(2, 64, 2, 64, type_k=t, type_v=t)
        c.write(1, 3, k, v)
        ks, vs = c.rows(1, 3, 43)
        if t == "f32":
            assert np.array_equal(ks, k)
        elif t == "f16":
            assert np.array_equal(ks, k.astype(np.float16).astype(np.float32))
        else:                                          # q8_0: half a step of max|x|/127 per 32 values, plus the
            step = np.abs(k.reshape(40, 2, 2, 32)).max(-1, keepdims=True) / 127   # step's float16 rounding
            err = np.abs(ks - k).reshape(40, 2, 2, 32) / step                     # (127 codes x 2^-11 of it)
            assert (err <= 0.5 + 127 * 2.0 ** -11 + 1e-4).all() and err.max() > 0.5   # llama.cpp's block
        assert ks.shape == vs.shape == (40, 2, 64)
    # q8_0 is llama.cpp's 34 bytes per 32 values (a float16 scale): 2 layers x 64 positions x 2 heads
    assert KVCache(2, 64, 2, 64, type_k="q8_0", type_v="f16").nbytes == 2 * 64 * 2 * (64 + 4) + 2 * 64 * 2 * 64 * 2



def test_q8_0_tiles_hold_the_row_layouts_numbers():
    # keys and values live in tiles of 16 positions (llm/cache.py): any span, a context that is not a multiple of 16,
    # a slot of a pool; rows() reads back what the row layout (quantize_q8_rows) stores
    from spark_lab.llm.cache import quantize_q8_rows
    k, v = _kv(3, T=50)
    for c in (KVCache(2, 53, 2, 64, type_k="q8_0", type_v="q8_0"),
              KVCache.pooled(3, 2, 53, 2, 64, type_k="q8_0", type_v="f16")[1]):
        c.write(1, 0, k[:7], v[:7])
        c.write(1, 7, k[7:], v[7:])                   # a write that starts inside a tile
        assert c.k.shape[-3:] == (4, 2, 64 * 16) and c.k.dtype == np.uint8
        q, d = quantize_q8_rows(k)
        want = (q.reshape(50, 2, 2, 32).astype(np.float32) * d[..., None]).reshape(50, 2, 64)
        assert np.array_equal(c.rows(1, 0, 50)[0], want)
        assert np.array_equal(c.rows(1, 13, 35)[0], want[13:35])
        assert not c.rows(0, 0, 50)[0].any()          # the other layer untouched
        if c.type_v == "q8_0":                        # values: tiles too, 4 keys of a value dim per dword
            assert c.v.shape[-3:] == (4, 2, 64 * 16) and c.v.dtype == np.uint8
            q, d = quantize_q8_rows(v)
            want = (q.reshape(50, 2, 2, 32).astype(np.float32) * d[..., None]).reshape(50, 2, 64)
            assert np.array_equal(c.rows(1, 0, 50)[1], want)
            assert np.array_equal(c.rows(1, 13, 35)[1], want[13:35])
            tile = c.v[1, 1, 1].view(np.int8).reshape(2, 4, 32, 4)   # tile 1 (positions 16..31), head 1
            assert tile[1, 2, 5, 3] == q[16 + 4 * 2 + 3, 1, 32 + 5]  # block 1, quad 2, dim 5, key 3


def test_decode_kernel_reads_each_type_as_its_widened_values():
    k, v = _kv(1)
    q = np.random.default_rng(2).standard_normal((8, 64), dtype=np.float32)
    for tk, tv in (("f16", "f16"), ("q8_0", "q8_0"), ("f16", "q8_0"), ("f32", "q8_0")):
        c = KVCache(1, 64, 2, 64, type_k=tk, type_v=tv)
        c.write(0, 0, k, v)
        kw, vw = c.rows(0, 0, 40)
        qw = kernel_query(q, 0.125, tk)                # q8_0 keys: the query quantized as llama.cpp does
        want = numpy_attention(qw[None], kw, vw, causal=True, q_offset=39, window=None, scale=1.0)[0]
        out = np.empty((8, 64), np.float32)
        assert attention_into(q, c.k[0], c.v[0], 0.125, 5, 40, out,
                              None if c.k_scale is None else c.k_scale[0], None if c.v_scale is None else c.v_scale[0])
        want5 = numpy_attention(qw[None], kw[5:], vw[5:], causal=True, q_offset=34, window=None, scale=1.0)[0]
        np.testing.assert_allclose(out, want5, **tolerance(tv, vw, rtol=1e-5, atol=1e-6))
        assert attention_into(q, c.k[0], c.v[0], 0.125, 0, 40, out,
                              None if c.k_scale is None else c.k_scale[0], None if c.v_scale is None else c.v_scale[0])
        np.testing.assert_allclose(out, want, **tolerance(tv, vw, rtol=1e-5, atol=1e-6))


@pytest.mark.parametrize("t, tol", [("f16", 1e-3), ("q8_0", 5e-2)])
def test_generation_with_a_smaller_cache_stays_close(tmp_path, t, tol):
    # stated tolerance: logits after prompt + 6 decoded tokens, max |diff| / max |logit| of the f32
    # cache's run: f16 <= 1e-3 (4e-4..8e-4 seen), q8_0 <= 5e-2 (6e-3 seen on the prompt; on the decoded
    # tokens 1.3e-2..1.9e-2, and 3.3e-2 on the 5th step on a Zen 3 AVX2 box) (llama.cpp's q8_0 K/V
    # rounds the same way)
    p = write_tiny_gguf(tmp_path / "m.gguf", d=64, n_head=2, n_kv=1, ff=128)   # head_dim 32
    prompt = list(range(40, 60))
    ref, got = LLM(p, n_ctx=64), LLM(p, n_ctx=64, cache_type_k=t, cache_type_v=t)
    assert got.cache.type_k == got.cache.type_v == t
    toks = ref.generate(prompt, max_new_tokens=6, temperature=0).token_ids
    a, b = ref._logits(prompt + toks, 0), got._logits(prompt + toks, 0)     # prefill path
    assert np.abs(a - b).max() <= tol * np.abs(a).max()
    ref.reset(), got.reset()
    ref.prefill(prompt), got.prefill(prompt)
    for i, tok in enumerate(toks):                                            # decode path, step by step
        a, b = ref._logits([tok], len(prompt) + i), got._logits([tok], len(prompt) + i)
        assert np.abs(a - b).max() <= tol * np.abs(a).max()


def test_bad_cache_type_is_one_line():
    with pytest.raises(ValueError, match="unknown K cache type 'q4'"):
        KVCache(1, 8, 1, 32, type_k="q4")
    with pytest.raises(ValueError, match="head_dim a multiple of 32"):
        KVCache(1, 8, 1, 8, type_v="q8_0")


def test_f16_widening_is_exact_for_every_finite_value():
    # one visible key: the output is its value row exactly; every finite float16 bit pattern once
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    vals = bits.view(np.float16)
    vals = vals[np.isfinite(vals)].reshape(-1, 1, 32)                     # [T, 1 head, 32]
    c = KVCache(1, len(vals), 1, 32, type_k="f16", type_v="f16")
    c.write(0, 0, np.zeros_like(vals, dtype=np.float32), vals.astype(np.float32))
    q, out = np.zeros((1, 32), np.float32), np.empty((1, 32), np.float32)
    got = np.empty_like(vals, dtype=np.float32)
    for t in range(len(vals)):
        attention_into(q, c.k[0], c.v[0], 1.0, t, t + 1, out)
        got[t] = out
    assert np.array_equal(got, vals.astype(np.float32))                  # exact (-0.0 comes out as 0.0)
