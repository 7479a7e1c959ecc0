"""The repacked weights' copy on disk (kernels/qmatvec/repack_cache.py): written on first use,
mapped by the next process, bit for bit the arrays a fresh repack makes; never read when stale
or half-written."""
import json
import os

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from spark_lab.kernels import qmatvec as qm
from spark_lab.kernels.qmatvec import repack_cache
from spark_lab.quants import QuantTensor
from tests.test_qmatvec import random_weight

pytest.importorskip("numba")


@pytest.fixture
def cache_on(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("SPARK_LAB_REPACK_CACHE", "1")
    return tmp_path / "cache" / "spark_lab" / "repacked"


def _file_weights(tmp_path, specs, seed=0, name="w.bin"):
    """Random weights [(qtype, rows, cols)] written one after another into one file -> QuantTensors
    on a read-only memmap of it (as a GGUF's tensors are), and the in-memory originals."""
    rng = np.random.default_rng(seed)
    srcs = [random_weight(q, r, c, rng) for q, r, c in specs]
    path = tmp_path / name
    path.write_bytes(b"".join(s.data.tobytes() for s in srcs))
    return _open(path, srcs), srcs


def _open(path, srcs):
    """QuantTensors of srcs' types and shapes on a fresh memmap of the file (a new process would)."""
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    out, off = [], 0
    for s in srcs:
        n = s.data.nbytes
        out.append(QuantTensor(mm[off:off + n], s.qtype, s.shape))
        off += n
    return out


def _entries(root):
    return sorted(p.name for p in root.glob("*.json")) if root.exists() else []


@pytest.mark.parametrize("q", [QT.Q4_K, QT.Q6_K, QT.Q8_0, QT.Q4_1, QT.MXFP4], ids=lambda q: q.name)
def test_second_load_maps_the_same_arrays(tmp_path, cache_on, monkeypatch, q):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 512), dtype=np.float32)
    (w,), (src,) = _file_weights(tmp_path, [(q, 200, 512)])
    first = qm.prepare(w)
    assert len(_entries(cache_on)) == 1
    (w2,) = _open(tmp_path / "w.bin", [src])                             # a fresh mapping, as a new process
    hits = []
    real_load = repack_cache.CacheEntry.load
    monkeypatch.setattr(repack_cache.CacheEntry, "load", lambda self: hits.append(r := real_load(self)) or r)
    second = qm.prepare(w2)
    assert hits and hits[0] is not None
    monkeypatch.setenv("SPARK_LAB_REPACK_CACHE", "0")
    fresh = qm.prepare(QuantTensor(src.data.copy(), q, src.shape))       # in memory, no cache
    assert first.kind == second.kind == fresh.kind
    for a, b, c in zip(first.arrays, second.arrays, fresh.arrays):
        assert a.dtype == b.dtype == c.dtype and a.shape == b.shape == c.shape
        assert a.tobytes() == b.tobytes() == c.tobytes()
        assert b.flags.writeable and b.flags.c_contiguous                # the kernels' usual array types
    np.testing.assert_array_equal(qm.qmatvec(x, w2), qm.qmatvec(x, QuantTensor(src.data.copy(), q, src.shape)))


def test_stack_round_trip(tmp_path, cache_on):
    specs = [(QT.Q4_K, 128, 256), (QT.Q4_K, 64, 256), (QT.Q4_K, 64, 256)]
    ws, srcs = _file_weights(tmp_path, specs)
    a = qm.prepare_stack(ws)
    assert len(_entries(cache_on)) == 1
    ws2 = _open(tmp_path / "w.bin", srcs)
    b = qm.prepare_stack(ws2)
    assert [x.tobytes() for x in a] == [x.tobytes() for x in b]
    x = np.random.default_rng(2).standard_normal((1, 256), dtype=np.float32)
    for w2, s in zip(ws2, srcs):
        np.testing.assert_array_equal(qm.qmatvec(x, w2), qm.qmatvec(x, QuantTensor(s.data.copy(), s.qtype, s.shape)))


def test_a_changed_file_is_a_miss(tmp_path, cache_on):
    (w,), _ = _file_weights(tmp_path, [(QT.Q8_0, 64, 256)], seed=0)
    qm.prepare(w)
    before = os.stat(tmp_path / "w.bin").st_mtime_ns
    (w2,), (src2,) = _file_weights(tmp_path, [(QT.Q8_0, 64, 256)], seed=1)   # new bytes in the same file
    os.utime(tmp_path / "w.bin", ns=(before + 10**9, before + 10**9))     # (a coarse clock: a later time)
    p = qm.prepare(w2)
    assert len(_entries(cache_on)) == 2
    x = np.random.default_rng(3).standard_normal((1, 256), dtype=np.float32)
    np.testing.assert_array_equal(qm.qmatvec(x, w2), qm.qmatvec(x, QuantTensor(src2.data.copy(), QT.Q8_0, src2.shape)))
    assert p.kind == "q8_0"


