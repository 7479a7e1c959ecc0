"""spark_lab.llm.decode: the fused one-token step against Transformer.forward (the reference)."""
import numpy as np
import pytest

from spark_lab.llm import LLM
from spark_lab.llm import decode as D
from spark_lab.llm.cache import KVCache

from .tiny import write_tiny_gguf

pytest.importorskip("numba")


def step_and_reference(model, ids, n_ctx, cache_rtol=1e-4):
    """Logits for ids[-1] after ids[:-1]: (Decoder.step, forward with the decoder switched off)."""
    c = model.config
    caches = [KVCache(c.n_layer, n_ctx, c.n_head_kv, c.head_dim) for _ in range(2)]
    model._dec = False
    for cache in caches:
        model.forward(np.array(ids[:-1]), 0, cache)
    ref = model.forward(np.array(ids[-1:]), len(ids) - 1, caches[1])
    model._dec = None
    assert model._decoder() is not None
    got = model.forward(np.array(ids[-1:]), len(ids) - 1, caches[0])
    n = len(ids)                                                       # the step wrote the same keys/values
    for a, b in ((caches[0].k[:, :n], caches[1].k[:, :n]), (caches[0].v[:, :n], caches[1].v[:, :n])):
        np.testing.assert_allclose(a, b, rtol=cache_rtol, atol=cache_rtol * np.abs(b).max())
    return got, ref


@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q4_1"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_step_matches_forward_on_tiny_models(tmp_path, arch, qtype):
    import gguf
    p = write_tiny_gguf(tmp_path / "m.gguf", arch=arch, d=64, ff=128, qtype=getattr(gguf.GGMLQuantizationType, qtype))
    m = LLM(p, n_ctx=64).model
    ids = list(range(40, 60))
    got, ref = step_and_reference(m, ids, 64)
    assert got.shape == ref.shape == (1, m.config.n_vocab) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_step_fills_the_context_then_refuses(tmp_path):
    m = LLM(write_tiny_gguf(tmp_path / "m.gguf"), n_ctx=8).model
    c = m.config
    cache = KVCache(c.n_layer, 8, c.n_head_kv, c.head_dim)
    for pos in range(8):
        m.forward(np.array([65 + pos]), pos, cache)
    with pytest.raises(ValueError, match="9 tokens do not fit the context of 8"):
        m.forward(np.array([70]), 8, cache)


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma3-270m"])
def test_step_on_the_shipped_models(name):
    from spark_lab.models import ModelNotFound
    try:
        llm = LLM.load(name, n_ctx=128)
    except ModelNotFound as e:
        pytest.skip(str(e))
    ids = llm.tokenizer.encode("The capital of France is Paris, and the capital of Italy is", add_bos=True)
    # The step's RMSNorm sums in another order (1e-7); where a product rounds x to int8 blocks, that
    # now and then moves a value across a rounding boundary (1/127 of its block's max), and 30
    # layers carry it to ~0.7 of a logit: the size of llama.cpp's own distance from float32 x
    # (test_llamacpp_parity: within 1.0). Gemma 3's Q5_0 products stay float, but its
    # activations (10^4 and more before its norms) amplify the sum order alone to ~0.2.
    got, ref = step_and_reference(llm.model, ids, 128, cache_rtol=0.1)
    assert got.argmax() == ref.argmax()
    assert np.abs(got - ref).max() <= 1.0 * max(1.0, np.abs(ref).max() / 30)


def test_fused_products_share_the_parts_memory(tmp_path):
    import gguf
    from spark_lab.memory import get_allocator
    p = write_tiny_gguf(tmp_path / "m.gguf", d=64, ff=128, qtype=gguf.GGMLQuantizationType.Q4_1)
    m = LLM(p, n_ctx=32).model
    m._dec = False
    m.forward(np.arange(40, 50), 0, KVCache(m.config.n_layer, 32, m.config.n_head_kv, m.config.head_dim))
    alloc = get_allocator()
    before = alloc.stats().by_tag["weights"]
    m._dec = None
    dec = m._decoder()
    assert all("qkv" in mv and "gu" in mv for mv in dec.layers)
    L = m.layers[0]
    for parts in ((L.wq, L.wk, L.wv), (L.w_gate, L.w_up)):            # views of one stacked array
        bases = {id(w.packed.arrays[0].base) for w in parts}
        assert len(bases) == 1 and parts[0].packed.arrays[0].base is not None
    assert alloc.stats().by_tag["weights"] == before                   # stacked, not copied beside
