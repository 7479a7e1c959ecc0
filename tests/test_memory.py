"""The allocator: exact accounting, budget refusal before allocating, tracking, zero-copy placement."""
from __future__ import annotations

import gc

import numpy as np
import pytest

from spark_lab import memory
from spark_lab.device import Device
from spark_lab.memory import Allocator, fmt_bytes


def test_every_byte_is_accounted(allocator):
    a = allocator.empty((100,), np.float32, tag="weights")                 # 400 B
    b = allocator.zeros((10, 20), np.float16, tag="kv_cache")              # 400 B
    c = allocator.empty(3, np.int64, tag="activations")                    # 24 B
    d = allocator.place(np.arange(50, dtype=np.float32), tag="weights")    # 200 B
    e = allocator.empty((7, 0), tag="scratch")                             # 0 B
    assert (a.dtype, b.dtype, c.dtype, d.dtype) == (np.float32, np.float16, np.int64, np.float32)
    assert not b.any()
    assert allocator.in_use == 1024 and allocator.peak == 1024
    assert allocator.by_tag == {"weights": 600, "kv_cache": 400, "activations": 24, "scratch": 0, "other": 0}

    allocator.free(b)                          # explicit
    assert allocator.in_use == 624 and allocator.by_tag["kv_cache"] == 0
    with pytest.raises(ValueError, match="not handed out by the allocator, or was already freed"):
        allocator.free(b)
    del c                                      # dropping the last reference
    gc.collect()
    assert allocator.in_use == 600 and allocator.by_tag["activations"] == 0
    assert allocator.peak == 1024              # the peak remembers

    f = allocator.empty((2, 2, 2), np.float64, tag="kv_cache")             # 64 B: below the old peak
    assert allocator.in_use == 664 and allocator.peak == 1024
    g = allocator.empty((128,), np.float32, tag="activations", what="logits")  # 512 B: a new peak
    assert allocator.in_use == 1176 and allocator.peak == 1176
    assert allocator.by_tag == {"weights": 600, "kv_cache": 64, "activations": 512, "scratch": 0, "other": 0}
    assert sum(allocator.by_tag.values()) == allocator.in_use

    st = allocator.stats()
    assert (st.in_use, st.peak, st.budget, st.device, st.pool_reserved) == (1176, 1176, 2**30, "cpu", 1176)
    assert st.by_tag == allocator.by_tag and st.by_tag is not allocator.by_tag
    assert st.capacity >= st.in_use
    del a, d, e, f, g
    gc.collect()
    assert allocator.in_use == 0 and allocator.peak == 1176
    allocator.reset_peak()
    assert allocator.peak == 0


def test_new_tags_are_counted(allocator):
    x = allocator.empty(10, np.uint8, tag="vae")
    assert allocator.by_tag["vae"] == 10 and allocator.in_use == 10
    allocator.free(x)
    assert allocator.by_tag["vae"] == 0


class SpyXP:
    """numpy, but counting calls to empty()."""
    def __init__(self):
        self.calls = 0

    def empty(self, shape, dtype):
        self.calls += 1
        return np.empty(shape, dtype)


def test_budget_refusal_happens_before_allocating(cpu_device):
    alloc = Allocator(budget=1000)
    spy = SpyXP()
    alloc.device = Device("cpu", spy, "spy")
    kept = alloc.empty((200,), np.float32, tag="weights")                  # 800 B: fits
    assert spy.calls == 1
    with pytest.raises(MemoryError) as e:
        alloc.empty((100,), np.float32, tag="kv_cache", what="layer 3")     # 400 B more: 1200 > 1000
    msg = str(e.value)
    assert "\n" not in msg
    assert "asked 400 B (kv_cache) for layer 3" in msg
    assert "800 B in use" in msg and "budget 1000 B" in msg
    assert spy.calls == 1                      # nothing was allocated
    assert alloc.in_use == 800 and alloc.peak == 800 and alloc.by_tag["kv_cache"] == 0
    with pytest.raises(MemoryError, match=r"asked 1\.0 KiB \(weights\)"):
        alloc.place(np.zeros(256, np.float32))
    with pytest.raises(MemoryError):
        alloc.zeros((51,), np.float32)         # 204 B: one float too many
    alloc.check(200)                           # exactly the budget is allowed
    z = alloc.zeros((50,), np.float32)
    assert alloc.in_use == 1000 and spy.calls == 2 and kept.size == 200 and z.size == 50


def test_default_budget_is_a_fraction_of_capacity(cpu_device):
    alloc = Allocator(fraction=0.5)
    assert 0 < alloc.budget <= alloc.capacity()
    assert alloc.stats().summary().startswith("cpu: 0 B in use (peak 0 B) of ")


def test_bad_shape(allocator):
    with pytest.raises(ValueError, match="negative dimension"):
        allocator.empty((3, -1))
    assert allocator.in_use == 0


def test_track_records_peak_and_series(allocator):
    before = allocator.empty(100, np.uint8, tag="weights")
    with allocator.track() as t:
        a = allocator.empty(1000, np.uint8, tag="activations")
        allocator.free(a)
        b = allocator.empty(500, np.uint8, tag="kv_cache")
    after = allocator.empty(5000, np.uint8)    # outside the block: not recorded
    assert t.start_in_use == 100 and t.peak == 1100 and t.peak_delta == 1000
    assert [s[1] for s in t.series] == [100, 1100, 100, 600, 600]   # start, 3 changes, end
    assert t.series[3][2]["kv_cache"] == 500 and t.series[1][2]["activations"] == 1000
    times = [s[0] for s in t.series]
    assert times == sorted(times) and times[0] == 0.0
    assert allocator.peak == 5600 and before.size + b.size + after.size == 5600


