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
