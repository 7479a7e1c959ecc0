"""Shared fixtures. Nothing here is autouse: a test asks for what it needs."""
from __future__ import annotations

import functools
import os

import pytest

from spark_lab import device, memory


def _forget():
    from spark_lab.llm.model import join_ready_ahead
    join_ready_ahead()        # an earlier test's repack-ahead thread would place weights in the next allocator
    device.reset_device_cache()
    memory._ALLOCATOR = None  # the next get_allocator() builds a fresh one on the current device


@pytest.fixture
def cpu_device(monkeypatch):
    """SPARK_LAB_DEVICE=cpu with the device cache and process allocator reset (and reset again after)."""
    monkeypatch.setenv("SPARK_LAB_DEVICE", "cpu")
    _forget()
    yield device.get_device()
    _forget()


@pytest.fixture
def allocator(cpu_device):
    """A fresh CPU allocator with a 1 GiB budget, installed as the process allocator."""
    return memory.reset_allocator(budget=2**30)


@pytest.fixture
def gpu_device(monkeypatch):
    """SPARK_LAB_DEVICE=cuda with caches reset (for tests marked gpu)."""
    monkeypatch.setenv("SPARK_LAB_DEVICE", "cuda")
    _forget()
    yield device.get_device()
    _forget()


@functools.lru_cache(maxsize=None)
def _gpu_usable() -> bool:
    cupy, _ = device._probe_cuda()
    return cupy is not None


# `SPARK_LAB_DEVICE=strict make test` runs every test on the strict CuPy stand-in (device_strict.py),
# except these modules, which run on NumPy under it, for one of two reasons: they test a CPU-only
# path (numba kernels, which a GPU never runs), or host-side logic over the shipped checkpoints for
# many tokens, where the stand-in's mat-vecs (each a NumPy dequantization of the whole matrix, the
# CUDA kernel's twin) are two orders of magnitude slower than the numba kernels. The device path of
# those very models is proven on strict elsewhere (test_device_strict: SmolLM2-135M and tiny GGUFs,
# same tokens, one copy per token). Keep this list short.
NUMPY_UNDER_STRICT = {
    "tests/llm/test_decode.py": "the fused numba decode step (Transformer._decoder), a CPU-only path",
    "tests/llm/test_kv_cache_types.py": "f16/q8_0 KV caches and their numba kernels, CPU-only options",
    "tests/kernels/test_attention_rows.py": "the numba decode attention kernel over pooled caches, a CPU-only path",
    "tests/llm/test_llamacpp_parity.py": "the shipped GGUFs' CPU numerics against llama.cpp, 32 tokens x prompts",
    "tests/test_summarize.py": "summarizer logic; its abstractive/hybrid tests write hundreds of SmolLM2 tokens",
    "tests/llm/test_constrain.py": "JSON-schema/grammar masks over the shipped SmolLM2 (host logic, ~100 tokens a test)",
}


_ON_NUMPY = pytest.StashKey[bool]()     # set on a test the hook below moved to NumPy


def _strict_requested() -> bool:
    return os.environ.get("SPARK_LAB_DEVICE", "").strip().lower() == "strict"


def pytest_configure(config):
    config.addinivalue_line("markers", "numpy_device: under SPARK_LAB_DEVICE=strict this test runs on NumPy "
                                       "(tests/conftest.py NUMPY_UNDER_STRICT says why)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    # before any fixture (module-scoped models included) is built
    if item.get_closest_marker("numpy_device") and _strict_requested():
        os.environ["SPARK_LAB_DEVICE"] = "cpu"
        _forget()
        item.stash[_ON_NUMPY] = True
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield
    if item.stash.get(_ON_NUMPY, False):
        os.environ["SPARK_LAB_DEVICE"] = "strict"
        _forget()


def pytest_collection_modifyitems(config, items):
    for it in items:
        if it.path.relative_to(config.rootpath).as_posix() in NUMPY_UNDER_STRICT:
            it.add_marker(pytest.mark.numpy_device)
    # tests marked gpu skip (rather than fail) on a machine without a usable GPU
    gpu_items = [it for it in items if it.get_closest_marker("gpu")]
    if gpu_items and not _gpu_usable():
        skip = pytest.mark.skip(reason="needs a CUDA GPU with CuPy (scripts/gpu_check.sh runs these)")
        for it in gpu_items:
            it.add_marker(skip)
