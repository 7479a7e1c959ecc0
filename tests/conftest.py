"""Shared fixtures. Nothing here is autouse: a test asks for what it needs."""
from __future__ import annotations

import functools

import pytest

from spark_lab import device, memory


def _forget():
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


def pytest_collection_modifyitems(config, items):
    # tests marked gpu skip (rather than fail) on a machine without a usable GPU
    gpu_items = [it for it in items if it.get_closest_marker("gpu")]
    if gpu_items and not _gpu_usable():
        skip = pytest.mark.skip(reason="needs a CUDA GPU with CuPy (scripts/gpu_check.sh runs these)")
        for it in gpu_items:
            it.add_marker(skip)