def test_place_memmap_is_zero_copy(allocator, tmp_path):
    m = np.memmap(tmp_path / "w.bin", dtype=np.float32, mode="w+", shape=(64, 16))
    m[:] = np.arange(64 * 16, dtype=np.float32).reshape(64, 16)
    w = allocator.place(m, tag="weights", what="blk.0.attn_q")
    assert np.shares_memory(w, m) and w is not m and type(w) is np.ndarray
    assert allocator.in_use == m.nbytes == 4096 and allocator.by_tag["weights"] == 4096
    m[0, 0] = -1.0
    assert w[0, 0] == -1.0                     # the same bytes
    h = np.ones(8, np.float32)
    v = allocator.place(h)                     # the caller's own array is never the tagged object
    assert np.shares_memory(v, h) and v is not h
    allocator.free(v)
    with pytest.raises(ValueError):
        allocator.free(h)
    c = allocator.place(m[:2], dtype=np.float16)   # a cast is a copy, counted at its own size
    assert c.dtype == np.float16 and not np.shares_memory(c, m) and c[0, 0] == -1.0
    assert allocator.in_use == 4096 + 2 * 16 * 2


def test_process_allocator_is_shared(allocator):
    assert memory.get_allocator() is allocator
    assert memory.reset_allocator(budget=123).budget == 123


def test_fmt_bytes():
    assert [fmt_bytes(n) for n in (0, 1023, 1536, 3 * 2**20, 2**30, 5 * 2**40)] == [
        "0 B", "1023 B", "1.5 KiB", "3.0 MiB", "1.0 GiB", "5.0 TiB"]


# ---------------------------------------------------------------------------- GPU

@pytest.mark.gpu
def test_gpu_arrays_come_from_managed_memory(gpu_device):
    import cupy as cp
    alloc = memory.reset_allocator(budget=64 * 2**20)
    a = alloc.zeros((1024, 256), np.float32, tag="kv_cache")
    assert isinstance(a, cp.ndarray) and alloc.in_use == 2**20
    attrs = cp.cuda.runtime.pointerGetAttributes(a.data.ptr)
    assert attrs.type == getattr(cp.cuda.runtime, "memoryTypeManaged", 3)
    assert alloc.stats().pool_reserved >= 2**20
    assert alloc._pool.get_limit() == 64 * 2**20


@pytest.mark.gpu
def test_gpu_place_copies_and_prefetches(gpu_device):
    import cupy as cp
    alloc = memory.reset_allocator(budget=64 * 2**20)
    h = np.random.default_rng(0).standard_normal((300, 70)).astype(np.float32)
    g = alloc.place(h[:, ::2], tag="weights")   # non-contiguous host input
    cp.cuda.get_current_stream().synchronize()
    np.testing.assert_array_equal(cp.asnumpy(g), h[:, ::2])
    assert alloc.in_use == h[:, ::2].nbytes and alloc.by_tag["weights"] == h[:, ::2].nbytes
    again = alloc.place(g, tag="activations")   # already on the GPU: a counted view, no copy
    assert again.data.ptr == g.data.ptr and alloc.in_use == 2 * g.nbytes


@pytest.mark.gpu
def test_gpu_budget_refused_before_cuda_is_asked(gpu_device):
    import cupy as cp
    alloc = memory.reset_allocator(budget=4 * 2**20)
    reserved = alloc._pool.total_bytes()
    with pytest.raises(MemoryError, match=r"asked 8\.0 MiB \(weights\).*budget 4\.0 MiB"):
        alloc.empty((2 * 2**20,), np.float32, tag="weights")
    assert alloc._pool.total_bytes() == reserved and alloc.in_use == 0
    with pytest.raises(MemoryError):          # CuPy temporaries are held to the budget by the pool limit
        cp.ones(2 * 2**20, dtype=cp.float32)
    assert alloc._pool.total_bytes() <= 4 * 2**20


@pytest.mark.gpu
def test_gpu_never_asks_for_more_than_is_free(gpu_device, monkeypatch):
    alloc = memory.reset_allocator(budget=256 * 2**20)
    monkeypatch.setattr(memory, "gpu_memory", lambda: {"total": 2**30, "available": 2**20, "unified": False})
    with pytest.raises(MemoryError):           # within budget, but more than the device has free
        alloc.empty((4 * 2**20,), np.uint8)
    small = alloc.empty((1024,), np.uint8)     # what is free is still handed out
    assert small.nbytes == 1024


@pytest.mark.gpu
def test_gpu_capacity_source(gpu_device):
    import cupy as cp
    from spark_lab import device
    props = device.gpu_properties()
    gm = device.gpu_memory()
    free, total = cp.cuda.runtime.memGetInfo()
    assert gm["unified"] == bool(props["integrated"]) and gm["total"] == total
    if gm["unified"]:  # GB10-like: the host's MemAvailable, not cudaMemGetInfo
        assert abs(gm["available"] - device.meminfo()["MemAvailable"]) < 2**30
    else:
        assert abs(gm["available"] - free) < 2**28
    alloc = memory.reset_allocator()
    assert 0 < alloc.budget <= alloc.capacity()
