"""The kernel roofline benchmark: its cases run and return float32, its report and figure build.
(No wall times are asserted: the machine is shared.)"""
import argparse

import numpy as np
import pytest

from spark_lab import bench
from spark_lab.benchmarks import kernels as B


def test_quant_blocks_are_valid_ggml_data():
    gguf = pytest.importorskip("gguf")
    for qname in ("Q8_0", "Q4_1"):
        data = B._quant_blocks(4, 64, qname)
        w = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qname])
        assert w.shape == (4, 64) and np.all(np.isfinite(w))
        assert np.abs(w).max() <= (1.28 if qname == "Q8_0" else 0.08 + 0.15) + 1e-3


def test_every_case_runs_once_and_stays_float32(cpu_device):
    cases = B.kernel_cases(np, quick=True)
    names = [c[0] for c in cases]
    assert any(n.startswith("qmatvec Q4_1") for n in names) and any(n.startswith("conv2d") for n in names)
    for name, shape, fn, nbytes, flops, impl in cases:
        y = fn()
        assert y.dtype == np.float32, name
        assert nbytes > 0 and flops > 0, name


def _fake_results():
    m = {"device": "cpu", "name": "test", "threads": 1, "quick": True, "read_gbs": 10.0, "copy_gbs": 12.0,
         "bandwidth_gbs": 12.0, "cache_gbs": 50.0, "gemm_gflops": 100.0, "gemm_size": 512, "stream_bytes": 1 << 26}
    rows = []
    for name, sec, nbytes, flops in (("linear x (decode)", 1e-4, 4_000_000, 2_000_000), ("conv2d y", 2e-3, 600_000, 75_000_000)):
        r = B.Result(name, "[1]", sec, nbytes, flops)
        rows.append({"name": name, "shape": "[1]", "seconds": sec, "bytes": nbytes, "flops": flops, "impl": "",
                     "gbs": r.gbs, "gflops": r.gflops, "intensity": r.intensity, "frac_bandwidth": r.gbs / 12.0,
                     "frac_gemm": r.gflops / 100.0, "frac_roof": 0.5, "bound": "memory"})
    return {"machine": m, "kernels": rows}


def test_table_and_roofline_figure():
    res = _fake_results()
    table = B.format_table(res)
    assert "linear x (decode)" in table and "40.00" in table          # 4 MB in 100 us = 40 GB/s
    fig = B.roofline_figure(res)
    names = [t.name for t in fig.data]
    assert any("12" in n for n in names) and "measured" in names


def test_best_time_is_positive():
    assert B.best_time(lambda: np.ones(10).sum(), repeats=2, min_seconds=1e-4) > 0


def test_cmd_bench_names_a_missing_benchmark():
    with pytest.raises(ValueError, match="no benchmark named 'nope'"):
        bench.cmd_bench(argparse.Namespace(what="nope"))
