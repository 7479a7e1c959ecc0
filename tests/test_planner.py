"""The planner: weights + KV cache + activations in bytes, checked by hand."""
from __future__ import annotations

import json

import pytest

from spark_lab.planner import (SPARK_MEMORY, SPARK_RESERVED, ModelShape, activation_bytes, kv_bytes, plan,
                               weight_bytes)

SPARK = SPARK_MEMORY - SPARK_RESERVED   # 120 GB the kit may use on a DGX Spark


def test_200b_at_4_bits_fits_a_spark_at_8_bits_it_does_not():
    p4 = plan(ModelShape("200B", params=200e9, bits_per_weight=4), context=4096, available=10**9)
    assert p4.weights == 100 * 10**9                      # 100 GB (decimal) of weights
    assert p4.fits_spark and p4.total <= SPARK
    assert p4.max_context_spark >= 4096
    assert not p4.fits_here and p4.max_context_here == 0  # 1 GB here: not even the weights
    p8 = plan(ModelShape("200B", params=200e9, bits_per_weight=8), context=4096, available=10**9)
    assert p8.weights == 200 * 10**9
    assert not p8.fits_spark and p8.max_context_spark == 0


def test_tiny_shape_exact_bytes():
    s = ModelShape("tiny", params=1000, bits_per_weight=8, layers=2, kv_heads=2, head_dim=4,
                   hidden=8, vocab=10, n_heads=2)
    assert weight_bytes(s) == 1000                         # 1000 params * 8 bits / 8
    # K and V * 2 layers * 2 kv heads * 4 dims * 16 tokens * 2 bytes (f16)
    assert kv_bytes(s, 16) == 2 * 2 * 2 * 4 * 16 * 2 == 1024
    assert kv_bytes(s, 16, batch=3, kv_dtype="f32") == 3 * 2048
    assert kv_bytes(s, 32, kv_dtype="q8_0") == 2 * 2 * 2 * 4 * 32 * 34 // 32 == 1088
    # 16 tokens (< 512, so one chunk) * f32 * (8 hidden-sized buffers * 8 + 10 logits) = 4736
    # + attention scores f32 * 16 queries * 16 keys * 2 heads = 2048
    assert activation_bytes(s, 16) == 16 * 4 * (8 * 8 + 10) + 4 * 16 * 16 * 2 == 6784
    p = plan(s, context=16, available=8808)
    assert (p.weights, p.kv_cache, p.activations, p.total) == (1000, 1024, 6784, 8808)
    assert p.fits_here and p.max_context_here == 16        # exactly full
    assert not plan(s, context=16, available=8807).fits_here
    assert plan(s, context=16, available=8807).max_context_here == 15


def test_longest_context_is_monotone_in_the_budget_and_tight():
    s = ModelShape("8B", params=8e9, bits_per_weight=4.5, layers=32, kv_heads=8, head_dim=128,
                   hidden=4096, n_heads=32, vocab=128256)
    w = weight_bytes(s)
    prev = -1
    for extra in [0, 10**6, 10**8, 5 * 10**8, 10**9, 4 * 10**9, 16 * 10**9, 64 * 10**9]:
        m = plan(s, context=1024, available=w + extra).max_context_here
        assert m >= prev
        if m:  # the longest context fits and one more token does not
            assert w + kv_bytes(s, m) + activation_bytes(s, m) <= w + extra
            if m < 131072:
                assert w + kv_bytes(s, m + 1) + activation_bytes(s, m + 1) > w + extra
        prev = m
    assert prev == 131072  # plenty of room: the search limit


def test_context_never_beyond_the_models_own():
    s = ModelShape("small", params=1e8, layers=4, context_max=2048)
    p = plan(s, available=10**11)
    assert p.context == 2048 and p.max_context_here == 2048 and p.max_context_spark == 2048


def test_estimated_shape_for_unknown_models():
    s = ModelShape("200B", params=200e9)
    assert s.layers > 50 and s.hidden % 128 == 0 and s.kv_heads == 8 and s.n_heads * s.head_dim == s.hidden
    assert abs(12 * s.layers * s.hidden**2 - 200e9) / 200e9 < 0.1  # the estimate roughly rebuilds the size


def test_default_available_is_the_allocators_headroom(allocator):
    keep = allocator.empty(1000, tag="weights")
    p = plan(ModelShape("m", params=1e6, layers=2), context=8)
    assert p.available_here == 2**30 - 4000 and keep.size == 1000