@pytest.mark.parametrize("damage", ["no sidecar", "short file", "other key"])
def test_a_damaged_entry_is_never_read(tmp_path, cache_on, damage):
    (w,), (src,) = _file_weights(tmp_path, [(QT.Q4_K, 64, 256)])
    qm.prepare(w)
    meta = next(cache_on.glob("*.json"))
    binp = meta.with_suffix(".bin")
    if damage == "no sidecar":
        meta.unlink()
    elif damage == "short file":
        with open(binp, "r+b") as f:
            f.truncate(binp.stat().st_size // 2)
    else:
        m = json.loads(meta.read_text())
        m["key"]["G"] = 7
        meta.write_text(json.dumps(m))
    entry = repack_cache.CacheEntry.of([w], w.packed.G)
    assert entry.load() is None
    (w2,) = _open(tmp_path / "w.bin", [src])
    x = np.random.default_rng(4).standard_normal((2, 256), dtype=np.float32)
    np.testing.assert_array_equal(qm.qmatvec(x, w2), qm.qmatvec(x, QuantTensor(src.data.copy(), QT.Q4_K, src.shape)))


def test_off_small_files_and_memory_arrays_skip_it(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (w,), (src,) = _file_weights(tmp_path, [(QT.Q8_0, 64, 256)])
    monkeypatch.delenv("SPARK_LAB_REPACK_CACHE", raising=False)
    assert repack_cache.CacheEntry.of([w], 32) is None                   # a small file: below MIN_FILE_BYTES
    monkeypatch.setenv("SPARK_LAB_REPACK_CACHE", "0")
    monkeypatch.setattr(repack_cache, "MIN_FILE_BYTES", 0)
    assert repack_cache.CacheEntry.of([w], 32) is None                   # turned off
    monkeypatch.setenv("SPARK_LAB_REPACK_CACHE", "1")
    assert repack_cache.CacheEntry.of([src], 32) is None                 # not a file mapping


def test_llm_tokens_equal_with_the_cache(tmp_path, cache_on, monkeypatch):
    from spark_lab.llm import LLM
    from spark_lab.models import ModelNotFound, resolve
    try:
        path = resolve("smollm2-135m-instruct")
    except ModelNotFound as e:
        pytest.skip(str(e))
    prompt = "The capital of France is"
    monkeypatch.setenv("SPARK_LAB_REPACK_CACHE", "0")
    want = LLM.load(path, n_ctx=64).generate(prompt, max_new_tokens=8, temperature=0)
    monkeypatch.setenv("SPARK_LAB_REPACK_CACHE", "1")
    first = LLM.load(path, n_ctx=64).generate(prompt, max_new_tokens=8, temperature=0)   # writes the entries
    n = len(_entries(cache_on))
    assert n > 10
    second = LLM.load(path, n_ctx=64).generate(prompt, max_new_tokens=8, temperature=0)  # maps them
    assert len(_entries(cache_on)) == n
    assert first.token_ids == second.token_ids == want.token_ids and len(want.token_ids) == 8


def test_prune_drops_stale_entries_and_dead_temporaries(tmp_path, cache_on, monkeypatch):
    (a,), _ = _file_weights(tmp_path, [(QT.Q8_0, 64, 256)], name="a.bin")
    (b,), _ = _file_weights(tmp_path, [(QT.Q8_0, 64, 256)], name="b.bin")
    qm.prepare(a)
    qm.prepare(b)
    assert len(_entries(cache_on)) == 2
    (tmp_path / "a.bin").unlink()                                        # a's GGUF is gone
    dead = cache_on / "0123.999999999.tmp"                               # no such process
    mine = cache_on / f"4567.{os.getpid()}.tmp"                          # a live writer's
    dead.write_bytes(b"x")
    mine.write_bytes(b"x")
    assert repack_cache.prune(cache_on) == 3
    assert len(_entries(cache_on)) == 1 and mine.exists() and not dead.exists()
    assert len(list(cache_on.glob("*.bin"))) == 1
    monkeypatch.setattr(repack_cache, "LAYOUT", repack_cache.LAYOUT + 1)  # the kernels' layout moved on
    assert repack_cache.prune(cache_on) == 2 and _entries(cache_on) == []


def test_read_ahead_walks_a_files_entries_in_the_order_they_were_written(tmp_path, cache_on, monkeypatch):
    specs = [(QT.Q4_K, 64, 256), (QT.Q8_0, 96, 256), (QT.Q6_K, 32, 256)]
    ws, _ = _file_weights(tmp_path, specs)
    others, _ = _file_weights(tmp_path, [(QT.Q4_K, 64, 256)], seed=1, name="other.bin")
    made = []
    for i, w in enumerate(ws + others):
        qm.prepare(w)
        newest = max(cache_on.glob("*.bin"), key=lambda p: p.stat().st_mtime_ns)
        os.utime(newest, ns=(10**18 + i * 10**9,) * 2)                  # distinct ages, in use order
        made.append(newest)
    t = repack_cache._READ_AHEAD[os.path.realpath(tmp_path / "w.bin")]
    t.join(5)
    key = json.loads(made[0].with_suffix(".json").read_text())["key"]
    order = repack_cache.entries_in_use_order(key, cache_on)
    assert [p for p, _ in order] == made[:3]                             # this GGUF's, oldest first
    assert [n for _, n in order] == [p.stat().st_size for p in made[:3]]
    asked = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: asked.append((n, advice)))
    budget = order[0][1] + order[1][1]
    assert repack_cache._advise(order, budget) == budget                 # stops where the memory ends
    assert asked == [(order[0][1], os.POSIX_FADV_WILLNEED), (order[1][1], os.POSIX_FADV_WILLNEED)]
