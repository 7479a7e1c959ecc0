"""spark_lab.llm.batch: continuous batching gives each request the tokens it gets alone (batch invariance),
frees slots on close, queues FIFO, and reuses prompt prefixes (hits, LRU eviction)."""
import threading

import numpy as np
import pytest

from spark_lab.llm import LLM
from spark_lab.llm.batch import BatchEngine

from .tiny import write_tiny_gguf

pytest.importorskip("numba")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import gguf
    p = write_tiny_gguf(tmp_path_factory.mktemp("batch") / "m.gguf", d=64, ff=128, n_ctx_train=512,
                        qtype=gguf.GGMLQuantizationType.Q8_0, quant_embd=True)
    return LLM(p, n_ctx=256)


def prompts(n, seed=0, lo=5, hi=40):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, 250, size=int(rng.integers(lo, hi)))] for _ in range(n)]


def alone(llm, prompt, **kw):
    llm.reset()
    return llm.generate(prompt, **kw)


def run_concurrently(be, ps, **kw):
    out = [None] * len(ps)
    start = threading.Barrier(len(ps))

    def go(i):
        start.wait()
        out[i] = be.generate_tokens(ps[i], **kw)
    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(ps))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


@pytest.mark.parametrize("arch,qtype,kv", [("llama", "Q8_0", "f32"), ("llama", "Q4_1", "f32"), ("qwen2", "Q8_0", "f32"),
                                           ("llama", "F32", "f32"), ("gpt-oss", "fixture", "f16")])
def test_step_batch_rows_equal_single_steps(tmp_path, arch, qtype, kv):
    """gpt-oss (tests/fixtures/spark: MXFP4 experts, q|k|v biases, attention sinks, a sliding window)
    with an f16 cache: the pooled rows take the sinks in the one attention call."""
    import gguf
    from pathlib import Path
    from spark_lab.llm.cache import KVCache
    p = (Path(__file__).parents[1] / "fixtures" / "spark" / "gpt-oss.gguf" if qtype == "fixture" else
         write_tiny_gguf(tmp_path / "m.gguf", arch=arch, d=64, ff=128, qtype=getattr(gguf.GGMLQuantizationType, qtype)))
    llm = LLM(p, n_ctx=64)
    m, c = llm.model, llm.config
    dec = m._decoder()
    if dec is None:
        pytest.skip("the fused CPU decoder's batch step; on a device (strict) the batch runs the xp path, "
                    "tested by the streams tests below")
    ps = prompts(9, seed=1)    # 9 rows: 8 through the int8 GEMM (n >= TOKENS), 1 left over
    kw = dict(type_k=kv, type_v=kv)
    pooled = KVCache.pooled(len(ps), c.n_layer, 64, c.n_head_kv, c.head_dim, **kw)      # the batch engine's slots
    caches = [x for i in range(len(ps)) for x in (pooled[i], KVCache(c.n_layer, 64, c.n_head_kv, c.head_dim, **kw))]
    for i, p in enumerate(ps):
        for cache in caches[2 * i:2 * i + 2]:
            m.forward(np.array(p), 0, cache)
    singles = [dec.step(p[0], len(p), caches[2 * i + 1])[0] for i, p in enumerate(ps)]
    for n in (5, 9):   # below and above TOKENS: one kernel per row, then the GEMM
        batch = dec.step_batch([p[0] for p in ps[:n]], [len(p) for p in ps[:n]], caches[0:2 * n:2])
        assert batch.shape == (n, c.n_vocab)
        for i in range(n):
            assert np.array_equal(batch[i], singles[i])                   # bit for bit
            k = len(ps[i]) + 1
            assert np.array_equal(caches[2 * i].k[:, :k], caches[2 * i + 1].k[:, :k])


