"""plots: the figures carry exactly the numbers they are given (bytes stay bytes)."""
import math

import numpy as np
import plotly.graph_objects as go
import pytest

from spark_lab import plots
from spark_lab.memory import Allocator
from spark_lab.planner import ModelShape, plan


def test_decode_rates_constant_speed():
    times = [0.5 + 0.1 * i for i in range(10)]          # first token after 0.5 s, then 10 tok/s
    r = plots.decode_rates(times, window=3)
    assert r.shape == (9,)
    np.testing.assert_allclose(r, 10.0, rtol=1e-9)


def test_generation_speed_bars_are_prefill_and_decode():
    times = [0.2 + 0.05 * i for i in range(21)]         # 20 decode gaps of 50 ms -> 20 tok/s
    fig = plots.generation_speed(times, prompt_tokens=40)
    bars = fig.data[0]
    assert list(bars.x) == ["prefill", "decode"]
    assert bars.y[0] == pytest.approx(40 / 0.2)          # prompt tokens / time to first token
    assert bars.y[1] == pytest.approx(20.0)
    line = fig.data[1]
    assert len(line.y) == 20 and line.x[0] == 2
    fig2 = plots.generation_speed(times, prompt_tokens_per_second=123.0, widget=True)
    assert isinstance(fig2, go.FigureWidget) and fig2.data[0].y[0] == pytest.approx(123.0)


def test_generation_speed_rejects_empty():
    with pytest.raises(ValueError, match="no tokens"):
        plots.generation_speed([])


def test_memory_timeline_from_a_real_tracker():
    alloc = Allocator(budget=64 << 20)
    with alloc.track() as t:
        w = alloc.empty((1024, 256), tag="weights")          # 1 MiB
        kv = alloc.zeros((2, 512, 128), tag="kv_cache")      # 512 KiB
        del kv
    fig = plots.memory_timeline(t.series)
    names = [d.name for d in fig.data]
    assert names[-1] == "in use" and "weights" in names and "kv_cache" in names
    by_name = {d.name: d for d in fig.data}
    assert list(by_name["in use"].y) == [s[1] for s in t.series]
    assert max(by_name["weights"].y) == w.nbytes == 1 << 20
    assert max(by_name["kv_cache"].y) == 512 << 10
    assert by_name["kv_cache"].y[-1] == 0                    # freed when the array went away
    assert all(d.stackgroup == "memory" for d in fig.data[:-1])


def test_roofline_roofs_are_min_of_peak_and_bandwidth():
    fig = plots.roofline([("matvec", 0.5, 20.0), {"name": "matmul", "intensity": 50.0, "gflops": 300.0}],
                         peak_gflops=1000.0, bandwidth_gbs={"DRAM": 100.0, "L2": 400.0})
    dram = fig.data[0]
    x, y = np.asarray(dram.x), np.asarray(dram.y)
    np.testing.assert_allclose(y, np.minimum(1000.0, 100.0 * x))
    assert x.min() <= 0.125 and x.max() >= 200.0         # spans the points
    pts = fig.data[-1]
    assert list(pts.text) == ["matvec", "matmul"] and list(pts.y) == [20.0, 300.0]
    with pytest.raises(ValueError):
        plots.roofline([], peak_gflops=0, bandwidth_gbs=1.0)


def test_bar_chart_single_and_grouped():
    fig = plots.bar_chart({"rouge1": 0.41, "rouge2": 0.18})
    assert list(fig.data[0].x) == ["rouge1", "rouge2"] and list(fig.data[0].y) == [0.41, 0.18]
    fig = plots.bar_chart({"extractive": {"rouge1": 0.4, "rougeL": 0.3}, "abstractive": {"rouge1": 0.35, "rougeL": 0.28}})
    assert [d.name for d in fig.data] == ["extractive", "abstractive"] and fig.layout.barmode == "group"
    with pytest.raises(ValueError):
        plots.bar_chart({})


def test_image_grid_and_uint8_conversion():
    f = np.linspace(0, 1, 8 * 8 * 3, dtype=np.float32).reshape(8, 8, 3)
    u = plots.to_uint8_image(f)
    assert u.dtype == np.uint8 and u[0, 0, 0] == 0 and u[-1, -1, -1] == 255
    g = plots.to_uint8_image(np.full((4, 4), 7, np.uint8))
    assert g.shape == (4, 4, 3) and (g == 7).all()
    fig = plots.image_grid([f, f, g], titles=["a", "b", "c"], cols=2)
    assert len(fig.data) == 3 and isinstance(fig.data[0], go.Image)
    np.testing.assert_array_equal(np.asarray(fig.data[0].z), u)
    with pytest.raises(ValueError, match="shape"):
        plots.to_uint8_image(np.zeros((2, 2, 2, 2)))


def test_plan_table_lists_every_plan():
    plans = [plan(ModelShape(f"{b}B", b * 1e9, 4.5), context=4096, available=16 << 30) for b in (1, 70)]
    fig = plots.plan_table(plans)
    cells = fig.data[0].cells.values
    assert list(cells[0]) == ["1B", "70B"]
    assert list(cells[5]) == ["yes", "no"]                 # 70B at 4.5 bits does not fit in 16 GiB
    assert list(cells[7]) == ["yes", "yes"]                # both fit on a Spark
    assert math.isfinite(plans[0].total)