def test_bad_input():
    s = ModelShape("m", params=1e6)
    with pytest.raises(ValueError, match="unknown KV dtype 'int3'"):
        plan(s, kv_dtype="int3", available=10**9)
    with pytest.raises(ValueError, match="context and batch must be >= 1"):
        plan(s, context=0, available=10**9)
    with pytest.raises(ValueError, match="params and bits_per_weight must be > 0"):
        ModelShape("m", params=0)


def test_report_and_dict():
    p = plan(ModelShape("200B", params=200e9, bits_per_weight=4), context=4096, available=10**9)
    d = p.to_dict()
    assert json.loads(json.dumps(d))["weights"] == 100 * 10**9
    assert "(100.0 GB)" in p.report() and "fits Spark   yes" in p.report()


# ------------------------------------------------------------------------------ mixture of experts

def test_named_moe_shapes_match_the_published_counts():
    """Parameter counts from the configs' numbers, against what OpenAI and Qwen publish. OpenAI's
    "active" leaves out the embedding table (gpt-oss-120b 5.13B, -20b 3.61B); Qwen's A3B/A22B keep it."""
    from spark_lab.planner import known_shape
    published = {"gpt-oss-120b": (116.83e9, 5.13e9, False), "gpt-oss-20b": (20.91e9, 3.61e9, False),
                 "qwen3-30b-a3b": (30.5e9, 3.3e9, True), "qwen3-235b-a22b": (235e9, 22e9, True)}
    for name, (total, active, with_embedding) in published.items():
        s = known_shape(name)
        assert abs(s.params - total) / total < 0.005, name
        got = s.active_params + (s.embed_params if with_embedding else 0)
        assert abs(got - active) / active < 0.02, name
        assert s.is_moe and s.n_expert_used < s.n_expert


def test_gpt_oss_120b_fits_one_spark_and_decodes_from_its_active_bytes():
    from spark_lab.planner import SPARK_BANDWIDTH, active_bytes, known_shape
    s = known_shape("gpt-oss-120b")
    p = plan(s, context=4096, available=10**9)
    # experts: 36 layers x 128 x (gate 2880x2880 + up + down) in MXFP4 (17 bytes per 32 weights), the rest BF16
    experts = 36 * 128 * 3 * 2880 * 2880
    assert s.expert_params == experts
    assert p.weights == int((s.params - experts) * 2 + experts * 17 / 32)
    assert 64e9 < p.weights < 66e9                                   # ~65 GB, as the MXFP4 checkpoint
    assert p.fits_spark and p.sparks == 1 and p.max_context_spark == 131072
    # a token reads 4 of 128 experts, all attention and lm_head (BF16), one embedding row (ignored)
    per_token = int((s.params - experts - 201088 * 2880) * 2 + experts * 4 / 128 * 17 / 32)
    assert active_bytes(s) == p.active_bytes == per_token
    # sliding layers (every other one) keep 128 tokens of K/V: 18 x 4096 + 18 x 128 tokens x 8 heads x 64 x f16
    assert p.kv_cache == 2 * (18 * 4096 + 18 * 128) * 8 * 64 * 2
    assert p.decode_tps_spark == pytest.approx(SPARK_BANDWIDTH / (per_token + p.kv_cache))
    assert 45 < p.decode_tps_spark < 60
    assert "4 of 128 per token" in p.report() and f"{p.decode_tps_spark:.0f} tok/s" in p.report()


def test_qwen3_235b_at_4_bits_needs_two_sparks():
    from spark_lab.planner import known_shape
    p = plan(known_shape("qwen3-235b-a22b"), context=4096, available=10**9)
    assert 125e9 < p.weights < 140e9                                 # 4.5 bits per weight (Q4_K blocks)
    assert not p.fits_spark and p.max_context_spark == 0 and p.sparks == 2
    assert "2 Sparks hold it" in p.report()
    q = plan(known_shape("qwen3-30b-a3b"), context=4096, available=10**9)
    assert q.fits_spark and q.sparks == 1