def test_sixteen_streams_equal_alone(tiny):
    ps = prompts(16, seed=2)
    kw = dict(max_new_tokens=12, temperature=0, stop_at_eos=False)
    ref = [alone(tiny, p, **kw).token_ids for p in ps]
    with BatchEngine(tiny, parallel=16, prefix_cache_bytes=0) as be:
        got = run_concurrently(be, ps, **kw)
        st = be.stats()
    assert [g.token_ids for g in got] == ref
    assert all(len(r) == 12 for r in ref)
    assert st["tokens_generated"] >= 16 * 12 and st["steps"] < 16 * 12    # rows really were stepped together
    assert st["busy"] == 0 and st["waiting"] == 0


def test_sampled_streams_equal_alone_and_fewer_slots_queue(tiny):
    ps = prompts(6, seed=3)
    kw = dict(max_new_tokens=8, temperature=0.8, seed=7, stop_at_eos=False)
    ref = [alone(tiny, p, **kw) for p in ps]
    with BatchEngine(tiny, parallel=2, prefix_cache_bytes=0) as be:      # 6 requests, 2 slots: FIFO wait
        got = run_concurrently(be, ps, **kw)
    assert [g.token_ids for g in got] == [r.token_ids for r in ref]
    assert [g.text for g in got] == [r.text for r in ref]


def test_long_prompts_prefill_in_chunks_alongside_decoding(tiny):
    ps = prompts(4, seed=4, lo=100, hi=180)
    kw = dict(max_new_tokens=6, temperature=0, stop_at_eos=False)
    with BatchEngine(tiny, parallel=1, prefix_cache_bytes=0, prefill_chunk=32) as be:
        ref = [be.generate_tokens(p, **kw).token_ids for p in ps]
    with BatchEngine(tiny, parallel=4, prefix_cache_bytes=0, prefill_chunk=32) as be:
        got = run_concurrently(be, ps, **kw)
    assert [g.token_ids for g in got] == ref


def test_closing_a_stream_frees_its_slot(tiny):
    p = prompts(2, seed=5)
    with BatchEngine(tiny, parallel=1, prefix_cache_bytes=0) as be:
        it = be.stream_tokens(p[0], max_new_tokens=50, temperature=0, stop_at_eos=False)
        next(it)
        assert be.stats()["busy"] == 1
        it.close()                                                        # the client went away
        assert be.stats()["busy"] == 0
        g = be.generate_tokens(p[1], max_new_tokens=5, temperature=0, stop_at_eos=False)
    assert g.token_ids == alone(tiny, p[1], max_new_tokens=5, temperature=0, stop_at_eos=False).token_ids


def test_prefix_cache_hits_give_the_same_tokens_and_evict_lru(tiny):
    from spark_lab.llm.batch import PrefixCache
    from spark_lab.llm.cache import KVCache
    rng = np.random.default_rng(6)
    system = [int(t) for t in rng.integers(3, 250, size=70)]
    turns = [system + [int(t) for t in rng.integers(3, 250, size=9)] for _ in range(3)]
    kw = dict(max_new_tokens=6, temperature=0, stop_at_eos=False)
    with BatchEngine(tiny, parallel=2, prefix_cache_bytes=0, prefill_chunk=16) as be:
        ref = [be.generate_tokens(t, **kw).token_ids for t in turns]
    with BatchEngine(tiny, parallel=2, prefill_chunk=16) as be:            # one after another: the slot's own K/V
        got = [be.generate_tokens(t, **kw) for t in turns]
        st = be.stats()
        again = be.generate_tokens(turns[2], **kw)                            # the same prompt: one token left to run
        G = be.granule          # 1 where prompt K/V do not depend on chunking (the CPU kernels), else whole chunks
    shared = 70 // G * G
    assert [g.token_ids for g in got] == ref and again.token_ids == ref[2]
    assert [g.reused_prompt_tokens for g in got] == [0, shared, shared]
    assert again.reused_prompt_tokens == (len(turns[2]) - 1) // G * G
    assert st["prefix_hits"] == 2 and st["prefix_tokens_reused"] == 2 * shared and st["prefix_entries"] == 0
    c = tiny.config
    per_token = 2 * c.n_layer * c.n_head_kv * c.head_dim * 4                 # f32 K and V
    with BatchEngine(tiny, parallel=3, prefill_chunk=16) as be:            # at once: the shared 70 are copied
        hold = [be.stream_tokens(t, max_new_tokens=50, temperature=0, stop_at_eos=False) for t in turns[:2]]
        for h in hold:
            next(h)                                                           # slots 0 and 1 stay busy
        st = be.stats()
        assert st["prefix_entries"] == 1 and st["prefix_bytes"] == per_token * shared
        g = be.generate_tokens(turns[2], **kw)                                # slot 2 starts from the copy
        for h in hold:
            h.close()
    assert g.reused_prompt_tokens == shared and g.token_ids == ref[2]
    cache = KVCache(c.n_layer, 128, c.n_head_kv, c.head_dim)
    pc = PrefixCache(int(per_token * 74 * 2.5))                              # room for two 74-token entries
    for key in ([1] * 74, [2] * 74, [3] * 74):
        pc.store(key, cache)
    assert len(pc.entries) == 2 and pc.nbytes <= per_token * 74 * 2.5
    assert pc.lookup([1] * 74 + [5], 1) == (None, 0)                         # the least recent was evicted
    assert pc.lookup([3] * 74 + [9], 1)[1] == 74 and pc.lookup([3] * 74 + [9], 16)[1] == 64


