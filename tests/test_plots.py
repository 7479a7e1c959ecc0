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
    assert list(pts.text) == ["1", "2"] and list(pts.y) == [20.0, 300.0]
    key = fig.layout.annotations[-1].text                  # the numbers' key beside the plot
    assert " 1  matvec" in key and " 2  matmul" in key and "above the roof" not in key
    assert list(pts.marker.symbol) == ["circle", "circle"]
    with pytest.raises(ValueError):
        plots.roofline([], peak_gflops=0, bandwidth_gbs=1.0)


def test_roofline_marks_a_point_above_the_roof():
    fig = plots.roofline([("fast", 1.0, 150.0), ("slow", 1.0, 50.0)], peak_gflops=1000.0, bandwidth_gbs=100.0,
                         peak_note="best of 5 runs")
    assert list(fig.data[-1].marker.symbol) == ["triangle-up", "circle"]
    assert " 1  fast  ▲ above the roof" in fig.layout.annotations[-1].text
    assert fig.layout.annotations[0].text == "peak 1000 GFLOP/s" and "best of 5 runs" in fig.layout.title.text


def _label_boxes(fig):
    """Pixel boxes of the point labels and markers, from the figure's fixed size and axis ranges."""
    S, pts = plots.ROOF_SIZE, fig.data[-1]
    (x0, x1), (y0, y1) = fig.layout.xaxis.range, fig.layout.yaxis.range
    pw, ph = S["width"] - S["l"] - S["r"], S["height"] - S["t"] - S["b"]
    assert (fig.layout.width, fig.layout.height) == (S["width"], S["height"])
    xy = [(S["l"] + (math.log10(x) - x0) / (x1 - x0) * pw, S["t"] + (y1 - math.log10(y)) / (y1 - y0) * ph)
          for x, y in zip(pts.x, pts.y)]
    labels = [plots.label_box(px, py, t, pos) for (px, py), t, pos in zip(xy, pts.text, pts.textposition)]
    r = plots.MARKER / 2
    return labels, [(px - r, py - r, px + r, py + r) for px, py in xy]


def _overlaps(a, b):
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def test_roofline_labels_never_cover_each_other_or_a_marker():
    # (FLOP/byte, GFLOP/s) of the 20 kernels of one quick `bench kernels` run on a 2-core Xeon:
    # decode kernels clump at 0.5 and 2-3 FLOP/byte, some at the same intensity
    pts = [(0.499, 13.01), (14.865, 45.84), (3.152, 98.15), (1.866, 86.34), (3.152, 70.54), (1.87, 52.38),
           (0.333, 0.16), (0.492, 1.82), (0.375, 0.53), (1.483, 9.42), (12.0, 20.55), (0.5, 2.08),
           (0.417, 2.89), (0.499, 12.38), (0.375, 0.58), (1.969, 14.77), (1.0, 3.58), (112.347, 106.25),
           (0.999, 16.05), (3.75, 3.92)]
    pts = [(f"kernel {i}", ai, gf) for i, (ai, gf) in enumerate(pts)]
    fig = plots.roofline(pts, peak_gflops=130.0, bandwidth_gbs={"DRAM": 22.1, "cache": 52.6})
    labels, markers = _label_boxes(fig)
    assert len(set(fig.data[-1].textposition)) > 2          # the clump's labels fan out around it
    text = fig.data[-1].text
    for i, a in enumerate(labels):
        for j, b in enumerate(labels[i + 1:], i + 1):
            assert not _overlaps(a, b), f"labels {text[i]} and {text[j]} overlap"
        for j, m in enumerate(markers):
            assert j == i or not _overlaps(a, m), f"label {text[i]} covers point {text[j]}"
    # all at one spot, the old "top center" pile-up: still eight distinct places for eight labels
    fig = plots.roofline([(f"same{i}", 1.0, 5.0) for i in range(8)], peak_gflops=500.0, bandwidth_gbs=20.0)
    assert len(set(fig.data[-1].textposition)) == 8


def test_kernel_roofline_has_no_point_above_its_roof(cpu_device):
    """The real benchmark (quick): the roof is the best measured, so every point is on or under it."""
    from spark_lab.benchmarks import kernels as B
    res = B.run(quick=True, repeats=1, threads=1)
    m = res["machine"]
    assert m["kernel_repeats"] == B.REPEATS and m["repeats"] == B.REPEATS * B.LIMIT_TRIES
    assert m["peak_gflops"] >= m["gemm_gflops"]
    assert m["peak_gflops"] >= max(r["gflops"] for r in res["kernels"])
    fig = B.roofline_figure(res)
    peak = max(max(t.y) for t in fig.data[:-1])              # roof lines: min(peak, bw * x)
    bw = max(float(t.name.split(": ")[-1].split()[0]) for t in fig.data[:-1])
    pts = fig.data[-1]
    for n, x, y in zip(pts.text, pts.x, pts.y):
        assert y <= min(peak, bw * x), f"point {n} ({y:.3g} GFLOP/s at {x:.3g} FLOP/B) is above the roof"
    assert "above the roof" not in fig.layout.annotations[-1].text
    assert f"best of {B.REPEATS * B.LIMIT_TRIES}" in fig.layout.title.text      # how the peak was measured


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