def test_moe_decodes_as_fast_as_its_active_size():
    """Same total size, same bits: the MoE reads ~1/10 of the dense model's bytes per token."""
    from spark_lab.planner import known_shape
    moe = known_shape("qwen3-30b-a3b")
    dense = ModelShape("dense-30b", params=moe.params, bits_per_weight=moe.bits_per_weight, layers=48,
                       kv_heads=4, head_dim=128, hidden=2048, n_heads=32, vocab=151936)
    pm, pd = plan(moe, context=1024, available=10**9), plan(dense, context=1024, available=10**9)
    assert pm.weights == pd.weights
    assert 8 < pm.decode_tps_spark / pd.decode_tps_spark < 11


def test_moe_shape_from_a_gguf_is_exact():
    """Counts from the GGUF metadata, bytes from its tensor table (checked with gguf-py's reader)."""
    import gguf
    from pathlib import Path
    from spark_lab.planner import active_bytes, shape_from_model
    for name in ("qwen3moe", "gpt-oss"):
        path = Path(__file__).parent / "fixtures" / "spark" / f"{name}.gguf"
        r = gguf.GGUFReader(str(path))
        arch = str(r.fields["general.architecture"].contents())
        n, k = r.fields[f"{arch}.expert_count"].contents(), r.fields[f"{arch}.expert_used_count"].contents()
        sizes = {t.name: int(t.n_bytes) for t in r.tensors}
        exps = sum(b for t, b in sizes.items() if "_exps" in t)
        want = sum(sizes.values()) - exps + exps * k // n - sizes["token_embd.weight"]
        s = shape_from_model(str(path))
        assert (s.n_expert, s.n_expert_used) == (n, k) and s.weight_bytes == sum(sizes.values())
        assert active_bytes(s) == want < s.weight_bytes
    assert s.sliding_window == 4 and s.sliding_layers == 2          # gpt-oss: every other layer slides


def test_moe_bad_input(tmp_path):
    from spark_lab.planner import known_shape, shape_from_model
    from tests.llm.gguf_edit import rewrite_gguf
    with pytest.raises(ValueError, match=r"expert_used_count \(9\) must be between 1 and expert_count \(8\)"):
        ModelShape("m", params=1e9, n_expert=8, n_expert_used=9)
    with pytest.raises(ValueError, match="unknown model 'gpt-oss-7b'"):
        known_shape("gpt-oss-7b")
    with pytest.raises(ValueError, match="unknown weight format 'FP3'"):
        known_shape("gpt-oss-20b", expert_format="FP3")
    from pathlib import Path
    src = Path(__file__).parent / "fixtures" / "spark" / "qwen3moe.gguf"
    bad = tmp_path / "bad.gguf"
    rewrite_gguf(src, bad, metadata={"qwen3moe.expert_used_count": 9})
    with pytest.raises(ValueError, match="bad.gguf: qwen3moe.expert_used_count .*9.* must be between 1 and "
                                         "qwen3moe.expert_count .*8"):      # one line naming the file and keys
        shape_from_model(str(bad))


def test_cli_plan_names_the_real_models(capsys):
    from spark_lab.cli import main
    assert main(["plan", "gpt-oss-120b"]) == 0
    out = capsys.readouterr().out
    assert "fits Spark   yes" in out and "116.8B parameters" in out and "tok/s on a Spark" in out
    assert main(["plan", "qwen3-235b-a22b", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["sparks"] == 2 and not d["fits_spark"] and d["n_expert"] == 128 and d["n_expert_used"] == 8


def test_gpt_oss_as_llama_cpp_ships_it():
    """llama.cpp's own gpt-oss GGUFs keep the experts in MXFP4 and the rest in Q8_0; llama-bench lists
    them as 59.02 GiB (120b) and 11.27 GiB (20b). The planner's count lands within 1%, and the lighter
    rest raises the 120b decode ceiling above the ~59 tok/s reported on a Spark."""
    from spark_lab.planner import known_shape
    for name, gib in (("gpt-oss-120b", 59.02), ("gpt-oss-20b", 11.27)):
        p = plan(known_shape(name, other_format="Q8_0"), context=4096, available=10**9)
        assert abs(p.weights / 2**30 - gib) / gib < 0.01, name
    assert 59 < plan(known_shape("gpt-oss-120b", other_format="Q8_0"), context=4096, available=10**9).decode_tps_spark < 90


def test_cli_plan_unknown_name_lists_the_named_shapes(capsys):
    from spark_lab.cli import main
    assert main(["plan", "gpt-oss-7b"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "gpt-oss-7b" in err and "gpt-oss-120b, gpt-oss-20b" in err