def test_bad_requests_fail_clearly_without_taking_a_slot(tiny):
    with BatchEngine(tiny, parallel=1) as be:
        with pytest.raises(ValueError, match="empty"):
            be.generate_tokens([])
        with pytest.raises(ValueError, match="vocabulary"):
            be.generate_tokens([10 ** 6])
        assert be.stats()["busy"] == 0
    with pytest.raises(ValueError, match="parallel"):
        BatchEngine(tiny, parallel=0)


def test_smollm2_sixteen_streams_equal_alone():
    from spark_lab.models import is_present
    if not is_present("smollm2-135m-instruct"):
        pytest.skip("SmolLM2 is not installed")
    llm = LLM.load("smollm2-135m-instruct", n_ctx=256)
    topics = ["the sea", "a cat", "rain", "bread", "trains", "the moon", "music", "winter",
              "a garden", "chess", "bees", "a river", "clocks", "snow", "maps", "tea"]
    ps = [llm.encode_chat([{"role": "user", "content": f"One sentence about {t}."}]) for t in topics]
    kw = dict(max_new_tokens=6, temperature=0)
    ref = [alone(llm, p, **kw) for p in ps]
    with BatchEngine(llm, parallel=16) as be:
        got = run_concurrently(be, ps, **kw)
    assert [g.token_ids for g in got] == [r.token_ids for r in ref]
    assert [g.text for g in got] == [r.text for r in ref]


def test_prompts_prefilled_together_equal_alone(tiny):
    """forward_many stacks prompts' rows for the weight products: each prompt's logits and K/V
    are those of its forward alone, bit for bit (the tiny model's Q8_0 weights are row-exact)."""
    from spark_lab.llm.cache import KVCache
    m, c = tiny.model, tiny.config
    if m._decoder() is None:
        pytest.skip("row-exact products are the CPU kernels'; on a device (strict) each prompt is prefilled alone")
    assert m.rows_exact()
    ps = prompts(3, seed=8, lo=9, hi=60)
    pos = [0, 0, 16]                                    # the third continues a prompt: a later chunk
    alone = [KVCache(c.n_layer, 128, c.n_head_kv, c.head_dim) for _ in ps]
    stacked = KVCache.pooled(3, c.n_layer, 128, c.n_head_kv, c.head_dim)
    for cache in (alone[2], stacked[2]):
        m.forward(np.arange(3, 19), 0, cache)
    ref = [m.forward(np.array(p), q, cache)[-1] for p, q, cache in zip(ps, pos, alone)]
    got = m.forward_many([(np.array(p), q, cache) for p, q, cache in zip(ps, pos, stacked)])
    assert got.shape == (3, c.n_vocab)
    for i, p in enumerate(ps):
        assert np.array_equal(got[i], ref[i])
        n = pos[i] + len(p)
        assert np.array_equal(stacked[i].k[:, :n], alone[i].k[:, :n]) and np.array_equal(stacked[i].v[:, :n], alone[i].v[:, :n])


def test_float_weights_are_not_row_exact(tmp_path):
    """F32 weights go through BLAS, whose rounding may depend on the row count: no stacking."""
    import gguf
    llm = LLM(write_tiny_gguf(tmp_path / "f.gguf", d=64, ff=128, qtype=gguf.GGMLQuantizationType.F32), n_ctx=64)
    assert not llm.model.rows_exact()
    with BatchEngine(llm, parallel=1, prefill_chunk=16) as be:
        assert be.granule == 16                         # prefixes reused in whole chunks only


def test_prompt_numbers_do_not_depend_on_chunking(tiny):
    """Prompt attention runs row by row through the decode kernel and every product is row-exact:
    a prompt cut into chunks of 7 gets the K/V and last logits of one pass, bit for bit (what lets
    the prefix cache reuse a prefix of any length)."""
    from spark_lab.llm.cache import KVCache
    m, c = tiny.model, tiny.config
    if not m.rows_exact():
        pytest.skip("row-exact products are the CPU kernels'")
    p = np.array(prompts(1, seed=10, lo=40, hi=41)[0])
    one, cut = (KVCache(c.n_layer, 64, c.n_head_kv, c.head_dim) for _ in range(2))
    ref = m.forward(p, 0, one)
    for s in range(0, len(p), 7):
        got = m.forward(p[s:s + 7], s, cut)
    assert np.array_equal(got, ref)
    assert np.array_equal(one.k[:, :len(p)], cut.k[:, :len(p)]) and np.array_equal(one.v[:, :len(p)], cut.v[:, :len(p)])


def test_stop_string_and_eos_with_tokens_sampled_ahead(tiny):
    """The stepping thread draws tokens ahead of a request; a stop string ends the request, the
    slot is freed, and what the request saw equals the lone run."""
    p = prompts(1, seed=9)[0]
    ref = alone(tiny, p, max_new_tokens=20, temperature=0, stop_at_eos=False)
    stop = ref.text[len(ref.text) // 2:len(ref.text) // 2 + 2]
    want = alone(tiny, p, max_new_tokens=20, temperature=0, stop_at_eos=False, stop=[stop])
    with BatchEngine(tiny, parallel=2, prefix_cache_bytes=0) as be:
        got = be.generate_tokens(p, max_new_tokens=20, temperature=0, stop_at_eos=False, stop=[stop])
        assert be.stats()["busy"] == 0
        again = be.generate_tokens(p, max_new_tokens=20, temperature=0, stop_at_eos=False)
    assert (got.text, got.token_ids, got.finish_reason) == (want.text, want.token_ids, want.finish_reason)
    assert again.token_ids == ref.token_ids


def test_next_turn_reuses_its_slot_in_place(tiny):
    """A freed slot keeps its prompt's K/V: a chat's next turn (the last prompt + the answer + a new
    message) takes that slot and prefills only what follows the last prompt, with the tokens it gets alone."""
    kw = dict(max_new_tokens=6, temperature=0, stop_at_eos=False)
    p1 = prompts(1, seed=11, lo=20, hi=21)[0]
    with BatchEngine(tiny, parallel=2, prefix_cache_bytes=0, prefill_chunk=16) as be:
        G = be.granule                                                      # 1 on the CPU kernels, else 16
        g1 = be.generate_tokens(p1, **kw)
        be.generate_tokens(prompts(1, seed=12)[0], **kw)                   # the other slot, meanwhile
        p2 = p1 + g1.token_ids + [7, 8, 9]
        g2 = be.generate_tokens(p2, **kw)
        st = be.stats()
    assert g2.reused_prompt_tokens == len(p1) // G * G                     # the answer's K/V came from decode steps
    assert g2.token_ids == alone(tiny, p2, **kw).token_ids
    assert st["prefix_hits"] == 1 and st["prefix_tokens_reused"] == len(p1) // G * G
